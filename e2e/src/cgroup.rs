//! cgroup v2 helpers: find the mount, empty a cgroup, remove it.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The first cgroup2 mount in /proc/mounts (`/sys/fs/cgroup` on most hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub(crate) fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (_dev, Some(dir), Some(fstype)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount_path(dir)));
        }
    }
    bail!(
        "no cgroup2 filesystem in /proc/mounts: mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u16::from(b[i + 1] - b'0') * 64
                + u16::from(b[i + 2] - b'0') * 8
                + u16::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids currently in `cgroup` (its own cgroup.procs, not its children's).
pub(crate) fn procs(cgroup: &Path) -> io::Result<Vec<i32>> {
    Ok(fs::read_to_string(cgroup.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn populated(cgroup: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(cgroup.join("cgroup.events"))?;
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

/// SIGKILLs every process in `cgroup` and its descendants (`cgroup.kill`, kernel ≥ 5.14; else
/// one kill per pid of cgroup.procs) and waits up to `timeout` until it is empty.
pub(crate) fn kill_all(cgroup: &Path, timeout: Duration) -> anyhow::Result<()> {
    if !populated(cgroup).with_context(|| format!("reading {}/cgroup.events", cgroup.display()))? {
        return Ok(());
    }
    if let Err(e) = fs::write(cgroup.join("cgroup.kill"), "1") {
        tracing::debug!(cgroup = %cgroup.display(), "cgroup.kill: {e}; killing pid by pid");
        for pid in procs(cgroup).unwrap_or_default() {
            // SAFETY: plain syscall; pid is in a cgroup this run created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + timeout;
    while populated(cgroup)? {
        if Instant::now() > deadline {
            bail!(
                "{} still has processes {:?} after SIGKILL",
                cgroup.display(),
                procs(cgroup).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// rmdir with a few retries (a cgroup whose last process just exited can be briefly busy).
pub(crate) fn remove(cgroup: &Path) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                tries += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", cgroup.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape() {
        assert_eq!(
            unescape_mount_path("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path(r"/a\04"), r"/a\04");
    }
}
