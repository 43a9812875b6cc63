//! meshaccel eBPF programs.
//!
//! * `meshaccel_ops` (sock_ops, on a cgroup v2): at ESTABLISHED, a socket of an enabled workload
//!   enters the sockhash under its connection's NAT-proof name (`PairKey`) and gets a per-socket
//!   state (sk_storage). At close, its `PEERS` entry goes.
//! * `meshaccel_msg` (sk_msg, on the sockhash): the first message of a socket decides for its
//!   whole life: redirect into the peer socket's ingress when the peer is there and both ends are
//!   enabled, else TCP for life. A redirecting socket re-checks when user space moves the epoch and
//!   may then fall back to TCP (safe). It is *held* on TCP while its peer has too much unread
//!   (the kernel bounds no sk_msg ingress queue), and resumes redirecting only when everything it
//!   sent over TCP has been acknowledged and read (nothing left for a redirected byte to
//!   overtake). A socket that streams small writes faster than its peer reads them marks its
//!   service (`MESHACCEL_SMALL`): the service's next connections stay out of the sockhash.
//! * `meshaccel_adopt` (tc, egress of `lo` in each workload's netns): inserts an app's socket
//!   that its first write showed to be an event loop's.
//!
//! Application transparency (kernel hazard 4 in docs/design-notes.md): every socket in a sockmap
//! reads through `tcp_bpf_recvmsg`, whose blocking read may fail with EAGAIN and which `splice`
//! never sees into. Unless its workload trusts its apps (`POLICY_TRUST_APPS`), an app's socket
//! (one not created by the sidecar's UID) is never inserted at ESTABLISHED: one that may become
//! an event loop's (non-blocking; for an accepted one, not yet accepted: its listener was) waits
//! on TCP for its first write, where sock_ops marks it ready if its file is non-blocking and
//! watched by epoll, and the tc program adopts it as that write leaves (`SockState::late`). It
//! is never redirected into.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The bpf target's core has no atomic read-modify-write types: the intrinsics emit BPF's atomics.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod progs {
    mod adopt;
    mod kernel;
    mod maps;
    mod sk_msg;
    mod sock_ops;
    mod verdicts;

    /// What every module of the programs uses: the crates' items and each other's.
    mod prelude {
        pub(super) use super::{kernel::*, maps::*, verdicts::*};
        pub(super) use aya_ebpf::{
            bindings::{
                BPF_F_INGRESS, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
                BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG,
                BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, sk_action::SK_PASS,
            },
            btf_maps::{
                Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage, SockHash,
            },
            helpers::generated::{
                bpf_get_netns_cookie, bpf_getsockopt, bpf_ktime_get_ns, bpf_map_delete_elem,
                bpf_map_update_elem, bpf_probe_read_kernel, bpf_setsockopt, bpf_sk_fullsock,
                bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
            },
            macros::{btf_map, classifier, sk_msg, sock_ops},
            programs::{SkMsgContext, SockOpsContext, TcContext},
        };
        pub(super) use core::{
            intrinsics::{AtomicOrdering, atomic_and, atomic_or, atomic_xadd},
            ptr,
        };
        pub(super) use meshaccel_common::{
            Config, DIR_INBOUND, DIR_OUTBOUND, LATE_ADOPTED, LATE_KEPT, LATE_NO, LATE_WAITING,
            LEAVE_DONE, LEAVE_NO, LEAVE_PENDING, LISTENER_NONBLOCKING, PAIR_NONE, PAIR_UNKNOWN,
            PAIR_YES, PEER_APP, PEER_DEFERRED, PEER_LEFT, PEER_PAIRED, PEER_SMALL_WRITES,
            PEER_UNPAIRED, PEND_READY, PEND_WAITING, POLICY_ENABLED, POLICY_TRUST_APPS, PairKey,
            PeerInfo, PortKey, ROLE_CLIENT, ROLE_SERVER, SCOPE_MESH, STATE_HELD, STATE_REDIRECT,
            STATE_TCP, STATE_UNDECIDED, SockState, WorkloadPolicy, WorkloadStats, capacity,
            counter, decide, is_loopback, port_from_be_field, tuning, v4_mapped,
        };
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
