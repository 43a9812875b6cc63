//! `sink`, `send` and `swarm`: checksummed transfers. The sink reads each connection to EOF and
//! answers `bytes=<n> crc=<hex>`; the senders write deterministic bytes and check that answer.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    process::ExitCode,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use super::{BUF, Patient, log, serve};
use crate::{pattern::Pattern, sock};

#[derive(Args, Clone, Debug)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddrV4,
    /// Wait this long after accepting before the first read (the bytes sent meanwhile stay
    /// unread at the receiver: for transition tests).
    #[arg(long, default_value_t = 0)]
    read_delay_ms: u64,
}

#[derive(Args, Clone, Debug)]
pub struct SendArgs {
    /// The sink.
    #[arg(long)]
    connect: SocketAddrV4,
    /// How many bytes to send.
    #[arg(long)]
    bytes: u64,
    /// Connect from this local address (with SO_REUSEADDR).
    #[arg(long)]
    bind: Option<SocketAddrV4>,
    /// Bytes per write.
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
    /// Seed of the byte stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Sleep this long after connecting, before the first write.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Sleep this long between writes (for long transfers).
    #[arg(long)]
    hold_ms: Option<u64>,
}

#[derive(Args, Clone, Debug)]
pub struct SwarmArgs {
    #[arg(long)]
    connect: SocketAddrV4,
    #[arg(long)]
    connections: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    /// Bytes per connection.
    #[arg(long)]
    bytes: u64,
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
    /// Sleep this long between writes of a connection.
    #[arg(long)]
    hold_ms: Option<u64>,
}

/// Accepts connections forever, a thread each.
pub fn sink(args: &SinkArgs) -> anyhow::Result<()> {
    SINK_READ_DELAY_MS.store(args.read_delay_ms, std::sync::atomic::Ordering::Relaxed);
    serve(args.listen, "sink", sink_conn)
}

/// `sink --read-delay-ms`.
static SINK_READ_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn sink_conn(mut conn: TcpStream) {
    let delay = SINK_READ_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
    if delay > 0 {
        thread::sleep(Duration::from_millis(delay));
    }
    let peer = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut buf = vec![0u8; BUF];
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0u64;
    loop {
        match Patient(&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(format_args!("sink: {peer}: read after {total} bytes: {e}"));
                return;
            }
        }
    }
    let crc = hasher.finalize();
    log(format_args!("sink: {peer} bytes={total} crc={crc:08x}"));
    if let Err(e) = conn.write_all(format!("bytes={total} crc={crc:08x}\n").as_bytes()) {
        log(format_args!("sink: {peer}: writing the answer: {e}"));
    }
}

pub(super) fn parse_answer(line: &str) -> Option<(u64, String)> {
    let mut bytes = None;
    let mut crc = None;
    for field in line.split_whitespace() {
        match field.split_once('=') {
            Some(("bytes", v)) => bytes = v.parse().ok(),
            Some(("crc", v)) => crc = Some(v.to_string()),
            _ => {}
        }
    }
    Some((bytes?, crc?))
}

/// One JSON line; exit 0 only if the sink saw exactly what was sent.
pub fn send(args: &SendArgs) -> ExitCode {
    let SendArgs {
        connect: to,
        bytes,
        bind,
        chunk,
        seed,
        pause_ms,
        hold_ms,
    } = *args;
    let start = Instant::now();
    match send_inner(to, bytes, bind, chunk.max(1), seed, pause_ms, hold_ms) {
        Ok((crc, peer_bytes, peer_crc)) => {
            let crc = format!("{crc:08x}");
            let ok = peer_bytes == bytes && peer_crc == crc;
            println!(
                "{}",
                json!({"ok": ok, "bytes": bytes, "crc": crc, "peer_bytes": peer_bytes, "peer_crc": peer_crc,
                       "elapsed_ms": start.elapsed().as_millis() as u64})
            );
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            log(format_args!("send: {e:#}"));
            println!(
                "{}",
                json!({"ok": false, "bytes": bytes, "error": format!("{e:#}"),
                       "elapsed_ms": start.elapsed().as_millis() as u64})
            );
            ExitCode::from(2)
        }
    }
}

/// One JSON line; exit 0 only if every sink answer matched.
pub fn swarm(args: &SwarmArgs) -> ExitCode {
    let SwarmArgs {
        connect: to,
        connections,
        concurrency,
        bytes,
        chunk,
        hold_ms,
    } = *args;
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Failures where the sink answered with other bytes than were sent (as opposed to a broken
    // connection): wrong bytes delivered, which must never happen.
    let mismatched = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let workers: Vec<_> = (0..concurrency.clamp(1, connections.max(1)))
        .map(|_| {
            let (next, failed, first_error) = (next.clone(), failed.clone(), first_error.clone());
            let mismatched = mismatched.clone();
            thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= connections {
                        break;
                    }
                    let seed = 1000 + i;
                    let err = match send_inner(to, bytes, None, chunk.max(1), seed, 0, hold_ms) {
                        Ok((crc, peer_bytes, peer_crc)) => {
                            let crc = format!("{crc:08x}");
                            if peer_bytes != bytes || peer_crc != crc {
                                mismatched.fetch_add(1, Ordering::Relaxed);
                            }
                            (peer_bytes != bytes || peer_crc != crc).then(|| {
                                format!("connection {i}: sent {bytes} bytes crc {crc}, sink saw {peer_bytes} crc {peer_crc}")
                            })
                        }
                        Err(e) => Some(format!("connection {i}: {e:#}")),
                    };
                    if let Some(e) = err {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().expect("lock").get_or_insert(e);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let failed = failed.load(Ordering::Relaxed);
    let mismatched = mismatched.load(Ordering::Relaxed);
    let first_error = first_error.lock().expect("lock").clone();
    println!(
        "{}",
        json!({"ok": failed == 0, "connections": connections, "failed": failed, "mismatched": mismatched, "first_error": first_error,
               "bytes_each": bytes, "elapsed_ms": start.elapsed().as_millis() as u64})
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn send_inner(
    to: SocketAddrV4,
    bytes: u64,
    bind: Option<SocketAddrV4>,
    chunk: usize,
    seed: u64,
    pause_ms: u64,
    hold_ms: Option<u64>,
) -> anyhow::Result<(u32, u64, String)> {
    let mut conn =
        sock::connect(to, bind).with_context(|| format!("connecting to {to} from {bind:?}"))?;
    if pause_ms > 0 {
        thread::sleep(Duration::from_millis(pause_ms));
    }
    let mut pattern = Pattern::new(seed);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; chunk];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        conn.write_all(&buf[..n])
            .with_context(|| format!("writing after {} bytes", bytes - left))?;
        left -= n as u64;
        if let (Some(ms), true) = (hold_ms, left > 0) {
            thread::sleep(Duration::from_millis(ms));
        }
    }
    conn.shutdown(Shutdown::Write).context("shutdown(Write)")?;
    let mut answer = String::new();
    Patient(&conn)
        .read_to_string(&mut answer)
        .context("reading the sink's answer")?;
    let Some((peer_bytes, peer_crc)) = parse_answer(&answer) else {
        bail!("unexpected answer from the sink: {answer:?}");
    };
    Ok((hasher.finalize(), peer_bytes, peer_crc))
}
