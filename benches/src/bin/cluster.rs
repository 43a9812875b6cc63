//! meshaccel on a real single-node Kubernetes (a benchmark program, not a test; root).
//!
//! The chart installed as a user installs it, next to two Istio-injected workloads (echo server,
//! client) with real Envoy sidecars (e2e/src/cluster_mesh.rs). Measured:
//! 1. namespace label → the workloads' entries in the kernel maps (the agent's
//!    `meshaccel_accelerated_pods`, scraped every few ms from the agent pod), `--flips` times,
//!    each followed by one ping-pong that must show ~0 TCP segments per round trip (so the next
//!    connection after that moment is accelerated); the label is removed between flips and the
//!    entries must go;
//! 2. a new pod of a labelled namespace: its Ready condition → its entries present (both polled
//!    every few ms; the pod's Ready may come after the agent already enabled it: negative);
//! 3. the agent pod's RSS and its CPU use while idle (`--idle-secs`).
//!
//! Usage (root; scripts/install-kube.sh and scripts/install-cluster.sh done; the workspace built,
//! debug or release): `target/release/cluster [--flips 20 --idle-secs 30 --out DIR]`, or
//! `sudo scripts/bench.sh cluster`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use meshaccel_e2e::{
    cluster_mesh::{AGENT_METRICS_PORT, MeshNode, http_get},
    kube_api::{block_on, client_for},
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Label on/off rounds.
    #[arg(long, default_value_t = 20)]
    flips: usize,
    /// New pods whose Ready → entries time is measured.
    #[arg(long, default_value_t = 5)]
    new_pods: usize,
    /// How long the agent's idle CPU is measured.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Where cluster.json goes (default: $MESHACCEL_BENCH_OUT or benches/results).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The agent's `/metrics`.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(http_get(addr, "/metrics")?.1)
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Polls the agent's `meshaccel_accelerated_pods` until `done(value)`; the time it took.
fn until_pods(
    addr: SocketAddr,
    done: impl Fn(f64) -> bool,
    since: Instant,
) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(60);
    loop {
        if let Ok(m) = scrape(addr)
            && gauge(&m, "meshaccel_accelerated_pods").is_some_and(&done)
        {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("meshaccel_accelerated_pods did not reach the expected value within 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The agent's process on this node: (pid) of `meshaccel agent --node-name=<node>`.
fn agent_pid(node: &str) -> anyhow::Result<u32> {
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"agent")
            && args
                .iter()
                .any(|a| *a == format!("--node-name={node}").as_bytes())
        {
            return Ok(pid);
        }
    }
    bail!("no `meshaccel agent --node-name={node}` process")
}

/// (utime + stime) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("no ) in stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let node = MeshNode::start();
    node.helm_install("install", &node.tag, &[]);
    let (_server, client, server_ip) = node.deploy_pair(&[]);
    let metrics = SocketAddr::from((node.agent_ip()?, AGENT_METRICS_PORT));
    // The label is written with one API call; times start just before it.
    let kubeconfig = node.cluster.api().admin_kubeconfig().to_path_buf();
    let label = |on: bool| -> anyhow::Result<Instant> {
        let value = if on {
            json!("true")
        } else {
            serde_json::Value::Null
        };
        let patch = json!({"metadata": {"labels": {"meshaccel.io/enabled": value}}});
        let ns = node.mesh_ns.clone();
        let kubeconfig = kubeconfig.clone();
        block_on(async move {
            let api: Api<Namespace> = Api::all(client_for(&kubeconfig).await?);
            let t = Instant::now();
            api.patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context("labelling the namespace")?;
            anyhow::Ok(t)
        })
    };

    // 1. Label flips.
    let mut on_ms = Vec::new();
    let mut off_ms = Vec::new();
    for i in 0..args.flips {
        let t = label(true)?;
        on_ms.push(ms(until_pods(metrics, |v| v >= 2.0, t)?));
        // TCP is 3 segments per round trip here; accelerated, only the handshakes (a handful
        // per connection) remain.
        let segs = node.pingpong(&client, server_ip, 200);
        if segs > 0.5 {
            bail!(
                "flip {i}: the connection after the entries appeared was not accelerated ({segs:.2} segments per round trip)"
            );
        }
        let t = label(false)?;
        off_ms.push(ms(until_pods(metrics, |v| v == 0.0, t)?));
    }
    eprintln!("[cluster] label -> entries: {on_ms:?}");

    // 2. New pods: Ready → entries present.
    label(true)?;
    until_pods(metrics, |v| v >= 2.0, Instant::now())?;
    let mut ready_to_entries = Vec::new();
    for i in 0..args.new_pods {
        let mut w = node.client_workload(server_ip, &[]);
        w.name = format!("extra{i}");
        let before = gauge(&scrape(metrics)?, "meshaccel_accelerated_pods").unwrap_or(0.0);
        node.deploy(&w);
        let mut ready_at = None;
        let mut entries_at = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        while ready_at.is_none() || entries_at.is_none() {
            if entries_at.is_none()
                && gauge(&scrape(metrics)?, "meshaccel_accelerated_pods")
                    .is_some_and(|v| v > before)
            {
                entries_at = Some(Instant::now());
            }
            if ready_at.is_none() {
                let r = node.cluster.kubectl(&[
                    "get",
                    "pods",
                    "-n",
                    &node.mesh_ns,
                    "-l",
                    &format!("app={}", w.name),
                    "-o",
                    "jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}",
                ])?;
                if r.trim() == "True" {
                    ready_at = Some(Instant::now());
                }
            }
            if Instant::now() > deadline {
                bail!("extra{i}: Ready {ready_at:?}, entries {entries_at:?} after 120 s");
            }
        }
        let (r, e) = (ready_at.unwrap(), entries_at.unwrap());
        let d = if e >= r { ms(e - r) } else { -ms(r - e) };
        ready_to_entries.push(d);
    }

    // 3. The agent at rest.
    let pid = agent_pid(&node.cluster.node_name())?;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let cpu_pct = (cpu_ticks(pid)? - c0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0;
    let rss_mib = vm_rss_kib(pid)? as f64 / 1024.0;

    println!(
        "meshaccel on a real node (Kubernetes v1.20.2, containerd 1.6, Envoy 1.40 sidecars), one run:"
    );
    println!("| what | p50 | p99 | n |");
    println!("|---|---|---|---|");
    println!(
        "| namespace label on -> both workloads' entries (ms) | {:.0} | {:.0} | {} |",
        percentile(&on_ms, 0.5),
        percentile(&on_ms, 0.99),
        on_ms.len()
    );
    println!(
        "| label removed -> entries gone (ms) | {:.0} | {:.0} | {} |",
        percentile(&off_ms, 0.5),
        percentile(&off_ms, 0.99),
        off_ms.len()
    );
    println!(
        "| new pod Ready -> its entries (ms; negative: before Ready; Ready polled with kubectl, ~30-80 ms a call) | {:.0} | {:.0} | {} |",
        percentile(&ready_to_entries, 0.5),
        percentile(&ready_to_entries, 0.99),
        ready_to_entries.len()
    );
    println!(
        "agent pod: RSS {rss_mib:.1} MiB, idle CPU {cpu_pct:.2} % of one core over {} s",
        args.idle_secs
    );
    let out = args
        .out
        .or_else(|| std::env::var_os("MESHACCEL_BENCH_OUT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")));
    std::fs::create_dir_all(&out)?;
    let report = json!({
        "label_to_entries_ms": on_ms,
        "unlabel_to_gone_ms": off_ms,
        "ready_to_entries_ms": ready_to_entries,
        "agent_rss_mib": rss_mib,
        "agent_idle_cpu_percent": cpu_pct,
        "idle_secs": args.idle_secs,
    });
    std::fs::write(
        out.join("cluster.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(())
}
