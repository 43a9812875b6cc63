//! Uninstall: switch off, remove every pin, and wait for the kernel to free what is left.
use std::path::{Path, PathBuf};

use meshaccel_common::Config;

use super::{Dataplane, inspect::leftovers};
use crate::{
    error::{Error, Result},
    objects::{SOCK_OPS_LINK, pin_path},
};

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
