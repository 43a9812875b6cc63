//! Driving one A/B run in the local mesh: the agent's switch off, the client opens its baseline
//! connections, the switch on, the gate file, the accelerated connections, the report. Plus CPU
//! pinning, Ctrl-C handling and the machine description that goes with every result.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use meshaccel_e2e::{
    APP_UID, Mesh, Pod,
    accel::{Accel, Workload},
    wait_ready_timeout, workspace_bin,
};
use serde_json::{Value, json};

use crate::stats::AbRun;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag that every wait here checks; the benchmark then unwinds and the
/// mesh and agent clean up on drop.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

pub fn check_stop() -> anyhow::Result<()> {
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
}

/// The options `hop` and `mesh` share (their CI short mode and `--check` are described in their
/// crate docs).
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Where <bench>.json and <bench>.png go.
    #[arg(long, env = "MESHACCEL_BENCH_OUT", default_value = "benches/results")]
    pub out: PathBuf,
    /// Also profile: one more run of two long blocks (baseline, accelerated), each recorded
    /// system-wide with `perf record` into this directory, with `perf report` summaries.
    #[arg(long, env = "MESHACCEL_BENCH_PERF")]
    pub perf: Option<PathBuf>,
    /// Length of each profiled block.
    #[arg(long, env = "MESHACCEL_BENCH_PERF_BLOCK_MS", default_value_t = 4000)]
    pub perf_block_ms: u64,
    /// CI's short mode: a few rounds of few blocks (closed loop only for `mesh`).
    #[arg(long, env = "MESHACCEL_BENCH_SHORT")]
    pub short: bool,
    /// Exit 1 on a clear inversion of p50 measured in the run (see the bench's docs).
    #[arg(long, env = "MESHACCEL_BENCH_CHECK")]
    pub check: bool,
    /// The workloads' `appSockets`: `trusted` (the benches' apps read as event loops, so all
    /// three legs are accelerated) or `auto` (what a workload gets by default: the app's own
    /// legs stay on TCP where the app's reads could not be proven to be TCP's).
    #[arg(long, env = "MESHACCEL_BENCH_APP_SOCKETS", value_enum, default_value_t = AppSockets::Trusted)]
    pub app_sockets: AppSockets,
}

/// `--app-sockets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AppSockets {
    Auto,
    Trusted,
}

impl CommonArgs {
    /// An enabled workload for `pod` with the run's `appSockets`.
    pub fn workload(&self, pod: &meshaccel_e2e::Pod) -> meshaccel_e2e::accel::Workload {
        match self.app_sockets {
            AppSockets::Auto => meshaccel_e2e::accel::Workload::auto(pod),
            AppSockets::Trusted => meshaccel_e2e::accel::Workload::on(pod),
        }
    }
}

/// A CPU list for `taskset -c` / [`pin_pid`]: "0", "1", "0,1".
pub type Cpus = Option<String>;

/// A command running `program args`, under `taskset -c <cpus>` when pinned. (`taskset` execs the
/// program, so the pid the mesh tracks is the program's.)
pub fn command(cpus: &Cpus, program: &Path, args: &[String]) -> Command {
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

fn parse_cpus(cpus: &str) -> anyhow::Result<Vec<usize>> {
    cpus.split(',')
        .map(|c| {
            c.trim()
                .parse()
                .with_context(|| format!("bad CPU list {cpus:?}"))
        })
        .collect()
}

/// Pins every thread of `pid` to `cpus` (sched_setaffinity on each tid); returns how many.
pub fn pin_pid(pid: u32, cpus: &str) -> anyhow::Result<usize> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in parse_cpus(cpus)? {
        ensure!(c < 1024, "CPU {c} out of range");
        // SAFETY: c is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let mut n = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?
    {
        let Some(tid) = t?.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: set is valid for reads of its size.
        if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) } == 0 {
            n += 1;
        }
    }
    Ok(n)
}

/// Pins the threads of every process named `comm` in `cgroup` (e.g. a pod's Envoy).
pub fn pin_cgroup(cgroup: &Path, comm: &str, cpus: &Cpus) -> anyhow::Result<usize> {
    let Some(cpus) = cpus else { return Ok(0) };
    let procs = fs::read_to_string(cgroup.join("cgroup.procs"))
        .with_context(|| format!("reading {}/cgroup.procs", cgroup.display()))?;
    let mut n = 0;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let name = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() == comm {
            n += pin_pid(pid, cpus)?;
        }
    }
    ensure!(n > 0, "no {comm} thread found in {}", cgroup.display());
    Ok(n)
}

/// Istio's sidecar capture rules as meshaccel renders them (equal to istio-cni's golden, proven
/// by istio-integration's tests), written to `dir`.
pub fn capture_rules(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("istio-capture.rules");
    fs::write(
        &path,
        istio_integration::capture::CaptureConfig::default().render_nat(),
    )?;
    Ok(path)
}

/// Starts a server of the e2e tool (`args`) in `pod` as `uid`, pinned, and waits for `ready`.
pub fn serve(
    mesh: &mut Mesh,
    pod: &Pod,
    uid: u32,
    cpus: &Cpus,
    args: &[String],
) -> anyhow::Result<()> {
    let cmd = command(cpus, &workspace_bin("meshaccel-e2e-tool"), args);
    let mut child = mesh.spawn_cmd(pod, Some(uid), cmd)?;
    wait_ready_timeout(&mut child, Duration::from_secs(20))
        .with_context(|| format!("starting {args:?} in pod {}", pod.name))?;
    // The mesh tracks (pidfd) and reaps it.
    drop(child);
    Ok(())
}

/// The counters of `meshaccel status` that moved between `before` and `after`.
fn counter_deltas(before: &Value, after: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(a) = after["counters"].as_object() {
        for (k, v) in a {
            let d = v.as_u64().unwrap_or(0) - before["counters"][k].as_u64().unwrap_or(0);
            if d > 0 {
                out.insert(k.clone(), json!(d));
            }
        }
    }
    Value::Object(out)
}

/// Everything one A/B run needs.
pub struct AbSetup<'a> {
    pub accel: &'a mut Accel,
    pub workloads: &'a [Workload],
    /// The client's pod and CPUs.
    pub pod: &'a Pod,
    pub cpus: &'a Cpus,
    /// Where the gate and stop files go (readable by the app uid).
    pub dir: &'a Path,
}

/// One A/B run of the e2e tool's `ab-rr` / `ab-http` (`args` without `--gate-file`), as
/// described in `meshaccel_e2e::tool::ab`: switch off, baseline connections, switch on, gate,
/// accelerated connections, blocks. Returns the parsed run with the moved kernel counters in
/// `extra`.
pub fn run_ab(mesh: &mut Mesh, s: &mut AbSetup<'_>, args: &[String]) -> anyhow::Result<AbRun> {
    run_ab_with(mesh, s, args, |_| Ok(()))
}

/// [`run_ab`], calling `during` (with the moment the gate opened) while the client runs.
pub fn run_ab_with(
    mesh: &mut Mesh,
    s: &mut AbSetup<'_>,
    args: &[String],
    during: impl FnOnce(Instant) -> anyhow::Result<()>,
) -> anyhow::Result<AbRun> {
    check_stop()?;
    let gate = s.dir.join("gate");
    let stop_file = s.dir.join("stop");
    let _ = fs::remove_file(&gate);
    let _ = fs::remove_file(&stop_file);
    s.accel
        .set_workloads(false, s.workloads)
        .context("switching acceleration off")?;
    let before = s.accel.status()?;
    let mut full: Vec<String> = args.to_vec();
    full.extend([
        "--gate-file".into(),
        gate.to_string_lossy().into_owned(),
        "--stop-file".into(),
        stop_file.to_string_lossy().into_owned(),
    ]);
    let cmd = command(s.cpus, &workspace_bin("meshaccel-e2e-tool"), &full);
    let mut child = mesh.spawn_cmd(s.pod, Some(APP_UID), cmd)?;
    wait_ready_timeout(&mut child, Duration::from_secs(60))
        .context("the A/B client's baseline connections")?;
    let switched = s
        .accel
        .set_workloads(true, s.workloads)
        .context("switching acceleration on");
    if let Err(e) = switched {
        let _ = child.kill();
        return Err(e);
    }
    fs::write(&gate, b"").context("creating the gate file")?;
    if let Err(e) = during(Instant::now()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let out = wait_stop_aware(child, &stop_file, Duration::from_secs(1800))?;
    let line = out.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(line)
        .with_context(|| format!("the A/B client printed no report: {out:?}"))?;
    let after = s.accel.status()?;
    let mut run = AbRun::parse(&report)?;
    run.extra = json!({
        "kernel_counters": counter_deltas(&before, &after),
        "elapsed_ms": report["elapsed_ms"],
        "info": report["info"],
        "mode": report["mode"],
        "rate": report["rate"],
    });
    Ok(run)
}

/// Waits for the child and returns its stdout; on Ctrl-C asks it to stop (stop file), then kills
/// it.
fn wait_stop_aware(
    mut child: Child,
    stop_file: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut stdout = child.stdout.take().context("stdout not piped")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut stop_since: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            let out = reader.join().unwrap_or_default();
            if stopped() {
                bail!("interrupted");
            }
            if !status.success() && out.trim().is_empty() {
                bail!("the A/B client exited with {status} and no report");
            }
            return Ok(out);
        }
        if stopped() && stop_since.is_none() {
            let _ = fs::write(stop_file, b"");
            stop_since = Some(Instant::now());
        }
        let kill = stop_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
            || Instant::now() > deadline;
        if kill {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            if stopped() {
                bail!("interrupted");
            }
            bail!("the A/B client did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `/proc/loadavg`'s three load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the numbers were measured on.
pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let hypervisor = if cpuinfo.contains(" hypervisor") {
        first_line("systemd-detect-virt", &["--vm"])
    } else {
        "none".into()
    };
    // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL" → "1.40.0"
    let envoy = meshaccel_e2e::envoy::envoy_binary()
        .ok()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = text
                .split("version: ")
                .nth(1)?
                .split('/')
                .nth(1)?
                .to_string();
            Some(v)
        })
        .unwrap_or_default();
    json!({
        "cpu": model,
        "cpus": cpus,
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": first_line("uname", &["-r"]),
        "virtualization": hypervisor,
        "envoy": envoy,
        "loadavg_start": loadavg(),
    })
}

/// The machine in one line, for tables.
pub fn machine_line(m: &Value) -> String {
    let mut s = format!(
        "{} vCPU {} ({}), {} GiB, kernel {}, Envoy {}",
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["virtualization"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["envoy"].as_str().unwrap_or("?"),
    );
    if let Some(other) = m["other_cpu_load"].as_f64() {
        s.push_str(&format!(
            "; other work on the machine during the run: {:.0}% of its CPU time",
            other * 100.0
        ));
    }
    if let Some(steal) = m["steal"].as_f64() {
        s.push_str(&format!(
            ", taken by the hypervisor (steal): {:.2}%",
            steal * 100.0
        ));
    }
    s
}

/// Writes `value` as pretty JSON to `dir/name`, creating `dir`.
pub fn write_json(dir: &Path, name: &str, value: &Value) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A temp dir the app uid can read (gate and stop files), removed on drop.
pub fn shared_tempdir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("meshaccel-bench-")
        .tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    Ok(dir)
}

/// `--blocks`, `--block-ms` and `--warmup-ms` of the A/B client.
pub fn block_args(blocks: u32, block_ms: u64, warmup_ms: u64) -> Vec<String> {
    vec![
        "--blocks".into(),
        blocks.to_string(),
        "--block-ms".into(),
        block_ms.to_string(),
        "--warmup-ms".into(),
        warmup_ms.to_string(),
    ]
}

/// A profile of where the CPU time goes: one A/B run of two long blocks (baseline, then
/// accelerated), each recorded system-wide by `perf record` (both CPUs, every process and the
/// kernel) into `dir/{baseline,accelerated}.data`, then summarised by `perf report` into
/// `dir/<side>-{comm-dso,sym}.txt`. Returns the run (its numbers are those of 2 blocks only).
pub fn run_ab_profiled(
    mesh: &mut Mesh,
    s: &mut AbSetup<'_>,
    args: &[String],
    dir: &Path,
    block_ms: u64,
) -> anyhow::Result<AbRun> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut full = args.to_vec();
    full.extend(block_args(2, block_ms, 0));
    let block = Duration::from_millis(block_ms);
    let sides = ["baseline", "accelerated"];
    let cgroup_root = mesh.cgroup_root().to_path_buf();
    let run = run_ab_with(mesh, s, &full, |t0| {
        // Every process of every pod (Envoys, servers, the client), for per-thread counts.
        let mut pids = Vec::new();
        for entry in fs::read_dir(&cgroup_root)? {
            let procs = entry?.path().join("cgroup.procs");
            if let Ok(text) = fs::read_to_string(procs) {
                pids.extend(text.lines().map(str::to_string));
            }
        }
        let pids = pids.join(",");
        // Blocks: A = [t0, t0 + L], B = [t0 + L, t0 + 2L] (plus connection set-up, ~ms): record
        // the middle 80% of each.
        for (i, side) in sides.iter().enumerate() {
            let start = t0 + block.mul_f64(i as f64 + 0.1);
            if let Some(d) = start.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
            check_stop()?;
            let secs = format!("{:.3}", block.as_secs_f64() * 0.8);
            // Syscalls, context switches and wake-ups per thread of the pods, alongside.
            let counts = fs::File::create(dir.join(format!("{side}-counts.txt")))?;
            let mut stat = Command::new("perf")
                .args(["stat", "--per-thread", "-e"])
                .arg("raw_syscalls:sys_enter,sched:sched_switch,sched:sched_wakeup")
                .args(["-p", &pids, "--", "sleep", &secs])
                .stdout(Stdio::null())
                .stderr(counts)
                .spawn()
                .context("running perf stat (Debian: linux-perf)")?;
            let out = Command::new("perf")
                .args(["record", "-a", "-g", "-q", "-F", "2999", "-o"])
                .arg(dir.join(format!("{side}.data")))
                .args(["--", "sleep", &secs])
                .stdout(Stdio::null())
                .output()
                .context("running perf record (Debian: linux-perf)")?;
            let _ = stat.wait();
            ensure!(
                out.status.success(),
                "perf record: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })?;
    // The processes of the benchmark (Envoy's threads, the tool's threads), not whatever else
    // the machine runs; `all-` reports keep everything.
    let comms = "envoy,wrk:worker_0,wrk:worker_1,ab-0,ab-1,ab-2,ab-3,http,rr,meshaccel-e2e-t,\
                 ksoftirqd/0,ksoftirqd/1";
    for side in sides {
        let data = dir.join(format!("{side}.data"));
        for (name, sort, filter) in [
            ("comm-dso", "comm,dso", true),
            ("sym", "dso,sym", true),
            ("all-comm-dso", "comm,dso", false),
        ] {
            let mut cmd = Command::new("perf");
            cmd.args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.2",
            ])
            .args(["--sort", sort, "-i"])
            .arg(&data);
            if filter {
                cmd.args(["--comms", comms]);
            }
            let out = cmd.output().context("running perf report")?;
            fs::write(dir.join(format!("{side}-{name}.txt")), &out.stdout)?;
        }
    }
    Ok(run)
}

/// Busy time of the whole machine (all CPUs, `/proc/stat`), in µs.
/// The machine's CPU time (all CPUs) by /proc/stat field, in µs: user nice system idle iowait
/// irq softirq steal (guest is included in user).
fn host_cpu_usec() -> Vec<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return vec![0; 8];
    };
    let mut v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse::<u64>().ok())
        .map(|t| t * 1_000_000 / hz)
        .collect();
    v.resize(8, 0);
    v
}

fn host_busy_usec() -> u64 {
    let v = host_cpu_usec();
    v.iter().sum::<u64>() - v[3] - v[4]
}

/// CPU time the hypervisor gave to others while a vCPU wanted to run (µs, all CPUs).
fn host_steal_usec() -> u64 {
    host_cpu_usec()[7]
}

fn cgroup_usage_usec(cgroup: &Path) -> u64 {
    fs::read_to_string(cgroup.join("cpu.stat"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How busy the machine was with work other than the benchmark's pods while it ran: the
/// noise to keep in mind when reading the numbers.
pub struct OtherLoad {
    start: Instant,
    host0: u64,
    steal0: u64,
    cg0: u64,
    cgroup: PathBuf,
}

impl OtherLoad {
    /// Starts counting; `cgroup` holds every pod of the run (the mesh's cgroup root).
    pub fn start(cgroup: &Path) -> OtherLoad {
        OtherLoad {
            start: Instant::now(),
            host0: host_busy_usec(),
            steal0: host_steal_usec(),
            cg0: cgroup_usage_usec(cgroup),
            cgroup: cgroup.to_path_buf(),
        }
    }

    /// The share of the machine's CPU time (0–1) used outside the pods since `start`.
    pub fn fraction(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
        let host = host_busy_usec().saturating_sub(self.host0) as f64;
        let pods = cgroup_usage_usec(&self.cgroup).saturating_sub(self.cg0) as f64;
        let wall = self.start.elapsed().as_micros() as f64 * cpus;
        ((host - pods) / wall.max(1.0)).clamp(0.0, 1.0)
    }

    /// The share of the machine's CPU time (0–1) the hypervisor took away since `start` (steal:
    /// a vCPU that wanted to run did not; each time is a stall of the processes on it).
    pub fn steal_fraction(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
        let steal = host_steal_usec().saturating_sub(self.steal0) as f64;
        (steal / (self.start.elapsed().as_micros() as f64 * cpus).max(1.0)).clamp(0.0, 1.0)
    }

    /// Records both shares in a result's `machine` object.
    pub fn record(&self, machine: &mut Value) {
        machine["other_cpu_load"] = json!(crate::stats::round3(self.fraction()));
        machine["steal"] = json!((self.steal_fraction() * 1e5).round() / 1e5);
    }
}

/// A diagnostic: one thread per CPU, pinned and at `SCHED_IDLE` (it runs only when nothing
/// else wants the CPU), spinning, so that the CPU never enters idle. What a run gains with it
/// is what waking idle vCPUs costs. Stops when dropped. Its CPU time counts as other load.
pub struct IdleSpinner {
    stop: std::sync::Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl IdleSpinner {
    pub fn start(cpus: &[usize]) -> anyhow::Result<IdleSpinner> {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &cpu in cpus {
            let (stop, ready) = (
                stop.clone(),
                std::sync::mpsc::channel::<Result<(), String>>(),
            );
            let (tx, rx) = ready;
            threads.push(thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t and a sched_param we own, for this thread (pid 0).
                let set = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
                };
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: as above.
                let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                if set != 0 || idle != 0 {
                    let _ = tx.send(Err(format!(
                        "CPU {cpu}: {}",
                        std::io::Error::last_os_error()
                    )));
                    return;
                }
                let _ = tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }));
            rx.recv()
                .context("the idle spinner thread ended")?
                .map_err(|e| anyhow::anyhow!("starting an idle spinner: {e}"))?;
        }
        Ok(IdleSpinner { stop, threads })
    }
}

impl Drop for IdleSpinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The hop's floor (`meshaccel-e2e-tool unix-rr`): the same ping-pong over a UNIX stream pair
/// in one process, on `cpus`; its JSON line.
pub fn unix_floor(cpus: &Cpus, size: u64, ms: u64) -> anyhow::Result<Value> {
    let out = command(
        cpus,
        &workspace_bin("meshaccel-e2e-tool"),
        &[
            "unix-rr".into(),
            "--size".into(),
            size.to_string(),
            "--ms".into(),
            ms.to_string(),
        ],
    )
    .output()
    .context("running unix-rr")?;
    ensure!(out.status.success(), "unix-rr failed: {}", out.status);
    serde_json::from_slice(&out.stdout).context("unix-rr's JSON line")
}

/// Run time of BPF programs while it lives (`BPF_ENABLE_STATS`, type `BPF_STATS_RUN_TIME`): the
/// kernel counts each program's runs and nanoseconds only while some such fd is open.
pub struct BpfRunStats {
    _fd: std::os::fd::OwnedFd,
}

impl BpfRunStats {
    pub fn enable() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // `union bpf_attr`'s enable_stats member: { __u32 type } (BPF_STATS_RUN_TIME = 0).
        let attr: [u32; 2] = [0, 0];
        // SAFETY: bpf(2) with a correctly laid out attr.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        Ok(Self {
            _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// (runs, ns, translated instructions) of the program with this id, from `bpftool`.
pub fn prog_run_stats(id: u64) -> anyhow::Result<(u64, u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .context("bpftool prog show")?;
    ensure!(out.status.success(), "bpftool prog show id {id} failed");
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok((n("run_cnt"), n("run_time_ns"), n("bytes_xlated") / 8))
}

/// A loaded program's name, from `bpftool`.
pub fn prog_name(id: u64) -> Option<String> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["name"].as_str().map(String::from)
}

/// A cgroup's CPU time so far, µs: `cpu.stat`'s usage, user and system (the kernel's work done
/// on its processes' behalf included).
pub fn cgroup_cpu(cgroup: &Path) -> anyhow::Result<[u64; 3]> {
    meshaccel_e2e::tool::ab::read_cpu_stat(&cgroup.join("cpu.stat"))
}
