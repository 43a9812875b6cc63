//! `scale-server` and `scale-client`: the `scale` benchmark's pair. The server (the sidecar
//! stand-in, UID 1337 on Istio's outbound capture port) holds any number of connections in one
//! epoll loop and echoes whatever each one sends. The client (the app) holds a growing number of
//! idle connections to it and, between growths, measures on request what the benchmark reports
//! at each size. It reads one command per line on stdin and answers each with one JSON line on
//! stdout:
//!
//! - `hold N`: opens connections until it holds N (each does one 1-byte round trip, so that both
//!   of its sockets have decided: redirected, in the sockhash, for life); answers how many it
//!   holds and how long the growth took;
//! - `rr COUNT SIZE`: COUNT round trips of SIZE bytes on its one active connection (opened at
//!   start, before any held one), after a warm-up of COUNT/10; latency percentiles in µs;
//! - `connect COUNT`: COUNT new connections, one after the other, each timed from just before
//!   `connect()` to its first byte back from the server (the client writes 1 byte, the server
//!   echoes it: with acceleration both go by redirect); percentiles in µs; they are closed
//!   after the last one;
//! - `quit`.
//!
//! Connections are made from the given local addresses (`--sources`, `IP_BIND_ADDRESS_NO_PORT`):
//! the first for the active and the timed connections, the others for the held ones, at most
//! `--per-source` each (the ephemeral range per local address and destination is ~28k).
use std::{
    io::{self, BufRead as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;

use crate::sock;

#[derive(clap::Args, Debug)]
pub struct ScaleServerArgs {
    /// Where to listen (the sidecar's outbound capture port, 0.0.0.0:15001).
    #[arg(long)]
    listen: SocketAddrV4,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_add(ep: RawFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: a valid epoll fd, an fd we own and an event we own.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

/// Writes all of `buf` to a non-blocking socket, waiting for room with poll.
fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: send from a buffer we own, of its length.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            buf = &buf[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd we own.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// The server: one thread, one epoll set, level-triggered (`SO_REUSEPORT`: several servers may
/// share the port, each holding its part of the connections); accepts until EAGAIN, echoes what
/// each connection sends (read as an event loop does: readiness, then a non-blocking recv),
/// closes at EOF or error.
pub fn server(a: &ScaleServerArgs) -> anyhow::Result<()> {
    let listener = sock::listen_reuseport(a.listen, 65_535)
        .with_context(|| format!("listening on {}", a.listen))?;
    listener.set_nonblocking(true)?;
    let lfd = listener.as_raw_fd();
    // SAFETY: plain syscall; the fd lives as long as the process.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).context("epoll_create1")?;
    epoll_add(ep, lfd).context("epoll_ctl listener")?;
    super::ready();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: events is valid for writes of its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if fd == lfd {
                loop {
                    // SAFETY: accept4 on our listener, no address wanted.
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        let e = io::Error::last_os_error();
                        match e.kind() {
                            io::ErrorKind::WouldBlock => break,
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {
                                continue;
                            }
                            // EMFILE and the like: say so, try again at the next event.
                            _ => {
                                super::log(format_args!("scale-server: accept: {e}"));
                                std::thread::sleep(Duration::from_millis(10));
                                break;
                            }
                        }
                    }
                    if let Err(e) = epoll_add(ep, c) {
                        super::log(format_args!("scale-server: epoll_ctl: {e}"));
                        // SAFETY: c is ours.
                        unsafe { libc::close(c) };
                    }
                }
                continue;
            }
            // SAFETY: recv into a buffer we own, of its length.
            let r =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let close = if r > 0 {
                send_all(fd, &buf[..r as usize]).is_err()
            } else if r == 0 {
                true
            } else {
                let e = io::Error::last_os_error();
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                )
            };
            if close {
                // SAFETY: fd is one we accepted; closing removes it from the epoll set.
                unsafe { libc::close(fd) };
            }
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ScaleClientArgs {
    /// Where to connect (a mesh address: Istio's rules redirect it to the server).
    #[arg(long)]
    connect: SocketAddrV4,
    /// Local addresses to connect from (comma-separated; at least two): the first for the
    /// active and the timed connections, the others for the held ones.
    #[arg(long, value_delimiter = ',', required = true)]
    sources: Vec<Ipv4Addr>,
    /// Held connections per local address.
    #[arg(long, default_value_t = 25_000)]
    per_source: usize,
}

/// Reads exactly `buf.len()` bytes as an event loop does, within 10 s.
fn read_exact(s: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    while got < buf.len() {
        let n = sock::read_ready(s, &mut buf[got..], Some(deadline))?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

/// p50, p90, p99, p99.9 and max of `ns` (sorted here), in µs, with the count.
pub fn percentiles_us(ns: &mut [u64]) -> serde_json::Value {
    ns.sort_unstable();
    let at = |q: f64| -> f64 {
        if ns.is_empty() {
            return 0.0;
        }
        let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
        (ns[i] as f64 / 10.0).round() / 100.0
    };
    json!({
        "count": ns.len(),
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": at(1.0),
    })
}

struct Client {
    to: SocketAddrV4,
    sources: Vec<Ipv4Addr>,
    per_source: usize,
    active: TcpStream,
    held: Vec<TcpStream>,
}

impl Client {
    /// The local address of the next held connection.
    fn next_source(&self) -> anyhow::Result<Ipv4Addr> {
        let i = 1 + self.held.len() / self.per_source;
        match self.sources.get(i) {
            Some(ip) => Ok(*ip),
            None => bail!(
                "{} held connections use up {} local addresses of {} each: give more --sources",
                self.held.len(),
                self.sources.len() - 1,
                self.per_source
            ),
        }
    }

    /// Opens connections until `n` are held, in batches: connect each, then one byte out on
    /// each, then its echo back on each.
    fn hold(&mut self, n: usize) -> anyhow::Result<serde_json::Value> {
        let t0 = Instant::now();
        let start = self.held.len();
        while self.held.len() < n {
            let batch = (n - self.held.len()).min(512);
            let first = self.held.len();
            for _ in 0..batch {
                let from = self.next_source()?;
                let s = sock::connect_from_ip(self.to, from).with_context(|| {
                    format!(
                        "connection {} from {from} to {}",
                        self.held.len() + 1,
                        self.to
                    )
                })?;
                self.held.push(s);
            }
            for s in &mut self.held[first..] {
                s.write_all(b"h")
                    .context("writing a held connection's byte")?;
            }
            let mut b = [0u8; 1];
            for s in &self.held[first..] {
                read_exact(s, &mut b).context("reading a held connection's echo")?;
            }
        }
        Ok(json!({
            "held": self.held.len(),
            "opened": self.held.len() - start,
            "ms": t0.elapsed().as_millis() as u64,
        }))
    }

    fn rr(&mut self, count: usize, size: usize) -> anyhow::Result<serde_json::Value> {
        let msg = vec![7u8; size.max(1)];
        let mut back = vec![0u8; msg.len()];
        for _ in 0..count / 10 {
            self.active.write_all(&msg)?;
            read_exact(&self.active, &mut back)?;
        }
        let mut ns = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            self.active.write_all(&msg)?;
            read_exact(&self.active, &mut back)?;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        Ok(percentiles_us(&mut ns))
    }

    fn connect(&mut self, count: usize) -> anyhow::Result<serde_json::Value> {
        let mut ns = Vec::with_capacity(count);
        let mut open = Vec::with_capacity(count);
        let mut b = [0u8; 1];
        for i in 0..count {
            let t = Instant::now();
            let mut s = sock::connect_from_ip(self.to, self.sources[0])
                .with_context(|| format!("timed connection {}", i + 1))?;
            s.write_all(b"c")?;
            read_exact(&s, &mut b)?;
            ns.push(t.elapsed().as_nanos() as u64);
            open.push(s);
        }
        drop(open);
        Ok(percentiles_us(&mut ns))
    }
}

fn words<const N: usize>(line: &str) -> anyhow::Result<[usize; N]> {
    let v: Vec<usize> = line
        .split_whitespace()
        .skip(1)
        .map(|w| {
            w.parse()
                .with_context(|| format!("bad number {w:?} in {line:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{line:?}: want {N} numbers"))
}

pub fn client(a: &ScaleClientArgs) -> anyhow::Result<()> {
    ensure!(
        a.sources.len() >= 2,
        "--sources: give at least two local addresses"
    );
    ensure!(a.per_source > 0, "--per-source must be at least 1");
    let active = sock::connect_from_ip(a.connect, a.sources[0])
        .with_context(|| format!("the active connection to {}", a.connect))?;
    let mut c = Client {
        to: a.connect,
        sources: a.sources.clone(),
        per_source: a.per_source,
        active,
        held: Vec::new(),
    };
    // Its first round trip decides it, like the held ones'.
    c.rr(1, 1)?;
    super::ready();
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let cmd = line.split_whitespace().next().unwrap_or("");
        let answer = match cmd {
            "hold" => {
                let [n] = words::<1>(&line)?;
                c.hold(n)
            }
            "rr" => {
                let [count, size] = words::<2>(&line)?;
                c.rr(count, size)
            }
            "connect" => {
                let [count] = words::<1>(&line)?;
                c.connect(count)
            }
            "quit" => return Ok(()),
            "" => continue,
            other => Err(anyhow::anyhow!("unknown command {other:?}")),
        };
        let v = answer.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        writeln!(out, "{v}")?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_in_microseconds() {
        let mut ns: Vec<u64> = (1..=1000).rev().map(|i| i * 1000).collect();
        let p = percentiles_us(&mut ns);
        assert_eq!(p["count"], 1000);
        assert_eq!(p["p50_us"], 500.0);
        assert_eq!(p["p99_us"], 990.0);
        assert_eq!(p["max_us"], 1000.0);
        assert_eq!(percentiles_us(&mut [])["p50_us"], 0.0);
    }

    #[test]
    fn commands_take_exactly_their_numbers() {
        assert_eq!(words::<1>("hold 100").unwrap(), [100]);
        assert_eq!(words::<2>("rr 1000 64").unwrap(), [1000, 64]);
        assert!(words::<2>("rr 1000").is_err());
        assert!(words::<1>("hold x").is_err());
    }
}
