//! The static workloads file source (`--workloads`): read whole at start, when the file
//! changes, on SIGHUP and at every resync (the agent's loop decides when); a file that does not
//! validate leaves the last good contribution in force.
use std::{path::Path, time::SystemTime};

use tracing::{error, info};

use crate::{
    agent::shared::Shared,
    desired::{self, Inputs, NetnsRef},
    error::Result,
    netns,
    sources::Source,
    workloads::WorkloadsFile,
};

/// File identity used to notice changes (atomic renames included).
pub fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reads, validates and resolves the workloads file: the file is taken whole or not at all.
pub fn load(path: &Path) -> Result<Inputs> {
    let file = WorkloadsFile::load(path)?;
    let mut inputs = Inputs::from_static(&file);
    // Resolve here, so that a bad entry rejects this file only, not the other sources.
    let resolved = desired::compute(&inputs, netns::cookie_of_path)?;
    for w in &mut inputs.workloads {
        if let Some((cookie, _)) = resolved.names.iter().find(|(_, id)| **id == w.id) {
            w.netns = NetnsRef::Cookie(*cookie);
        }
    }
    Ok(inputs)
}

/// Loads `path` into the static source, keeping the last good contribution on error.
pub fn reload(shared: &Shared, path: &Path, why: &str) {
    match load(path) {
        Ok(inputs) => {
            let changed = shared.snapshot().static_file.as_ref() != Some(&inputs);
            if changed || why == "start" {
                info!(
                    trigger = why,
                    workloads = inputs.workloads.len(),
                    "workloads file loaded"
                );
            }
            shared.update(|s| s.static_file = Some(inputs));
            shared.source_synced(Source::StaticFile, true);
        }
        Err(e) => {
            shared.source_error(Source::StaticFile);
            let kept = shared.snapshot().static_file.is_some();
            error!(trigger = why, path = %path.display(), error = %e, kept_last_good = kept, "workloads file rejected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_static_file_names_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.yaml");
        std::fs::write(
            &p,
            "workloads:\n  - name: gone\n    netns: /nonexistent/netns\n",
        )
        .unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("default/gone") && e.contains("/nonexistent/netns"),
            "{e}"
        );
        std::fs::write(
            &p,
            "workloads:\n  - name: me\n    netns: /proc/self/ns/net\n",
        )
        .unwrap();
        let ok = load(&p).unwrap();
        assert!(matches!(ok.workloads[0].netns, NetnsRef::Cookie(c) if c != 0));
    }
}
