//! One run of the local mesh: the switch netns, the pods, the run cgroup, the tracked children.

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    cgroup,
    pod::Pod,
    process::{Tracked, enter_pod},
};

/// Where `ip netns add` puts its bind mounts.
const NETNS_DIR: &str = "/run/netns";
/// The /16 the pods' /24s are taken from; the third octet comes from the run id.
const POD_NET: [u8; 2] = [10, 77];
/// How long teardown waits for a SIGKILLed process to go away.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// One run of the local mesh. See the crate docs. Dropping it (or [`Mesh::shutdown`]) kills the
/// processes it spawned and removes the netns, veths and cgroups it created, and nothing else.
pub struct Mesh {
    run_id: String,
    subnet: u8,
    cgroup_root: PathBuf,
    switch_netns: String,
    bridge: String,
    pods: Vec<Pod>,
    /// How many pods were attempted (names veths and picks addresses, also after a failed add).
    pod_attempts: u32,
    // What this run created, for teardown, in creation order.
    created_cgroup_root: bool,
    created_cgroups: Vec<PathBuf>,
    created_netns: Vec<String>,
    created_veths: Vec<String>,
    children: Vec<Tracked>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("run_id", &self.run_id)
            .field("cgroup_root", &self.cgroup_root)
            .field("pods", &self.pods)
            .field(
                "children",
                &self
                    .children
                    .iter()
                    .map(|c| (c.pid, &c.what))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Logs a teardown problem: through tracing when a subscriber is installed, else on stderr
/// (teardown failures must never go unseen).
fn report(msg: fmt::Arguments<'_>) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{msg}");
    } else {
        eprintln!("meshaccel-e2e: {msg}");
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    tracing::debug!(?cmd, "running");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

fn random_u32() -> io::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: b is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(b))
}

fn valid_pod_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl Mesh {
    /// Creates a run: picks a free run id, creates `<cgroup2 mount>/meshaccel-<runid>` and the
    /// switch netns `ma-<runid>-sw` with a bridge. Fails with a clear message when not root.
    pub fn new() -> anyhow::Result<Mesh> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("this test needs root (BPF, netns, cgroups): run it as root");
        }
        let mount = cgroup::cgroup2_mount()?;
        for _ in 0..64 {
            let v = random_u32().context("getrandom")? & 0xf_ffff;
            let run_id = format!("{v:05x}");
            let switch_netns = format!("ma-{run_id}-sw");
            if Path::new(NETNS_DIR).join(&switch_netns).exists() {
                continue;
            }
            let cgroup_root = mount.join(format!("meshaccel-{run_id}"));
            // mkdir is the atomic claim of the run id.
            match fs::create_dir(&cgroup_root) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("mkdir {}", cgroup_root.display()));
                }
            }
            let mut mesh = Mesh {
                subnet: (v % 256) as u8,
                bridge: format!("ma{run_id}br"),
                run_id,
                cgroup_root,
                switch_netns,
                pods: Vec::new(),
                pod_attempts: 0,
                created_cgroup_root: true,
                created_cgroups: Vec::new(),
                created_netns: Vec::new(),
                created_veths: Vec::new(),
                children: Vec::new(),
            };
            // On error `mesh` is dropped here, which removes whatever was created.
            mesh.create_switch()
                .with_context(|| format!("creating switch of run {}", mesh.run_id))?;
            tracing::info!(run_id = %mesh.run_id, cgroup = %mesh.cgroup_root.display(), "mesh created");
            return Ok(mesh);
        }
        bail!("found no free run id in 64 tries (stale meshaccel-* cgroups or ma-*-sw netns?)")
    }

    fn create_switch(&mut self) -> anyhow::Result<()> {
        ip(&["netns", "add", &self.switch_netns])?;
        self.created_netns.push(self.switch_netns.clone());
        let sw = self.switch_netns.as_str();
        ip(&["-n", sw, "link", "set", "lo", "up"])?;
        ip(&["-n", sw, "link", "add", &self.bridge, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", &self.bridge, "up"])?;
        Ok(())
    }

    /// The run id: 5 hex digits, part of every name this run creates.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// `<cgroup2 mount>/meshaccel-<runid>`: the parent of all pod cgroups (attach sock_ops here).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The netns holding the bridge: `ma-<runid>-sw`.
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// The pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pods' network: `10.77.<X>.0/24`, X derived from the run id.
    pub fn pod_network(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(POD_NET[0], POD_NET[1], self.subnet, 0), 24)
    }

    /// Adds a pod: netns `ma-<runid>-<name>` with lo up and `eth0` (10.77.X.n/24, n = 2, 3, …,
    /// default route via eth0) whose veth peer is on the switch bridge; cgroup
    /// `<cgroup_root>/ma-<runid>-<name>`. With `iptables_golden`, the file is applied unmodified
    /// with `iptables-restore` in the pod netns (and `ISTIO_OUTPUT` must exist afterwards).
    ///
    /// `name`: 1-32 of `[a-z0-9-]`, unique in the run.
    pub fn add_pod(&mut self, name: &str, iptables_golden: Option<&Path>) -> anyhow::Result<Pod> {
        ensure!(
            valid_pod_name(name),
            "pod name {name:?}: use 1-32 of [a-z0-9-]"
        );
        ensure!(
            !self.pods.iter().any(|p| p.name == name),
            "pod {name:?} exists already"
        );
        let idx = self.pod_attempts;
        ensure!(idx + 2 <= 254, "at most 253 pods per run");
        self.pod_attempts += 1;
        self.create_pod(name, idx, iptables_golden)
            .with_context(|| format!("adding pod {name:?} to run {}", self.run_id))
    }

    fn create_pod(&mut self, name: &str, idx: u32, golden: Option<&Path>) -> anyhow::Result<Pod> {
        let netns_name = format!("ma-{}-{name}", self.run_id);
        let pod = Pod {
            name: name.to_string(),
            netns_path: Path::new(NETNS_DIR).join(&netns_name),
            cgroup: self.cgroup_root.join(&netns_name),
            ip: Ipv4Addr::new(POD_NET[0], POD_NET[1], self.subnet, (idx + 2) as u8),
            netns_name,
        };
        let ns = pod.netns_name.as_str();
        let sw = self.switch_netns.as_str();
        // ≤ 15 chars: "ma" + 5 + "v" + ≤ 3.
        let veth = format!("ma{}v{idx}", self.run_id);

        ip(&["netns", "add", ns])?;
        self.created_netns.push(ns.to_string());
        // Both ends are created directly in their netns: nothing ever appears in the host netns.
        ip(&[
            "-n", sw, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        self.created_veths.push(veth.clone());
        ip(&["-n", sw, "link", "set", &veth, "master", &self.bridge, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "dev", "eth0"])?;

        fs::create_dir(&pod.cgroup).with_context(|| format!("mkdir {}", pod.cgroup.display()))?;
        self.created_cgroups.push(pod.cgroup.clone());

        if let Some(golden) = golden {
            let file =
                File::open(golden).with_context(|| format!("opening {}", golden.display()))?;
            run(pod.netns_command("iptables-restore").stdin(file))
                .with_context(|| format!("iptables-restore < {}", golden.display()))?;
            let saved = pod.netns_exec("iptables-save", &["-t", "nat"])?;
            let saved = String::from_utf8_lossy(&saved.stdout);
            ensure!(
                saved.lines().any(|l| l.starts_with(":ISTIO_OUTPUT ")),
                "no ISTIO_OUTPUT chain after iptables-restore < {}; iptables-save -t nat says:\n{saved}",
                golden.display()
            );
        }
        tracing::info!(pod = %pod.name, ip = %pod.ip, netns = %pod.netns_name, "pod added");
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The IPv6 address [`Mesh::add_ipv6`] gives `pod`: `fd77:<X>::<n>` (X, n as in its IPv4).
    pub fn ipv6_of(&self, pod: &Pod) -> Ipv6Addr {
        let o = pod.ip.octets();
        Ipv6Addr::new(0xfd77, u16::from(o[2]), 0, 0, 0, 0, 0, u16::from(o[3]))
    }

    /// Makes `pod` dual-stack: `fd77:<X>::<n>/64` on eth0 (no DAD), a default IPv6 route via
    /// eth0, and `::6/128` on lo, as istio-iptables adds it for the IPv6 inbound passthrough.
    /// With `capture_log` (an istio-iptables-capture golden: a command log whose
    /// `* table … COMMIT` blocks are iptables-restore payloads, the IPv4 ones first, then as many
    /// IPv6 ones), the IPv4 blocks are fed to `iptables-restore` and the IPv6 blocks to
    /// `ip6tables-restore`, unmodified.
    pub fn add_ipv6(&mut self, pod: &Pod, capture_log: Option<&Path>) -> anyhow::Result<Ipv6Addr> {
        ensure!(
            self.pods.iter().any(|p| p.netns_name == pod.netns_name),
            "pod {:?} is not a pod of run {}",
            pod.name,
            self.run_id
        );
        let ip6 = self.ipv6_of(pod);
        let ns = pod.netns_name.as_str();
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n", ns, "-6", "addr", "add", "::6/128", "dev", "lo", "nodad",
        ])?;
        ip(&["-n", ns, "-6", "route", "add", "default", "dev", "eth0"])?;
        if let Some(log) = capture_log {
            let text =
                fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
            let (v4, v6) =
                split_capture_log(&text).with_context(|| format!("splitting {}", log.display()))?;
            for (tool, payload) in [("iptables-restore", v4), ("ip6tables-restore", v6)] {
                let mut child = pod
                    .netns_command(tool)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("running {tool}"))?;
                {
                    use std::io::Write as _;
                    let mut stdin = child.stdin.take().context("stdin")?;
                    stdin.write_all(payload.as_bytes())?;
                }
                let out = child.wait_with_output()?;
                ensure!(
                    out.status.success(),
                    "{tool} < blocks of {} in pod {}: {}: {}",
                    log.display(),
                    pod.name,
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        tracing::info!(pod = %pod.name, %ip6, "pod has IPv6");
        Ok(ip6)
    }

    /// Removes one pod now, as a node does when a pod goes away: SIGKILLs every process in its
    /// cgroup, removes the cgroup, its veth and its netns (the kernel then frees its sockets).
    pub fn remove_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.netns_name == pod.netns_name)
            .with_context(|| format!("pod {:?} is not a pod of run {}", pod.name, self.run_id))?;
        cgroup::kill_all(&pod.cgroup, KILL_TIMEOUT)?;
        cgroup::remove(&pod.cgroup)?;
        self.created_cgroups.retain(|c| c != &pod.cgroup);
        ip(&["netns", "del", &pod.netns_name])?;
        self.created_netns.retain(|n| n != &pod.netns_name);
        // The veth went with the netns; forget it (its name holds the attempt index).
        let o = pod.ip.octets();
        let veth = format!("ma{}v{}", self.run_id, u32::from(o[3]) - 2);
        self.created_veths.retain(|v| v != &veth);
        self.pods.remove(i);
        tracing::info!(pod = %pod.name, "pod removed");
        Ok(())
    }

    /// Starts `program args` in `pod` (its cgroup, then its netns, then `as_uid` with gid = uid
    /// and no supplementary groups), with stdin null, stdout piped (for [`crate::wait_ready`] /
    /// [`crate::wait_output_timeout`]) and stderr inherited. The process is SIGKILLed and reaped at
    /// teardown, so a `Child` kept past the `Mesh` cannot be waited for.
    pub fn spawn(
        &mut self,
        pod: &Pod,
        as_uid: Option<u32>,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        self.spawn_cmd(pod, as_uid, cmd)
    }

    /// [`Mesh::spawn`] with a caller-built `Command` (own stdio, env, cwd). Do not set
    /// `Command::uid`/`gid`/`pre_exec` on it: std runs `uid()` before `pre_exec`, which would leave
    /// the process unable to join the pod.
    pub fn spawn_cmd(
        &mut self,
        pod: &Pod,
        as_uid: Option<u32>,
        mut cmd: Command,
    ) -> anyhow::Result<Child> {
        ensure!(
            self.pods.iter().any(|p| p.netns_name == pod.netns_name),
            "pod {:?} is not a pod of run {}",
            pod.name,
            self.run_id
        );
        let what = format!("{:?} in pod {}", cmd.get_program(), pod.name);
        // Opened before fork: the child only writes/setns on these fds (both O_CLOEXEC).
        let netns = File::open(&pod.netns_path)
            .with_context(|| format!("opening {}", pod.netns_path.display()))?;
        let procs_path = pod.cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("opening {}", procs_path.display()))?;
        let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: enter_pod only makes async-signal-safe syscalls on fds that stay open until
        // spawn returns (netns and procs are dropped after it).
        unsafe { cmd.pre_exec(move || enter_pod(procs_fd, netns_fd, as_uid)) };
        let child = cmd.spawn().with_context(|| {
            format!("spawning {what} (join cgroup, setns, setuid {as_uid:?}, exec)")
        })?;
        drop((netns, procs));
        self.track(child, what)
    }

    /// Starts `program args` on the host (no netns or cgroup change; e.g. the agent), stdio as
    /// [`Mesh::spawn`], killed at teardown.
    pub fn spawn_host(&mut self, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        self.spawn_host_cmd(cmd)
    }

    /// [`Mesh::spawn_host`] with a caller-built `Command`.
    pub fn spawn_host_cmd(&mut self, mut cmd: Command) -> anyhow::Result<Child> {
        let what = format!("{:?} on the host", cmd.get_program());
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        self.track(child, what)
    }

    fn track(&mut self, mut child: Child, what: String) -> anyhow::Result<Child> {
        match Tracked::new(&child, what) {
            Ok(t) => {
                tracing::debug!(pid = t.pid, what = %t.what, "spawned");
                self.children.push(t);
                Ok(child)
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e).context("pidfd_open")
            }
        }
    }

    /// Tears the run down now (same as dropping it).
    pub fn shutdown(self) {}

    fn teardown(&mut self) {
        for child in self.children.drain(..) {
            if let Err(e) = child.kill_and_reap(KILL_TIMEOUT) {
                report(format_args!(
                    "run {}: killing {} (pid {}): {e:#}",
                    self.run_id, child.what, child.pid
                ));
            }
        }
        // Untracked descendants (a relay's children, a shell's background jobs) are still in the
        // pod cgroups: cgroup.kill them, then remove the (now empty) cgroups.
        for cg in self.created_cgroups.drain(..).rev() {
            if let Err(e) = cgroup::kill_all(&cg, KILL_TIMEOUT).and_then(|()| cgroup::remove(&cg)) {
                report(format_args!("run {}: removing cgroup: {e:#}", self.run_id));
            }
        }
        if std::mem::take(&mut self.created_cgroup_root)
            && let Err(e) = cgroup::remove(&self.cgroup_root)
        {
            let procs = cgroup::procs(&self.cgroup_root).unwrap_or_default();
            report(format_args!(
                "run {}: {e:#} (processes left in it: {procs:?}; child cgroups not created by the run?)",
                self.run_id
            ));
        }
        // Deleting the netns would take the veths along, but asynchronously; be explicit.
        for veth in self.created_veths.drain(..) {
            if let Err(e) = ip(&["-n", &self.switch_netns, "link", "del", &veth]) {
                report(format_args!(
                    "run {}: deleting veth {veth}: {e:#}",
                    self.run_id
                ));
            }
        }
        // Pods first, the switch (created first) last.
        for ns in self.created_netns.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                report(format_args!(
                    "run {}: deleting netns {ns}: {e:#}",
                    self.run_id
                ));
            }
        }
        tracing::info!(run_id = %self.run_id, "mesh removed");
    }
}

/// Splits an istio-iptables-capture command log into its IPv4 and IPv6 iptables-restore
/// payloads: the `* table` … `COMMIT` blocks, the first half IPv4, the second half IPv6.
pub fn split_capture_log(text: &str) -> anyhow::Result<(String, String)> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('*') {
            cur = Some(format!("*{}\n", table.trim()));
        } else if let Some(b) = cur.as_mut() {
            b.push_str(line);
            b.push('\n');
            if line.trim() == "COMMIT" {
                blocks.push(cur.take().expect("a block"));
            }
        }
    }
    ensure!(
        !blocks.is_empty() && blocks.len() % 2 == 0 && cur.is_none(),
        "expected IPv4 blocks then as many IPv6 blocks, found {} complete block(s)",
        blocks.len()
    );
    let v6 = blocks.split_off(blocks.len() / 2);
    ensure!(
        v6.iter().all(|b| b.contains("::")) && !blocks.iter().any(|b| b.contains("::")),
        "the second half of the blocks is not the IPv6 one"
    );
    Ok((blocks.concat(), v6.concat()))
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Never panic in drop (it may run while a test unwinds: a second panic aborts).
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown())).is_err() {
            report(format_args!(
                "run {}: teardown panicked; some resources may be left",
                self.run_id
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        assert!(valid_pod_name("a"));
        assert!(valid_pod_name("client-1"));
        assert!(!valid_pod_name(""));
        assert!(!valid_pod_name("-a"));
        assert!(!valid_pod_name("A"));
        assert!(!valid_pod_name("a/b"));
        assert!(!valid_pod_name(&"a".repeat(33)));
    }
}
