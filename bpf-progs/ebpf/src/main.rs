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
//!
//! Application transparency (kernel hazard 4 in docs/design-notes.md): every socket in a sockmap
//! reads through `tcp_bpf_recvmsg`, whose blocking read may fail with EAGAIN and which `splice`
//! never sees into. Unless its workload trusts its apps (`POLICY_TRUST_APPS`), an app's socket
//! (one not created by the sidecar's UID) is inserted only when its file is non-blocking (for
//! an accepted one, not yet accepted at ESTABLISHED: when its listener was), is never redirected
//! into, and leaves the sockhash again if it turns blocking before its first message.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The bpf target's core has no atomic read-modify-write types: the intrinsics emit BPF's atomics.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod progs {
    use core::{
        intrinsics::{AtomicOrdering, atomic_and, atomic_or, atomic_xadd},
        ptr,
    };

    use aya_ebpf::{
        bindings::{
            BPF_F_INGRESS, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
            BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG, sk_action::SK_PASS,
        },
        btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage, SockHash},
        helpers::generated::{
            bpf_get_netns_cookie, bpf_getsockopt, bpf_ktime_get_ns, bpf_map_delete_elem,
            bpf_probe_read_kernel, bpf_setsockopt, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
        },
        macros::{btf_map, sk_msg, sock_ops},
        programs::{SkMsgContext, SockOpsContext},
    };
    use meshaccel_common::{
        Config, DIR_INBOUND, DIR_OUTBOUND, LEAVE_DONE, LEAVE_NO, LEAVE_PENDING,
        LISTENER_NONBLOCKING, PAIR_NONE, PAIR_UNKNOWN, PAIR_YES, PEER_APP, PEER_LEFT, PEER_PAIRED,
        PEER_SMALL_WRITES, PEER_UNPAIRED, POLICY_ENABLED, POLICY_TRUST_APPS, PairKey, PeerInfo,
        PortKey, ROLE_CLIENT, ROLE_SERVER, SCOPE_MESH, STATE_HELD, STATE_REDIRECT, STATE_TCP,
        STATE_UNDECIDED, SockState, WorkloadPolicy, WorkloadStats, capacity, counter, is_loopback,
        port_from_be_field, tuning, v4_mapped,
    };

    const SOCKS_MAX: usize = capacity::SOCKS as usize;
    const WL_MAX: usize = capacity::WORKLOADS as usize;
    const PORTS_MAX: usize = capacity::PORTS as usize;
    const STATS_LEN: usize = counter::COUNT as usize;
    const SMALL_MAX: usize = capacity::SMALL_WRITES as usize;
    const LISTEN_MAX: usize = capacity::LISTENERS as usize;

    #[btf_map]
    static MESHACCEL_SOCKS: SockHash<PairKey, SOCKS_MAX> = SockHash::new();
    #[btf_map]
    static MESHACCEL_PEERS: HashMap<PairKey, PeerInfo, SOCKS_MAX> = HashMap::new();
    #[btf_map]
    static MESHACCEL_STATE: SkStorage<SockState> = SkStorage::new();
    #[btf_map]
    static MESHACCEL_WL: HashMap<u64, WorkloadPolicy, WL_MAX> = HashMap::new();
    #[btf_map]
    static MESHACCEL_PORTS: HashMap<PortKey, u32, PORTS_MAX> = HashMap::new();
    #[btf_map]
    static MESHACCEL_CFG: Array<Config, 1> = Array::new();
    #[btf_map]
    static MESHACCEL_STATS: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();
    #[btf_map]
    static MESHACCEL_WLST: PerCpuHashMap<u64, WorkloadStats, WL_MAX> = PerCpuHashMap::new();
    #[btf_map]
    static MESHACCEL_SMALL: LruHashMap<PortKey, u64, SMALL_MAX> = LruHashMap::new();
    #[btf_map]
    static MESHACCEL_LSTN: LruHashMap<PortKey, u32, LISTEN_MAX> = LruHashMap::new();

    // Byte offsets in this kernel's `struct tcp_sock` (from its BTF, set by the agent before
    // loading; read-only, so the verifier sees constants and drops the code that uses them when
    // they are 0 = unknown). `OFF_WRITE_SEQ`/`OFF_SND_UNA` are loads through the BTF pointer of
    // the own socket, checked by the verifier; `OFF_RMEM_ALLOC` (`sk_rmem_alloc`, the same in
    // `struct sock`) is read from the peer's address with `bpf_probe_read_kernel`.
    #[unsafe(no_mangle)]
    static OFF_RMEM_ALLOC: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_WRITE_SEQ: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_SND_UNA: u32 = 0;
    // Who owns a socket and how it reads, loaded through BTF pointers from the own socket
    // (offsets from the kernel's BTF as above; 0 = unknown: every app socket is then treated as
    // blocking, i.e. kept on TCP): `struct sock` -> `sk_socket` -> `file` -> `f_flags`
    // (O_NONBLOCK), and `struct sock`'s `sk_uid`.
    #[unsafe(no_mangle)]
    static OFF_SK_SOCKET: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_SOCKET_FILE: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_FILE_FLAGS: u32 = 0;
    #[unsafe(no_mangle)]
    static OFF_SK_UID: u32 = 0;
    // 1 when this kernel charges redirected bytes to the receiver's `sk_rmem_alloc` (6.13 on):
    // only then does `sk_rmem_alloc == 0` mean nothing redirected is unread (set by the agent).
    #[unsafe(no_mangle)]
    static RMEM_CHARGED: u32 = 0;

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const ACTIVE_ESTABLISHED: u32 = 4;
    const PASSIVE_ESTABLISHED: u32 = 5;
    const STATE_CB: u32 = 10;
    const TCP_LISTEN_CB: u32 = 11;
    const PARSE_HDR_OPT_CB: u32 = 13;
    const TCP_CLOSE: u32 = 7;
    const O_NONBLOCK: u32 = 0o4000;
    const EEXIST: i32 = 17;
    // Socket options (uapi values) for the keepalive of accelerated sockets.
    const SOL_SOCKET: i32 = 1;
    const SO_KEEPALIVE: i32 = 9;
    const SOL_TCP: i32 = 6;
    const TCP_KEEPIDLE: i32 = 4;
    const TCP_KEEPINTVL: i32 = 5;
    const TCP_KEEPCNT: i32 = 6;

    /// Adds to a per-CPU counter. Atomic although no other CPU writes the slot: on one CPU the
    /// sock_ops program (softirq) can interrupt the sk_msg program between a load and a store,
    /// and a plain `+=` would then lose one of the two updates.
    #[inline(always)]
    fn add(p: *mut u64, n: u64) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
    }

    /// Sets bits of a `PeerInfo::flags` word that another socket's program may set at the same
    /// moment; returns the flags before.
    #[inline(always)]
    fn set_flags(p: *mut u64, bits: u64) -> u64 {
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(p, bits) }
    }

    #[inline(always)]
    fn count(idx: u32, n: u64) {
        if let Some(p) = MESHACCEL_STATS.get_ptr_mut(idx) {
            add(p, n);
        }
    }

    #[inline(always)]
    fn config() -> Config {
        match MESHACCEL_CFG.get(0) {
            Some(c) => *c,
            None => Config::default(),
        }
    }

    /// The workload's `POLICY_*` bits (0: not a workload, or not enabled).
    #[inline(always)]
    fn policy(netns: u64) -> u32 {
        match unsafe { MESHACCEL_WL.get(netns) } {
            Some(p) => p.flags,
            None => 0,
        }
    }

    #[inline(always)]
    fn enabled(netns: u64) -> bool {
        policy(netns) & POLICY_ENABLED != 0
    }

    /// A field of a kernel object behind a BTF pointer, at a BTF-checked constant offset.
    #[inline(always)]
    fn field<T: Copy>(p: *const u8, off: u32) -> T {
        unsafe { ptr::read_volatile(p.add(off as usize).cast::<T>()) }
    }

    /// The UID that created this socket (for an accepted socket: its listener's); None when
    /// unknown.
    #[inline(always)]
    fn sk_uid(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<u32> {
        let off = rd(&raw const OFF_SK_UID);
        if off == 0 {
            return None;
        }
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
        (!tp.is_null()).then(|| field::<u32>(tp, off))
    }

    /// Whether this socket's file is O_NONBLOCK right now; None when it has no file (not
    /// accepted yet, or closed) or the offsets are unknown. (Loads through BTF pointers: the
    /// kernel turns a load through a NULL one into 0, and the verifier checks every step.)
    #[inline(always)]
    fn nonblocking(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<bool> {
        let (o_sock, o_file, o_flags) = (
            rd(&raw const OFF_SK_SOCKET),
            rd(&raw const OFF_SOCKET_FILE),
            rd(&raw const OFF_FILE_FLAGS),
        );
        if o_sock == 0 || o_file == 0 || o_flags == 0 {
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
        if file.is_null() {
            return None;
        }
        Some(field::<u32>(file, o_flags) & O_NONBLOCK != 0)
    }

    #[inline(always)]
    fn state_map() -> *mut core::ffi::c_void {
        // The BTF map wrappers keep their pointer accessor crate-private; the map's address is
        // what the helper needs.
        ptr::from_ref(&MESHACCEL_STATE).cast_mut().cast()
    }

    /// The socket of a sock_ops callback.
    #[inline(always)]
    fn ops_sock(ctx: &SockOpsContext) -> Result<*mut aya_ebpf::bindings::bpf_sock, ()> {
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        if sk.is_null() { Err(()) } else { Ok(sk) }
    }

    /// A socket's `SockState`, when it has one (it was seen at ESTABLISHED).
    #[inline(always)]
    fn sock_state<'a>(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<&'a mut SockState> {
        let st = unsafe { bpf_sk_storage_get(state_map(), sk.cast(), ptr::null_mut(), 0) }
            .cast::<SockState>();
        unsafe { st.as_mut() }
    }

    /// Reads one ctx field with a load of its own at a constant offset (volatile: not merged).
    #[inline(always)]
    fn rd(p: *const u32) -> u32 {
        unsafe { ptr::read_volatile(p) }
    }

    /// Bytes the peer socket has not read yet (its sk_msg ingress queue and its TCP receive
    /// queue: `sk_rmem_alloc`); None when unknown (no BTF offsets, or the read failed).
    #[inline(always)]
    fn unread(st: &SockState) -> Option<u32> {
        let off = rd(&raw const OFF_RMEM_ALLOC);
        if off == 0 || st.peer_sk == 0 {
            return None;
        }
        let mut v = 0u32;
        let rc = unsafe {
            bpf_probe_read_kernel(
                ptr::from_mut(&mut v).cast(),
                4,
                (st.peer_sk + off as u64) as *const core::ffi::c_void,
            )
        };
        (rc == 0).then_some(v)
    }

    /// Whether this socket has bytes written (queued or sent) beyond `snd_una`.
    #[inline(always)]
    fn unacked_writes(sk: *mut aya_ebpf::bindings::bpf_sock, snd_una: u32) -> bool {
        let ws = rd(&raw const OFF_WRITE_SEQ);
        if ws == 0 {
            return false;
        }
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
        !tp.is_null() && field::<u32>(tp.cast(), ws) != snd_una
    }

    /// Whether every byte this socket wrote over TCP has been acknowledged.
    #[inline(always)]
    fn tcp_all_acked(sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
        let (ws, una) = (rd(&raw const OFF_WRITE_SEQ), rd(&raw const OFF_SND_UNA));
        if ws == 0 || una == 0 {
            return false;
        }
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
        !tp.is_null() && field::<u32>(tp.cast(), ws) == field::<u32>(tp.cast(), una)
    }

    #[inline(always)]
    fn ip6(p: *const [u32; 4]) -> [u32; 4] {
        let p = p.cast::<u32>();
        unsafe { [rd(p), rd(p.add(1)), rd(p.add(2)), rd(p.add(3))] }
    }

    #[sock_ops]
    pub fn meshaccel_ops(ctx: SockOpsContext) -> u32 {
        // 1 = success for cgroup sock_ops; nothing we do here should fail the socket.
        match try_sock_ops(&ctx) {
            Ok(()) | Err(()) => 1,
        }
    }

    #[inline(always)]
    fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
        match ctx.op() {
            ACTIVE_ESTABLISHED => established(ctx, true),
            PASSIVE_ESTABLISHED => established(ctx, false),
            STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(ctx),
            PARSE_HDR_OPT_CB => segment_received(ctx),
            TCP_LISTEN_CB => listening(ctx),
            _ => Ok(()),
        }
    }

    #[inline(always)]
    fn established(ctx: &SockOpsContext, active: bool) -> Result<(), ()> {
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
        let sk = ops_sock(ctx)?;
        // Data written before ESTABLISHED (TCP Fast Open: SYN data, sent or waiting to be
        // retransmitted when the server did not take it) went or goes over TCP: redirecting
        // what follows would overtake it at the reader.
        if active
            && (ops.data_segs_out != 0
                || ops.snd_nxt != ops.snd_una
                || unacked_writes(sk, ops.snd_una))
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
        let leg = if active {
            passthrough(&local_ip)
        } else {
            (local_port != 0 && (local_port == cfg.outbound_port || local_port == cfg.inbound_port))
                || passthrough(&remote_ip)
        };
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
        let app =
            policy & POLICY_TRUST_APPS == 0 && sk_uid(sk).is_none_or(|uid| uid != cfg.proxy_uid);
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
                    | if app { PEER_APP } else { 0 },
                _pad: 0,
            },
            BPF_NOEXIST.into(),
        ) {
            count(
                if e == -EEXIST {
                    counter::INSERT_COLLISION
                } else {
                    counter::INSERT_FAILED
                },
                1,
            );
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
            _pad: 0,
        };
        // A socket reconnected after TCP_CLOSE (connect(AF_UNSPEC), then connect) may still be
        // in the sockhash under its old connection's key (kept at close for bytes it had not
        // read; TCP drops those at the disconnect too): the old peer must not reach it there.
        if let Some(old) = sock_state(sk)
            && old.own != key
        {
            forget(old);
        }
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
            let _ =
                ctx.set_cb_flags((ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            count(counter::SKIP_SMALL_WRITES, 1);
            return Ok(());
        }
        let mut k = key;
        if let Err(e) = MESHACCEL_SOCKS.update(&mut k, unsafe { &mut *ctx.ops }, BPF_NOEXIST.into())
        {
            let _ = MESHACCEL_PEERS.remove(key);
            unsafe { (*st).state = STATE_TCP };
            count(
                if e == -EEXIST {
                    counter::INSERT_COLLISION
                } else {
                    counter::INSERT_FAILED
                },
                1,
            );
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
        Ok(())
    }

    /// A segment arrived for a socket that asked to see them: an app's socket before its first
    /// message, an active socket before it knows whether it can pair. Runs before the segment is
    /// queued and under the socket's lock, as its sk_msg program does: the two never interleave.
    #[inline(always)]
    fn segment_received(ctx: &SockOpsContext) -> Result<(), ()> {
        let ops = unsafe { &*ctx.ops };
        let sk = ops_sock(ctx)?;
        let st = sock_state(sk).ok_or(())?;
        // An app that made its socket blocking after a non-blocking connect (a connect timeout,
        // then blocking reads), or an accepted socket made blocking: its reads must be TCP's.
        if st.app != 0 && st.state == STATE_UNDECIDED && nonblocking(sk) == Some(false) {
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
        let undecided_app = st.app != 0 && st.state == STATE_UNDECIDED;
        if !undecided_app && st.paired != PAIR_UNKNOWN {
            let _ = ctx.set_cb_flags(
                (ops.bpf_sock_ops_cb_flags & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32,
            );
        }
        Ok(())
    }

    /// Whether a passive socket of this node paired with this active one (`established`). If
    /// none did, none ever will: the flag `PEER_UNPAIRED` set here keeps a late one out.
    #[inline(always)]
    fn pairing(st: &mut SockState) -> bool {
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

    /// Takes a socket out of the sockhash (sock_ops may delete from a sockhash; sk_msg may
    /// not). Only for one nothing can have been redirected into (see `LEAVE_NO`): its reads and
    /// sends are then TCP's own, and it gives its keepalive back if meshaccel set it.
    #[inline(always)]
    fn leave(ctx: &SockOpsContext, st: &mut SockState) {
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
    fn remove(key: &PairKey) {
        let socks = ptr::from_ref(&MESHACCEL_SOCKS).cast_mut().cast();
        if unsafe { bpf_map_delete_elem(socks, ptr::from_ref(key).cast()) } == 0 {
            count(counter::LEFT, 1);
        }
    }

    /// A socket's old connection is over: out of the sockhash (unless it left already: then
    /// the key is not its own any more) and out of PEERS (its own entry only).
    #[inline(always)]
    fn forget(old: &SockState) {
        if old.leave != LEAVE_DONE {
            remove(&old.own);
        }
        if let Some(info) = unsafe { MESHACCEL_PEERS.get(old.own) }
            && info.netns_cookie == old.netns_cookie
        {
            let _ = MESHACCEL_PEERS.remove(old.own);
        }
    }

    /// Bytes this socket has not read (redirected and TCP's: `sk_rmem_alloc`, which counts
    /// redirected bytes only where the kernel charges them, `RMEM_CHARGED`); None when unknown.
    #[inline(always)]
    fn own_unread(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<u32> {
        let off = rd(&raw const OFF_RMEM_ALLOC);
        if off == 0 || rd(&raw const RMEM_CHARGED) == 0 {
            return None;
        }
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
        (!tp.is_null()).then(|| field::<u32>(tp, off))
    }

    /// A socket of the cgroup starts listening: remember whether its file is non-blocking, which
    /// the app sockets it will accept are judged by at ESTABLISHED (they have no file yet).
    #[inline(always)]
    fn listening(ctx: &SockOpsContext) -> Result<(), ()> {
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
    fn small_write_service(cfg: &Config, service: &PortKey) -> bool {
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
    fn keepalive(ctx: &SockOpsContext, idle: u32) -> bool {
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
    fn closed(ctx: &SockOpsContext) -> Result<(), ()> {
        let sk = ops_sock(ctx)?;
        let st = sock_state(sk).ok_or(())?;
        let own = st.own;
        let mut inserted = true;
        // Only our own entry: a colliding socket never inserted one under this key.
        if let Some(info) = unsafe { MESHACCEL_PEERS.get(own) }
            && info.netns_cookie == st.netns_cookie
        {
            // A small-write service's socket kept its entry only to keep its peer out.
            inserted = info.flags & PEER_SMALL_WRITES == 0;
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

    #[sk_msg]
    pub fn meshaccel_msg(ctx: SkMsgContext) -> u32 {
        try_sk_msg(&ctx)
    }

    #[inline(always)]
    fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
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
                st.state = STATE_REDIRECT;
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
    /// than the limit unread. Looked at every `CHECK_BYTES` redirected.
    #[inline(always)]
    fn must_hold(st: &mut SockState, cfg: &Config, size: u64) -> bool {
        if cfg.queue_limit == 0 {
            return false;
        }
        st.unchecked = st.unchecked.saturating_add(size as u32);
        if st.unchecked < tuning::CHECK_BYTES {
            return false;
        }
        st.unchecked = 0;
        unread(st).is_some_and(|n| n > cfg.queue_limit)
    }

    /// Watches for a small-write stream: `tuning::SMALL_BEHIND` looks in a row, one every
    /// `tuning::SMALL_RUN` small messages in a row, that find the peer with bytes unread (a
    /// request/response exchange finds it with nothing unread). Such a stream moves more bytes
    /// over plain TCP, which coalesces small writes, than redirected one message at a time; and
    /// a socket cannot leave the sockhash safely while its peer may redirect into it. So the
    /// service is remembered and its next connections stay out (`established`); this one goes
    /// on. Remembering again while the stream lasts keeps its service out.
    #[inline(always)]
    fn small_writes(st: &mut SockState, cfg: &Config, size: u64) {
        if cfg.small_write_secs == 0 || st.service.port == 0 {
            return;
        }
        if size >= tuning::SMALL_WRITE_BYTES {
            st.small_run = 0;
            st.small_behind = 0;
            return;
        }
        st.small_run += 1;
        if st.small_run < tuning::SMALL_RUN {
            return;
        }
        st.small_run = 0;
        if unread(st).is_none_or(|n| n == 0) {
            st.small_behind = 0;
            return;
        }
        st.small_behind += 1;
        if st.small_behind < tuning::SMALL_BEHIND {
            return;
        }
        st.small_behind = 0;
        let now = unsafe { bpf_ktime_get_ns() };
        if MESHACCEL_SMALL.insert(&st.service, &now, 0).is_ok() {
            count(counter::LEARNED_SMALL_WRITES, 1);
        }
    }

    /// A held socket may redirect again once everything it wrote over TCP has been acknowledged
    /// and its peer has read everything (nothing of its TCP stream is left for a redirected
    /// byte to overtake). Checked at every message while held (a few loads).
    #[inline(always)]
    fn may_resume(st: &SockState, sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
        tcp_all_acked(sk) && unread(st) == Some(0)
    }

    #[inline(always)]
    fn tcp_for_life(st: &mut SockState, reason: u32, size: u64) -> u32 {
        go_tcp(st, reason);
        tcp(st.netns_cookie, size)
    }

    /// TCP for life. A socket nothing can have been redirected into (an app's; an active one no
    /// socket of this node paired with) has nothing left to gain in the sockhash: it leaves at
    /// its next sock_ops callback, back on TCP's own paths.
    #[inline(always)]
    fn go_tcp(st: &mut SockState, reason: u32) {
        st.state = STATE_TCP;
        if st.leave == LEAVE_NO && (st.app != 0 || st.paired == PAIR_NONE) {
            st.leave = LEAVE_PENDING;
        }
        count(reason, 1);
    }

    #[inline(always)]
    fn tcp(netns: u64, size: u64) -> u32 {
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
