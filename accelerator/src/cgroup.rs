//! Finding cgroup v2: never hard-coded (it is /sys/fs/cgroup on most nodes, elsewhere on hybrid hosts).
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The first cgroup2 mount in /proc/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    parse_cgroup2_root(&mounts)
}

fn parse_cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// The cgroup v2 folder an operator's `--cgroup` means: the path itself, or on a hybrid host
/// (cgroup v1 controllers under a tmpfs, v2 at `<path>/unified`) its `unified` mount, so the
/// chart's default `/sys/fs/cgroup` works on both layouts. Anything else stays as given and is
/// refused later with the path in the error.
pub fn resolve(path: &Path) -> PathBuf {
    resolve_with(path, is_cgroup2)
}

fn resolve_with(path: &Path, is_v2: impl Fn(&Path) -> bool) -> PathBuf {
    let unified = path.join("unified");
    if !is_v2(path) && is_v2(&unified) {
        unified
    } else {
        path.to_path_buf()
    }
}

/// Whether `path` is a folder of a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_hosts_cgroup_root_means_its_unified_mount() {
        let v2 = |p: &Path| p == Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve_with(Path::new("/sys/fs/cgroup"), v2),
            Path::new("/sys/fs/cgroup/unified")
        );
        let v2 = |p: &Path| p == Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve_with(Path::new("/sys/fs/cgroup"), v2),
            Path::new("/sys/fs/cgroup")
        );
        // Neither: left for the attach to refuse with the operator's path.
        assert_eq!(resolve_with(Path::new("/x"), |_| false), Path::new("/x"));
    }

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_root(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_root("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_cgroup2_root("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn this_host_has_cgroup2() {
        let root = cgroup2_root().expect("this machine mounts cgroup v2 (needed by sock_ops)");
        assert!(is_cgroup2(&root), "{} is not cgroup2", root.display());
        assert!(!is_cgroup2(Path::new("/proc")));
    }
}
