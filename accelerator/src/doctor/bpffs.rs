//! The bpffs folder: is it one, what of meshaccel is pinned there, and who can open the pins.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{Check, Level};
use crate::dataplane::{Dataplane, is_bpffs};

/// The bpffs check and, when meshaccel is installed there, what it holds. Returns the ids of
/// meshaccel's own programs under `bpffs`.
pub(super) fn installation(bpffs: &Path, checks: &mut Vec<Check>) -> BTreeSet<u32> {
    let mut ours = BTreeSet::new();
    // The folder, or the nearest existing ancestor (the agent creates the folder on it).
    let on_bpffs = bpffs.ancestors().find(|p| p.exists()).is_some_and(is_bpffs);
    if on_bpffs {
        checks.push(Check::new(
            "bpffs",
            Level::Ok,
            format!("{} is on a bpffs", bpffs.display()),
        ));
    } else {
        checks.push(
            Check::new(
                "bpffs",
                Level::Warn,
                format!(
                    "{} is not on a bpffs: the agent will mount one (there, or on its empty parent), and its pins (which keep acceleration attached across agent restarts) then live only as long as that mount — in a container, as long as the container",
                    bpffs.display()
                ),
            )
            .fix("mount the node's bpffs (`mount -t bpf bpf /sys/fs/bpf`; systemd does it at boot on most distributions) and, in Kubernetes, mount it into the agent (the chart's hostPaths.bpffs)"),
        );
    }
    if Dataplane::is_installed(bpffs) {
        match Dataplane::open(bpffs).and_then(|d| d.status()) {
            Ok(st) => {
                ours.extend(st.prog_ids.iter().copied());
                checks.push(Check::new(
                    "installation",
                    Level::Info,
                    format!(
                        "meshaccel is installed under {}: acceleration {}, {} socket(s), {} workload(s) enabled, link {:?}, programs {:?}",
                        bpffs.display(),
                        if st.enabled { "on" } else { "off" },
                        st.sockets,
                        st.workloads_enabled,
                        st.link_id,
                        st.prog_ids
                    ),
                ));
            }
            Err(e) => checks.push(
                Check::new(
                    "installation",
                    Level::Warn,
                    format!("pins under {} cannot be read: {e}", bpffs.display()),
                )
                .fix(format!(
                    "`meshaccel uninstall --bpffs {}` and restart the agent",
                    bpffs.display()
                )),
            ),
        }
    } else {
        checks.push(Check::new(
            "installation",
            Level::Info,
            format!("nothing of meshaccel is pinned under {}", bpffs.display()),
        ));
    }
    ours
}

/// Whether others than root can reach meshaccel's pins (`MESHACCEL_PEERS` holds kernel socket
/// addresses). Nothing to say when nothing is pinned.
pub(super) fn pin_permissions(bpffs: &Path) -> Option<Check> {
    if crate::pin_mode::entries(bpffs).iter().all(|(_, dir)| *dir) {
        return None;
    }
    Some(permissions_check(
        bpffs,
        &crate::pin_mode::open_to_others(bpffs),
    ))
}

/// The check from the entries found open to others (pure, for tests).
fn permissions_check(bpffs: &Path, open: &[(PathBuf, u32)]) -> Check {
    const NAME: &str = "pin permissions";
    if open.is_empty() {
        return Check::new(
            NAME,
            Level::Ok,
            format!(
                "{} and its folders are {:o}, its pins {:o}: only root opens them",
                bpffs.display(),
                crate::pin_mode::DIR_MODE,
                crate::pin_mode::PIN_MODE
            ),
        );
    }
    let list: Vec<String> = open
        .iter()
        .map(|(p, m)| format!("{} ({m:o})", p.display()))
        .collect();
    Check::new(
        NAME,
        Level::Warn,
        format!(
            "others than root can reach {}: the pins hold kernel socket addresses (MESHACCEL_PEERS) and steer traffic",
            list.join(", ")
        ),
    )
    .fix(format!(
        "restart the agent (it sets the folders to {:o} and the pins to {:o}), or `chmod -R go-rwx {}`",
        crate::pin_mode::DIR_MODE,
        crate::pin_mode::PIN_MODE,
        bpffs.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_open_to_others_are_flagged_by_name() {
        let b = Path::new("/sys/fs/bpf/meshaccel");
        let ok = permissions_check(b, &[]);
        assert_eq!(ok.level, Level::Ok, "{ok:?}");
        let peers = b.join("maps/MESHACCEL_PEERS");
        let c = permissions_check(b, &[(b.to_path_buf(), 0o755), (peers, 0o644)]);
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("/sys/fs/bpf/meshaccel (755)")
                && c.detail.contains("maps/MESHACCEL_PEERS (644)"),
            "{c:?}"
        );
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("chmod -R go-rwx /sys/fs/bpf/meshaccel")),
            "{c:?}"
        );
    }
}
