//! The files the agent writes for `meshaccel status`: what it needs but cannot read from the
//! kernel maps. Both live in a run folder (`--state-dir`, default [`DEFAULT_DIR`]; never on the
//! bpffs, which holds only BPF objects), named after the bpffs folder so that agents with
//! different `--bpffs` do not collide; `status` shows what it finds, `uninstall` removes them.
//! Each is written atomically (temporary file + rename).
//!
//! - The state file ([`AgentState`]): the kernel knows workloads by netns cookie only; the agent
//!   knows their names (`namespace/name`, [`crate::desired::DesiredState::names`]). It writes
//!   them, with its pid and the address of its HTTP endpoints, after each reconcile that changed
//!   the names. Without it `status` shows cookies.
//! - The xDS status file ([`XdsStatus`]): what the xDS source knows of istiod, after every event
//!   of its stream.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use istio_integration::xds::XdsSnapshot;

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

    /// Sets the workload names; returns whether they changed.
    pub fn set_names(&mut self, names: &BTreeMap<u64, String>) -> bool {
        let names: BTreeMap<String, String> = names
            .iter()
            .map(|(c, n)| (c.to_string(), n.clone()))
            .collect();
        let changed = self.state.workloads != names;
        self.state.workloads = names;
        changed
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

/// What the xDS source writes for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct XdsStatus {
    pub istiod: String,
    pub node_id: String,
    pub connected: bool,
    /// The last good snapshot (kept while istiod is away).
    pub snapshot: Option<XdsSnapshot>,
    /// Responses rejected (NACKed) so far, and the last reason.
    pub rejected: u64,
    pub last_rejection: Option<String>,
    /// Streams that ended, and why the last one did.
    pub disconnects: u64,
    pub last_error: Option<String>,
    pub updated_unix: u64,
}

impl XdsStatus {
    pub fn render_text(&self) -> String {
        let mut o = format!(
            "istiod:           {} ({}), node {}\n",
            self.istiod,
            if self.connected {
                "connected"
            } else {
                "not connected"
            },
            self.node_id
        );
        match &self.snapshot {
            Some(s) => {
                let port = |p: Option<u16>| p.map_or("-".to_string(), |p| p.to_string());
                o.push_str(&format!(
                    "xDS capture:      outbound {} inbound {} passthrough {:?} mesh endpoints {} (versions lds {} cds {} eds {})\n",
                    port(s.outbound_port),
                    port(s.inbound_port),
                    s.inbound_passthrough_binds,
                    s.mesh_endpoints.len(),
                    s.versions.listeners,
                    s.versions.clusters,
                    s.versions.endpoints
                ));
            }
            None => o.push_str("xDS capture:      nothing accepted yet (Istio's defaults apply)\n"),
        }
        if let Some(r) = &self.last_rejection {
            o.push_str(&format!(
                "xDS rejected:     {} (last: {r})\n",
                self.rejected
            ));
        }
        o
    }

    /// Writes the file at `path`; a failure is logged (the source goes on without it).
    pub fn write(&self, path: &Path) {
        let tmp = path.with_extension("tmp");
        let res = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the xDS status file");
        }
    }
}

/// `<state_dir>/xds-<hash>.json`, beside the agent's state file for the same bpffs.
pub fn xds_status_path(state_dir: &Path, bpffs: &Path) -> PathBuf {
    let p = path_for(state_dir, bpffs);
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bpffs.json")
        .replacen("bpffs-", "xds-", 1);
    p.with_file_name(name)
}

/// The xDS status of the agent of `bpffs`, if it runs (or ran) with `--istiod`.
pub fn read_xds_status(state_dir: &Path, bpffs: &Path) -> Option<XdsStatus> {
    let text = std::fs::read_to_string(xds_status_path(state_dir, bpffs)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Removes the xDS status file (uninstall).
pub fn remove_xds_status(state_dir: &Path, bpffs: &Path) {
    let _ = std::fs::remove_file(xds_status_path(state_dir, bpffs));
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

    #[test]
    fn the_xds_status_file_sits_beside_the_state_file() {
        let p = xds_status_path(Path::new("/run/x"), Path::new("/sys/fs/bpf/m"));
        assert!(p.starts_with("/run/x"));
        assert!(p.file_name().unwrap().to_str().unwrap().starts_with("xds-"));
    }
}
