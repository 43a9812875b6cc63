//! Helpers shared by the root test files: pods with Istio's golden rules and a relay standing in
//! for Envoy, the checksumming apps, and the agent's counters.
#![allow(dead_code)]
use std::{
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use meshaccel_e2e::{
    Mesh, Pod, TcpCounters,
    accel::{Accel, Workload},
    fixtures_dir, wait_output_timeout, wait_ready, workspace_bin,
};
use serde_json::Value;

pub use meshaccel_e2e::{APP_UID, PROXY_UID};

pub fn golden() -> PathBuf {
    fixtures_dir().join("iptables/istio-cni-sidecar/basic.txt.golden")
}

#[allow(unused_imports)]
pub use meshaccel_e2e::helm_binary as helm;

pub fn tool() -> PathBuf {
    workspace_bin("meshaccel-e2e-tool")
}

/// A pod with Istio's capture rules and a relay (the sidecar) running as UID 1337.
pub fn mesh_pod(mesh: &mut Mesh, name: &str) -> Pod {
    let pod = mesh.add_pod(name, Some(&golden())).expect("pod");
    let mut relay = mesh
        .spawn(&pod, Some(PROXY_UID), &tool(), &["relay"])
        .expect("relay");
    wait_ready(&mut relay).expect("relay ready");
    pod
}

/// Two mesh pods ("a", "b") and an agent accelerating both, started with `env` (extra
/// `MESHACCEL_*` settings for the agent, kept for its restarts).
pub fn two_mesh_pods(env: &[(&str, &str)]) -> (Mesh, Pod, Pod, Accel) {
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let accel = Accel::start_env(
        &mesh,
        true,
        Default::default(),
        &[Workload::on(&a), Workload::on(&b)],
        env,
    )
    .expect("agent");
    (mesh, a, b, accel)
}

/// One of the tool's servers (`args[0]`: `sink`, `echo`, `soak-server`, …) in the pod as its
/// app, once it says it is ready; the mesh kills and reaps it at teardown.
pub fn app_server(mesh: &mut Mesh, pod: &Pod, args: &[&str]) {
    let mut s = mesh
        .spawn(pod, Some(APP_UID), &tool(), args)
        .unwrap_or_else(|e| panic!("{}: {e:#}", args[0]));
    wait_ready(&mut s).unwrap_or_else(|e| panic!("{} ready: {e:#}", args[0]));
}

/// A checksumming sink in the pod.
pub fn sink(mesh: &mut Mesh, pod: &Pod, listen: &str) {
    sink_delayed(mesh, pod, listen, 0);
}

/// [`sink`] that waits `delay_ms` after accepting before its first read (the bytes sent
/// meanwhile stay unread at the receiver).
pub fn sink_delayed(mesh: &mut Mesh, pod: &Pod, listen: &str, delay_ms: u64) {
    let delay = delay_ms.to_string();
    app_server(
        mesh,
        pod,
        &["sink", "--listen", listen, "--read-delay-ms", &delay],
    );
}

/// A soak server (`soak-server`) in the pod.
pub fn soak_server(mesh: &mut Mesh, pod: &Pod, listen: &str) {
    app_server(mesh, pod, &["soak-server", "--listen", listen]);
}

pub fn send(mesh: &mut Mesh, pod: &Pod, args: &[&str]) -> Child {
    mesh.spawn(pod, Some(APP_UID), &tool(), &[&["send"], args].concat())
        .expect("send")
}

/// Waits for an app (`send`, `swarm`, `http-load`, …) and returns its JSON report (its last
/// stdout line), asserting that it succeeded: every byte or response arrived exactly.
pub fn finished(child: Child, what: &str) -> Value {
    let out = wait_output_timeout(child, Duration::from_secs(120)).expect("app finished");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let v: Value = serde_json::from_str(last.trim())
        .unwrap_or_else(|e| panic!("{what}: bad report {text:?}: {e}"));
    assert!(
        out.status.success() && v["ok"] == true,
        "{what}: failed (bytes or responses did not arrive exactly): {v}"
    );
    v
}

pub fn segs(pods: &[&Pod]) -> Vec<TcpCounters> {
    pods.iter()
        .map(|p| p.tcp_counters().expect("snmp"))
        .collect()
}

pub fn in_segs_since(pods: &[&Pod], before: &[TcpCounters]) -> Vec<u64> {
    pods.iter()
        .zip(before)
        .map(|(p, b)| p.tcp_counters().unwrap().since(b).in_segs)
        .collect()
}

pub fn counters(a: &Accel) -> Value {
    a.status().expect("status")["counters"].clone()
}

pub fn delta(after: &Value, before: &Value, name: &str) -> u64 {
    after[name].as_u64().unwrap() - before[name].as_u64().unwrap()
}

/// One of the agent's status counters.
pub fn counter(a: &Accel, name: &str) -> u64 {
    a.counter(name).expect("status counter")
}

/// Polls `f` until it holds; panics after 20 s.
pub fn wait_until(what: &str, f: impl FnMut() -> bool) {
    wait_until_secs(what, 20, f);
}

/// [`wait_until`] with a deadline of `secs`.
pub fn wait_until_secs(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    wait_for_secs(what, secs, || f().then_some(()));
}

/// Polls `f` until it gives a value; panics after `secs`.
pub fn wait_for_secs<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids of every BPF object of `kind` (`prog`, `map`, `link`) in the kernel, from `bpftool`.
/// Panics when bpftool fails or prints something else than a JSON list of objects with ids:
/// an empty list must mean "none", never "could not tell".
pub fn bpftool_ids(kind: &str) -> Vec<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool (scripts/env.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`bpftool -j {kind} show` failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`bpftool -j {kind} show` printed no JSON ({e}): {stdout}"));
    let list = v
        .as_array()
        .unwrap_or_else(|| panic!("`bpftool -j {kind} show` printed no list: {v}"));
    list.iter()
        .map(|e| {
            e["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("`bpftool -j {kind} show`: an entry without an id: {e}"))
        })
        .collect()
}

/// One sample of the running agent's `/metrics` (Prometheus text), by its exact name and
/// labels as exposed (e.g. `meshaccel_source_errors_total{source="static_file"}`); `None` when
/// the agent does not expose it.
pub fn metric(accel: &Accel, sample: &str) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    let addr = accel.metrics_addr().expect("the agent's metrics address");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: meshaccel\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read /metrics");
    assert!(raw.starts_with("HTTP/1.1 200"), "/metrics: {raw}");
    raw.lines().find_map(|l| {
        let value = l.strip_prefix(sample)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("a sample value"))
    })
}
