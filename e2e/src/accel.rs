//! The meshaccel agent as tests, benchmarks and the demo drive it: a workloads file written from
//! the mesh's pods, the agent process on the host, `status` as JSON, and a teardown that kills the
//! agent, uninstalls and removes the run's bpffs (also when a test panics).
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Mesh, Pod, workspace_bin};

/// How one pod appears in the workloads file.
#[derive(Clone, Debug)]
pub struct Workload {
    pub pod: Pod,
    pub enabled: bool,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// The workloads file's `appSockets`: `trusted` (true) or `auto`.
    pub apps_trusted: bool,
}

impl Workload {
    /// Enabled, its apps trusted (`appSockets: trusted`): the e2e tool's apps read as event
    /// loops do (poll, then a non-blocking recv: `sock::read_ready`), so their sockets may be
    /// accelerated like the sidecar's, which the tests of the dataplane's mechanisms need.
    pub fn on(pod: &Pod) -> Self {
        Self {
            pod: pod.clone(),
            enabled: true,
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            apps_trusted: true,
        }
    }
    /// Enabled with the default `appSockets: auto`: meshaccel decides which app sockets it may
    /// accelerate (what an operator gets who says nothing about the apps).
    pub fn auto(pod: &Pod) -> Self {
        Self {
            apps_trusted: false,
            ..Self::on(pod)
        }
    }
    pub fn off(pod: &Pod) -> Self {
        Self {
            enabled: false,
            ..Self::on(pod)
        }
    }
}

/// The YAML the agent reads.
pub fn workloads_yaml(enabled: bool, scope: Scope, workloads: &[Workload]) -> String {
    let scope = match scope {
        Scope::Mesh => "mesh",
        Scope::All => "all",
    };
    let mut y = format!("enabled: {enabled}\nscope: {scope}\nworkloads:\n");
    for w in workloads {
        let _ = writeln!(
            y,
            "  - name: {}\n    namespace: e2e\n    netns: {}\n    ips: [{}]\n    enabled: {}\n    excludeInboundPorts: {:?}\n    excludeOutboundPorts: {:?}\n    appSockets: {}",
            w.pod.name,
            w.pod.netns_path.display(),
            w.pod.ip,
            w.enabled,
            w.exclude_inbound_ports,
            w.exclude_outbound_ports,
            if w.apps_trusted { "trusted" } else { "auto" }
        );
    }
    y
}

/// Which connections the agent accelerates (the workloads file's `scope`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Istio's three legs only (the default).
    #[default]
    Mesh,
    /// Every TCP connection between enabled workloads (e.g. app ↔ app over loopback).
    All,
}

/// A running meshaccel agent attached to the mesh's cgroup, with its pins in a bpffs of the run.
pub struct Accel {
    bin: PathBuf,
    dir: PathBuf,
    bpffs: PathBuf,
    workloads: PathBuf,
    cgroup: PathBuf,
    agent: Option<Child>,
    /// (global switch, enabled workloads, of them with trusted apps) of the last file written
    /// by `set_workloads`.
    expect: (bool, u64, u64),
    scope: Scope,
    /// Extra environment of the agent (Kubernetes mode: node name, kubeconfig).
    extra_env: Vec<(String, String)>,
    /// Kubernetes mode: the agent's stderr goes to this file of the run (see `agent_log`).
    log: Option<PathBuf>,
    /// Kubernetes mode (and launched agents): a start waits only until the programs are
    /// installed, not for the workloads file's workloads.
    installed_only: bool,
    /// Runs the agent through this command (e.g. `setpriv …` to limit its capabilities).
    launcher: Vec<String>,
}

impl Accel {
    /// Writes the workloads file and starts the agent; returns once the maps hold the file's
    /// workloads.
    pub fn start(mesh: &Mesh, enabled: bool, workloads: &[Workload]) -> anyhow::Result<Accel> {
        Self::start_with(mesh, enabled, Scope::Mesh, workloads)
    }

    /// [`Accel::start`] with a scope.
    pub fn start_with(
        mesh: &Mesh,
        enabled: bool,
        scope: Scope,
        workloads: &[Workload],
    ) -> anyhow::Result<Accel> {
        Self::start_env(mesh, enabled, scope, workloads, &[])
    }

    /// [`Accel::start_with`] with extra `MESHACCEL_*` settings for the agent (e.g.
    /// `MESHACCEL_SOCKHASH_CAPACITY`); they apply to every later [`Accel::start_agent`] too.
    pub fn start_env(
        mesh: &Mesh,
        enabled: bool,
        scope: Scope,
        workloads: &[Workload],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Accel> {
        let mut a = Self::unstarted(mesh, enabled, scope, env)?;
        a.write_workloads(enabled, workloads)?;
        a.start_agent()?;
        Ok(a)
    }

    /// [`Accel::start`] with the agent run through `launcher` (e.g. `setpriv` limiting its
    /// capabilities), its log in a file of the run ([`Accel::agent_log`]). Returns the `Accel`
    /// even when the agent fails to start, with the error, so tests can look at both.
    pub fn start_launched(
        mesh: &Mesh,
        workloads: &[Workload],
        launcher: &[&str],
    ) -> (Accel, anyhow::Result<()>) {
        let mut a = match Self::unstarted(mesh, true, Scope::Mesh, &[]) {
            Ok(a) => a,
            Err(e) => panic!("preparing the agent: {e:#}"),
        };
        a.log = Some(a.dir.join("agent.log"));
        a.installed_only = true;
        a.set_launcher(launcher);
        let started = a
            .write_workloads(true, workloads)
            .and_then(|()| a.start_agent());
        (a, started)
    }

    /// [`Accel::start_with`] with the agent's log in a file of the run ([`Accel::agent_log`]).
    pub fn start_logged(
        mesh: &Mesh,
        enabled: bool,
        scope: Scope,
        workloads: &[Workload],
    ) -> anyhow::Result<Accel> {
        let mut a = Self::unstarted(mesh, enabled, scope, &[])?;
        a.log = Some(a.dir.join("agent.log"));
        a.write_workloads(enabled, workloads)?;
        a.start_agent()?;
        Ok(a)
    }

    /// Starts the agent in Kubernetes mode (`MESHACCEL_NODE_NAME`, `MESHACCEL_KUBECONFIG`) next
    /// to an empty static workloads file, its log in a file of the run ([`Accel::agent_log`]).
    /// Returns once the programs are installed; which workloads appear is up to the API objects.
    pub fn start_kube(mesh: &Mesh, node_name: &str, kubeconfig: &Path) -> anyhow::Result<Accel> {
        let kubeconfig = kubeconfig.to_string_lossy();
        let mut a = Self::unstarted(
            mesh,
            true,
            Scope::Mesh,
            &[
                ("MESHACCEL_NODE_NAME", node_name),
                ("MESHACCEL_KUBECONFIG", &kubeconfig),
            ],
        )?;
        a.log = Some(a.dir.join("agent.log"));
        a.installed_only = true;
        a.write_workloads(true, &[])?;
        a.start_agent()?;
        Ok(a)
    }

    /// The run's folder and paths, no agent yet.
    fn unstarted(
        mesh: &Mesh,
        enabled: bool,
        scope: Scope,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Accel> {
        let dir = PathBuf::from(format!("/run/meshaccel-{}", mesh.run_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Accel {
            bin: workspace_bin("meshaccel"),
            bpffs: dir.join("bpffs"),
            workloads: dir.join("workloads.yaml"),
            cgroup: mesh.cgroup_root().to_path_buf(),
            dir,
            agent: None,
            expect: (enabled, 0, 0),
            scope,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: None,
            installed_only: false,
            launcher: Vec::new(),
        })
    }

    /// What the agent logged so far, when its log goes to a file ([`Accel::start_logged`],
    /// Kubernetes mode, launched agents); empty otherwise.
    pub fn agent_log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// The netns cookies of the workloads `status` lists as enabled.
    pub fn enabled_cookies(&self) -> anyhow::Result<std::collections::BTreeSet<u64>> {
        let s = self.status()?;
        Ok(s["by_workload"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["enabled"] == true)
            .filter_map(|w| w["netns_cookie"].as_u64())
            .collect())
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The cgroup the agent attaches sock_ops to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn workloads_path(&self) -> &Path {
        &self.workloads
    }

    /// Rewrites the workloads file atomically and waits until the agent applied it.
    pub fn set_workloads(&mut self, enabled: bool, workloads: &[Workload]) -> anyhow::Result<()> {
        self.write_workloads(enabled, workloads)?;
        self.wait_applied("the new workloads file applied")
    }

    fn wait_applied(&self, what: &str) -> anyhow::Result<()> {
        let (enabled, want, trusted) = self.expect;
        self.wait_status(what, |s| {
            let in_kernel = s["by_workload"]
                .as_array()
                .map(|rows| rows.iter().filter(|r| r["apps_trusted"] == true).count() as u64);
            s["enabled"] == enabled
                && s["workloads_enabled"].as_u64() == Some(want)
                && in_kernel == Some(trusted)
        })
    }

    /// Writes raw text as the workloads file (for bad-input tests), atomically.
    pub fn write_raw(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.workloads.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.workloads)?;
        Ok(())
    }

    fn write_workloads(&mut self, enabled: bool, workloads: &[Workload]) -> anyhow::Result<()> {
        self.expect = (
            enabled,
            workloads.iter().filter(|w| w.enabled).count() as u64,
            workloads
                .iter()
                .filter(|w| w.enabled && w.apps_trusted)
                .count() as u64,
        );
        self.write_raw(&workloads_yaml(enabled, self.scope, workloads))
    }

    /// The agent's command line and environment (run through the launcher, if any).
    fn agent_command(&self) -> Command {
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["agent", "--poll-ms", "100", "--cgroup"])
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--workloads")
            .arg(&self.workloads)
            .env("MESHACCEL_LOG", "info")
            // Its state file (workload names for `status`, the metrics address) in the run's
            // folder; /metrics, /healthz, /readyz on a free loopback port.
            .env("MESHACCEL_STATE_DIR", &self.dir)
            .env("MESHACCEL_METRICS_ADDR", "127.0.0.1:0")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    /// Runs an agent that is expected to refuse to start: returns its exit status and what it
    /// logged, or fails if it is still running after `limit` (it is killed then).
    pub fn run_agent_expecting_exit(
        &self,
        limit: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let log = self.dir.join("refused-agent.log");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = self
            .agent_command()
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                bail!("the agent was still running after {limit:?}; it logged:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        Ok((status, text))
    }

    /// Starts the agent (again) and waits until the maps match the workloads file.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        let child = self
            .agent_command()
            .stderr(match &self.log {
                Some(p) => Stdio::from(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(p)
                        .with_context(|| format!("opening {}", p.display()))?,
                ),
                None => Stdio::inherit(),
            })
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let pid = u64::from(child.id());
        self.agent = Some(child);
        // This agent (not an earlier one, whose pins are still there) has installed, adopted or
        // upgraded, and reconciled once: it writes its pid to the state file then. Under a soak's
        // load (2,000 busy threads on 2 vCPUs) a start has taken up to 6 s: the agent gets its
        // share of the CPU like any other thread.
        self.wait_status_for(
            "the new agent's first reconcile",
            Duration::from_secs(30),
            |s| s["agent"]["pid"].as_u64() == Some(pid),
        )?;
        if self.installed_only {
            // Kubernetes mode: which workloads appear is up to the test.
            return self.wait_status("the agent's programs installed", |s| s["enabled"] == true);
        }
        self.wait_applied("the agent's first sync")
    }

    /// Runs the next [`Accel::start_agent`]s through `launcher` (its program and arguments; the
    /// agent's command line follows).
    pub fn set_launcher(&mut self, launcher: &[&str]) {
        self.launcher = launcher.iter().map(|s| s.to_string()).collect();
    }

    /// The agent's exit status, if it has exited.
    pub fn agent_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sets (or replaces) an agent setting for the next [`Accel::start_agent`].
    pub fn set_agent_env(&mut self, key: &str, value: &str) {
        self.extra_env.retain(|(k, _)| k != key);
        self.extra_env.push((key.into(), value.into()));
    }

    /// SIGKILLs the agent (acceleration stays: it is pinned).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--output", "json"])
            .env("MESHACCEL_STATE_DIR", &self.dir)
            .output()
            .with_context(|| format!("running meshaccel {args:?}"))?;
        if !out.status.success() {
            bail!(
                "meshaccel {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("meshaccel {args:?} printed no JSON"))
    }

    /// `meshaccel status --output json`.
    pub fn status(&self) -> anyhow::Result<Value> {
        self.cli(&["status"])
    }

    /// `meshaccel status --sockets --output json`: every socket meshaccel holds.
    pub fn sockets(&self) -> anyhow::Result<Vec<Value>> {
        let s = self.cli(&["status", "--sockets"])?;
        Ok(s["sockets"].as_array().cloned().unwrap_or_default())
    }

    /// One counter of `status`.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let s = self.status()?;
        s["counters"][name]
            .as_u64()
            .with_context(|| format!("no counter {name} in {s}"))
    }

    /// Polls `status` until `pred` holds (5 s).
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
        self.wait_status_for(what, Duration::from_secs(5), pred)
    }

    /// [`Accel::wait_status`] with a given time limit.
    pub fn wait_status_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(s) = self.status() {
                if pred(&s) {
                    return Ok(());
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("waiting for {what}: last status {last}")
    }

    /// Where the running agent serves /metrics, /healthz and /readyz (from its state file).
    pub fn metrics_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let st = meshaccel::state_files::read(&self.dir, &self.bpffs)?
            .context("the agent wrote no state file")?;
        st.metrics_addr
            .context("the agent's state file has no metrics address")?
            .parse()
            .context("the agent's metrics address")
    }

    /// The agent's state file folder (the run's folder).
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// `meshaccel uninstall --output json`, reporting at once what is still draining.
    pub fn uninstall(&self) -> anyhow::Result<Value> {
        self.uninstall_wait(0)
    }

    /// `meshaccel uninstall`, waiting up to `secs` for the kernel to free everything.
    pub fn uninstall_wait(&self, secs: u64) -> anyhow::Result<Value> {
        self.cli(&["uninstall", "--wait-secs", &secs.to_string()])
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        self.kill_agent();
        if let Err(e) = self.uninstall() {
            eprintln!("accel teardown: uninstall: {e:#}");
        }
        if let Ok(c) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 on a path we mounted (the agent mounted a bpffs there).
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_file(&self.workloads);
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
        let _ = std::fs::remove_file(self.workloads.with_extension("tmp"));
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("accel teardown: removing {}: {e}", self.dir.display());
        }
    }
}
