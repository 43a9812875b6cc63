//! Verdicts both programs give a socket: whether a server of this node paired with it, and TCP
//! for life.

use super::prelude::*;

/// Whether a passive socket of this node paired with this active one (`established`). If
/// none did, none ever will: the flag `PEER_UNPAIRED` set here keeps a late one out.
#[inline(always)]
pub(super) fn pairing(st: &mut SockState) -> bool {
    let Some(p) = MESHACCEL_PEERS.get_ptr_mut(st.own) else {
        st.paired = PAIR_NONE;
        return false;
    };
    let flags = unsafe { &raw mut (*p).flags };
    if set_flags(flags, PEER_UNPAIRED) & PEER_PAIRED != 0 {
        // A server paired first: take the mark back (it only means "gave up").
        unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(flags, !PEER_UNPAIRED) };
        st.paired = PAIR_YES;
        true
    } else {
        st.paired = PAIR_NONE;
        false
    }
}

/// TCP for life. A socket nothing can have been redirected into (an app's; an active one no
/// socket of this node paired with) has nothing left to gain in the sockhash: it leaves at
/// its next sock_ops callback, back on TCP's own paths. A socket already on TCP (it went for
/// another reason before it learned it cannot pair) is counted once, under its first reason.
#[inline(always)]
pub(super) fn go_tcp(st: &mut SockState, reason: u32) {
    if st.state != STATE_TCP {
        count(reason, 1);
    }
    st.state = STATE_TCP;
    if st.leave == LEAVE_NO && (st.app != 0 || st.paired == PAIR_NONE) {
        st.leave = LEAVE_PENDING;
    }
}
