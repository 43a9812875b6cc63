//! A real single-node Kubernetes (e2e/src/cluster.rs): kubelet, controller-manager and scheduler
//! v1.20.2 over containerd + runc and a CNI bridge, images imported without a registry.
//!
//! Needs root, scripts/install-kube.sh (all Kubernetes binaries) and scripts/install-cluster.sh
//! (containerd, runc, CNI plugins, debootstrap); scripts/test.sh runs both.
mod support;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use meshaccel_e2e::{
    ads::{AdsOptions, AdsServer, Resources},
    cluster::{Cluster, KUBECTL_IMAGE, PAUSE_IMAGE},
    envoy::{self, Pki, SidecarSpec, envoy_binary},
    image::{BuildRequest, build},
    injected::{TOOL, Workload},
    workspace_bin,
};
use serde_json::Value;

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

// ---------------------------------------------------------------------------------------------
// meshaccel installed with its Helm chart next to Istio-injected workloads.

const RELEASE: &str = "meshaccel";
const AGENT_IMAGE: &str = "meshaccel.local/meshaccel";
const PROXY_IMAGE: &str = "meshaccel.local/proxy";
const APP_IMAGE: &str = "meshaccel.local/app";
/// The echo server's port in the server workload.
const ECHO_PORT: u16 = 8080;

/// A node with meshaccel's chart installed, istiod's stand-in (the project's ADS server, TLS)
/// and a mesh namespace with an echo server and a client workload.
struct MeshNode {
    cluster: Cluster,
    pki: Pki,
    ads: AdsServer,
    _pki_dir: tempfile::TempDir,
    /// The release's namespace and the mesh workloads' namespace (names of the run).
    system_ns: String,
    mesh_ns: String,
    tag: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the three images from their Dockerfiles (cached) and imports them into the node.
fn build_images(cluster: &Cluster, tag: &str) {
    let out = cluster.dir().join("images");
    std::fs::create_dir_all(&out).unwrap();
    let meshaccel = workspace_bin("meshaccel");
    let tool = support::tool();
    let envoy = envoy_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let mut agent = BuildRequest::new(
        repo().join("accelerator/Dockerfile"),
        format!("{AGENT_IMAGE}:{tag}"),
    );
    agent.stage_file("build", "/out/meshaccel", &meshaccel);
    let mut proxy = BuildRequest::new(
        repo().join("e2e/images/envoy/Dockerfile"),
        format!("{PROXY_IMAGE}:{tag}"),
    );
    proxy
        .context(envoy.parent().unwrap())
        .stage_file("tool", "/meshaccel-e2e-tool", &tool);
    let mut app = BuildRequest::new(
        repo().join("e2e/images/app/Dockerfile"),
        format!("{APP_IMAGE}:{tag}"),
    );
    app.context(tool.parent().unwrap());
    for (name, req) in [("agent", agent), ("proxy", proxy), ("app", app)] {
        let archive = out.join(format!("{name}.oci.tar"));
        build(&req, &archive).unwrap_or_else(|e| panic!("building the {name} image: {e:#}"));
        cluster
            .import_image(&archive)
            .unwrap_or_else(|e| panic!("importing the {name} image: {e:#}"));
    }
}

impl MeshNode {
    fn start() -> MeshNode {
        meshaccel_e2e::require_root();
        let cluster = Cluster::start().expect("single-node cluster");
        let tag = format!("t{}", cluster.id());
        build_images(&cluster, &tag);
        let pki_dir = tempfile::Builder::new()
            .prefix("meshaccel-cluster-pki-")
            .tempdir()
            .unwrap();
        let pki = Pki::new(pki_dir.path()).expect("mesh CA");
        let (cert, key) = pki.issue_server(ISTIOD_NAME).expect("istiod certificate");
        let ads = AdsServer::start(AdsOptions {
            tls: Some((cert, key)),
            bind: Some(cluster.network().gateway.into()),
            ..Default::default()
        })
        .expect("ADS server (istiod's stand-in)");
        // What istiod tells every proxy of this mesh: a sidecar's listeners (capture ports,
        // passthrough) — the agent learns the node's capture from them.
        let spec = SidecarSpec {
            pod_name: "probe".into(),
            pod_ip: Ipv4Addr::new(10, 213, 0, 9),
            inbound_ports: vec![ECHO_PORT],
            upstreams: vec![],
            admin_port: 15000,
        };
        let res = Resources::from_json(&envoy::listeners(&spec), &envoy::clusters(&spec), &[])
            .expect("sidecar resources");
        ads.edit(|e| *e.default = res);
        let id = cluster.id().to_string();
        let node = MeshNode {
            system_ns: format!("meshaccel-{id}"),
            mesh_ns: format!("mesh-{id}"),
            cluster,
            pki,
            ads,
            _pki_dir: pki_dir,
            tag,
        };
        node.cluster
            .kubectl(&["create", "namespace", &node.system_ns])
            .unwrap();
        // The mesh root CA where the chart's agent reads it (Istio publishes it in every
        // namespace as this ConfigMap).
        node.cluster
            .kubectl(&[
                "create",
                "configmap",
                "istio-ca-root-cert",
                "-n",
                &node.system_ns,
                &format!(
                    "--from-file=root-cert.pem={}",
                    node.pki.root_cert().display()
                ),
            ])
            .unwrap();
        node.cluster
            .kubectl(&["create", "namespace", &node.mesh_ns])
            .unwrap();
        node
    }

    fn helm(&self) -> Command {
        let mut cmd = Command::new(support::helm());
        cmd.env("KUBECONFIG", self.cluster.api().admin_kubeconfig());
        cmd
    }

    /// `helm install|upgrade` of the chart with the image values and the two values this
    /// machine needs (the run's bpffs, istiod's stand-in address, a kubectl image for the
    /// uninstall hook: there is no registry); `extra` are `--set-string`s.
    fn helm_install(&self, verb: &str, tag: &str, extra: &[&str]) {
        let mut cmd = self.helm();
        cmd.args([verb, RELEASE])
            .arg(repo().join("charts/meshaccel"))
            .args(["-n", &self.system_ns])
            .args(["--set", &format!("image.repository={AGENT_IMAGE}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--set", "image.pullPolicy=Never"])
            .args([
                "--set",
                &format!("uninstallHook.kubectlImage={KUBECTL_IMAGE}"),
            ])
            .args([
                "--set",
                &format!("hostPaths.bpffs={}", self.cluster.bpffs().display()),
            ])
            .args([
                "--set",
                &format!(
                    "istiod.address={}:{}",
                    self.cluster.network().gateway,
                    self.ads.addr().port()
                ),
            ])
            .args(["--wait", "--timeout", "180s"]);
        for s in extra {
            cmd.args(["--set-string", s]);
        }
        let out = cmd.output().expect("running helm");
        assert!(
            out.status.success(),
            "helm {verb}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.cluster.diagnostics()
        );
    }

    /// The running agent pod's name.
    fn agent_pod(&self) -> String {
        wait_for(
            &self.cluster,
            "a Ready agent pod",
            Duration::from_secs(120),
            || {
                let out = self.cluster.kubectl(&[
                "get", "pods", "-n", &self.system_ns, "-l",
                "app.kubernetes.io/name=meshaccel,app.kubernetes.io/component!=uninstall",
                "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].ready} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ])?;
                Ok(out
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.len() == 2 && f[1] == "true")
                    .map(|f| f[0].to_string()))
            },
        )
    }

    /// `meshaccel status -o json` inside the agent pod.
    fn status(&self) -> anyhow::Result<Value> {
        let pod = self.agent_pod();
        let out = self.cluster.kubectl(&[
            "exec",
            "-n",
            &self.system_ns,
            &pod,
            "-c",
            "agent",
            "--",
            "meshaccel",
            "status",
            "-o",
            "json",
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The status row of the workload whose name starts with `<mesh ns>/<prefix>`.
    fn workload(&self, status: &Value, prefix: &str) -> Option<Value> {
        let want = format!("{}/{prefix}", self.mesh_ns);
        status["by_workload"]
            .as_array()?
            .iter()
            .find(|w| w["name"].as_str().is_some_and(|n| n.starts_with(&want)))
            .cloned()
    }

    fn deploy(&self, w: &Workload) {
        let list = w.manifests(&self.pki).expect("manifests");
        self.cluster
            .apply(&list.to_string())
            .expect("kubectl apply");
    }

    /// Waits for the workload's pod to run and returns (pod name, pod IP).
    fn running_pod(&self, app: &str) -> (String, Ipv4Addr) {
        wait_for(
            &self.cluster,
            &format!("a Running pod of {app}"),
            Duration::from_secs(120),
            || {
                let out = self.cluster.kubectl(&[
                "get", "pods", "-n", &self.mesh_ns, "-l", &format!("app={app}"),
                "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.podIP} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ])?;
                for l in out.lines() {
                    let f: Vec<_> = l.split_whitespace().collect();
                    let ready = self.cluster.kubectl(&[
                        "get",
                        "pod",
                        "-n",
                        &self.mesh_ns,
                        f[0],
                        "-o",
                        "jsonpath={.status.containerStatuses[*].ready}",
                    ])?;
                    if f.len() == 3
                        && f[1] == "Running"
                        && ready.split_whitespace().all(|r| r == "true")
                    {
                        return Ok(Some((f[0].to_string(), f[2].parse()?)));
                    }
                }
                Ok(None)
            },
        )
    }

    /// The echo server and a client workload whose sidecar may call it.
    fn deploy_pair(&self, client_labels: &[(&str, &str)]) -> (String, String, Ipv4Addr) {
        let mut server = Workload::new("server", &self.mesh_ns, &self.proxy_image());
        server.app_image = Some(self.app_image());
        server.app = vec![
            "echo".into(),
            "--listen".into(),
            format!("0.0.0.0:{ECHO_PORT}"),
        ];
        server.ports = vec![ECHO_PORT];
        server.pod_annotations = trusted_apps();
        self.deploy(&server);
        let (server_pod, server_ip) = self.running_pod("server");
        let client = self.client_workload(server_ip, client_labels);
        self.deploy(&client);
        let (client_pod, _) = self.running_pod("client");
        (server_pod, client_pod, server_ip)
    }

    fn client_workload(&self, server_ip: Ipv4Addr, labels: &[(&str, &str)]) -> Workload {
        let mut client = Workload::new("client", &self.mesh_ns, &self.proxy_image());
        client.app_image = Some(self.app_image());
        // Idle until the test runs its requests with kubectl exec.
        client.app = vec!["echo".into(), "--listen".into(), "127.0.0.1:9999".into()];
        client.upstreams = vec![("server".into(), server_ip, ECHO_PORT)];
        client.pod_annotations = trusted_apps();
        for (k, v) in labels {
            client.pod_labels.insert(k.to_string(), v.to_string());
        }
        client
    }

    fn proxy_image(&self) -> String {
        format!("{PROXY_IMAGE}:{}", self.tag)
    }

    fn app_image(&self) -> String {
        format!("{APP_IMAGE}:{}", self.tag)
    }

    /// Round trips from the client pod's app container to the echo server through both
    /// sidecars; returns the client pod's TCP segments sent per round trip.
    fn pingpong(&self, client_pod: &str, server_ip: Ipv4Addr, count: usize) -> f64 {
        let segs = || -> u64 {
            let snmp = self
                .cluster
                .kubectl(&[
                    "exec",
                    "-n",
                    &self.mesh_ns,
                    client_pod,
                    "-c",
                    "app",
                    "--",
                    "cat",
                    "/proc/net/snmp",
                ])
                .expect("reading the client pod's /proc/net/snmp");
            out_segs(&snmp)
        };
        let before = segs();
        let out = self.cluster.kubectl(&[
            "exec",
            "-n",
            &self.mesh_ns,
            client_pod,
            "-c",
            "app",
            "--",
            TOOL,
            "pingpong",
            "--connect",
            &format!("{server_ip}:{ECHO_PORT}"),
            "--count",
            &count.to_string(),
        ]);
        let out = out.unwrap_or_else(|e| panic!("pingpong through the sidecars: {e:#}"));
        assert!(!out.is_empty(), "pingpong printed nothing");
        let after = segs();
        (after - before) as f64 / count as f64
    }
}

const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// The tool reads only without blocking (`sock::read_ready`), so its workloads are declared
/// trusted and their app legs are accelerated too (the default, auto, keeps a blocking app's leg
/// on TCP; the conformance suite covers that).
fn trusted_apps() -> std::collections::BTreeMap<String, String> {
    [(
        "meshaccel.io/app-sockets".to_string(),
        "trusted".to_string(),
    )]
    .into()
}

/// `Tcp: ... OutSegs` of /proc/net/snmp.
fn out_segs(snmp: &str) -> u64 {
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0], tcp[1]);
    let i = names
        .split_whitespace()
        .position(|n| n == "OutSegs")
        .expect("OutSegs in /proc/net/snmp");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
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

    let (_server_pod, client_pod, server_ip) = node.deploy_pair(&[]);
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
    wait_for(
        &node.cluster,
        "both workloads enabled in the agent's status",
        Duration::from_secs(60),
        || {
            let st = node.status()?;
            let on = |p| node.workload(&st, p).is_some_and(|w| w["enabled"] == true);
            Ok((on("server") && on("client")).then_some(()))
        },
    );
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
    let new_client = wait_for(
        &node.cluster,
        "the opted-out client pod",
        Duration::from_secs(120),
        || {
            let (pod, _) = node.running_pod("client");
            Ok((pod != client_pod).then_some(pod))
        },
    );
    wait_for(
        &node.cluster,
        "the opted-out client leaves the agent's status",
        Duration::from_secs(60),
        || {
            let st = node.status()?;
            Ok(node
                .workload(&st, "client")
                .is_none_or(|w| w["enabled"] == false)
                .then_some(()))
        },
    );
    let out = node.pingpong(&new_client, server_ip, 500);
    assert!(
        out >= 2.0,
        "opted-out pod: {out:.2} segments per round trip, expected TCP's"
    );
}

impl MeshNode {
    /// A long ping-pong from the client pod, in the background (`kubectl exec`).
    fn background_pingpong(
        &self,
        client_pod: &str,
        server_ip: Ipv4Addr,
        count: usize,
    ) -> std::process::Child {
        self.cluster
            .kubectl_command()
            .args([
                "exec",
                "-n",
                &self.mesh_ns,
                client_pod,
                "-c",
                "app",
                "--",
                TOOL,
                "pingpong",
                "--connect",
                &format!("{server_ip}:{ECHO_PORT}"),
                "--count",
                &count.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl exec pingpong")
    }

    /// The agent container's containerd id and restart count.
    fn agent_container(&self) -> (String, u64) {
        let pod = self.agent_pod();
        let out = self
            .cluster
            .kubectl(&[
                "get", "pod", "-n", &self.system_ns, &pod,
                "-o", "jsonpath={.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}",
            ])
            .unwrap();
        let (id, restarts) = out.trim().split_once(' ').unwrap();
        (
            id.trim_start_matches("containerd://").to_string(),
            restarts.parse().unwrap(),
        )
    }

    /// IDs of the programs attached to the node's cgroup v2 root (sock_ops).
    fn attached_programs(&self) -> Vec<u64> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show", "/sys/fs/cgroup/unified"])
            .output()
            .expect("bpftool (Debian bpftool)");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("meshaccel"))
            })
            .filter_map(|p| p["id"].as_u64())
            .collect()
    }

    fn enabled_pair(&self) -> (String, Ipv4Addr) {
        let (_server, client, server_ip) = self.deploy_pair(&[]);
        self.cluster
            .kubectl(&[
                "label",
                "namespace",
                &self.mesh_ns,
                "meshaccel.io/enabled=true",
            ])
            .unwrap();
        wait_for(
            &self.cluster,
            "both workloads enabled",
            Duration::from_secs(60),
            || {
                let st = self.status()?;
                let on = |p| self.workload(&st, p).is_some_and(|w| w["enabled"] == true);
                Ok((on("server") && on("client")).then_some(()))
            },
        );
        (client, server_ip)
    }
}

fn finished_ok(child: std::process::Child, what: &str) -> String {
    let out = meshaccel_e2e::wait_output_timeout(child, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_killed_agent_and_an_upgrade_lose_no_request() {
    let node = MeshNode::start();
    node.helm_install("install", &node.tag, &[]);
    let (client, server_ip) = node.enabled_pair();
    let programs = node.attached_programs();
    assert!(
        !programs.is_empty(),
        "no meshaccel program attached to the cgroup v2 root"
    );

    // The agent container killed under load: the kubelet restarts it, the accelerated
    // connection goes on, not one round trip fails.
    let load = node.background_pingpong(&client, server_ip, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    let (id, restarts) = node.agent_container();
    node.cluster
        .ctr(&["tasks", "kill", "-s", "SIGKILL", &id])
        .expect("killing the agent");
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
    let on = node.pingpong(&client, server_ip, 1000);
    assert!(
        on < 0.05,
        "after the upgrade: {on:.3} segments per round trip"
    );
}

#[test]
fn helm_uninstall_runs_the_hook_on_the_node_and_leaves_nothing_attached() {
    let node = MeshNode::start();
    node.helm_install("install", &node.tag, &[]);
    let (client, server_ip) = node.enabled_pair();
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
    let off = node.pingpong(&client, server_ip, 500);
    assert!(
        off >= 2.0,
        "after uninstall: {off:.2} segments per round trip, expected TCP's"
    );

    // Installing again works: new connections are accelerated again.
    node.helm_install("install", &node.tag, &[]);
    wait_for(
        &node.cluster,
        "workloads enabled after reinstall",
        Duration::from_secs(90),
        || {
            let st = node.status()?;
            Ok(node
                .workload(&st, "client")
                .is_some_and(|w| w["enabled"] == true)
                .then_some(()))
        },
    );
    let on = node.pingpong(&client, server_ip, 1000);
    assert!(
        on < 0.05,
        "after reinstall: {on:.3} segments per round trip"
    );
}

/// Every file below `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walkdir(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
