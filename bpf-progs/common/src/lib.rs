//! Types shared by the meshaccel eBPF programs (kernel side) and the agent (user side).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has explicit padding and carries its byte
//! order in field names. No bool/Option/enum crosses the kernel boundary.
#![no_std]

use core::mem::size_of;

/// Map names, as the eBPF object declares them and as they are pinned under the bpffs folder.
/// The kernel keeps 15 characters of a name; these fit.
pub mod names {
    /// SOCKHASH: `PairKey` -> socket.
    pub const SOCKS: &str = "MESHACCEL_SOCKS";
    /// HASH: `PairKey` -> `PeerInfo` (who owns the socket stored under that key).
    pub const PEERS: &str = "MESHACCEL_PEERS";
    /// HASH: `SockTuple` -> `SockState` (per-socket decision: undecided, redirect, TCP for life).
    pub const STATE: &str = "MESHACCEL_STATE";
    /// HASH: netns cookie (u64) -> `WorkloadPolicy`.
    pub const WORKLOADS: &str = "MESHACCEL_WL";
    /// HASH: `PortKey` -> u32 (1 = excluded).
    pub const PORTS: &str = "MESHACCEL_PORTS";
    /// ARRAY[1]: `Config`.
    pub const CONFIG: &str = "MESHACCEL_CFG";
    /// PERCPU_ARRAY[`counter::COUNT`]: u64.
    pub const STATS: &str = "MESHACCEL_STATS";
    /// PERCPU_HASH: netns cookie -> `WorkloadStats` (entries made by user space per workload).
    pub const WL_STATS: &str = "MESHACCEL_WLST";
    /// LRU_HASH: `PortKey` (a service, see `SockState::service`) -> when (ns, boot clock) one of
    /// its connections last showed a small-write stream: new connections of it stay on TCP.
    pub const SMALL_WRITES: &str = "MESHACCEL_SMALL";
    /// LRU_HASH: `PortKey` (a netns and a port it listens on, `DIR_INBOUND`) -> `LISTENER_*`
    /// bits, written by sock_ops when a socket starts listening.
    pub const LISTENERS: &str = "MESHACCEL_LSTN";
    /// All maps, in the order the agent pins them.
    pub const ALL: [&str; 10] = [
        SOCKS,
        PEERS,
        STATE,
        WORKLOADS,
        PORTS,
        CONFIG,
        STATS,
        WL_STATS,
        SMALL_WRITES,
        LISTENERS,
    ];

    /// Program names (function names in the eBPF crate).
    pub const PROG_SOCK_OPS: &str = "meshaccel_ops";
    pub const PROG_SK_MSG: &str = "meshaccel_msg";
}

/// Map capacities.
pub mod capacity {
    /// Sockets in the sockhash (each accelerated connection uses two entries).
    pub const SOCKS: u32 = 65_536;
    pub const WORKLOADS: u32 = 4_096;
    pub const PORTS: u32 = 16_384;
    /// Services remembered as small-write streams (least recently used go first).
    pub const SMALL_WRITES: u32 = 4_096;
    /// Listening ports remembered (least recently used go first).
    pub const LISTENERS: u32 = 16_384;
}

/// Indexes into the per-CPU counter array.
pub mod counter {
    /// Sockets inserted into the sockhash.
    pub const INSERTED: u32 = 0;
    /// Insert refused because the key already existed: that socket stays on TCP.
    pub const INSERT_COLLISION: u32 = 1;
    /// Insert failed for another reason (a full map): that socket stays on TCP.
    pub const INSERT_FAILED: u32 = 2;
    /// Messages redirected into the peer socket, and their bytes.
    pub const REDIRECT_MSGS: u32 = 3;
    pub const REDIRECT_BYTES: u32 = 4;
    /// A socket went TCP for life because its peer was not in the sockhash at its first message.
    pub const FALLBACK_NO_PEER: u32 = 5;
    /// ... because its own or its peer's workload, or the global switch, was off.
    pub const FALLBACK_DISABLED: u32 = 6;
    /// ... because the redirect itself failed (the peer had gone).
    pub const FALLBACK_REDIRECT_FAILED: u32 = 7;
    /// Messages (and bytes) that sockets in the sockhash sent over plain TCP.
    pub const TCP_MSGS: u32 = 8;
    pub const TCP_BYTES: u32 = 9;
    /// Sockets of an enabled workload not inserted because their port is excluded.
    pub const SKIP_EXCLUDED_PORT: u32 = 10;
    /// Sockets not inserted because data went before the handshake finished (TCP Fast Open).
    pub const SKIP_EARLY_DATA: u32 = 11;
    /// A socket of the sockhash had no state entry (state map full): TCP.
    pub const FALLBACK_NO_STATE: u32 = 12;
    /// Inserted sockets that closed.
    pub const CLOSED: u32 = 13;
    /// A socket went TCP for life because, in the "mesh" scope, neither it nor its peer is one
    /// of Istio's legs (a capture port, or the inbound passthrough address).
    pub const FALLBACK_NOT_MESH: u32 = 14;
    /// Passive sockets not inserted because, in the "mesh" scope, they are no Istio leg.
    pub const SKIP_NOT_MESH: u32 = 15;
    /// A redirecting socket moved to TCP for a while because its peer had more than
    /// `Config::queue_limit` bytes unread (the kernel does not bound an sk_msg ingress queue:
    /// without this a stalled reader lets its sender fill the host's TCP memory).
    pub const HOLD_QUEUE: u32 = 16;
    /// A held socket went back to redirecting: everything it sent over TCP had been read.
    pub const RESUMED: u32 = 17;
    /// Sockets not inserted because their service was seen streaming small writes lately
    /// (`Config::small_write_secs`): on plain TCP such a stream moves more bytes.
    pub const SKIP_SMALL_WRITES: u32 = 18;
    /// A redirecting socket found its service to be a small-write stream (and remembered it).
    pub const LEARNED_SMALL_WRITES: u32 = 19;
    /// An app's connecting socket not inserted because its file was blocking at ESTABLISHED: a
    /// blocking read of a socket in a sockmap is not TCP's (kernel hazard 4), so the app's own
    /// reads must never go through the sockmap's receive path.
    pub const SKIP_APP_BLOCKING: u32 = 20;
    /// An app's accepted socket (or its sidecar's passthrough socket to it) not inserted: at
    /// ESTABLISHED it is not even accepted, and its listener was not non-blocking when it
    /// started listening (a blocking accept loop hands its sockets to blocking readers).
    pub const SKIP_APP_UNACCEPTED: u32 = 21;
    /// A socket went TCP for life because its peer is an app's socket: how an app reads (splice,
    /// blocking, `SO_RCVLOWAT`) can hide redirected bytes from it, so nothing is redirected into
    /// one unless its workload trusts its apps.
    pub const FALLBACK_APP_RECEIVER: u32 = 22;
    /// An app's socket made blocking between connect and its first message: TCP for life, and
    /// it leaves the sockhash.
    pub const FALLBACK_APP_BLOCKING: u32 = 23;
    /// Sockets that left the sockhash before their close(), back on TCP's own paths: an app's
    /// socket gone TCP for life, an active socket with no peer on this node, or a socket that
    /// reached TCP_CLOSE with nothing unread.
    pub const LEFT: u32 = 24;
    /// Passive sockets not inserted because no socket of this node in the sockhash is their
    /// client (it is on another node, or was kept out): they could never pair.
    pub const SKIP_NO_LOCAL_PEER: u32 = 25;
    /// An active socket found no passive socket of this node paired with it (its server is on
    /// another node, or was kept out): TCP for life, and it leaves the sockhash.
    pub const FALLBACK_NO_LOCAL_PEER: u32 = 26;
    /// Sockets not inserted because they were reconnected (`connect(AF_UNSPEC)`, then
    /// `connect`): a redirect decided for the old connection could land in the new one.
    pub const SKIP_RECONNECTED: u32 = 27;
    pub const COUNT: u32 = 28;

    /// Names used by `status` and `/metrics`, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "inserted",
        "insert_collision",
        "insert_failed",
        "redirect_msgs",
        "redirect_bytes",
        "fallback_no_peer",
        "fallback_disabled",
        "fallback_redirect_failed",
        "tcp_msgs",
        "tcp_bytes",
        "skip_excluded_port",
        "skip_early_data",
        "fallback_no_state",
        "closed",
        "fallback_not_mesh",
        "skip_not_mesh",
        "hold_queue",
        "resumed",
        "skip_small_writes",
        "learned_small_writes",
        "skip_app_blocking",
        "skip_app_unaccepted",
        "fallback_app_receiver",
        "fallback_app_blocking",
        "left",
        "skip_no_local_peer",
        "fallback_no_local_peer",
        "skip_reconnected",
    ];
}

/// Role of a socket in its connection.
pub const ROLE_CLIENT: u32 = 0;
pub const ROLE_SERVER: u32 = 1;

/// `SockState::state` values.
pub const STATE_UNDECIDED: u32 = 0;
pub const STATE_REDIRECT: u32 = 1;
pub const STATE_TCP: u32 = 2;
/// On TCP for now (the peer has too much unread); back to redirecting
/// once everything sent over TCP has been acknowledged and read, so no byte overtakes another.
pub const STATE_HELD: u32 = 3;

/// `MESHACCEL_LSTN` value bits: the listening socket's file was O_NONBLOCK when it started
/// listening (an event loop's accept loop: nginx, Go, asyncio, Netty, Node.js, Envoy).
pub const LISTENER_NONBLOCKING: u32 = 1;

/// `PortKey::direction` values.
pub const DIR_INBOUND: u8 = 0;
pub const DIR_OUTBOUND: u8 = 1;

/// `WorkloadPolicy::flags` bits.
pub const POLICY_ENABLED: u32 = 1;
/// The operator vouches that the workload's apps read their sockets only with non-blocking
/// `recv`/`read` (an event loop, no splice, no `SO_RCVLOWAT`): its app sockets are accelerated
/// like its sidecar's. Without it an app socket is inserted only when it is connecting and
/// non-blocking, and nothing is ever redirected into it (`SockState::app`).
pub const POLICY_TRUST_APPS: u32 = 2;

/// `Config::scope` values: which connections of enabled workloads are accelerated.
/// Only Istio's three legs (app ↔ its sidecar through the capture ports, sidecar ↔ sidecar, the
/// inbound passthrough): the default.
pub const SCOPE_MESH: u32 = 0;
/// Every TCP connection between sockets of enabled workloads on this node.
pub const SCOPE_ALL: u32 = 1;

/// The name of one TCP connection, the same on both of its sockets whatever NAT did to the
/// addresses: the client endpoint (the active side's local address) and both initial sequence
/// numbers as they stood at ESTABLISHED. Each socket is stored under its own role; a sender looks
/// up the other role. `netns_cookie` is 0 unless the client address is loopback, where it is the
/// netns of the connection (loopback tuples repeat across pods).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub netns_cookie: u64,
    /// IPv6 address, or IPv4 mapped as ::ffff:a.b.c.d; network order words.
    pub client_ip_be: [u32; 4],
    pub client_port: u32,
    /// The client's `snd_nxt` (= the server's `rcv_nxt`) at ESTABLISHED.
    pub client_seq: u32,
    /// The server's `snd_nxt` (= the client's `rcv_nxt`) at ESTABLISHED.
    pub server_seq: u32,
    pub role: u32,
}
const _: () = assert!(size_of::<PairKey>() == 40);

impl PairKey {
    /// The key the other socket of this connection is stored under.
    pub const fn peer(&self) -> Self {
        let mut peer = *self;
        peer.role = if self.role == ROLE_CLIENT {
            ROLE_SERVER
        } else {
            ROLE_CLIENT
        };
        peer
    }
}

/// Per-socket state, created when the socket enters the sockhash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The key this socket is stored under.
    pub own: PairKey,
    /// The netns this socket lives in (its workload).
    pub netns_cookie: u64,
    /// The peer's netns, learned at the first message.
    pub peer_netns_cookie: u64,
    /// The peer socket's kernel address (`PeerInfo::sk_addr`), learned at the first message.
    pub peer_sk: u64,
    /// `STATE_*`.
    pub state: u32,
    /// `Config::epoch` when the redirect decision was last checked.
    pub epoch: u32,
    /// 1 when this socket is known at insert to be one of Istio's legs.
    pub leg: u32,
    /// Bytes redirected since the peer's queue was last looked at.
    pub unchecked: u32,
    /// The service this connection belongs to, the key under which a small-write stream is
    /// remembered: the client's destination port in the client's netns (`DIR_OUTBOUND`) — for
    /// the sidecar's socket of a captured connection, that of the app's socket it pairs with —
    /// or, when no local client is known, the server's own port (`DIR_INBOUND`). Port 0: none
    /// (a capture port names no service).
    pub service: PortKey,
    /// Small messages redirected in a row (none of `tuning::SMALL_WRITE_BYTES` or more between).
    pub small_run: u32,
    /// Looks at the peer in a row, one per `tuning::SMALL_RUN` small messages, that found it
    /// with bytes unread (the reader falls behind a stream of small writes).
    pub small_behind: u32,
    /// 1: an app's socket (not the sidecar's) in a workload that does not trust its apps;
    /// nothing is redirected into it.
    pub app: u8,
    /// `LEAVE_*`: where the socket is in leaving the sockhash.
    pub leave: u8,
    /// `PAIR_*`: whether a socket of this node is its peer in the sockhash.
    pub paired: u8,
    /// 1: meshaccel turned on this socket's keepalive (it had none): turned off when it leaves.
    pub own_keepalive: u8,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SockState>() == 112);

/// `SockState::leave` values. A socket leaves the sockhash only when nothing can have been
/// redirected into it (an app's socket; an active socket no socket of this node paired with):
/// leaving frees its sk_msg state, and anything queued in it would be lost (kernel hazard 2).
pub const LEAVE_NO: u8 = 0;
/// TCP for life: it leaves at its next sock_ops callback (the next segment it receives).
pub const LEAVE_PENDING: u8 = 1;
/// It has left.
pub const LEAVE_DONE: u8 = 2;

/// `SockState::paired` values.
/// An active socket that has not yet looked whether a passive socket of this node paired with it.
pub const PAIR_UNKNOWN: u8 = 0;
/// A passive socket (inserted only when its client is in the sockhash), or an active one that
/// found its server paired.
pub const PAIR_YES: u8 = 1;
/// An active socket whose server is not on this node (or was kept out): it can never pair.
pub const PAIR_NONE: u8 = 2;

/// Who owns the socket stored under a `PairKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub netns_cookie: u64,
    /// The socket's kernel address: its peer reads how much it has unread from there
    /// (`bpf_probe_read_kernel`, which never faults; the redirect itself still goes through the
    /// sockhash, so a stale address can only cost a wrong hold decision, never a wrong byte).
    pub sk_addr: u64,
    /// `PEER_*` bits (64 bits: the programs set some with an atomic or, which the eBPF target
    /// has for 64-bit words only).
    pub flags: u64,
    /// 1 when this socket is known at insert to be one of Istio's legs (see `Config`).
    pub leg: u16,
    /// An active socket's destination port (its service, see `SockState::service`); 0 for a
    /// passive socket.
    pub service_port: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PeerInfo>() == 32);

/// `PeerInfo::flags`: the socket stayed out of the sockhash because its service streams small
/// writes; its peer stays out too.
pub const PEER_SMALL_WRITES: u64 = 1;
/// `PeerInfo::flags`: an app's socket (`SockState::app`): its peer never redirects into it.
pub const PEER_APP: u64 = 2;
/// `PeerInfo::flags`: a socket that left the sockhash (`LEAVE_DONE`).
pub const PEER_LEFT: u64 = 4;
/// `PeerInfo::flags` of an active socket: a passive socket of this node entered the sockhash
/// as its peer (set by that socket at its insert).
pub const PEER_PAIRED: u64 = 8;
/// `PeerInfo::flags` of an active socket: it found no peer paired and leaves the sockhash; a
/// passive socket arriving later must not pair with it. Both bits are set with an atomic or
/// that returns the old flags, so exactly one of the two sockets wins.
pub const PEER_UNPAIRED: u64 = 16;

/// Per-workload traffic counters (PERCPU_HASH value, summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    pub redirect_msgs: u64,
    pub redirect_bytes: u64,
    pub tcp_msgs: u64,
    pub tcp_bytes: u64,
}
const _: () = assert!(size_of::<WorkloadStats>() == 32);

/// Acceleration policy of one workload (a pod: one netns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadPolicy {
    /// `POLICY_*` bits.
    pub flags: u32,
    /// Index of the workload in user space's list, for status (not used by the kernel).
    pub workload_id: u32,
}
const _: () = assert!(size_of::<WorkloadPolicy>() == 8);

/// A port a workload excludes from acceleration, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    /// `DIR_*`.
    pub direction: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<PortKey>() == 16);

impl PortKey {
    pub const fn new(netns_cookie: u64, port: u16, direction: u8) -> Self {
        Self {
            netns_cookie,
            port,
            direction,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Global configuration (ARRAY index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// 1 = acceleration on; 0 = every sender falls back to TCP for life at its next message.
    pub enabled: u32,
    /// Bumped by user space whenever something that redirects may have to stop (a workload
    /// disabled or removed, the switch turned off, the scope narrowed, the capture changed).
    /// Senders re-check their decision when it moves.
    pub epoch: u32,
    /// `SCOPE_*`.
    pub scope: u32,
    /// Istio's capture ports (host order): `virtualOutbound` and `virtualInbound`. A passive
    /// socket on one of them is a leg (app → sidecar, sidecar → sidecar).
    pub outbound_port: u32,
    pub inbound_port: u32,
    /// Istio's inbound passthrough source addresses (the sidecar → app leg), network order;
    /// 0 / all-zero when unknown.
    pub passthrough_v4_be: u32,
    pub passthrough_v6_be: [u32; 4],
    /// Bytes a peer may have unread before its sender moves to TCP (`STATE_HELD`); 0: no limit.
    pub queue_limit: u32,
    /// TCP keepalive idle time (seconds) given to accelerated sockets that have no keepalive of
    /// their own; 0: none. A RST that arrives while the receiving socket is busy and holds more
    /// than its backlog limit unread (sk_msg ingress counts there) is dropped by the kernel and
    /// never retransmitted; the keepalive probe then draws a fresh RST from the peer's stack.
    pub keepalive_secs: u32,
    /// How long (seconds) a service whose connection streamed small writes while its reader
    /// fell behind keeps new connections on plain TCP (the kernel's redirect costs more per
    /// message than TCP, which coalesces small writes); 0: never.
    pub small_write_secs: u32,
    /// The sidecar's UID (Istio's `proxyUid`): a socket created by any other UID is an app's.
    pub proxy_uid: u32,
}
const _: () = assert!(size_of::<Config>() == 56);

/// Defaults of the tunables in `Config`.
pub mod tuning {
    /// 4 MiB: what a TCP receive buffer holds at most by default (tcp_rmem max 6 MiB).
    pub const QUEUE_LIMIT: u32 = 4 << 20;
    /// A socket looks at its peer's queue at least every this many redirected bytes.
    pub const CHECK_BYTES: u32 = 64 << 10;
    /// Keepalive idle time of accelerated sockets without their own (`Config::keepalive_secs`).
    pub const KEEPALIVE_SECS: u32 = 60;
    /// Probes 1/6 of the idle time apart (at least 1 s), this many before the kernel gives up.
    pub const KEEPALIVE_PROBES: u32 = 4;
    /// A message under this many bytes is small (the benches' sweep: 1 KiB writes gain when
    /// accelerated, 256 B ones lose).
    pub const SMALL_WRITE_BYTES: u64 = 1024;
    /// Every this many small messages in a row, a sender looks at its peer's unread bytes ...
    pub const SMALL_RUN: u32 = 64;
    /// ... and this many looks in a row with bytes unread make its service a small-write stream.
    pub const SMALL_BEHIND: u32 = 4;
    /// `Config::small_write_secs` default.
    pub const SMALL_WRITE_SECS: u32 = 600;
}

/// IPv4 (network order u32) as an IPv4-mapped IPv6 address in network-order words.
#[inline(always)]
pub const fn v4_mapped(ip_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip_be]
}

/// Loopback: 127.0.0.0/8 (mapped) or ::1.
#[inline(always)]
pub const fn is_loopback(ip_be: &[u32; 4]) -> bool {
    if ip_be[0] == 0 && ip_be[1] == 0 && ip_be[2] == u32::from_be(0x0000_ffff) {
        return ip_be[3].to_ne_bytes()[0] == 127;
    }
    ip_be[0] == 0 && ip_be[1] == 0 && ip_be[2] == 0 && ip_be[3] == u32::from_be(1)
}

/// A port as the kernel hands it in `remote_port`: network order, in the low 16 bits (sk_msg) or
/// shifted into the high 16 bits (sock_ops). Returns host order.
#[inline(always)]
pub const fn port_from_be_field(field: u32) -> u32 {
    let be = if field > 0xffff { field >> 16 } else { field };
    u16::from_be(be as u16) as u32
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for PeerInfo {}
    unsafe impl aya::Pod for WorkloadPolicy {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for WorkloadStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_flips_role_only() {
        let k = PairKey {
            netns_cookie: 7,
            client_ip_be: v4_mapped(1),
            client_port: 5,
            client_seq: 9,
            server_seq: 11,
            role: ROLE_CLIENT,
        };
        assert_eq!(k.peer().role, ROLE_SERVER);
        assert_eq!(k.peer().peer(), k);
        assert_ne!(k.peer(), k);
    }

    #[test]
    fn loopback_detection() {
        let lo = u32::from_ne_bytes([127, 0, 0, 6]);
        assert!(is_loopback(&v4_mapped(lo)));
        let pod = u32::from_ne_bytes([10, 77, 0, 2]);
        assert!(!is_loopback(&v4_mapped(pod)));
        assert!(is_loopback(&[0, 0, 0, u32::from_be(1)]));
        assert!(!is_loopback(&[0, 0, 0, u32::from_be(2)]));
    }

    #[test]
    fn ports_in_both_layouts() {
        let be = u16::to_be(15001) as u32;
        assert_eq!(port_from_be_field(be), 15001);
        assert_eq!(port_from_be_field(be << 16), 15001);
    }

    #[test]
    fn counter_names_cover_every_counter() {
        assert_eq!(counter::NAMES.len(), counter::COUNT as usize);
        assert_eq!(counter::NAMES[counter::CLOSED as usize], "closed");
    }
}
