//! The kernel side as user space sees it: load, attach and pin the programs, or adopt what an
//! earlier agent pinned; open the pinned maps; uninstall without losing bytes.
//!
//! Layout under the bpffs folder: `maps/<MAP NAME>` and `links/sock_ops`. The sk_msg program is
//! attached to the sockhash (the map holds it), so pinning the map keeps it.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, SockHash},
    programs::links::{FdLink, LinkInfo, PinnedLink},
};
use meshaccel_common::{
    Config, PairKey, PeerInfo, PortKey, WorkloadPolicy, WorkloadStats, counter, names,
};

use crate::error::{Error, Result};

mod bpffs;
pub mod btf;
mod install;
pub mod sys;

use bpffs::ensure_bpffs;
pub(crate) use bpffs::is_bpffs;
pub use install::InstallOptions;

use crate::objects::{SOCK_OPS_LINK, pin_path};

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

/// Open handles on the pinned maps.
pub struct Dataplane {
    pub bpffs: PathBuf,
    /// True when this process found the programs already pinned and adopted them.
    pub adopted: bool,
    /// True when, adopting, it found no sk_msg program on the pinned sockhash and attached one.
    pub sk_msg_reattached: bool,
    /// The program that adopts app sockets after their first write, loaded by the process that
    /// installed or adopted the pins (the agent links it into each workload's netns).
    pub adopter: Option<crate::adopter::Adopter>,
    pub socks: SockHash<MapData, PairKey>,
    pub peers: HashMap<MapData, PairKey, PeerInfo>,
    pub workloads: HashMap<MapData, u64, WorkloadPolicy>,
    pub ports: HashMap<MapData, PortKey, u32>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    pub wl_stats: PerCpuHashMap<MapData, u64, WorkloadStats>,
    pub small_writes: HashMap<MapData, PortKey, u64>,
}

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

fn open_map(bpffs: &Path, name: &'static str, wrap: fn(MapData) -> Map) -> Result<Map> {
    let path = pin_path(bpffs, name);
    let data = MapData::from_pin(&path).map_err(|e| match e {
        aya::maps::MapError::SyscallError(ref s)
            if s.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Error::NotInstalled { path: bpffs.into() }
        }
        other => Error::Map {
            name,
            op: "open pin",
            source: other,
        },
    })?;
    Ok(wrap(data))
}

impl Dataplane {
    /// Whether an agent has installed meshaccel under `bpffs`.
    pub fn is_installed(bpffs: &Path) -> bool {
        bpffs.join(SOCK_OPS_LINK).exists()
    }

    /// Opens the pinned maps (for the agent, status and uninstall).
    pub fn open(bpffs: &Path) -> Result<Self> {
        crate::layout_stamp::check(bpffs)?;
        let socks = open_map(bpffs, names::SOCKS, Map::SockHash)?;
        let peers = open_map(bpffs, names::PEERS, Map::HashMap)?;
        let workloads = open_map(bpffs, names::WORKLOADS, Map::HashMap)?;
        let ports = open_map(bpffs, names::PORTS, Map::HashMap)?;
        let config = open_map(bpffs, names::CONFIG, Map::Array)?;
        let stats = open_map(bpffs, names::STATS, Map::PerCpuArray)?;
        let wl_stats = open_map(bpffs, names::WL_STATS, Map::PerCpuHashMap)?;
        let small_writes = open_map(bpffs, names::SMALL_WRITES, Map::LruHashMap)?;
        Ok(Self {
            bpffs: bpffs.into(),
            adopted: false,
            sk_msg_reattached: false,
            adopter: None,
            socks: socks.try_into().map_err(map_err(names::SOCKS, "open"))?,
            peers: peers.try_into().map_err(map_err(names::PEERS, "open"))?,
            workloads: workloads
                .try_into()
                .map_err(map_err(names::WORKLOADS, "open"))?,
            ports: ports.try_into().map_err(map_err(names::PORTS, "open"))?,
            config: config.try_into().map_err(map_err(names::CONFIG, "open"))?,
            stats: stats.try_into().map_err(map_err(names::STATS, "open"))?,
            wl_stats: wl_stats
                .try_into()
                .map_err(map_err(names::WL_STATS, "open"))?,
            small_writes: small_writes
                .try_into()
                .map_err(map_err(names::SMALL_WRITES, "open"))?,
        })
    }

    pub fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .map_err(map_err(names::CONFIG, "read"))
    }

    /// Writes the global config. The programs copy it while user space writes it (no lock):
    /// a copy may mix old and new fields. So a new epoch is written in a second write of its
    /// own, after everything else of the change: a copy that shows any other epoch than a
    /// sender's cached one (new, old or torn) then holds the new switch, scope and capture
    /// already, which the sender re-checks; a copy torn in the first write shows the old epoch
    /// whole, so the sender goes on as before until the second write.
    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        let old_epoch = self.config()?.epoch;
        let mut write = |c: Config| {
            self.config
                .set(0, c, 0)
                .map_err(map_err(names::CONFIG, "write"))
        };
        if cfg.epoch != old_epoch {
            write(Config {
                epoch: old_epoch,
                ..cfg
            })?;
        }
        write(cfg)
    }

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
            .map(|(k, v)| {
                let b: Vec<u8> = k
                    .client_ip_be
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect();
                let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or([0; 16]));
                let ip = v6
                    .to_ipv4_mapped()
                    .map_or_else(|| v6.to_string(), |v4| v4.to_string());
                SocketRow {
                    client: if ip.contains(':') {
                        format!("[{ip}]:{}", k.client_port)
                    } else {
                        format!("{ip}:{}", k.client_port)
                    },
                    role: if k.role == meshaccel_common::ROLE_CLIENT {
                        "client"
                    } else {
                        "server"
                    },
                    netns_cookie: v.netns_cookie,
                    leg: v.leg != 0,
                }
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

/// What uninstall did, and what is still draining.
#[derive(Debug, serde::Serialize)]
pub struct UninstallReport {
    pub removed_pins: Vec<PathBuf>,
    /// True when no meshaccel program or map is left in the kernel (nothing to drain).
    pub drained: bool,
    /// Sockets still in a meshaccel sockhash: their connections use TCP now and their unread
    /// redirected bytes stay readable; the kernel frees the programs and maps when the last of
    /// them closes. Run uninstall again to check.
    pub sockets_draining: usize,
    /// Kernel ids of meshaccel programs and maps still alive (kept by those sockets).
    pub programs_left: Vec<u32>,
    pub maps_left: Vec<u32>,
}

/// meshaccel objects alive in the kernel: all of them by name, or only the given ids.
fn leftovers(only: Option<&[u32]>) -> (Vec<u32>, Vec<u32>, usize) {
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

/// Switches acceleration off, then removes every pin (removing the link pin detaches sock_ops).
/// Never deletes sockhash entries: that would drop receivers' unread redirected bytes. Then
/// waits up to `wait` for the kernel to free the programs and maps, which it does when the last
/// accelerated connection closes. Run again, it reports (and waits for) whatever meshaccel
/// objects are still alive.
pub fn uninstall(bpffs: &Path, wait: std::time::Duration) -> Result<UninstallReport> {
    let mut removed = Vec::new();
    let mut ours: Option<Vec<u32>> = None;
    // Under the node's lock, and recorded first: an agent reconciling now writes nothing after
    // this, and an agent of this installation never installs again (`install_gate`).
    let gate = if bpffs.is_dir() {
        let g = crate::install_gate::lock(bpffs)?;
        let gens =
            g.record_uninstalled(Dataplane::is_installed(bpffs) || bpffs.join("maps").is_dir())?;
        tracing::info!(bpffs = %bpffs.display(), generations = ?gens, "recorded as uninstalled");
        Some(g)
    } else {
        None
    };
    // Switch everything to TCP first (senders stop redirecting at their next message). Pins of
    // another version (other map layouts) cannot be opened as ours: they are removed all the
    // same, which is what the error of an incompatible upgrade tells the operator to do.
    let switch_off = |dp: &mut Dataplane| -> Result<Vec<u32>> {
        let cfg = dp.config()?;
        dp.set_config(Config {
            enabled: 0,
            epoch: cfg.epoch.wrapping_add(1),
            ..cfg
        })?;
        let st = dp.status()?;
        Ok(st.map_ids.iter().chain(&st.prog_ids).copied().collect())
    };
    match Dataplane::open(bpffs).and_then(|mut dp| switch_off(&mut dp)) {
        Ok(ids) => ours = Some(ids),
        Err(Error::NotInstalled { .. }) => {}
        Err(e) => {
            tracing::warn!(error = %e, bpffs = %bpffs.display(), "the pinned objects are not this version's: removing their pins without switching them off first");
        }
    }
    let link = bpffs.join(SOCK_OPS_LINK);
    let mut pins = vec![link];
    // The adopting program's links (one per workload netns): removing the pin detaches it.
    pins.extend(crate::objects::adopt_link_pins(bpffs));
    pins.extend(crate::layout_stamp::all_maps().map(|n| pin_path(bpffs, n)));
    for p in pins {
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Bpffs {
                    path: p,
                    message: format!("removing pin: {e}"),
                });
            }
        }
    }
    for sub in ["maps", crate::objects::ADOPT_LINKS, "links"] {
        let _ = std::fs::remove_dir(bpffs.join(sub));
    }
    drop(gate);
    let deadline = std::time::Instant::now() + wait;
    loop {
        // The kernel frees maps from a workqueue: give it a moment even when nothing is open.
        let (programs_left, maps_left, sockets) = leftovers(ours.as_deref());
        if (programs_left.is_empty() && maps_left.is_empty())
            || std::time::Instant::now() >= deadline
        {
            return Ok(UninstallReport {
                removed_pins: removed,
                drained: programs_left.is_empty() && maps_left.is_empty(),
                sockets_draining: sockets,
                programs_left,
                maps_left,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
