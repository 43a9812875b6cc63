//! The agent's state file: what `meshaccel status` needs but cannot read from the kernel maps.
//!
//! The kernel knows workloads by netns cookie only; the agent knows their names
//! (`namespace/name`, [`crate::desired::DesiredState::names`]). The agent writes them, with its
//! pid and the address of its HTTP endpoints, to a small JSON file in a run folder (`--state-dir`,
//! default [`DEFAULT_DIR`]; never on the bpffs, which holds only BPF objects), named after the
//! bpffs folder so that agents with different `--bpffs` do not collide. `status` reads it when it
//! is there and shows cookies otherwise; `uninstall` removes it. It is written atomically
//! (temporary file + rename) after each reconcile that changed the names.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Default `--state-dir`.
pub const DEFAULT_DIR: &str = "/run/meshaccel";

/// What the agent writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentState {
    /// The agent's `--bpffs`.
    pub bpffs: PathBuf,
    /// The agent's process id (the file may outlive the agent: acceleration stays when it stops).
    pub pid: u32,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if they are.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Unix time of the last write.
    pub updated_unix: u64,
    /// netns cookie (decimal) -> `namespace/name`.
    pub workloads: BTreeMap<String, String>,
}

/// The state file of the agent whose pins are under `bpffs`: `<state_dir>/bpffs-<hash>.json`,
/// the hash (FNV-1a, 64 bit) of the absolute bpffs path.
pub fn path_for(state_dir: &Path, bpffs: &Path) -> PathBuf {
    let abs = std::path::absolute(bpffs).unwrap_or_else(|_| bpffs.to_path_buf());
    let hash = abs
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    state_dir.join(format!("bpffs-{hash:016x}.json"))
}

/// Reads the state file of the agent of `bpffs`; `None` when there is none.
pub fn read(state_dir: &Path, bpffs: &Path) -> Result<Option<AgentState>> {
    let path = path_for(state_dir, bpffs);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::State {
                path,
                message: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::State {
            path,
            message: format!("not a meshaccel state file: {e}"),
        })
}

/// Removes the state file of the agent of `bpffs`; returns whether there was one.
pub fn remove(state_dir: &Path, bpffs: &Path) -> Result<bool> {
    let path = path_for(state_dir, bpffs);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::State {
            path,
            message: format!("removing: {e}"),
        }),
    }
}

/// The agent's handle on its state file.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    state: AgentState,
    written: bool,
}

impl StateFile {
    pub fn new(state_dir: &Path, bpffs: &Path) -> Self {
        Self {
            path: path_for(state_dir, bpffs),
            state: AgentState {
                bpffs: bpffs.to_path_buf(),
                pid: std::process::id(),
                ..Default::default()
            },
            written: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has been written by this process.
    pub fn written(&self) -> bool {
        self.written
    }

    pub fn set_names(&mut self, names: &BTreeMap<u64, String>) {
        self.state.workloads = names
            .iter()
            .map(|(c, n)| (c.to_string(), n.clone()))
            .collect();
    }

    pub fn set_metrics_addr(&mut self, addr: std::net::SocketAddr) {
        self.state.metrics_addr = Some(addr.to_string());
        if self.written
            && let Err(e) = self.write()
        {
            tracing::warn!(error = %e, "cannot write the state file");
        }
    }

    /// Writes the file atomically (creating the folder).
    pub fn write(&mut self) -> Result<()> {
        let err = |message: String| Error::State {
            path: self.path.clone(),
            message,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("creating the folder: {e}")))?;
        }
        self.state.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let text = serde_json::to_string_pretty(&self.state).map_err(|e| err(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| err(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(format!("renaming {} into place: {e}", tmp.display()))
        })?;
        self.written = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("run");
        let bpffs = Path::new("/sys/fs/bpf/meshaccel");
        assert_eq!(read(&state_dir, bpffs).unwrap(), None);
        let mut sf = StateFile::new(&state_dir, bpffs);
        sf.set_names(&BTreeMap::from([(42, "bookinfo/reviews-v1".to_string())]));
        sf.write().unwrap();
        sf.set_metrics_addr("127.0.0.1:9880".parse().unwrap());
        let st = read(&state_dir, bpffs).unwrap().unwrap();
        assert_eq!(st.workloads["42"], "bookinfo/reviews-v1");
        assert_eq!(st.metrics_addr.as_deref(), Some("127.0.0.1:9880"));
        assert_eq!(st.pid, std::process::id());
        // Another bpffs has a file of its own.
        assert_eq!(read(&state_dir, Path::new("/other/bpffs")).unwrap(), None);
        assert!(remove(&state_dir, bpffs).unwrap());
        assert!(!remove(&state_dir, bpffs).unwrap());
        assert_eq!(
            std::fs::read_dir(&state_dir).unwrap().count(),
            0,
            "no temporary files left"
        );
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let bpffs = Path::new("/b");
        std::fs::write(path_for(dir.path(), bpffs), "{nope").unwrap();
        let e = read(dir.path(), bpffs).unwrap_err().to_string();
        assert!(
            e.contains("bpffs-") && e.contains("not a meshaccel state file"),
            "{e}"
        );
    }

    #[test]
    fn the_name_depends_on_the_absolute_bpffs_path() {
        let d = Path::new("/run/meshaccel");
        assert_eq!(
            path_for(d, Path::new("/sys/fs/bpf/meshaccel")),
            path_for(d, Path::new("/sys/fs/bpf/meshaccel"))
        );
        assert_ne!(
            path_for(d, Path::new("/sys/fs/bpf/meshaccel")),
            path_for(d, Path::new("/sys/fs/bpf/other"))
        );
        assert!(path_for(d, Path::new("/x")).starts_with(d));
    }
}
