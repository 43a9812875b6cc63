//! `mesh`: the full sidecar path, client app → Envoy → (mTLS) → Envoy → server app, two pods of
//! the local mesh with Istio's capture rules and real Envoy 1.40 sidecars. HTTP/1.1 keep-alive,
//! `GET` of 1 KiB bodies (every response checked), baseline and accelerated interleaved in one
//! run, in two modes: closed loop (as fast as the connections go) and fixed rate
//! (coordinated-omission corrected: latency from each request's intended start). Full mode
//! measures at 1 and at 16 connections per side, unpinned (the scheduler places the processes,
//! as on a user's node); `--pin one|pods` are diagnostics.
//!
//! Prints latency percentiles, requests per second and CPU µs per request (the two pods'
//! cgroups: apps and Envoys, kernel work done on their behalf included) with ratios
//! accelerated/baseline and their spread over the rounds; writes `mesh-<connections>.json` and
//! `.png` per connection count.
//! With `--check`, exits 1 on a clear inversion (accelerated closed-loop p50 worse than baseline
//! by more than the run's own noise: the largest A/A or B/B difference between the two halves
//! of a side), when acceleration did not engage, or when the closed-loop requests-per-second
//! ratio is below [`GATE_FLOOR`]'s 1.1. The short mode (CI) stays on `--pin one` and 1
//! connection, where the floors were calibrated: unpinned short runs passed here too (requests
//! per second 1.53 and 1.55, 5 Dec 2026), but issue 18 measured 1.13 for one unpinned wrk
//! connection on another VM, too close to 1.1 to move the gate without recalibrating it.
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use meshaccel_benches::{
    driver::{self, AbSetup, Cpus},
    plot, report_tail,
    stats::{AbRun, Compare, Metric, Target, table},
    targets,
};
use meshaccel_e2e::{
    APP_UID, Pod,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, Rules, SidecarMesh},
};
use serde_json::json;

/// The full sidecar path with real Envoys and mTLS, baseline vs accelerated.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds (each: one closed-loop and one fixed-rate interleaved A/B run, fresh connections).
    #[arg(long, env = "MESHACCEL_MESH_ROUNDS", default_value_t = 5)]
    rounds: u32,
    /// Measured blocks per run (sides alternate A B B A …).
    #[arg(long, env = "MESHACCEL_MESH_BLOCKS", default_value_t = 30)]
    blocks: u32,
    /// Length of a block.
    #[arg(long, env = "MESHACCEL_MESH_BLOCK_MS", default_value_t = 100)]
    block_ms: u64,
    /// Response body size.
    #[arg(long, env = "MESHACCEL_MESH_SIZE", default_value_t = 1024)]
    size: u64,
    /// Keep-alive connections per side, a list: one measurement per count, each with its own
    /// `mesh-<count>.json` (default: 1,16; short mode: 1).
    #[arg(long, env = "MESHACCEL_MESH_CONNECTIONS", value_parser = targets::parse_connections)]
    connections: Option<targets::Connections>,
    /// Fixed rate (requests/s per side). Default: `--rate-fraction` of the baseline's
    /// closed-loop rate in round 1, kept for all rounds.
    #[arg(long, env = "MESHACCEL_MESH_RATE")]
    rate: Option<f64>,
    /// See `--rate`. 0.35: a request paced from idle costs about twice the CPU of one in the
    /// closed loop (115 vs 53 µs here), so at 0.6 the baseline ran its CPU at ~95% and queued
    /// (p99 in ms), which batches its work and biases CPU per request against the faster side.
    #[arg(long, env = "MESHACCEL_MESH_RATE_FRACTION", default_value_t = 0.35)]
    rate_fraction: f64,
    /// Skip the fixed-rate runs.
    #[arg(long, env = "MESHACCEL_MESH_NO_RATE")]
    no_rate: bool,
    /// CPU pinning: `none` the scheduler decides (default: what users run); diagnostics: `one`
    /// all four processes on CPU 0 (no cross-CPU wake-up: waking an idle vCPU costs tens of µs
    /// on the 2-vCPU VM), `pods` each pod (its app and its Envoy) on a CPU of its own, client
    /// pod on CPU 0, server pod on CPU 1. Short mode's default: `one` (see the crate docs).
    #[arg(long, env = "MESHACCEL_MESH_PIN", value_enum)]
    pin: Option<Pin>,
    /// Diagnostic: keep the pinned CPUs out of idle with a `SCHED_IDLE` spinner on each (it runs
    /// only when nothing else wants the CPU), to measure what waking an idle vCPU costs each
    /// side at a fixed rate. Not the default: real nodes idle.
    #[arg(long, env = "MESHACCEL_MESH_BUSY_IDLE")]
    busy_idle: bool,
    /// Profile the fixed-rate mode instead of the closed loop (with `--perf`).
    #[arg(long, env = "MESHACCEL_MESH_PERF_RATE")]
    perf_rate: bool,
    #[command(flatten)]
    common: driver::CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pin {
    Pods,
    One,
    None,
}

const METRICS: [Metric; 11] = Metric::TABLE;

/// The CI gate's floor: a working build's short debug run measures 1.54 [1.49–1.60] requests
/// per second accelerated/baseline here (CI, 5 Dec 2026; full release runs 1.39–1.66), so 1.1
/// leaves room for a noisy machine and still fails when most of the gain is gone.
const GATE_FLOOR: Target = Target::at_least(Metric::Rate, 1.1);

/// The same at a fixed rate (where requests per second are fixed by construction).
const RATE_TARGETS: [Target; 5] = [
    Target::at_most(Metric::P50, 0.75),
    Target::at_most(Metric::P90, 0.75),
    Target::at_most(Metric::CpuPerReq, 0.85),
    Target::at_most(Metric::P999, 1.0),
    Target::at_most(Metric::Max, 1.0),
];

/// One line per run: p50 with its ratio, `extra` (e.g. req/s, p99), CPU per request.
fn progress(round: u32, rounds: u32, what: &str, r: &AbRun, extra: Metric) {
    let (x, y) = (r.side(false), r.side(true));
    eprintln!(
        "[mesh] round {round}/{rounds} {what}: p50 {:.1} → {:.1} µs ({:.2}), {} {:.1} → {:.1}, {:.1} → {:.1} CPU µs/req",
        x.metric(Metric::P50),
        y.metric(Metric::P50),
        y.metric(Metric::P50) / x.metric(Metric::P50),
        extra.label(),
        x.metric(extra),
        y.metric(extra),
        x.metric(Metric::CpuPerReq),
        y.metric(Metric::CpuPerReq),
    );
}

/// What every connection count's measurement shares: the mesh, the agent, the options.
struct Ctx<'a> {
    a: &'a Args,
    // Dropped in this order: the agent before the mesh it runs in.
    accel: Accel,
    m: SidecarMesh,
    wl: [Workload; 2],
    client: Pod,
    server: Pod,
    pin: Pin,
    client_cpus: Cpus,
    server_cpus: Cpus,
    tmp: tempfile::TempDir,
    rounds: u32,
    blocks: u32,
    with_rate: bool,
}

fn run(a: &Args) -> anyhow::Result<bool> {
    require_root();
    let (rounds, blocks, with_rate) = if a.common.short {
        (3, 12, false)
    } else {
        (a.rounds, a.blocks, !a.no_rate)
    };
    let pin = a
        .pin
        .unwrap_or(if a.common.short { Pin::One } else { Pin::None });
    let connections = match &a.connections {
        Some(c) => c.0.clone(),
        None if a.common.short => vec![1],
        None => vec![1, targets::MANY],
    };
    let (client_cpus, server_cpus): (Cpus, Cpus) = match pin {
        Pin::Pods => (Some("0".into()), Some("1".into())),
        Pin::One => (Some("0".into()), Some("0".into())),
        Pin::None => (None, None),
    };
    eprintln!("[mesh] two pods with Istio's capture rules and Envoy sidecars (mTLS)");
    let mut m = SidecarMesh::start_with(
        &[
            PodSpec::mesh("client", &[]),
            PodSpec::mesh("server", &[8080]),
        ],
        Rules::Generated,
    )?;
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let wl = [a.common.workload(&client), a.common.workload(&server)];
    let accel = Accel::start(&m.mesh, false, &wl)?;
    driver::serve(
        &mut m.mesh,
        &server,
        APP_UID,
        &server_cpus,
        &[
            "http-server".into(),
            "--listen".into(),
            "0.0.0.0:8080".into(),
        ],
    )?;
    let _spinner = if a.busy_idle {
        let cpus: Vec<usize> = match pin {
            Pin::One => vec![0],
            Pin::Pods => vec![0, 1],
            Pin::None => (0..num_cpus()).collect(),
        };
        eprintln!("[mesh] keeping CPUs {cpus:?} out of idle (SCHED_IDLE spinners)");
        Some(driver::IdleSpinner::start(&cpus)?)
    } else {
        None
    };
    let mut ctx = Ctx {
        a,
        m,
        accel,
        wl,
        client,
        server,
        pin,
        client_cpus,
        server_cpus,
        tmp: driver::shared_tempdir()?,
        rounds,
        blocks,
        with_rate,
    };
    let mut ok = true;
    for &c in &connections {
        ok &= measure(&mut ctx, c)?;
    }
    Ok(ok)
}

/// The A/B client's arguments for `connections` connections per side.
fn client_args(x: &Ctx<'_>, connections: usize) -> Vec<String> {
    [
        "ab-http",
        "--connect",
        &format!("{}:8080", x.server.ip),
        "--size",
        &x.a.size.to_string(),
        "--connections",
        &connections.to_string(),
        "--cpu-stat",
        &x.client.cgroup.join("cpu.stat").to_string_lossy(),
        "--cpu-stat",
        &x.server.cgroup.join("cpu.stat").to_string_lossy(),
    ]
    .map(String::from)
    .to_vec()
}

/// One connection count: its rounds, table, `mesh-<connections>.json` and `.png`; false when
/// `--check` fails.
fn measure(x: &mut Ctx<'_>, connections: usize) -> anyhow::Result<bool> {
    let (a, rounds, blocks, with_rate) = (x.a, x.rounds, x.blocks, x.with_rate);
    let name = format!("mesh-{connections}");
    eprintln!(
        "[mesh] {connections} connection(s) per side, pinning {:?}",
        x.pin
    );
    let mut machine = driver::machine();
    let other = driver::OtherLoad::start(x.m.mesh.cgroup_root());
    let base = client_args(x, connections);
    let (mut closed, mut fixed) = (Compare::default(), Compare::default());
    let mut rate = a.rate;
    for round in 1..=rounds {
        // Envoy's threads (re-pinned each round: cheap, and covers threads started late).
        driver::pin_cgroup(&x.client.cgroup, "envoy", &x.client_cpus)?;
        driver::pin_cgroup(&x.server.cgroup, "envoy", &x.server_cpus)?;
        let mut setup = AbSetup {
            accel: &mut x.accel,
            workloads: &x.wl,
            pod: &x.client,
            cpus: &x.client_cpus,
            dir: x.tmp.path(),
        };
        let mut args = base.clone();
        args.extend(driver::block_args(blocks, a.block_ms, 400));
        let r = driver::run_ab(&mut x.m.mesh, &mut setup, &args)?;
        progress(round, rounds, "closed loop", &r, Metric::Rate);
        let rate_now = *rate.get_or_insert_with(|| {
            ((r.side(false).metric(Metric::Rate) * a.rate_fraction) / 100.0)
                .round()
                .max(1.0)
                * 100.0
        });
        closed.rounds.push(r);
        if with_rate {
            args.extend(["--rate".into(), rate_now.to_string()]);
            let r = driver::run_ab(&mut x.m.mesh, &mut setup, &args)?;
            progress(
                round,
                rounds,
                &format!("fixed rate {rate_now} req/s"),
                &r,
                Metric::P99,
            );
            fixed.rounds.push(r);
        }
    }
    if let Some(dir) = &a.common.perf {
        let dir = dir.join(&name);
        eprintln!("[mesh] profiling with perf into {}", dir.display());
        driver::pin_cgroup(&x.client.cgroup, "envoy", &x.client_cpus)?;
        driver::pin_cgroup(&x.server.cgroup, "envoy", &x.server_cpus)?;
        let mut setup = AbSetup {
            accel: &mut x.accel,
            workloads: &x.wl,
            pod: &x.client,
            cpus: &x.client_cpus,
            dir: x.tmp.path(),
        };
        let mut args = base.clone();
        if a.perf_rate
            && let Some(rate) = rate
        {
            args.extend(["--rate".into(), rate.to_string()]);
        }
        let r = driver::run_ab_profiled(
            &mut x.m.mesh,
            &mut setup,
            &args,
            &dir,
            a.common.perf_block_ms,
        )?;
        driver::write_json(
            &dir,
            "profiled-run.json",
            &Compare { rounds: vec![r] }.to_json(&METRICS, false),
        )?;
    }
    machine["loadavg_end"] = json!(driver::loadavg());
    other.record(&mut machine);
    let targets = targets::closed_loop(connections);

    let p50 = closed.ratio(Metric::P50);
    let noise = closed.noise(Metric::P50);
    let inverted = p50.median > 1.0 + noise;
    println!();
    println!(
        "mesh: client app → Envoy → (mTLS) → Envoy → server app, HTTP/1.1 keep-alive, {} B bodies, {connections} connection(s) per side, pinning {:?}, {rounds} rounds × {blocks} blocks of {} ms, interleaved",
        a.size, x.pin, a.block_ms
    );
    println!("{}", driver::machine_line(&machine));
    if a.busy_idle {
        println!(
            "DIAGNOSTIC (--busy-idle): the pinned CPUs never went idle (SCHED_IDLE spinners); \
             the other-load figure counts the spinners"
        );
    }
    println!("\nclosed loop:\n");
    print!("{}", table(&closed, &METRICS, targets));
    report_tail::print_noise(noise);
    if with_rate {
        println!(
            "\nfixed rate, {} req/s per side (coordinated omission corrected):\n",
            rate.unwrap_or(0.0)
        );
        print!("{}", table(&fixed, &METRICS, &RATE_TARGETS));
    }
    let gate = report_tail::gate(&closed, &name, GATE_FLOOR);
    if inverted {
        println!(
            "INVERSION: accelerated p50 is worse than baseline beyond the run's noise ({}, noise {noise:.3})",
            p50.show()
        );
    }
    let result = json!({
        "bench": name,
        "what": "client app → Envoy → (mTLS) → Envoy → server app, HTTP/1.1 keep-alive GET",
        "size": a.size,
        "connections": connections,
        "pin": format!("{:?}", x.pin).to_lowercase(),
        "rounds": rounds,
        "blocks": blocks,
        "block_ms": a.block_ms,
        "short": a.common.short,
        "app_sockets": format!("{:?}", a.common.app_sockets).to_lowercase(),
        "busy_idle": a.busy_idle,
        "machine": machine,
        "inversion": inverted,
        "gate": gate,
        "closed": {
            "targets": report_tail::targets_json(&closed, targets),
            "result": closed.to_json(&METRICS, true),
        },
        "fixed_rate": if with_rate { json!({
            "rate": rate,
            "targets": report_tail::targets_json(&fixed, &RATE_TARGETS),
            "result": fixed.to_json(&METRICS, true),
        }) } else { json!(null) },
    });
    let panels = if with_rate { 2 } else { 1 };
    report_tail::write_results(&name, &a.common.out, &result, (900 * panels, 560), |area| {
        let parts = area.split_evenly((1, panels as usize));
        let (ca, cb) = (closed.pooled(false), closed.pooled(true));
        plot::percentiles(
            &parts[0],
            &format!(
                "mesh: HTTP {} B, {connections} conn., closed loop ({rounds} rounds)",
                a.size
            ),
            &[
                ("baseline (TCP)".into(), &ca.hist, plot::BASELINE),
                ("accelerated".into(), &cb.hist, plot::ACCELERATED),
            ],
        )?;
        if with_rate {
            let (fa, fb) = (fixed.pooled(false), fixed.pooled(true));
            plot::percentiles(
                &parts[1],
                &format!(
                    "mesh: HTTP {} B, {connections} conn., fixed rate {} req/s",
                    a.size,
                    rate.unwrap_or(0.0)
                ),
                &[
                    ("baseline (TCP)".into(), &fa.hist, plot::BASELINE),
                    ("accelerated".into(), &fb.hist, plot::ACCELERATED),
                ],
            )?;
        }
        Ok(())
    })?;
    Ok(!(a.common.check && (inverted || !gate.is_empty())))
}

fn num_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::install_signal_handlers();
    report_tail::exit("mesh", run(&a))
}
