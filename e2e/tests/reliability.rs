//! IPv6 and dual stack under Istio's ip6tables capture, sockets older than the agent, and
//! isolation of what is not accelerated (non-mesh pod, opted-out pod, a host process): every
//! transfer byte-exact, and the maps dumped to show which sockets entered.
mod support;

use std::{process::Child, time::Duration};

use meshaccel_e2e::{
    Mesh, Pod,
    accel::{Accel, Workload},
    fixtures_dir, require_root, wait_output_timeout, wait_ready,
};
use serde_json::Value;
use support::*;

fn capture_log(name: &str) -> std::path::PathBuf {
    fixtures_dir().join(format!("iptables/istio-iptables-capture/{name}.golden"))
}

/// A dual-stack pod: IPv4 + `fd77:X::n`, `::6` on lo, the golden's IPv4 blocks through
/// iptables-restore and its IPv6 blocks through ip6tables-restore, and the dual-stack relay
/// (as UID 1337) listening on 0.0.0.0 and [::].
fn dual_stack_pod(mesh: &mut Mesh, name: &str, golden: &str) -> (Pod, std::net::Ipv6Addr) {
    let pod = mesh.add_pod(name, None).expect("pod");
    let ip6 = mesh
        .add_ipv6(&pod, Some(&capture_log(golden)))
        .expect("IPv6 and the capture rules");
    let mut relay = mesh
        .spawn(&pod, Some(PROXY_UID), &tool(), &["relay-ds"])
        .expect("relay-ds");
    wait_ready(&mut relay).expect("relay ready");
    (pod, ip6)
}

fn soak(mesh: &mut Mesh, from: &Pod, target: &str, n: &str) -> Child {
    mesh.spawn(
        from,
        Some(APP_UID),
        &tool(),
        &[
            "soak",
            "--connect",
            target,
            "--connections",
            n,
            "--max-msgs",
            "4",
            "--max-msg",
            "262144",
            "--slow-bytes",
            "4194304",
            "--slow-every",
            "20",
        ],
    )
    .expect("soak")
}

fn report(child: Child, what: &str) -> Value {
    let out = wait_output_timeout(child, Duration::from_secs(120)).expect("soak finished");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: bad report {text:?}: {e}"));
    eprintln!("{what}: {v}");
    assert!(
        out.status.success() && v["ok"] == true,
        "{what}: bytes lost, reordered or hung: {v}"
    );
    v
}

fn app_bytes(v: &Value) -> u64 {
    v["bytes_up"].as_u64().unwrap() + v["bytes_down"].as_u64().unwrap()
}

/// Istio's three legs on IPv6 with the real ip6tables capture, then v4 and v6 at once on the
/// same dual-stack pods. Client pod: `ipv6-outbound-ports` (outbound 32000/31000 captured),
/// server pod: `ipv6-inbound-ports` (inbound 4000/5000 captured); no golden captures both, so
/// port 32000 crosses leg 1 (app → sidecar, [podA]:e → [::1]:15001 after REDIRECT) and port 4000
/// legs 2 and 3 (→ 15006, then [::6]:e → [podB]:4000).
#[test]
fn ipv6_and_dual_stack_legs_are_accelerated_byte_exact() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let (a, _a6) = dual_stack_pod(&mut mesh, "a", "ipv6-outbound-ports");
    let (b, b6) = dual_stack_pod(&mut mesh, "b", "ipv6-inbound-ports");
    let accel = Accel::start(&mesh, true, &[Workload::on(&a), Workload::on(&b)]).expect("agent");
    for port in [4000, 32000] {
        soak_server(&mut mesh, &b, &format!("[{b6}]:{port}"));
        soak_server(&mut mesh, &b, &format!("{}:{port}", b.ip));
    }

    // IPv6 alone: each leg on its own.
    let c0 = counters(&accel);
    let r_in = report(
        soak(&mut mesh, &a, &format!("[{b6}]:4000"), "200"),
        "v6 :4000",
    );
    let c1 = counters(&accel);
    eprintln!(
        "v6 legs 2+3: inserted {}, redirected {} B, fallback_no_peer {}",
        delta(&c1, &c0, "inserted"),
        delta(&c1, &c0, "redirect_bytes"),
        delta(&c1, &c0, "fallback_no_peer")
    );
    // Four sockets per connection: app (active), relay on 15006, relay from ::6, app on 4000
    // (a connection reset early may end before the relay connected upstream).
    assert!(delta(&c1, &c0, "inserted") >= 4 * 180, "{c1}");
    assert!(
        delta(&c1, &c0, "redirect_bytes") >= app_bytes(&r_in),
        "both IPv6 legs carried the bytes: {c1}"
    );
    let r_out = report(
        soak(&mut mesh, &a, &format!("[{b6}]:32000"), "200"),
        "v6 :32000",
    );
    let c2 = counters(&accel);
    eprintln!(
        "v6 leg 1: inserted {}, redirected {} B",
        delta(&c2, &c1, "inserted"),
        delta(&c2, &c1, "redirect_bytes")
    );
    assert!(delta(&c2, &c1, "inserted") >= 2 * 180, "{c2}");
    assert!(
        delta(&c2, &c1, "redirect_bytes") >= app_bytes(&r_out) / 2,
        "leg 1 on IPv6 carried the bytes: {c2}"
    );

    // Dual stack: v4 and v6 connections at once, all four flows.
    let flows: Vec<(String, Child)> = [
        format!("[{b6}]:4000"),
        format!("{}:4000", b.ip),
        format!("[{b6}]:32000"),
        format!("{}:32000", b.ip),
    ]
    .into_iter()
    .map(|t| {
        let c = soak(&mut mesh, &a, &t, "150");
        (t, c)
    })
    .collect();
    let mut total = 0;
    for (t, c) in flows {
        total += app_bytes(&report(c, &format!("dual stack {t}")));
    }
    let c3 = counters(&accel);
    assert!(delta(&c3, &c2, "redirect_bytes") >= total, "{c3}");
    assert_eq!(
        delta(&c3, &c2, "insert_collision"),
        0,
        "v4 and v6 keys never collide: {c3}"
    );
}

/// Connections established before the agent started are invisible to sock_ops: they stay on
/// TCP for life (never in the sockhash) and keep every byte; new ones are accelerated.
#[test]
fn sockets_older_than_the_agent_stay_on_tcp() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let old: Vec<Child> = (0..20)
        .map(|i| {
            send(
                &mut mesh,
                &a,
                &[
                    "--connect",
                    &target,
                    "--bytes",
                    "3000000",
                    "--chunk",
                    "65536",
                    "--hold-ms",
                    "20",
                    "--seed",
                    &i.to_string(),
                ],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let accel = Accel::start(&mesh, true, &[Workload::on(&a), Workload::on(&b)]).expect("agent");
    std::thread::sleep(Duration::from_millis(300));
    let s = accel.status().expect("status");
    assert_eq!(
        s["sockets"], 0,
        "live pre-agent sockets never enter the sockhash: {s}"
    );
    for (i, c) in old.into_iter().enumerate() {
        finished(c, &format!("pre-agent connection {i}"));
    }
    let c1 = counters(&accel);
    assert_eq!(c1["inserted"], 0, "{c1}");
    assert_eq!(c1["redirect_bytes"], 0, "{c1}");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "2000000"]),
        "new connection",
    );
    let c2 = counters(&accel);
    assert_eq!(c2["inserted"], 6, "{c2}");
}

/// A non-mesh pod (no capture, not a workload), an opted-out pod (capture + sidecar, workload
/// disabled) and a host process (outside the attach cgroup) talk while two mesh pods soak:
/// every transfer is byte-exact (no byte reached another socket), and the sockhash, dumped by
/// netns cookie (`sockets_by_netns`, one entry per socket in PEERS), never holds a socket of
/// theirs.
#[test]
fn non_mesh_opted_out_and_host_sockets_never_enter_the_sockhash() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let o = mesh_pod(&mut mesh, "opted-out");
    let n = mesh.add_pod("non-mesh", None).expect("pod");
    let accel = Accel::start(
        &mesh,
        true,
        &[Workload::on(&a), Workload::on(&b), Workload::off(&o)],
    )
    .expect("agent");
    let target = format!("{}:8080", b.ip);
    soak_server(&mut mesh, &b, &target);
    let host_cookie = meshaccel::netns::cookie_of_path(std::path::Path::new("/proc/self/ns/net"))
        .expect("host netns cookie");
    let foreign: Vec<String> = [
        o.netns_cookie().unwrap(),
        n.netns_cookie().unwrap(),
        host_cookie,
    ]
    .iter()
    .map(u64::to_string)
    .collect();
    // A host process pair on the host's loopback (a port of the run), outside the mesh cgroup.
    let port = 20000 + (std::process::id() % 20000);
    let host_target = format!("127.0.0.1:{port}");
    let mut host_sink = mesh
        .spawn_host(&tool(), &["sink", "--listen", &host_target])
        .expect("host sink");
    wait_ready(&mut host_sink).expect("host sink ready");

    let mesh_flow = soak(&mut mesh, &a, &target, "300");
    let from_opted_out = soak(&mut mesh, &o, &target, "100");
    let from_non_mesh = soak(&mut mesh, &n, &target, "100");
    let host_flow = mesh
        .spawn_host(
            &tool(),
            &[
                "swarm",
                "--connect",
                &host_target,
                "--connections",
                "100",
                "--bytes",
                "200000",
            ],
        )
        .expect("host swarm");
    // Dump the maps while everything runs.
    let mut peak_mesh = 0;
    for _ in 0..20 {
        let s = accel.status().expect("status");
        for c in &foreign {
            assert!(
                s["sockets_by_netns"].get(c).is_none(),
                "a socket of netns {c} entered the sockhash: {s}"
            );
        }
        let in_map: u64 = s["sockets_by_netns"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        peak_mesh = peak_mesh.max(in_map);
        std::thread::sleep(Duration::from_millis(50));
    }
    report(mesh_flow, "mesh a → b");
    report(from_opted_out, "opted-out → b");
    report(from_non_mesh, "non-mesh → b");
    let out = wait_output_timeout(host_flow, Duration::from_secs(60)).expect("host swarm");
    let v: Value = serde_json::from_slice(&out.stdout).expect("host swarm report");
    assert!(v["ok"] == true, "host process traffic: {v}");
    let s = accel.status().expect("status");
    for c in &foreign {
        assert!(s["sockets_by_netns"].get(c).is_none(), "{s}");
    }
    assert!(peak_mesh > 0, "the mesh pods' sockets were in the sockhash");
    eprintln!("isolation: peak {peak_mesh} mesh sockets in the map, none of {foreign:?}");
}
