//! Control-plane latency of the Kubernetes source (a benchmark program, not a test; root).
//!
//! A real kube-apiserver v1.20.2 + etcd (the e2e harness), `--pods` (1,000) injected pod objects on
//! the agent's node in one namespace, and as many real network namespaces on this machine, each
//! holding its pod's IP (198.18.0.0/15, benchmark range; no traffic is sent). So every pod is
//! resolved to its netns by the agent exactly as on a node (scan of /run/netns and /proc), and
//! the maps it fills are the real pinned kernel maps, read here directly.
//!
//! Measured, end to end (API write → watch → agent → kernel map):
//! 1. namespace label on/off → all N workload entries present/gone, per round, `--rounds` times;
//!    and per entry (when each cookie appeared);
//! 2. pod IP assigned (status patch to Running + podIP) → its entry present, one pod at a time,
//!    `--ip-samples` pods, with the N others in the agent's view;
//! 3. the agent's RSS (VmRSS, VmHWM) with N pods.
//!
//! Usage (root; scripts/install-kube.sh done; the `meshaccel` binary of the same profile next to
//! this one): `cargo build --release --workspace --exclude meshaccel-ebpf --bins &&
//! target/release/control [--pods 1000 --rounds 10 --ip-samples 100]`
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use meshaccel::dataplane::Dataplane;
use meshaccel_e2e::{
    Mesh,
    accel::Accel,
    kube_api::{AGENT_CLUSTER_ROLE_RULES, KubeApi, block_on},
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Pod objects (and network namespaces) in the labelled namespace.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Label on/off rounds.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Pods whose IP is assigned one at a time.
    #[arg(long, default_value_t = 100)]
    ip_samples: usize,
}

/// Network namespaces of this run, pinned under /run/netns, removed on drop.
struct Netns {
    paths: Vec<PathBuf>,
    ips: Vec<Ipv4Addr>,
    cookies: Vec<u64>,
}

fn bench_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        18 + (i / 62500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// `ioctl(SIOCSIFADDR)` argument.
#[repr(C)]
struct IfreqAddr {
    name: [u8; 16],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

impl Netns {
    fn create(run: &str, n: usize) -> anyhow::Result<Netns> {
        let dir = Path::new("/run/netns");
        std::fs::create_dir_all(dir)?;
        let mut ns = Netns {
            paths: Vec::new(),
            ips: Vec::new(),
            cookies: Vec::new(),
        };
        for i in 0..n {
            let path = dir.join(format!("mabench-{run}-{i}"));
            let ip = bench_ip(i);
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            ns.paths.push(path.clone());
            let cookie = std::thread::spawn(move || -> std::io::Result<u64> {
                // SAFETY: unshare, ioctl and mount on this short-lived thread only.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut req = IfreqAddr {
                        name: [0; 16],
                        addr: std::mem::zeroed(),
                        _pad: [0; 8],
                    };
                    req.name[..2].copy_from_slice(b"lo");
                    req.addr.sin_family = libc::AF_INET as u16;
                    req.addr.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
                    let rc = libc::ioctl(fd, libc::SIOCSIFADDR as _, &req);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if rc != 0 {
                        return Err(err);
                    }
                    let dst = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                    if libc::mount(
                        c"/proc/thread-self/ns/net".as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                meshaccel::netns::current_cookie()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
            .with_context(|| format!("netns {i}"))?;
            ns.ips.push(ip);
            ns.cookies.push(cookie);
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for p in &self.paths {
            if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
                // SAFETY: unmounting the bind mount this run made.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_file(p);
        }
    }
}

fn enabled(dp: &Dataplane) -> BTreeSet<u64> {
    dp.workloads().into_keys().collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {name:<52} | {:>5} | {:>8.1} | {:>8.1} | {:>8.1} |",
        v.len(),
        pct(&v, 50.0),
        pct(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshaccel_e2e::require_root();
    let n = args.pods;
    let total = n + args.ip_samples;
    eprintln!("[control] starting kube-apiserver + etcd");
    let mut api = KubeApi::start()?;
    let run = api.run_id().to_string();
    let node = format!("node-{run}");
    let nsname = format!("bench-{run}");
    api.create_cluster_role(&format!("meshaccel-agent-{run}"), AGENT_CLUSTER_ROLE_RULES)?;
    let agent_kc = api.kubeconfig_for_cluster_role(&format!("meshaccel-agent-{run}"))?;
    eprintln!("[control] creating {total} network namespaces");
    let netns = Netns::create(&run, total)?;

    eprintln!(
        "[control] creating {n} pod objects (+{} for the IP samples)",
        args.ip_samples
    );
    let pod_json = |name: String| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": nsname,
                         "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
            "spec": {"nodeName": node, "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]},
                {"name": "istio-proxy", "image": "proxyv2:1"}]}
        }))
        .expect("pod json")
    };
    block_on(async {
        let c = api.admin_client().await?;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": nsname}}))?;
        Api::<Namespace>::all(c.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let pods: Api<Pod> = Api::namespaced(c.clone(), &nsname);
        for i in 0..total {
            pods.create(&PostParams::default(), &pod_json(format!("p{i}")))
                .await?;
            if i < n {
                KubeApi::set_pod_running(&c, &nsname, &format!("p{i}"), &netns.ips[i].to_string())
                    .await?;
            }
        }
        anyhow::Ok(())
    })?;

    let mesh = Mesh::new()?;
    eprintln!("[control] starting the agent (node {node}, the chart's ClusterRole)");
    let accel = Accel::start_kube(&mesh, &node, &agent_kc)?;
    let pid = accel.agent_pid().context("agent pid")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !accel.agent_log().contains("Kubernetes source in sync") {
        if Instant::now() > deadline {
            bail!("agent not in sync:\n{}", accel.agent_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dp = Dataplane::open(accel.bpffs())?;
    let want: BTreeSet<u64> = netns.cookies[..n].iter().copied().collect();
    let (rss_idle, _) = rss_kb(pid);

    // 1. Namespace label on/off.
    let mut on_all = Vec::new();
    let mut off_all = Vec::new();
    let mut per_entry = Vec::new();
    for round in 0..args.rounds {
        for value in [Some("true"), None] {
            let patch = json!({"metadata": {"labels": {"meshaccel.io/enabled": value}}});
            let start = block_on(async {
                let c = api.admin_client().await?;
                // Client set-up is not the agent's time: the clock starts at the request.
                let t = Instant::now();
                Api::<Namespace>::all(c)
                    .patch(&nsname, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                anyhow::Ok(t)
            })?;
            let mut first: BTreeMap<u64, f64> = BTreeMap::new();
            let deadline = start + Duration::from_secs(60);
            loop {
                let now_set = enabled(&dp);
                let el = start.elapsed().as_secs_f64() * 1e3;
                if value.is_some() {
                    for c in now_set.intersection(&want) {
                        first.entry(*c).or_insert(el);
                    }
                    if want.is_subset(&now_set) {
                        on_all.push(el);
                        per_entry.extend(first.values().copied());
                        break;
                    }
                } else if now_set.is_disjoint(&want) {
                    off_all.push(el);
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "round {round}: maps not updated within 60 s ({} of {n} present)",
                        now_set.intersection(&want).count()
                    );
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        eprintln!(
            "[control] round {round}: on {:.1} ms, off {:.1} ms",
            on_all.last().unwrap(),
            off_all.last().unwrap()
        );
    }
    let (rss_n, _) = rss_kb(pid);

    // 2. Pod IP assigned → entry present (namespace labelled, N pods accelerated).
    block_on(async {
        let c = api.admin_client().await?;
        Api::<Namespace>::all(c)
            .patch(
                &nsname,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"meshaccel.io/enabled": "true"}}})),
            )
            .await?;
        anyhow::Ok(())
    })?;
    let mut ip_lat = Vec::new();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = client_rt.block_on(api.admin_client())?;
    for k in 0..args.ip_samples {
        let i = n + k;
        let cookie = netns.cookies[i];
        let t0 = Instant::now();
        client_rt.block_on(KubeApi::set_pod_running(
            &client,
            &nsname,
            &format!("p{i}"),
            &netns.ips[i].to_string(),
        ))?;
        let deadline = t0 + Duration::from_secs(30);
        while dp.workload(cookie).is_none() {
            if Instant::now() > deadline {
                bail!("pod p{i}: no entry 30 s after its IP was set");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        ip_lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (rss_end, hwm) = rss_kb(pid);

    println!(
        "\nmeshaccel control plane: kube-apiserver v1.20.2 + etcd 3.4 on loopback, {n} pods on the node \
         (each a real netns; {} namespaces scanned by the agent per resolution), agent with the chart's ClusterRole\n",
        total
    );
    println!(
        "| {:<52} | {:>5} | {:>8} | {:>8} | {:>8} |",
        "latency (ms)", "n", "p50", "p99", "max"
    );
    println!(
        "|{:-<54}|{:-<7}|{:-<10}|{:-<10}|{:-<10}|",
        "", "", "", "", ""
    );
    summary(
        &format!("namespace labelled → all {n} entries present"),
        on_all,
    );
    summary(
        &format!("namespace unlabelled → all {n} entries gone"),
        off_all,
    );
    summary("namespace labelled → each entry present", per_entry);
    summary("pod IP assigned → its entry present", ip_lat);
    println!(
        "\nagent RSS: {:.1} MB idle ({n} pods, none accelerated), {:.1} MB after the label rounds, \
         {:.1} MB at the end ({} accelerated); peak {:.1} MB",
        rss_idle as f64 / 1024.0,
        rss_n as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        enabled(&dp).len(),
        hwm as f64 / 1024.0
    );
    drop(client);
    drop(accel);
    drop(mesh);
    drop(netns);
    drop(api);
    Ok(())
}
