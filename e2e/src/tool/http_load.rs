//! `http-load`: HTTP/1.1 load over persistent connections, verifying every response.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde_json::json;

use super::log;
use crate::{
    http::{self, Framing, HttpReader},
    sock,
};

#[derive(Args, Clone, Debug)]
pub struct HttpLoadArgs {
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
pub enum LoadMethod {
    Get,
    Post,
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

/// State shared by the load threads.
struct Load {
    args: HttpLoadArgs,
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
/// One JSON line; exit 0 only if every request succeeded.
pub fn run(args: HttpLoadArgs) -> ExitCode {
    match run_inner(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            log(format_args!("http-load: {e:#}"));
            println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: HttpLoadArgs) -> anyhow::Result<bool> {
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
