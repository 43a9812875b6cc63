//! `meshaccel_msg` (sk_msg, on the sockhash): per message, redirect into the peer or TCP; the
//! queue bound (hold/resume) and the small-write watch.

use super::prelude::*;

#[sk_msg]
pub fn meshaccel_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx)
}

#[inline(always)]
pub(super) fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
    let size = ctx.size() as u64;
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let Some(st) = sock_state(sk) else {
        count(counter::FALLBACK_NO_STATE, 1);
        return tcp(0, size);
    };
    if st.state == STATE_TCP {
        return tcp(st.netns_cookie, size);
    }
    let cfg = config();
    // Fast path: decided (redirecting or held), and nothing that could stop it has changed
    // since last checked.
    if st.state == STATE_UNDECIDED || st.epoch != cfg.epoch {
        if cfg.enabled == 0 || !enabled(st.netns_cookie) {
            return tcp_for_life(st, counter::FALLBACK_DISABLED, size);
        }
        if st.state == STATE_UNDECIDED {
            if st.paired == PAIR_UNKNOWN && !pairing(st) {
                return tcp_for_life(st, counter::FALLBACK_NO_LOCAL_PEER, size);
            }
            match unsafe { MESHACCEL_PEERS.get(st.own.peer()) } {
                Some(peer) => {
                    st.peer_netns_cookie = peer.netns_cookie;
                    st.peer_sk = peer.sk_addr;
                    // Either end knows whether this connection is an Istio leg.
                    st.leg |= u32::from(peer.leg);
                    if peer.flags & PEER_APP != 0 {
                        return tcp_for_life(st, counter::FALLBACK_APP_RECEIVER, size);
                    }
                }
                None => return tcp_for_life(st, counter::FALLBACK_NO_PEER, size),
            }
            // An app may make its socket blocking after a non-blocking connect (a connect
            // timeout): then it must leave the sockhash before it reads (`app_leave`).
            if st.app != 0 && nonblocking(sk) != Some(true) {
                return tcp_for_life(st, counter::FALLBACK_APP_BLOCKING, size);
            }
        }
        if cfg.scope == SCOPE_MESH && st.leg == 0 {
            return tcp_for_life(st, counter::FALLBACK_NOT_MESH, size);
        }
        if !enabled(st.peer_netns_cookie) {
            return tcp_for_life(st, counter::FALLBACK_DISABLED, size);
        }
        if st.state == STATE_UNDECIDED {
            // An adopted app's socket wrote over TCP first: held until all of that is read.
            st.state = if st.late != LATE_NO {
                STATE_HELD
            } else {
                STATE_REDIRECT
            };
        }
        st.epoch = cfg.epoch;
    }
    if st.state == STATE_HELD {
        if !may_resume(st, sk) {
            return tcp(st.netns_cookie, size);
        }
        st.state = STATE_REDIRECT;
        st.unchecked = 0;
        count(counter::RESUMED, 1);
    } else if must_hold(st, &cfg, size) {
        st.state = STATE_HELD;
        count(counter::HOLD_QUEUE, 1);
        return tcp(st.netns_cookie, size);
    }
    small_writes(st, &cfg, size);
    let mut peer = st.own.peer();
    if MESHACCEL_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS.into()) == SK_PASS.into() {
        count(counter::REDIRECT_MSGS, 1);
        count(counter::REDIRECT_BYTES, size);
        if let Some(w) = MESHACCEL_WLST.get_ptr_mut(st.netns_cookie) {
            unsafe {
                add(&raw mut (*w).redirect_msgs, 1);
                add(&raw mut (*w).redirect_bytes, size);
            }
        }
        SK_PASS
    } else {
        // The peer left the sockhash (it closed): this message and all later ones use TCP.
        tcp_for_life(st, counter::FALLBACK_REDIRECT_FAILED, size)
    }
}

/// Whether a redirecting socket must move to TCP before this message: its peer has more
/// than the limit unread. Looked at every `tuning::CHECK_BYTES` redirected.
#[inline(always)]
pub(super) fn must_hold(st: &mut SockState, cfg: &Config, size: u64) -> bool {
    cfg.queue_limit != 0
        && decide::look_at_peer(&mut st.unchecked, size)
        && unread(st).is_some_and(|n| n > cfg.queue_limit)
}

/// Watches for a small-write stream (`decide::small_write_stream`: the reader falls behind a
/// stream of small messages; a request/response exchange finds it with nothing unread). Such
/// a stream moves more bytes over plain TCP, which coalesces small writes, than redirected one
/// message at a time; and a socket cannot leave the sockhash safely while its peer may redirect
/// into it. So the service is remembered and its next connections stay out (`established`);
/// this one goes on. Remembering again while the stream lasts keeps its service out.
#[inline(always)]
pub(super) fn small_writes(st: &mut SockState, cfg: &Config, size: u64) {
    if cfg.small_write_secs == 0 || st.service.port == 0 {
        return;
    }
    let peer_sk = st.peer_sk;
    if !decide::small_write_stream(&mut st.small_run, &mut st.small_behind, size, || {
        unread_at(peer_sk)
    }) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if MESHACCEL_SMALL.insert(&st.service, &now, 0).is_ok() {
        count(counter::LEARNED_SMALL_WRITES, 1);
    }
}

/// A held socket may redirect again once everything it wrote over TCP has been acknowledged
/// and its peer has read everything. Checked at every message while held (a few loads).
#[inline(always)]
pub(super) fn may_resume(st: &SockState, sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
    decide::may_resume(tcp_all_acked(sk), unread(st))
}

#[inline(always)]
pub(super) fn tcp_for_life(st: &mut SockState, reason: u32, size: u64) -> u32 {
    go_tcp(st, reason);
    tcp(st.netns_cookie, size)
}

#[inline(always)]
pub(super) fn tcp(netns: u64, size: u64) -> u32 {
    count(counter::TCP_MSGS, 1);
    count(counter::TCP_BYTES, size);
    if let Some(w) = MESHACCEL_WLST.get_ptr_mut(netns) {
        unsafe {
            add(&raw mut (*w).tcp_msgs, 1);
            add(&raw mut (*w).tcp_bytes, size);
        }
    }
    SK_PASS
}
