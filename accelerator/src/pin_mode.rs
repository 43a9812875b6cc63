//! Who may open meshaccel's pins: root only. `MESHACCEL_PEERS` holds kernel socket addresses
//! (for the queue bound's probe reads) and every map steers or reveals traffic, so the bpffs
//! folder and its `maps/` and `links/` folders are 0700 and every pin 0600, owned by the agent's
//! uid. Set at install and set again at every adoption (an operator or a tool may have widened
//! them); `doctor` flags any of them that others can reach.
//!
//! The kernel creates a pin 0600 (minus the umask) already; the folders are the agent's own
//! (0755 by default) or the root of a bpffs it mounted (1777), which is what this tightens, along
//! with pins someone chmodded since.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

pub const DIR_MODE: u32 = 0o700;
pub const PIN_MODE: u32 = 0o600;

/// Whether a mode lets anyone but the owner in (any group or other bit).
pub fn too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// What meshaccel keeps under `bpffs`, as far as it exists: (path, is a folder).
pub fn entries(bpffs: &Path) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = [
        bpffs.to_path_buf(),
        bpffs.join("maps"),
        bpffs.join("links"),
        bpffs.join(crate::objects::ADOPT_LINKS),
    ]
    .into_iter()
    .map(|p| (p, true))
    .collect();
    out.extend(
        crate::layout_stamp::all_maps()
            .map(|n| (crate::objects::pin_path(bpffs, n), false))
            .chain([(bpffs.join(crate::objects::SOCK_OPS_LINK), false)])
            .chain(
                crate::objects::adopt_link_pins(bpffs)
                    .into_iter()
                    .map(|p| (p, false)),
            ),
    );
    out.retain(|(p, _)| p.exists());
    out
}

/// Sets the folders to 0700 and the pins to 0600.
pub fn restrict(bpffs: &Path) -> Result<()> {
    for (path, dir) in entries(bpffs) {
        let mode = if dir { DIR_MODE } else { PIN_MODE };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            Error::Bpffs {
                path: path.clone(),
                message: format!("making it root-only (mode {mode:o}): {e}"),
            }
        })?;
    }
    Ok(())
}

/// The entries others than their owner can reach: (path, mode).
pub fn open_to_others(bpffs: &Path) -> Vec<(PathBuf, u32)> {
    entries(bpffs)
        .into_iter()
        .filter_map(|(p, _)| {
            let mode = std::fs::metadata(&p).ok()?.permissions().mode() & 0o7777;
            too_open(mode).then_some((p, mode))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_bits_are_root_only() {
        assert!(!too_open(DIR_MODE) && !too_open(PIN_MODE));
        assert!(!too_open(0o400));
        for open in [0o755, 0o1777, 0o640, 0o604, 0o610, 0o601] {
            assert!(too_open(open), "{open:o}");
        }
    }

    #[test]
    fn restrict_sets_folders_and_pins() {
        // On a plain folder (the modes are the same calls on a bpffs).
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("bpffs");
        std::fs::create_dir_all(b.join("maps")).unwrap();
        std::fs::create_dir_all(b.join("links")).unwrap();
        let peers = crate::objects::pin_path(&b, meshaccel_common::names::PEERS);
        std::fs::write(&peers, "").unwrap();
        std::fs::set_permissions(&peers, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o755)).unwrap();
        let open: Vec<PathBuf> = open_to_others(&b).into_iter().map(|(p, _)| p).collect();
        assert!(open.contains(&peers) && open.contains(&b), "{open:?}");
        restrict(&b).unwrap();
        assert_eq!(open_to_others(&b), vec![]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            (mode(&b), mode(&b.join("maps")), mode(&peers)),
            (0o700, 0o700, 0o600)
        );
    }
}
