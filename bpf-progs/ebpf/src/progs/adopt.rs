//! `meshaccel_adopt` (tc, egress of `lo` in each workload's netns, where an app's bytes to its
//! sidecar pass): inserts an app's socket marked ready at its first write (`first_write`)
//! into the sockhash, as that write's first segment leaves. Only sock_ops at ESTABLISHED and a
//! few program types may insert a socket; of those, tc sees the app's socket at its writes.

use super::prelude::*;

/// tcx: let the next program (or the kernel) decide; this one never changes a packet's fate.
const TCX_NEXT: i32 = -1;

#[classifier]
pub fn meshaccel_adopt(ctx: TcContext) -> i32 {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return TCX_NEXT;
    }
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return TCX_NEXT;
    }
    let ready =
        unsafe { bpf_sk_storage_get(pend_map(), sk.cast(), ptr::null_mut(), 0) }.cast::<u32>();
    if ready.is_null() || unsafe { *ready } != PEND_READY {
        return TCX_NEXT;
    }
    adopt(sk);
    // Adopted or not, it is decided: its next segments need not look.
    unsafe { bpf_sk_storage_delete(pend_map(), sk.cast()) };
    TCX_NEXT
}

/// Inserts it held: what it wrote over TCP so far (this segment included) is read before
/// anything is redirected (sk_msg, `may_resume`).
#[inline(always)]
fn adopt(sk: *mut aya_ebpf::bindings::bpf_sock) {
    let Some(st) = sock_state(sk) else {
        return;
    };
    if st.late != LATE_WAITING || st.state != STATE_UNDECIDED {
        return;
    }
    // Before the insert: its sk_msg program may run on another CPU as soon as it is in.
    st.late = LATE_ADOPTED;
    let socks = ptr::from_ref(&MESHACCEL_SOCKS).cast_mut().cast();
    let rc = unsafe {
        bpf_map_update_elem(
            socks,
            ptr::from_ref(&st.own).cast(),
            sk.cast(),
            BPF_NOEXIST.into(),
        )
    };
    if rc == 0 {
        if let Some(p) = MESHACCEL_PEERS.get_ptr_mut(st.own) {
            unsafe {
                atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(
                    &raw mut (*p).flags,
                    !PEER_DEFERRED,
                )
            };
        }
        count(counter::ADOPTED_APP, 1);
        count(counter::INSERTED, 1);
    } else {
        // Only ESTABLISHED sockets may enter (a FIN went first), or the map is full.
        st.late = LATE_WAITING;
        go_tcp(st, counter::INSERT_FAILED);
        st.leave = LEAVE_DONE;
    }
}
