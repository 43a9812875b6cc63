//! The demo: a two-pod local mesh with Istio's capture rules and real Envoy sidecars (mTLS), the
//! same HTTP/1.1 keep-alive load with acceleration off and on, and a table of the difference.
//! Cleans up after itself, also on Ctrl-C.
use std::{
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use meshaccel_e2e::{
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, Rules, SidecarMesh},
    wait_output_timeout,
};
use serde_json::Value;

/// Runs the local demo mesh and prints what acceleration changes.
#[derive(Parser)]
struct Args {
    /// Requests per phase.
    #[arg(long, env = "MESHACCEL_DEMO_REQUESTS", default_value_t = 20_000)]
    requests: u64,
    /// Response body size in bytes.
    #[arg(long, env = "MESHACCEL_DEMO_SIZE", default_value_t = 1024)]
    size: u64,
    /// Keep-alive connections.
    #[arg(long, env = "MESHACCEL_DEMO_CONNECTIONS", default_value_t = 1)]
    connections: u64,
    /// Off/on rounds, interleaved (the table shows the median round of each).
    #[arg(long, env = "MESHACCEL_DEMO_ROUNDS", default_value_t = 3)]
    rounds: u32,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Phase {
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    qps: f64,
    segs_per_req: f64,
}

fn run_load(m: &mut SidecarMesh, stop_file: &Path, a: &Args) -> anyhow::Result<Phase> {
    let target = format!("{}:8080", m.pod("server").ip);
    let pods = ["client", "server"];
    let before: Vec<_> = pods
        .iter()
        .map(|p| m.pod(p).tcp_counters())
        .collect::<Result<_, _>>()?;
    let child = m.app(
        "client",
        &[
            "http-load",
            "--connect",
            &target,
            "--requests",
            &a.requests.to_string(),
            "--size",
            &a.size.to_string(),
            "--connections",
            &a.connections.to_string(),
            "--stop-file",
            &stop_file.to_string_lossy(),
        ],
    )?;
    let out = wait_output_timeout(child, Duration::from_secs(600))?;
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| format!("http-load printed no report: {text:?}"))?;
    if !(out.status.success() && v["ok"] == true) {
        bail!("http-load failed: {v}");
    }
    let mut segs = 0;
    for (p, b) in pods.iter().zip(&before) {
        segs += m.pod(p).tcp_counters()?.since(b).in_segs;
    }
    let requests = v["requests"].as_u64().unwrap_or(0);
    Ok(Phase {
        requests,
        p50_us: v["p50_us"].as_f64().unwrap_or(f64::NAN),
        p99_us: v["p99_us"].as_f64().unwrap_or(f64::NAN),
        qps: v["qps"].as_f64().unwrap_or(f64::NAN),
        segs_per_req: segs as f64 / requests.max(1) as f64,
    })
}

fn median(mut v: Vec<Phase>) -> Phase {
    v.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
    v.swap_remove(v.len() / 2)
}

fn run(a: &Args) -> anyhow::Result<()> {
    require_root();
    eprintln!("[demo] starting two pods with Istio's capture rules and Envoy sidecars (mTLS)");
    let mut m = SidecarMesh::start_with(
        &[
            PodSpec::mesh("client", &[]),
            PodSpec::mesh("server", &[8080]),
        ],
        Rules::Generated,
    )?;
    // The default (`appSockets: auto`): meshaccel accelerates what cannot change what the apps
    // see. And the same apps declared trusted (they read as event loops do), as an operator may.
    let auto = [
        Workload::auto(m.pod("client")),
        Workload::auto(m.pod("server")),
    ];
    let trusted = [Workload::on(m.pod("client")), Workload::on(m.pod("server"))];
    eprintln!("[demo] starting the meshaccel agent (switch off)");
    let mut accel = Accel::start(&m.mesh, false, &auto)?;
    m.serve("server", &["http-server", "--listen", "0.0.0.0:8080"])?;
    let stop_file = m.dir().join("stop");
    // Ctrl-C: tell the running load to stop (it polls this file), then unwind and clean up.
    let stop = stop_file.clone();
    std::thread::spawn(move || {
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::write(stop, b"");
    });
    let phases = [
        (false, &auto, "off"),
        (true, &auto, "on (default)"),
        (true, &trusted, "on (apps trusted)"),
    ];
    let mut runs: [Vec<Phase>; 3] = Default::default();
    for round in 1..=a.rounds {
        for (i, (enabled, wl, what)) in phases.iter().enumerate() {
            if STOP.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            accel.set_workloads(*enabled, &wl[..])?;
            eprintln!(
                "[demo] round {round}/{}: {} requests of {} B, acceleration {what}",
                a.rounds, a.requests, a.size,
            );
            runs[i].push(run_load(&mut m, &stop_file, a)?);
        }
    }
    let c = accel.status()?;
    let [off, on, all] = runs.map(median);
    println!();
    println!(
        "meshaccel demo: client app → Envoy → (mTLS) → Envoy → server app, HTTP/1.1 keep-alive,"
    );
    println!(
        "{} B responses, {} connection(s), median of {} interleaved rounds",
        a.size, a.connections, a.rounds
    );
    println!();
    println!(
        "| {:<22} | {:>10} | {:>12} | {:>8} | {:>17} | {:>8} |",
        "", "off", "on (default)", "on/off", "on (apps trusted)", "/off"
    );
    println!(
        "|{:-<24}|{:->12}|{:->14}|{:->10}|{:->19}|{:->10}|",
        "", "", "", "", "", ""
    );
    let row = |name: &str, x: f64, y: f64, z: f64, prec: usize| {
        println!(
            "| {name:<22} | {x:>10.prec$} | {y:>12.prec$} | {:>8.2} | {z:>17.prec$} | {:>8.2} |",
            y / x,
            z / x
        );
    };
    row(
        "requests",
        off.requests as f64,
        on.requests as f64,
        all.requests as f64,
        0,
    );
    row("p50 latency (µs)", off.p50_us, on.p50_us, all.p50_us, 1);
    row("p99 latency (µs)", off.p99_us, on.p99_us, all.p99_us, 1);
    row("requests per second", off.qps, on.qps, all.qps, 0);
    row(
        "TCP segments / request",
        off.segs_per_req,
        on.segs_per_req,
        all.segs_per_req,
        2,
    );
    println!();
    println!(
        "on (default): the sidecar ↔ sidecar leg, and an app's bytes into its sidecar where the app"
    );
    println!("is an event loop (these apps block: not theirs); on (apps trusted): all three legs.");
    println!();
    println!(
        "kernel counters: {} messages and {} bytes redirected, {} sockets paired, {} fell back to TCP",
        c["counters"]["redirect_msgs"],
        c["counters"]["redirect_bytes"],
        c["counters"]["inserted"],
        c["counters"]["fallback_no_peer"].as_u64().unwrap_or(0)
            + c["counters"]["fallback_disabled"].as_u64().unwrap_or(0)
            + c["counters"]["fallback_redirect_failed"]
                .as_u64()
                .unwrap_or(0)
    );
    eprintln!("[demo] cleaning up");
    drop(accel);
    drop(m);
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[demo] {e:#}");
            ExitCode::FAILURE
        }
    }
}
