//! The tool's `http-server` and `http-load` on host loopback (no root, no netns needed).
//!
//! Run: `cargo test -p meshaccel-e2e --test http_tool`.

mod support;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::Duration,
};

use meshaccel_e2e::{http, wait_output_timeout, wait_ready};
use serde_json::Value;

/// An `http-server` child, SIGKILLed when dropped.
struct Server(Child);

impl Server {
    fn start(port: u16) -> Server {
        let mut child = Command::new(support::tool())
            .args(["http-server", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning http-server");
        wait_ready(&mut child).expect("http-server ready");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

fn spawn_load(port: u16, args: &[&str]) -> Child {
    Command::new(support::tool())
        .args(["http-load", "--connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning http-load")
}

/// Waits for http-load; returns its exit status, its final JSON line and every other line.
fn finish_load(child: Child) -> (ExitStatus, Value, Vec<Value>) {
    let out = wait_output_timeout(child, Duration::from_secs(30)).expect("http-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\nstderr: {stderr}"))
        })
        .collect();
    let last = lines
        .pop()
        .unwrap_or_else(|| panic!("http-load printed nothing; stderr: {stderr}"));
    (out.status, last, lines)
}

fn run_load(port: u16, args: &[&str]) -> (ExitStatus, Value) {
    let (status, last, _) = finish_load(spawn_load(port, args));
    (status, last)
}

fn assert_latencies(r: &Value) {
    let mut prev = 0.0;
    for field in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        let v = r[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {r}"));
        assert!(v > 0.0 && v >= prev, "{field} = {v} after {prev}: {r}");
        prev = v;
    }
    assert!(r["mean_us"].as_f64().is_some_and(|m| m > 0.0), "{r}");
}

#[test]
fn closed_loop_get_over_two_connections() {
    let port = free_port();
    let _server = Server::start(port);
    let (status, r) = run_load(
        port,
        &["--requests", "2000", "--connections", "2", "--size", "3000"],
    );
    assert!(status.success(), "{status}: {r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["requests"], 2000, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["reconnects"], 0, "{r}");
    assert_eq!(r["connections"], 2, "{r}");
    assert!(r["first_error"].is_null(), "{r}");
    assert!(r["qps"].as_f64().is_some_and(|q| q > 0.0), "{r}");
    assert!(r["elapsed_ms"].is_u64(), "{r}");
    assert_latencies(&r);
}

#[test]
fn post_echo_verifies_the_body() {
    let port = free_port();
    let _server = Server::start(port);
    let (status, r) = run_load(
        port,
        &[
            "--method",
            "post",
            "--size",
            "100000",
            "--requests",
            "300",
            "--connections",
            "2",
        ],
    );
    assert!(status.success(), "{status}: {r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["requests"], 300, "{r}");
    assert_eq!(r["method"], "post", "{r}");
    assert_latencies(&r);
}

/// Routes, headers and keep-alive as a raw client sees them.
#[test]
fn server_routes_and_keep_alive() {
    let port = free_port();
    let _server = Server::start(port);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Three requests in one write (pipelined) on one connection; the last one closes it.
    conn.write_all(
        b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    conn.read_to_end(&mut all).unwrap();
    // The 5 bytes of /bytes/5 are binary; the heads are what is checked here.
    let all = String::from_utf8_lossy(&all);
    let body5 = http::body(5);
    let crc5 = format!("x-crc32: {:08x}\r\n", crc32fast::hash(&body5));
    let hello = format!("x-crc32: {:08x}\r\n", crc32fast::hash(b"hello"));
    let responses: Vec<&str> = all.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 3, "{all:?}");
    assert!(responses[0].starts_with("200 OK\r\n"), "{all:?}");
    assert!(responses[0].contains("content-length: 5\r\n"), "{all:?}");
    assert!(responses[0].contains(&crc5), "{all:?}");
    assert!(responses[1].starts_with("200 OK\r\n"), "{all:?}");
    assert!(responses[1].contains(&hello), "{all:?}");
    assert!(responses[1].ends_with("\r\n\r\nhello"), "{all:?}");
    assert!(responses[2].starts_with("404 Not Found\r\n"), "{all:?}");
    assert!(responses[2].contains("connection: close\r\n"), "{all:?}");
}

/// The server dies mid-run and comes back on the same port: the failed requests are counted,
/// the connections re-established, and the load goes on.
#[test]
fn server_restart_counts_errors_and_reconnects() {
    let port = free_port();
    let server = Server::start(port);
    let load = spawn_load(
        port,
        &[
            "--duration-ms",
            "2500",
            "--connections",
            "2",
            "--progress-ms",
            "100",
        ],
    );
    thread::sleep(Duration::from_millis(600));
    drop(server);
    thread::sleep(Duration::from_millis(300));
    let _server = Server::start(port);
    let (status, r, progress) = finish_load(load);
    assert!(!status.success(), "{status}: {r}");
    assert_eq!(r["ok"], false, "{r}");
    let (requests, errors) = (
        r["requests"].as_u64().unwrap(),
        r["errors"].as_u64().unwrap(),
    );
    assert!(errors > 0, "{r}");
    assert!(r["reconnects"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["first_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{r}"
    );
    assert!(requests > errors, "{r}");
    // Requests kept succeeding after the restart: over the last progress lines (well after it)
    // the count grows and the errors do not.
    let late: Vec<&Value> = progress
        .iter()
        .filter(|p| p["elapsed_ms"].as_u64().unwrap() >= 1800)
        .collect();
    assert!(late.len() >= 2, "progress lines: {progress:?}");
    let (a, b) = (late[0], late[late.len() - 1]);
    assert!(
        b["progress"].as_u64() > a["progress"].as_u64(),
        "{a} -> {b}"
    );
    assert_eq!(a["errors"], b["errors"], "{a} -> {b}");
    assert_eq!(b["errors"].as_u64(), Some(errors), "{b} vs {r}");
    assert_latencies(&r);
}

/// At a fixed rate, the run sends exactly the scheduled requests: 400/s for 1 s = 400.
#[test]
fn fixed_rate_sends_the_scheduled_requests() {
    let port = free_port();
    let _server = Server::start(port);
    let (status, r) = run_load(
        port,
        &[
            "--rate",
            "400",
            "--duration-ms",
            "1000",
            "--connections",
            "2",
            "--size",
            "512",
        ],
    );
    assert!(status.success(), "{status}: {r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["requests"], 400, "{r}");
    assert_eq!(r["rate"], 400.0, "{r}");
    // The last request is scheduled at 997.5 ms: the run cannot end much earlier.
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 900, "{r}");
    assert_latencies(&r);
}

#[test]
fn stop_file_ends_the_run_early() {
    let port = free_port();
    let _server = Server::start(port);
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let load = spawn_load(
        port,
        &[
            "--duration-ms",
            "60000",
            "--rate",
            "100",
            "--stop-file",
            stop.to_str().unwrap(),
        ],
    );
    thread::sleep(Duration::from_millis(500));
    fs::write(&stop, b"").unwrap();
    let (status, r, _) = finish_load(load);
    assert!(status.success(), "{status}: {r}");
    assert_eq!(r["stopped"], true, "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap() < 5000, "{r}");
    let n = r["requests"].as_u64().unwrap();
    assert!((20..=80).contains(&n), "{r}");
}
