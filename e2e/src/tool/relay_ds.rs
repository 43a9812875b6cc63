//! `relay-ds`: [`super::relay`] for IPv4 and IPv6 (a dual-stack Envoy).

use std::{
    net::{Ipv4Addr, TcpStream},
    sync::Arc,
    thread,
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;

use super::{STACK, log, ready, relay::pump, spawn_thread};
use crate::{
    envoy::{INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT},
    sock,
};

#[derive(Args, Clone, Debug)]
pub struct RelayDsArgs {
    #[arg(long, default_value_t = OUTBOUND_CAPTURE_PORT)]
    outbound_port: u16,
    #[arg(long, default_value_t = INBOUND_CAPTURE_PORT)]
    inbound_port: u16,
    #[arg(long, default_value = "127.0.0.6")]
    inbound_bind4: Ipv4Addr,
    #[arg(long, default_value = "::6")]
    inbound_bind6: std::net::Ipv6Addr,
    /// One [::] listener per port accepting IPv4 too (v4-mapped), instead of two listeners.
    #[arg(long)]
    mapped: bool,
}

pub fn run(args: &RelayDsArgs) -> anyhow::Result<()> {
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
            let l = sock::listen_any(a, 4096, args.mapped)
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
