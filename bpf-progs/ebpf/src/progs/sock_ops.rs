//! `meshaccel_ops` (sock_ops, on a cgroup v2): inserts sockets at ESTABLISHED, lets sockets
//! that can never be redirected into leave the sockhash, remembers listeners, forgets closed
//! connections.

use super::prelude::*;

#[sock_ops]
pub fn meshaccel_ops(ctx: SockOpsContext) -> u32 {
    // 1 = success for cgroup sock_ops; nothing we do here should fail the socket.
    match try_sock_ops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

#[inline(always)]
pub(super) fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    match ctx.op() {
        ACTIVE_ESTABLISHED => established(ctx, true),
        PASSIVE_ESTABLISHED => established(ctx, false),
        STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(ctx),
        PARSE_HDR_OPT_CB => segment_received(ctx),
        HDR_OPT_LEN_CB => first_write(ctx),
        TCP_LISTEN_CB => listening(ctx),
        _ => Ok(()),
    }
}

#[inline(always)]
pub(super) fn established(ctx: &SockOpsContext, active: bool) -> Result<(), ()> {
    let sk = ops_sock(ctx)?;
    if let Some(old) = sock_state(sk) {
        reconnected(ctx, old);
        return Ok(());
    }
    let cfg = config();
    if cfg.enabled == 0 {
        return Ok(());
    }
    let ops = unsafe { &*ctx.ops };
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let policy = policy(netns);
    if policy & POLICY_ENABLED == 0 {
        return Ok(());
    }
    // Every address field is read, whatever the family: loads chosen by a branch get merged
    // by LLVM into one load through ctx + variable offset, which the verifier rejects.
    let (l4, r4) = (rd(&raw const ops.local_ip4), rd(&raw const ops.remote_ip4));
    let (l6, r6) = (
        ip6(&raw const ops.local_ip6),
        ip6(&raw const ops.remote_ip6),
    );
    let (local_ip, remote_ip) = match ops.family {
        AF_INET => (v4_mapped(l4), v4_mapped(r4)),
        AF_INET6 => (l6, r6),
        _ => return Ok(()),
    };
    let local_port = ops.local_port;
    let remote_port = port_from_be_field(ops.remote_port);

    // Istio's excludeOutboundPorts / excludeInboundPorts: never accelerated.
    let excluded = if active {
        PortKey::new(netns, remote_port as u16, DIR_OUTBOUND)
    } else {
        PortKey::new(netns, local_port as u16, DIR_INBOUND)
    };
    if unsafe { MESHACCEL_PORTS.get(excluded) }.is_some() {
        count(counter::SKIP_EXCLUDED_PORT, 1);
        return Ok(());
    }
    // Data written before ESTABLISHED (TCP Fast Open: SYN data, sent or waiting to be
    // retransmitted when the server did not take it) went or goes over TCP: redirecting
    // what follows would overtake it at the reader.
    if active
        && (ops.data_segs_out != 0 || ops.snd_nxt != ops.snd_una || unacked_writes(sk, ops.snd_una))
    {
        count(counter::SKIP_EARLY_DATA, 1);
        return Ok(());
    }

    // Istio's legs: a passive socket on a capture port (app → sidecar, sidecar → sidecar),
    // or either end of a connection from the inbound passthrough address (sidecar → app).
    let passthrough = |ip: &[u32; 4]| {
        (cfg.passthrough_v4_be != 0 && *ip == v4_mapped(cfg.passthrough_v4_be))
            || (cfg.passthrough_v6_be != [0; 4] && *ip == cfg.passthrough_v6_be)
    };
    let leg = decide::is_leg(
        active,
        local_port,
        [cfg.outbound_port, cfg.inbound_port],
        passthrough(&local_ip),
        passthrough(&remote_ip),
    );
    // In the mesh scope a passive socket that is no leg never redirects and is never
    // redirected to (its active peer is no leg either): keep it out of the sockhash.
    if cfg.scope == SCOPE_MESH && !active && !leg {
        count(counter::SKIP_NOT_MESH, 1);
        return Ok(());
    }

    // An app's socket (kernel hazard 4), unless its workload trusts its apps: a connecting
    // one only when its file is non-blocking (its reads then never wait inside the sockmap's
    // path); an accepted one, not accepted yet, only when its listener was non-blocking (an
    // event loop's), and so for the sidecar's passthrough socket to it, whose only peer it
    // is. Either leaves again if it turns out blocking before its first message.
    let app = policy & POLICY_TRUST_APPS == 0 && sk_uid(sk).is_none_or(|uid| uid != cfg.proxy_uid);
    if policy & POLICY_TRUST_APPS == 0 {
        let to_app = active && passthrough(&local_ip);
        if app && active && nonblocking(sk) != Some(true) {
            count(counter::SKIP_APP_BLOCKING, 1);
            return Ok(());
        }
        if (app && !active) || to_app {
            let port = if active { remote_port } else { local_port };
            let listener = PortKey::new(netns, port as u16, DIR_INBOUND);
            let flags = unsafe { MESHACCEL_LSTN.get(&listener) }
                .copied()
                .unwrap_or(0);
            if flags & LISTENER_NONBLOCKING == 0 {
                count(counter::SKIP_APP_UNACCEPTED, 1);
                return Ok(());
            }
        }
    }

    let (client_ip, client_port, client_seq, server_seq, role) = if active {
        (local_ip, local_port, ops.snd_nxt, ops.rcv_nxt, ROLE_CLIENT)
    } else {
        (
            remote_ip,
            remote_port,
            ops.rcv_nxt,
            ops.snd_nxt,
            ROLE_SERVER,
        )
    };
    let key = PairKey {
        // Loopback addresses (and the passthrough source, ::6 included) repeat in every pod:
        // name the netns too.
        netns_cookie: if is_loopback(&client_ip) || passthrough(&client_ip) {
            netns
        } else {
            0
        },
        client_ip_be: client_ip,
        client_port,
        client_seq,
        server_seq,
        role,
    };

    // The connection's service (see `SockState::service`) and whether it was seen streaming
    // small writes lately: then this socket stays on plain TCP, and so does its peer.
    let mut service = if active {
        PortKey::new(netns, remote_port as u16, DIR_OUTBOUND)
    } else {
        PortKey::new(netns, local_port as u16, DIR_INBOUND)
    };
    // A passive socket enters only when its client is a socket of this node in the sockhash:
    // else it could never pair (its client is on another node, or was kept out) and would
    // pay the sockmap's paths for nothing. It marks its client paired, unless that client
    // gave up first (`pairing`): one atomic or on the client's flags orders the two.
    if !active {
        let Some(p) = MESHACCEL_PEERS.get_ptr_mut(key.peer()) else {
            count(counter::SKIP_NO_LOCAL_PEER, 1);
            return Ok(());
        };
        let p = unsafe { &mut *p };
        if p.flags & PEER_SMALL_WRITES != 0 {
            count(counter::SKIP_SMALL_WRITES, 1);
            return Ok(());
        }
        if decide::left_unfed(p.flags) {
            count(counter::SKIP_NO_LOCAL_PEER, 1);
            return Ok(());
        }
        if p.service_port != 0 {
            service = PortKey::new(p.netns_cookie, p.service_port, DIR_OUTBOUND);
        }
        if set_flags(&raw mut p.flags, PEER_PAIRED) & PEER_UNPAIRED != 0 {
            count(counter::SKIP_NO_LOCAL_PEER, 1);
            return Ok(());
        }
    }
    let port = service.port as u32;
    if port == cfg.outbound_port || port == cfg.inbound_port {
        service.port = 0;
    }
    let small_writes = service.port != 0 && small_write_service(&cfg, &service);

    if let Err(e) = MESHACCEL_PEERS.insert(
        key,
        PeerInfo {
            netns_cookie: netns,
            sk_addr: sk as u64,
            leg: u16::from(leg),
            service_port: if active { service.port } else { 0 },
            flags: if small_writes { PEER_SMALL_WRITES } else { 0 }
                | if app { PEER_APP | PEER_DEFERRED } else { 0 },
            _pad: 0,
        },
        BPF_NOEXIST.into(),
    ) {
        insert_refused(e.into());
        return Err(());
    }
    let init = SockState {
        own: key,
        netns_cookie: netns,
        peer_netns_cookie: 0,
        peer_sk: 0,
        state: if small_writes {
            STATE_TCP
        } else {
            STATE_UNDECIDED
        },
        epoch: cfg.epoch,
        leg: leg.into(),
        unchecked: 0,
        service,
        small_run: 0,
        small_behind: 0,
        app: app.into(),
        leave: LEAVE_NO,
        paired: if active { PAIR_UNKNOWN } else { PAIR_YES },
        own_keepalive: 0,
        late: LATE_NO,
        _pad: [0; 3],
    };
    let st = unsafe {
        bpf_sk_storage_get(
            state_map(),
            sk.cast(),
            ptr::from_ref(&init).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SockState>();
    if st.is_null() {
        let _ = MESHACCEL_PEERS.remove(key);
        count(counter::INSERT_FAILED, 1);
        return Err(());
    }
    // A socket reused after close keeps no old state: start undecided.
    unsafe { *st = init };
    if small_writes {
        // Out of the sockhash; its PEERS entry (which tells its peer to stay out too) goes
        // at close.
        let _ = ctx.set_cb_flags((ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        count(counter::SKIP_SMALL_WRITES, 1);
        return Ok(());
    }
    if app {
        return defer(ctx, sk, unsafe { &mut *st });
    }
    let mut k = key;
    if let Err(e) = MESHACCEL_SOCKS.update(&mut k, unsafe { &mut *ctx.ops }, BPF_NOEXIST.into()) {
        let _ = MESHACCEL_PEERS.remove(key);
        unsafe { (*st).state = STATE_TCP };
        insert_refused(e.into());
        return Err(());
    }
    unsafe { (*st).own_keepalive = keepalive(ctx, cfg.keepalive_secs).into() };
    // Ask for a callback at TCP_CLOSE so the PEERS entry goes with the socket; an app's
    // socket, and an active socket, also at the segments it receives until it has decided
    // whether it must leave (`segment_received`).
    let mut flags = ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG;
    if app || active {
        flags |= BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
    }
    let _ = ctx.set_cb_flags(flags as i32);
    count(counter::INSERTED, 1);
    // Its client may have left between the look above and the insert (`peer_leaves` found
    // nothing to delete then): looked at again, atomically, now that it is in.
    if !active
        && let Some(p) = MESHACCEL_PEERS.get_ptr_mut(key.peer())
        && decide::left_unfed(set_flags(unsafe { &raw mut (*p).flags }, 0))
    {
        leave(ctx, unsafe { &mut *st });
    }
    Ok(())
}

/// An app's socket stays out of the sockhash until its first write (`LATE_WAITING`): it may
/// yet turn blocking, and a blocking read that starts while it is in the sockhash cannot be
/// made TCP's again. It keeps its PEERS entry (its sidecar's socket enters and pairs with it);
/// the keepalive of an accelerated socket waits for its adoption (its bytes cross TCP until then).
#[inline(always)]
fn defer(
    ctx: &SockOpsContext,
    sk: *mut aya_ebpf::bindings::bpf_sock,
    st: &mut SockState,
) -> Result<(), ()> {
    let waiting = PEND_WAITING;
    let pend = unsafe {
        bpf_sk_storage_get(
            pend_map(),
            sk.cast(),
            ptr::from_ref(&waiting).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    if pend.is_null() {
        go_tcp(st, counter::INSERT_FAILED);
        st.leave = LEAVE_DONE;
        return Err(());
    }
    st.late = LATE_WAITING;
    let ops = unsafe { &*ctx.ops };
    let _ = ctx.set_cb_flags(
        (ops.bpf_sock_ops_cb_flags
            | BPF_SOCK_OPS_STATE_CB_FLAG
            | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
            | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32,
    );
    count(counter::DEFERRED_APP, 1);
    Ok(())
}

/// A segment is about to be sent by a socket that asked to see them: a deferred app's socket
/// before its first write. At the first one carrying data: an event loop's socket is marked
/// ready, and the tc program on its netns' `lo` adopts it as this segment leaves (sock_ops may
/// not insert now); any other stays on TCP for life.
#[inline(always)]
pub(super) fn first_write(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops = unsafe { &*ctx.ops };
    // No data: a pure ACK, a FIN, or the kernel sizing its next segment.
    if ops.skb_len == 0 {
        return Ok(());
    }
    let sk = ops_sock(ctx)?;
    let _ =
        ctx.set_cb_flags((ops.bpf_sock_ops_cb_flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    let st = sock_state(sk).ok_or(())?;
    if st.late != LATE_WAITING || st.state != STATE_UNDECIDED {
        return Ok(());
    }
    let reason = match decide::first_write(nonblocking(sk), watched_by_epoll(sk)) {
        decide::FirstWrite::Ready => {
            if let Some(p) = unsafe {
                bpf_sk_storage_get(pend_map(), sk.cast(), ptr::null_mut(), 0)
                    .cast::<u32>()
                    .as_mut()
            } {
                *p = PEND_READY;
                return Ok(());
            }
            counter::INSERT_FAILED
        }
        decide::FirstWrite::NoEpoll => counter::SKIP_APP_NO_EPOLL,
        decide::FirstWrite::Blocking => counter::FALLBACK_APP_BLOCKING,
    };
    go_tcp(st, reason);
    leave(ctx, st);
    peer_leaves(st);
    unsafe { bpf_sk_storage_delete(pend_map(), sk.cast()) };
    Ok(())
}

/// An app's socket gone TCP for life before anything was redirected from it (at its first
/// write, or turned blocking before its first message), and after its own `leave` (which
/// marks it `PEER_LEFT`): nothing will ever be redirected into its peer, the sidecar's socket,
/// whose only peer it is. That socket then has nothing to gain in the sockhash, only tcp_bpf's
/// send and receive paths to pay for every message, so it leaves too (sock_ops may delete any
/// key; nothing was queued in it, hazard 2 loses nothing). One not in yet stays out
/// (`established` looks at this socket's flags before and after its insert).
#[inline(always)]
fn peer_leaves(st: &SockState) {
    let peer = st.own.peer();
    remove(&peer);
    if let Some(p) = MESHACCEL_PEERS.get_ptr_mut(peer) {
        set_flags(unsafe { &raw mut (*p).flags }, PEER_LEFT);
    }
}

/// A segment arrived for a socket that asked to see them: an app's socket before its first
/// message, an active socket before it knows whether it can pair. Runs before the segment is
/// queued and under the socket's lock, as its sk_msg program does: the two never interleave.
#[inline(always)]
pub(super) fn segment_received(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops = unsafe { &*ctx.ops };
    let sk = ops_sock(ctx)?;
    let st = sock_state(sk).ok_or(())?;
    // An app that made its socket blocking after a non-blocking connect (a connect timeout,
    // then blocking reads), or an accepted socket made blocking: its reads must be TCP's.
    let unfed = st.app != 0 && st.state == STATE_UNDECIDED && nonblocking(sk) == Some(false);
    if unfed {
        go_tcp(st, counter::FALLBACK_APP_BLOCKING);
    }
    // The server's first segment after ESTABLISHED comes after the server's own
    // ESTABLISHED, where a server of this node pairs: not paired by now, never.
    if st.paired == PAIR_UNKNOWN && !pairing(st) {
        go_tcp(st, counter::FALLBACK_NO_LOCAL_PEER);
    }
    if st.leave == LEAVE_PENDING {
        leave(ctx, st);
    }
    if unfed {
        peer_leaves(st);
    }
    // Adopted since its last segment (tc may not set socket options): now it gets the keepalive
    // an accelerated socket gets (the first segment after adoption is the ACK of its first write).
    if st.late == LATE_ADOPTED && st.leave == LEAVE_NO {
        st.own_keepalive = keepalive(ctx, config().keepalive_secs).into();
        st.late = LATE_KEPT;
    }
    let undecided_app = st.app != 0 && st.state == STATE_UNDECIDED;
    if !undecided_app && st.paired != PAIR_UNKNOWN {
        let _ = ctx.set_cb_flags(
            (ops.bpf_sock_ops_cb_flags & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32,
        );
    }
    Ok(())
}

/// Takes a socket out of the sockhash (sock_ops may delete from a sockhash; sk_msg may
/// not). Only for one nothing can have been redirected into (see `LEAVE_NO`): its reads and
/// sends are then TCP's own, and it gives its keepalive back if meshaccel set it.
#[inline(always)]
pub(super) fn leave(ctx: &SockOpsContext, st: &mut SockState) {
    remove(&st.own);
    if let Some(p) = MESHACCEL_PEERS.get_ptr_mut(st.own) {
        // Status lists it no longer (`closed` still counts it: it was inserted).
        set_flags(unsafe { &raw mut (*p).flags }, PEER_LEFT);
    }
    st.leave = LEAVE_DONE;
    if st.own_keepalive != 0 {
        let mut off: i32 = 0;
        let _ = unsafe {
            bpf_setsockopt(
                ctx.ops.cast(),
                SOL_SOCKET,
                SO_KEEPALIVE,
                ptr::from_mut(&mut off).cast(),
                4,
            )
        };
        st.own_keepalive = 0;
    }
}

/// Deletes a key from the sockhash; counts it when it was there.
#[inline(always)]
pub(super) fn remove(key: &PairKey) {
    let socks = ptr::from_ref(&MESHACCEL_SOCKS).cast_mut().cast();
    if unsafe { bpf_map_delete_elem(socks, ptr::from_ref(key).cast()) } == 0 {
        count(counter::LEFT, 1);
    }
}

/// Counts an insert (PEERS or the sockhash) the kernel refused: the key existed, or the map is
/// full; that socket stays on TCP.
fn insert_refused(e: i64) {
    count(
        if e == -i64::from(EEXIST) {
            counter::INSERT_COLLISION
        } else {
            counter::INSERT_FAILED
        },
        1,
    );
}

/// A socket reconnected after TCP_CLOSE (`connect(AF_UNSPEC)`, then `connect`): it has the state
/// of its old connection, and may still be in the sockhash under that connection's key (kept at
/// close for bytes it had not read; TCP drops those at the disconnect too). It leaves that key,
/// and stays on TCP for its new life: a redirect its old peer decided before the key went can
/// still land after, in whatever sk_msg queue the socket has then (the kernel holds the socket,
/// not the key): with none, the bytes are refused, as TCP refuses them.
pub(super) fn reconnected(ctx: &SockOpsContext, old: &mut SockState) {
    forget(old);
    old.state = STATE_TCP;
    old.leave = LEAVE_DONE;
    old.paired = PAIR_NONE;
    old.app = 0;
    let ops = unsafe { &*ctx.ops };
    let _ = ctx
        .set_cb_flags((ops.bpf_sock_ops_cb_flags & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32);
    count(counter::SKIP_RECONNECTED, 1);
}

/// A socket's old connection is over: out of the sockhash (unless it left already: then
/// the key is not its own any more) and out of PEERS (its own entry only).
#[inline(always)]
pub(super) fn forget(old: &SockState) {
    if old.leave != LEAVE_DONE {
        remove(&old.own);
    }
    if let Some(info) = unsafe { MESHACCEL_PEERS.get(old.own) }
        && info.netns_cookie == old.netns_cookie
    {
        let _ = MESHACCEL_PEERS.remove(old.own);
    }
}

/// A socket of the cgroup starts listening: remember whether its file is non-blocking, which
/// the app sockets it will accept are judged by at ESTABLISHED (they have no file yet).
#[inline(always)]
pub(super) fn listening(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops = unsafe { &*ctx.ops };
    let sk = ops_sock(ctx)?;
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let key = PortKey::new(netns, ops.local_port as u16, DIR_INBOUND);
    let flags = if nonblocking(sk) == Some(true) {
        LISTENER_NONBLOCKING
    } else {
        0
    };
    MESHACCEL_LSTN.insert(&key, &flags, 0).map_err(|_| ())
}

/// Whether a connection of this service showed a small-write stream in the last
/// `Config::small_write_secs`.
#[inline(always)]
pub(super) fn small_write_service(cfg: &Config, service: &PortKey) -> bool {
    if cfg.small_write_secs == 0 {
        return false;
    }
    match unsafe { MESHACCEL_SMALL.get(service) } {
        Some(&at) => {
            let now = unsafe { bpf_ktime_get_ns() };
            now.wrapping_sub(at) < cfg.small_write_secs as u64 * 1_000_000_000
        }
        None => false,
    }
}

/// TCP keepalive for an accelerated socket that has none of its own: its data never
/// crosses TCP, so without it a peer whose RST the kernel dropped (see `Config`) is never
/// noticed. An application's own keepalive settings are left alone. True when it set one.
#[inline(always)]
pub(super) fn keepalive(ctx: &SockOpsContext, idle: u32) -> bool {
    if idle == 0 {
        return false;
    }
    let ops = ctx.ops.cast();
    let mut on: i32 = 0;
    let opt = |level: i32, name: i32, v: &mut i32| unsafe {
        bpf_setsockopt(ops, level, name, ptr::from_mut(v).cast(), 4)
    };
    if unsafe {
        bpf_getsockopt(
            ops,
            SOL_SOCKET,
            SO_KEEPALIVE,
            ptr::from_mut(&mut on).cast(),
            4,
        )
    } != 0
        || on != 0
    {
        return false;
    }
    let (mut idle, mut intvl, mut cnt, mut one) = (
        idle as i32,
        (idle / 6).max(1) as i32,
        tuning::KEEPALIVE_PROBES as i32,
        1i32,
    );
    // Times first: enabling arms the timer with the idle time in force.
    let _ = opt(SOL_TCP, TCP_KEEPIDLE, &mut idle);
    let _ = opt(SOL_TCP, TCP_KEEPINTVL, &mut intvl);
    let _ = opt(SOL_TCP, TCP_KEEPCNT, &mut cnt);
    opt(SOL_SOCKET, SO_KEEPALIVE, &mut one) == 0
}

/// TCP_CLOSE (a reset, the end of both FINs, a disconnect), whether or not the app has
/// closed its socket yet.
#[inline(always)]
pub(super) fn closed(ctx: &SockOpsContext) -> Result<(), ()> {
    let sk = ops_sock(ctx)?;
    let st = sock_state(sk).ok_or(())?;
    let own = st.own;
    let mut inserted = true;
    // Only our own entry: a colliding socket never inserted one under this key.
    if let Some(info) = unsafe { MESHACCEL_PEERS.get(own) }
        && info.netns_cookie == st.netns_cookie
    {
        // A small-write service's socket kept its entry only to keep its peer out.
        inserted = info.flags & PEER_SMALL_WRITES == 0 && st.late != LATE_WAITING;
        // Out of the sockhash too when nothing is left unread in it: a peer that did not
        // learn of the close (its RST was lost: hazard 6) then fails its next redirect and
        // goes to TCP, whose answer is the reset TCP would have given it; and a reconnected
        // socket cannot receive the old peer's bytes. Unread bytes stay readable, as TCP's
        // stay after a reset or FIN: such a socket leaves at close() or at its reconnect.
        if inserted && st.leave != LEAVE_DONE && own_unread(sk) == Some(0) {
            remove(&own);
            st.leave = LEAVE_DONE;
        }
        let _ = MESHACCEL_PEERS.remove(own);
    }
    if inserted {
        count(counter::CLOSED, 1);
    }
    Ok(())
}
