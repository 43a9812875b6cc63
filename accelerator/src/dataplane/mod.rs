//! The kernel side as user space sees it: load, attach and pin the programs, or adopt what an
//! earlier agent pinned (`install`); open the pinned maps and write them, behind this type
//! alone; read what they hold (`inspect`); uninstall without losing bytes (`uninstall`).
//! Every raw bpf(2) call is in [`sys`]; the running kernel's struct offsets come from [`btf`].
//!
//! Layout under the bpffs folder: `maps/<MAP NAME>` and `links/sock_ops`. The sk_msg program is
//! attached to the sockhash (the map holds it), so pinning the map keeps it.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, SockHash};
use meshaccel_common::{Config, PairKey, PeerInfo, PortKey, WorkloadPolicy, WorkloadStats, names};

use crate::{
    desired::DesiredState,
    error::{Error, Result},
    objects::{SOCK_OPS_LINK, pin_path},
    reconcile::{self, ActualState, Plan},
};

pub mod adopter;
mod bpffs;
pub mod btf;
mod inspect;
mod install;
pub mod sys;
mod uninstall;

use bpffs::ensure_bpffs;
pub(crate) use bpffs::is_bpffs;
pub use inspect::{KernelStatus, SmallWriteService, SocketRow, WorkloadTraffic};
pub use install::InstallOptions;
pub use uninstall::{UninstallReport, uninstall};

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
    /// Whether this process could read the kernel's socket field offsets (its BTF). Without
    /// them the programs cannot tell the sidecar's sockets from the apps' nor bound a peer's
    /// queue, so the agent keeps the global switch off (everything on TCP) and says why.
    pub socket_offsets: bool,
    /// The program that adopts app sockets after their first write, loaded by the process that
    /// installed or adopted the pins (the agent links it into each workload's netns).
    pub adopter: Option<adopter::Adopter>,
    // The maps are written only through `apply` and `set_config`, which order their writes
    // for the programs that read them meanwhile; readers get copies.
    socks: SockHash<MapData, PairKey>,
    peers: HashMap<MapData, PairKey, PeerInfo>,
    workloads: HashMap<MapData, u64, WorkloadPolicy>,
    ports: HashMap<MapData, PortKey, u32>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    wl_stats: PerCpuHashMap<MapData, u64, WorkloadStats>,
    small_writes: HashMap<MapData, PortKey, u64>,
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
            socket_offsets: false,
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

    /// The policy the maps hold for the workload in netns `netns_cookie`, if any.
    pub fn workload(&self, netns_cookie: u64) -> Option<WorkloadPolicy> {
        self.workloads.get(&netns_cookie, 0).ok()
    }

    /// Every workload's policy in the maps, by netns cookie (skipping entries that fail to
    /// read).
    pub fn workloads(&self) -> BTreeMap<u64, WorkloadPolicy> {
        self.workloads.iter().filter_map(|kv| kv.ok()).collect()
    }

    pub fn actual(&self) -> Result<ActualState> {
        let mut a = ActualState {
            config: self.config()?,
            ..Default::default()
        };
        for kv in self.workloads.iter() {
            let (k, v) = kv.map_err(map_err(names::WORKLOADS, "iterate"))?;
            a.workloads.insert(k, v);
        }
        for k in self.ports.keys() {
            a.excluded_ports
                .insert(k.map_err(map_err(names::PORTS, "iterate"))?);
        }
        for k in self.wl_stats.keys() {
            a.stats
                .insert(k.map_err(map_err(names::WL_STATS, "iterate"))?);
        }
        Ok(a)
    }

    /// Applies a plan: additions first, then removals, then the config (with the epoch) last, so
    /// a sender that re-checks on the new epoch already sees the new policy.
    pub fn apply(&mut self, plan: &Plan) -> Result<()> {
        for k in &plan.add_stats {
            let zero = aya::maps::PerCpuValues::try_from(vec![
                WorkloadStats::default();
                aya::util::nr_cpus().map_err(
                    |(_, e)| Error::Map {
                        name: names::WL_STATS,
                        op: "count cpus",
                        source: aya::maps::MapError::IoError(e),
                    }
                )?
            ])
            .map_err(|e| Error::Map {
                name: names::WL_STATS,
                op: "values",
                source: aya::maps::MapError::IoError(e),
            })?;
            self.wl_stats
                .insert(k, zero, 0)
                .map_err(map_err(names::WL_STATS, "insert"))?;
        }
        for (k, v) in &plan.upsert_workloads {
            self.workloads
                .insert(k, v, 0)
                .map_err(map_err(names::WORKLOADS, "insert"))?;
        }
        for k in &plan.add_ports {
            self.ports
                .insert(k, 1, 0)
                .map_err(map_err(names::PORTS, "insert"))?;
        }
        for k in &plan.remove_workloads {
            ignore_missing(self.workloads.remove(k))
                .map_err(map_err(names::WORKLOADS, "remove"))?;
        }
        for k in &plan.remove_ports {
            ignore_missing(self.ports.remove(k)).map_err(map_err(names::PORTS, "remove"))?;
        }
        if let Some(cfg) = plan.config {
            self.set_config(cfg)?;
        }
        for k in &plan.remove_stats {
            ignore_missing(self.wl_stats.remove(k)).map_err(map_err(names::WL_STATS, "remove"))?;
        }
        Ok(())
    }

    /// Reads the maps, plans, applies; returns what it did.
    pub fn reconcile(&mut self, desired: &DesiredState) -> Result<Plan> {
        let plan = reconcile::plan(desired, &self.actual()?);
        if !plan.is_empty() {
            self.apply(&plan)?;
        }
        Ok(plan)
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
