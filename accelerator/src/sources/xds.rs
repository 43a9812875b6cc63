//! The agent's xDS source: an ADS stream to istiod (`--istiod`, see
//! [`istio_integration::xds::client`]) whose last good snapshot is this source's contribution
//! ([`crate::agent::SourceState::xds`]), merged into the capture configuration by
//! [`Capture::apply_xds`](crate::workloads::Capture::apply_xds):
//! Istio's ports and passthrough addresses come from xDS once istiod answered, and from the
//! workloads file (or Istio's defaults) until then. What it knows goes to its status file
//! ([`crate::state_files::XdsStatus`]), which `meshaccel status` shows.
use std::{
    net::{IpAddr, Ipv4Addr, ToSocketAddrs as _, UdpSocket},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use istio_integration::xds::{AdsConfig, AdsEvent, NodeIdentity, client};

use crate::{agent::Shared, sources::Source, state_files::XdsStatus};

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

impl IstiodArgs {
    /// The client configuration, or `None` without `--istiod`.
    pub fn config(&self) -> Option<AdsConfig> {
        let addr = self.istiod.clone()?;
        let node_name = std::env::var("MESHACCEL_NODE_NAME").unwrap_or_else(|_| hostname());
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

/// Runs the xDS source forever: every accepted snapshot becomes this source's contribution
/// (which wakes the reconciler); the status file follows every event.
pub async fn run(cfg: AdsConfig, shared: Arc<Shared>, status_file: PathBuf) {
    let mut st = XdsStatus {
        istiod: cfg.addr.clone(),
        node_id: cfg.node.node_id(),
        ..Default::default()
    };
    st.write(&status_file);
    client::run(cfg, move |e| {
        match e {
            AdsEvent::Connected => {
                st.connected = true;
            }
            AdsEvent::Snapshot(s) => {
                st.snapshot = Some(s.clone());
                shared.update(|src| src.xds = Some(s));
                shared.source_synced(Source::Xds, true);
            }
            AdsEvent::Rejected { error, .. } => {
                st.rejected += 1;
                st.last_rejection = Some(error);
                shared.source_error(Source::Xds);
            }
            AdsEvent::Disconnected { error, .. } => {
                // The last good state stays in force; readiness says istiod is away.
                shared.source_error(Source::Xds);
                shared.source_synced(Source::Xds, false);
                st.connected = false;
                st.disconnects += 1;
                st.last_error = Some(error);
            }
        }
        st.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        st.write(&status_file);
    })
    .await;
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
}
