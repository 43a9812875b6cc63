//! A real single-node Kubernetes (e2e/src/cluster.rs): kubelet, controller-manager and scheduler
//! v1.20.2 over containerd + runc and a CNI bridge, images imported without a registry.
//!
//! Needs root, scripts/install-kube.sh (all Kubernetes binaries) and scripts/install-cluster.sh
//! (containerd, runc, CNI plugins, debootstrap); scripts/test.sh runs both.
mod support;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use meshaccel_e2e::{
    cluster::{Cluster, PAUSE_IMAGE},
    cluster_mesh::{
        AGENT_IMAGE, AGENT_METRICS_PORT, MeshNode, RELEASE, finished_ok, http_get, repo, wait_for,
        walkdir,
    },
    injected::TOOL,
};
use serde_json::Value;

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
    let ip: Ipv4Addr = wait_for(
        &cluster,
        "pod sleeper Running",
        Duration::from_secs(90),
        || {
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
        },
    );
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

#[test]
fn the_chart_accelerates_a_labelled_namespace_on_a_real_node() {
    let node = MeshNode::start();
    node.helm_install("install", &node.tag, &[]);
    let agent = node.agent_pod();
    // The agent runs as the chart says: not privileged, only its four capabilities.
    let sc = node
        .cluster
        .kubectl(&[
            "get",
            "pod",
            "-n",
            &node.system_ns,
            &agent,
            "-o",
            "jsonpath={.spec.containers[0].securityContext}",
        ])
        .unwrap();
    let sc: Value = serde_json::from_str(&sc).unwrap();
    assert_ne!(sc["privileged"], true, "agent privileged: {sc}");
    let mut caps: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);

    let (server_pod, client_pod, server_ip) = node.deploy_pair(&[]);
    // Not labelled yet: plain TCP (several segments per round trip).
    let off = node.pingpong(&client_pod, server_ip, 500);
    assert!(
        off >= 2.0,
        "unlabelled namespace: {off:.2} segments per round trip, expected TCP's"
    );

    node.cluster
        .kubectl(&[
            "label",
            "namespace",
            &node.mesh_ns,
            "meshaccel.io/enabled=true",
        ])
        .unwrap();
    node.wait_enabled("server", true);
    node.wait_enabled("client", true);
    let on = node.pingpong(&client_pod, server_ip, 2000);
    let st = node.status().unwrap();
    let client = node.workload(&st, "client").unwrap();
    eprintln!(
        "[cluster] segments per round trip: off {off:.2}, on {on:.3}; client workload {client}"
    );
    assert!(
        on < 0.05,
        "labelled namespace: {on:.3} TCP segments per round trip (expected ~0)"
    );
    assert!(client["redirect_bytes"].as_u64().unwrap() > 0);

    // A pod label opts one workload out: its new pod runs on plain TCP.
    let client = node.client_workload(server_ip, &[("meshaccel.io/enabled", "false")]);
    node.deploy(&client);
    let new_client = node.replacement_pod("client", &client_pod);
    node.wait_enabled("client", false);
    node.assert_tcp(&new_client, server_ip, "opted-out pod");

    // A deleted pod's entries go, its replacement's come.
    node.cluster
        .kubectl(&[
            "delete",
            "pod",
            "-n",
            &node.mesh_ns,
            &server_pod,
            "--wait=false",
        ])
        .unwrap();
    let new_server = node.replacement_pod("server", &server_pod);
    wait_for(
        &node.cluster,
        "the entries moved to the new server pod",
        Duration::from_secs(60),
        || {
            let st = node.status()?;
            let names: Vec<&str> = st["by_workload"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["name"].as_str())
                .collect();
            let new = format!("{}/{new_server}", node.mesh_ns);
            let old = format!("{}/{server_pod}", node.mesh_ns);
            Ok((names.contains(&new.as_str()) && !names.contains(&old.as_str())).then_some(()))
        },
    );
}

#[test]
fn a_killed_agent_and_an_upgrade_lose_no_request() {
    let (node, client, server_ip) = MeshNode::installed_with_pair();
    let programs = node.attached_programs();
    assert!(
        !programs.is_empty(),
        "no meshaccel program attached to the cgroup v2 root"
    );

    // The agent container killed under load: the kubelet restarts it, the accelerated
    // connection goes on, not one round trip fails.
    let load = node.background_pingpong(&client, server_ip, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    let restarts = node.kill_agent();
    wait_for(
        &node.cluster,
        "the agent restarted by the kubelet",
        Duration::from_secs(90),
        || {
            let (_, r) = node.agent_container();
            Ok((r > restarts).then_some(()))
        },
    );
    node.agent_pod(); // Ready again
    finished_ok(load, "ping-pong across the agent's restart");
    assert_eq!(
        node.attached_programs(),
        programs,
        "a restart must adopt the programs"
    );

    // helm upgrade to a new image (the same build under a new tag, programs replaced as a new
    // build's would be) under load.
    let new_tag = format!("{}-up", node.tag);
    node.cluster
        .ctr(&[
            "images",
            "tag",
            &format!("{AGENT_IMAGE}:{}", node.tag),
            &format!("{AGENT_IMAGE}:{new_tag}"),
        ])
        .expect("tagging the new image");
    let load = node.background_pingpong(&client, server_ip, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    node.helm_install(
        "upgrade",
        &new_tag,
        &[
            "extraEnv[0].name=MESHACCEL_REPLACE_PROGRAMS",
            "extraEnv[0].value=true",
        ],
    );
    let image = node
        .cluster
        .kubectl(&[
            "get",
            "pod",
            "-n",
            &node.system_ns,
            &node.agent_pod(),
            "-o",
            "jsonpath={.spec.containers[0].image}",
        ])
        .unwrap();
    assert!(image.ends_with(&new_tag), "agent runs {image}");
    finished_ok(load, "ping-pong across the upgrade");
    let after = node.attached_programs();
    assert!(
        !after.is_empty() && after != programs,
        "programs not replaced: {programs:?} -> {after:?}"
    );
    node.assert_accelerated(&client, server_ip, "after the upgrade");
}

#[test]
fn helm_uninstall_runs_the_hook_on_the_node_and_leaves_nothing_attached() {
    let (node, client, server_ip) = MeshNode::installed_with_pair();
    assert!(!node.attached_programs().is_empty());
    let load = node.background_pingpong(&client, server_ip, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    let out = node
        .helm()
        .args([
            "uninstall",
            RELEASE,
            "-n",
            &node.system_ns,
            "--wait",
            "--timeout",
            "180s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm uninstall: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.cluster.diagnostics()
    );
    finished_ok(load, "ping-pong across helm uninstall");
    // The agent pod is gone, and nothing of meshaccel is attached or pinned.
    wait_for(
        &node.cluster,
        "agent pods gone",
        Duration::from_secs(60),
        || {
            let out =
                node.cluster
                    .kubectl(&["get", "pods", "-n", &node.system_ns, "-o", "name"])?;
            Ok(out.trim().is_empty().then_some(()))
        },
    );
    assert_eq!(
        node.attached_programs(),
        Vec::<u64>::new(),
        "programs still attached"
    );
    // (maps.debug and progs.debug are the kernel's own, bpf_preload's iterators.)
    let pins: Vec<_> = walkdir(&node.cluster.bpffs())
        .into_iter()
        .filter(|p| {
            p.parent() != Some(node.cluster.bpffs().as_path())
                || p.extension().is_none_or(|e| e != "debug")
        })
        .collect();
    assert!(pins.is_empty(), "pins left in the node's bpffs: {pins:?}");
    node.assert_tcp(&client, server_ip, "after uninstall");

    // Installing again works: new connections are accelerated again.
    node.helm_install("install", &node.tag, &[]);
    node.wait_enabled("client", true);
    node.assert_accelerated(&client, server_ip, "after reinstall");
}

#[test]
fn an_agent_restarted_after_the_uninstall_hook_installs_nothing() {
    let (node, client, server_ip) = MeshNode::installed_with_pair();
    assert!(!node.attached_programs().is_empty());
    // The pre-delete hook's objects as helm renders them, applied by hand so that the window
    // between the hook and the agent DaemonSet's deletion stays open as long as the test needs.
    let mut cmd = node.helm();
    cmd.args(["template", RELEASE])
        .arg(repo().join("charts/meshaccel"))
        .args([
            "-n",
            &node.system_ns,
            "--show-only",
            "templates/uninstall-hook.yaml",
        ])
        .args(node.chart_values(&node.tag));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.cluster
        .apply(&String::from_utf8_lossy(&out.stdout))
        .expect("applying the uninstall hook");
    wait_for(
        &node.cluster,
        "the hook's uninstall ran on the node",
        Duration::from_secs(120),
        || {
            let out = node.cluster.kubectl(&[
                "get",
                "pods",
                "-n",
                &node.system_ns,
                "-l",
                "app.kubernetes.io/component=uninstall",
                "-o",
                "jsonpath={.items[*].status.initContainerStatuses[0].state.terminated.exitCode}",
            ])?;
            Ok((out.trim() == "0").then_some(()))
        },
    );
    assert_eq!(
        node.attached_programs(),
        Vec::<u64>::new(),
        "programs attached after the hook"
    );
    // The agent restarts (as a kubelet restarts a crashed one) before its DaemonSet is deleted:
    // it must not install again.
    let restarts = node.kill_agent();
    wait_for(
        &node.cluster,
        "the restarted agent refused to install",
        Duration::from_secs(120),
        || {
            let out = node.cluster.kubectl(&[
            "get", "pods", "-n", &node.system_ns, "-l",
            "app.kubernetes.io/name=meshaccel,app.kubernetes.io/component=agent",
            "-o", "jsonpath={.items[0].status.containerStatuses[0].restartCount} {.items[0].status.containerStatuses[0].lastState.terminated.exitCode}",
        ])?;
            let f: Vec<&str> = out.split_whitespace().collect();
            // Restarted at least once more, and that run ended (it refused).
            Ok((f.len() == 2 && f[0].parse::<u64>()? >= restarts + 2).then_some(()))
        },
    );
    assert_eq!(
        node.attached_programs(),
        Vec::<u64>::new(),
        "a restarted agent installed again"
    );
    node.assert_tcp(&client, server_ip, "after the hook");
}

#[test]
fn istiod_and_apiserver_outages_keep_a_working_agent_ready() {
    let (mut node, client, server_ip) = MeshNode::installed_with_pair();
    let agent = node.agent_pod();
    let ready_since = |node: &MeshNode| {
        node.cluster
            .kubectl(&[
                "get", "pod", "-n", &node.system_ns, &agent, "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime} {.status.containerStatuses[0].restartCount}",
            ])
            .unwrap()
    };
    let before = ready_since(&node);
    assert!(before.starts_with("True "), "agent not Ready: {before}");
    // What the kubelet's probe asks, asked here every half second for the whole outage: the
    // outage lasts longer than three readiness periods (3 x 5 s).
    // (Its address is read now: the API server is one of the things that go away.)
    let readyz = std::net::SocketAddr::from((node.agent_ip().unwrap(), AGENT_METRICS_PORT));
    let ready_throughout = |what: &str| {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < end {
            let (code, body) = http_get(readyz, "/readyz").expect("the agent's /readyz");
            assert_eq!(code, 200, "{what}: the agent turned not ready: {body}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    node.ads.kill();
    ready_throughout("istiod down");
    assert_eq!(
        ready_since(&node),
        before,
        "an istiod outage changed the pod's readiness"
    );
    node.ads.restart().expect("istiod back");
    node.cluster.api_mut().stop_apiserver();
    ready_throughout("API server down");
    node.cluster
        .api_mut()
        .start_apiserver()
        .expect("API server back");
    wait_for(
        &node.cluster,
        "the node reports again",
        Duration::from_secs(60),
        || Ok(node.cluster.kubectl(&["get", "node"]).is_ok().then_some(())),
    );
    assert_eq!(
        ready_since(&node),
        before,
        "an API server blip changed the pod's readiness"
    );
    node.assert_accelerated(&client, server_ip, "after the outages");
}

#[test]
fn bad_labels_and_pods_without_sidecar_are_reported_and_break_nothing() {
    let (node, client, server_ip) = MeshNode::installed_with_pair();
    // A pod without sidecar in the labelled namespace: left alone, nothing else changes.
    node.cluster
        .apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: plain\n  namespace: {}\nspec:\n  containers:\n    - name: app\n      image: {}\n      imagePullPolicy: Never\n      command: [\"{TOOL}\"]\n      args: [\"echo\", \"--listen\", \"0.0.0.0:7070\"]\n",
            node.mesh_ns,
            node.app_image()
        ))
        .unwrap();
    // Label values that are neither true nor false, on a pod and then on the namespace: an
    // Event on the pods names the label and the fix; they stay on TCP; fixed, they come back.
    let events = |pod: &str, needle: &str| {
        node.event_on(&node.mesh_ns, pod, "MeshaccelNotAccelerated", needle)
    };
    node.cluster
        .kubectl(&[
            "label",
            "pod",
            "-n",
            &node.mesh_ns,
            &client,
            "meshaccel.io/enabled=maybe",
        ])
        .unwrap();
    let ev = events(&client, "pod label meshaccel.io/enabled=\"maybe\"");
    assert!(ev.contains("must be \"true\" or \"false\""), "{ev}");
    node.wait_enabled("client", false);
    node.cluster
        .kubectl(&[
            "label",
            "pod",
            "-n",
            &node.mesh_ns,
            &client,
            "meshaccel.io/enabled-",
        ])
        .unwrap();
    node.wait_enabled("client", true);
    node.cluster
        .kubectl(&[
            "label",
            "--overwrite",
            "namespace",
            &node.mesh_ns,
            "meshaccel.io/enabled=yes",
        ])
        .unwrap();
    events(&client, "namespace label meshaccel.io/enabled=\"yes\"");
    node.wait_enabled("server", false);
    node.cluster
        .kubectl(&[
            "label",
            "--overwrite",
            "namespace",
            &node.mesh_ns,
            "meshaccel.io/enabled=true",
        ])
        .unwrap();
    node.wait_enabled("server", true);
    node.wait_enabled("client", true);
    let st = node.status().unwrap();
    assert!(
        node.workload(&st, "plain").is_none(),
        "a pod without sidecar in the agent's status: {st}"
    );
    node.assert_accelerated(&client, server_ip, "after the bad labels");
}

#[test]
fn a_node_without_kernel_btf_says_so_and_keeps_traffic_on_tcp() {
    // What the agent sees on a kernel without CONFIG_DEBUG_INFO_BTF: no /sys/kernel/btf/vmlinux
    // (an empty folder mounted over the one this kernel has, through the chart's extra volumes).
    let node = MeshNode::start();
    node.helm_install(
        "install",
        &node.tag,
        &[
            "extraVolumes[0].name=no-btf",
            "extraVolumes[0].emptyDir.sizeLimit=1Mi",
            "extraVolumeMounts[0].name=no-btf",
            "extraVolumeMounts[0].mountPath=/sys/kernel/btf",
        ],
    );
    // The agent still becomes Ready (helm --wait) and says why nothing is accelerated, in its
    // log and as an Event on its pod with the fix.
    let agent = node.agent_pod();
    let ev = node.event_on(
        &node.system_ns,
        &agent,
        "MeshaccelNodeCheck",
        "no kernel BTF (/sys/kernel/btf/vmlinux",
    );
    assert!(
        ev.contains("stays on plain TCP")
            && ev.contains("fix: run a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        "{ev}"
    );
    let log = node
        .cluster
        .kubectl(&["logs", "-n", &node.system_ns, &agent])
        .unwrap();
    assert!(
        log.contains("MeshaccelNodeCheck") && log.contains("no kernel BTF"),
        "the agent's log has no line on the missing BTF:\n{log}"
    );
    // Nothing breaks: the labelled pair is enabled and its requests flow, on plain TCP.
    let (client, server_ip) = node.enabled_pair();
    node.assert_tcp(&client, server_ip, "on a node without kernel BTF");
    // Exactly one Event per finding: BTF is the only thing this kernel lacks.
    let all = node
        .cluster
        .kubectl(&[
            "get",
            "events",
            "-n",
            &node.system_ns,
            "--field-selector",
            &format!("involvedObject.name={agent},reason=MeshaccelNodeCheck"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ])
        .unwrap();
    assert_eq!(all.lines().count(), 1, "{all}");
}
