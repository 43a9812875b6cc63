//! `wrk`: an off-the-shelf load on the full sidecar path: Debian's wrk in the client pod against
//! Debian's nginx in the server pod (1 KiB static body, HTTP/1.1 keep-alive), through the two
//! real Envoy 1.40 sidecars (mTLS) of the same two-pod mesh `mesh` builds. Unpinned.
//!
//! wrk cannot hold baseline and accelerated connections side by side as the e2e tool does, so
//! the sides take turns by run: acceleration off, one wrk run (its connections stay TCP for
//! life); on, one run (accelerated from their first byte); A B B A per round, a few rounds.
//! Envoy's `tcp_proxy` opens one upstream connection per downstream one, so every run's whole
//! path is fresh. Latency percentiles are wrk's (see `meshaccel_benches::wrk` for its
//! coordinated-omission correction); requests per second from wrk's count and duration; CPU per
//! request from the two pods' cgroups (wrk, nginx and both Envoys) over each run; TCP segments
//! per request from the client pod's netns (a working build: ~0 accelerated).
//!
//! Writes `wrk-<connections>.json` and `.png` per connection count. With `--check`, exits 1
//! when acceleration did not engage (> 0.5 TCP segments per request accelerated).
use std::{
    fs,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use meshaccel_benches::{
    driver::{self, AppSockets},
    plot, report_tail,
    stats::{AbRun, Compare, Metric, SideRun, table},
    targets,
    wrk::{REPORT_LUA, WrkReport},
};
use meshaccel_e2e::{
    APP_UID, Pod,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, Rules, SidecarMesh},
    wait_output_timeout,
};
use serde_json::json;

const NGINX_TEMPLATE: &str = include_str!("../../../e2e/conformance/nginx/nginx.conf.tmpl");
const PORT: u16 = 8080;

/// wrk against nginx through both sidecars, baseline vs accelerated.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds of four wrk runs each (A B B A).
    #[arg(long, env = "MESHACCEL_WRK_ROUNDS", default_value_t = 3)]
    rounds: u32,
    /// Length of one wrk run, seconds (`wrk -d`).
    #[arg(long, env = "MESHACCEL_WRK_SECONDS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Keep-alive connections, a list: one measurement per count (`wrk -c`).
    #[arg(long, env = "MESHACCEL_WRK_CONNECTIONS", default_value = "1,16",
          value_parser = targets::parse_connections)]
    connections: targets::Connections,
    /// wrk threads (`-t`); default: as many as the machine has CPUs, at most one per connection.
    #[arg(long, env = "MESHACCEL_WRK_THREADS",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// The body nginx serves.
    #[arg(long, env = "MESHACCEL_WRK_SIZE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    size: u64,
    /// Where wrk-<connections>.json and .png go.
    #[arg(long, env = "MESHACCEL_BENCH_OUT", default_value = "benches/results")]
    out: std::path::PathBuf,
    /// Short: 2 rounds of 1 s runs.
    #[arg(long, env = "MESHACCEL_BENCH_SHORT")]
    short: bool,
    /// Exit 1 when acceleration did not engage.
    #[arg(long, env = "MESHACCEL_BENCH_CHECK")]
    check: bool,
    /// Diagnostic: BPF run time per program (`BPF_ENABLE_STATS`) over the accelerated runs,
    /// per request: what the dataplane's programs cost. The kernel's accounting adds to each
    /// program run, so it is off by default and its runs' numbers are a profile, not a result.
    #[arg(long, env = "MESHACCEL_WRK_BPF_STATS")]
    bpf_stats: bool,
    /// The workloads' `appSockets` (see `mesh --help`): wrk and nginx are epoll event loops.
    #[arg(long, env = "MESHACCEL_BENCH_APP_SOCKETS", value_enum, default_value_t = AppSockets::Trusted)]
    app_sockets: AppSockets,
}

const METRICS: [Metric; 11] = Metric::TABLE;

/// The mesh, the agent and nginx, for every connection count.
struct Ctx<'a> {
    a: &'a Args,
    // Dropped in this order: the agent before the mesh it runs in (nginx with the mesh).
    accel: Accel,
    m: SidecarMesh,
    _nginx: Child,
    wl: [Workload; 2],
    client: Pod,
    server: Pod,
    tmp: tempfile::TempDir,
    rounds: u32,
    seconds: u64,
    /// With `--bpf-stats`: the agent's programs (id, name), the stats switch, and per program
    /// (runs, ns) summed over the accelerated runs of the current connection count.
    bpf: Option<(Vec<(u64, String)>, driver::BpfRunStats)>,
    bpf_sum: Vec<(u64, u64)>,
}

fn run(a: &Args) -> anyhow::Result<bool> {
    require_root();
    let wrk = "/usr/bin/wrk";
    ensure!(
        fs::metadata(wrk).is_ok(),
        "{wrk} is missing: scripts/install-apps.sh nginx wrk"
    );
    let (rounds, seconds) = if a.short {
        (2, 1)
    } else {
        (a.rounds, a.seconds)
    };
    eprintln!("[wrk] two pods with Istio's capture rules and Envoy sidecars (mTLS)");
    let mut m = SidecarMesh::start_with(
        &[
            PodSpec::mesh("client", &[]),
            PodSpec::mesh("server", &[PORT]),
        ],
        Rules::Generated,
    )?;
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let wl = [workload(a, &client), workload(a, &server)];
    let accel = Accel::start(&m.mesh, false, &wl)?;
    let tmp = driver::shared_tempdir()?;
    fs::write(tmp.path().join("report.lua"), REPORT_LUA)?;
    let nginx = start_nginx(&mut m, &server, tmp.path(), a.size)?;
    let bpf = if a.bpf_stats {
        let progs: Vec<(u64, String)> = accel.status()?["prog_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64())
            .map(|id| (id, driver::prog_name(id).unwrap_or_else(|| id.to_string())))
            .collect();
        ensure!(!progs.is_empty(), "the agent's status lists no program ids");
        Some((
            progs,
            driver::BpfRunStats::enable().context("BPF_ENABLE_STATS")?,
        ))
    } else {
        None
    };
    let mut x = Ctx {
        a,
        accel,
        m,
        _nginx: nginx,
        wl,
        client,
        server,
        tmp,
        rounds,
        seconds,
        bpf,
        bpf_sum: Vec::new(),
    };
    let mut ok = true;
    for &c in &a.connections.0 {
        ok &= measure(&mut x, c)?;
    }
    Ok(ok)
}

fn workload(a: &Args, pod: &Pod) -> Workload {
    match a.app_sockets {
        AppSockets::Auto => Workload::auto(pod),
        AppSockets::Trusted => Workload::on(pod),
    }
}

/// nginx from the conformance suite's template, as the apps' uid, serving `size` bytes at
/// `/data.bin`, without an access log (a benchmark's server logs nothing per request); returns
/// once it listens.
fn start_nginx(
    m: &mut SidecarMesh,
    pod: &Pod,
    tmp: &std::path::Path,
    size: u64,
) -> anyhow::Result<Child> {
    let dir = tmp.join("nginx");
    fs::create_dir_all(&dir)?;
    std::os::unix::fs::chown(&dir, Some(APP_UID), Some(APP_UID))?;
    let log_line = "access_log {{DIR}}/access.log conform;";
    ensure!(
        NGINX_TEMPLATE.contains(log_line),
        "nginx.conf.tmpl no longer has {log_line:?}: update the wrk bench"
    );
    let conf = NGINX_TEMPLATE
        .replace(log_line, "access_log off;")
        .replace("{{DIR}}", &dir.to_string_lossy())
        .replace("{{LISTEN_PORT}}", &PORT.to_string());
    fs::write(dir.join("nginx.conf"), conf)?;
    let body: Vec<u8> = (0..size).map(|i| ((i * 31 + 7) % 251) as u8).collect();
    fs::write(dir.join("data.bin"), body)?;
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = m.mesh.spawn_cmd(pod, Some(APP_UID), cmd)?;
    // nginx prints no `ready`: wait until its port listens in the pod.
    let want = format!(":{PORT} ");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        driver::check_stop()?;
        if let Some(status) = child.try_wait()? {
            let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            bail!("nginx exited with {status}: {log}");
        }
        let out = pod.netns_exec("ss", &["-Htln"])?;
        if String::from_utf8_lossy(&out.stdout).contains(&want) {
            return Ok(child);
        }
        ensure!(
            Instant::now() < deadline,
            "nginx did not listen on {PORT} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One wrk run with acceleration `on`: the run as one side's measurement, and how many
/// synthetic samples wrk added.
fn wrk_run(x: &mut Ctx<'_>, on: bool, connections: usize) -> anyhow::Result<(SideRun, u64)> {
    driver::check_stop()?;
    x.accel
        .set_workloads(on, &x.wl)
        .with_context(|| format!("switching acceleration {}", if on { "on" } else { "off" }))?;
    let cgroups = [x.client.cgroup.clone(), x.server.cgroup.clone()];
    let cpu0 = cgroups
        .iter()
        .map(|c| driver::cgroup_cpu(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tcp0 = x.client.tcp_counters()?;
    let bpf0 = bpf_snapshot(x, on)?;
    let threads =
        x.a.threads
            .unwrap_or(num_cpus() as u64)
            .min(connections as u64);
    let mut cmd = Command::new("/usr/bin/wrk");
    cmd.args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", x.seconds), "--timeout", "10s", "-s"])
        .arg(x.tmp.path().join("report.lua"))
        .arg(format!("http://{}:{PORT}/data.bin", x.server.ip))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = x.m.mesh.spawn_cmd(&x.client, Some(APP_UID), cmd)?;
    let out = wait_output_timeout(child, Duration::from_secs(x.seconds + 60))?;
    driver::check_stop()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk exited with {}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report = WrkReport::parse(&stdout)?;
    let tcp = x.client.tcp_counters()?.since(&tcp0);
    if let Some(before) = bpf0 {
        let after = bpf_snapshot(x, on)?.unwrap_or_default();
        x.bpf_sum.resize(after.len(), (0, 0));
        for (sum, (b, a)) in x.bpf_sum.iter_mut().zip(before.iter().zip(&after)) {
            sum.0 += a.0.saturating_sub(b.0);
            sum.1 += a.1.saturating_sub(b.1);
        }
    }
    let mut cpu = [0u64; 3];
    let mut by_cgroup = Vec::new();
    for (c, before) in cgroups.iter().zip(&cpu0) {
        let now = driver::cgroup_cpu(c)?;
        for i in 0..3 {
            cpu[i] += now[i].saturating_sub(before[i]);
        }
        by_cgroup.push(now[0].saturating_sub(before[0]));
    }
    let side = report.side(cpu, by_cgroup, tcp.in_segs + tcp.out_segs);
    Ok((side, report.synthetic))
}

/// (runs, ns) of each of the agent's programs, when `--bpf-stats` and the run is accelerated.
fn bpf_snapshot(x: &Ctx<'_>, on: bool) -> anyhow::Result<Option<Vec<(u64, u64)>>> {
    let Some((progs, _)) = x.bpf.as_ref().filter(|_| on) else {
        return Ok(None);
    };
    let mut v = Vec::new();
    for (id, _) in progs {
        let (runs, ns, _) = driver::prog_run_stats(*id)?;
        v.push((runs, ns));
    }
    Ok(Some(v))
}

/// The `--bpf-stats` profile of one connection count: per program, runs and ns per request.
fn bpf_profile(x: &Ctx<'_>, requests: u64) -> serde_json::Value {
    let Some((progs, _)) = &x.bpf else {
        return json!(null);
    };
    let per_req = |v: u64| v as f64 / requests.max(1) as f64;
    let rows: Vec<_> = progs
        .iter()
        .zip(&x.bpf_sum)
        .map(|((id, name), &(runs, ns))| {
            json!({"id": id, "program": name, "runs": runs, "ns": ns,
                   "runs_per_request": meshaccel_benches::stats::round3(per_req(runs)),
                   "ns_per_request": meshaccel_benches::stats::round3(per_req(ns)),
                   "ns_per_run": if runs > 0 { (ns as f64 / runs as f64).round() } else { 0.0 }})
        })
        .collect();
    json!(rows)
}

/// One connection count: rounds of A B B A, the table, `wrk-<connections>.json` and `.png`.
fn measure(x: &mut Ctx<'_>, connections: usize) -> anyhow::Result<bool> {
    let name = format!("wrk-{connections}");
    x.bpf_sum.clear();
    let mut machine = driver::machine();
    let other = driver::OtherLoad::start(x.m.mesh.cgroup_root());
    let mut runs = Compare::default();
    for round in 1..=x.rounds {
        let (a0, s0) = wrk_run(x, false, connections)?;
        let (b0, s1) = wrk_run(x, true, connections)?;
        let (b1, s2) = wrk_run(x, true, connections)?;
        let (a1, s3) = wrk_run(x, false, connections)?;
        let r = AbRun {
            a: [a0, a1],
            b: [b0, b1],
            extra: json!({ "synthetic_samples": {"a": [s0, s3], "b": [s1, s2]} }),
        };
        let (p, q) = (r.side(false), r.side(true));
        eprintln!(
            "[wrk] {connections} conn. round {round}/{}: p50 {:.0} → {:.0} µs ({:.2}), req/s {:.0} → {:.0} ({:.2}), CPU µs/req {:.1} → {:.1}, segs/req {:.2} → {:.3}",
            x.rounds,
            p.metric(Metric::P50),
            q.metric(Metric::P50),
            q.metric(Metric::P50) / p.metric(Metric::P50),
            p.metric(Metric::Rate),
            q.metric(Metric::Rate),
            q.metric(Metric::Rate) / p.metric(Metric::Rate),
            p.metric(Metric::CpuPerReq),
            q.metric(Metric::CpuPerReq),
            p.metric(Metric::SegsPerReq),
            q.metric(Metric::SegsPerReq),
        );
        runs.rounds.push(r);
    }
    machine["loadavg_end"] = json!(driver::loadavg());
    other.record(&mut machine);
    let targets = targets::closed_loop(connections);
    let (pa, pb) = (runs.pooled(false), runs.pooled(true));
    let synthetic: u64 = runs
        .rounds
        .iter()
        .flat_map(|r| {
            ["a", "b"].into_iter().flat_map(move |s| {
                r.extra["synthetic_samples"][s]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
        })
        .filter_map(|v| v.as_u64())
        .sum();
    let synthetic_share = synthetic as f64 / (pa.hist.len() + pb.hist.len()).max(1) as f64;
    println!();
    println!(
        "wrk → Envoy → (mTLS) → Envoy → nginx, HTTP/1.1 keep-alive, {} B body, {connections} connection(s), unpinned, {} rounds × A B B A of {} s",
        x.a.size, x.rounds, x.seconds
    );
    println!("{}", driver::machine_line(&machine));
    println!(
        "latency: wrk's, with its coordinated-omission correction ({:.1}% of the samples are synthetic)\n",
        synthetic_share * 100.0
    );
    print!("{}", table(&runs, &METRICS, targets));
    report_tail::print_noise(runs.noise(Metric::P50));
    let bpf = bpf_profile(x, pb.requests);
    if let Some(rows) = bpf.as_array() {
        println!("\nBPF run time over the accelerated runs (--bpf-stats, diagnostic):\n");
        println!(
            "| program | runs per request | ns per request | ns per run |\n|---|---:|---:|---:|"
        );
        for r in rows {
            println!(
                "| {} | {} | {} | {} |",
                r["program"].as_str().unwrap_or("?"),
                r["runs_per_request"],
                r["ns_per_request"],
                r["ns_per_run"]
            );
        }
    }
    let segs = pb.metric(Metric::SegsPerReq);
    let engaged = segs <= 0.5;
    if !engaged {
        println!(
            "GATE: acceleration did not engage: the accelerated side sent {segs:.2} TCP segments per request"
        );
    }
    let result = json!({
        "bench": name,
        "what": "wrk → Envoy → (mTLS) → Envoy → nginx, HTTP/1.1 keep-alive GET",
        "size": x.a.size,
        "connections": connections,
        "pin": "none",
        "rounds": x.rounds,
        "seconds": x.seconds,
        "short": x.a.short,
        "app_sockets": format!("{:?}", x.a.app_sockets).to_lowercase(),
        "machine": machine,
        "latency_source": "wrk (closed loop per connection, histogram after wrk's coordinated-omission correction)",
        "synthetic_share": meshaccel_benches::stats::round3(synthetic_share),
        "engaged": engaged,
        "bpf_stats": bpf,
        "closed": {
            "targets": report_tail::targets_json(&runs, targets),
            "result": runs.to_json(&METRICS, true),
        },
    });
    report_tail::write_results(&name, &x.a.out, &result, (900, 560), |area| {
        plot::percentiles(
            area,
            &format!(
                "wrk → nginx via sidecars, {} B, {connections} conn.",
                x.a.size
            ),
            &[
                ("baseline (TCP)".into(), &pa.hist, plot::BASELINE),
                ("accelerated".into(), &pb.hist, plot::ACCELERATED),
            ],
        )
    })?;
    Ok(engaged || !x.a.check)
}

fn num_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::install_signal_handlers();
    report_tail::exit("wrk", run(&a))
}
