//! `echo` and `pingpong`: an echo server and its round-trip latency client.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    time::Instant,
};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use super::{Patient, serve};

#[derive(Args, Clone, Debug)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddrV4,
}

#[derive(Args, Clone, Debug)]
pub struct PingpongArgs {
    /// The echo server.
    #[arg(long)]
    connect: SocketAddrV4,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Round trips to measure.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
}

/// Echoes every connection's bytes back until EOF, a thread per connection.
pub fn echo(args: &EchoArgs) -> anyhow::Result<()> {
    serve(args.listen, "echo", echo_conn)
}

fn echo_conn(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match Patient(&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if (&conn).write_all(&buf[..n]).is_err() {
            return;
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}
/// Prints one JSON line of latencies.
pub fn pingpong(args: &PingpongArgs) -> anyhow::Result<()> {
    let (to, size, count) = (args.connect, args.size, args.count);
    anyhow::ensure!(size > 0 && count > 0, "size and count must be > 0");
    let mut conn = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    conn.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write_all(&msg)?;
        Patient(&conn)
            .read_exact(&mut back)
            .context("reading the echo")?;
        rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
    println!(
        "{}",
        json!({"count": count, "size": size, "p50_us": pct(50), "p99_us": pct(99), "mean_us": mean})
    );
    Ok(())
}
