//! Acceleration proven on Istio-shaped traffic: real Envoy 1.40 sidecars (UID 1337) configured as
//! istiod configures them, mTLS between sidecars, Istio's real capture rules, apps as UID 1000.
use std::time::Duration;

use meshaccel_e2e::{
    TcpCounters,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, SidecarMesh},
    wait_output_timeout,
};
use serde_json::Value;

fn report(child: std::process::Child, what: &str) -> Value {
    let out = wait_output_timeout(child, Duration::from_secs(120)).expect("app finished");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: bad report {text:?}: {e}"));
    assert!(out.status.success() && v["ok"] == true, "{what}: failed: {v}");
    v
}

fn counters(a: &Accel) -> Value {
    a.status().expect("status")["counters"].clone()
}

fn delta(after: &Value, before: &Value, name: &str) -> u64 {
    after[name].as_u64().unwrap() - before[name].as_u64().unwrap()
}

fn segs(m: &SidecarMesh, pods: &[&str]) -> Vec<TcpCounters> {
    pods.iter().map(|p| m.pod(p).tcp_counters().unwrap()).collect()
}

fn in_segs_since(m: &SidecarMesh, pods: &[&str], before: &[TcpCounters]) -> Vec<u64> {
    pods.iter().zip(before).map(|(p, b)| m.pod(p).tcp_counters().unwrap().since(b).in_segs).collect()
}

/// Client pod → server pod through both Envoys with mTLS: all three legs are redirected, and
/// during the payload the pods' TCP segments stay at the handshakes.
#[test]
fn envoy_sidecars_all_legs_accelerated_with_mtls() {
    require_root();
    let mut m = SidecarMesh::start(&[PodSpec::mesh("client", &[]), PodSpec::mesh("server", &[8080])]).expect("mesh");
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let wl = [Workload::on(&client), Workload::on(&server)];
    let mut accel = Accel::start(&m.mesh, false, &wl).expect("agent");
    let _sink = m.app("server", &["sink", "--listen", "0.0.0.0:8080"]).unwrap();
    let target = format!("{}:8080", server.ip);
    let pods = ["client", "server"];
    let bytes = (20u64 << 20).to_string();

    let before = segs(&m, &pods);
    report(m.app("client", &["send", "--connect", &target, "--bytes", &bytes]).unwrap(), "off");
    let off = in_segs_since(&m, &pods, &before);

    accel.set_workloads(true, &wl).unwrap();
    let c0 = counters(&accel);
    let before = segs(&m, &pods);
    report(m.app("client", &["send", "--connect", &target, "--bytes", &bytes]).unwrap(), "on");
    let on = in_segs_since(&m, &pods, &before);
    let c1 = counters(&accel);
    eprintln!("Envoy mesh, 20 MiB: in-segments off {off:?} on {on:?}; counters {c1}");
    assert_eq!(delta(&c1, &c0, "inserted"), 6, "app, Envoy A in/out, Envoy B in/out, app B: {c1}");
    assert_eq!(delta(&c1, &c0, "fallback_no_peer"), 0, "{c1}");
    // Legs 1 and 3 carry the payload in plaintext; leg 2 carries it inside TLS records.
    assert!(delta(&c1, &c0, "redirect_bytes") >= 3 * (20 << 20), "{c1}");
    let tls = m.envoy_stats("server", "ssl.handshake").unwrap();
    assert!(tls.iter().any(|(_, v)| *v > 0), "the sidecar leg is mTLS: {tls:?}");
    for (i, (on, off)) in on.iter().zip(&off).enumerate() {
        assert!(*off > 500, "pod {i}: off, segments grow with the payload ({off})");
        assert!(*on < 100, "pod {i}: on, only handshakes and teardown ({on})");
    }
}
