//! The layout stamp: `maps/MESHACCEL_META` under the bpffs folder, an ARRAY[1] map the agent
//! creates and pins at install, holding the [`Meta`] (layout hash and format) of the build that
//! created the maps next to it. An agent adopting pinned maps, and every reader of them
//! (`status`, `/metrics`, `uninstall`'s switch-off), compares it with its own first: pinned maps
//! of another layout would be misread (two `Config` fields swapped keep every size the map
//! checks compare), and written back wrong.
//!
//! The stamp is pinned before the programs' maps at install, so an install that stops halfway
//! never leaves maps without one.
use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use meshaccel_common::{
    layout::{self, Meta},
    names,
};

use crate::error::{Error, Result};

/// What the bpffs folder holds where the stamp belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Missing,
    Stamp(Meta),
    /// Pinned but not readable as a [`Meta`] (another value size, another map type): written
    /// by a build whose stamp differs as much as its layout may.
    Unreadable(String),
}

/// What to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The stamp is this build's.
    Compatible,
    /// No map is pinned: (re)write this build's stamp before the maps are created.
    Stamp,
    /// Pinned maps this build must not read: why.
    Refuse(String),
}

/// The decision (pure): `maps_pinned` says whether any of the programs' maps is pinned.
pub fn judge(found: &Found, maps_pinned: bool) -> Verdict {
    let ours = Meta::current();
    match found {
        Found::Stamp(m) if *m == ours => Verdict::Compatible,
        // Nothing pinned that a stale or missing stamp would describe (an install that stopped
        // after stamping, or leftovers of an uninstall): this build's maps will be new.
        _ if !maps_pinned => Verdict::Stamp,
        Found::Missing => Verdict::Refuse(format!(
            "they carry no layout stamp ({}): pinned by a meshaccel from before layout stamps, whose map layout this one cannot check",
            layout::META
        )),
        Found::Stamp(m) => Verdict::Refuse(format!(
            "they were created with map layout {:016x} (format {}), this meshaccel reads layout {:016x} (format {})",
            m.layout, m.format, ours.layout, ours.format
        )),
        Found::Unreadable(why) => Verdict::Refuse(format!(
            "their layout stamp {} cannot be read as this version's ({why})",
            layout::META
        )),
    }
}

pub fn path(bpffs: &Path) -> PathBuf {
    crate::objects::pin_path(bpffs, layout::META)
}

/// Every map pinned under the bpffs folder: the programs' and the stamp.
pub fn all_maps() -> impl Iterator<Item = &'static str> {
    names::ALL.iter().copied().chain([layout::META])
}

/// Whether any of the programs' maps is pinned under `bpffs`.
pub fn maps_pinned(bpffs: &Path) -> bool {
    names::ALL
        .iter()
        .any(|n| crate::objects::pin_path(bpffs, n).exists())
}

/// Reads the stamp under `bpffs`.
pub fn read(bpffs: &Path) -> Found {
    let p = path(bpffs);
    if !p.exists() {
        return Found::Missing;
    }
    let stamp = MapData::from_pin(&p)
        .map_err(|e| e.to_string())
        .and_then(|md| Array::<_, Meta>::try_from(Map::Array(md)).map_err(|e| e.to_string()))
        .and_then(|a| a.get(&0, 0).map_err(|e| e.to_string()));
    match stamp {
        Ok(m) => Found::Stamp(m),
        Err(e) => Found::Unreadable(e),
    }
}

fn refused(bpffs: &Path, why: String) -> Error {
    Error::Layout {
        path: bpffs.into(),
        message: why,
    }
}

/// For readers of the pinned maps: an error unless they carry this build's stamp (or nothing
/// is pinned, which `open` then reports).
pub fn check(bpffs: &Path) -> Result<()> {
    match judge(&read(bpffs), maps_pinned(bpffs)) {
        Verdict::Compatible | Verdict::Stamp => Ok(()),
        Verdict::Refuse(why) => Err(refused(bpffs, why)),
    }
}

/// At install or adoption, before any map is created or any program replaced: refuses pinned
/// maps of another layout, and stamps a folder that holds no maps yet. `maps/` must exist.
pub fn ensure(bpffs: &Path) -> Result<()> {
    match judge(&read(bpffs), maps_pinned(bpffs)) {
        Verdict::Compatible => Ok(()),
        Verdict::Refuse(why) => Err(refused(bpffs, why)),
        Verdict::Stamp => stamp(bpffs),
    }
}

/// Creates the stamp map, writes this build's [`Meta`] and only then pins it (a pinned stamp is
/// never empty). A stale stamp (no maps next to it) is replaced.
fn stamp(bpffs: &Path) -> Result<()> {
    let p = path(bpffs);
    let bpffs_err = |message: String| Error::Bpffs {
        path: p.clone(),
        message,
    };
    match std::fs::remove_file(&p) {
        Ok(()) => {
            tracing::info!(pin = %p.display(), "replaced a stale layout stamp (no maps were pinned next to it)")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bpffs_err(format!("removing the stale layout stamp: {e}"))),
    }
    let fd = crate::dataplane::sys::create_array(layout::META, size_of::<Meta>() as u32, 1)
        .map_err(|e| bpffs_err(format!("creating the layout stamp map: {e}")))?;
    let md = MapData::from_fd(fd).map_err(|source| Error::Map {
        name: layout::META,
        op: "open",
        source,
    })?;
    let mut arr: Array<MapData, Meta> =
        Array::try_from(Map::Array(md)).map_err(|source| Error::Map {
            name: layout::META,
            op: "open",
            source,
        })?;
    arr.set(0, Meta::current(), 0)
        .map_err(|source| Error::Map {
            name: layout::META,
            op: "write",
            source,
        })?;
    arr.pin(&p)
        .map_err(|e| bpffs_err(format!("pinning the layout stamp: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(layout: u64, format: u32) -> Meta {
        Meta {
            format,
            _pad: 0,
            layout,
        }
    }

    #[test]
    fn judgement_table() {
        let ours = Meta::current();
        // Fresh folder, or a stamp whose maps are gone: stamp.
        assert_eq!(judge(&Found::Missing, false), Verdict::Stamp);
        assert_eq!(judge(&Found::Stamp(other(1, 1)), false), Verdict::Stamp);
        assert_eq!(judge(&Found::Unreadable("x".into()), false), Verdict::Stamp);
        // Our own stamp: with or without maps.
        assert_eq!(judge(&Found::Stamp(ours), true), Verdict::Compatible);
        assert_eq!(judge(&Found::Stamp(ours), false), Verdict::Compatible);
        // Maps of an unknown or other layout: refused, saying which.
        let Verdict::Refuse(why) = judge(&Found::Missing, true) else {
            panic!("maps without a stamp must be refused");
        };
        assert!(
            why.contains("no layout stamp") && why.contains(layout::META),
            "{why}"
        );
        let Verdict::Refuse(why) = judge(&Found::Stamp(other(0xabcd, ours.format)), true) else {
            panic!("another layout must be refused");
        };
        assert!(
            why.contains("000000000000abcd") && why.contains(&format!("{:016x}", ours.layout)),
            "{why}"
        );
        let Verdict::Refuse(why) = judge(&Found::Stamp(other(ours.layout, ours.format + 1)), true)
        else {
            panic!("another format must be refused");
        };
        assert!(
            why.contains(&format!("format {}", ours.format + 1)),
            "{why}"
        );
        assert!(matches!(
            judge(&Found::Unreadable("value size 8".into()), true),
            Verdict::Refuse(w) if w.contains("value size 8")
        ));
    }

    #[test]
    fn the_refusal_names_the_folder_and_the_fix() {
        let e = refused(Path::new("/sys/fs/bpf/x"), "why".into()).to_string();
        assert!(
            e.contains("/sys/fs/bpf/x") && e.contains("meshaccel uninstall --bpffs /sys/fs/bpf/x"),
            "{e}"
        );
    }
}
