//! The kernel side as user space sees it: load, attach and pin the programs, or adopt what an
//! earlier agent pinned; open the pinned maps; uninstall without losing bytes.
//!
//! Layout under the bpffs folder: `maps/<MAP NAME>` and `links/sock_ops`. The sk_msg program is
//! attached to the sockhash (the map holds it), so pinning the map keeps it.
use std::{
    collections::BTreeMap,
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, SkMsg, SockOps,
        links::{FdLink, LinkInfo, PinnedLink},
    },
};
use meshaccel_common::{Config, PairKey, PeerInfo, PortKey, WorkloadPolicy, counter, names};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SOCK_OPS_LINK: &str = "links/sock_ops";

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshaccel-ebpf"));

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

/// Open handles on the pinned maps.
pub struct Dataplane {
    pub bpffs: PathBuf,
    /// True when this process found the programs already pinned and adopted them.
    pub adopted: bool,
    pub socks: SockHash<MapData, PairKey>,
    pub peers: HashMap<MapData, PairKey, PeerInfo>,
    pub workloads: HashMap<MapData, u64, WorkloadPolicy>,
    pub ports: HashMap<MapData, PortKey, u32>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
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
    pub workloads_enabled: usize,
    pub excluded_ports: usize,
    pub counters: BTreeMap<&'static str, u64>,
    /// Kernel ids of meshaccel's maps, link and programs, so tests and operators can check that
    /// uninstall left nothing.
    pub map_ids: Vec<u32>,
    pub link_id: Option<u32>,
    pub prog_ids: Vec<u32>,
}

fn pin_path(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join("maps").join(name)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let err = |message: String| Error::Bpffs {
        path: path.into(),
        message,
    };
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| err(e.to_string()))?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(format!(
            "mounting a bpffs: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!(path = %path.display(), "mounted a bpffs");
    Ok(())
}

/// Makes `dir` a folder on a bpffs: uses the bpffs it is already on, else mounts one on it (or
/// on its empty parent when the folder cannot be created there, as under /sys/fs/bpf on a host
/// that does not mount it).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let err = |message: String| Error::Bpffs {
        path: dir.into(),
        message,
    };
    if dir.is_dir() && is_bpffs(dir) {
        return Ok(());
    }
    if !dir.exists() && std::fs::create_dir_all(dir).is_err() {
        let parent = dir
            .parent()
            .ok_or_else(|| err("has no parent folder".into()))?;
        let empty = std::fs::read_dir(parent)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !(parent.is_dir() && empty) {
            return Err(err(
                "cannot create it, and its parent is not an empty folder to mount a bpffs on"
                    .into(),
            ));
        }
        mount_bpffs(parent)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("creating it on the new bpffs: {e}")))?;
    }
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    Ok(())
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

    /// Loads and attaches the programs to `cgroup`, pinning maps and the link under `bpffs`; or,
    /// when they are pinned already, adopts them without attaching twice.
    pub fn install_or_adopt(cgroup: &Path, bpffs: &Path) -> Result<Self> {
        ensure_bpffs(bpffs)?;
        if Self::is_installed(bpffs) {
            let mut dp = Self::open(bpffs)?;
            dp.adopted = true;
            tracing::info!(bpffs = %bpffs.display(), "adopted the pinned programs and maps");
            return Ok(dp);
        }
        Self::install(cgroup, bpffs)?;
        Self::open(bpffs)
    }

    fn install(cgroup_path: &Path, bpffs: &Path) -> Result<()> {
        let load = |message: String| Error::Load { message };
        let cgroup = std::fs::File::open(cgroup_path).map_err(|e| Error::Cgroup {
            path: cgroup_path.into(),
            message: e.to_string(),
        })?;
        if !crate::cgroup::is_cgroup2(cgroup_path) {
            return Err(Error::Cgroup {
                path: cgroup_path.into(),
                message: "is not a cgroup v2 folder (sock_ops attaches to cgroup v2 only)".into(),
            });
        }
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| load(format!("{e:#}")))?;
        for sub in ["maps", "links"] {
            std::fs::create_dir_all(bpffs.join(sub)).map_err(|e| Error::Bpffs {
                path: bpffs.join(sub),
                message: e.to_string(),
            })?;
        }
        // Start switched off; the first reconcile sets the desired switch.
        {
            let mut cfg: Array<&mut MapData, Config> = ebpf
                .map_mut(names::CONFIG)
                .ok_or_else(|| load(format!("the object has no map {}", names::CONFIG)))?
                .try_into()
                .map_err(map_err(names::CONFIG, "open"))?;
            cfg.set(
                0,
                Config {
                    enabled: 0,
                    epoch: 1,
                },
                0,
            )
            .map_err(map_err(names::CONFIG, "init"))?;
        }
        for name in names::ALL {
            let map = ebpf
                .map(name)
                .ok_or_else(|| load(format!("the object has no map {name}")))?;
            let path = pin_path(bpffs, name);
            if path.exists() {
                continue;
            }
            map.pin(&path).map_err(|e| Error::Bpffs {
                path: path.clone(),
                message: format!("pinning: {e}"),
            })?;
        }
        let socks: SockHash<&MapData, PairKey> = ebpf
            .map(names::SOCKS)
            .ok_or_else(|| load("no sockhash".into()))?
            .try_into()
            .map_err(map_err(names::SOCKS, "open"))?;
        let socks_fd = socks
            .fd()
            .try_clone()
            .map_err(|e| load(format!("dup sockhash fd: {e}")))?;
        let msg: &mut SkMsg = ebpf
            .program_mut(names::PROG_SK_MSG)
            .ok_or_else(|| load(format!("no program {}", names::PROG_SK_MSG)))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        msg.load()
            .map_err(|e| load(format!("{}: {e:#}", names::PROG_SK_MSG)))?;
        let msg_link = msg
            .attach(&socks_fd)
            .map_err(|e| load(format!("attaching sk_msg: {e:#}")))?;
        // The map keeps the sk_msg program attached after we exit; forget our handle.
        std::mem::forget(msg.take_link(msg_link).map_err(|e| load(format!("{e}")))?);
        let ops: &mut SockOps = ebpf
            .program_mut(names::PROG_SOCK_OPS)
            .ok_or_else(|| load(format!("no program {}", names::PROG_SOCK_OPS)))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        ops.load()
            .map_err(|e| load(format!("{}: {e:#}", names::PROG_SOCK_OPS)))?;
        let link_id = ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| Error::Cgroup {
                path: cgroup_path.into(),
                message: format!("attaching sock_ops: {e:#}"),
            })?;
        let link: FdLink = ops
            .take_link(link_id)
            .map_err(|e| load(format!("{e}")))?
            .try_into()
            .map_err(|e| load(format!("sock_ops link is not a bpf_link: {e}")))?;
        let path = bpffs.join(SOCK_OPS_LINK);
        link.pin(&path).map_err(|e| Error::Bpffs {
            path,
            message: format!("pinning the sock_ops link: {e}"),
        })?;
        tracing::info!(cgroup = %cgroup_path.display(), bpffs = %bpffs.display(), "attached and pinned");
        Ok(())
    }

    /// Opens the pinned maps (for the agent, status and uninstall).
    pub fn open(bpffs: &Path) -> Result<Self> {
        let socks = open_map(bpffs, names::SOCKS, Map::SockHash)?;
        let peers = open_map(bpffs, names::PEERS, Map::HashMap)?;
        let workloads = open_map(bpffs, names::WORKLOADS, Map::HashMap)?;
        let ports = open_map(bpffs, names::PORTS, Map::HashMap)?;
        let config = open_map(bpffs, names::CONFIG, Map::Array)?;
        let stats = open_map(bpffs, names::STATS, Map::PerCpuArray)?;
        Ok(Self {
            bpffs: bpffs.into(),
            adopted: false,
            socks: socks.try_into().map_err(map_err(names::SOCKS, "open"))?,
            peers: peers.try_into().map_err(map_err(names::PEERS, "open"))?,
            workloads: workloads
                .try_into()
                .map_err(map_err(names::WORKLOADS, "open"))?,
            ports: ports.try_into().map_err(map_err(names::PORTS, "open"))?,
            config: config.try_into().map_err(map_err(names::CONFIG, "open"))?,
            stats: stats.try_into().map_err(map_err(names::STATS, "open"))?,
        })
    }

    pub fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .map_err(map_err(names::CONFIG, "read"))
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG, "write"))
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

    pub fn status(&self) -> Result<KernelStatus> {
        let cfg = self.config()?;
        let mut map_ids = Vec::new();
        for name in names::ALL {
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
        for v in self.peers.iter().filter_map(|kv| kv.ok()).map(|(_, v)| v) {
            *sockets_by_netns
                .entry(v.netns_cookie.to_string())
                .or_insert(0) += 1;
        }
        Ok(KernelStatus {
            bpffs: self.bpffs.clone(),
            sockets_by_netns,
            enabled: cfg.enabled != 0,
            epoch: cfg.epoch,
            sockets: self.socks.keys().filter(|k| k.is_ok()).count(),
            workloads_enabled: self.workloads.keys().filter(|k| k.is_ok()).count(),
            excluded_ports: self.ports.keys().filter(|k| k.is_ok()).count(),
            counters: self.counters()?,
            map_ids,
            link_id,
            prog_ids,
        })
    }
}

/// What uninstall did.
#[derive(Debug, serde::Serialize)]
pub struct UninstallReport {
    /// Sockets still in the sockhash: their connections now use TCP, and their unread redirected
    /// bytes stay readable. The kernel frees the programs and maps when the last one closes.
    pub sockets_draining: usize,
    pub removed_pins: Vec<PathBuf>,
}

/// Switches acceleration off, then removes every pin (the link pin last-but-one detaches
/// sock_ops). Never deletes sockhash entries: that would drop receivers' unread redirected bytes.
pub fn uninstall(bpffs: &Path) -> Result<UninstallReport> {
    let mut removed = Vec::new();
    let mut draining = 0;
    match Dataplane::open(bpffs) {
        Ok(mut dp) => {
            let cfg = dp.config()?;
            dp.set_config(Config {
                enabled: 0,
                epoch: cfg.epoch.wrapping_add(1),
            })?;
            draining = dp.socks.keys().filter(|k| k.is_ok()).count();
        }
        Err(Error::NotInstalled { .. }) => {}
        Err(e) => return Err(e),
    }
    let link = bpffs.join(SOCK_OPS_LINK);
    let mut pins = vec![link];
    pins.extend(names::ALL.iter().map(|n| pin_path(bpffs, n)));
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
    for sub in ["maps", "links"] {
        let _ = std::fs::remove_dir(bpffs.join(sub));
    }
    Ok(UninstallReport {
        sockets_draining: draining,
        removed_pins: removed,
    })
}
