//! The maps both programs share, the read-only globals the agent sets before loading (this
//! kernel's struct offsets), and the small accessors over them.

use super::prelude::*;

pub(super) const SOCKS_MAX: usize = capacity::SOCKS as usize;
pub(super) const WL_MAX: usize = capacity::WORKLOADS as usize;
pub(super) const PORTS_MAX: usize = capacity::PORTS as usize;
pub(super) const STATS_LEN: usize = counter::COUNT as usize;
pub(super) const SMALL_MAX: usize = capacity::SMALL_WRITES as usize;
pub(super) const LISTEN_MAX: usize = capacity::LISTENERS as usize;

#[btf_map]
pub(super) static MESHACCEL_SOCKS: SockHash<PairKey, SOCKS_MAX> = SockHash::new();
#[btf_map]
pub(super) static MESHACCEL_PEERS: HashMap<PairKey, PeerInfo, SOCKS_MAX> = HashMap::new();
#[btf_map]
pub(super) static MESHACCEL_STATE: SkStorage<SockState> = SkStorage::new();
#[btf_map]
pub(super) static MESHACCEL_WL: HashMap<u64, WorkloadPolicy, WL_MAX> = HashMap::new();
#[btf_map]
pub(super) static MESHACCEL_PORTS: HashMap<PortKey, u32, PORTS_MAX> = HashMap::new();
#[btf_map]
pub(super) static MESHACCEL_CFG: Array<Config, 1> = Array::new();
#[btf_map]
pub(super) static MESHACCEL_STATS: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();
#[btf_map]
pub(super) static MESHACCEL_WLST: PerCpuHashMap<u64, WorkloadStats, WL_MAX> = PerCpuHashMap::new();
#[btf_map]
pub(super) static MESHACCEL_SMALL: LruHashMap<PortKey, u64, SMALL_MAX> = LruHashMap::new();
#[btf_map]
pub(super) static MESHACCEL_LSTN: LruHashMap<PortKey, u32, LISTEN_MAX> = LruHashMap::new();
#[btf_map]
pub(super) static MESHACCEL_PEND: SkStorage<u32> = SkStorage::new();

// Byte offsets in this kernel's `struct tcp_sock` (from its BTF, set by the agent before
// loading; read-only, so the verifier sees constants and drops the code that uses them when
// they are 0 = unknown). `OFF_WRITE_SEQ`/`OFF_SND_UNA` are loads through the BTF pointer of
// the own socket, checked by the verifier; `OFF_RMEM_ALLOC` (`sk_rmem_alloc`, the same in
// `struct sock`) is read from the peer's address with `bpf_probe_read_kernel`.
#[unsafe(no_mangle)]
pub(super) static OFF_RMEM_ALLOC: u32 = 0;
#[unsafe(no_mangle)]
pub(super) static OFF_WRITE_SEQ: u32 = 0;
#[unsafe(no_mangle)]
pub(super) static OFF_SND_UNA: u32 = 0;
// Who owns a socket and how it reads, loaded through BTF pointers from the own socket
// (offsets from the kernel's BTF as above; 0 = unknown: every app socket is then treated as
// blocking, i.e. kept on TCP): `struct sock` -> `sk_socket` -> `file` -> `f_flags`
// (O_NONBLOCK), and `struct sock`'s `sk_uid`.
#[unsafe(no_mangle)]
pub(super) static OFF_SK_SOCKET: u32 = 0;
#[unsafe(no_mangle)]
pub(super) static OFF_SOCKET_FILE: u32 = 0;
#[unsafe(no_mangle)]
pub(super) static OFF_FILE_FLAGS: u32 = 0;
#[unsafe(no_mangle)]
pub(super) static OFF_SK_UID: u32 = 0;
// `struct file`'s `f_ep`: the epoll instances watching the file (non-NULL: at least one).
#[unsafe(no_mangle)]
pub(super) static OFF_FILE_EP: u32 = 0;
// 1 when this kernel charges redirected bytes to the receiver's `sk_rmem_alloc` (6.13 on):
// only then does `sk_rmem_alloc == 0` mean nothing redirected is unread (set by the agent).
#[unsafe(no_mangle)]
pub(super) static RMEM_CHARGED: u32 = 0;

/// Adds to a per-CPU counter. Atomic although no other CPU writes the slot: on one CPU the
/// sock_ops program (softirq) can interrupt the sk_msg program between a load and a store,
/// and a plain `+=` would then lose one of the two updates.
#[inline(always)]
pub(super) fn add(p: *mut u64, n: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

/// Sets bits of a `PeerInfo::flags` word that another socket's program may set at the same
/// moment; returns the flags before.
#[inline(always)]
pub(super) fn set_flags(p: *mut u64, bits: u64) -> u64 {
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(p, bits) }
}

#[inline(always)]
pub(super) fn count(idx: u32, n: u64) {
    if let Some(p) = MESHACCEL_STATS.get_ptr_mut(idx) {
        add(p, n);
    }
}

#[inline(always)]
pub(super) fn config() -> Config {
    match MESHACCEL_CFG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// The workload's `POLICY_*` bits (0: not a workload, or not enabled).
#[inline(always)]
pub(super) fn policy(netns: u64) -> u32 {
    match unsafe { MESHACCEL_WL.get(netns) } {
        Some(p) => p.flags,
        None => 0,
    }
}

#[inline(always)]
pub(super) fn enabled(netns: u64) -> bool {
    policy(netns) & POLICY_ENABLED != 0
}

#[inline(always)]
pub(super) fn state_map() -> *mut core::ffi::c_void {
    // The BTF map wrappers keep their pointer accessor crate-private; the map's address is
    // what the helper needs.
    ptr::from_ref(&MESHACCEL_STATE).cast_mut().cast()
}

#[inline(always)]
pub(super) fn pend_map() -> *mut core::ffi::c_void {
    ptr::from_ref(&MESHACCEL_PEND).cast_mut().cast()
}

/// A socket's `SockState`, when it has one (it was seen at ESTABLISHED).
#[inline(always)]
pub(super) fn sock_state<'a>(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<&'a mut SockState> {
    let st = unsafe { bpf_sk_storage_get(state_map(), sk.cast(), ptr::null_mut(), 0) }
        .cast::<SockState>();
    unsafe { st.as_mut() }
}
