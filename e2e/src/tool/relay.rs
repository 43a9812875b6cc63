//! `relay`: the stand-in for Envoy in a pod with Istio's iptables rules (run it as
//! [`crate::PROXY_UID`]).

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use clap::Args;

use super::{BUF, Patient, STACK, listen, log, ready, spawn_thread};
use crate::{
    envoy::{INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT},
    sock,
};

#[derive(Args, Clone, Debug)]
pub struct RelayArgs {
    /// Port of Istio's virtualOutbound listener.
    #[arg(long, default_value_t = OUTBOUND_CAPTURE_PORT)]
    outbound_port: u16,
    /// Port of Istio's virtualInbound listener.
    #[arg(long, default_value_t = INBOUND_CAPTURE_PORT)]
    inbound_port: u16,
    /// Source address of inbound passthrough connections (Istio's InboundPassthroughCluster).
    #[arg(long, default_value = "127.0.0.6")]
    inbound_bind: Ipv4Addr,
}

#[derive(Clone, Copy, Debug)]
enum Leg {
    Outbound,
    Inbound(Ipv4Addr),
}

/// Relays each connection redirected to the outbound port to its original destination, and each
/// one redirected to the inbound port to its original destination from `<inbound-bind>:0`.
pub fn run(args: &RelayArgs) -> anyhow::Result<()> {
    let (outbound_port, inbound_port, inbound_bind) =
        (args.outbound_port, args.inbound_port, args.inbound_bind);
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
pub(super) fn pump(from: &TcpStream, to: &TcpStream) -> u64 {
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
