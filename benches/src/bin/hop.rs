//! `hop`: one app ↔ sidecar socket pair under Istio's capture rules, 64 B ping-pong, baseline
//! and accelerated interleaved in one run. The app (UID 1000) connects to a mesh address; Istio's
//! `ISTIO_OUTPUT` redirects it to port 15001, where the "sidecar" (UID 1337, the e2e tool's
//! `rr-server`) answers every message with one of the same size.
//!
//! Prints p50, p90, p99, p99.9, max and round trips per second for both, the ratios
//! accelerated/baseline with their spread over the rounds, writes `hop.json` and `hop.png`, and
//! with `--check` exits 1 on a clear inversion (accelerated p50 not lower than baseline), when
//! acceleration did not engage, or when the p50 ratio is above [`GATE_FLOOR`]'s 0.75. Also
//! measures the floor (the same ping-pong over a UNIX stream pair on the same CPU) and the sk_msg
//! program's run time per message (kernel BPF stats, one extra round).
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use meshaccel_benches::{
    driver::{self, AbSetup, Cpus},
    plot, report_tail,
    stats::{Compare, Metric, Target},
};
use meshaccel_e2e::{Mesh, PROXY_UID, accel::Accel, require_root};
use serde_json::json;

/// Latency of one app ↔ sidecar hop under Istio's capture, baseline vs accelerated.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds (each one interleaved A/B run with fresh connections).
    #[arg(long, env = "MESHACCEL_HOP_ROUNDS", default_value_t = 5)]
    rounds: u32,
    /// Measured blocks per round (sides alternate A B B A …).
    #[arg(long, env = "MESHACCEL_HOP_BLOCKS", default_value_t = 40)]
    blocks: u32,
    /// Length of a block.
    #[arg(long, env = "MESHACCEL_HOP_BLOCK_MS", default_value_t = 50)]
    block_ms: u64,
    /// Message size, both ways.
    #[arg(long, env = "MESHACCEL_HOP_SIZE", default_value_t = 64)]
    size: u64,
    /// CPU pinning: `same` app and sidecar both on CPU 0 (no cross-CPU wake-up: on a 2-vCPU VM
    /// those dominate a hop otherwise), `split` app on CPU 0 and sidecar on CPU 1, `none` the
    /// scheduler decides.
    #[arg(long, env = "MESHACCEL_HOP_PIN", value_enum, default_value_t = Pin::Same)]
    pin: Pin,
    #[command(flatten)]
    common: driver::CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pin {
    Split,
    Same,
    None,
}

const METRICS: [Metric; 11] = Metric::TABLE;

/// The targets (ratios accelerated/baseline).
/// The CI gate's floor: a working build's short debug run measures p50 0.60 [0.60–0.61] here
/// (CI, 5 Dec 2026; full release runs 0.55–0.65), so 0.75 leaves room for a noisy machine and
/// still fails when most of the gain is gone.
const GATE_FLOOR: Target = Target::at_most(Metric::P50, 0.75);

const TARGETS: [Target; 2] = [
    Target::at_most(Metric::P50, 0.55),
    Target::at_most(Metric::P99, 0.60),
];

/// The accelerated hop's p50 at most this many times a UNIX stream pair's (issue: the floor).
const FLOOR_TARGET: f64 = 1.3;

fn run(a: &Args) -> anyhow::Result<bool> {
    require_root();
    let (rounds, blocks) = if a.common.short {
        (3, 16)
    } else {
        (a.rounds, a.blocks)
    };
    let machine = driver::machine();
    let (app_cpus, sidecar_cpus): (Cpus, Cpus) = match a.pin {
        Pin::Split => (Some("0".into()), Some("1".into())),
        Pin::Same => (Some("0".into()), Some("0".into())),
        Pin::None => (None, None),
    };
    let tmp = driver::shared_tempdir()?;
    let rules = driver::capture_rules(tmp.path())?;
    eprintln!("[hop] pod with Istio's capture rules, sidecar stand-in on 15001 (UID 1337)");
    let mut mesh = Mesh::new()?;
    let app = mesh.add_pod("app", Some(&rules))?;
    // Only its address is used: the app's connection to it is redirected to the sidecar.
    let peer = mesh.add_pod("peer", None)?;
    let wl = [a.common.workload(&app)];
    let mut accel = Accel::start(&mesh, false, &wl)?;
    let other = driver::OtherLoad::start(mesh.cgroup_root());
    driver::serve(
        &mut mesh,
        &app,
        PROXY_UID,
        &sidecar_cpus,
        &[
            "rr-server".into(),
            "--listen".into(),
            "0.0.0.0:15001".into(),
        ],
    )?;
    let cpu_stat = app.cgroup.join("cpu.stat");
    let base: Vec<String> = [
        "ab-rr",
        "--connect",
        &format!("{}:8080", peer.ip),
        "--req",
        &a.size.to_string(),
        "--resp",
        &a.size.to_string(),
        "--chunk",
        &a.size.max(32).to_string(),
        "--cpu-stat",
        &cpu_stat.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    let mut args = base.clone();
    args.extend(driver::block_args(blocks, a.block_ms, 400));
    // The sk_msg program, whose run time per message is measured after the rounds.
    let msg_id = accel.status()?["prog_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .find(|id| driver::prog_name(*id).as_deref() == Some("meshaccel_msg"));
    let mut setup = AbSetup {
        accel: &mut accel,
        workloads: &wl,
        pod: &app,
        cpus: &app_cpus,
        dir: tmp.path(),
    };
    let mut c = Compare::default();
    for round in 1..=rounds {
        let r = driver::run_ab(&mut mesh, &mut setup, &args)?;
        let (x, y) = (r.side(false), r.side(true));
        eprintln!(
            "[hop] round {round}/{rounds}: p50 {:.1} → {:.1} µs ({:.2}), p99 {:.1} → {:.1} µs, {:.0} → {:.0} round trips/s",
            x.metric(Metric::P50),
            y.metric(Metric::P50),
            y.metric(Metric::P50) / x.metric(Metric::P50),
            x.metric(Metric::P99),
            y.metric(Metric::P99),
            x.metric(Metric::Rate),
            y.metric(Metric::Rate),
        );
        c.rounds.push(r);
    }
    // The floor: the same ping-pong over a UNIX stream pair on the app's CPU (no TCP/IP, no
    // sockmap), and what meshaccel's sk_msg program costs per message (kernel run-time stats,
    // on only for one extra round that is not in the table).
    eprintln!("[hop] floor: UNIX stream ping-pong on the same CPU");
    let floor = driver::unix_floor(&app_cpus, a.size, if a.common.short { 1000 } else { 3000 })?;
    let bpf = match (msg_id, driver::BpfRunStats::enable()) {
        (Some(id), Ok(stats)) => {
            let before = driver::prog_run_stats(id)?;
            let mut stat_args = base.clone();
            stat_args.extend(driver::block_args(4, a.block_ms, 400));
            driver::run_ab(&mut mesh, &mut setup, &stat_args)?;
            let after = driver::prog_run_stats(id)?;
            drop(stats);
            let runs = after.0.saturating_sub(before.0);
            json!({
                "program": "meshaccel_msg",
                "messages": runs,
                "ns_per_message": if runs > 0 { (after.1 - before.1) as f64 / runs as f64 } else { 0.0 },
                "xlated_instructions": after.2,
            })
        }
        (id, stats) => {
            eprintln!(
                "[hop] no BPF run-time stats (program {id:?}, stats {:?})",
                stats.err()
            );
            json!(null)
        }
    };
    if let Some(dir) = &a.common.perf {
        eprintln!("[hop] profiling with perf into {}", dir.display());
        let r = driver::run_ab_profiled(&mut mesh, &mut setup, &base, dir, a.common.perf_block_ms)?;
        driver::write_json(
            dir,
            "profiled-run.json",
            &Compare { rounds: vec![r] }.to_json(&METRICS, false),
        )?;
    }
    let mut machine = machine;
    machine["loadavg_end"] = json!(driver::loadavg());
    other.record(&mut machine);
    drop(accel);
    drop(mesh);

    let p50 = c.ratio(Metric::P50);
    let inverted = p50.median >= 1.0;
    println!();
    println!(
        "hop: app ↔ sidecar under Istio's capture, {} B ping-pong, pinning {:?}, {rounds} rounds × {blocks} blocks of {} ms, interleaved",
        a.size, a.pin, a.block_ms
    );
    println!("{}", driver::machine_line(&machine));
    println!();
    print!(
        "{}",
        meshaccel_benches::stats::table(&c, &METRICS, &TARGETS)
    );
    let floor_p50 = floor["p50_us"].as_f64().unwrap_or(0.0);
    let hop_p50 = c.pooled(true).metric(Metric::P50);
    let over_floor = if floor_p50 > 0.0 {
        hop_p50 / floor_p50
    } else {
        0.0
    };
    println!(
        "floor (UNIX stream pair, same CPU, same reads): p50 {floor_p50:.1} µs; accelerated hop p50 {hop_p50:.1} µs = {over_floor:.2}× the floor (target ≤ {FLOOR_TARGET:.2}: {})",
        if over_floor <= FLOOR_TARGET {
            "met"
        } else {
            "**missed**"
        }
    );
    if !bpf.is_null() {
        println!(
            "meshaccel_msg (sk_msg): {:.0} ns per message over {} messages, {} translated instructions",
            bpf["ns_per_message"].as_f64().unwrap_or(0.0),
            bpf["messages"],
            bpf["xlated_instructions"]
        );
    }
    report_tail::print_noise(c.noise(Metric::P50));
    let gate = report_tail::gate(&c, "hop", GATE_FLOOR);
    if inverted {
        println!(
            "INVERSION: accelerated p50 is not lower than baseline ({})",
            p50.show()
        );
    }

    let result = json!({
        "bench": "hop",
        "what": "app ↔ sidecar socket pair under Istio's capture rules, ping-pong",
        "size": a.size,
        "pin": format!("{:?}", a.pin).to_lowercase(),
        "rounds": rounds,
        "blocks": blocks,
        "block_ms": a.block_ms,
        "short": a.common.short,
        "machine": machine,
        "targets": report_tail::targets_json(&c, &TARGETS),
        "inversion": inverted,
        "gate": gate,
        "floor": {
            "unix": floor,
            "accelerated_p50_over_unix_p50": over_floor,
            "target": FLOOR_TARGET,
        },
        "bpf": bpf,
        "result": c.to_json(&METRICS, true),
    });
    let (pa, pb) = (c.pooled(false), c.pooled(true));
    report_tail::write_results("hop", &a.common.out, &result, (900, 560), |area| {
        plot::percentiles(
            area,
            &format!(
                "hop: app ↔ sidecar, {} B ping-pong (pooled over {rounds} rounds)",
                a.size
            ),
            &[
                ("baseline (TCP)".into(), &pa.hist, plot::BASELINE),
                ("accelerated".into(), &pb.hist, plot::ACCELERATED),
            ],
        )
    })?;
    Ok(!(a.common.check && (inverted || !gate.is_empty())))
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::install_signal_handlers();
    report_tail::exit("hop", run(&a))
}
