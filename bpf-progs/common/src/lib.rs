//! Types shared by the meshaccel eBPF programs (kernel side) and the agent (user side).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has explicit padding and carries its byte
//! order in field names. No bool/Option/enum crosses the kernel boundary.
#![no_std]

use core::mem::size_of;

pub mod decide;

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
    /// SK_STORAGE: `PEND_*` (u32) for an app's socket waiting outside the sockhash for its first
    /// write (see `SockState::late`), read by the adopting tc program.
    pub const PENDING: &str = "MESHACCEL_PEND";
    /// All maps, in the order the agent pins them.
    pub const ALL: [&str; 11] = [
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
        PENDING,
    ];

    /// Program names (function names in the eBPF crate).
    pub const PROG_SOCK_OPS: &str = "meshaccel_ops";
    pub const PROG_SK_MSG: &str = "meshaccel_msg";
    /// The adopting tc program (egress of `lo` in each workload's netns).
    pub const PROG_ADOPT: &str = "meshaccel_adopt";
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
    /// socket gone TCP for life, the sidecar's socket of an app's socket that went TCP for life
    /// before it ever redirected, an active socket with no peer on this node, or a socket that
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
    /// An app's socket kept out of the sockhash at ESTABLISHED (`SockState::late`): only its
    /// first write shows whether it reads as an event loop does.
    pub const DEFERRED_APP: u32 = 28;
    /// An app's socket adopted into the sockhash after its first write, by the agent's iterator:
    /// its file was non-blocking and watched by an epoll instance then.
    pub const ADOPTED_APP: u32 = 29;
    /// An app's socket left on TCP for life at its first write: non-blocking, but watched by no
    /// epoll instance (a poll loop, or a runtime's socket timeout, which may turn blocking).
    pub const SKIP_APP_NO_EPOLL: u32 = 30;
    pub const COUNT: u32 = 31;

    /// How operators see a counter: `status` by its name, `/metrics` by its family.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Metric {
        /// A family of its own.
        Own {
            family: &'static str,
            help: &'static str,
        },
        /// One value of the `reason` label of a family several counters share (its help:
        /// [`family_help`]).
        Reason {
            family: &'static str,
            reason: &'static str,
        },
    }

    /// One counter: its name (`status`, and the reason is its name's last part) and metric.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Counter {
        pub name: &'static str,
        pub metric: Metric,
    }

    pub const FALLBACKS: &str = "meshaccel_fallbacks";
    pub const SKIPPED: &str = "meshaccel_skipped_sockets";
    pub const INSERT_FAILURES: &str = "meshaccel_sockhash_insert_failures";
    pub const HOLDS: &str = "meshaccel_holds";

    const fn own(name: &'static str, family: &'static str, help: &'static str) -> Counter {
        Counter {
            name,
            metric: Metric::Own { family, help },
        }
    }

    const fn reason(name: &'static str, family: &'static str, reason: &'static str) -> Counter {
        Counter {
            name,
            metric: Metric::Reason { family, reason },
        }
    }

    /// Every counter, indexed like the constants above (the one table `status`, `/metrics`
    /// and the tests read).
    pub const TABLE: [Counter; COUNT as usize] = [
        own(
            "inserted",
            "meshaccel_sockhash_inserts",
            "Sockets inserted into the sockhash",
        ),
        reason("insert_collision", INSERT_FAILURES, "collision"),
        reason("insert_failed", INSERT_FAILURES, "failed"),
        own(
            "redirect_msgs",
            "meshaccel_redirected_messages",
            "Messages (sendmsg/sendfile calls) redirected into the peer socket, bypassing TCP/IP",
        ),
        own(
            "redirect_bytes",
            "meshaccel_redirected_bytes",
            "Bytes redirected into the peer socket, bypassing TCP/IP",
        ),
        reason("fallback_no_peer", FALLBACKS, "no_peer"),
        reason("fallback_disabled", FALLBACKS, "disabled"),
        reason("fallback_redirect_failed", FALLBACKS, "redirect_failed"),
        own(
            "tcp_msgs",
            "meshaccel_tcp_messages",
            "Messages that sockets in the sockhash sent over plain TCP",
        ),
        own(
            "tcp_bytes",
            "meshaccel_tcp_bytes",
            "Bytes that sockets in the sockhash sent over plain TCP",
        ),
        reason("skip_excluded_port", SKIPPED, "excluded_port"),
        reason("skip_early_data", SKIPPED, "early_data"),
        reason("fallback_no_state", FALLBACKS, "no_state"),
        own(
            "closed",
            "meshaccel_sockets_closed",
            "Sockets of the sockhash that closed",
        ),
        reason("fallback_not_mesh", FALLBACKS, "not_mesh"),
        reason("skip_not_mesh", SKIPPED, "not_mesh"),
        reason("hold_queue", HOLDS, "queue"),
        own(
            "resumed",
            "meshaccel_resumes",
            "Times a held socket went back to redirecting (everything it sent over TCP had been read)",
        ),
        reason("skip_small_writes", SKIPPED, "small_writes"),
        own(
            "learned_small_writes",
            "meshaccel_small_write_streams",
            "Times a redirecting connection streamed small writes faster than its reader read them; its service's next connections stay on TCP for --small-write-secs",
        ),
        reason("skip_app_blocking", SKIPPED, "app_blocking"),
        reason("skip_app_unaccepted", SKIPPED, "app_unaccepted"),
        reason("fallback_app_receiver", FALLBACKS, "app_receiver"),
        reason("fallback_app_blocking", FALLBACKS, "app_blocking"),
        own(
            "left",
            "meshaccel_sockhash_leaves",
            "Sockets that left the sockhash before their close(), back on TCP's own paths (an app's socket gone TCP for life or blocking, and its sidecar's socket when it never redirected; an active socket whose server is not on this node; a socket at TCP_CLOSE with nothing unread)",
        ),
        reason("skip_no_local_peer", SKIPPED, "no_local_peer"),
        reason("fallback_no_local_peer", FALLBACKS, "no_local_peer"),
        reason("skip_reconnected", SKIPPED, "reconnected"),
        own(
            "deferred_app",
            "meshaccel_app_sockets_deferred",
            "App sockets kept out of the sockhash at ESTABLISHED until their first write shows how they read",
        ),
        own(
            "adopted_app",
            "meshaccel_app_sockets_adopted",
            "App sockets inserted into the sockhash at their first write (non-blocking and watched by epoll: an event loop's)",
        ),
        reason("skip_app_no_epoll", SKIPPED, "app_no_epoll"),
    ];

    /// The help of a family several counters share: what each of its reasons means.
    pub const fn family_help(family: &str) -> &'static str {
        match family.as_bytes() {
            b"meshaccel_fallbacks" => {
                "Sockets that went to plain TCP for life, by reason (no_peer: the peer was not in the sockhash at the first message; disabled: a workload or the global switch was off; redirect_failed: the peer had gone; no_state: the state map was full; not_mesh: not one of Istio's legs; app_receiver: the peer is an app's socket, which nothing is redirected into unless its workload trusts its apps; app_blocking: an app's socket was (or turned) blocking at its first write; no_local_peer: an active socket whose server is not on this node)"
            }
            b"meshaccel_skipped_sockets" => {
                "Sockets of enabled workloads never inserted into the sockhash, by reason (excluded_port; early_data: TCP Fast Open; not_mesh; small_writes: a service seen streaming small writes; app_blocking: an app's connecting socket was blocking; app_unaccepted: an app's accepted socket whose listener was not non-blocking, or its sidecar's passthrough socket to it; no_local_peer: a passive socket whose client is not on this node; reconnected: a socket connected again after connect(AF_UNSPEC); app_no_epoll: an app's socket non-blocking at its first write but watched by no epoll, a poll loop or a runtime's socket timeout)"
            }
            b"meshaccel_sockhash_insert_failures" => {
                "Sockhash inserts refused, by reason (collision: the key existed; failed: e.g. the map is full); those sockets stay on TCP"
            }
            b"meshaccel_holds" => {
                "Times a redirecting socket moved to TCP until its reader caught up, by reason (queue: the peer had more than --max-unread-bytes unread)"
            }
            _ => "",
        }
    }

    /// Names used by `status` and `/metrics`, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = {
        let mut names = [""; COUNT as usize];
        let mut i = 0;
        while i < names.len() {
            names[i] = TABLE[i].name;
            i += 1;
        }
        names
    };
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
    /// `LATE_*`: an app's socket that enters the sockhash after its first write, or never.
    pub late: u8,
    pub _pad: [u8; 3],
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

/// `SockState::late` values. An app's socket of a workload that does not trust its apps enters
/// the sockhash only once it has shown, at its first write, that it reads as an event loop does
/// (non-blocking, watched by epoll): a blocking read started while a socket is in a sockmap
/// cannot be made TCP's again (kernel hazard 4), and before its first write nothing tells how
/// the app will read. Only sock_ops can insert at ESTABLISHED; later a tc program on the
/// workload's `lo` does, as the first write leaves.
/// Inserted at ESTABLISHED (the sidecar's sockets, trusted apps).
pub const LATE_NO: u8 = 0;
/// Out of the sockhash, waiting for its first write.
pub const LATE_WAITING: u8 = 1;
/// Adopted: what it wrote over TCP first is read before anything is redirected (held); its
/// keepalive is set at its next sock_ops callback.
pub const LATE_ADOPTED: u8 = 2;
/// Adopted, keepalive settled.
pub const LATE_KEPT: u8 = 3;

/// `MESHACCEL_PEND` values: waiting for the first write; ready to be adopted.
pub const PEND_WAITING: u32 = 0;
pub const PEND_READY: u32 = 1;

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
/// `PeerInfo::flags` of an app's socket waiting outside the sockhash for its first write
/// (`LATE_WAITING`); cleared when it is adopted.
pub const PEER_DEFERRED: u64 = 32;

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
    fn the_counter_table_is_indexed_like_the_constants() {
        use counter::*;
        for (idx, name) in [
            (INSERTED, "inserted"),
            (REDIRECT_BYTES, "redirect_bytes"),
            (CLOSED, "closed"),
            (HOLD_QUEUE, "hold_queue"),
            (FALLBACK_APP_BLOCKING, "fallback_app_blocking"),
            (SKIP_RECONNECTED, "skip_reconnected"),
            (SKIP_APP_NO_EPOLL, "skip_app_no_epoll"),
        ] {
            assert_eq!(NAMES[idx as usize], name);
        }
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COUNT as usize, "counter names are unique");
    }

    /// A shared family's counters are named `<its prefix><reason>`, and its help explains every
    /// reason: the table cannot drift from what operators read.
    #[test]
    fn every_reason_is_named_and_explained() {
        use counter::*;
        for c in TABLE {
            match c.metric {
                Metric::Reason { family, reason } => {
                    assert!(c.name.ends_with(reason), "{c:?}");
                    let help = family_help(family);
                    assert!(!help.is_empty(), "{family} has no help");
                    assert!(help.contains(reason), "{family}'s help lacks {reason}");
                }
                Metric::Own { family, help } => {
                    assert!(
                        family.starts_with("meshaccel_") && !help.is_empty(),
                        "{c:?}"
                    );
                }
            }
        }
    }
}

/// The layout identity of everything meshaccel keeps in pinned maps, so that an agent adopting
/// pinned maps can tell whether it reads them as their writer wrote them.
///
/// Map type and key/value sizes alone do not tell: two `Config` fields swapped keep the size,
/// and the new agent would read the old agent's `epoch` as its `scope`. So every type a pinned
/// map holds is described here field by field (name, type, offset, size: `offset_of!`,
/// `size_of`), checked at compile time to cover its type exactly, and hashed (FNV-1a, 64 bits)
/// into [`HASH`]. Any change of a field — added, removed, renamed, retyped, moved — either stops
/// the build here (the listing no longer matches the type) or changes the hash; nobody has to
/// remember to bump a number. The agent stores the hash in the `MESHACCEL_META` map at install
/// and refuses pinned maps that carry another one.
///
/// [`FORMAT`] covers what no layout shows: bump it when the meaning of a stored value changes
/// while its layout stays (a flag bit, a state value, a counter index reused).
pub mod layout {
    use super::names;
    use super::{Config, PairKey, PeerInfo, PortKey, SockState, WorkloadPolicy, WorkloadStats};
    use core::mem::{align_of, offset_of, size_of};

    /// Name of the ARRAY[1] map holding a [`Meta`]: created and pinned by the agent (user space)
    /// next to the programs' maps; no program reads it.
    pub const META: &str = "MESHACCEL_META";

    /// Bumped by hand when a stored value's meaning changes without a layout change.
    pub const FORMAT: u32 = 1;

    /// The value of the `MESHACCEL_META` map. Its own layout never changes (a different value
    /// size is refused like a different hash).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Meta {
        /// [`FORMAT`] of the agent that created the maps.
        pub format: u32,
        pub _pad: u32,
        /// [`HASH`] of the agent that created the maps.
        pub layout: u64,
    }
    const _: () = assert!(size_of::<Meta>() == 16);

    impl Meta {
        /// This build's stamp.
        pub const fn current() -> Self {
            Self {
                format: FORMAT,
                _pad: 0,
                layout: HASH,
            }
        }
    }

    /// One field of a type: what the descriptor (and so the hash) is made of.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Field {
        pub name: &'static str,
        /// The field's type as written in its struct.
        pub ty: &'static str,
        pub offset: usize,
        pub size: usize,
    }

    /// One type kept in a pinned map.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Type {
        pub name: &'static str,
        pub size: usize,
        pub align: usize,
        pub fields: &'static [Field],
    }

    /// One pinned map: what its keys and values are.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapLayout {
        pub name: &'static str,
        /// The kernel's map type, as in linux/bpf.h without `BPF_MAP_TYPE_`.
        pub kind: &'static str,
        pub key: &'static str,
        pub key_size: usize,
        pub value: &'static str,
        pub value_size: usize,
    }

    /// Whether `fields` cover a type of `size` bytes exactly: in declaration order, each one
    /// starting where the previous ended (the shared types carry explicit padding, so a gap
    /// means a field missing from the listing, an overlap or a wrong order a listing that does
    /// not match the type).
    pub const fn tiles(fields: &[Field], size: usize) -> bool {
        let mut at = 0;
        let mut i = 0;
        while i < fields.len() {
            if fields[i].offset != at {
                return false;
            }
            at += fields[i].size;
            i += 1;
        }
        at == size
    }

    /// Describes a `#[repr(C)]` struct from its fields as written: a field that does not exist
    /// or has another type stops the build (the fn pointer below does not type-check), and so
    /// does a listing that does not cover the struct ([`tiles`]).
    macro_rules! describe {
        ($t:ident { $($f:ident : $ft:ty),* $(,)? }) => {{
            const FIELDS: &[Field] = &[$({
                const _: fn(&$t) -> &$ft = |s| &s.$f;
                Field {
                    name: stringify!($f),
                    ty: stringify!($ft),
                    offset: offset_of!($t, $f),
                    size: size_of::<$ft>(),
                }
            }),*];
            const _: () = assert!(
                tiles(FIELDS, size_of::<$t>()),
                concat!(
                    "layout::TYPES does not list every field of ",
                    stringify!($t),
                    " in order: update the listing (the layout hash changes with it)"
                )
            );
            Type {
                name: stringify!($t),
                size: size_of::<$t>(),
                align: align_of::<$t>(),
                fields: FIELDS,
            }
        }};
    }

    macro_rules! map {
        ($name:expr, $kind:literal, $k:ty => $v:ty) => {
            MapLayout {
                name: $name,
                kind: $kind,
                key: stringify!($k),
                key_size: size_of::<$k>(),
                value: stringify!($v),
                value_size: size_of::<$v>(),
            }
        };
    }

    /// Every type a pinned map holds, field by field.
    pub const TYPES: &[Type] = &[
        describe!(PairKey {
            netns_cookie: u64,
            client_ip_be: [u32; 4],
            client_port: u32,
            client_seq: u32,
            server_seq: u32,
            role: u32,
        }),
        describe!(PortKey {
            netns_cookie: u64,
            port: u16,
            direction: u8,
            _pad0: u8,
            _pad1: u32,
        }),
        describe!(PeerInfo {
            netns_cookie: u64,
            sk_addr: u64,
            flags: u64,
            leg: u16,
            service_port: u16,
            _pad: u32,
        }),
        describe!(SockState {
            own: PairKey,
            netns_cookie: u64,
            peer_netns_cookie: u64,
            peer_sk: u64,
            state: u32,
            epoch: u32,
            leg: u32,
            unchecked: u32,
            service: PortKey,
            small_run: u32,
            small_behind: u32,
            app: u8,
            leave: u8,
            paired: u8,
            own_keepalive: u8,
            late: u8,
            _pad: [u8; 3],
        }),
        describe!(WorkloadPolicy {
            flags: u32,
            workload_id: u32,
        }),
        describe!(Config {
            enabled: u32,
            epoch: u32,
            scope: u32,
            outbound_port: u32,
            inbound_port: u32,
            passthrough_v4_be: u32,
            passthrough_v6_be: [u32; 4],
            queue_limit: u32,
            keepalive_secs: u32,
            small_write_secs: u32,
            proxy_uid: u32,
        }),
        describe!(WorkloadStats {
            redirect_msgs: u64,
            redirect_bytes: u64,
            tcp_msgs: u64,
            tcp_bytes: u64,
        }),
    ];

    /// Every map the programs pin, with what it holds (the sockhash's value is the socket, a
    /// u32 fd from user space; SK_STORAGE's key is a socket fd, a u32 too). A unit test of the
    /// agent holds the sizes it checks pinned maps against to this table.
    pub const MAPS: &[MapLayout] = &[
        map!(names::SOCKS, "SOCKHASH", PairKey => u32),
        map!(names::PEERS, "HASH", PairKey => PeerInfo),
        map!(names::STATE, "SK_STORAGE", u32 => SockState),
        map!(names::WORKLOADS, "HASH", u64 => WorkloadPolicy),
        map!(names::PORTS, "HASH", PortKey => u32),
        map!(names::CONFIG, "ARRAY", u32 => Config),
        map!(names::STATS, "PERCPU_ARRAY", u32 => u64),
        map!(names::WL_STATS, "PERCPU_HASH", u64 => WorkloadStats),
        map!(names::SMALL_WRITES, "LRU_HASH", PortKey => u64),
        map!(names::LISTENERS, "LRU_HASH", PortKey => u32),
        map!(names::PENDING, "SK_STORAGE", u32 => u32),
    ];

    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

    const fn mix_bytes(mut h: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(FNV_PRIME);
            i += 1;
        }
        h
    }

    /// A string and a terminator, so that ("ab", "c") and ("a", "bc") differ.
    const fn mix_str(h: u64, s: &str) -> u64 {
        mix_bytes(mix_bytes(h, s.as_bytes()), &[0xff])
    }

    const fn mix_num(h: u64, n: usize) -> u64 {
        mix_bytes(h, &(n as u64).to_le_bytes())
    }

    /// FNV-1a over a descriptor: every type (name, size, alignment, each field's name, type,
    /// offset and size), then every map (name, kind, key and value type and size).
    pub const fn hash_of(types: &[Type], maps: &[MapLayout]) -> u64 {
        let mut h = FNV_OFFSET;
        let mut t = 0;
        while t < types.len() {
            let ty = &types[t];
            h = mix_str(h, ty.name);
            h = mix_num(h, ty.size);
            h = mix_num(h, ty.align);
            let mut f = 0;
            while f < ty.fields.len() {
                let fl = &ty.fields[f];
                h = mix_str(h, fl.name);
                h = mix_str(h, fl.ty);
                h = mix_num(h, fl.offset);
                h = mix_num(h, fl.size);
                f += 1;
            }
            t += 1;
        }
        let mut m = 0;
        while m < maps.len() {
            let map = &maps[m];
            h = mix_str(h, map.name);
            h = mix_str(h, map.kind);
            h = mix_str(h, map.key);
            h = mix_num(h, map.key_size);
            h = mix_str(h, map.value);
            h = mix_num(h, map.value_size);
            m += 1;
        }
        h
    }

    /// This build's layout identity.
    pub const HASH: u64 = hash_of(TYPES, MAPS);

    /// The descriptor as text, one line per type, field and map (what a reviewer reads when
    /// the pinned descriptor in the tests changes).
    #[cfg(any(test, feature = "user"))]
    pub struct Descriptor;

    #[cfg(any(test, feature = "user"))]
    impl core::fmt::Display for Descriptor {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            for t in TYPES {
                writeln!(f, "{} size {} align {}", t.name, t.size, t.align)?;
                for fl in t.fields {
                    writeln!(
                        f,
                        "  {:>3} {:>3} {}: {}",
                        fl.offset, fl.size, fl.name, fl.ty
                    )?;
                }
            }
            for m in MAPS {
                writeln!(
                    f,
                    "map {} {}: {} ({}) -> {} ({})",
                    m.name, m.kind, m.key, m.key_size, m.value, m.value_size
                )?;
            }
            write!(f, "format {FORMAT} hash {HASH:016x}")
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: repr(C), Copy, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for Meta {}

    #[cfg(test)]
    mod tests {
        extern crate std;
        use super::*;
        use std::{format, string::String, vec::Vec};

        /// The descriptor, pinned: a change to any shared type shows up here as a diff for the
        /// reviewer, with the new hash (an agent of this build refuses maps pinned by one of
        /// the old layout, and `meshaccel uninstall` is the way from one to the other).
        #[test]
        fn descriptor_is_pinned() {
            let text = format!("{Descriptor}");
            std::eprintln!("{text}");
            assert_eq!(
                text, PINNED,
                "the layout of a pinned map's type changed: if meant, replace PINNED with the text above (the hash moves with it)"
            );
        }

        // Checked against an independent FNV-1a of this text (Python) when it was written.
        const PINNED: &str = r"PairKey size 40 align 8
    0   8 netns_cookie: u64
    8  16 client_ip_be: [u32; 4]
   24   4 client_port: u32
   28   4 client_seq: u32
   32   4 server_seq: u32
   36   4 role: u32
PortKey size 16 align 8
    0   8 netns_cookie: u64
    8   2 port: u16
   10   1 direction: u8
   11   1 _pad0: u8
   12   4 _pad1: u32
PeerInfo size 32 align 8
    0   8 netns_cookie: u64
    8   8 sk_addr: u64
   16   8 flags: u64
   24   2 leg: u16
   26   2 service_port: u16
   28   4 _pad: u32
SockState size 112 align 8
    0  40 own: PairKey
   40   8 netns_cookie: u64
   48   8 peer_netns_cookie: u64
   56   8 peer_sk: u64
   64   4 state: u32
   68   4 epoch: u32
   72   4 leg: u32
   76   4 unchecked: u32
   80  16 service: PortKey
   96   4 small_run: u32
  100   4 small_behind: u32
  104   1 app: u8
  105   1 leave: u8
  106   1 paired: u8
  107   1 own_keepalive: u8
  108   1 late: u8
  109   3 _pad: [u8; 3]
WorkloadPolicy size 8 align 4
    0   4 flags: u32
    4   4 workload_id: u32
Config size 56 align 4
    0   4 enabled: u32
    4   4 epoch: u32
    8   4 scope: u32
   12   4 outbound_port: u32
   16   4 inbound_port: u32
   20   4 passthrough_v4_be: u32
   24  16 passthrough_v6_be: [u32; 4]
   40   4 queue_limit: u32
   44   4 keepalive_secs: u32
   48   4 small_write_secs: u32
   52   4 proxy_uid: u32
WorkloadStats size 32 align 8
    0   8 redirect_msgs: u64
    8   8 redirect_bytes: u64
   16   8 tcp_msgs: u64
   24   8 tcp_bytes: u64
map MESHACCEL_SOCKS SOCKHASH: PairKey (40) -> u32 (4)
map MESHACCEL_PEERS HASH: PairKey (40) -> PeerInfo (32)
map MESHACCEL_STATE SK_STORAGE: u32 (4) -> SockState (112)
map MESHACCEL_WL HASH: u64 (8) -> WorkloadPolicy (8)
map MESHACCEL_PORTS HASH: PortKey (16) -> u32 (4)
map MESHACCEL_CFG ARRAY: u32 (4) -> Config (56)
map MESHACCEL_STATS PERCPU_ARRAY: u32 (4) -> u64 (8)
map MESHACCEL_WLST PERCPU_HASH: u64 (8) -> WorkloadStats (32)
map MESHACCEL_SMALL LRU_HASH: PortKey (16) -> u64 (8)
map MESHACCEL_LSTN LRU_HASH: PortKey (16) -> u32 (4)
map MESHACCEL_PEND SK_STORAGE: u32 (4) -> u32 (4)
format 1 hash 68bde7f425c33b9e";

        fn hash_with(ty: &str, fields: &[Field]) -> u64 {
            let types: Vec<Type> = TYPES
                .iter()
                .map(|t| {
                    if t.name == ty {
                        Type {
                            fields: std::boxed::Box::leak(fields.to_vec().into_boxed_slice()),
                            ..*t
                        }
                    } else {
                        *t
                    }
                })
                .collect();
            hash_of(&types, MAPS)
        }

        fn fields_of(ty: &str) -> Vec<Field> {
            TYPES.iter().find(|t| t.name == ty).unwrap().fields.to_vec()
        }

        #[test]
        fn any_field_change_changes_the_hash() {
            assert_eq!(hash_with("Config", &fields_of("Config")), HASH);
            // Two fields of the same size swapped: the sizes (all the old check compared) stay.
            let mut swapped = fields_of("Config");
            let (a, b) = (swapped[1], swapped[2]);
            swapped[1] = Field {
                offset: a.offset,
                ..b
            };
            swapped[2] = Field {
                offset: b.offset,
                ..a
            };
            assert_ne!(
                hash_with("Config", &swapped),
                HASH,
                "epoch and scope swapped"
            );
            let mut renamed = fields_of("PeerInfo");
            renamed[2].name = "leg2";
            assert_ne!(hash_with("PeerInfo", &renamed), HASH, "a field renamed");
            let mut retyped = fields_of("PortKey");
            retyped[2].ty = "i8";
            assert_ne!(hash_with("PortKey", &retyped), HASH, "a field retyped");
            let mut maps: Vec<MapLayout> = MAPS.to_vec();
            maps[4].value = "i32";
            assert_ne!(hash_of(TYPES, &maps), HASH, "a map's value type");
        }

        #[test]
        fn a_listing_must_cover_its_type_exactly() {
            let f = |offset, size| Field {
                name: "x",
                ty: "u32",
                offset,
                size,
            };
            assert!(tiles(&[f(0, 4), f(4, 4)], 8));
            assert!(!tiles(&[f(0, 4)], 8), "a field missing at the end");
            assert!(
                !tiles(&[f(0, 4), f(8, 4)], 12),
                "a gap (a field missing between)"
            );
            assert!(!tiles(&[f(4, 4), f(0, 4)], 8), "out of order");
            assert!(!tiles(&[f(0, 8), f(4, 4)], 12), "an overlap");
            for t in TYPES {
                assert!(tiles(t.fields, t.size), "{}", t.name);
            }
        }

        #[test]
        fn every_pinned_map_is_described_once() {
            let described: Vec<&str> = MAPS.iter().map(|m| m.name).collect();
            assert_eq!(
                described,
                names::ALL,
                "layout::MAPS must list names::ALL, in order"
            );
            assert!(
                META.len() <= 15,
                "the kernel keeps 15 characters of a map name"
            );
            assert!(!names::ALL.contains(&META));
            let _: String = format!("{:016x}", Meta::current().layout);
        }
    }
}
