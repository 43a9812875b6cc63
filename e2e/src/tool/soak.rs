//! `soak-server` and `soak`: many concurrent connections of random messages, slow readers and
//! resets, every byte checked both ways.

use std::{
    io::{self, Write},
    net::{Shutdown, TcpStream},
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use super::{BUF, STACK, log, ready, sink::parse_answer, spawn_thread};
use crate::{pattern::Pattern, sock};

#[derive(Args, Clone, Debug)]
pub struct SoakServerArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
}

#[derive(Args, Clone, Debug)]
pub struct SoakArgs {
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
/// Per connection a 32-byte head, data to EOF, then the answer and the reply bytes.
pub fn server(args: &SoakServerArgs) -> anyhow::Result<()> {
    let listen = args.listen;
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

pub fn run(args: &SoakArgs) -> ExitCode {
    let start = Instant::now();
    let out = Arc::new(Mutex::new(Outcome::default()));
    for wave in 0..args.waves {
        self::wave(args, wave, &out);
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
