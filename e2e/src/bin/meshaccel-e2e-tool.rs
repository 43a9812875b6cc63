//! Programs run inside the local mesh's pods: an Envoy stand-in relay, a checksumming
//! sink/sender pair, an echo server with a ping-pong latency client, and a minimal HTTP/1.1
//! server with a verifying keep-alive load generator.
//!
//! Servers print `ready` on stdout once listening. Logs (one line per connection) go to stderr.
//! Plain std threads: a thread per connection direction is plenty for tests.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshaccel_e2e::{
    http::{self, Framing, Head, HttpReader},
    pattern::Pattern,
    sock,
};
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
    /// Tries to open a pinned BPF object (BPF_OBJ_GET) as whoever runs it; prints
    /// `{"ok":true}` or `{"ok":false,"errno":N,"error":"…"}` and exits 0 either way.
    ObjGet {
        path: PathBuf,
        /// Ask for a read-only fd (BPF_F_RDONLY) instead of a read-write one.
        #[arg(long)]
        read_only: bool,
    },
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
        /// Wait this long after accepting before the first read (the bytes sent meanwhile stay
        /// unread at the receiver: for transition tests).
        #[arg(long, default_value_t = 0)]
        read_delay_ms: u64,
    },
    /// Many `send`s at once: `connections` connections, `concurrency` at a time, each writing
    /// right after connect() returns; seeds differ per connection. One JSON line; exit 0 only if
    /// every sink answer matched.
    Swarm {
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
    /// Minimal HTTP/1.1 server (keep-alive, a thread per connection): `GET /bytes/<n>` answers n
    /// deterministic bytes, `POST /echo` the request body, both with `x-crc32: <hex crc32 of the
    /// body>`; anything else is 404.
    HttpServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddrV4,
    },
    /// HTTP/1.1 load over persistent connections, verifying every response (status 200, length,
    /// x-crc32 and the expected crc32); reconnects after connection errors. Prints one JSON line
    /// and exits 0 only if every request succeeded.
    HttpLoad(LoadArgs),
    /// Request/response server for the benchmarks: each request (a 32-byte head, then padding)
    /// names the response size and write size (see `meshaccel_e2e::ab`).
    RrServer(meshaccel_e2e::ab::RrServerArgs),
    /// A/B-interleaved rr load for the benchmarks: baseline connections opened before
    /// `--gate-file` appears, accelerated ones after, alternating blocks; one JSON line.
    AbRr(meshaccel_e2e::ab::AbRrArgs),
    /// A/B-interleaved HTTP/1.1 keep-alive load (`GET /bytes/<size>`, every response checked)
    /// for the benchmarks; see `ab-rr`.
    AbHttp(meshaccel_e2e::ab::AbHttpArgs),
    /// `relay` for IPv4 and IPv6 (a dual-stack Envoy): listens on 0.0.0.0 and [::] (v6-only),
    /// or on [::] alone accepting IPv4 as v4-mapped with `--mapped`; the original destination
    /// from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST; inbound passthrough from 127.0.0.6 or ::6.
    RelayDs(RelayDsArgs),
    /// Soak server: per connection a 32-byte head (magic, flags, stall, reply size and seed),
    /// then data to EOF (stalling reads once when asked: a slow reader), then answers
    /// `bytes=<n> crc=<hex>\n` and the reply bytes. See `soak`.
    SoakServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Soak client: opens every connection first (all concurrent), then per connection sends
    /// messages of 1 B to `--max-msg` with random pauses, half-closes and verifies the answer and
    /// the reply stream; some connections stall their reader, some end with a RST. One JSON line;
    /// exit 0 only if every connection ended within the deadline with every byte exact.
    Soak(SoakArgs),
}

#[derive(Args, Clone, Debug)]
struct RelayDsArgs {
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    #[arg(long, default_value = "127.0.0.6")]
    inbound_bind4: Ipv4Addr,
    #[arg(long, default_value = "::6")]
    inbound_bind6: std::net::Ipv6Addr,
    /// One [::] listener per port accepting IPv4 too (v4-mapped), instead of two listeners.
    #[arg(long)]
    mapped: bool,
}

#[derive(Args, Clone, Debug)]
struct SoakArgs {
    #[arg(long)]
    connect: std::net::SocketAddr,
    /// Connections, all open at once.
    #[arg(long, default_value_t = 1000)]
    connections: u64,
    /// Messages per connection: 1 to this many (random).
    #[arg(long, default_value_t = 8)]
    max_msgs: u64,
    /// Largest message (sizes are log-uniform from 1 B).
    #[arg(long, default_value_t = 1 << 20)]
    max_msg: u64,
    /// Largest reply from the server per connection (uniform from 0).
    #[arg(long, default_value_t = 256 * 1024)]
    max_reply: u64,
    /// Every n-th connection ends with a RST after a few messages (0: none).
    #[arg(long, default_value_t = 10)]
    rst_every: u64,
    /// Every n-th connection (offset 5) is a slow reader: the server stops reading for
    /// `--stall-ms` after its first read while the client pushes `--slow-bytes` (0: none).
    #[arg(long, default_value_t = 50)]
    slow_every: u64,
    #[arg(long, default_value_t = 1500)]
    stall_ms: u64,
    #[arg(long, default_value_t = 16 << 20)]
    slow_bytes: u64,
    /// Longest random pause between messages.
    #[arg(long, default_value_t = 50)]
    max_pause_ms: u64,
    /// Every connection must have ended by then.
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Seed of the plan (sizes, pauses) and the byte streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Repeat the whole wave this often (long mode), each with a new seed.
    #[arg(long, default_value_t = 1)]
    waves: u64,
}

#[derive(Args, Clone, Debug)]
struct LoadArgs {
    /// The HTTP server.
    #[arg(long)]
    connect: SocketAddrV4,
    /// Requests to send in all (over all connections), failed ones included.
    #[arg(long, required_unless_present = "duration_ms")]
    requests: Option<u64>,
    /// Run this long (with --requests too: whichever ends first).
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Body size: GET /bytes/<size>, or the body POSTed to /echo.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// Concurrent keep-alive connections, a thread each.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Fixed rate in requests per second over all connections; latency is measured from each
    /// request's intended send time (coordinated omission corrected). Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// GET /bytes/<size>, or POST <size> bytes to /echo.
    #[arg(long, value_enum, default_value_t = LoadMethod::Get)]
    method: LoadMethod,
    /// Host header (default: the --connect address).
    #[arg(long)]
    host: Option<String>,
    /// Stop early (finishing requests in flight) once this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Print `{"progress": <requests>, "errors": <n>, "elapsed_ms": <ms>}` every this many ms.
    #[arg(long)]
    progress_ms: Option<u64>,
    /// Timeout of each connect and each request (a request timing out counts as an error).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LoadMethod {
    Get,
    Post,
}

/// Reads as an event loop does ([`sock::read_ready`]).
struct Patient<'a>(&'a TcpStream);

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sock::read_ready(self.0, buf, None)
    }
}

/// [`Patient`] with a deadline (then TimedOut).
struct PatientUntil {
    conn: TcpStream,
    deadline: Instant,
}

impl Read for PatientUntil {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sock::read_ready(&self.conn, buf, Some(self.deadline)).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut {
                io::Error::new(io::ErrorKind::TimedOut, "response timed out")
            } else {
                e
            }
        })
    }
}

const BUF: usize = 256 * 1024;
/// Small stacks: a relay may run thousands of threads; buffers are on the heap.
const STACK: usize = 128 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::ObjGet { path, read_only } => {
            let flags = if read_only {
                meshaccel_e2e::bpf::BPF_F_RDONLY
            } else {
                0
            };
            let v = match meshaccel_e2e::bpf::obj_get(&path, flags) {
                Ok(_) => json!({ "ok": true }),
                Err(e) => json!({ "ok": false, "errno": e.raw_os_error(), "error": e.to_string() }),
            };
            println!("{v}");
            Ok(())
        }
        Cmd::Relay {
            outbound_port,
            inbound_port,
            inbound_bind,
        } => relay(outbound_port, inbound_port, inbound_bind),
        Cmd::Sink {
            listen,
            read_delay_ms,
        } => {
            SINK_READ_DELAY_MS.store(read_delay_ms, std::sync::atomic::Ordering::Relaxed);
            serve(listen, "sink", sink_conn)
        }
        Cmd::Swarm {
            connect,
            connections,
            concurrency,
            bytes,
            chunk,
            hold_ms,
        } => return swarm(connect, connections, concurrency, bytes, chunk, hold_ms),
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
        Cmd::HttpServer { listen } => serve(listen, "http", http_conn),
        Cmd::HttpLoad(args) => return http_load(args),
        Cmd::RrServer(args) => meshaccel_e2e::ab::rr_server(&args),
        Cmd::AbRr(args) => return ab_exit(meshaccel_e2e::ab::ab_rr(&args)),
        Cmd::AbHttp(args) => return ab_exit(meshaccel_e2e::ab::ab_http(&args)),
        Cmd::RelayDs(args) => relay_ds(args),
        Cmd::SoakServer { listen } => soak_server(listen),
        Cmd::Soak(args) => return soak::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format_args!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}

/// Exit code of an A/B run (it printed its JSON report already).
fn ab_exit(r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
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

fn swarm(
    to: SocketAddrV4,
    connections: u64,
    concurrency: u64,
    bytes: u64,
    chunk: usize,
    hold_ms: Option<u64>,
) -> ExitCode {
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

// ---------------------------------------------------------------------------------------------
// http-server

/// Bodies up to this size are generated once per connection and kept; larger ones are streamed.
const HTTP_CACHE_MAX: u64 = 4 << 20;
/// Largest body `POST /echo` accepts (413 beyond).
const HTTP_ECHO_MAX: usize = 64 << 20;

fn http_conn(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let peer = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut reader = HttpReader::new(Patient(&conn));
    let mut cache: Option<(u64, Vec<u8>, u32)> = None;
    let mut served = 0u64;
    let result = loop {
        let head = match reader.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(()),
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ =
                        write_response(&conn, 400, "Bad Request", None, b"bad request\n", false);
                }
                break Err(e);
            }
        };
        served += 1;
        match http_request(&conn, &mut reader, &head, &mut cache) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => {
            let _ = conn.shutdown(Shutdown::Write);
            log(format_args!("http: {peer} closed requests={served}"));
        }
        Err(e) => log(format_args!("http: {peer} requests={served}: {e}")),
    }
}

/// Answers one request; Ok(keep-alive).
fn http_request(
    conn: &TcpStream,
    reader: &mut HttpReader<Patient<'_>>,
    head: &Head,
    cache: &mut Option<(u64, Vec<u8>, u32)>,
) -> io::Result<bool> {
    let Some((method, target, version)) = http::parse_request_line(&head.start_line) else {
        write_response(conn, 400, "Bad Request", None, b"bad request line\n", false)?;
        return Ok(false);
    };
    let keep = if version == "HTTP/1.0" {
        head.has_token("connection", "keep-alive")
    } else {
        !head.has_token("connection", "close")
    };
    let framing = match head.framing() {
        // A request without Content-Length or chunked coding has no body.
        Ok(Framing::UntilEof) => Framing::Length(0),
        Ok(framing) => framing,
        Err(e) => {
            write_response(
                conn,
                400,
                "Bad Request",
                None,
                format!("{e}\n").as_bytes(),
                false,
            )?;
            return Ok(false);
        }
    };
    let path = http::target_path(target);
    let echo = method == "POST" && path == "/echo";
    if framing != Framing::Length(0) && head.has_token("expect", "100-continue") {
        (&*conn).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = Vec::new();
    let mut too_big = false;
    reader.read_body(framing, &mut |piece| {
        if echo && !too_big {
            if body.len() + piece.len() > HTTP_ECHO_MAX {
                too_big = true;
                body = Vec::new();
            } else {
                body.extend_from_slice(piece);
            }
        }
    })?;
    if echo {
        if too_big {
            write_response(
                conn,
                413,
                "Content Too Large",
                None,
                b"body too large\n",
                false,
            )?;
            return Ok(false);
        }
        let crc = crc32fast::hash(&body);
        write_response(conn, 200, "OK", Some(crc), &body, keep)?;
        return Ok(keep);
    }
    let size = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok());
    match (method, size) {
        ("GET", Some(size)) if size <= HTTP_CACHE_MAX => {
            if cache.as_ref().is_none_or(|(n, _, _)| *n != size) {
                let body = http::body(size as usize);
                let crc = crc32fast::hash(&body);
                *cache = Some((size, body, crc));
            }
            let (_, body, crc) = cache.as_ref().expect("just filled");
            write_response(conn, 200, "OK", Some(*crc), body, keep)?;
        }
        ("GET", Some(size)) => {
            let crc = http::body_crc(size);
            (&*conn).write_all(response_head(200, "OK", Some(crc), size, keep).as_bytes())?;
            let mut pattern = Pattern::new(http::body_seed(size));
            let mut buf = vec![0u8; BUF];
            let mut left = size;
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                pattern.fill(&mut buf[..n]);
                (&*conn).write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        _ => write_response(conn, 404, "Not Found", None, b"not found\n", keep)?,
    }
    Ok(keep)
}

fn response_head(status: u16, reason: &str, crc: Option<u32>, len: u64, keep: bool) -> String {
    let crc = crc
        .map(|c| format!("x-crc32: {c:08x}\r\n"))
        .unwrap_or_default();
    let close = if keep { "" } else { "connection: close\r\n" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {len}\r\n\
         content-type: application/octet-stream\r\n{crc}{close}\r\n"
    )
}

/// The response in one write when small (one segment), else head then body.
fn write_response(
    conn: &TcpStream,
    status: u16,
    reason: &str,
    crc: Option<u32>,
    body: &[u8],
    keep: bool,
) -> io::Result<()> {
    let head = response_head(status, reason, crc, body.len() as u64, keep);
    if body.len() <= 64 * 1024 {
        let mut msg = Vec::with_capacity(head.len() + body.len());
        msg.extend_from_slice(head.as_bytes());
        msg.extend_from_slice(body);
        (&*conn).write_all(&msg)
    } else {
        (&*conn).write_all(head.as_bytes())?;
        (&*conn).write_all(body)
    }
}

// ---------------------------------------------------------------------------------------------
// http-load

/// State shared by the load threads.
struct Load {
    args: LoadArgs,
    timeout: Duration,
    /// The next request number to hand out.
    next: AtomicU64,
    stop: AtomicBool,
    /// Requests finished (succeeded or failed), and failed.
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    start: Instant,
    /// What each request sends, and the body each response must carry (its crc32, and for POST
    /// the bytes themselves).
    request: Vec<u8>,
    post_body: Option<Vec<u8>>,
    expect_crc: u32,
}

#[derive(Default)]
struct ThreadStats {
    /// Latencies of the successful requests, ns.
    latencies: Vec<u64>,
    reconnects: u64,
    kinds: BTreeMap<&'static str, u64>,
}

/// A failed request; `keep`: the connection is still in sync and usable.
struct ReqError {
    kind: &'static str,
    msg: String,
    keep: bool,
}

impl ReqError {
    fn io(e: &io::Error, what: &str) -> ReqError {
        use io::ErrorKind as K;
        let kind = match e.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
            K::UnexpectedEof => "eof",
            K::TimedOut | K::WouldBlock => "timeout",
            K::ConnectionRefused => "refused",
            K::InvalidData => "protocol",
            _ => "io",
        };
        ReqError {
            kind,
            msg: format!("{what}: {e}"),
            keep: false,
        }
    }

    fn check(kind: &'static str, msg: String, keep: bool) -> ReqError {
        ReqError { kind, msg, keep }
    }
}

impl Load {
    /// The next request to send: its number and, at a fixed rate, its intended send time.
    /// None when the run is over.
    fn next_request(&self) -> Option<(u64, Option<Instant>)> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.args.requests.is_some_and(|n| i >= n) {
            return None;
        }
        let end = self
            .args
            .duration_ms
            .map(|ms| self.start + Duration::from_millis(ms));
        match self.args.rate {
            Some(rate) => {
                let at = self.start + Duration::from_secs_f64(i as f64 / rate);
                if end.is_some_and(|end| at >= end) {
                    return None;
                }
                Some((i, Some(at)))
            }
            None => {
                if end.is_some_and(|end| Instant::now() >= end) {
                    return None;
                }
                Some((i, None))
            }
        }
    }

    /// Sleeps until `at`, in slices so that a stop is noticed; false if stopped.
    fn sleep_until(&self, at: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    fn failed(&self, stats: &mut ThreadStats, conn_id: usize, i: u64, e: &ReqError) {
        *stats.kinds.entry(e.kind).or_default() += 1;
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(format!(
                "request {i} on connection {conn_id} after {} ms: {}: {}",
                self.start.elapsed().as_millis(),
                e.kind,
                e.msg
            ));
        }
    }

    fn connect(&self) -> io::Result<HttpReader<PatientUntil>> {
        let conn = TcpStream::connect_timeout(&self.args.connect.into(), self.timeout)?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(HttpReader::new(PatientUntil {
            conn,
            deadline: Instant::now(),
        }))
    }

    /// One connection's thread.
    fn run(&self, conn_id: usize) -> ThreadStats {
        let mut stats = ThreadStats::default();
        let mut conn: Option<HttpReader<PatientUntil>> = None;
        let mut connected_once = false;
        let mut backoff = Duration::from_millis(5);
        while let Some((i, at)) = self.next_request() {
            if let Some(at) = at
                && !self.sleep_until(at)
            {
                break;
            }
            let t0 = at.unwrap_or_else(Instant::now);
            if conn.is_none() {
                match self.connect() {
                    Ok(c) => {
                        if connected_once {
                            stats.reconnects += 1;
                        }
                        connected_once = true;
                        backoff = Duration::from_millis(5);
                        conn = Some(c);
                    }
                    Err(e) => {
                        let mut err = ReqError::io(&e, "connect");
                        if err.kind != "timeout" {
                            err.kind = "connect";
                        }
                        self.failed(&mut stats, conn_id, i, &err);
                        self.done.fetch_add(1, Ordering::Relaxed);
                        // Closed loop: do not spin on a dead server (a fixed rate paces itself).
                        if self.args.rate.is_none() {
                            let _ = self.sleep_until(Instant::now() + backoff);
                            backoff = (backoff * 2).min(Duration::from_millis(100));
                        }
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            match self.request(c) {
                Ok(keep) => {
                    stats.latencies.push(t0.elapsed().as_nanos() as u64);
                    if !keep {
                        conn = None;
                    }
                }
                Err(e) => {
                    self.failed(&mut stats, conn_id, i, &e);
                    if !e.keep {
                        conn = None;
                    }
                }
            }
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        stats
    }

    /// Sends one request and checks its response; Ok(the connection can be reused).
    fn request(&self, r: &mut HttpReader<PatientUntil>) -> Result<bool, ReqError> {
        r.get_mut().deadline = Instant::now() + self.timeout;
        (&r.get_mut().conn)
            .write_all(&self.request)
            .map_err(|e| ReqError::io(&e, "sending the request"))?;
        let (head, status, version) = loop {
            let head = match r.read_head() {
                Ok(Some(head)) => head,
                Ok(None) => {
                    return Err(ReqError::check(
                        "eof",
                        "connection closed before the response".into(),
                        false,
                    ));
                }
                Err(e) => return Err(ReqError::io(&e, "reading the response head")),
            };
            let Some((version, status)) = http::parse_status_line(&head.start_line) else {
                return Err(ReqError::check(
                    "protocol",
                    format!("bad status line {:?}", head.start_line),
                    false,
                ));
            };
            let version = version.to_string();
            // Interim responses (100 Continue) precede the real one.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            break (head, status, version);
        };
        let framing = head
            .framing()
            .map_err(|e| ReqError::io(&e, "response framing"))?;
        let mut hasher = crc32fast::Hasher::new();
        let mut len = 0u64;
        let mut prefix = Vec::new();
        let mut mismatch: Option<u64> = None;
        let expect = self.post_body.as_deref();
        r.read_body(framing, &mut |piece| {
            hasher.update(piece);
            if prefix.len() < 200 {
                let n = piece.len().min(200 - prefix.len());
                prefix.extend_from_slice(&piece[..n]);
            }
            if let (Some(expect), None) = (expect, mismatch) {
                let at = len as usize;
                let want = expect
                    .get(at..(at + piece.len()).min(expect.len()))
                    .unwrap_or(&[]);
                // Slice comparison first: memcmp, also fast in debug builds.
                if piece.get(..want.len()) != Some(want) || want.len() < piece.len() {
                    let j = piece.iter().zip(want).position(|(a, b)| a != b);
                    mismatch = Some(len + j.unwrap_or(want.len()) as u64);
                }
            }
            len += piece.len() as u64;
        })
        .map_err(|e| ReqError::io(&e, "reading the response body"))?;
        let keep = framing != Framing::UntilEof
            && !head.has_token("connection", "close")
            && (version != "HTTP/1.0" || head.has_token("connection", "keep-alive"));
        if r.buffered() > 0 {
            return Err(ReqError::check(
                "protocol",
                format!("{} unexpected bytes after the response", r.buffered()),
                false,
            ));
        }
        if status != 200 {
            return Err(ReqError::check(
                "status",
                format!(
                    "status {status} ({:?}), body {:?}",
                    head.start_line,
                    String::from_utf8_lossy(&prefix)
                ),
                keep,
            ));
        }
        if len != self.args.size {
            return Err(ReqError::check(
                "length",
                format!("body of {len} bytes, expected {}", self.args.size),
                keep,
            ));
        }
        let crc = hasher.finalize();
        let header = head.header("x-crc32");
        let header_crc = header.and_then(|h| u32::from_str_radix(h, 16).ok());
        if header_crc != Some(crc) || crc != self.expect_crc {
            return Err(ReqError::check(
                "crc",
                format!(
                    "body crc32 {crc:08x}, x-crc32 {header:?}, expected {:08x}",
                    self.expect_crc
                ),
                keep,
            ));
        }
        if let Some(at) = mismatch {
            return Err(ReqError::check(
                "body",
                format!("echoed body differs at byte {at}"),
                keep,
            ));
        }
        Ok(keep)
    }
}

fn http_load(args: LoadArgs) -> ExitCode {
    match http_load_inner(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            log(format_args!("http-load: {e:#}"));
            println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            ExitCode::from(2)
        }
    }
}

fn http_load_inner(args: LoadArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.connections > 0, "--connections must be > 0");
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be > 0");
    }
    let size = usize::try_from(args.size).context("--size too large")?;
    let host = args
        .host
        .clone()
        .unwrap_or_else(|| args.connect.to_string());
    let (request, post_body, expect_crc) = match args.method {
        LoadMethod::Get => (
            format!(
                "GET /bytes/{size} HTTP/1.1\r\nhost: {host}\r\nuser-agent: meshaccel-e2e-tool\r\n\
                 accept: */*\r\n\r\n"
            )
            .into_bytes(),
            None,
            http::body_crc(args.size),
        ),
        LoadMethod::Post => {
            let body = http::body(size);
            let mut req = format!(
                "POST /echo HTTP/1.1\r\nhost: {host}\r\nuser-agent: meshaccel-e2e-tool\r\n\
                 content-type: application/octet-stream\r\ncontent-length: {size}\r\n\r\n"
            )
            .into_bytes();
            req.extend_from_slice(&body);
            let crc = crc32fast::hash(&body);
            (req, Some(body), crc)
        }
    };
    let load = Load {
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        args,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        start: Instant::now(),
        request,
        post_body,
        expect_crc,
    };
    let finished = AtomicBool::new(false);
    let stats: Vec<ThreadStats> = thread::scope(|s| {
        let load = &load;
        let finished = &finished;
        // Watches the stop file and prints progress.
        s.spawn(move || {
            let mut next_progress = load
                .args
                .progress_ms
                .map(|ms| load.start + Duration::from_millis(ms.max(1)));
            while !finished.load(Ordering::Relaxed) {
                if let Some(path) = &load.args.stop_file
                    && path.exists()
                {
                    load.stop.store(true, Ordering::Relaxed);
                }
                if let (Some(at), Some(ms)) = (next_progress, load.args.progress_ms)
                    && Instant::now() >= at
                {
                    println!(
                        "{}",
                        json!({"progress": load.done.load(Ordering::Relaxed),
                               "errors": load.errors.load(Ordering::Relaxed),
                               "elapsed_ms": load.start.elapsed().as_millis() as u64})
                    );
                    next_progress = Some(at + Duration::from_millis(ms.max(1)));
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        let workers: Vec<_> = (0..load.args.connections)
            .map(|id| {
                thread::Builder::new()
                    .name(format!("load-{id}"))
                    .spawn_scoped(s, move || load.run(id))
            })
            .collect::<Result<_, _>>()
            .context("starting the load threads")?;
        let stats = workers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        finished.store(true, Ordering::Relaxed);
        anyhow::Ok(stats)
    })?;
    let elapsed = load.start.elapsed();
    let requests = load.done.load(Ordering::Relaxed);
    let errors = load.errors.load(Ordering::Relaxed);
    let reconnects: u64 = stats.iter().map(|s| s.reconnects).sum();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for s in &stats {
        for (k, n) in &s.kinds {
            *kinds.entry(k).or_default() += n;
        }
    }
    let mut lat: Vec<u64> = stats.into_iter().flat_map(|s| s.latencies).collect();
    lat.sort_unstable();
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    // Nearest rank.
    let pct = |p: f64| {
        (!lat.is_empty()).then(|| {
            let rank = ((p / 100.0 * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
            us(lat[rank - 1])
        })
    };
    let mean = (!lat.is_empty())
        .then(|| us((lat.iter().map(|&n| n as u128).sum::<u128>() / lat.len() as u128) as u64));
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ok = errors == 0 && requests > 0;
    let first_error = load
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    println!(
        "{}",
        json!({
            "ok": ok,
            "requests": requests,
            "errors": errors,
            "first_error": first_error,
            "error_kinds": kinds,
            "p50_us": pct(50.0),
            "p90_us": pct(90.0),
            "p99_us": pct(99.0),
            "p999_us": pct(99.9),
            "max_us": lat.last().map(|&n| us(n)),
            "mean_us": mean,
            "qps": ((requests - errors) as f64 / secs * 10.0).round() / 10.0,
            "elapsed_ms": elapsed.as_millis() as u64,
            "connections": load.args.connections,
            "reconnects": reconnects,
            "method": match load.args.method { LoadMethod::Get => "get", LoadMethod::Post => "post" },
            "size": load.args.size,
            "rate": load.args.rate,
            "stopped": load.stop.load(Ordering::Relaxed),
        })
    );
    Ok(ok)
}

// ---------------------------------------------------------------------------------------------
// relay-ds: the relay for IPv4 and IPv6

fn relay_ds(args: RelayDsArgs) -> anyhow::Result<()> {
    use std::net::{Ipv6Addr, SocketAddr};
    let any6 = |port| SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
    let any4 = |port| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    let mut listeners = Vec::new();
    for (port, inbound) in [(args.outbound_port, false), (args.inbound_port, true)] {
        let mut addrs = vec![any6(port)];
        if !args.mapped {
            addrs.push(any4(port));
        }
        for a in addrs {
            let l = meshaccel_e2e::sock::listen_any(a, 4096, args.mapped)
                .with_context(|| format!("listening on {a}"))?;
            listeners.push((l, inbound));
        }
    }
    ready();
    let (bind4, bind6) = (args.inbound_bind4, args.inbound_bind6);
    let mut last = None;
    for (listener, inbound) in listeners {
        let run = move || {
            loop {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let from = move |orig: SocketAddr| {
                            inbound.then(|| match orig {
                                SocketAddr::V4(_) => SocketAddr::new(bind4.into(), 0),
                                SocketAddr::V6(_) => SocketAddr::new(bind6.into(), 0),
                            })
                        };
                        if let Err(e) = spawn_thread("relay", move || relay_ds_conn(conn, from)) {
                            log(format_args!("relay-ds: cannot start a thread: {e}"));
                        }
                    }
                    Err(e) => {
                        log(format_args!("relay-ds: accept: {e}"));
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        };
        if let Some(prev) = last.replace(run) {
            spawn_thread("relay-accept", prev)?;
        }
    }
    if let Some(run) = last {
        run();
    }
    Ok(())
}

fn relay_ds_conn(
    down: TcpStream,
    from: impl Fn(std::net::SocketAddr) -> Option<std::net::SocketAddr>,
) {
    let (peer, local) = match (down.peer_addr(), down.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        _ => return,
    };
    let orig = match sock::original_dst_any(&down) {
        Ok(o) => o,
        Err(e) => {
            log(format_args!(
                "relay-ds: {peer} -> {local}: no original destination ({e}); closing"
            ));
            return;
        }
    };
    let same = match (local, orig) {
        (std::net::SocketAddr::V6(l), std::net::SocketAddr::V4(o)) => {
            l.ip().to_ipv4_mapped() == Some(*o.ip()) && l.port() == o.port()
        }
        _ => local == orig,
    };
    if same {
        log(format_args!(
            "relay-ds: {peer} -> {local}: not redirected; closing"
        ));
        return;
    }
    let up = match sock::connect_any(orig, from(orig)) {
        Ok(up) => up,
        Err(e) => {
            log(format_args!(
                "relay-ds: {peer} -> {local} orig_dst={orig}: connect: {e}; closing"
            ));
            return;
        }
    };
    let (down, up) = (Arc::new(down), Arc::new(up));
    let (d2, u2) = (down.clone(), up.clone());
    let reverse = thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || pump(&u2, &d2));
    let sent = pump(&down, &up);
    let received = reverse.map(|h| h.join().unwrap_or(0)).unwrap_or(0);
    log(format_args!(
        "relay-ds: closed {peer} -> {local} orig_dst={orig} up_bytes={sent} down_bytes={received}"
    ));
}

// ---------------------------------------------------------------------------------------------
// soak-server / soak

/// First bytes of a soak connection's head ("SOAK").
const SOAK_MAGIC: u32 = u32::from_le_bytes(*b"SOAK");
const SOAK_HEAD: usize = 32;
const SOAK_SLOW: u32 = 1;
/// Per-call socket timeout of the soak tools: blocking calls wake up this often to check their
/// connection's deadline.
const SOAK_TICK: Duration = Duration::from_millis(500);

/// Reads into `buf` as an event loop does, until `deadline` (then TimedOut).
fn read_until(conn: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    sock::read_ready(conn, buf, Some(deadline))
}

/// Writes all of `buf`, retrying EINTR/EAGAIN (SO_SNDTIMEO) until `deadline`.
fn write_until(conn: &TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        match (&*conn).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn soak_server(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener =
        sock::listen_any(listen, 4096, false).with_context(|| format!("listening on {listen}"))?;
    ready();
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                if let Err(e) = spawn_thread("soak", move || {
                    if let Err(e) = soak_conn(conn) {
                        log(format_args!("soak-server: {peer}: {e:#}"));
                    }
                }) {
                    log(format_args!("soak-server: cannot start a thread: {e}"));
                }
            }
            Err(e) => {
                log(format_args!("soak-server: accept: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn soak_conn(conn: TcpStream) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(SOAK_TICK))?;
    conn.set_write_timeout(Some(SOAK_TICK))?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut head = [0u8; SOAK_HEAD];
    let mut got = 0;
    while got < SOAK_HEAD {
        match read_until(&conn, &mut head[got..], deadline)? {
            0 => bail!("EOF in the head after {got} bytes"),
            n => got += n,
        }
    }
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let long = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != SOAK_MAGIC {
        bail!("bad magic {:08x}", word(0));
    }
    let (flags, stall_ms, reply, reply_seed) = (word(4), word(8), long(16), long(24));
    let mut buf = vec![0u8; BUF];
    let mut hasher = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut stalled = flags & SOAK_SLOW == 0;
    loop {
        let n = read_until(&conn, &mut buf, deadline)
            .with_context(|| format!("reading after {total} bytes"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if !stalled {
            // The slow reader: stop reading while the sender keeps pushing.
            stalled = true;
            thread::sleep(Duration::from_millis(stall_ms.into()));
        }
    }
    let line = format!("bytes={total} crc={:08x}\n", hasher.finalize());
    write_until(&conn, line.as_bytes(), deadline).context("writing the answer")?;
    let mut pattern = Pattern::new(reply_seed);
    let mut left = reply;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        pattern.fill(&mut buf[..n]);
        write_until(&conn, &buf[..n], deadline).context("writing the reply")?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    Ok(())
}

mod soak {
    use super::*;

    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = mix(self.0);
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
        /// Log-uniform in 1..=max.
        fn size(&mut self, max: u64) -> u64 {
            let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
            ((max as f64 + 1.0).ln() * u)
                .exp()
                .floor()
                .clamp(1.0, max as f64) as u64
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Normal,
        Slow,
        Rst,
    }

    #[derive(Default)]
    struct Outcome {
        kind_ok: [u64; 3],
        failed: u64,
        first_error: Option<String>,
        bytes_up: u64,
        bytes_down: u64,
        max_conn_ms: u64,
        slow_max_early: u64,
        slow_min_write_ms: Option<u64>,
    }

    struct Conn {
        kind: Kind,
        up: u64,
        down: u64,
        ms: u64,
        early: u64,
        write_ms: u64,
    }

    pub(super) fn run(args: SoakArgs) -> ExitCode {
        let start = Instant::now();
        let out = Arc::new(Mutex::new(Outcome::default()));
        for wave in 0..args.waves {
            self::wave(&args, wave, &out);
        }
        let o = out.lock().expect("lock");
        let total = args.connections * args.waves;
        let ok = o.failed == 0 && o.kind_ok.iter().sum::<u64>() == total;
        println!(
            "{}",
            json!({"ok": ok, "connections": total, "concurrent": args.connections, "waves": args.waves,
                   "normal_ok": o.kind_ok[0], "slow_ok": o.kind_ok[1], "resets": o.kind_ok[2],
                   "failed": o.failed, "first_error": o.first_error,
                   "bytes_up": o.bytes_up, "bytes_down": o.bytes_down, "max_conn_ms": o.max_conn_ms,
                   "slow_max_early_bytes": o.slow_max_early, "slow_min_write_ms": o.slow_min_write_ms,
                   "elapsed_ms": start.elapsed().as_millis() as u64})
        );
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn wave(args: &SoakArgs, wave: u64, out: &Arc<Mutex<Outcome>>) {
        let n = args.connections;
        let barrier = Arc::new(std::sync::Barrier::new(n as usize));
        let args = Arc::new(args.clone());
        let mut handles = Vec::new();
        for i in 0..n {
            let (barrier, args, out) = (barrier.clone(), args.clone(), out.clone());
            let h = thread::Builder::new()
                .name("soak".into())
                .stack_size(STACK)
                .spawn(move || {
                    let seed = mix(args.seed ^ mix(wave << 32 | i));
                    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
                    let conn = sock::connect_any(args.connect, None);
                    barrier.wait();
                    let r = conn
                        .map_err(anyhow::Error::from)
                        .context("connect")
                        .and_then(|c| one(&args, i, seed, c, deadline));
                    let mut o = out.lock().expect("lock");
                    match r {
                        Ok(c) => {
                            o.kind_ok[c.kind as usize] += 1;
                            o.bytes_up += c.up;
                            o.bytes_down += c.down;
                            o.max_conn_ms = o.max_conn_ms.max(c.ms);
                            if c.kind == Kind::Slow {
                                o.slow_max_early = o.slow_max_early.max(c.early);
                                o.slow_min_write_ms =
                                    Some(o.slow_min_write_ms.unwrap_or(u64::MAX).min(c.write_ms));
                            }
                        }
                        Err(e) => {
                            o.failed += 1;
                            let msg = format!("wave {wave} connection {i}: {e:#}");
                            log(format_args!("soak: {msg}"));
                            o.first_error.get_or_insert(msg);
                        }
                    }
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The barrier would never open: give up loudly.
                    log(format_args!("soak: cannot start thread {i}: {e}"));
                    std::process::exit(2);
                }
            }
        }
        for h in handles {
            let _ = h.join();
        }
    }

    fn one(
        args: &SoakArgs,
        i: u64,
        seed: u64,
        conn: TcpStream,
        deadline: Instant,
    ) -> anyhow::Result<Conn> {
        let start = Instant::now();
        conn.set_read_timeout(Some(SOAK_TICK))?;
        conn.set_write_timeout(Some(SOAK_TICK))?;
        let mut rng = Rng(seed);
        let kind = if args.rst_every > 0 && i % args.rst_every == args.rst_every - 1 {
            Kind::Rst
        } else if args.slow_every > 0 && i % args.slow_every == 5 % args.slow_every {
            Kind::Slow
        } else {
            Kind::Normal
        };
        let reply = if kind == Kind::Rst {
            0
        } else {
            rng.below(args.max_reply + 1)
        };
        let reply_seed = mix(seed ^ 0x5eed);
        let mut head = [0u8; SOAK_HEAD];
        head[0..4].copy_from_slice(&SOAK_MAGIC.to_le_bytes());
        let flags = if kind == Kind::Slow { SOAK_SLOW } else { 0 };
        head[4..8].copy_from_slice(&flags.to_le_bytes());
        head[8..12].copy_from_slice(&(args.stall_ms as u32).to_le_bytes());
        head[16..24].copy_from_slice(&reply.to_le_bytes());
        head[24..32].copy_from_slice(&reply_seed.to_le_bytes());
        write_until(&conn, &head, deadline).context("writing the head")?;

        let mut pattern = Pattern::new(seed);
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; args.max_msg.max(1) as usize];
        let mut sent = 0u64;
        let (mut early, write_start) = (0u64, Instant::now());
        let msgs = match kind {
            Kind::Slow => args.slow_bytes.div_ceil(args.max_msg.max(1)),
            Kind::Rst => 1 + rng.below(3),
            Kind::Normal => 1 + rng.below(args.max_msgs),
        };
        for m in 0..msgs {
            let size = match kind {
                Kind::Slow => args.max_msg.min(args.slow_bytes - sent),
                _ => rng.size(args.max_msg),
            } as usize;
            pattern.fill(&mut buf[..size]);
            hasher.update(&buf[..size]);
            write_until(&conn, &buf[..size], deadline)
                .with_context(|| format!("writing message {m} after {sent} bytes"))?;
            sent += size as u64;
            if write_start.elapsed() < Duration::from_millis(args.stall_ms / 2) {
                early = sent;
            }
            if kind != Kind::Slow && rng.below(3) == 0 {
                thread::sleep(Duration::from_millis(rng.below(args.max_pause_ms + 1)));
            }
        }
        let write_ms = write_start.elapsed().as_millis() as u64;
        if kind == Kind::Rst {
            sock::set_linger_zero(&conn)?;
            drop(conn);
            return Ok(Conn {
                kind,
                up: sent,
                down: 0,
                ms: start.elapsed().as_millis() as u64,
                early,
                write_ms,
            });
        }
        conn.shutdown(Shutdown::Write).context("shutdown(Write)")?;
        let mut got = Vec::with_capacity(reply as usize + 64);
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            match read_until(&conn, &mut rbuf, deadline)
                .with_context(|| format!("reading the answer after {} bytes", got.len()))?
            {
                0 => break,
                n => got.extend_from_slice(&rbuf[..n]),
            }
        }
        let Some(nl) = got.iter().position(|&b| b == b'\n') else {
            bail!(
                "no answer line from the server ({} bytes: {:?})",
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(80)])
            );
        };
        let line = String::from_utf8_lossy(&got[..nl]).into_owned();
        let crc = format!("{:08x}", hasher.finalize());
        let Some((peer_bytes, peer_crc)) = parse_answer(&line) else {
            bail!("bad answer {line:?}");
        };
        if peer_bytes != sent || peer_crc != crc {
            bail!("sent {sent} bytes crc {crc}, the server saw {peer_bytes} crc {peer_crc}");
        }
        let body = &got[nl + 1..];
        let mut want = vec![0u8; reply as usize];
        Pattern::new(reply_seed).fill(&mut want);
        if body != want.as_slice() {
            let at = body.iter().zip(&want).position(|(a, b)| a != b);
            bail!(
                "reply: got {} bytes, want {reply}; first difference at {at:?}",
                body.len()
            );
        }
        Ok(Conn {
            kind,
            up: sent,
            down: reply,
            ms: start.elapsed().as_millis() as u64,
            early,
            write_ms,
        })
    }
}
