//! Reading kernel objects: ctx fields at constant offsets, fields of the own socket through its
//! BTF pointer, the peer's unread bytes through `bpf_probe_read_kernel`; uapi constants.

use super::prelude::*;

pub(super) const AF_INET: u32 = 2;
pub(super) const AF_INET6: u32 = 10;
pub(super) const ACTIVE_ESTABLISHED: u32 = 4;
pub(super) const PASSIVE_ESTABLISHED: u32 = 5;
pub(super) const STATE_CB: u32 = 10;
pub(super) const TCP_LISTEN_CB: u32 = 11;
pub(super) const PARSE_HDR_OPT_CB: u32 = 13;
pub(super) const HDR_OPT_LEN_CB: u32 = 14;
pub(super) const TCP_CLOSE: u32 = 7;
pub(super) const O_NONBLOCK: u32 = 0o4000;
pub(super) const EEXIST: i32 = 17;
// Socket options (uapi values) for the keepalive of accelerated sockets.
pub(super) const SOL_SOCKET: i32 = 1;
pub(super) const SO_KEEPALIVE: i32 = 9;
pub(super) const SOL_TCP: i32 = 6;
pub(super) const TCP_KEEPIDLE: i32 = 4;
pub(super) const TCP_KEEPINTVL: i32 = 5;
pub(super) const TCP_KEEPCNT: i32 = 6;

/// A field of a kernel object behind a BTF pointer, at a BTF-checked constant offset.
#[inline(always)]
pub(super) fn field<T: Copy>(p: *const u8, off: u32) -> T {
    unsafe { ptr::read_volatile(p.add(off as usize).cast::<T>()) }
}

/// Reads one ctx field with a load of its own at a constant offset (volatile: not merged).
#[inline(always)]
pub(super) fn rd(p: *const u32) -> u32 {
    unsafe { ptr::read_volatile(p) }
}

/// The UID that created this socket (for an accepted socket: its listener's); None when
/// unknown.
#[inline(always)]
pub(super) fn sk_uid(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<u32> {
    let off = rd(&raw const OFF_SK_UID);
    if off == 0 {
        return None;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    (!tp.is_null()).then(|| field::<u32>(tp, off))
}

/// This socket's file, when it has one (not before accept(), not after close) and the offsets
/// are known. (Loads through BTF pointers: the kernel turns a load through a NULL one into 0,
/// and the verifier checks every step.)
#[inline(always)]
pub(super) fn file_of(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<*const u8> {
    let (o_sock, o_file) = (rd(&raw const OFF_SK_SOCKET), rd(&raw const OFF_SOCKET_FILE));
    if o_sock == 0 || o_file == 0 {
        return None;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    if tp.is_null() {
        return None;
    }
    let sock = field::<*const u8>(tp, o_sock);
    if sock.is_null() {
        return None;
    }
    let file = field::<*const u8>(sock, o_file);
    (!file.is_null()).then_some(file)
}

/// Whether this socket's file is O_NONBLOCK right now; None when it has no file or the
/// offsets are unknown.
#[inline(always)]
pub(super) fn nonblocking(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<bool> {
    let o_flags = rd(&raw const OFF_FILE_FLAGS);
    if o_flags == 0 {
        return None;
    }
    file_of(sk).map(|file| field::<u32>(file, o_flags) & O_NONBLOCK != 0)
}

/// Whether an epoll instance watches this socket's file (`f_ep`); false when unknown. Event
/// loops (Go, Java NIO, nginx, asyncio, libuv, tokio) register their sockets; a poll loop or a
/// runtime's socket timeout (CPython's) does not.
#[inline(always)]
pub(super) fn watched_by_epoll(sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
    let o_ep = rd(&raw const OFF_FILE_EP);
    o_ep != 0 && file_of(sk).is_some_and(|file| !field::<*const u8>(file, o_ep).is_null())
}

/// The socket of a sock_ops callback.
#[inline(always)]
pub(super) fn ops_sock(ctx: &SockOpsContext) -> Result<*mut aya_ebpf::bindings::bpf_sock, ()> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() { Err(()) } else { Ok(sk) }
}

/// Bytes the peer socket has not read yet (its sk_msg ingress queue and its TCP receive
/// queue: `sk_rmem_alloc`); None when unknown (no BTF offsets, or the read failed).
#[inline(always)]
pub(super) fn unread(st: &SockState) -> Option<u32> {
    unread_at(st.peer_sk)
}

/// Bytes the socket at kernel address `peer_sk` has not read (see [`unread`]).
#[inline(always)]
pub(super) fn unread_at(peer_sk: u64) -> Option<u32> {
    let off = rd(&raw const OFF_RMEM_ALLOC);
    if off == 0 || peer_sk == 0 {
        return None;
    }
    let mut v = 0u32;
    let rc = unsafe {
        bpf_probe_read_kernel(
            ptr::from_mut(&mut v).cast(),
            4,
            (peer_sk + off as u64) as *const core::ffi::c_void,
        )
    };
    (rc == 0).then_some(v)
}

/// Bytes this socket has not read (redirected and TCP's: `sk_rmem_alloc`, which counts
/// redirected bytes only where the kernel charges them, `RMEM_CHARGED`); None when unknown.
#[inline(always)]
pub(super) fn own_unread(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<u32> {
    let off = rd(&raw const OFF_RMEM_ALLOC);
    if off == 0 || rd(&raw const RMEM_CHARGED) == 0 {
        return None;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    (!tp.is_null()).then(|| field::<u32>(tp, off))
}

/// Whether this socket has bytes written (queued or sent) beyond `snd_una`.
#[inline(always)]
pub(super) fn unacked_writes(sk: *mut aya_ebpf::bindings::bpf_sock, snd_una: u32) -> bool {
    let ws = rd(&raw const OFF_WRITE_SEQ);
    if ws == 0 {
        return false;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    !tp.is_null() && field::<u32>(tp.cast(), ws) != snd_una
}

/// Whether every byte this socket wrote over TCP has been acknowledged.
#[inline(always)]
pub(super) fn tcp_all_acked(sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
    let (ws, una) = (rd(&raw const OFF_WRITE_SEQ), rd(&raw const OFF_SND_UNA));
    if ws == 0 || una == 0 {
        return false;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    !tp.is_null() && field::<u32>(tp.cast(), ws) == field::<u32>(tp.cast(), una)
}

#[inline(always)]
pub(super) fn ip6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    unsafe { [rd(p), rd(p.add(1)), rd(p.add(2)), rd(p.add(3))] }
}
