//! A real single-node Kubernetes (e2e/src/cluster.rs): kubelet, controller-manager and scheduler
//! v1.20.2 over containerd + runc and a CNI bridge, images imported without a registry.
//!
//! Needs root, scripts/install-kube.sh (all Kubernetes binaries) and scripts/install-cluster.sh
//! (containerd, runc, CNI plugins, debootstrap); scripts/test.sh runs both.
mod support;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use meshaccel_e2e::cluster::{Cluster, PAUSE_IMAGE};

/// Polls `f` until it returns `Some` or `timeout` passes; on timeout panics with the last error
/// and the node's diagnostics.
fn wait_for<T>(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?} (last error: {last})\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_node_runs_pods_on_the_run_bridge_and_removes_them() {
    meshaccel_e2e::require_root();
    let cluster = Cluster::start().expect("single-node cluster");
    let net = cluster.network().clone();
    cluster
        .apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: sleeper
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: pause
      image: {PAUSE_IMAGE}
      imagePullPolicy: Never
"#
        ))
        .expect("creating a pod");
    let ip: Ipv4Addr = wait_for(&cluster, "pod sleeper Running", Duration::from_secs(90), || {
        let out = cluster.kubectl(&[
            "get",
            "pod",
            "sleeper",
            "-o",
            "jsonpath={.status.phase} {.status.podIP}",
        ])?;
        let mut it = out.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Running"), Some(ip)) => Ok(Some(ip.parse()?)),
            _ => Ok(None),
        }
    });
    let (subnet, bits) = net.pod_subnet;
    let mask = u32::MAX << (32 - bits);
    assert_eq!(
        u32::from(ip) & mask,
        u32::from(subnet),
        "pod IP {ip} outside the run's pod subnet {subnet}/{bits}"
    );
    // The pod's network namespace is pinned where the chart's agent looks for it.
    let pins: Vec<_> = std::fs::read_dir("/run/netns")
        .expect("/run/netns")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
        .collect();
    assert!(!pins.is_empty(), "no cni-* netns pin under /run/netns");
    cluster
        .kubectl(&["delete", "pod", "sleeper", "--wait=true", "--timeout=60s"])
        .expect("deleting the pod");
    assert!(Path::new(cluster.dir()).is_dir());
}
