//! Programs run inside the local mesh's pods: an Envoy stand-in relay, a checksumming
//! sink/sender pair, and an echo server with a ping-pong latency client.
//!
//! Servers print `ready` on stdout once listening. Logs (one line per connection) go to stderr.
//! Plain std threads: a thread per connection direction is plenty for tests.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    process::ExitCode,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use meshaccel_e2e::{pattern::Pattern, sock};
use serde_json::json;

/// Test programs for meshaccel's local mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stand-in for Envoy in a pod with Istio's iptables rules (run it as uid 1337): relays each
    /// connection redirected to the outbound port to its original destination, and each one
    /// redirected to the inbound port to its original destination from <inbound-bind>:0.
    Relay {
        /// Port of Istio's virtualOutbound listener.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// Port of Istio's virtualInbound listener.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Source address of inbound passthrough connections (Istio's InboundPassthroughCluster).
        #[arg(long, default_value = "127.0.0.6")]
        inbound_bind: Ipv4Addr,
    },
    /// Accepts connections forever; reads each to EOF, then answers `bytes=<n> crc=<hex>`.
    Sink {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddrV4,
    },
    /// Sends N deterministic pseudo-random bytes to a sink and checks its answer; prints one JSON
    /// line and exits 0 only if the sink saw exactly what was sent.
    Send {
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
    },
    /// Echoes every connection's bytes back until EOF.
    Echo {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddrV4,
    },
    /// Sends `size` bytes, waits for them to come back, `count` times; prints JSON latencies.
    Pingpong {
        /// The echo server.
        #[arg(long)]
        connect: SocketAddrV4,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Round trips to measure.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

/// Reads from a socket, retrying EAGAIN on a blocking socket. On a socket in a sockmap the kernel
/// (tcp_bpf_recvmsg, 6.18) waits once and returns EAGAIN when that wait is ended by something
/// other than data, e.g. an ACK or a write-space wake-up of the same socket (after a half-close,
/// or while another thread writes). Envoy and every poll-based app retry EAGAIN by design; these
/// tools do the same, so tests judge the bytes, not this kernel quirk (see ARCHITECTURE.md).
struct Patient<'a>(&'a TcpStream);

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&*self.0).read(buf) {
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => continue,
                r => return r,
            }
        }
    }
}

const BUF: usize = 256 * 1024;
/// Small stacks: a relay may run thousands of threads; buffers are on the heap.
const STACK: usize = 128 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Relay {
            outbound_port,
            inbound_port,
            inbound_bind,
        } => relay(outbound_port, inbound_port, inbound_bind),
        Cmd::Sink { listen } => serve(listen, "sink", sink_conn),
        Cmd::Echo { listen } => serve(listen, "echo", echo_conn),
        Cmd::Send {
            connect,
            bytes,
            bind,
            chunk,
            seed,
            pause_ms,
            hold_ms,
        } => {
            return send(connect, bytes, bind, chunk, seed, pause_ms, hold_ms);
        }
        Cmd::Pingpong {
            connect,
            size,
            count,
        } => pingpong(connect, size, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format_args!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}

/// One line to stderr in a single write, so lines of concurrent threads do not interleave.
fn log(msg: std::fmt::Arguments<'_>) {
    let line = format!("{msg}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

fn ready() {
    println!("ready");
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name(name.to_string())
        .stack_size(STACK)
        .spawn(f)
        .map(drop)
}

fn listen(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    sock::listen(addr, 4096).with_context(|| format!("listening on {addr}"))
}

/// Accept loop on the current thread, a thread per connection.
fn accept_loop(
    listener: TcpListener,
    name: &'static str,
    handler: fn(TcpStream),
) -> anyhow::Result<()> {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = spawn_thread(name, move || handler(conn)) {
                    log(format_args!("{name}: cannot start a thread: {e}"));
                }
            }
            // E.g. EMFILE under load or ECONNABORTED: keep serving.
            Err(e) => {
                log(format_args!("{name}: accept: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(addr: SocketAddrV4, name: &'static str, handler: fn(TcpStream)) -> anyhow::Result<()> {
    let listener = listen(addr)?;
    ready();
    accept_loop(listener, name, handler)
}

// ---------------------------------------------------------------------------------------------
// relay

#[derive(Clone, Copy, Debug)]
enum Leg {
    Outbound,
    Inbound(Ipv4Addr),
}

fn relay(outbound_port: u16, inbound_port: u16, inbound_bind: Ipv4Addr) -> anyhow::Result<()> {
    let outbound = listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, outbound_port))?;
    let inbound = listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, inbound_port))?;
    ready();
    let relay_loop = |listener: TcpListener, leg: Leg| {
        move || loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    if let Err(e) = spawn_thread("relay", move || relay_conn(conn, leg)) {
                        log(format_args!("relay: cannot start a thread: {e}"));
                    }
                }
                Err(e) => {
                    log(format_args!("relay: accept: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    };
    spawn_thread("inbound", relay_loop(inbound, Leg::Inbound(inbound_bind)))?;
    relay_loop(outbound, Leg::Outbound)();
    Ok(())
}

fn relay_conn(down: TcpStream, leg: Leg) {
    let peer = down
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let local = down
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let kind = match leg {
        Leg::Outbound => "outbound",
        Leg::Inbound(_) => "inbound",
    };
    let orig = match sock::original_dst(&down) {
        Ok(orig) => orig,
        Err(e) => {
            log(format_args!(
                "relay {kind}: {peer} -> {local}: no original destination ({e}); closing"
            ));
            return;
        }
    };
    // Without NAT the original destination is the listener itself: refuse to loop.
    if local == orig.to_string() {
        log(format_args!(
            "relay {kind}: {peer} -> {local}: not redirected; closing"
        ));
        return;
    }
    let from = match leg {
        Leg::Outbound => None,
        Leg::Inbound(bind) => Some(SocketAddrV4::new(bind, 0)),
    };
    let up = match sock::connect(orig, from) {
        Ok(up) => up,
        Err(e) => {
            log(format_args!(
                "relay {kind}: {peer} -> {local} orig_dst={orig}: connect: {e}; closing"
            ));
            return;
        }
    };
    let via = up
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    log(format_args!(
        "relay {kind}: accepted {peer} -> {local} orig_dst={orig} upstream {via} -> {orig}"
    ));
    let (down, up) = (Arc::new(down), Arc::new(up));
    let (d2, u2) = (down.clone(), up.clone());
    let start = Instant::now();
    let reverse = thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || pump(&u2, &d2));
    let sent = pump(&down, &up);
    let received = match reverse {
        Ok(h) => h.join().unwrap_or(0),
        Err(e) => {
            log(format_args!("relay {kind}: cannot start a thread: {e}"));
            0
        }
    };
    log(format_args!(
        "relay {kind}: closed {peer} orig_dst={orig} up_bytes={sent} down_bytes={received} ms={}",
        start.elapsed().as_millis()
    ));
}

/// Copies `from` to `to` until EOF, then half-closes `to` (propagating the FIN). On an error
/// both sockets are shut down so the other direction ends too. Returns the bytes copied.
fn pump(from: &TcpStream, to: &TcpStream) -> u64 {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    let result = (|| -> io::Result<()> {
        loop {
            let n = match Patient(from).read(&mut buf) {
                Ok(0) => return to.shutdown(Shutdown::Write),
                Ok(n) => n,
                Err(e) => return Err(e),
            };
            (&*to).write_all(&buf[..n])?;
            total += n as u64;
        }
    })();
    if result.is_err() {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
    total
}

// ---------------------------------------------------------------------------------------------
// sink / send

fn sink_conn(mut conn: TcpStream) {
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

fn parse_answer(line: &str) -> Option<(u64, String)> {
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

#[allow(clippy::too_many_arguments)]
fn send(
    to: SocketAddrV4,
    bytes: u64,
    bind: Option<SocketAddrV4>,
    chunk: usize,
    seed: u64,
    pause_ms: u64,
    hold_ms: Option<u64>,
) -> ExitCode {
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

// ---------------------------------------------------------------------------------------------
// echo / pingpong

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

fn pingpong(to: SocketAddrV4, size: usize, count: usize) -> anyhow::Result<()> {
    anyhow::ensure!(size > 0 && count > 0, "size and count must be > 0");
    let mut conn = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    conn.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write_all(&msg)?;
        Patient(&conn).read_exact(&mut back).context("reading the echo")?;
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
