//! A private containerd for one test run (Debian's `containerd` package, `scripts/install-cluster.sh`).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use meshaccel_e2e::containerd::Containerd;
//! let mut c = Containerd::start()?; // own config, root, state, socket under /tmp/meshaccel-containerd-*
//! c.import("/tmp/meshaccel.tar".as_ref())?; // ctr -n k8s.io images import
//! let out = c.run("meshaccel.local/meshaccel:dev", &["/usr/local/bin/meshaccel", "--version"])?;
//! # let _ = out; Ok(()) }
//! // Dropped (also while a test panics): containerd, its shims and their containers killed,
//! // the run's cgroups and folder removed.
//! ```
//!
//! Isolation from any other containerd on the host:
//! - config, root, state, the gRPC and ttrpc sockets and the `opt` plugin's directory are in the
//!   run's folder, the CRI plugin is off (nothing here is a kubelet's runtime yet);
//! - containerd 1.6 puts shim sockets, runc's state and ctr's stdio FIFOs under the fixed
//!   `/run/containerd`. So containerd runs in a private mount namespace with its own tmpfs on
//!   /run, and every `ctr` call enters that namespace: the host's /run is never written;
//! - containers get cgroups under `/meshaccel-containerd-<run>/` (a run-unique parent);
//! - the namespace is `k8s.io` (the kubelet's), but only inside this private instance.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The containerd namespace the kubelet uses (images imported here are the cluster's).
pub const NAMESPACE: &str = "k8s.io";

/// How long a `ctr` call may take (an import of a few hundred MB unpacks in seconds).
const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// A running private containerd. See the module docs.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
    sock: PathBuf,
    cgroup_parent: String,
    next_container: u32,
}

/// The config of a private instance: everything under `dir`.
pub fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    )
}

/// The private mount namespace's setup: a tmpfs on /run for what containerd 1.6 keeps in
/// /run/containerd whatever its config says, then containerd itself (same pid: exec).
const START_SCRIPT: &str = r#"set -e
mount -t tmpfs -o mode=755,size=64m tmpfs /run
mkdir -p /run/containerd
exec containerd --config "$1"
"#;

fn require_tools() -> anyhow::Result<()> {
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
        "unshare",
        "nsenter",
    ] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(tool).is_file());
        if !found {
            bail!("{tool} not found: run scripts/install-cluster.sh (Debian containerd, runc)");
        }
    }
    Ok(())
}

impl Containerd {
    /// Starts the instance and waits until it answers (20 s at most).
    pub fn start() -> anyhow::Result<Self> {
        require_tools()?;
        let dir = tempfile::Builder::new()
            .prefix("meshaccel-containerd-")
            .tempdir()
            .context("creating the run folder")?;
        let run_id = dir
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let config = dir.path().join("config.toml");
        fs::write(&config, config_toml(dir.path())).context("writing containerd's config")?;
        let log = fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(START_SCRIPT)
            .arg("meshaccel-containerd")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let mut c = Containerd {
            pid: child.id(),
            child: Some(child),
            sock: dir.path().join("containerd.sock"),
            cgroup_parent: run_id,
            dir,
            next_container: 0,
        };
        c.wait_ready(Duration::from_secs(20))?;
        Ok(c)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited ({status}) at start: {}", self.log_tail());
            }
            if self.sock.exists() {
                let out = self.ctr_output(&["version"])?;
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within {timeout:?}: {}",
                    self.sock.display(),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of containerd's log (for errors).
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(15).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The gRPC socket of this instance.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// `ctr` against this instance, in its mount namespace (ctr's FIFOs live in its /run).
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.pid))
            .args(["--", "ctr", "--address"])
            .arg(&self.sock)
            .args(["--namespace", NAMESPACE])
            .stdin(Stdio::null());
        cmd
    }

    fn ctr_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        let child = self
            .ctr()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting ctr {}", args.join(" ")))?;
        crate::wait_output_timeout(child, CTR_TIMEOUT)
            .with_context(|| format!("ctr {}", args.join(" ")))
    }

    /// `ctr images import <tarball>` (unpacked for the default snapshotter).
    pub fn import(&self, tarball: &Path) -> anyhow::Result<()> {
        let path = tarball.to_string_lossy();
        let out = self.ctr_output(&["images", "import", &path])?;
        if !out.status.success() {
            bail!(
                "ctr images import {path} failed ({}): {}\ncontainerd: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The names of the images of the namespace.
    pub fn image_names(&self) -> anyhow::Result<Vec<String>> {
        let out = self.ctr_output(&["images", "list", "--quiet"])?;
        if !out.status.success() {
            bail!(
                "ctr images list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Runs a container of `image` to completion (`ctr run --rm`) with `args` as its process
    /// (ctr replaces the image's entrypoint and command; user, env and workdir stay the image's).
    pub fn run(&mut self, image: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.next_container += 1;
        let id = format!("{}-{}", self.cgroup_parent, self.next_container);
        let cgroup = format!("/{}/{id}", self.cgroup_parent);
        let mut full = vec!["run", "--rm", "--cgroup", &cgroup, image, &id];
        full.extend_from_slice(args);
        self.ctr_output(&full)
    }

    /// Every process of this instance's shims (and so of its containers), found by the shim's
    /// `-address <our socket>` and by parentage: nothing of another containerd.
    fn our_processes(&self) -> Vec<i32> {
        let sock = self.sock.to_string_lossy().into_owned();
        let procs = list_processes();
        let mut ours: Vec<i32> = procs
            .iter()
            .filter(|p| {
                p.cmdline
                    .first()
                    .is_some_and(|a| a.contains("containerd-shim"))
                    && p.cmdline.contains(&sock)
            })
            .map(|p| p.pid)
            .collect();
        let mut i = 0;
        while i < ours.len() {
            let parent = ours[i];
            for p in &procs {
                if p.ppid == parent && !ours.contains(&p.pid) {
                    ours.push(p.pid);
                }
            }
            i += 1;
        }
        ours
    }

    fn remove_cgroups(&self) {
        let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for c in controllers.flatten() {
            let parent = c.path().join(&self.cgroup_parent);
            if parent.is_dir() {
                // Leaves first: rmdir of a cgroup only works once it has no children.
                if let Ok(children) = fs::read_dir(&parent) {
                    for child in children.flatten() {
                        if child.path().is_dir() {
                            let _ = fs::remove_dir(child.path());
                        }
                    }
                }
                let _ = fs::remove_dir(&parent);
            }
        }
    }
}

struct Proc {
    pid: i32,
    ppid: i32,
    cmdline: Vec<String>,
}

fn list_processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let cmdline = fs::read(e.path().join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push(Proc { pid, ppid, cmdline });
    }
    out
}

/// Mount points at or below `dir` in this mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers and shims first (they outlive containerd), then containerd: its mount
        // namespace, holding the snapshots' overlay mounts and the /run tmpfs, goes with them.
        for pid in self.our_processes() {
            // SAFETY: kill has no memory preconditions; pids were just read as ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.our_processes().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        self.remove_cgroups();
        for m in mounts_under(self.dir.path()) {
            if let Ok(c) = std::ffi::CString::new(m.to_string_lossy().as_bytes()) {
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // The TempDir removes the run's folder.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_in_the_run_folder() {
        let c = config_toml(Path::new("/tmp/run-x"));
        for line in c.lines().filter(|l| l.contains('/')) {
            assert!(line.contains("\"/tmp/run-x/"), "{line}");
        }
        assert!(c.contains("address = \"/tmp/run-x/containerd.sock\""));
        assert!(c.contains("io.containerd.grpc.v1.cri"));
    }
}
