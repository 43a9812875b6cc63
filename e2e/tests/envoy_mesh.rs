//! Acceleration proven on Istio-shaped traffic: real Envoy 1.40 sidecars (UID 1337) configured as
//! istiod configures them, mTLS between sidecars, Istio's real capture rules, apps as UID 1000.
mod support;

use std::time::Duration;

use meshaccel_e2e::{
    Pod,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, SidecarMesh},
    wait_output_timeout,
};
use serde_json::Value;
use support::*;

/// The mesh's pods named `names`.
fn pods<'m>(m: &'m SidecarMesh, names: &[&str]) -> Vec<&'m Pod> {
    names.iter().map(|n| m.pod(n)).collect()
}

/// The pods' mesh most tests use: `client`, and `server` running `app` on 8080; both workloads
/// on (returned, for switching), the agent's global switch `enabled`. Returns the mesh, the two
/// pods, the server's address, the workloads and the agent (last: it goes first, before the mesh
/// it runs in).
fn client_server(
    app: &str,
    enabled: bool,
) -> (SidecarMesh, Pod, Pod, String, [Workload; 2], Accel) {
    let mut m = SidecarMesh::start(&[
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("server", &[8080]),
    ])
    .expect("mesh");
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let wl = [Workload::on(&client), Workload::on(&server)];
    let accel = Accel::start(&m.mesh, enabled, &wl).expect("agent");
    m.serve("server", &[app, "--listen", "0.0.0.0:8080"])
        .unwrap();
    let target = format!("{}:8080", server.ip);
    (m, client, server, target, wl, accel)
}

/// Client pod → server pod through both Envoys with mTLS: all three legs are redirected, and
/// during the payload the pods' TCP segments stay at the handshakes.
#[test]
fn envoy_sidecars_all_legs_accelerated_with_mtls() {
    require_root();
    let (mut m, _, _, target, wl, mut accel) = client_server("sink", false);
    let names = ["client", "server"];
    let bytes = (20u64 << 20).to_string();

    let before = segs(&pods(&m, &names));
    finished(
        m.app("client", &["send", "--connect", &target, "--bytes", &bytes])
            .unwrap(),
        "off",
    );
    let off = in_segs_since(&pods(&m, &names), &before);

    accel.set_workloads(true, &wl).unwrap();
    let c0 = counters(&accel);
    let before = segs(&pods(&m, &names));
    finished(
        m.app("client", &["send", "--connect", &target, "--bytes", &bytes])
            .unwrap(),
        "on",
    );
    let on = in_segs_since(&pods(&m, &names), &before);
    let c1 = counters(&accel);
    eprintln!("Envoy mesh, 20 MiB: in-segments off {off:?} on {on:?}; counters {c1}");
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        6,
        "app, Envoy A in/out, Envoy B in/out, app B: {c1}"
    );
    assert_eq!(delta(&c1, &c0, "fallback_no_peer"), 0, "{c1}");
    // Legs 1 and 3 carry the payload in plaintext; leg 2 carries it inside TLS records.
    assert!(delta(&c1, &c0, "redirect_bytes") >= 3 * (20 << 20), "{c1}");
    let tls = m.envoy_stats("server", "ssl.handshake").unwrap();
    assert!(
        tls.iter().any(|(_, v)| *v > 0),
        "the sidecar leg is mTLS: {tls:?}"
    );
    for (i, (on, off)) in on.iter().zip(&off).enumerate() {
        assert!(
            *off > 500,
            "pod {i}: off, segments grow with the payload ({off})"
        );
        assert!(
            *on < 100,
            "pod {i}: on, only handshakes and teardown ({on})"
        );
    }
}

fn http_load(m: &mut SidecarMesh, from: &str, target: &str, extra: &[&str]) -> std::process::Child {
    m.app(
        from,
        &[&["http-load", "--connect", target, "--size", "1024"], extra].concat(),
    )
    .expect("http-load")
}

/// `n` keep-alive requests from the client pod to `target`, every response checked: the report.
fn client_requests(m: &mut SidecarMesh, target: &str, n: u64, what: &str) -> Value {
    let v = finished(
        http_load(m, "client", target, &["--requests", &n.to_string()]),
        what,
    );
    assert_eq!(v["errors"], 0, "{what}: {v}");
    assert_eq!(v["requests"], n, "{what}: {v}");
    v
}

/// A pod without a sidecar (no capture rules, no Envoy, not a workload) calls a mesh pod: correct,
/// and none of its sockets enters the sockhash; the mesh pod's own legs are still accelerated.
#[test]
fn pod_without_sidecar_talks_to_mesh_pod() {
    require_root();
    let mut m = SidecarMesh::start(&[
        PodSpec::plain("plain", &[]),
        PodSpec::mesh("server", &[8080]),
    ])
    .expect("mesh");
    let (plain, server) = (m.pod("plain").clone(), m.pod("server").clone());
    let accel = Accel::start(&m.mesh, true, &[Workload::on(&server)]).expect("agent");
    m.serve("server", &["http-server", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let target = format!("{}:8080", server.ip);
    let c0 = counters(&accel);
    let load = http_load(
        &mut m,
        "plain",
        &target,
        &[
            "--requests",
            "3000",
            "--connections",
            "2",
            "--progress-ms",
            "100",
        ],
    );
    // Look at the sockhash while the keep-alive connections are open.
    let plain_ns = plain.netns_cookie().unwrap().to_string();
    let server_ns = server.netns_cookie().unwrap().to_string();
    let mut seen_server = 0;
    for _ in 0..50 {
        let s = accel.status().unwrap();
        let by = s["sockets_by_netns"].as_object().unwrap().clone();
        assert!(
            !by.contains_key(&plain_ns),
            "a socket of the plain pod entered the sockhash: {s}"
        );
        seen_server = seen_server.max(by.get(&server_ns).and_then(|v| v.as_u64()).unwrap_or(0));
        if seen_server >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = finished(load, "plain → mesh");
    assert_eq!(v["errors"], 0, "{v}");
    let c1 = counters(&accel);
    // Envoy's inbound passthrough leg (127.0.0.6 → app) inside the server pod is accelerated.
    assert!(
        seen_server >= 4,
        "the server pod's leg 3 sockets were in the sockhash (saw {seen_server})"
    );
    assert!(delta(&c1, &c0, "redirect_msgs") >= 2 * 3000, "{c1}");
}

/// Another node, as this node's agent sees it: a mesh pod whose sidecar and app are not this
/// agent's workloads. Connections that leave the node, and come in from it, pair only on their
/// local legs: the sockets whose peer is elsewhere (the client sidecar's upstream socket, the
/// server sidecar's inbound socket from the other node) stay out of the sockhash, without the
/// keepalive meshaccel gives accelerated sockets; the sockhash holds exactly the local legs.
#[test]
fn sockets_whose_peer_is_on_another_node_stay_out_of_the_sockhash() {
    require_root();
    let mut m = SidecarMesh::start(&[
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("local", &[8080]),
        PodSpec::mesh("remote", &[8080]),
    ])
    .expect("mesh");
    let (client, local, remote) = (
        m.pod("client").clone(),
        m.pod("local").clone(),
        m.pod("remote").clone(),
    );
    let accel = Accel::start(
        &m.mesh,
        true,
        &[Workload::on(&client), Workload::on(&local)],
    )
    .expect("agent");
    m.serve("local", &["sink", "--listen", "0.0.0.0:8080"])
        .unwrap();
    m.serve("remote", &["sink", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let c0 = counters(&accel);
    // Three connections of each kind held open for ~3 s (a byte every 600 ms).
    let swarm = |to: &str| {
        vec![
            "swarm".to_string(),
            "--connect".into(),
            format!("{to}:8080"),
            "--connections".into(),
            "3".into(),
            "--concurrency".into(),
            "3".into(),
            "--bytes".into(),
            "6".into(),
            "--chunk".into(),
            "1".into(),
            "--hold-ms".into(),
            "600".into(),
        ]
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let (to_local, to_remote) = (swarm(&local.ip.to_string()), swarm(&remote.ip.to_string()));
    let runs = [
        ("client → local", m.app("client", &args(&to_local)).unwrap()),
        (
            "client → remote",
            m.app("client", &args(&to_remote)).unwrap(),
        ),
        ("remote → local", m.app("remote", &args(&to_local)).unwrap()),
    ];
    // Local legs: client → local 3 × 6 (app ↔ sidecar, sidecar ↔ sidecar, sidecar ↔ app);
    // client → remote 3 × 2 (app ↔ its sidecar); remote → local 3 × 2 (the local sidecar's
    // passthrough to its app).
    let want = 3 * 6 + 3 * 2 + 3 * 2;
    std::thread::sleep(Duration::from_millis(1200));
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(accel.status().unwrap()["sockets"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Sockets of the pods' established connections, while they are open.
    let mut ss = Vec::new();
    for p in [&client, &local] {
        let out = p
            .netns_exec("ss", &["-tnoeH", "state", "established"])
            .expect("ss");
        ss.push((
            p.name.clone(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ));
    }
    for (what, child) in runs {
        let v = finished(child, what);
        assert_eq!(v["ok"], true, "{what}: {v}");
    }
    assert!(
        seen.iter().all(|&n| n == want),
        "the sockhash holds exactly the local legs ({want} sockets) while the connections are open: saw {seen:?}"
    );
    let c1 = counters(&accel);
    assert!(
        delta(&c1, &c0, "fallback_no_local_peer") >= 3,
        "the client sidecar's sockets to the other node left: {c1}"
    );
    assert!(
        delta(&c1, &c0, "skip_no_local_peer") >= 3,
        "the local sidecar's sockets from the other node never entered: {c1}"
    );
    // The client sidecar's upstream sockets to the other node (the app's own sockets show the
    // same destination, before NAT, but not the sidecar's UID): no keepalive of meshaccel's.
    let (name, text) = &ss[0];
    let to_remote_socks: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(&format!("{}:8080", remote.ip)) && l.contains(&format!("uid:{PROXY_UID}"))
        })
        .collect();
    assert!(
        !to_remote_socks.is_empty(),
        "pod {name} has sockets to the other node:\n{text}"
    );
    assert!(
        to_remote_socks
            .iter()
            .all(|l| !l.contains("timer:(keepalive")),
        "sockets to the other node keep no keepalive of meshaccel's:\n{text}"
    );
}

/// A workload with acceleration disabled, and an excluded inbound port: correct, not accelerated.
#[test]
fn disabled_workload_and_excluded_inbound_port_stay_on_tcp() {
    require_root();
    let mut m = SidecarMesh::start(&[
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("server", &[8080, 9090]),
    ])
    .expect("mesh");
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let mut accel = Accel::start(
        &m.mesh,
        true,
        &[Workload::on(&client), Workload::off(&server)],
    )
    .expect("agent");
    m.serve("server", &["http-server", "--listen", "0.0.0.0:8080"])
        .unwrap();
    m.serve("server", &["http-server", "--listen", "0.0.0.0:9090"])
        .unwrap();
    let server_ns = server.netns_cookie().unwrap().to_string();

    let c0 = counters(&accel);
    client_requests(
        &mut m,
        &format!("{}:8080", server.ip),
        500,
        "server disabled",
    );
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        3,
        "only the client pod's sockets: {c1}"
    );
    assert!(
        !accel.status().unwrap()["sockets_by_netns"]
            .as_object()
            .unwrap()
            .contains_key(&server_ns)
    );

    let mut s = Workload::on(&server);
    s.exclude_inbound_ports = vec![9090];
    accel
        .set_workloads(true, &[Workload::on(&client), s])
        .unwrap();
    let c1 = counters(&accel);
    client_requests(&mut m, &format!("{}:9090", server.ip), 500, "port excluded");
    let c2 = counters(&accel);
    assert_eq!(
        delta(&c2, &c1, "skip_excluded_port"),
        1,
        "the app's socket on 9090 is never inserted: {c2}"
    );
    assert!(
        delta(&c2, &c1, "fallback_no_local_peer") >= 1,
        "Envoy's 127.0.0.6 leg to 9090 stays on TCP (its app's socket never entered): {c2}"
    );
    // Port 8080 of the same workload is accelerated on all legs.
    let c2 = counters(&accel);
    client_requests(&mut m, &format!("{}:8080", server.ip), 500, "8080");
    let c3 = counters(&accel);
    assert_eq!(delta(&c3, &c2, "inserted"), 6, "{c3}");
    assert_eq!(delta(&c3, &c2, "fallback_no_peer"), 0, "{c3}");
}

/// Disabling a workload while a keep-alive connection carries requests: no request fails, and
/// the bytes after the switch go over TCP.
#[test]
fn disabling_a_workload_under_keepalive_load_fails_no_request() {
    require_root();
    let (mut m, client, server, target, _, mut accel) = client_server("http-server", true);
    let c0 = counters(&accel);
    let load = http_load(
        &mut m,
        "client",
        &target,
        &["--requests", "20000", "--rate", "4000"],
    );
    let redirected = |a: &Accel| counters(a)["redirect_msgs"].as_u64().unwrap();
    let start = redirected(&accel);
    let t = std::time::Instant::now();
    while redirected(&accel) < start + 3000 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "load is not being redirected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    accel
        .set_workloads(true, &[Workload::on(&client), Workload::off(&server)])
        .unwrap();
    let tcp_before = counters(&accel)["tcp_msgs"].as_u64().unwrap();
    let v = finished(load, "disabled under load");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["requests"], 20000, "{v}");
    let c1 = counters(&accel);
    assert!(
        delta(&c1, &c0, "fallback_disabled") >= 2,
        "redirecting senders fell back: {c1}"
    );
    assert!(
        c1["tcp_msgs"].as_u64().unwrap() > tcp_before + 1000,
        "the rest of the requests went over TCP: {c1}"
    );
}

/// Envoy is killed and restarted in the client pod while load runs: the load reconnects, the
/// mesh carries requests again, accelerated, and nothing stays wrongly paired.
#[test]
fn envoy_restart_under_load_recovers() {
    require_root();
    let (mut m, _, _, target, _, accel) = client_server("http-server", true);
    let load = http_load(
        &mut m,
        "client",
        &target,
        &[
            "--duration-ms",
            "4000",
            "--connections",
            "2",
            "--rate",
            "2000",
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    m.restart_envoy("client").expect("restart envoy");
    let out = wait_output_timeout(load, Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    eprintln!("load across an Envoy restart: {v}");
    assert!(
        v["reconnects"].as_u64().unwrap() >= 1,
        "the restart broke the connections: {v}"
    );
    assert!(
        v["requests"].as_u64().unwrap() > v["errors"].as_u64().unwrap() * 10,
        "{v}"
    );
    // After the restart: a fresh load is fully correct and accelerated on all legs.
    let c0 = counters(&accel);
    client_requests(&mut m, &target, 2000, "after restart");
    let c1 = counters(&accel);
    assert_eq!(delta(&c1, &c0, "inserted"), 6, "{c1}");
    assert_eq!(delta(&c1, &c0, "insert_collision"), 0, "{c1}");
    assert_eq!(delta(&c1, &c0, "fallback_no_peer"), 0, "{c1}");
    assert_eq!(delta(&c1, &c0, "fallback_redirect_failed"), 0, "{c1}");
    // Nothing stays paired once the apps are done: only the server's idle keep-alive sockets
    // could remain, and the load closed its connections.
    let t = std::time::Instant::now();
    loop {
        let s = accel.status().unwrap();
        if s["sockets"] == 0 && s["sockets_by_netns"].as_object().unwrap().is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sockets left in the sockhash: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// HTTP/1.1 keep-alive through both Envoys (mTLS): every response correct (status, length,
/// checksum); off, every request costs TCP segments in the pods; on, none.
#[test]
fn http_keepalive_through_envoy_is_accelerated_and_correct() {
    require_root();
    let (mut m, _, _, target, wl, mut accel) = client_server("http-server", false);
    let names = ["client", "server"];
    const N: u64 = 2000;
    let mut per_request = Vec::new();
    for enabled in [false, true] {
        accel.set_workloads(enabled, &wl).unwrap();
        let c0 = counters(&accel);
        let before = segs(&pods(&m, &names));
        client_requests(&mut m, &target, N, "http");
        let segs: u64 = in_segs_since(&pods(&m, &names), &before).iter().sum();
        let c1 = counters(&accel);
        per_request.push(segs as f64 / N as f64);
        if enabled {
            // Request and response each cross three legs, redirected.
            assert!(delta(&c1, &c0, "redirect_msgs") >= 6 * N, "{c1}");
            assert_eq!(delta(&c1, &c0, "inserted"), 6, "{c1}");
        } else {
            assert_eq!(delta(&c1, &c0, "redirect_msgs"), 0, "{c1}");
        }
    }
    eprintln!(
        "HTTP 1 KiB keep-alive: in-segments per request off {:.2}, on {:.3}",
        per_request[0], per_request[1]
    );
    assert!(
        per_request[0] >= 3.0,
        "off: segments per request {}",
        per_request[0]
    );
    assert!(
        per_request[1] < 0.05,
        "on: segments per request {}",
        per_request[1]
    );
}

/// An Envoy killed mid-stream under a swarm of accelerated connections: the connections through
/// it fail visibly (reset / EOF), none hangs, none delivers wrong bytes, and once Envoy is back
/// new connections are byte-exact and accelerated again.
#[test]
fn envoy_killed_mid_stream_breaks_connections_visibly_never_silently() {
    require_root();
    let (mut m, _, _, target, _, accel) = client_server("sink", true);
    let swarm_args = |n: &str| {
        vec![
            "swarm".to_string(),
            "--connect".into(),
            target.clone(),
            "--connections".into(),
            n.into(),
            "--concurrency".into(),
            "16".into(),
            "--bytes".into(),
            "1000000".into(),
            "--chunk".into(),
            "16384".into(),
            "--hold-ms".into(),
            "2".into(),
        ]
    };
    let args = swarm_args("400");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let load = m.app("client", &args).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    m.restart_envoy("client").expect("restart envoy");
    let out = wait_output_timeout(load, Duration::from_secs(120)).expect("no connection hangs");
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    eprintln!("swarm across an Envoy kill: {v}");
    assert_eq!(
        v["mismatched"], 0,
        "no connection delivered wrong bytes: {v}"
    );
    assert!(
        v["failed"].as_u64().unwrap() >= 1,
        "the kill broke live connections: {v}"
    );
    assert!(v["failed"].as_u64().unwrap() < 400, "{v}");
    let c0 = counters(&accel);
    let args = swarm_args("50");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let after = finished(m.app("client", &args).unwrap(), "after the restart");
    let c1 = counters(&accel);
    assert_eq!(after["failed"], 0);
    assert_eq!(delta(&c1, &c0, "inserted"), 6 * 50, "{c1}");
    assert_eq!(delta(&c1, &c0, "insert_collision"), 0, "{c1}");
}
