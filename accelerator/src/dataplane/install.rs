//! Installing: load the programs and attach and pin them, or adopt what an earlier agent
//! pinned, or replace another version's programs in place under the pinned link and maps.
use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, MapData, SockHash},
    programs::{
        CgroupAttachMode, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use meshaccel_common::{Config, PairKey, PeerInfo, PortKey, WorkloadPolicy, WorkloadStats, names};

use super::{Dataplane, btf, ensure_bpffs, map_err, sys};
use crate::{
    error::{Error, Result},
    objects::{EBPF_OBJECT, SOCK_OPS_LINK, pin_path},
};

/// How the agent found the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Installed,
    Adopted,
    /// Adopted, and the sockhash had no sk_msg program: this version's was attached.
    Reattached,
    Upgraded,
}

/// Options that apply when the maps are created (not when pinned ones are adopted).
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Sockets the sockhash can hold (default `capacity::SOCKS`). When it is full, new
    /// connections stay on TCP (counted as insert failures).
    pub sockhash_capacity: Option<u32>,
    /// Replace pinned programs even when they are this version's (a forced upgrade: reload
    /// after a kernel or configuration change, and how tests exercise the upgrade path).
    pub replace_programs: bool,
    /// The installation this agent belongs to (`install_gate`): it never installs a generation
    /// that was uninstalled on this node.
    pub generation: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            sockhash_capacity: None,
            replace_programs: false,
            generation: crate::install_gate::DEFAULT_GENERATION.into(),
        }
    }
}

/// Map type and key/value sizes this version expects, to refuse pinned maps of an incompatible
/// version before anything is replaced.
fn expected_maps() -> [(&'static str, u32, usize, usize); 11] {
    use aya::maps::MapType::*;
    use std::mem::size_of;
    [
        (names::SOCKS, SockHash as u32, size_of::<PairKey>(), 4),
        (
            names::PEERS,
            Hash as u32,
            size_of::<PairKey>(),
            size_of::<PeerInfo>(),
        ),
        (
            names::STATE,
            SkStorage as u32,
            4,
            size_of::<meshaccel_common::SockState>(),
        ),
        (
            names::WORKLOADS,
            Hash as u32,
            8,
            size_of::<WorkloadPolicy>(),
        ),
        (names::PORTS, Hash as u32, size_of::<PortKey>(), 4),
        (names::CONFIG, Array as u32, 4, size_of::<Config>()),
        (names::STATS, PerCpuArray as u32, 4, 8),
        (
            names::WL_STATS,
            PerCpuHash as u32,
            8,
            size_of::<WorkloadStats>(),
        ),
        (names::SMALL_WRITES, LruHash as u32, size_of::<PortKey>(), 8),
        (names::LISTENERS, LruHash as u32, size_of::<PortKey>(), 4),
        (names::PENDING, SkStorage as u32, 4, 4),
    ]
}

fn check_pinned_maps(bpffs: &Path) -> Result<()> {
    for (name, ty, key, value) in expected_maps() {
        let Ok(md) = MapData::from_pin(pin_path(bpffs, name)) else {
            continue;
        };
        let info = md.info().map_err(map_err(name, "info"))?;
        let have = (
            info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            info.key_size() as usize,
            info.value_size() as usize,
        );
        judge_pinned_map(bpffs, name, have, (ty, key, value))?;
    }
    Ok(())
}

/// A pinned map of another type or key/value size (`have`) than this version's (`want`) is
/// another version's: refused, with the fix.
fn judge_pinned_map(
    bpffs: &Path,
    name: &str,
    have: (u32, usize, usize),
    want: (u32, usize, usize),
) -> Result<()> {
    if have == want {
        return Ok(());
    }
    Err(Error::Load {
        message: format!(
            "the pinned map {name} under {} is another version's (type/key/value {have:?}, this version needs {want:?}): run `meshaccel uninstall --bpffs {}` (live connections continue on TCP), then start the agent again",
            bpffs.display(),
            bpffs.display()
        ),
    })
}

/// The sk_msg programs attached to the pinned sockhash.
fn sk_msg_attached(bpffs: &Path) -> Result<Vec<u32>> {
    let md = MapData::from_pin(pin_path(bpffs, names::SOCKS))
        .map_err(map_err(names::SOCKS, "open pin"))?;
    sys::prog_query(
        std::os::fd::AsFd::as_fd(md.fd()),
        sys::BPF_SK_MSG_VERDICT,
        0,
    )
    .map(|(_, ids)| ids)
    .map_err(|e| Error::Load {
        message: format!("querying the sk_msg program of the pinned sockhash: {e}"),
    })
}

/// Makes the object's sk_msg program the (pinned) sockhash's.
fn attach_sk_msg(ebpf: &mut aya::Ebpf) -> Result<()> {
    let load = |message: String| Error::Load { message };
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
    let msg_link = msg
        .attach(&socks_fd)
        .map_err(|e| load(format!("attaching sk_msg: {e:#}")))?;
    // The map keeps the sk_msg program attached after we exit; forget our handle.
    std::mem::forget(msg.take_link(msg_link).map_err(|e| load(format!("{e}")))?);
    Ok(())
}

impl Dataplane {
    /// Loads and attaches the programs to `cgroup`, pinning maps and the link under `bpffs`; or,
    /// when they are pinned already, adopts them without attaching twice; or, when the pinned
    /// programs are another version's, replaces the programs in place (the pinned maps, and with
    /// them every socket's state and decision, stay).
    pub fn install_or_adopt(cgroup: &Path, bpffs: &Path, opts: &InstallOptions) -> Result<Self> {
        ensure_bpffs(bpffs)?;
        let gate = crate::install_gate::lock(bpffs)?;
        if gate.uninstalled(&opts.generation) {
            return Err(gate.refusal(&opts.generation));
        }
        let (outcome, adopter) = Self::load_and_attach(cgroup, bpffs, opts)?;
        gate.record_installed(&opts.generation)?;
        // Every pin now exists: root-only, also when adopted pins were widened meanwhile.
        crate::pin_mode::restrict(bpffs)?;
        drop(gate);
        let mut dp = Self::open(bpffs)?;
        dp.adopted = outcome != Outcome::Installed;
        dp.sk_msg_reattached = outcome == Outcome::Reattached;
        dp.socket_offsets = btf::running_kernel().is_ok();
        dp.adopter = Some(adopter);
        match outcome {
            Outcome::Installed => {
                tracing::info!(cgroup = %cgroup.display(), bpffs = %bpffs.display(), "attached and pinned")
            }
            Outcome::Adopted => {
                tracing::info!(bpffs = %bpffs.display(), "adopted the pinned programs and maps")
            }
            Outcome::Reattached => {
                tracing::info!(bpffs = %bpffs.display(), "adopted the pinned programs and maps; attached the missing sk_msg program")
            }
            Outcome::Upgraded => {
                tracing::info!(bpffs = %bpffs.display(), "replaced the pinned programs with this version's; maps and socket state kept")
            }
        }
        Ok(dp)
    }

    fn load_and_attach(
        cgroup_path: &Path,
        bpffs: &Path,
        opts: &InstallOptions,
    ) -> Result<(Outcome, super::adopter::Adopter)> {
        let load = |message: String| Error::Load { message };
        let installed = Self::is_installed(bpffs);
        check_pinned_maps(bpffs)?;
        for sub in ["maps", "links"] {
            std::fs::create_dir_all(bpffs.join(sub)).map_err(|e| Error::Bpffs {
                path: bpffs.join(sub),
                message: e.to_string(),
            })?;
        }
        // Before any map is created or program replaced: pinned maps of another layout are
        // refused, a folder without maps is stamped with this build's layout.
        crate::layout_stamp::ensure(bpffs)?;
        // Root-only before the programs' maps appear in it (pins hold kernel addresses).
        crate::pin_mode::restrict(bpffs)?;
        // Every map is reused from its pin when it exists, else created and pinned.
        let paths: Vec<(&str, PathBuf)> = names::ALL
            .iter()
            .map(|n| (*n, pin_path(bpffs, n)))
            .collect();
        let mut loader = aya::EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // This kernel's struct offsets for the peer-queue check (0 = unknown:
        // the verifier drops those checks).
        let offsets = btf::running_kernel().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no kernel BTF offsets: the programs get 0 and the agent keeps the global switch off");
            Default::default()
        });
        offsets.set_globals(&mut loader);
        // Whether `sk_rmem_alloc == 0` means nothing redirected is unread (a closed socket may
        // then leave the sockhash): by version only, the safe side for a backported kernel.
        let charged = u32::from(
            crate::queue_charge::judge_release(&crate::queue_charge::release())
                == Some(crate::queue_charge::ByVersion::Charged),
        );
        loader.override_global("RMEM_CHARGED", &charged, true);
        if let Some(n) = opts.sockhash_capacity {
            loader.map_max_entries(names::SOCKS, n);
            loader.map_max_entries(names::PEERS, n);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| load(format!("{e:#}")))?;
        {
            let mut cfg: Array<&mut MapData, Config> = ebpf
                .map_mut(names::CONFIG)
                .ok_or_else(|| load(format!("the object has no map {}", names::CONFIG)))?
                .try_into()
                .map_err(map_err(names::CONFIG, "open"))?;
            // A new config array is all zero: start switched off at epoch 1; the first
            // reconcile sets the desired switch.
            if cfg
                .get(&0, 0)
                .map_err(map_err(names::CONFIG, "read"))?
                .epoch
                == 0
            {
                cfg.set(
                    0,
                    Config {
                        enabled: 0,
                        epoch: 1,
                        ..Config::default()
                    },
                    0,
                )
                .map_err(map_err(names::CONFIG, "init"))?;
            }
        }
        let adopter = super::adopter::Adopter::load(&mut ebpf, bpffs, opts.replace_programs)?;
        let msg: &mut SkMsg = ebpf
            .program_mut(names::PROG_SK_MSG)
            .ok_or_else(|| load(format!("no program {}", names::PROG_SK_MSG)))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        msg.load()
            .map_err(|e| load(format!("{}: {e:#}", names::PROG_SK_MSG)))?;
        let ops: &mut SockOps = ebpf
            .program_mut(names::PROG_SOCK_OPS)
            .ok_or_else(|| load(format!("no program {}", names::PROG_SOCK_OPS)))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        ops.load()
            .map_err(|e| load(format!("{}: {e:#}", names::PROG_SOCK_OPS)))?;
        let our_tag = ops.info().map_err(|e| load(format!("{e}")))?.tag();

        let link_path = bpffs.join(SOCK_OPS_LINK);
        let outcome = if installed {
            let link: FdLink = PinnedLink::from_pin(&link_path)
                .map_err(|e| Error::Bpffs {
                    path: link_path.clone(),
                    message: format!("opening the pinned link: {e}"),
                })?
                .into();
            let prog_id = link
                .info()
                .map_err(|e| load(format!("link info: {e}")))?
                .program_id();
            let pinned_tag = aya::programs::loaded_programs()
                .filter_map(|p| p.ok())
                .find(|p| p.id() == prog_id)
                .map(|p| p.tag());
            if pinned_tag == Some(our_tag) && !opts.replace_programs {
                // An agent that stopped between pinning the link and attaching sk_msg left a
                // sockhash that takes sockets in and redirects nothing: attach ours then.
                if !sk_msg_attached(bpffs)?.is_empty() {
                    return Ok((Outcome::Adopted, adopter));
                }
                tracing::warn!(bpffs = %bpffs.display(), "the pinned sockhash had no sk_msg program (an agent stopped between attaching sock_ops and sk_msg?): nothing was redirected; attaching this version's");
                attach_sk_msg(&mut ebpf)?;
                return Ok((Outcome::Reattached, adopter));
            }
            // Another version: swap the sock_ops program under the same link (atomic), then
            // make ours the sockhash's sk_msg program. Sockets already in the sockhash keep the
            // sk_msg program they were inserted with; both versions share the pinned state.
            let ops_fd = ops.fd().map_err(|e| load(format!("{e}")))?;
            let link_fd = sys::obj_get(&link_path).map_err(|e| Error::Bpffs {
                path: link_path.clone(),
                message: format!("opening the pinned link: {e}"),
            })?;
            sys::link_update(
                std::os::fd::AsFd::as_fd(&link_fd),
                std::os::fd::AsFd::as_fd(ops_fd),
            )
            .map_err(|e| {
                load(format!(
                    "replacing the sock_ops program of the pinned link: {e}"
                ))
            })?;
            Outcome::Upgraded
        } else {
            let cgroup = std::fs::File::open(cgroup_path).map_err(|e| Error::Cgroup {
                path: cgroup_path.into(),
                message: e.to_string(),
            })?;
            if !crate::cgroup::is_cgroup2(cgroup_path) {
                return Err(Error::Cgroup {
                    path: cgroup_path.into(),
                    message: "is not a cgroup v2 folder (sock_ops attaches to cgroup v2 only)"
                        .into(),
                });
            }
            let link_id =
                ops.attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(|e| Error::Cgroup {
                        path: cgroup_path.into(),
                        message: format!("attaching sock_ops: {e:#}"),
                    })?;
            let link: FdLink = ops
                .take_link(link_id)
                .map_err(|e| load(format!("{e}")))?
                .try_into()
                .map_err(|e| load(format!("sock_ops link is not a bpf_link: {e}")))?;
            link.pin(&link_path).map_err(|e| Error::Bpffs {
                path: link_path.clone(),
                message: format!("pinning the sock_ops link: {e}"),
            })?;
            Outcome::Installed
        };
        attach_sk_msg(&mut ebpf)?;
        Ok((outcome, adopter))
    }
}

#[cfg(test)]
mod tests {
    use meshaccel_common::layout;

    use super::*;

    #[test]
    fn the_agent_checks_the_sizes_of_the_layout_table() {
        let expected = expected_maps();
        assert_eq!(expected.len(), layout::MAPS.len());
        for ((name, _, key, value), m) in expected.iter().zip(layout::MAPS) {
            assert_eq!(
                (*name, *key, *value),
                (m.name, m.key_size, m.value_size),
                "dataplane::expected_maps and layout::MAPS disagree"
            );
        }
    }

    #[test]
    fn the_agent_checks_the_map_types_of_the_layout_table() {
        use aya::maps::MapType::*;
        let kind = |ty: u32| {
            [
                (SockHash, "SOCKHASH"),
                (Hash, "HASH"),
                (SkStorage, "SK_STORAGE"),
                (Array, "ARRAY"),
                (PerCpuArray, "PERCPU_ARRAY"),
                (PerCpuHash, "PERCPU_HASH"),
                (LruHash, "LRU_HASH"),
            ]
            .into_iter()
            .find(|(t, _)| *t as u32 == ty)
            .map(|(_, k)| k)
        };
        for ((name, ty, ..), m) in expected_maps().iter().zip(layout::MAPS) {
            assert_eq!(kind(*ty), Some(m.kind), "{name}");
        }
    }

    #[test]
    fn a_pinned_map_of_this_shape_is_ours() {
        let bpffs = Path::new("/sys/fs/bpf/meshaccel");
        for (name, ty, key, value) in expected_maps() {
            assert!(judge_pinned_map(bpffs, name, (ty, key, value), (ty, key, value)).is_ok());
        }
    }

    #[test]
    fn a_pinned_map_of_another_shape_is_refused_with_the_fix() {
        let bpffs = Path::new("/sys/fs/bpf/meshaccel");
        let want = (aya::maps::MapType::Hash as u32, 48, 16);
        for have in [
            (aya::maps::MapType::LruHash as u32, 48, 16),
            (want.0, 40, 16),
            (want.0, 48, 12),
        ] {
            let e = judge_pinned_map(bpffs, names::PEERS, have, want)
                .expect_err("another shape must be refused")
                .to_string();
            assert!(
                e.contains(names::PEERS)
                    && e.contains(&format!("{have:?}"))
                    && e.contains(&format!("{want:?}"))
                    && e.contains("meshaccel uninstall --bpffs /sys/fs/bpf/meshaccel"),
                "{e}"
            );
        }
    }
}
