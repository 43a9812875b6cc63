//! What the kernel holds, read for `status`, `doctor` and metrics: counters, sockets, traffic
//! per workload, and meshaccel's programs and maps still alive after uninstall.
use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    maps::{Map, MapData, SockHash},
    programs::links::{FdLink, LinkInfo, PinnedLink},
};
use meshaccel_common::{PairKey, PeerInfo, counter, names};

use super::{Dataplane, map_err};
use crate::{
    error::Result,
    objects::{SOCK_OPS_LINK, pin_path},
};

/// A service (a destination port seen from a workload) whose connections stream small writes:
/// its new connections stay on TCP until `--small-write-secs` after it was last seen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SmallWriteService {
    /// The netns cookie of the workload the service is seen from.
    pub netns_cookie: u64,
    pub port: u16,
    /// `outbound` (a destination port) or `inbound` (a port of the workload itself).
    pub direction: &'static str,
    /// Seconds since a connection of it last showed a small-write stream.
    pub seen_secs_ago: u64,
}

/// Traffic of one workload (its netns), summed over CPUs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkloadTraffic {
    /// Sockets of this workload in the sockhash.
    pub sockets: usize,
    pub redirect_msgs: u64,
    pub redirect_bytes: u64,
    pub tcp_msgs: u64,
    pub tcp_bytes: u64,
}

/// One socket that meshaccel knows (a `PEERS` entry): the connection it belongs to, its role
/// and its workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SocketRow {
    /// The connection's client endpoint (the active side's local address), as `ip:port`.
    pub client: String,
    /// `client` (the active side) or `server`.
    pub role: &'static str,
    /// The netns cookie of the socket's workload.
    pub netns_cookie: u64,
    /// Known at insert to be one of Istio's legs.
    pub leg: bool,
}

/// What `status` reports about the kernel state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelStatus {
    pub bpffs: PathBuf,
    pub enabled: bool,
    pub epoch: u32,
    /// Bytes a receiving socket may hold unread before its sender is held on TCP (0: no limit;
    /// `--max-unread-bytes`, `auto` resolved).
    pub queue_limit_bytes: u32,
    /// Sockets in the sockhash (two per accelerated connection).
    pub sockets: usize,
    /// Sockets with meshaccel state, by the netns cookie of their workload.
    pub sockets_by_netns: BTreeMap<String, usize>,
    /// Per workload (netns cookie): sockets and bytes.
    pub workloads: BTreeMap<String, WorkloadTraffic>,
    pub workloads_enabled: usize,
    pub excluded_ports: usize,
    /// Services kept on TCP for streaming small writes (seen within `Config::small_write_secs`).
    pub small_write_services: Vec<SmallWriteService>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Kernel ids of meshaccel's maps, link and programs, so tests and operators can check that
    /// uninstall left nothing.
    pub map_ids: Vec<u32>,
    pub link_id: Option<u32>,
    pub prog_ids: Vec<u32>,
}

/// A `PEERS` entry of a socket in the sockhash (not one kept on TCP as a small-write service's,
/// whose entry only tells its peer to stay out too, nor an app's socket that left or was never
/// adopted).
fn in_sockhash(v: &PeerInfo) -> bool {
    use meshaccel_common::{PEER_DEFERRED, PEER_LEFT, PEER_SMALL_WRITES};
    v.flags & (PEER_SMALL_WRITES | PEER_LEFT | PEER_DEFERRED) == 0
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `ip:port` (`[ip]:port` for IPv6) of an address in `PairKey`'s form: network-order words,
/// IPv4 mapped as ::ffff:a.b.c.d.
fn endpoint(ip_be: [u32; 4], port: u32) -> String {
    let mut b = [0u8; 16];
    for (chunk, w) in b.chunks_exact_mut(4).zip(ip_be) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{v6}]:{port}"),
    }
}

/// meshaccel objects alive in the kernel: all of them by name, or only the given ids.
pub(super) fn leftovers(only: Option<&[u32]>) -> (Vec<u32>, Vec<u32>, usize) {
    let keep = |id: u32| only.is_none_or(|ids| ids.contains(&id));
    let progs: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| n == names::PROG_SOCK_OPS || n == names::PROG_SK_MSG)
        })
        .map(|p| p.id())
        .filter(|id| keep(*id))
        .collect();
    let mut maps = Vec::new();
    let mut sockets = 0;
    for m in aya::maps::loaded_maps().filter_map(|m| m.ok()) {
        let Some(name) = m.name_as_str() else {
            continue;
        };
        if !crate::layout_stamp::all_maps().any(|n| n == name) || !keep(m.id()) {
            continue;
        }
        maps.push(m.id());
        if name == names::SOCKS
            && let Ok(md) = MapData::from_id(m.id())
            && let Ok(h) = SockHash::<_, PairKey>::try_from(Map::SockHash(md))
        {
            sockets += h.keys().filter(|k| k.is_ok()).count();
        }
    }
    (progs, maps, sockets)
}

impl Dataplane {
    /// Services seen streaming small writes within `secs` (the entries still in force).
    pub fn small_write_services(&self, secs: u32) -> Vec<SmallWriteService> {
        let now = monotonic_ns();
        let mut out: Vec<SmallWriteService> = self
            .small_writes
            .iter()
            .filter_map(|kv| kv.ok())
            .map(|(k, at)| SmallWriteService {
                netns_cookie: k.netns_cookie,
                port: k.port,
                direction: if k.direction == meshaccel_common::DIR_OUTBOUND {
                    "outbound"
                } else {
                    "inbound"
                },
                seen_secs_ago: now.saturating_sub(at) / 1_000_000_000,
            })
            .filter(|s| s.seen_secs_ago < u64::from(secs))
            .collect();
        out.sort_by_key(|s| (s.netns_cookie, s.port, s.direction));
        out
    }

    /// Sum of each per-CPU counter, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(names::STATS, "read"))?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }

    /// Every socket in the `PEERS` map that is in the sockhash (until it closes).
    pub fn sockets(&self) -> Vec<SocketRow> {
        self.peers
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(_, v)| in_sockhash(v))
            .map(|(k, v)| SocketRow {
                client: endpoint(k.client_ip_be, k.client_port),
                role: if k.role == meshaccel_common::ROLE_CLIENT {
                    "client"
                } else {
                    "server"
                },
                netns_cookie: v.netns_cookie,
                leg: v.leg != 0,
            })
            .collect()
    }

    pub fn status(&self) -> Result<KernelStatus> {
        let cfg = self.config()?;
        let mut map_ids = Vec::new();
        for name in crate::layout_stamp::all_maps() {
            if let Ok(md) = MapData::from_pin(pin_path(&self.bpffs, name))
                && let Ok(info) = md.info()
            {
                map_ids.push(info.id());
            }
        }
        let link_id = PinnedLink::from_pin(self.bpffs.join(SOCK_OPS_LINK))
            .ok()
            .and_then(|l| FdLink::from(l).info().ok())
            .map(|i: LinkInfo| i.id());
        let prog_ids = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| {
                p.name_as_str()
                    .is_some_and(|n| n == names::PROG_SOCK_OPS || n == names::PROG_SK_MSG)
            })
            .filter(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.iter().any(|id| map_ids.contains(id)))
            })
            .map(|p| p.id())
            .collect();
        let mut sockets_by_netns = BTreeMap::new();
        for v in self
            .peers
            .iter()
            .filter_map(|kv| kv.ok())
            .map(|(_, v)| v)
            .filter(in_sockhash)
        {
            *sockets_by_netns
                .entry(v.netns_cookie.to_string())
                .or_insert(0) += 1;
        }
        let mut workloads: BTreeMap<String, WorkloadTraffic> = BTreeMap::new();
        for (netns, per_cpu) in self.wl_stats.iter().filter_map(|kv| kv.ok()) {
            let w = workloads.entry(netns.to_string()).or_default();
            for v in per_cpu.iter() {
                w.redirect_msgs += v.redirect_msgs;
                w.redirect_bytes += v.redirect_bytes;
                w.tcp_msgs += v.tcp_msgs;
                w.tcp_bytes += v.tcp_bytes;
            }
        }
        for (netns, n) in &sockets_by_netns {
            workloads.entry(netns.clone()).or_default().sockets = *n;
        }
        Ok(KernelStatus {
            bpffs: self.bpffs.clone(),
            sockets_by_netns,
            workloads,
            enabled: cfg.enabled != 0,
            epoch: cfg.epoch,
            queue_limit_bytes: cfg.queue_limit,
            sockets: self.socks.keys().filter(|k| k.is_ok()).count(),
            workloads_enabled: self.workloads.keys().filter(|k| k.is_ok()).count(),
            excluded_ports: self.ports.keys().filter(|k| k.is_ok()).count(),
            small_write_services: self.small_write_services(cfg.small_write_secs),
            counters: self.counters()?,
            map_ids,
            link_id,
            prog_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use meshaccel_common::{
        PEER_APP, PEER_DEFERRED, PEER_LEFT, PEER_PAIRED, PEER_SMALL_WRITES, PEER_UNPAIRED,
    };

    use super::*;

    fn peer(flags: u64) -> PeerInfo {
        PeerInfo {
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn a_socket_is_in_the_sockhash_unless_kept_on_tcp_left_or_deferred() {
        for flags in [
            0,
            PEER_APP,
            PEER_PAIRED,
            PEER_UNPAIRED,
            PEER_APP | PEER_PAIRED,
        ] {
            assert!(in_sockhash(&peer(flags)), "flags {flags:#x}");
        }
        for out in [PEER_SMALL_WRITES, PEER_LEFT, PEER_DEFERRED] {
            assert!(!in_sockhash(&peer(out)), "flags {out:#x}");
            assert!(
                !in_sockhash(&peer(out | PEER_APP | PEER_PAIRED)),
                "flags {out:#x}"
            );
        }
    }

    fn words(b: [u8; 16]) -> [u32; 4] {
        let mut w = [0; 4];
        for (w, c) in w.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_ne_bytes(c.try_into().unwrap());
        }
        w
    }

    #[test]
    fn a_mapped_ipv4_client_reads_as_ipv4_and_ipv6_in_brackets() {
        let v4 = std::net::Ipv4Addr::new(10, 0, 0, 7)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(endpoint(words(v4), 45678), "10.0.0.7:45678");
        let v6: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(endpoint(words(v6.octets()), 443), "[fd00::1]:443");
    }
}
