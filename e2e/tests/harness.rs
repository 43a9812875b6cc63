//! Root tests of the local mesh on the real kernel: Istio's iptables rules with the relay as
//! Envoy, process placement, and cleanup (also after a panic).
//!
//! Run: `cargo test -p meshaccel-e2e -- --test-threads=1` as root.

// Children spawned through a Mesh are SIGKILLed and reaped by its teardown.
#![allow(clippy::zombie_processes)]

mod support;

use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use meshaccel_e2e::{APP_UID, Mesh, PROXY_UID, Pod, require_root, wait_output_timeout, wait_ready};
use support::{golden, tool};

/// Spawns the tool in `pod` with stderr to `log`, and waits for its `ready`.
fn spawn_tool(mesh: &mut Mesh, pod: &Pod, uid: Option<u32>, args: &[&str], log: &Path) -> Child {
    let mut cmd = Command::new(tool());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log).expect("creating log file"));
    let mut child = mesh.spawn_cmd(pod, uid, cmd).expect("spawning tool");
    if let Err(e) = wait_ready(&mut child) {
        panic!(
            "{args:?} in pod {}: {e:#}\nlog:\n{}",
            pod.name,
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    child
}

/// Packets counted by the nat rule `-A <chain> … -j REDIRECT` (iptables-save -c).
fn redirect_packets(pod: &Pod, chain: &str) -> u64 {
    let out = pod
        .netns_exec("iptables-save", &["-c", "-t", "nat"])
        .expect("iptables-save");
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("-A {chain} ");
    let line = text
        .lines()
        .find(|l| l.contains(&prefix) && l.contains("-j REDIRECT"))
        .unwrap_or_else(|| panic!("no REDIRECT rule in {chain} of pod {}:\n{text}", pod.name));
    // "[packets:bytes] -A …"
    let counters = line
        .strip_prefix('[')
        .and_then(|l| l.split_once(']'))
        .map(|(c, _)| c);
    let packets = counters
        .and_then(|c| c.split_once(':'))
        .and_then(|(p, _)| p.parse().ok());
    packets.unwrap_or_else(|| panic!("cannot parse counters of {line:?}"))
}

fn log_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Outbound and inbound capture with Istio's real rules and the relay as Envoy:
/// app (uid 1000) → REDIRECT 15001 → relay A (uid 1337) → pod B:8080 → REDIRECT 15006 →
/// relay B → from 127.0.0.6 → sink.
#[test]
fn relay_chain_through_istio_rules() {
    require_root();
    let logs = tempfile::tempdir().unwrap();
    let golden = golden();
    let mut mesh = Mesh::new().unwrap();
    let a = mesh.add_pod("a", Some(&golden)).unwrap();
    let b = mesh.add_pod("b", Some(&golden)).unwrap();
    let sink_addr = format!("{}:8080", b.ip);

    let relay_args = [
        "relay",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--inbound-bind",
        "127.0.0.6",
    ];
    let (relay_a_log, relay_b_log, sink_log) = (
        logs.path().join("relay-a.log"),
        logs.path().join("relay-b.log"),
        logs.path().join("sink.log"),
    );
    let _relay_a = spawn_tool(&mut mesh, &a, Some(PROXY_UID), &relay_args, &relay_a_log);
    let _relay_b = spawn_tool(&mut mesh, &b, Some(PROXY_UID), &relay_args, &relay_b_log);
    let _sink = spawn_tool(
        &mut mesh,
        &b,
        Some(APP_UID),
        &["sink", "--listen", &sink_addr],
        &sink_log,
    );

    let (a0, b0) = (a.tcp_counters().unwrap(), b.tcp_counters().unwrap());
    let send = mesh
        .spawn(
            &a,
            Some(APP_UID),
            &tool(),
            &["send", "--connect", &sink_addr, "--bytes", "50000000"],
        )
        .unwrap();
    let out = wait_output_timeout(send, Duration::from_secs(30)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "send printed {stdout:?} ({e}); relay A log:\n{}",
            log_text(&relay_a_log)
        )
    });
    assert!(
        out.status.success() && report["ok"] == true,
        "send failed: {report}"
    );
    assert_eq!(report["bytes"], 50_000_000);
    assert_eq!(report["peer_bytes"], 50_000_000);
    assert_eq!(
        report["crc"].as_str().unwrap(),
        format!("{:08x}", meshaccel_e2e::pattern::crc32_of(1, 50_000_000))
    );

    let (da, db) = (
        a.tcp_counters().unwrap().since(&a0),
        b.tcp_counters().unwrap().since(&b0),
    );
    eprintln!("pod a: {da:?}\npod b: {db:?}");
    assert!(
        da.in_segs > 1000,
        "pod a saw only {} TCP segments",
        da.in_segs
    );
    assert!(
        db.in_segs > 1000,
        "pod b saw only {} TCP segments",
        db.in_segs
    );

    // The relays were really on the path: the NAT rules fired, and the logs name the hops.
    assert!(
        redirect_packets(&a, "ISTIO_REDIRECT") >= 1,
        "outbound capture did not fire in pod a"
    );
    assert!(
        redirect_packets(&b, "ISTIO_IN_REDIRECT") >= 1,
        "inbound capture did not fire in pod b"
    );
    let (la, lb, ls) = (
        log_text(&relay_a_log),
        log_text(&relay_b_log),
        log_text(&sink_log),
    );
    assert!(
        la.contains(&format!("relay outbound: accepted {}:", a.ip))
            && la.contains(&format!("orig_dst={sink_addr}")),
        "relay A log:\n{la}"
    );
    assert!(
        lb.contains(&format!("relay inbound: accepted {}:", a.ip))
            && lb.contains(&format!("orig_dst={sink_addr} upstream 127.0.0.6:")),
        "relay B log:\n{lb}"
    );
    assert!(lb.contains("up_bytes=50000000"), "relay B log:\n{lb}");
    assert!(
        ls.contains("sink: 127.0.0.6:") && ls.contains("bytes=50000000"),
        "sink log:\n{ls}"
    );
}

/// Spawned processes are in the pod's cgroup and netns, with the requested uid/gid and no
/// supplementary groups; host processes are in neither.
#[test]
fn spawn_places_process_in_pod() {
    require_root();
    let mut mesh = Mesh::new().unwrap();
    let a = mesh.add_pod("a", None).unwrap();
    let child = mesh
        .spawn(&a, Some(PROXY_UID), Path::new("sleep"), &["100"])
        .unwrap();
    let pid = child.id();

    let procs = fs::read_to_string(a.cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "pid {pid} not in {}: {procs:?}",
        a.cgroup.display()
    );
    let ns_ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ns_ino(&PathBuf::from(format!("/proc/{pid}/ns/net"))),
        ns_ino(&a.netns_path)
    );
    assert_ne!(
        ns_ino(Path::new("/proc/self/ns/net")),
        ns_ino(&a.netns_path)
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["1337"; 4]);
    assert_eq!(field("Gid:"), ["1337"; 4]);
    assert!(field("Groups:").is_empty(), "{status}");

    // The pod's network: eth0 with its address, lo up, default route via eth0.
    let addr = a
        .netns_exec("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&addr.stdout).contains(&format!("{}/24", a.ip)));
    let route = a.netns_exec("ip", &["route", "show", "default"]).unwrap();
    assert!(String::from_utf8_lossy(&route.stdout).contains("dev eth0"));

    let host = mesh.spawn_host(Path::new("sleep"), &["100"]).unwrap();
    assert_eq!(
        ns_ino(&PathBuf::from(format!("/proc/{}/ns/net", host.id()))),
        ns_ino(Path::new("/proc/self/ns/net"))
    );
    let procs = fs::read_to_string(a.cgroup.join("cgroup.procs")).unwrap();
    assert!(!procs.lines().any(|l| l == host.id().to_string()));
}

/// Everything a run created, to check it is gone.
#[derive(Debug, Default)]
struct Created {
    run_id: String,
    paths: Vec<PathBuf>,
    pids: Vec<u32>,
}

fn record(mesh: &Mesh, pids: Vec<u32>) -> Created {
    let mut paths = vec![
        mesh.cgroup_root().to_path_buf(),
        Path::new("/run/netns").join(mesh.switch_netns()),
    ];
    for pod in mesh.pods() {
        paths.push(pod.netns_path.clone());
        paths.push(pod.cgroup.clone());
    }
    for p in &paths {
        assert!(
            p.exists(),
            "{} should exist while the mesh lives",
            p.display()
        );
    }
    Created {
        run_id: mesh.run_id().to_string(),
        paths,
        pids,
    }
}

/// A process is gone when /proc has no entry for it, or only a zombie (reparented to init).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
    }
}

fn assert_gone(created: &Created) {
    for p in &created.paths {
        assert!(
            !p.exists(),
            "run {}: {} still exists",
            created.run_id,
            p.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for &pid in &created.pids {
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "run {}: pid {pid} still alive",
                created.run_id
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.contains(&format!("ma-{}-", created.run_id)),
        "run {}: netns left:\n{netns}",
        created.run_id
    );
}

/// Pids in a cgroup, waiting until there are at least `n`.
fn wait_procs(cgroup: &Path, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        if pids.len() >= n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {pids:?}, expected {n} processes",
            cgroup.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Dropping a mesh removes its netns, veths, cgroups and processes (also untracked grandchildren
/// in pod cgroups), touches nothing in the host netns, and leaves another live run alone.
#[test]
fn drop_removes_everything_and_only_its_own() {
    require_root();
    let mut m1 = Mesh::new().unwrap();
    let mut m2 = Mesh::new().unwrap();
    assert_ne!(m1.run_id(), m2.run_id());
    let a = m1.add_pod("a", Some(&golden())).unwrap();
    let _b = m1.add_pod("b", None).unwrap();
    let c = m2.add_pod("c", None).unwrap();
    // The background sleep is a grandchild the mesh does not track: the pod cgroup catches it.
    let _sh = m1
        .spawn(
            &a,
            Some(APP_UID),
            Path::new("sh"),
            &["-c", "sleep 1000 & sleep 1000; true"],
        )
        .unwrap();
    let host = m1.spawn_host(Path::new("sleep"), &["1000"]).unwrap();
    let other = m2.spawn(&c, None, Path::new("sleep"), &["1000"]).unwrap();
    let mut pids = wait_procs(&a.cgroup, 3);
    pids.push(host.id());

    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(m1.run_id()),
        "host netns has links of the run:\n{links}"
    );

    let created1 = record(&m1, pids);
    let created2 = record(&m2, vec![other.id()]);
    drop(m1);
    assert_gone(&created1);
    for p in &created2.paths {
        assert!(p.exists(), "dropping another run removed {}", p.display());
    }
    assert!(
        alive(other.id()),
        "dropping another run killed pid {}",
        other.id()
    );
    m2.shutdown();
    assert_gone(&created2);
}

/// A test that panics still cleans up (Drop runs during unwinding).
#[test]
fn panic_cleans_up() {
    require_root();
    let created = Mutex::new(Created::default());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut mesh = Mesh::new().unwrap();
        let a = mesh.add_pod("a", Some(&golden())).unwrap();
        let child = mesh
            .spawn(&a, Some(PROXY_UID), Path::new("sleep"), &["1000"])
            .unwrap();
        *created.lock().unwrap() = record(&mesh, vec![child.id()]);
        panic!("deliberate panic with a live mesh");
    }));
    assert!(result.is_err());
    let created = created.into_inner().unwrap();
    assert!(!created.paths.is_empty());
    assert_gone(&created);
}

/// The relay carries many concurrent connections (and `send`'s options work through it).
#[test]
fn relay_many_concurrent_connections() {
    require_root();
    let logs = tempfile::tempdir().unwrap();
    let golden = golden();
    let mut mesh = Mesh::new().unwrap();
    let a = mesh.add_pod("a", Some(&golden)).unwrap();
    let b = mesh.add_pod("b", Some(&golden)).unwrap();
    let sink_addr = format!("{}:8080", b.ip);
    let relay_a_log = logs.path().join("relay-a.log");
    let _relay_a = spawn_tool(&mut mesh, &a, Some(PROXY_UID), &["relay"], &relay_a_log);
    let _relay_b = spawn_tool(
        &mut mesh,
        &b,
        Some(PROXY_UID),
        &["relay"],
        &logs.path().join("relay-b.log"),
    );
    let _sink = spawn_tool(
        &mut mesh,
        &b,
        None,
        &["sink", "--listen", &sink_addr],
        &logs.path().join("sink.log"),
    );

    const N: usize = 64;
    let bind = format!("{}:40000", a.ip);
    let mut sends = Vec::new();
    for i in 0..N {
        let seed = i.to_string();
        let mut args = vec![
            "send",
            "--connect",
            &sink_addr,
            "--bytes",
            "1000000",
            "--seed",
            &seed,
        ];
        match i {
            0 => args.extend(["--bind", &bind]),
            1 => args.extend(["--chunk", "1000", "--pause-ms", "100", "--hold-ms", "1"]),
            2 => args.extend(["--chunk", "7"]),
            _ => {}
        }
        sends.push(mesh.spawn(&a, Some(APP_UID), &tool(), &args).unwrap());
    }
    for (i, send) in sends.into_iter().enumerate() {
        let out = wait_output_timeout(send, Duration::from_secs(30)).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(
            out.status.success() && report["ok"] == true,
            "send {i}: {report}"
        );
        let crc = meshaccel_e2e::pattern::crc32_of(i as u64, 1_000_000);
        assert_eq!(
            report["crc"].as_str().unwrap(),
            format!("{crc:08x}"),
            "send {i}"
        );
    }
    let la = log_text(&relay_a_log);
    assert_eq!(
        la.matches("relay outbound: accepted").count(),
        N,
        "relay A log:\n{la}"
    );
    assert!(
        la.contains(&format!("accepted {bind} ->")),
        "relay A log:\n{la}"
    );
}

/// echo + pingpong (no iptables rules): the latency tools work and report percentiles.
#[test]
fn echo_pingpong() {
    require_root();
    let logs = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::new().unwrap();
    let a = mesh.add_pod("a", None).unwrap();
    let b = mesh.add_pod("b", None).unwrap();
    let echo_addr = format!("{}:7000", b.ip);
    let _echo = spawn_tool(
        &mut mesh,
        &b,
        None,
        &["echo", "--listen", &echo_addr],
        &logs.path().join("echo.log"),
    );
    let pp = mesh
        .spawn(
            &a,
            Some(APP_UID),
            &tool(),
            &[
                "pingpong",
                "--connect",
                &echo_addr,
                "--size",
                "64",
                "--count",
                "2000",
            ],
        )
        .unwrap();
    let out = wait_output_timeout(pp, Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 2000);
    let (p50, p99) = (
        report["p50_us"].as_f64().unwrap(),
        report["p99_us"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p99 >= p50, "{report}");
    eprintln!("pingpong: {report}");
}
