//! `unix-rr`: the floor a hop is compared with: the same ping-pong (a message of `size` bytes
//! each way, read as the other tools read, poll then a non-blocking recv) over a UNIX stream
//! socket pair inside one process, no TCP/IP and no sockmap. Run it on the hop's CPU.
use std::{
    io::{self, Write as _},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::sock;

#[derive(clap::Args, Debug)]
pub struct UnixRrArgs {
    /// Message size, both ways.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// How long to measure (after a 10% warm-up).
    #[arg(long, default_value_t = 2000)]
    ms: u64,
}

/// Reads exactly `buf.len()` bytes.
fn read_all(s: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let n = sock::read_ready(s, &mut buf[got..], None)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

/// Prints one JSON line: round trips, their rate, p50/p90/p99/p99.9 in µs.
pub fn run(a: &UnixRrArgs) -> anyhow::Result<()> {
    let (client, server) = UnixStream::pair().context("socketpair")?;
    let size = a.size.max(1);
    let echo = std::thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; size];
        let mut server = server;
        loop {
            match read_all(&server, &mut buf) {
                Ok(()) => server.write_all(&buf)?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut client = client;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let warm = Instant::now() + Duration::from_millis(a.ms / 10);
    while Instant::now() < warm {
        client.write_all(&msg)?;
        read_all(&client, &mut back)?;
    }
    let mut ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let end = start + Duration::from_millis(a.ms);
    while Instant::now() < end {
        let t = Instant::now();
        client.write_all(&msg)?;
        read_all(&client, &mut back)?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let took = start.elapsed();
    anyhow::ensure!(back == msg, "the echo changed the bytes");
    drop(client);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    ns.sort_unstable();
    let q = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "round_trips": ns.len(),
            "per_sec": ns.len() as f64 / took.as_secs_f64(),
            "p50_us": q(0.50),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
        })
    );
    Ok(())
}
