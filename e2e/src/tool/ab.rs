//! A/B-interleaved load for the benchmarks (`meshaccel-benches`): baseline and accelerated
//! connections live side by side in one client process and take turns.
//!
//! How one run goes (the benchmark program drives the agent in between):
//!
//! 1. with acceleration switched off, the client opens its **A** (baseline) connections and sends
//!    one request on each: every socket of those connections, along the whole path, is never
//!    inserted into the sockhash, so it stays plain TCP for life; then it prints `ready`;
//! 2. the benchmark switches acceleration on and creates `--gate-file`;
//! 3. the client opens its **B** (accelerated) connections, sends one request on each, warms up
//!    both sides, then runs `--blocks` blocks of `--block-ms` each, alternating sides in the order
//!    A B B A A B B A … (balanced against drift and against order effects);
//! 4. it prints one JSON line: per side and per half (every other block of that side, so the run
//!    carries its own A/A noise estimate), requests, busy time, bytes, latencies as an HDR
//!    histogram (`[[value_ns, count], …]`), the CPU time of the given cgroups (`cpu.stat`
//!    `usage_usec`) and the TCP segments of the client's netns during that side's blocks.
//!
//! Latency is from the request's start (closed loop) or from its intended start (`--rate`, fixed
//! rate: coordinated omission corrected) to the last byte of the response.
//!
//! Two protocols: [`ab_rr`] speaks a tiny request/response protocol to [`rr_server`] (message
//! sizes and write sizes chosen per request), [`ab_http`] HTTP/1.1 keep-alive to the tool's
//! `http-server` (`GET /bytes/<size>`, every response checked for length and crc32).
//!
//! Reads here are an event loop's: poll, then a non-blocking recv (`sock::read_ready`), up to the
//! request timeout; so these apps may be run as a trusted workload's (`appSockets: trusted`).

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::{
    TcpCounters,
    http::{self, Framing, HttpReader},
    sock,
};

/// `MRR1`: the first bytes of every request of the rr protocol.
pub const RR_MAGIC: u32 = 0x4d52_5231;
/// Size of the rr request header (also the smallest request).
pub const RR_HEADER: usize = 32;
/// Largest write size and largest message the rr protocol accepts.
pub const RR_MAX_CHUNK: u64 = 16 << 20;
/// Largest request or response of the rr protocol.
pub const RR_MAX_MESSAGE: u64 = 1 << 34;
/// Read buffer of the rr server and client.
const READ_BUF: usize = 256 * 1024;
/// Latencies above this (ns) are recorded as this.
const HIST_MAX_NS: u64 = 60_000_000_000;

/// One rr request head: `magic u32, chunk u32, req_len u64, resp_len u64, seq u64`, little
/// endian. `req_len` counts the whole request, header included (at least [`RR_HEADER`]); the
/// server answers `resp_len` bytes written `chunk` bytes at a time, the first 8 of them `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RrHead {
    pub chunk: u32,
    pub req_len: u64,
    pub resp_len: u64,
    pub seq: u64,
}

impl RrHead {
    pub fn encode(&self) -> [u8; RR_HEADER] {
        let mut b = [0u8; RR_HEADER];
        b[0..4].copy_from_slice(&RR_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.chunk.to_le_bytes());
        b[8..16].copy_from_slice(&self.req_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.resp_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> io::Result<RrHead> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        if b.len() < RR_HEADER {
            return Err(bad(format!("rr header of {} bytes", b.len())));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != RR_MAGIC {
            return Err(bad(format!("bad rr magic {:08x}", u32_at(0))));
        }
        let h = RrHead {
            chunk: u32_at(4),
            req_len: u64_at(8),
            resp_len: u64_at(16),
            seq: u64_at(24),
        };
        if h.chunk == 0
            || u64::from(h.chunk) > RR_MAX_CHUNK
            || h.req_len < RR_HEADER as u64
            || h.req_len > RR_MAX_MESSAGE
            || h.resp_len > RR_MAX_MESSAGE
        {
            return Err(bad(format!("rr header out of range: {h:?}")));
        }
        Ok(h)
    }
}

/// Reads as an event loop does ([`crate::sock::read_ready`]) until the deadline, then fails
/// with `TimedOut`.
struct Patient<'a> {
    conn: &'a TcpStream,
    deadline: Instant,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::sock::read_ready(self.conn, buf, Some(self.deadline))
    }
}

// ---------------------------------------------------------------------------------------------
// rr server

/// `rr-server`: answers rr requests (see [`RrHead`]), a thread per connection.
#[derive(Args, Clone, Debug)]
pub struct RrServerArgs {
    /// Address to listen on (repeat the flag for more: a service per port).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddrV4>,
}

/// Listens on every address, prints `ready`, serves forever.
pub fn rr_server(args: &RrServerArgs) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for &a in &args.listen {
        let l: TcpListener = sock::listen(a, 4096).with_context(|| format!("listening on {a}"))?;
        listeners.push(l);
    }
    println!("ready");
    let last = listeners.pop().context("no address to listen on")?;
    for l in listeners {
        thread::Builder::new()
            .name("rr-accept".into())
            .spawn(move || accept_loop(&l))
            .context("starting an accept thread")?;
    }
    accept_loop(&last)
}

fn accept_loop(listener: &TcpListener) -> ! {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let spawned = thread::Builder::new()
                    .name("rr".into())
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        if let Err(e) = rr_conn(&conn) {
                            eprintln!("rr-server: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("rr-server: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("rr-server: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn rr_conn(conn: &TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut out: Vec<u8> = Vec::new();
    loop {
        // No deadline: a connection may idle between blocks for as long as the client likes.
        let mut r = Patient {
            conn,
            deadline: Instant::now() + Duration::from_secs(86_400),
        };
        // The header (the client sends nothing more before the response: no pipelining).
        let mut have = 0usize;
        while have < RR_HEADER {
            let n = r.read(&mut buf[have..])?;
            if n == 0 {
                if have == 0 {
                    return Ok(());
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a request header",
                ));
            }
            have += n;
        }
        let h = RrHead::decode(&buf[..RR_HEADER])?;
        let mut got = have as u64;
        while got < h.req_len {
            let want = (h.req_len - got).min(READ_BUF as u64) as usize;
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a request body",
                ));
            }
            got += n as u64;
        }
        if got > h.req_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more bytes than the request announced (pipelining is not supported)",
            ));
        }
        let chunk = (h.chunk as u64).min(h.resp_len.max(1)) as usize;
        if out.len() < chunk {
            out.resize(chunk, 0x5a);
        }
        let mut left = h.resp_len;
        let mut first = true;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            if first && n >= 8 {
                out[..8].copy_from_slice(&h.seq.to_le_bytes());
            }
            (&*conn).write_all(&out[..n])?;
            if first && n >= 8 {
                out[..8].fill(0x5a);
            }
            first = false;
            left -= n as u64;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A/B engine

/// What every A/B client takes.
#[derive(Args, Clone, Debug)]
pub struct AbArgs {
    /// The server (the client's app connects here; Istio's rules redirect it to the sidecar).
    #[arg(long)]
    pub connect: SocketAddrV4,
    /// Connections per side, a thread each (each thread owns one A and one B connection).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// After the A connections are up, wait for this file before opening the B connections.
    #[arg(long)]
    pub gate_file: PathBuf,
    /// Give up waiting for the gate after this long.
    #[arg(long, default_value_t = 60_000)]
    pub gate_timeout_ms: u64,
    /// Measured blocks (sides alternate A B B A …).
    #[arg(long, default_value_t = 20)]
    pub blocks: u32,
    /// Length of a block.
    #[arg(long, default_value_t = 100)]
    pub block_ms: u64,
    /// Unrecorded warm-up before the blocks (sides alternating every 50 ms).
    #[arg(long, default_value_t = 400)]
    pub warmup_ms: u64,
    /// Fixed rate, requests per second per side over all connections (latency from intended
    /// start). Default: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A cgroup v2 `cpu.stat` whose `usage_usec` is read at block boundaries (repeatable).
    #[arg(long)]
    pub cpu_stat: Vec<PathBuf>,
    /// Timeout of each connect and each request.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Stop (with an error) once this file exists; checked between blocks and while waiting.
    #[arg(long)]
    pub stop_file: Option<PathBuf>,
}

/// One client connection of an A/B run.
pub trait Exchange: Send {
    /// One request and its complete response; returns the payload bytes moved.
    fn exchange(&mut self, deadline: Instant) -> anyhow::Result<u64>;
}

/// Opens one connection of the protocol.
pub type Connector<'a> = dyn Fn() -> anyhow::Result<Box<dyn Exchange>> + Sync + 'a;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// The block order: A B B A, repeated.
fn side_of_block(k: u32) -> Side {
    if matches!(k % 4, 0 | 3) {
        Side::A
    } else {
        Side::B
    }
}

/// Everything measured for one half of one side.
struct Half {
    hist: Histogram<u64>,
    max_ns: u64,
    requests: u64,
    bytes: u64,
    busy_ns: u64,
    blocks: u32,
    /// Per cgroup: `usage_usec`, `user_usec`, `system_usec` of `cpu.stat`.
    cpu_usec: Vec<[u64; 3]>,
    in_segs: u64,
    out_segs: u64,
    /// Fixed rate: requests not sent because the block ended a whole block late.
    skipped: u64,
}

impl Half {
    fn new(cgroups: usize) -> anyhow::Result<Half> {
        Ok(Half {
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3).context("creating a histogram")?,
            max_ns: 0,
            requests: 0,
            bytes: 0,
            busy_ns: 0,
            blocks: 0,
            cpu_usec: vec![[0; 3]; cgroups],
            in_segs: 0,
            out_segs: 0,
            skipped: 0,
        })
    }

    fn to_json(&self) -> Value {
        let hist: Vec<[u64; 2]> = self
            .hist
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect();
        json!({
            "requests": self.requests,
            "bytes": self.bytes,
            "busy_ns": self.busy_ns,
            "blocks": self.blocks,
            "max_ns": self.max_ns,
            "cpu_usec": self.cpu_usec.iter().map(|c| c[0]).collect::<Vec<_>>(),
            "cpu_user_usec": self.cpu_usec.iter().map(|c| c[1]).collect::<Vec<_>>(),
            "cpu_system_usec": self.cpu_usec.iter().map(|c| c[2]).collect::<Vec<_>>(),
            "tcp_in_segs": self.in_segs,
            "tcp_out_segs": self.out_segs,
            "skipped": self.skipped,
            "hist": hist,
        })
    }
}

/// What a worker reports for one block.
#[derive(Default)]
struct BlockStats {
    lat_ns: Vec<u64>,
    bytes: u64,
    skipped: u64,
}

struct Shared {
    /// The current block: side, start, end (set by the coordinator before the start barrier).
    block: Mutex<(Side, Instant, Instant, bool)>,
    /// Set when the run is over (workers leave at the next start barrier).
    done: AtomicBool,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    results: Mutex<Vec<BlockStats>>,
    requests_started: AtomicU64,
}

/// `usage_usec`, `user_usec` and `system_usec` of a cgroup's `cpu.stat` (`path`: that file);
/// also the benches' CPU per request.
pub fn read_cpu_stat(path: &std::path::Path) -> anyhow::Result<[u64; 3]> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in {}", path.display()))
    };
    Ok([
        field("usage_usec")?,
        field("user_usec")?,
        field("system_usec")?,
    ])
}

fn snmp() -> TcpCounters {
    fs::read_to_string("/proc/thread-self/net/snmp")
        .ok()
        .and_then(|s| TcpCounters::parse_snmp(&s).ok())
        .unwrap_or_default()
}

fn stopped(args: &AbArgs) -> bool {
    args.stop_file.as_ref().is_some_and(|p| p.exists())
}

/// Runs the A/B protocol described in the module docs with connections from `connect`, and
/// returns the JSON report (also on failure: `ok: false` and `error`).
pub fn ab_run(args: &AbArgs, connect: &Connector<'_>, info: Value) -> Value {
    match ab_run_inner(args, connect, info.clone()) {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": format!("{e:#}"), "info": info}),
    }
}

fn ab_run_inner(args: &AbArgs, connect: &Connector<'_>, info: Value) -> anyhow::Result<Value> {
    ensure!(args.connections > 0, "--connections must be > 0");
    ensure!(args.blocks >= 2, "--blocks must be >= 2");
    ensure!(args.block_ms > 0, "--block-ms must be > 0");
    if let Some(rate) = args.rate {
        ensure!(rate > 0.0 && rate.is_finite(), "--rate must be > 0");
    }
    for p in &args.cpu_stat {
        read_cpu_stat(p)?;
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let open = |side: &str| -> anyhow::Result<Vec<Box<dyn Exchange>>> {
        (0..args.connections)
            .map(|i| {
                let mut c = connect().with_context(|| format!("opening {side} connection {i}"))?;
                c.exchange(Instant::now() + timeout)
                    .with_context(|| format!("first request on {side} connection {i}"))?;
                Ok(c)
            })
            .collect()
    };
    let a_conns = open("A")?;
    println!("ready");
    io::stdout().flush().ok();
    let gate_deadline = Instant::now() + Duration::from_millis(args.gate_timeout_ms);
    while !args.gate_file.exists() {
        ensure!(!stopped(args), "stopped");
        ensure!(
            Instant::now() < gate_deadline,
            "gate file {} did not appear",
            args.gate_file.display()
        );
        thread::sleep(Duration::from_millis(2));
    }
    let b_conns = open("B")?;

    let shared = Shared {
        block: Mutex::new((Side::A, Instant::now(), Instant::now(), false)),
        done: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        results: Mutex::new(Vec::new()),
        requests_started: AtomicU64::new(0),
    };
    let n = args.connections;
    let barrier = Barrier::new(n + 1);
    let cgroups = args.cpu_stat.len();
    let mut halves = [
        [Half::new(cgroups)?, Half::new(cgroups)?],
        [Half::new(cgroups)?, Half::new(cgroups)?],
    ];
    let started = Instant::now();

    thread::scope(|s| -> anyhow::Result<()> {
        let shared = &shared;
        let barrier = &barrier;
        for (t, (mut a, mut b)) in a_conns.into_iter().zip(b_conns).enumerate() {
            thread::Builder::new()
                .name(format!("ab-{t}"))
                .spawn_scoped(s, move || {
                    worker(t, n, args, timeout, shared, barrier, &mut *a, &mut *b)
                })
                .context("starting a worker")?;
        }
        // Coordinator: warm-up slices, then the measured blocks.
        let warm_slices = args.warmup_ms.div_ceil(50);
        let total = warm_slices + u64::from(args.blocks);
        for k in 0..total {
            let measured = k >= warm_slices;
            let (side, len) = if measured {
                let b = (k - warm_slices) as u32;
                (side_of_block(b), Duration::from_millis(args.block_ms))
            } else {
                (side_of_block(k as u32), Duration::from_millis(50))
            };
            if stopped(args) {
                fail(shared, "stopped".into());
            }
            if shared.failed.load(Ordering::SeqCst) {
                break;
            }
            let cpu0: Vec<[u64; 3]> = args
                .cpu_stat
                .iter()
                .map(|p| read_cpu_stat(p).unwrap_or_default())
                .collect();
            let snmp0 = snmp();
            let start = Instant::now();
            *lock(&shared.block) = (side, start, start + len, measured);
            barrier.wait();
            barrier.wait();
            let busy = start.elapsed();
            let snmp1 = snmp();
            let cpu1: Vec<[u64; 3]> = args
                .cpu_stat
                .iter()
                .map(|p| read_cpu_stat(p).unwrap_or_default())
                .collect();
            let stats = std::mem::take(&mut *lock(&shared.results));
            if !measured {
                continue;
            }
            // Which half: every other block of a side.
            let side_idx = usize::from(side == Side::B);
            let occurrence = seq_of_side((k - warm_slices) as u32, side);
            let h = &mut halves[side_idx][(occurrence % 2) as usize];
            h.blocks += 1;
            h.busy_ns += busy.as_nanos() as u64;
            for (i, (c0, c1)) in cpu0.iter().zip(&cpu1).enumerate() {
                for f in 0..3 {
                    h.cpu_usec[i][f] += c1[f].saturating_sub(c0[f]);
                }
            }
            let d = snmp1.since(&snmp0);
            h.in_segs += d.in_segs;
            h.out_segs += d.out_segs;
            for st in stats {
                h.bytes += st.bytes;
                h.skipped += st.skipped;
                h.requests += st.lat_ns.len() as u64;
                for ns in st.lat_ns {
                    h.max_ns = h.max_ns.max(ns);
                    h.hist.saturating_record(ns.clamp(1, HIST_MAX_NS));
                }
            }
        }
        shared.done.store(true, Ordering::SeqCst);
        barrier.wait();
        Ok(())
    })?;
    if shared.failed.load(Ordering::SeqCst) {
        let e = lock(&shared.error).clone().unwrap_or_default();
        bail!("{e}");
    }
    let side_json = |h: &[Half; 2]| -> Value { json!([h[0].to_json(), h[1].to_json()]) };
    Ok(json!({
        "ok": true,
        "info": info,
        "mode": if args.rate.is_some() { "rate" } else { "closed" },
        "rate": args.rate,
        "connections": args.connections,
        "blocks": args.blocks,
        "block_ms": args.block_ms,
        "cpu_stat": args.cpu_stat,
        "requests_started": shared.requests_started.load(Ordering::Relaxed),
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "sides": { "a": side_json(&halves[0]), "b": side_json(&halves[1]) },
    }))
}

/// How many earlier measured blocks (of `0..seq`) had the side of block `seq`.
fn seq_of_side(seq: u32, side: Side) -> u32 {
    (0..seq).filter(|&k| side_of_block(k) == side).count() as u32
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fail(shared: &Shared, msg: String) {
    let mut e = lock(&shared.error);
    if e.is_none() {
        *e = Some(msg);
    }
    shared.failed.store(true, Ordering::SeqCst);
}

#[allow(clippy::too_many_arguments)]
fn worker(
    t: usize,
    n: usize,
    args: &AbArgs,
    timeout: Duration,
    shared: &Shared,
    barrier: &Barrier,
    a: &mut dyn Exchange,
    b: &mut dyn Exchange,
) {
    // Fixed rate: wake up when asked, not up to 50 µs later (the default timer slack).
    // SAFETY: plain prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
    loop {
        barrier.wait();
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        let (side, start, end, _) = *lock(&shared.block);
        let conn: &mut dyn Exchange = if side == Side::A { &mut *a } else { &mut *b };
        let mut st = BlockStats::default();
        if !shared.failed.load(Ordering::SeqCst)
            && let Err(e) = run_block(t, n, args, timeout, shared, conn, start, end, &mut st)
        {
            fail(shared, format!("connection {t} side {side:?}: {e:#}"));
        }
        lock(&shared.results).push(st);
        barrier.wait();
    }
}

#[allow(clippy::too_many_arguments)]
fn run_block(
    t: usize,
    n: usize,
    args: &AbArgs,
    timeout: Duration,
    shared: &Shared,
    conn: &mut dyn Exchange,
    start: Instant,
    end: Instant,
    st: &mut BlockStats,
) -> anyhow::Result<()> {
    match args.rate {
        None => loop {
            let t0 = Instant::now();
            if t0 >= end {
                return Ok(());
            }
            shared.requests_started.fetch_add(1, Ordering::Relaxed);
            st.bytes += conn.exchange(t0 + timeout)?;
            st.lat_ns.push(t0.elapsed().as_nanos() as u64);
        },
        Some(rate) => {
            // This thread's share of the rate, its slots offset by t/n of an interval.
            let interval = n as f64 / rate;
            let late_limit = end + (end - start);
            let mut j = 0u64;
            loop {
                let at =
                    start + Duration::from_secs_f64((j as f64 + t as f64 / n as f64) * interval);
                j += 1;
                if at >= end {
                    return Ok(());
                }
                let now = Instant::now();
                if now >= late_limit {
                    st.skipped += 1;
                    continue;
                }
                if at > now {
                    thread::sleep(at - now);
                }
                shared.requests_started.fetch_add(1, Ordering::Relaxed);
                st.bytes += conn.exchange(Instant::now() + timeout)?;
                st.lat_ns.push(at.elapsed().as_nanos() as u64);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rr client

/// `ab-rr`: A/B run of rr requests against `rr-server`.
#[derive(Args, Clone, Debug)]
pub struct AbRrArgs {
    #[command(flatten)]
    pub ab: AbArgs,
    /// Request size in bytes, header included (at least 32).
    #[arg(long, default_value_t = 64)]
    pub req: u64,
    /// Response size in bytes.
    #[arg(long, default_value_t = 64)]
    pub resp: u64,
    /// Write size of the client (requests) and of the server (responses).
    #[arg(long, default_value_t = 64 * 1024)]
    pub chunk: u64,
    /// Disable TCP_NODELAY on the client's sockets (Nagle's algorithm on).
    #[arg(long)]
    pub nagle: bool,
}

struct RrConn {
    conn: TcpStream,
    head: RrHead,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl Exchange for RrConn {
    fn exchange(&mut self, deadline: Instant) -> anyhow::Result<u64> {
        self.head.seq += 1;
        let h = self.head;
        let chunk = h.chunk as usize;
        self.out[..RR_HEADER].copy_from_slice(&h.encode());
        let mut left = h.req_len;
        let mut first = true;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            (&self.conn)
                .write_all(&self.out[..n])
                .context("sending the request")?;
            if first {
                self.out[..RR_HEADER].fill(0xa5);
                first = false;
            }
            left -= n as u64;
        }
        let mut r = Patient {
            conn: &self.conn,
            deadline,
        };
        let mut got = 0u64;
        while got < h.resp_len {
            let want = (h.resp_len - got).min(self.buf.len() as u64) as usize;
            let n = r
                .read(&mut self.buf[..want])
                .context("reading the response")?;
            if n == 0 {
                bail!(
                    "connection closed after {got} of {} response bytes",
                    h.resp_len
                );
            }
            if got == 0 && h.resp_len >= 8 && n >= 8 {
                let seq = u64::from_le_bytes(self.buf[..8].try_into().expect("8 bytes"));
                ensure!(
                    seq == h.seq,
                    "response to request {seq}, expected {}",
                    h.seq
                );
            }
            got += n as u64;
        }
        Ok(h.req_len + h.resp_len)
    }
}

/// Runs `ab-rr` and prints its report; Ok(true) when the run succeeded.
pub fn ab_rr(args: &AbRrArgs) -> anyhow::Result<bool> {
    ensure!(
        args.req >= RR_HEADER as u64 && args.req <= RR_MAX_MESSAGE,
        "--req must be in {RR_HEADER}..={RR_MAX_MESSAGE}"
    );
    ensure!(args.resp <= RR_MAX_MESSAGE, "--resp too large");
    ensure!(
        (RR_HEADER as u64..=RR_MAX_CHUNK).contains(&args.chunk),
        "--chunk must be in {RR_HEADER}..={RR_MAX_CHUNK}"
    );
    let timeout = Duration::from_millis(args.ab.timeout_ms.max(1));
    let head = RrHead {
        chunk: args.chunk as u32,
        req_len: args.req,
        resp_len: args.resp,
        seq: 0,
    };
    let connect = || -> anyhow::Result<Box<dyn Exchange>> {
        let conn = TcpStream::connect_timeout(&args.ab.connect.into(), timeout)
            .with_context(|| format!("connecting to {}", args.ab.connect))?;
        conn.set_nodelay(!args.nagle)?;
        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(Box::new(RrConn {
            conn,
            head,
            out: vec![0xa5; args.chunk.min(args.req) as usize],
            buf: vec![0; READ_BUF],
        }))
    };
    let info = json!({"protocol": "rr", "req": args.req, "resp": args.resp,
                      "chunk": args.chunk, "nodelay": !args.nagle});
    let report = ab_run(&args.ab, &connect, info);
    println!("{report}");
    Ok(report["ok"] == true)
}

// ---------------------------------------------------------------------------------------------
// http client

/// `ab-http`: A/B run of HTTP/1.1 keep-alive `GET /bytes/<size>` against `http-server`.
#[derive(Args, Clone, Debug)]
pub struct AbHttpArgs {
    #[command(flatten)]
    pub ab: AbArgs,
    /// Response body size.
    #[arg(long, default_value_t = 1024)]
    pub size: u64,
}

struct HttpConn {
    conn: Arc<TcpStream>,
    reader: HttpReader<PatientArc>,
    request: Arc<Vec<u8>>,
    size: u64,
    crc: u32,
}

/// [`Patient`] over a shared stream, with a deadline set per request.
struct PatientArc {
    conn: Arc<TcpStream>,
    deadline: Instant,
}

impl Read for PatientArc {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Patient {
            conn: &self.conn,
            deadline: self.deadline,
        }
        .read(buf)
    }
}

impl Exchange for HttpConn {
    fn exchange(&mut self, deadline: Instant) -> anyhow::Result<u64> {
        self.reader.get_mut().deadline = deadline;
        (&*self.conn)
            .write_all(&self.request)
            .context("sending the request")?;
        let head = self
            .reader
            .read_head()
            .context("reading the response head")?
            .context("connection closed before the response")?;
        let status = http::parse_status_line(&head.start_line).map(|(_, s)| s);
        ensure!(status == Some(200), "response {:?}", head.start_line);
        let framing = head.framing().context("response framing")?;
        ensure!(
            framing == Framing::Length(self.size),
            "response framing {framing:?}, expected a length of {}",
            self.size
        );
        let mut hasher = crc32fast::Hasher::new();
        let len = self
            .reader
            .read_body(framing, &mut |piece| hasher.update(piece))
            .context("reading the response body")?;
        let crc = hasher.finalize();
        ensure!(
            crc == self.crc,
            "body crc32 {crc:08x}, expected {:08x}",
            self.crc
        );
        ensure!(
            self.reader.buffered() == 0,
            "unexpected bytes after the response"
        );
        Ok(len + self.request.len() as u64)
    }
}

/// Runs `ab-http` and prints its report; Ok(true) when the run succeeded.
pub fn ab_http(args: &AbHttpArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.ab.timeout_ms.max(1));
    let request = Arc::new(
        format!(
            "GET /bytes/{} HTTP/1.1\r\nhost: {}\r\nuser-agent: meshaccel-e2e-tool\r\naccept: */*\r\n\r\n",
            args.size, args.ab.connect
        )
        .into_bytes(),
    );
    let crc = http::body_crc(args.size);
    let connect = || -> anyhow::Result<Box<dyn Exchange>> {
        let conn = TcpStream::connect_timeout(&args.ab.connect.into(), timeout)
            .with_context(|| format!("connecting to {}", args.ab.connect))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
        conn.set_write_timeout(Some(timeout))?;
        let conn = Arc::new(conn);
        Ok(Box::new(HttpConn {
            reader: HttpReader::new(PatientArc {
                conn: conn.clone(),
                deadline: Instant::now(),
            }),
            conn,
            request: request.clone(),
            size: args.size,
            crc,
        }))
    };
    let info = json!({"protocol": "http", "size": args.size});
    let report = ab_run(&args.ab, &connect, info);
    println!("{report}");
    Ok(report["ok"] == true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rr_head_round_trip_and_checks() {
        let h = RrHead {
            chunk: 4096,
            req_len: 64,
            resp_len: 1 << 20,
            seq: 7,
        };
        assert_eq!(RrHead::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RrHead::decode(&bad).is_err());
        let short = RrHead { req_len: 8, ..h };
        assert!(RrHead::decode(&short.encode()).is_err());
        assert!(RrHead::decode(&h.encode()[..10]).is_err());
    }

    #[test]
    fn blocks_alternate_abba() {
        let sides: Vec<_> = (0..8).map(side_of_block).collect();
        use Side::*;
        assert_eq!(sides, [A, B, B, A, A, B, B, A]);
        // Occurrences of each side alternate between the two halves.
        assert_eq!(seq_of_side(0, A), 0);
        assert_eq!(seq_of_side(3, A), 1);
        assert_eq!(seq_of_side(4, A), 2);
        assert_eq!(seq_of_side(2, B), 1);
    }
}
