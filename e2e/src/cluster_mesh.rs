//! meshaccel installed with its Helm chart on the single-node cluster ([`crate::cluster`]) next
//! to Istio-injected workloads ([`crate::injected`]), as a user installs it: images built from
//! the project's Dockerfiles and imported, `helm install` with image values (plus the run's bpffs,
//! istiod's stand-in address and a kubectl image for the uninstall hook, which this machine
//! needs), the project's ADS server over TLS standing in for istiod. For the cluster tests and
//! the cluster benchmark; failures panic with the node's diagnostics.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    ads::{AdsOptions, AdsServer, Resources},
    cluster::{Cluster, KUBECTL_IMAGE},
    envoy::{self, Pki, SidecarSpec, envoy_binary},
    image::{BuildRequest, build},
    injected::{TOOL, Workload},
    workspace_bin,
};

/// Polls `f` until it returns `Some` or `timeout` passes; on timeout panics with the last error
/// and the node's diagnostics.
pub fn wait_for<T>(
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

pub const RELEASE: &str = "meshaccel";
pub const AGENT_IMAGE: &str = "meshaccel.local/meshaccel";
pub const PROXY_IMAGE: &str = "meshaccel.local/proxy";
pub const APP_IMAGE: &str = "meshaccel.local/app";
/// The echo server's port in the server workload.
pub const ECHO_PORT: u16 = 8080;

/// A node with meshaccel's chart installed, istiod's stand-in (the project's ADS server, TLS)
/// and a mesh namespace with an echo server and a client workload.
pub struct MeshNode {
    pub cluster: Cluster,
    pub pki: Pki,
    pub ads: AdsServer,
    _pki_dir: tempfile::TempDir,
    /// The release's namespace and the mesh workloads' namespace (names of the run).
    pub system_ns: String,
    pub mesh_ns: String,
    pub tag: String,
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the three images from their Dockerfiles (cached) and imports them into the node.
pub fn build_images(cluster: &Cluster, tag: &str) {
    let out = cluster.dir().join("images");
    std::fs::create_dir_all(&out).unwrap();
    let meshaccel = workspace_bin("meshaccel");
    let tool = workspace_bin("meshaccel-e2e-tool");
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
    pub fn start() -> MeshNode {
        crate::require_root();
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

    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(crate::helm_binary());
        cmd.env("KUBECONFIG", self.cluster.api().admin_kubeconfig());
        cmd
    }

    /// The chart's values as a user sets them (the image) plus the three this machine needs:
    /// the run's bpffs, istiod's stand-in address, a kubectl image for the uninstall hook (there
    /// is no registry); as `--set` arguments for helm.
    pub fn chart_values(&self, tag: &str) -> Vec<String> {
        [
            format!("image.repository={AGENT_IMAGE}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".into(),
            format!("uninstallHook.kubectlImage={KUBECTL_IMAGE}"),
            format!("hostPaths.bpffs={}", self.cluster.bpffs().display()),
            format!(
                "istiod.address={}:{}",
                self.cluster.network().gateway,
                self.ads.addr().port()
            ),
        ]
        .into_iter()
        .flat_map(|v| ["--set".to_string(), v])
        .collect()
    }

    /// `helm install|upgrade` of the chart with [`MeshNode::chart_values`]; `extra` are
    /// `--set-string`s.
    pub fn helm_install(&self, verb: &str, tag: &str, extra: &[&str]) {
        let mut cmd = self.helm();
        cmd.args([verb, RELEASE])
            .arg(repo().join("charts/meshaccel"))
            .args(["-n", &self.system_ns])
            .args(self.chart_values(tag))
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
    pub fn agent_pod(&self) -> String {
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

    /// The agent pod's address on the pod network.
    pub fn agent_ip(&self) -> anyhow::Result<Ipv4Addr> {
        let pod = self.agent_pod();
        Ok(self
            .cluster
            .kubectl(&[
                "get",
                "pod",
                "-n",
                &self.system_ns,
                &pod,
                "-o",
                "jsonpath={.status.podIP}",
            ])?
            .trim()
            .parse()?)
    }

    /// `meshaccel status -o json` inside the agent pod.
    pub fn status(&self) -> anyhow::Result<Value> {
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
    pub fn workload(&self, status: &Value, prefix: &str) -> Option<Value> {
        let want = format!("{}/{prefix}", self.mesh_ns);
        status["by_workload"]
            .as_array()?
            .iter()
            .find(|w| w["name"].as_str().is_some_and(|n| n.starts_with(&want)))
            .cloned()
    }

    pub fn deploy(&self, w: &Workload) {
        let list = w.manifests(&self.pki).expect("manifests");
        self.cluster
            .apply(&list.to_string())
            .expect("kubectl apply");
    }

    /// Waits for the workload's pod to run and returns (pod name, pod IP).
    pub fn running_pod(&self, app: &str) -> (String, Ipv4Addr) {
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
    pub fn deploy_pair(&self, client_labels: &[(&str, &str)]) -> (String, String, Ipv4Addr) {
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

    pub fn client_workload(&self, server_ip: Ipv4Addr, labels: &[(&str, &str)]) -> Workload {
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

    pub fn proxy_image(&self) -> String {
        format!("{PROXY_IMAGE}:{}", self.tag)
    }

    pub fn app_image(&self) -> String {
        format!("{APP_IMAGE}:{}", self.tag)
    }

    /// `kubectl exec` into the app container of mesh pod `pod`, up to the command.
    fn in_app<'a>(&'a self, pod: &'a str) -> [&'a str; 7] {
        ["exec", "-n", &self.mesh_ns, pod, "-c", "app", "--"]
    }

    /// Round trips from the client pod's app container to the echo server through both
    /// sidecars; returns the client pod's TCP segments sent per round trip.
    pub fn pingpong(&self, client_pod: &str, server_ip: Ipv4Addr, count: usize) -> f64 {
        let segs = || -> u64 {
            let snmp = self
                .cluster
                .kubectl(&[&self.in_app(client_pod)[..], &["cat", "/proc/net/snmp"]].concat())
                .expect("reading the client pod's /proc/net/snmp");
            out_segs(&snmp)
        };
        let before = segs();
        let out = crate::wait_output_timeout(
            self.pingpong_command(client_pod, server_ip, count)
                .spawn()
                .expect("kubectl exec pingpong"),
            Duration::from_secs(180),
        )
        .and_then(|o| {
            anyhow::ensure!(
                o.status.success(),
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        });
        let out = out.unwrap_or_else(|e| panic!("pingpong through the sidecars: {e:#}"));
        assert!(!out.is_empty(), "pingpong printed nothing");
        let after = segs();
        (after - before) as f64 / count as f64
    }
}

pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";
/// The chart's metrics/probe port.
pub const AGENT_METRICS_PORT: u16 = 9880;

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nAccept: */*\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status line from {addr}: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

/// The tool reads only without blocking (`sock::read_ready`), so its workloads are declared
/// trusted and their app legs are accelerated too (the default, auto, keeps a blocking app's leg
/// on TCP; the conformance suite covers that).
pub fn trusted_apps() -> std::collections::BTreeMap<String, String> {
    [(
        "meshaccel.io/app-sockets".to_string(),
        "trusted".to_string(),
    )]
    .into()
}

/// `Tcp: ... OutSegs` of /proc/net/snmp.
pub fn out_segs(snmp: &str) -> u64 {
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0], tcp[1]);
    let i = names
        .split_whitespace()
        .position(|n| n == "OutSegs")
        .expect("OutSegs in /proc/net/snmp");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

impl MeshNode {
    /// A long ping-pong from the client pod, in the background (`kubectl exec`).
    pub fn background_pingpong(
        &self,
        client_pod: &str,
        server_ip: Ipv4Addr,
        count: usize,
    ) -> std::process::Child {
        self.pingpong_command(client_pod, server_ip, count)
            .spawn()
            .expect("kubectl exec pingpong")
    }

    /// `kubectl exec` of `count` round trips from the client pod's app container to the echo
    /// server, through both sidecars; output piped.
    fn pingpong_command(&self, client_pod: &str, server_ip: Ipv4Addr, count: usize) -> Command {
        let mut cmd = self.cluster.kubectl_command();
        cmd.args(self.in_app(client_pod))
            .arg(TOOL)
            .args(["pingpong", "--connect", &format!("{server_ip}:{ECHO_PORT}")])
            .args(["--count", &count.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    /// New connections from the client are accelerated: ~0 TCP segments per round trip
    /// (1,000 round trips; TCP is 3).
    pub fn assert_accelerated(&self, client_pod: &str, server_ip: Ipv4Addr, when: &str) {
        let segs = self.pingpong(client_pod, server_ip, 1000);
        assert!(
            segs < 0.05,
            "{when}: {segs:.3} TCP segments per round trip, expected ~0 (accelerated)"
        );
    }

    /// New connections from the client run on plain TCP (500 round trips).
    pub fn assert_tcp(&self, client_pod: &str, server_ip: Ipv4Addr, when: &str) {
        let segs = self.pingpong(client_pod, server_ip, 500);
        assert!(
            segs >= 2.0,
            "{when}: {segs:.2} TCP segments per round trip, expected TCP's (3)"
        );
    }

    /// The agent container's containerd id and restart count.
    pub fn agent_container(&self) -> (String, u64) {
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

    /// SIGKILLs the agent container through containerd (as a crash would); returns its restart
    /// count before.
    pub fn kill_agent(&self) -> u64 {
        let (id, restarts) = self.agent_container();
        self.cluster
            .ctr(&["tasks", "kill", "-s", "SIGKILL", &id])
            .expect("killing the agent");
        restarts
    }

    /// IDs of the programs attached to the node's cgroup v2 root (sock_ops).
    pub fn attached_programs(&self) -> Vec<u64> {
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

    /// Waits until the agent's status shows the workload `<mesh ns>/<prefix>…` enabled (`want`)
    /// or not (absent, or disabled).
    pub fn wait_enabled(&self, prefix: &str, want: bool) {
        wait_for(
            &self.cluster,
            &format!("{prefix} enabled={want} in the agent's status"),
            Duration::from_secs(60),
            || {
                let st = self.status()?;
                let on = self
                    .workload(&st, prefix)
                    .is_some_and(|w| w["enabled"] == true);
                Ok((on == want).then_some(()))
            },
        );
    }

    /// Waits for an Event with `reason` on pod `ns`/`pod` whose message contains `needle`;
    /// returns the messages.
    pub fn event_on(&self, ns: &str, pod: &str, reason: &str, needle: &str) -> String {
        wait_for(
            &self.cluster,
            &format!("an Event {reason} on {ns}/{pod} naming {needle}"),
            Duration::from_secs(60),
            || {
                let out = self.cluster.kubectl(&[
                    "get",
                    "events",
                    "-n",
                    ns,
                    "--field-selector",
                    &format!("involvedObject.name={pod},reason={reason}"),
                    "-o",
                    "jsonpath={.items[*].message}",
                ])?;
                Ok(out.contains(needle).then_some(out))
            },
        )
    }

    /// Waits for the Running pod of `app` that replaces `old` (a rollout, a deletion).
    pub fn replacement_pod(&self, app: &str, old: &str) -> String {
        wait_for(
            &self.cluster,
            &format!("the pod replacing {old}"),
            Duration::from_secs(120),
            || {
                let (pod, _) = self.running_pod(app);
                Ok((pod != old).then_some(pod))
            },
        )
    }

    /// A node with the chart installed and the pair deployed in a labelled namespace, its
    /// workloads enabled: (node, client pod, server IP).
    pub fn installed_with_pair() -> (MeshNode, String, Ipv4Addr) {
        let node = MeshNode::start();
        node.helm_install("install", &node.tag, &[]);
        let (client, server_ip) = node.enabled_pair();
        (node, client, server_ip)
    }

    pub fn enabled_pair(&self) -> (String, Ipv4Addr) {
        let (_server, client, server_ip) = self.deploy_pair(&[]);
        self.cluster
            .kubectl(&[
                "label",
                "namespace",
                &self.mesh_ns,
                "meshaccel.io/enabled=true",
            ])
            .unwrap();
        self.wait_enabled("server", true);
        self.wait_enabled("client", true);
        (client, server_ip)
    }
}

pub fn finished_ok(child: std::process::Child, what: &str) -> String {
    let out = crate::wait_output_timeout(child, Duration::from_secs(180))
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

/// Every file below `dir`.
pub fn walkdir(dir: &Path) -> Vec<PathBuf> {
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
