//! Network namespace identity (the kernel's netns cookie, as the eBPF programs see it), and
//! where the node's network namespaces are found.
use std::{
    collections::{BTreeMap, HashSet},
    io,
    os::fd::AsRawFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the namespace at `path` (a /run/netns file or /proc/PID/ns/net).
/// Found by entering it on a short-lived thread and asking a socket there (SO_NETNS_COOKIE).
pub fn cookie_of_path(path: &Path) -> io::Result<u64> {
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; the thread ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace")
                } else {
                    e
                });
            }
            current_cookie()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket syscalls on a fd we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_cookie_is_stable_and_not_a_file_netns() {
        let a = cookie_of_path(Path::new("/proc/self/ns/net"))
            .expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_eq!(a, current_cookie().unwrap());
        assert_ne!(a, 0);
        let err = cookie_of_path(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(cookie_of_path(Path::new("/nonexistent/netns")).is_err());
    }
}

/// Where the node's network namespaces are found.
#[derive(Clone, Debug)]
pub struct ScanConfig {
    /// Folders of netns bind mounts (every file in them is tried).
    pub netns_dirs: Vec<PathBuf>,
    /// The proc filesystem whose `<pid>/ns/net` are tried (`None`: skip processes).
    pub proc: Option<PathBuf>,
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self {
            netns_dirs: vec![PathBuf::from("/run/netns"), PathBuf::from("/var/run/netns")],
            proc: Some(PathBuf::from("/proc")),
        }
    }
}

/// One path per distinct network namespace (by inode), the agent's own namespace left out (no
/// pod lives there: hostNetwork pods are never accelerated).
pub fn candidates(cfg: &ScanConfig) -> Vec<PathBuf> {
    let own = std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let mut seen: HashSet<(u64, u64)> = own.into_iter().collect();
    let mut out = Vec::new();
    let mut consider = |p: PathBuf| {
        // metadata() follows the /proc magic link to the nsfs inode; a bind mount is that inode.
        if let Ok(m) = std::fs::metadata(&p)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(p);
        }
    };
    for dir in &cfg.netns_dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                consider(e.path());
            }
        }
    }
    if let Some(proc) = &cfg.proc
        && let Ok(rd) = std::fs::read_dir(proc)
    {
        {
            for e in rd.flatten() {
                let name = e.file_name();
                if name
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                {
                    consider(e.path().join("ns/net"));
                }
            }
        }
    }
    out
}

/// A file of each network namespace found (netns folders, then processes), by cookie: how the
/// agent reaches a workload's netns it knows by cookie only (from the Kubernetes source).
pub fn paths_by_cookie(cfg: &ScanConfig) -> BTreeMap<u64, PathBuf> {
    let paths = candidates(cfg);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut out = BTreeMap::new();
            for p in paths {
                let Ok(f) = std::fs::File::open(&p) else {
                    continue;
                };
                // SAFETY: setns on this (scan-only) thread, which ends when the scan does.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    continue;
                }
                if let Ok(c) = current_cookie() {
                    out.entry(c).or_insert(p);
                }
            }
            out
        })
        .join()
        .unwrap_or_default()
    })
}
