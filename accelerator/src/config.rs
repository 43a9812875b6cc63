//! The command line's options, turned once into what the agent and its sources run with.
//!
//! Options that several subcommands take are one small `clap::Args` each ([`Bpffs`],
//! [`StateDir`], [`Cgroup`]), flattened where they are used, so they are named, documented and
//! defaulted once.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use istio_integration::xds::{AdsConfig, NodeIdentity};

use crate::{
    dataplane::InstallOptions,
    desired::Tuning,
    install_gate,
    queue_limit::{self, QueueLimit},
    sources::{
        Source,
        kube::{self, KubeOptions, OptInLabel, events::PodRef},
    },
    state_files,
};

#[derive(clap::Args, Clone, Debug)]
pub struct Bpffs {
    /// bpffs folder for meshaccel's pins (the agent mounts a bpffs there if none).
    #[arg(long, env = "MESHACCEL_BPFFS", default_value = "/sys/fs/bpf/meshaccel")]
    pub bpffs: PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct StateDir {
    /// The agent's run folder for its state files (workload names for `status`; `uninstall`
    /// removes them; not a bpffs).
    #[arg(long, env = "MESHACCEL_STATE_DIR", default_value = state_files::DEFAULT_DIR)]
    pub state_dir: PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Cgroup {
    /// cgroup v2 folder the agent attaches sock_ops to (default: the cgroup v2 root from
    /// /proc/mounts).
    #[arg(long, env = "MESHACCEL_CGROUP")]
    pub cgroup: Option<PathBuf>,
}

/// The flags of `meshaccel agent`.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub cgroup: Cgroup,
    #[command(flatten)]
    pub bpffs: Bpffs,
    /// Static workloads file (YAML); re-read when it changes and on SIGHUP.
    #[arg(long, env = "MESHACCEL_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// How often to check the workloads file for changes, in milliseconds.
    #[arg(long, env = "MESHACCEL_POLL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_ms: u64,
    /// How often to re-resolve and re-apply the whole state, in seconds.
    #[arg(long, env = "MESHACCEL_RESYNC_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub resync_secs: u64,
    /// Sockets the sockhash can hold when the agent creates it (two per accelerated
    /// connection), 2 to 1048576 (default 65536); when it is full, new connections stay on
    /// TCP. The PEERS hash is created with the same capacity (preallocated: measured on 6.18, the
    /// maps take 156 MiB of kernel memory at 1048576, 42 MiB at 262144; `status` and /metrics
    /// show each map's). Pinned
    /// maps keep theirs.
    #[arg(long, env = "MESHACCEL_SOCKHASH_CAPACITY", value_name = "SOCKETS", value_parser = parse_sockhash_capacity)]
    pub sockhash_capacity: Option<u32>,
    /// Replace the pinned programs with this binary's even if they look the same (an upgrade
    /// always replaces them; pinned maps and every socket's state stay).
    #[arg(long, env = "MESHACCEL_REPLACE_PROGRAMS")]
    pub replace_programs: bool,
    /// The installation this agent belongs to. `meshaccel uninstall` records the installed
    /// generation as uninstalled on the node; an agent of that generation (a restart by its
    /// supervisor) then never installs again. A new install uses a new generation (the Helm
    /// chart renders one per install and upgrade).
    #[arg(long, env = "MESHACCEL_INSTALL_GENERATION", default_value = install_gate::DEFAULT_GENERATION, value_parser = install_gate::check_generation)]
    pub install_generation: String,
    /// Bytes a receiving socket may hold unread before its sender moves to TCP until the
    /// reader has caught up (the kernel bounds no sk_msg ingress queue: without a limit a
    /// stalled reader lets its sender fill the host's TCP memory). `auto`: the most one TCP
    /// receive queue may hold on this node (net.ipv4.tcp_rmem's maximum; for bulk transfers).
    /// 0: no limit.
    #[arg(long, env = "MESHACCEL_MAX_UNREAD_BYTES", default_value_t = QueueLimit::Bytes(meshaccel_common::tuning::QUEUE_LIMIT), value_parser = queue_limit::parse)]
    pub max_unread_bytes: QueueLimit,
    /// TCP keepalive idle time (seconds) for accelerated sockets that have none of their own.
    /// Their bytes bypass TCP, and the kernel drops a RST that reaches a busy socket holding
    /// more unread than its backlog limit (it is never retransmitted): the keepalive probe
    /// draws a new one, so a connection whose peer is gone ends. 0: none.
    #[arg(long, env = "MESHACCEL_KEEPALIVE_SECS", default_value_t = meshaccel_common::tuning::KEEPALIVE_SECS, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub keepalive_secs: u32,
    /// How long (seconds) a service keeps new connections on plain TCP after one of its
    /// connections streamed small writes (under 1 KiB) faster than its reader read them: the
    /// kernel's redirect moves such a stream one message at a time, TCP coalesces it and
    /// moves more bytes. The connection that showed it goes on redirecting. 0: never.
    #[arg(long, env = "MESHACCEL_SMALL_WRITE_SECS", default_value_t = meshaccel_common::tuning::SMALL_WRITE_SECS, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub small_write_secs: u32,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9880
    /// (port 0 picks a free port; the state file records it). Off when not given.
    #[arg(long, env = "MESHACCEL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub state_dir: StateDir,
    /// This node's name: accelerate the mesh pods Kubernetes schedules here (pods watched with
    /// `spec.nodeName=NAME`; namespaces opt in with the label `meshaccel.io/enabled=true`).
    /// Uses the in-cluster service account unless --kubeconfig is given.
    #[arg(long, env = "MESHACCEL_NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig file for the Kubernetes API (default: in-cluster configuration).
    #[arg(long, env = "MESHACCEL_KUBECONFIG", requires = "node_name")]
    pub kubeconfig: Option<PathBuf>,
    /// The label key namespaces (and pods, to override) opt in with: `<key>=true`.
    #[arg(long, env = "MESHACCEL_OPT_IN_LABEL", default_value = kube::ENABLED_LABEL, value_parser = OptInLabel::parse)]
    pub opt_in_label: OptInLabel,
    /// The agent's own pod (the chart passes it from the downward API): the node-check and
    /// install-failure Events go there. All three or none; without them those findings are log
    /// lines only.
    #[arg(long, env = "MESHACCEL_POD_NAMESPACE", requires_all = ["pod_name", "pod_uid", "node_name"])]
    pub pod_namespace: Option<String>,
    #[arg(long, env = "MESHACCEL_POD_NAME", requires_all = ["pod_namespace", "pod_uid"])]
    pub pod_name: Option<String>,
    #[arg(long, env = "MESHACCEL_POD_UID", requires_all = ["pod_namespace", "pod_name"])]
    pub pod_uid: Option<String>,
    #[command(flatten)]
    pub istiod: IstiodArgs,
}

/// The largest `--sockhash-capacity`: a million sockets (half a million connections). The
/// PEERS hash of that capacity is preallocated (136 MiB of kernel memory on 6.18; all maps 156 MiB).
pub const MAX_SOCKHASH_CAPACITY: u32 = 1 << 20;

/// `--sockhash-capacity`: a whole number of sockets from 2 to [`MAX_SOCKHASH_CAPACITY`] (clap
/// prefixes the flag's name to the message).
pub fn parse_sockhash_capacity(s: &str) -> Result<u32, String> {
    let range = format!("the allowed range is 2..={MAX_SOCKHASH_CAPACITY} sockets");
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of sockets; {range}"))?;
    if !(2..=u64::from(MAX_SOCKHASH_CAPACITY)).contains(&n) {
        return Err(format!(
            "{n} is out of range: {range} (two per accelerated connection)"
        ));
    }
    Ok(n as u32)
}

/// Everything `meshaccel agent` runs with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    /// Where the agent's state files go (see [`crate::state_files`]).
    pub state_dir: PathBuf,
    /// The static workloads file, if any.
    pub workloads: Option<PathBuf>,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// How often everything is re-resolved and re-applied (netns paths can be recreated with a
    /// new namespace behind them; someone may have edited the maps).
    pub resync: Duration,
    /// Options for a fresh install (ignored when pinned maps are adopted).
    pub install: InstallOptions,
    pub tuning: Tuning,
    /// Where /metrics, /healthz and /readyz are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
    /// The Kubernetes source, when the agent has a node name.
    pub kube: Option<KubeOptions>,
    /// The xDS source, when the agent has istiod's address.
    pub xds: Option<AdsConfig>,
    /// The agent's own pod, for the Events about this node (with the Kubernetes source only).
    pub pod: Option<PodRef>,
    /// Why `--max-unread-bytes auto` fell back to 4 MiB, if it did (reported at start).
    pub queue_limit_warning: Option<String>,
}

impl AgentConfig {
    /// The sources the agent runs with: readiness waits for each.
    pub fn sources(&self) -> Vec<Source> {
        [
            (self.workloads.is_some(), Source::StaticFile),
            (self.kube.is_some(), Source::Kubernetes),
            (self.xds.is_some(), Source::Xds),
        ]
        .into_iter()
        .filter_map(|(on, s)| on.then_some(s))
        .collect()
    }
}

impl AgentArgs {
    pub fn config(self) -> anyhow::Result<AgentConfig> {
        let cgroup = match self.cgroup.cgroup {
            Some(c) => crate::cgroup::resolve(&c),
            None => crate::cgroup::cgroup2_root()
                .context("no cgroup v2 mount in /proc/mounts: mount one, or pass --cgroup")?,
        };
        let node_name = self.node_name;
        let (max_unread_bytes, queue_limit_warning) =
            queue_limit::resolve(self.max_unread_bytes, || {
                std::fs::read_to_string(queue_limit::TCP_RMEM)
            });
        Ok(AgentConfig {
            queue_limit_warning,
            cgroup,
            bpffs: self.bpffs.bpffs,
            state_dir: self.state_dir.state_dir,
            workloads: self.workloads,
            poll: Duration::from_millis(self.poll_ms),
            resync: Duration::from_secs(self.resync_secs),
            install: InstallOptions {
                sockhash_capacity: self.sockhash_capacity,
                replace_programs: self.replace_programs,
                generation: self.install_generation,
            },
            tuning: Tuning {
                max_unread_bytes,
                keepalive_secs: self.keepalive_secs,
                small_write_secs: self.small_write_secs,
            },
            metrics_addr: self.metrics_addr,
            kube: node_name.clone().map(|node| KubeOptions {
                opt_in_label: self.opt_in_label,
                ..KubeOptions::new(node, self.kubeconfig)
            }),
            xds: self.istiod.config(node_name.as_deref()),
            pod: match (self.pod_namespace, self.pod_name, self.pod_uid) {
                (Some(namespace), Some(name), Some(uid)) => Some(PodRef {
                    namespace,
                    name,
                    uid,
                }),
                _ => None,
            },
        })
    }
}

/// The `--istiod*` flags of `meshaccel agent`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct IstiodArgs {
    /// istiod's xDS address: learn Istio's capture ports, inbound passthrough addresses and mesh
    /// endpoints from it over ADS. `host:port` (plaintext, e.g. istiod.istio-system.svc:15010),
    /// or TLS with --istiod-ca-file (e.g. istiod.istio-system.svc:15012). Off when not given.
    #[arg(long = "istiod", env = "MESHACCEL_ISTIOD", value_name = "ADDR")]
    pub istiod: Option<String>,
    /// The mesh root CA certificate (PEM) that istiod's certificate is checked against;
    /// setting it makes the connection TLS (istiod's 15012).
    #[arg(long, env = "MESHACCEL_ISTIOD_CA_FILE", requires = "istiod")]
    pub istiod_ca_file: Option<PathBuf>,
    /// A bearer token file sent to istiod (a projected service account token with audience
    /// `istio-ca`, as sidecars use); re-read at every connect.
    #[arg(long, env = "MESHACCEL_ISTIOD_TOKEN_FILE", requires = "istiod")]
    pub istiod_token_file: Option<PathBuf>,
    /// The name istiod's TLS certificate must carry (default: the host of --istiod).
    #[arg(long, env = "MESHACCEL_ISTIOD_SERVER_NAME", requires = "istiod")]
    pub istiod_server_name: Option<String>,
    /// This node's IP as presented to istiod (default: the local address that routes to istiod).
    #[arg(long, env = "MESHACCEL_ISTIOD_NODE_IP")]
    pub istiod_node_ip: Option<IpAddr>,
    /// The agent's pod name, presented to istiod (default: meshaccel-<hostname>).
    #[arg(long, env = "MESHACCEL_ISTIOD_POD_NAME")]
    pub istiod_pod_name: Option<String>,
    /// The agent's namespace; on the TLS port istiod requires it to be the token's.
    #[arg(long, env = "MESHACCEL_ISTIOD_NAMESPACE", default_value = "meshaccel")]
    pub istiod_namespace: String,
    /// The agent's service account; on the TLS port istiod requires it to be the token's.
    #[arg(
        long,
        env = "MESHACCEL_ISTIOD_SERVICE_ACCOUNT",
        default_value = "meshaccel"
    )]
    pub istiod_service_account: String,
    /// Istio's cluster id (`CLUSTER_ID`).
    #[arg(
        long,
        env = "MESHACCEL_ISTIOD_CLUSTER_ID",
        default_value = "Kubernetes"
    )]
    pub istiod_cluster_id: String,
    /// The mesh's DNS domain and mesh id.
    #[arg(long, env = "MESHACCEL_ISTIOD_DOMAIN", default_value = "cluster.local")]
    pub istiod_domain: String,
    /// The Istio version claimed to istiod (it gates features on the proxy's version).
    #[arg(long, env = "MESHACCEL_ISTIOD_ISTIO_VERSION", default_value = "1.30.0")]
    pub istiod_istio_version: String,
    /// Longest wait between reconnect attempts, in milliseconds (exponential backoff with
    /// jitter from 200 ms).
    #[arg(long, env = "MESHACCEL_ISTIOD_BACKOFF_MAX_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub istiod_backoff_max_ms: u64,
    /// Largest xDS response accepted, in MiB.
    #[arg(long, env = "MESHACCEL_ISTIOD_MAX_MESSAGE_MB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..=2048))]
    pub istiod_max_message_mb: u64,
}

impl IstiodArgs {
    /// The client configuration, or `None` without `--istiod`. `node_name`: `--node-name`
    /// (the chart passes the pod's node), else this host's name.
    fn config(&self, node_name: Option<&str>) -> Option<AdsConfig> {
        let addr = self.istiod.clone()?;
        let node_name = node_name.map_or_else(hostname, String::from);
        let node = NodeIdentity {
            ip: self
                .istiod_node_ip
                .or_else(|| local_ip_towards(&addr))
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            name: self
                .istiod_pod_name
                .clone()
                .unwrap_or_else(|| format!("meshaccel-{node_name}")),
            namespace: self.istiod_namespace.clone(),
            service_account: self.istiod_service_account.clone(),
            node_name,
            cluster_id: self.istiod_cluster_id.clone(),
            domain: self.istiod_domain.clone(),
            istio_version: self.istiod_istio_version.clone(),
        };
        let mut cfg = AdsConfig::new(addr.clone(), node);
        cfg.ca_file = self.istiod_ca_file.clone();
        cfg.token_file = self.istiod_token_file.clone();
        cfg.server_name = self
            .istiod_server_name
            .clone()
            .or_else(|| cfg.ca_file.as_ref().map(|_| host_of(&addr).to_string()));
        cfg.backoff_max = Duration::from_millis(self.istiod_backoff_max_ms);
        cfg.max_message_bytes = (self.istiod_max_message_mb as usize) << 20;
        Some(cfg)
    }
}

fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
    }
}

/// The local address the kernel would use to reach `addr` (no packet is sent).
fn local_ip_towards(addr: &str) -> Option<IpAddr> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let target = hostport.to_socket_addrs().ok()?.next()?;
    let sock = UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiods_host_and_the_local_ip_towards_it() {
        assert_eq!(
            host_of("istiod.istio-system.svc:15012"),
            "istiod.istio-system.svc"
        );
        assert_eq!(host_of("https://istiod:15012"), "istiod");
        assert_eq!(host_of("[::1]:15010"), "::1");
        assert_eq!(
            local_ip_towards("127.0.0.1:15010"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    /// `meshaccel agent --cgroup <v2 mount> ARGS`, parsed as the binary parses it.
    fn parse_agent(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        use clap::Parser as _;
        Cli::try_parse_from([&["agent", "--cgroup", "/sys/fs/cgroup/unified"], args].concat())
            .map(|c| c.agent)
    }

    /// The node istiod is told about is `--node-name` (the chart passes the pod's node), not
    /// this host's name, which in a pod is the pod's.
    #[test]
    fn istiod_hears_the_node_name_flag() {
        let cfg = |args: &[&str]| parse_agent(args).expect("flags").config().expect("config");
        let with = cfg(&["--node-name", "node-7", "--istiod", "127.0.0.1:15010"]);
        let ads = with.xds.expect("xds on");
        assert_eq!(ads.node.node_name, "node-7");
        assert_eq!(ads.node.name, "meshaccel-node-7");
        assert_eq!(with.kube.expect("kube on").node_name, "node-7");
        let without = cfg(&["--istiod", "127.0.0.1:15010"]);
        assert_eq!(without.xds.expect("xds on").node.node_name, hostname());
        assert!(without.kube.is_none());
    }

    #[test]
    fn sockhash_capacity_up_to_a_million_with_the_range_named() {
        let parse = |v: &str| {
            parse_agent(&[&format!("--sockhash-capacity={v}")])
                .map(|a| a.sockhash_capacity)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("2"), Ok(Some(2)));
        assert_eq!(parse("1048576"), Ok(Some(1_048_576)));
        for bad in ["1", "1048577", "16777216", "-5", "lots", "1e6"] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("--sockhash-capacity"), "{bad}: {e}");
            assert!(e.contains("2..=1048576"), "{bad}: {e}");
        }
    }

    /// The agent's own pod: all three flags (with a node name) or none; a partial set is an
    /// error naming what is missing, not Events silently going nowhere.
    #[test]
    fn the_agents_pod_is_all_three_flags_or_none() {
        let parse = parse_agent;
        let pod = [
            "--node-name",
            "n",
            "--pod-namespace",
            "ms",
            "--pod-name",
            "p",
            "--pod-uid",
            "u",
        ];
        let cfg = parse(&pod).expect("flags").config().expect("config");
        assert_eq!(
            cfg.pod,
            Some(PodRef {
                namespace: "ms".into(),
                name: "p".into(),
                uid: "u".into()
            })
        );
        let err = parse(&pod[..6]).expect_err("no --pod-uid").to_string();
        assert!(err.contains("--pod-uid"), "{err}");
        let err = parse(&pod[2..]).expect_err("no --node-name").to_string();
        assert!(err.contains("--node-name"), "{err}");
        let none = parse(&[]).expect("flags").config().expect("config");
        assert_eq!(none.pod, None);
    }
}
