//! The Kubernetes controller against a real kube-apiserver v1.20.2 + etcd 3.4 (started per test,
//! see `meshaccel_e2e::kube_api`), driving the real dataplane: root, real sockets, real kernel.
//!
//! Pods are API objects on a node name of the run, with `status.podIP` set to the IPs of local
//! netns pods (Istio's capture rules, a relay as the sidecar, UID 1337), so whatever the API says
//! decides what the kernel accelerates. The agent runs with a token bound to exactly
//! [`AGENT_CLUSTER_ROLE_RULES`] (the Helm chart's ClusterRole).
mod support;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Namespace, Pod as KPod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use meshaccel_e2e::{
    Mesh, PROXY_UID, Pod,
    accel::Accel,
    kube_api::{self, AGENT_CLUSTER_ROLE_RULES, KubeApi},
    require_root,
};
use serde_json::{Value, json};
use support::{counter, finished, mesh_pod, send, sink, wait_until_secs};

const LABEL: &str = "meshaccel.io/enabled";
const EVENT_REASON: &str = "MeshaccelNotAccelerated";

fn cookies(pods: &[&Pod]) -> BTreeSet<u64> {
    pods.iter()
        .map(|p| p.netns_cookie().expect("cookie"))
        .collect()
}

fn wait_enabled(accel: &Accel, want: &[&Pod], what: &str) {
    let want = cookies(want);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = accel.enabled_cookies().unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: enabled workloads {got:?}, want {want:?}; agent log:\n{}",
            accel.agent_log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn wait_log(accel: &Accel, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !accel.agent_log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the agent never logged {needle:?}; log:\n{}",
            accel.agent_log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The API objects of one test: a namespace and pods on a node of the run, changed as admin.
struct Cluster {
    api: KubeApi,
    node: String,
    ns: String,
}

impl Cluster {
    fn start() -> Cluster {
        let api = KubeApi::start().expect("kube-apiserver + etcd");
        let id = api.run_id().to_string();
        Cluster {
            node: format!("node-{id}"),
            ns: format!("mesh-{id}"),
            api,
        }
    }

    /// The agent's kubeconfig: a token bound to exactly the chart's ClusterRole.
    fn agent_kubeconfig(&mut self) -> PathBuf {
        let role = format!("meshaccel-agent-{}", self.api.run_id());
        self.api
            .create_cluster_role(&role, AGENT_CLUSTER_ROLE_RULES)
            .expect("ClusterRole");
        self.api
            .kubeconfig_for_cluster_role(&role)
            .expect("agent kubeconfig")
    }

    fn run<T: Send, F>(&self, f: impl FnOnce(kube::Client) -> F + Send) -> T
    where
        F: std::future::Future<Output = anyhow::Result<T>> + Send,
    {
        let api = &self.api;
        kube_api::block_on(async move {
            let c = api.admin_client().await?;
            f(c).await
        })
        .expect("API call")
    }

    fn create_namespace(&self, labels: Value) {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": self.ns, "labels": labels}}))
                .unwrap();
        self.run(move |c| async move {
            Api::<Namespace>::all(c)
                .create(&PostParams::default(), &ns)
                .await?;
            Ok(())
        });
    }

    fn label_namespace(&self, value: Option<&str>) {
        let name = self.ns.clone();
        let patch = json!({"metadata": {"labels": {LABEL: value}}});
        self.run(move |c| async move {
            Api::<Namespace>::all(c)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(())
        });
    }

    /// An injected pod bound to the run's node, Running with `ip`. Its apps (the e2e tool's,
    /// which read as event loops do) are declared trusted, so all three legs are accelerated.
    fn create_pod(&self, name: &str, ip: &str, labels: Value, annotations: Value) {
        let mut ann = json!({
            "sidecar.istio.io/status": "{\"initContainers\":null,\"containers\":[\"istio-proxy\"]}",
            "meshaccel.io/app-sockets": "trusted",
        });
        if let (Some(a), Value::Object(extra)) = (ann.as_object_mut(), annotations) {
            a.extend(extra);
        }
        let pod: KPod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": self.ns, "labels": labels, "annotations": ann},
            "spec": {"nodeName": self.node, "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]},
                {"name": "istio-proxy", "image": "proxyv2:1", "securityContext": {"runAsUser": PROXY_UID}}
            ]}
        }))
        .unwrap();
        let (ns, name, ip) = (self.ns.clone(), name.to_string(), ip.to_string());
        self.run(move |c| async move {
            Api::<KPod>::namespaced(c.clone(), &ns)
                .create(&PostParams::default(), &pod)
                .await?;
            KubeApi::set_pod_running(&c, &ns, &name, &ip).await
        });
    }

    fn patch_pod(&self, name: &str, patch: Value) {
        let (ns, name) = (self.ns.clone(), name.to_string());
        self.run(move |c| async move {
            Api::<KPod>::namespaced(c, &ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(())
        });
    }

    fn delete_pod(&self, name: &str) {
        let (ns, name) = (self.ns.clone(), name.to_string());
        self.run(move |c| async move {
            Api::<KPod>::namespaced(c, &ns)
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await?;
            Ok(())
        });
    }

    /// Messages of meshaccel's Events on pod `name`.
    fn events(&self, name: &str) -> Vec<String> {
        let (ns, name) = (self.ns.clone(), name.to_string());
        self.run(move |c| async move {
            let list = Api::<Event>::namespaced(c, &ns)
                .list(&ListParams::default())
                .await?;
            Ok(list
                .items
                .into_iter()
                .filter(|e| {
                    e.involved_object.name.as_deref() == Some(name.as_str())
                        && e.reason.as_deref() == Some(EVENT_REASON)
                })
                .filter_map(|e| e.message)
                .collect())
        })
    }
}

/// Namespace label on → its pods accelerated (all three legs redirect); pod label overrides
/// both ways; annotation exclusions reach the maps; a malformed annotation leaves only that pod
/// out and posts an Event; label off → entries leave the maps while a transfer runs (it ends
/// byte-exact on TCP); pod deletion removes its entries.
#[test]
fn labels_annotations_and_deletion_drive_the_maps() {
    require_root();
    let mut cl = Cluster::start();
    let kubeconfig = cl.agent_kubeconfig();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let c = mesh_pod(&mut mesh, "c");
    cl.create_namespace(json!({}));
    for p in [&a, &b, &c] {
        cl.create_pod(
            &p.name,
            &p.ip.to_string(),
            json!({"app": p.name}),
            json!({}),
        );
    }
    let accel = Accel::start_kube(&mesh, &cl.node, &kubeconfig).expect("agent");
    wait_log(&accel, "Kubernetes source in sync", 20);
    wait_enabled(&accel, &[], "namespace without the label");

    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let ins0 = counter(&accel, "inserted");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "2000000"]),
        "not opted in",
    );
    assert_eq!(
        counter(&accel, "inserted"),
        ins0,
        "nothing is accelerated before the namespace opts in"
    );

    // Namespace opts in: every pod, and traffic a → b redirects on all three legs.
    cl.label_namespace(Some("true"));
    wait_enabled(&accel, &[&a, &b, &c], "namespace labelled");
    let r0 = counter(&accel, "redirect_bytes");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "4000000"]),
        "opted in",
    );
    let redirected = counter(&accel, "redirect_bytes") - r0;
    assert!(
        redirected >= 3 * 4_000_000,
        "three legs redirected: {redirected} bytes for 4000000 sent"
    );

    // Pod label false opts one pod out; removing it puts the pod back.
    cl.patch_pod(&c.name, json!({"metadata": {"labels": {LABEL: "false"}}}));
    wait_enabled(&accel, &[&a, &b], "pod c opted out");
    cl.patch_pod(&c.name, json!({"metadata": {"labels": {LABEL: null}}}));
    wait_enabled(&accel, &[&a, &b, &c], "pod c label removed");

    // Istio's exclusion annotations reach the maps: b excludes inbound 8080, so the legs ending
    // on b's app port are not inserted and the traffic is counted as excluded.
    let ex0 = counter(&accel, "skip_excluded_port");
    cl.patch_pod(
        &b.name,
        json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/excludeInboundPorts": "8080"}}}),
    );
    wait_until_secs("b's excluded port in the maps", 15, || {
        accel.status().unwrap()["excluded_ports"] == 1
    });
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "1000000"]),
        "excluded port",
    );
    assert!(
        counter(&accel, "skip_excluded_port") > ex0,
        "the excluded port was skipped by the kernel"
    );
    cl.patch_pod(
        &b.name,
        json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/excludeInboundPorts": null}}}),
    );
    wait_until_secs("the exclusion removed", 15, || {
        accel.status().unwrap()["excluded_ports"] == 0
    });

    // A malformed annotation: that pod leaves, an Event and a log line say why, others stay.
    cl.patch_pod(
        &c.name,
        json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432,postgres"}}}),
    );
    wait_enabled(&accel, &[&a, &b], "pod c with a malformed annotation");
    wait_until_secs("an Event on pod c", 15, || {
        cl.events(&c.name)
            .iter()
            .any(|m| m.contains("excludeOutboundPorts") && m.contains("postgres"))
    });
    wait_log(&accel, "pod not accelerated", 5);
    assert!(cl.events(&a.name).is_empty(), "no Event on a healthy pod");

    // Label removed while a transfer runs: entries leave the maps, the transfer ends
    // byte-exact (its sockets fall back to TCP), and new traffic is not accelerated.
    let slow = send(
        &mut mesh,
        &a,
        &[
            "--connect",
            &target,
            "--bytes",
            "20000000",
            "--chunk",
            "65536",
            "--hold-ms",
            "10",
        ],
    );
    let mid = counter(&accel, "redirect_bytes");
    wait_until_secs("the transfer is redirecting", 20, || {
        counter(&accel, "redirect_bytes") > mid + 2_000_000
    });
    cl.label_namespace(None);
    wait_enabled(&accel, &[], "namespace label removed");
    finished(slow, "label removed mid-transfer");
    let ins = counter(&accel, "inserted");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "1000000"]),
        "after unlabel",
    );
    assert_eq!(
        counter(&accel, "inserted"),
        ins,
        "nothing inserted after unlabel"
    );

    // A pod label true opts a pod in inside an unlabelled namespace.
    cl.patch_pod(&a.name, json!({"metadata": {"labels": {LABEL: "true"}}}));
    wait_enabled(&accel, &[&a], "pod a opted in by its label");

    // Pod deletion removes its entries.
    cl.label_namespace(Some("true"));
    wait_enabled(&accel, &[&a, &b], "namespace on again (c still malformed)");
    cl.delete_pod(&b.name);
    wait_enabled(&accel, &[&a], "pod b deleted");
}

/// The API server stops mid-test: the maps keep the last good state (and keep redirecting);
/// when it comes back, the agent resyncs without touching the maps, then follows new changes.
#[test]
fn apiserver_outage_keeps_state_and_resyncs() {
    require_root();
    let mut cl = Cluster::start();
    let kubeconfig = cl.agent_kubeconfig();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    cl.create_namespace(json!({LABEL: "true"}));
    for p in [&a, &b] {
        cl.create_pod(&p.name, &p.ip.to_string(), json!({}), json!({}));
    }
    let accel = Accel::start_kube(&mesh, &cl.node, &kubeconfig).expect("agent");
    wait_enabled(&accel, &[&a, &b], "start");
    let before = accel.status().unwrap();

    cl.api.stop_apiserver();
    wait_log(&accel, "Kubernetes API unreachable", 20);
    // Two backoff rounds later, still the same state.
    std::thread::sleep(Duration::from_secs(3));
    wait_enabled(&accel, &[&a, &b], "API server away");
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let r0 = counter(&accel, "redirect_bytes");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "2000000"]),
        "API server away",
    );
    assert!(
        counter(&accel, "redirect_bytes") >= r0 + 3 * 2_000_000,
        "still accelerated while the API server is away"
    );

    let syncs = accel
        .agent_log()
        .matches("Kubernetes source in sync")
        .count();
    cl.api.start_apiserver().expect("API server back");
    wait_until_secs("the agent resynced", 30, || {
        accel
            .agent_log()
            .matches("Kubernetes source in sync")
            .count()
            > syncs
    });
    let after = accel.status().unwrap();
    assert_eq!(
        before["epoch"], after["epoch"],
        "a resync with nothing changed stops no redirect (epoch unchanged)"
    );
    wait_enabled(&accel, &[&a, &b], "after resync");
    let log = accel.agent_log();
    let since = &log[log.rfind("Kubernetes API unreachable").unwrap()..];
    assert!(
        !since.contains("node-local mesh pods changed"),
        "no new contribution after a resync with nothing changed:\n{since}"
    );

    // And it follows changes again.
    cl.patch_pod(&b.name, json!({"metadata": {"labels": {LABEL: "false"}}}));
    wait_enabled(&accel, &[&a], "change after the outage");
}

/// RBAC: the agent works with a token bound to exactly the chart's rules (the tests above);
/// without `watch` it cannot stay in sync, without `create events` it cannot report a
/// malformed pod: both visible in its log (and the Event missing).
#[test]
fn rbac_each_rule_is_needed() {
    require_root();
    let mut cl = Cluster::start();
    let id = cl.api.run_id().to_string();
    cl.create_namespace(json!({LABEL: "true"}));
    cl.create_pod(
        "bad",
        "198.18.0.9",
        json!({}),
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "http"}),
    );

    let no_watch =
        AGENT_CLUSTER_ROLE_RULES.replace(r#"["get", "list", "watch"]"#, r#"["get", "list"]"#);
    assert_ne!(no_watch, AGENT_CLUSTER_ROLE_RULES);
    let no_events = AGENT_CLUSTER_ROLE_RULES.replace(r#"["create"]"#, r#"["get"]"#);
    assert_ne!(no_events, AGENT_CLUSTER_ROLE_RULES);

    // Without create events: the malformed pod is logged, the Event cannot be posted.
    cl.api
        .create_cluster_role(&format!("no-events-{id}"), &no_events)
        .unwrap();
    let kc = cl
        .api
        .kubeconfig_for_cluster_role(&format!("no-events-{id}"))
        .unwrap();
    {
        let mesh = Mesh::new().expect("mesh");
        let accel = Accel::start_kube(&mesh, &cl.node, &kc).expect("agent");
        wait_log(
            &accel,
            "cannot post a Kubernetes Event: the agent's ClusterRole needs",
            20,
        );
        assert!(cl.events("bad").is_empty());
    }

    // Without watch: the lists succeed, every watch is forbidden, the agent never settles.
    cl.api
        .create_cluster_role(&format!("no-watch-{id}"), &no_watch)
        .unwrap();
    let kc = cl
        .api
        .kubeconfig_for_cluster_role(&format!("no-watch-{id}"))
        .unwrap();
    {
        let mesh = Mesh::new().expect("mesh");
        let accel = Accel::start_kube(&mesh, &cl.node, &kc).expect("agent");
        wait_log(&accel, "Kubernetes API unreachable or watch failed", 20);
        let log = accel.agent_log();
        assert!(
            log.contains("forbidden") || log.contains("Forbidden"),
            "{log}"
        );
    }

    // With exactly the chart's rules: the Event is posted.
    let kc = cl.agent_kubeconfig();
    let mesh = Mesh::new().expect("mesh");
    let accel = Accel::start_kube(&mesh, &cl.node, &kc).expect("agent");
    wait_until_secs("the Event on the malformed pod", 20, || {
        cl.events("bad")
            .iter()
            .any(|m| m.contains("excludeInboundPorts"))
    });
    assert!(!accel.agent_log().contains("cannot post"));
}
