//! `sweep`: throughput and latency by message size (64 B … 1 MiB), both directions, on two flow
//! shapes, baseline and accelerated interleaved in one run:
//!
//! - `hop`: app ↔ sidecar, one socket pair under Istio's capture (the "sidecar" is the e2e tool's
//!   `rr-server` on 15001, UID 1337);
//! - `mesh`: client app → Envoy → (mTLS) → Envoy → server app (`rr-server` on 8080), real Envoy
//!   1.40 sidecars doing TCP proxying as for any Istio TCP port.
//! - `remote` (the `cross-node` benchmark: `--name cross-node --paths remote`): the same, but
//!   the server pod stands for another node's: neither its Envoy nor its app is a workload of
//!   this agent, so only the client's app ↔ sidecar leg can pair; the client sidecar's socket
//!   to the other node must cost nothing.
//!
//! Per size S:
//! - throughput up: the client writes a transfer of N bytes in writes of S bytes, the server
//!   answers 64 B when it has them all; down: the client asks with 64 B, the server writes N
//!   bytes in writes of S. N = clamp(1024·S, 1 MiB, 16 MiB). MB/s = bytes / time of the blocks.
//! - latency up: request of S bytes, response 64 B; down: request 64 B, response S bytes.
//!
//! Each (size, kind) is its own service (destination port), as services in a mesh have their
//! own traffic shapes: the dataplane remembers a service whose connections stream small writes
//! and keeps its next connections on TCP (`--small-write-secs`). A first unmeasured round
//! (`--learn-rounds`) lets it see every service once, as a long-running mesh has.
//!
//! Every socket has TCP_NODELAY (as gRPC, Go and Envoy set it). Prints per size the ratios
//! accelerated/baseline with their spread, and names every cell where the accelerated side is
//! slower; writes `sweep.json` and `sweep.png`.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use meshaccel_benches::{
    driver::{self, AbSetup, Cpus},
    plot::{self, SizePoint, SizeSeries},
    stats::{Compare, Metric, Spread, round3},
};
use meshaccel_e2e::{
    APP_UID, PROXY_UID, Pod,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, Rules, SidecarMesh},
};
use serde_json::{Value, json};

/// Throughput and latency by message size, both directions, baseline vs accelerated.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds (each: every cell once, interleaved A/B, fresh connections).
    #[arg(long, env = "MESHACCEL_SWEEP_ROUNDS", default_value_t = 3)]
    rounds: u32,
    /// Unmeasured rounds first, in which the dataplane sees each service's traffic shape.
    #[arg(long, env = "MESHACCEL_SWEEP_LEARN_ROUNDS", default_value_t = 1)]
    learn_rounds: u32,
    /// Measured blocks per cell (sides alternate A B B A …).
    #[arg(long, env = "MESHACCEL_SWEEP_BLOCKS", default_value_t = 8)]
    blocks: u32,
    /// Length of a block.
    #[arg(long, env = "MESHACCEL_SWEEP_BLOCK_MS", default_value_t = 150)]
    block_ms: u64,
    /// Message sizes (bytes, comma-separated).
    #[arg(
        long,
        env = "MESHACCEL_SWEEP_SIZES",
        value_delimiter = ',',
        default_value = "64,256,1024,4096,16384,65536,262144,1048576"
    )]
    sizes: Vec<u64>,
    /// Flow shapes.
    #[arg(
        long,
        env = "MESHACCEL_SWEEP_PATHS",
        value_enum,
        value_delimiter = ',',
        default_value = "hop,mesh"
    )]
    paths: Vec<Path>,
    /// What to measure.
    #[arg(
        long,
        env = "MESHACCEL_SWEEP_KINDS",
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,latency"
    )]
    kinds: Vec<Kind>,
    /// CPU pinning: `same` every process on CPU 0 (no cross-CPU wake-up, as `hop` and `mesh`);
    /// `split` the client side on CPU 0, the server side on CPU 1 (hop: app and sidecar; mesh:
    /// each pod with its Envoy), so that sender and receiver work in parallel; `none` the
    /// scheduler decides.
    #[arg(long, env = "MESHACCEL_SWEEP_PIN", value_enum, default_value_t = Pin::Same)]
    pin: Pin,
    /// Also profile each cell: one more run of two long blocks (baseline, accelerated), each
    /// recorded system-wide with `perf record`, into DIR/<path>-<kind>-<dir>-<size>/ (select
    /// cells with --paths, --kinds, --sizes).
    #[arg(long, env = "MESHACCEL_BENCH_PERF")]
    perf: Option<PathBuf>,
    /// Length of each profiled block.
    #[arg(long, env = "MESHACCEL_BENCH_PERF_BLOCK_MS", default_value_t = 3000)]
    perf_block_ms: u64,
    /// Where NAME.json and NAME.png go.
    #[arg(long, env = "MESHACCEL_BENCH_OUT", default_value = "benches/results")]
    out: PathBuf,
    /// The benchmark's name in its report and files.
    #[arg(long, default_value = "sweep")]
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Path {
    Hop,
    Mesh,
    /// The server on another node (see the crate docs).
    Remote,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Throughput,
    Latency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pin {
    Same,
    Split,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

impl Dir {
    fn arrow(self) -> &'static str {
        match self {
            Dir::Up => "↑ client→server",
            Dir::Down => "↓ server→client",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// The small side of a request/response.
const SMALL: u64 = 64;

fn transfer_bytes(size: u64) -> u64 {
    (size * 1024).clamp(1 << 20, 16 << 20)
}

/// (request, response, write size) of a cell.
fn shape(kind: Kind, dir: Dir, size: u64) -> (u64, u64, u64) {
    let size = size.max(32);
    match (kind, dir) {
        (Kind::Throughput, Dir::Up) => (transfer_bytes(size), SMALL, size),
        (Kind::Throughput, Dir::Down) => (SMALL, transfer_bytes(size), size),
        (Kind::Latency, Dir::Up) => (size, SMALL, size),
        (Kind::Latency, Dir::Down) => (SMALL, size, size),
    }
}

struct Cell {
    path: Path,
    kind: Kind,
    dir: Dir,
    size: u64,
    /// Its service: the port offset of its (size, kind).
    service: u16,
    c: Compare,
}

/// First port of the services (hop: any port is captured to the pod's 15001; mesh: the server
/// app listens on `BASE_PORT + service`).
const BASE_PORT: u16 = 8080;

impl Cell {
    /// The metric the cell is judged by.
    fn metric(&self) -> Metric {
        match self.kind {
            Kind::Throughput => Metric::MBps,
            Kind::Latency => Metric::P50,
        }
    }
    /// The accelerated side's sockets stayed on TCP in every measured round: its service was
    /// known to stream small writes (the dataplane kept them out of the sockhash).
    fn kept_on_tcp(&self) -> bool {
        !self.c.rounds.is_empty()
            && self.c.rounds.iter().all(|r| {
                let k = &r.extra["kernel_counters"];
                k["inserted"].as_u64().unwrap_or(0) == 0
                    && k["skip_small_writes"].as_u64().unwrap_or(0) > 0
            })
    }
    /// Where the gain falls: `slower` only beyond the run's own noise (the largest gap between
    /// the two halves of one side, A/A or B/B).
    fn verdict(&self) -> Verdict {
        let g = self.gain();
        if g.median >= 1.0 {
            Verdict::NotSlower
        } else if g.median >= 1.0 - self.c.noise(self.metric()) {
            Verdict::WithinNoise
        } else {
            Verdict::Slower
        }
    }
    /// Ratio oriented so that > 1 means "accelerated is better".
    fn gain(&self) -> Spread {
        let r = self.c.ratio(self.metric());
        match self.kind {
            Kind::Throughput => r,
            Kind::Latency => Spread {
                median: 1.0 / r.median,
                min: 1.0 / r.max,
                max: 1.0 / r.min,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    NotSlower,
    WithinNoise,
    Slower,
}

impl Verdict {
    fn key(self) -> &'static str {
        match self {
            Verdict::NotSlower => "not_slower",
            Verdict::WithinNoise => "within_noise",
            Verdict::Slower => "slower",
        }
    }
}

const CELL_METRICS: [Metric; 7] = [
    Metric::P50,
    Metric::P99,
    Metric::P999,
    Metric::Max,
    Metric::Rate,
    Metric::MBps,
    Metric::SegsPerReq,
];

struct PathSetup {
    pod: Pod,
    target: String,
    cpus: Cpus,
}

fn run(a: &Args) -> anyhow::Result<()> {
    require_root();
    anyhow::ensure!(!a.sizes.is_empty(), "no sizes");
    let mut machine = driver::machine();
    let (client_cpus, server_cpus): (Cpus, Cpus) = match a.pin {
        Pin::Same => (Some("0".into()), Some("0".into())),
        Pin::Split => (Some("0".into()), Some("1".into())),
        Pin::None => (None, None),
    };
    eprintln!(
        "[sweep] pods with Istio's capture rules: client and server with Envoy sidecars (mTLS), \
         and a hop pod whose sidecar stand-in answers on 15001"
    );
    let services = (a.sizes.len() * a.kinds.len()) as u16;
    let ports: Vec<u16> = (0..services).map(|s| BASE_PORT + s).collect();
    let mut pods = vec![
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("server", &ports),
    ];
    let remote = a.paths.contains(&Path::Remote);
    if remote {
        pods.push(PodSpec::mesh("remote", &ports));
    }
    let mut m = SidecarMesh::start_with(&pods, Rules::Generated)?;
    let tmp = driver::shared_tempdir()?;
    let rules = driver::capture_rules(tmp.path())?;
    let hop = m.mesh.add_pod("hop", Some(&rules))?;
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let wl = [
        Workload::on(&client),
        Workload::on(&server),
        Workload::on(&hop),
    ];
    let mut accel = Accel::start(&m.mesh, false, &wl)?;
    let other = driver::OtherLoad::start(m.mesh.cgroup_root());
    let mut rr = vec!["rr-server".to_string()];
    for p in &ports {
        rr.extend(["--listen".into(), format!("0.0.0.0:{p}")]);
    }
    driver::serve(&mut m.mesh, &server, APP_UID, &server_cpus, &rr)?;
    // Not a workload of this agent: another node's pod.
    let remote_pod = if remote {
        let p = m.pod("remote").clone();
        driver::serve(&mut m.mesh, &p, APP_UID, &server_cpus, &rr)?;
        Some(p)
    } else {
        None
    };
    driver::serve(
        &mut m.mesh,
        &hop,
        PROXY_UID,
        &server_cpus,
        &[
            "rr-server".into(),
            "--listen".into(),
            "0.0.0.0:15001".into(),
        ],
    )?;
    let setup_of = |p: Path, service: u16| match p {
        Path::Hop => PathSetup {
            pod: hop.clone(),
            // Any mesh address: Istio's rules redirect it to the pod's own 15001.
            target: format!("{}:{}", server.ip, BASE_PORT + service),
            cpus: client_cpus.clone(),
        },
        Path::Mesh => PathSetup {
            pod: client.clone(),
            target: format!("{}:{}", server.ip, BASE_PORT + service),
            cpus: client_cpus.clone(),
        },
        Path::Remote => PathSetup {
            pod: client.clone(),
            target: format!(
                "{}:{}",
                remote_pod.as_ref().expect("the remote pod").ip,
                BASE_PORT + service
            ),
            cpus: client_cpus.clone(),
        },
    };
    let mut cells: Vec<Cell> = Vec::new();
    for &path in &a.paths {
        for (si, &size) in a.sizes.iter().enumerate() {
            for (ki, &kind) in a.kinds.iter().enumerate() {
                for dir in [Dir::Up, Dir::Down] {
                    cells.push(Cell {
                        path,
                        kind,
                        dir,
                        size,
                        service: (si * a.kinds.len() + ki) as u16,
                        c: Compare::default(),
                    });
                }
            }
        }
    }
    let total = cells.len() as u32 * (a.learn_rounds + a.rounds);
    let mut done = 0;
    for round in 1..=a.learn_rounds + a.rounds {
        let learning = round <= a.learn_rounds;
        for cell in cells.iter_mut() {
            driver::pin_cgroup(&client.cgroup, "envoy", &client_cpus)?;
            driver::pin_cgroup(&server.cgroup, "envoy", &server_cpus)?;
            if let Some(p) = &remote_pod {
                driver::pin_cgroup(&p.cgroup, "envoy", &server_cpus)?;
            }
            let ps = setup_of(cell.path, cell.service);
            let (req, resp, chunk) = shape(cell.kind, cell.dir, cell.size);
            let base: Vec<String> = [
                "ab-rr",
                "--connect",
                &ps.target,
                "--req",
                &req.to_string(),
                "--resp",
                &resp.to_string(),
                "--chunk",
                &chunk.to_string(),
            ]
            .map(String::from)
            .to_vec();
            let mut args = base.clone();
            args.extend(driver::block_args(a.blocks, a.block_ms, 200));
            // What the dataplane's policies did during the cell (holds on TCP, resumes,
            // small-write streams seen, sockets kept out for being one).
            let policy = |a: &Accel| -> [u64; 4] {
                let s = a.status().unwrap_or_default();
                [
                    "hold_queue",
                    "resumed",
                    "learned_small_writes",
                    "skip_small_writes",
                ]
                .map(|n| s["counters"][n].as_u64().unwrap_or(0))
            };
            let before = policy(&accel);
            let mut setup = AbSetup {
                accel: &mut accel,
                workloads: &wl,
                pod: &ps.pod,
                cpus: &ps.cpus,
                dir: tmp.path(),
            };
            let r = driver::run_ab(&mut m.mesh, &mut setup, &args)?;
            let after = policy(setup.accel);
            done += 1;
            let metric = cell.metric();
            let (x, y) = (r.side(false).metric(metric), r.side(true).metric(metric));
            eprintln!(
                "[sweep] {done}/{total} round {round}{} {:?} {:?} {} {} B: {} {x:.1} → {y:.1} ({:.2}); held {}, resumed {}, small-write streams seen {}, sockets kept on TCP {}",
                if learning {
                    " (learning, not counted)"
                } else {
                    ""
                },
                cell.path,
                cell.kind,
                cell.dir.key(),
                cell.size,
                metric.label(),
                y / x,
                after[0] - before[0],
                after[1] - before[1],
                after[2] - before[2],
                after[3] - before[3],
            );
            if learning {
                continue;
            }
            cell.c.rounds.push(r);
            if let Some(dir) = a.perf.as_ref().filter(|_| round == a.learn_rounds + 1) {
                let dir = dir.join(format!(
                    "{:?}-{:?}-{}-{}",
                    cell.path,
                    cell.kind,
                    cell.dir.key(),
                    cell.size
                ));
                eprintln!("[sweep] profiling with perf into {}", dir.display());
                let r =
                    driver::run_ab_profiled(&mut m.mesh, &mut setup, &base, &dir, a.perf_block_ms)?;
                driver::write_json(
                    &dir,
                    "profiled-run.json",
                    &Compare { rounds: vec![r] }.to_json(&CELL_METRICS, false),
                )?;
            }
        }
    }
    machine["loadavg_end"] = json!(driver::loadavg());
    other.record(&mut machine);
    drop(accel);
    drop(m);

    println!();
    println!(
        "{}: by message size, both directions, {} rounds × {} blocks of {} ms per cell (after {} unmeasured), interleaved, pinning {:?}, a service (port) per size and kind",
        a.name, a.rounds, a.blocks, a.block_ms, a.learn_rounds, a.pin
    );
    println!("{}", driver::machine_line(&machine));
    let mut slower = Vec::new();
    for &path in &a.paths {
        for &kind in &a.kinds {
            println!();
            match kind {
                Kind::Throughput => println!(
                    "{path:?}, throughput (MB/s; transfers of clamp(1024·size, 1 MiB, 16 MiB) in writes of `size`):\n"
                ),
                Kind::Latency => println!(
                    "{path:?}, latency (µs; request `size` ↑ / response `size` ↓, the other way 64 B):\n"
                ),
            }
            println!(
                "| size | dir | baseline | accelerated | ratio [min–max] | p99 ratio | TCP segs/req A → B |"
            );
            println!("|---:|---|---:|---:|---|---:|---|");
            for cell in cells.iter().filter(|c| c.path == path && c.kind == kind) {
                let metric = cell.metric();
                let (pa, pb) = (cell.c.pooled(false), cell.c.pooled(true));
                let r = cell.c.ratio(metric);
                let noise = cell.c.noise(metric);
                let tcp = if cell.kept_on_tcp() {
                    " (TCP both: small-write service)"
                } else {
                    ""
                };
                let verdict = match cell.verdict() {
                    Verdict::Slower => " **slower**",
                    Verdict::WithinNoise => " (slower, within the run's noise)",
                    Verdict::NotSlower => "",
                };
                if cell.verdict() == Verdict::Slower {
                    slower.push(format!(
                        "{path:?} {kind:?} {} {} B: {} {:.1} → {:.1}, ratio {} (noise ±{:.2}){tcp}",
                        cell.dir.key(),
                        cell.size,
                        metric.label(),
                        pa.metric(metric),
                        pb.metric(metric),
                        r.show(),
                        noise,
                    ));
                }
                println!(
                    "| {} | {} | {:.1} | {:.1} | {}{verdict}{tcp} | {:.2} | {:.2} → {:.2} |",
                    plot::size_label(cell.size as f64),
                    cell.dir.arrow(),
                    pa.metric(metric),
                    pb.metric(metric),
                    r.show(),
                    cell.c.ratio(Metric::P99).median,
                    pa.metric(Metric::SegsPerReq),
                    pb.metric(Metric::SegsPerReq),
                );
            }
        }
    }
    println!();
    if slower.is_empty() {
        println!(
            "accelerated is not slower than baseline beyond the run's noise in any cell (median of rounds)"
        );
    } else {
        println!("cells where accelerated is slower beyond the run's noise (median of rounds):");
        for s in &slower {
            println!("  - {s}");
        }
    }

    let cells_json: Vec<Value> = cells
        .iter()
        .map(|c| {
            let (req, resp, chunk) = shape(c.kind, c.dir, c.size);
            json!({
                "path": format!("{:?}", c.path).to_lowercase(),
                "kind": format!("{:?}", c.kind).to_lowercase(),
                "dir": c.dir.key(),
                "size": c.size,
                "request": req,
                "response": resp,
                "write_size": chunk,
                "metric": c.metric().key(),
                "gain": c.gain().to_json(),
                "verdict": c.verdict().key(),
                "kept_on_tcp": c.kept_on_tcp(),
                "result": c.c.to_json(&CELL_METRICS, false),
            })
        })
        .collect();
    let result = json!({
        "bench": a.name,
        "what": "throughput and latency by message size, both directions; hop = app ↔ sidecar, mesh = app → Envoy → (mTLS) → Envoy → app, remote = the same with the server pod on another node (not this agent's workload)",
        "rounds": a.rounds,
        "learn_rounds": a.learn_rounds,
        "blocks": a.blocks,
        "block_ms": a.block_ms,
        "pin": format!("{:?}", a.pin).to_lowercase(),
        "machine": machine,
        "target": "throughput ratio ≥ 1.00 at every size",
        "slower": slower,
        "cells": cells_json,
    });
    let json_path = driver::write_json(&a.out, &format!("{}.json", a.name), &result)?;
    let png_path = a.out.join(format!("{}.png", a.name));
    let rows = a.paths.len() as u32;
    plot::png(&png_path, (1500, 480 * rows), |area| {
        let parts = area.split_evenly((rows as usize, 2));
        for (i, &path) in a.paths.iter().enumerate() {
            let series = |kind: Kind, dir: Dir, accelerated: bool| -> Vec<SizePoint> {
                cells
                    .iter()
                    .filter(|c| c.path == path && c.kind == kind && c.dir == dir)
                    .map(|c| (c.size, c.c.pooled(accelerated).metric(c.metric()), None))
                    .collect()
            };
            let mut abs = Vec::new();
            for (dir, dash) in [(Dir::Up, 0usize), (Dir::Down, 1)] {
                abs.push(SizeSeries {
                    label: format!("baseline {}", dir.key()),
                    color: if dash == 0 {
                        plot::BASELINE
                    } else {
                        plot::ALT[0]
                    },
                    points: series(Kind::Throughput, dir, false),
                });
                abs.push(SizeSeries {
                    label: format!("accelerated {}", dir.key()),
                    color: if dash == 0 {
                        plot::ACCELERATED
                    } else {
                        plot::ALT[1]
                    },
                    points: series(Kind::Throughput, dir, true),
                });
            }
            plot::by_size(
                &parts[2 * i],
                &format!("{path:?}: throughput by write size"),
                "MB/s",
                &abs,
                true,
                None,
            )?;
            let mut ratios = Vec::new();
            for (kind, dir, color) in [
                (Kind::Throughput, Dir::Up, plot::ACCELERATED),
                (Kind::Throughput, Dir::Down, plot::ALT[1]),
                (Kind::Latency, Dir::Up, plot::BASELINE),
                (Kind::Latency, Dir::Down, plot::ALT[0]),
            ] {
                let points: Vec<_> = cells
                    .iter()
                    .filter(|c| c.path == path && c.kind == kind && c.dir == dir)
                    .map(|c| {
                        let g = c.gain();
                        (c.size, round3(g.median), Some((g.min, g.max)))
                    })
                    .collect();
                if !points.is_empty() {
                    ratios.push(SizeSeries {
                        label: match kind {
                            Kind::Throughput => format!("throughput {}", dir.key()),
                            Kind::Latency => format!("1 / p50 latency {}", dir.key()),
                        },
                        color,
                        points,
                    });
                }
            }
            plot::by_size(
                &parts[2 * i + 1],
                &format!("{path:?}: gain accelerated/baseline (> 1 is better)"),
                "gain",
                &ratios,
                false,
                Some(1.0),
            )?;
        }
        Ok(())
    })?;
    eprintln!(
        "[sweep] wrote {} and {}",
        json_path.display(),
        png_path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::install_signal_handlers();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[sweep] {e:#}");
            ExitCode::from(2)
        }
    }
}
