//! The programs of `meshaccel-e2e-tool`, run inside the local mesh's pods, a module per
//! subcommand or family of subcommands; the binary parses the command line and calls them.
//!
//! Servers print `ready` on stdout once listening (see [`crate::wait_ready`]). Logs (one line per
//! connection) go to stderr. Plain std threads: a thread per connection direction is plenty for
//! tests.

pub mod ab;
pub mod echo;
pub mod http_load;
pub mod http_server;
pub mod istio_iptables;
pub mod obj_get;
pub mod relay;
pub mod relay_ds;
pub mod scale;
pub mod sink;
pub mod soak;
pub mod unix_rr;

use std::{
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::sock;

/// Reads as an event loop does ([`sock::read_ready`]).
struct Patient<'a>(&'a TcpStream);

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sock::read_ready(self.0, buf, None)
    }
}

const BUF: usize = 256 * 1024;
/// Small stacks: a relay may run thousands of threads; buffers are on the heap.
const STACK: usize = 128 * 1024;

/// Exit code of a program that returns only on failure (a server) or prints its own report:
/// 0, or 2 after logging the error.
pub fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format_args!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}

/// Exit code of an A/B run (it printed its JSON report already).
pub fn ab_exit(r: anyhow::Result<bool>) -> ExitCode {
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
