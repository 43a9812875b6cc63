//! Off that stays off: which installation of meshaccel a node's bpffs folder belongs to, which
//! ones were uninstalled there, and the lock that orders agents and `uninstall`.
//!
//! `uninstall` records the generation it uninstalled (`<bpffs>/uninstalled/<generation>`, a
//! folder: a bpffs holds folders and BPF objects only, and it is the one place the agent's
//! DaemonSet and the chart's uninstall hook share). An agent of that generation then never
//! installs again, neither the running one nor one its supervisor restarts, until an install
//! is asked for explicitly: an agent with another `--install-generation` (the chart renders a
//! new one at every `helm install`/`upgrade`), or the record removed by hand. Agents and
//! `uninstall` write the kernel state only while holding an exclusive `flock` on the bpffs
//! folder and after looking at the record, so no agent can write `enabled` back after an
//! uninstall, nor write an epoch read before it.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The generation of agents started without `--install-generation`.
pub const DEFAULT_GENERATION: &str = "default";

/// Checks an install generation: it names a folder, so 1 to 63 characters of `A-Z a-z 0-9 . _ -`,
/// not starting with a dot.
pub fn check_generation(g: &str) -> Result<String, String> {
    let ok = !g.is_empty()
        && g.len() <= 63
        && !g.starts_with('.')
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(g.to_string())
    } else {
        Err(format!(
            "{g:?} is not an install generation: use 1 to 63 characters of A-Z a-z 0-9 . _ - (not starting with a dot), e.g. the Helm release revision and a random suffix"
        ))
    }
}

/// The exclusive lock on a node's bpffs folder; released when dropped.
pub struct NodeLock {
    bpffs: PathBuf,
    _dir: File,
}

/// Waits for the exclusive lock on the bpffs folder (held for milliseconds by its holders).
pub fn lock(bpffs: &Path) -> Result<NodeLock> {
    let err = |message: String| Error::Bpffs {
        path: bpffs.into(),
        message,
    };
    let dir = File::open(bpffs).map_err(|e| err(format!("opening it to lock it: {e}")))?;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(err(format!("locking it: {e}")));
        }
    }
    Ok(NodeLock {
        bpffs: bpffs.into(),
        _dir: dir,
    })
}

impl NodeLock {
    fn uninstalled_dir(&self) -> PathBuf {
        self.bpffs.join("uninstalled")
    }

    fn generation_dir(&self) -> PathBuf {
        self.bpffs.join("generation")
    }

    /// Whether `generation` was uninstalled on this node.
    pub fn uninstalled(&self, generation: &str) -> bool {
        self.uninstalled_dir().join(generation).is_dir()
    }

    /// The refusal an agent of an uninstalled generation gets.
    pub fn refusal(&self, generation: &str) -> Error {
        Error::Uninstalled {
            record: self.uninstalled_dir().join(generation),
            generation: generation.into(),
        }
    }

    /// The generations recorded as installed here (normally one).
    pub fn installed(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.generation_dir())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        out.sort();
        out
    }

    /// Records `generation` as the one installed here (the only one).
    pub fn record_installed(&self, generation: &str) -> Result<()> {
        let dir = self.generation_dir();
        for old in self.installed() {
            if old != generation {
                let _ = std::fs::remove_dir(dir.join(old));
            }
        }
        self.mkdir(&dir.join(generation))
    }

    /// Records every installed generation as uninstalled (with pins but no generation recorded,
    /// an older version's install: the default one), and forgets them as installed.
    pub fn record_uninstalled(&self, pins: bool) -> Result<Vec<String>> {
        let mut gens = self.installed();
        if gens.is_empty() && pins {
            gens.push(DEFAULT_GENERATION.into());
        }
        for g in &gens {
            self.mkdir(&self.uninstalled_dir().join(g))?;
            let _ = std::fs::remove_dir(self.generation_dir().join(g));
        }
        Ok(gens)
    }

    fn mkdir(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::Bpffs {
            path: path.into(),
            message: format!("creating it: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_name_folders() {
        for ok in ["default", "3-x9k2a", "rel.1_a"] {
            assert_eq!(check_generation(ok).as_deref(), Ok(ok));
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(64)] {
            let e = check_generation(bad).unwrap_err();
            assert!(e.contains("install generation"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn uninstall_records_the_installed_generation_and_the_lock_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let l = lock(dir.path()).unwrap();
        assert!(!l.uninstalled("g1"));
        l.record_installed("g0").unwrap();
        l.record_installed("g1").unwrap();
        assert_eq!(l.installed(), ["g1"], "one installed generation");
        assert_eq!(l.record_uninstalled(true).unwrap(), ["g1"]);
        assert!(l.uninstalled("g1") && !l.uninstalled("g0"));
        assert!(l.installed().is_empty());
        // Uninstalled again: nothing is installed, nothing more recorded.
        assert!(l.record_uninstalled(false).unwrap().is_empty());
        assert!(!l.uninstalled(DEFAULT_GENERATION));
        // Pins but no generation recorded (an older version's install): the default one.
        assert_eq!(l.record_uninstalled(true).unwrap(), [DEFAULT_GENERATION]);
        assert!(l.refusal("g1").to_string().contains("--install-generation"));
        // A second holder waits until the first lets go.
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _l2 = lock(&path).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the lock is exclusive"
        );
        drop(l);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("taken once released");
        t.join().unwrap();
    }
}
