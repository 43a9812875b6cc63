//! The ADS client: one aggregated stream to istiod, state of the world (SotW) for listeners,
//! clusters and endpoints.
//!
//! Istio's own sidecars use the incremental (delta) variant (`DELTA_GRPC` in the bootstrap);
//! istiod serves both on the same port, and the SotW variant is what this client speaks: it needs
//! only the three types, and a full LDS/CDS response at every change is small next to the Envoy
//! configuration istiod pushes to every sidecar anyway.
//!
//! The protocol part is [`AdsState`] (no I/O, unit-tested): it turns responses into ACKs/NACKs
//! and subscriptions, and keeps the last accepted state of each type. A response that any
//! resource of makes unusable is rejected whole (NACK with an `error_detail` naming the resource;
//! the previous state of that type stays). [`run`] drives it over gRPC, reconnecting with capped
//! exponential backoff with jitter; the state survives reconnects, so the last good snapshot stays
//! while istiod is away, and the first requests of a new stream carry the accepted versions.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{
    error::{ClientError, TranslateError},
    node::NodeIdentity,
    translate::{self, ClusterPart, ListenerPart, XdsSnapshot, XdsVersions},
    typed::{self, TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_LISTENER},
};

/// gRPC status code INVALID_ARGUMENT, used in NACKs (as Envoy does).
const INVALID_ARGUMENT: i32 = 3;

/// The accepted state of one stream's resources, and the protocol bookkeeping.
#[derive(Clone, Debug, Default)]
pub struct AdsState {
    listeners: Option<(String, ListenerPart)>,
    clusters: Option<(String, ClusterPart)>,
    /// Mesh endpoints per EDS name, of the accepted EDS responses.
    eds: BTreeMap<String, BTreeSet<IpAddr>>,
    eds_version: String,
    /// Names the current EDS subscription asks for.
    eds_names: Vec<String>,
    /// Last nonce per type on the current stream.
    nonces: BTreeMap<String, String>,
}

/// What one response led to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests to send, in order (the ACK/NACK first).
    pub requests: Vec<DiscoveryRequest>,
    /// The snapshot changed (it exists once listeners and clusters were accepted).
    pub changed: bool,
    /// Why the response was rejected (sent as the NACK's error detail).
    pub rejected: Option<TranslateError>,
}

impl AdsState {
    /// The snapshot of the accepted state, once both listeners and clusters were accepted.
    pub fn snapshot(&self) -> Option<XdsSnapshot> {
        let (lv, l) = self.listeners.as_ref()?;
        let (cv, c) = self.clusters.as_ref()?;
        Some(translate::snapshot(
            l,
            c,
            &self.eds,
            XdsVersions {
                listeners: lv.clone(),
                clusters: cv.clone(),
                endpoints: self.eds_version.clone(),
            },
        ))
    }

    fn accepted_version(&self, type_url: &str) -> String {
        match type_url {
            TYPE_LISTENER => self.listeners.as_ref().map(|l| l.0.clone()),
            TYPE_CLUSTER => self.clusters.as_ref().map(|c| c.0.clone()),
            TYPE_ENDPOINTS => Some(self.eds_version.clone()),
            _ => None,
        }
        .unwrap_or_default()
    }

    fn request(&self, type_url: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: self.accepted_version(type_url),
            type_url: type_url.to_string(),
            resource_names: if type_url == TYPE_ENDPOINTS {
                self.eds_names.clone()
            } else {
                Vec::new()
            },
            response_nonce: self.nonces.get(type_url).cloned().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The first requests of a new stream: clusters (and the endpoints of the known EDS
    /// clusters), then listeners, as Envoy orders them; `node` goes with the first only. They
    /// carry the versions accepted on earlier streams.
    pub fn start_stream(&mut self, node: Node) -> Vec<DiscoveryRequest> {
        self.nonces.clear();
        let mut out = vec![self.request(TYPE_CLUSTER)];
        if !self.eds_names.is_empty() {
            out.push(self.request(TYPE_ENDPOINTS));
        }
        out.push(self.request(TYPE_LISTENER));
        out[0].node = Some(node);
        out
    }

    /// Handles one response: validate, accept or reject, ACK or NACK, update the EDS
    /// subscription when the clusters changed.
    pub fn on_response(&mut self, resp: &DiscoveryResponse) -> Outcome {
        let before = self.snapshot();
        let ty = resp.type_url.as_str();
        self.nonces.insert(ty.to_string(), resp.nonce.clone());
        let mut out = Outcome::default();
        let result = match ty {
            TYPE_LISTENER => typed::decode_listeners(&resp.resources)
                .and_then(|f| translate::listeners(&f))
                .map(|p| self.listeners = Some((resp.version_info.clone(), p))),
            TYPE_CLUSTER => typed::decode_clusters(&resp.resources)
                .and_then(|f| translate::clusters(&f))
                .map(|p| self.clusters = Some((resp.version_info.clone(), p))),
            TYPE_ENDPOINTS => typed::decode_endpoints(&resp.resources)
                .and_then(|f| translate::endpoints_all(&f))
                .map(|m| {
                    // SotW EDS responses may carry only the changed assignments.
                    self.eds.extend(m);
                    let names = &self.eds_names;
                    self.eds.retain(|k, _| names.contains(k));
                    self.eds_version = resp.version_info.clone();
                }),
            // Not subscribed: ACK, ignore.
            _ => Ok(()),
        };
        let mut ack = self.request(ty);
        if ty != TYPE_LISTENER && ty != TYPE_CLUSTER && ty != TYPE_ENDPOINTS {
            ack.version_info = resp.version_info.clone();
        }
        if let Err(e) = result {
            ack.error_detail = Some(RpcStatus {
                code: INVALID_ARGUMENT,
                message: e.to_string(),
                details: Vec::new(),
            });
            out.rejected = Some(e);
        }
        out.requests.push(ack);
        if ty == TYPE_CLUSTER && out.rejected.is_none() {
            let names = self
                .clusters
                .as_ref()
                .map(|c| c.1.eds_names.clone())
                .unwrap_or_default();
            if names != self.eds_names {
                self.eds_names = names;
                self.eds.retain(|k, _| self.eds_names.contains(k));
                out.requests.push(self.request(TYPE_ENDPOINTS));
            }
        }
        out.changed = self.snapshot() != before;
        out
    }
}

/// How to reach istiod, and as whom.
#[derive(Clone, Debug)]
pub struct AdsConfig {
    /// `host:port` or a URL (`http://…` plaintext, `https://…` TLS).
    pub addr: String,
    /// The mesh root CA certificate: TLS (istiod's 15012) when set.
    pub ca_file: Option<PathBuf>,
    /// The name istiod's certificate is checked against (default: the host of `addr`; istiod's
    /// certificate names `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    /// A bearer token file, re-read at every connect (a projected service account token with
    /// audience `istio-ca`, as the sidecars' `istio-token`).
    pub token_file: Option<PathBuf>,
    pub node: NodeIdentity,
    /// Backoff between attempts: `initial`, doubling up to `max`, each with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Largest response accepted (tonic's default of 4 MiB is too small for large meshes).
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
}

impl AdsConfig {
    pub fn new(addr: impl Into<String>, node: NodeIdentity) -> Self {
        Self {
            addr: addr.into(),
            ca_file: None,
            server_name: None,
            token_file: None,
            node,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_message_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The URI to connect to.
    pub fn uri(&self) -> Result<String, ClientError> {
        let tls = self.ca_file.is_some();
        let uri = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
        };
        if tls && !uri.starts_with("https://") {
            return Err(ClientError::Address {
                addr: self.addr.clone(),
                message: "a CA file is set, so the address must be https:// (or host:port)".into(),
            });
        }
        Ok(uri)
    }
}

/// What the client tells its user.
#[derive(Clone, Debug)]
pub enum AdsEvent {
    /// A stream is up (its first requests are sent).
    Connected,
    /// The accepted state changed.
    Snapshot(XdsSnapshot),
    /// A response was rejected (NACKed); the previous state of that type stays.
    Rejected { type_url: String, error: String },
    /// The stream ended; the next attempt is in `retry_in`. The last snapshot stays valid.
    Disconnected { error: String, retry_in: Duration },
}

/// Capped exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]`, `d = min(initial * 2^n, max)`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

async fn read_file(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ClientError::ReadFile {
            what,
            path: path.clone(),
            source,
        })
}

/// One stream: connect, send the first requests, then answer responses until it ends. Returns
/// whether any response was accepted (which resets the backoff) and why it ended.
async fn stream_once(
    cfg: &AdsConfig,
    state: &mut AdsState,
    on_event: &mut (impl FnMut(AdsEvent) + Send),
) -> (bool, ClientError) {
    let mut progressed = false;
    let addr = cfg.addr.clone();
    let err = async {
        let uri = cfg.uri()?;
        let mut ep = Endpoint::from_shared(uri.clone())
            .map_err(|e| ClientError::Address {
                addr: addr.clone(),
                message: e.to_string(),
            })?
            .connect_timeout(cfg.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(ca) = &cfg.ca_file {
            let pem = read_file("istiod CA file", ca).await?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
            ep = ep.tls_config(tls).map_err(|source| ClientError::Tls {
                addr: addr.clone(),
                source,
            })?;
        }
        let token = match &cfg.token_file {
            Some(p) => Some(
                String::from_utf8_lossy(&read_file("istiod token file", p).await?)
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let channel = ep.connect().await.map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let auth = token
            .map(|t| format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<_>>())
            .transpose()
            .map_err(|_| ClientError::Address {
                addr: addr.clone(),
                message: "the token is not a valid header value".into(),
            })?;
        let cluster_id = cfg.node.cluster_id.parse::<tonic::metadata::MetadataValue<_>>().ok();
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                if let Some(a) = &auth {
                    req.metadata_mut().insert("authorization", a.clone());
                }
                if let Some(c) = &cluster_id {
                    // istiod picks the cluster whose JWT rules apply by this header.
                    req.metadata_mut().insert("clusterid", c.clone());
                }
                Ok(req)
            },
        )
        .max_decoding_message_size(cfg.max_message_bytes);
        let (tx, rx) = mpsc::channel(16);
        for r in state.start_stream(cfg.node.to_node()) {
            let _ = tx.send(r).await;
        }
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|status| ClientError::Stream {
                addr: addr.clone(),
                status,
            })?
            .into_inner();
        info!(uri, "ADS stream open");
        on_event(AdsEvent::Connected);
        loop {
            let resp = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(ClientError::Closed { addr: addr.clone() }),
                Err(status) => {
                    return Err(ClientError::Stream {
                        addr: addr.clone(),
                        status,
                    });
                }
            };
            let out = state.on_response(&resp);
            match &out.rejected {
                Some(e) => {
                    warn!(type_url = resp.type_url, version = resp.version_info, nonce = resp.nonce, error = %e, "NACK: response rejected, the previous state stays");
                    on_event(AdsEvent::Rejected {
                        type_url: resp.type_url.clone(),
                        error: e.to_string(),
                    });
                }
                None => {
                    progressed = true;
                    debug!(type_url = resp.type_url, version = resp.version_info, nonce = resp.nonce, resources = resp.resources.len(), "ACK");
                }
            }
            for r in out.requests {
                if tx.send(r).await.is_err() {
                    return Err(ClientError::Closed { addr: addr.clone() });
                }
            }
            if out.changed
                && let Some(s) = state.snapshot()
            {
                info!(
                    outbound_port = ?s.outbound_port,
                    inbound_port = ?s.inbound_port,
                    passthrough = ?s.inbound_passthrough_binds,
                    mesh_endpoints = s.mesh_endpoints.len(),
                    versions = ?s.versions,
                    "xDS snapshot changed"
                );
                on_event(AdsEvent::Snapshot(s));
            }
        }
    }
    .await;
    match err {
        Ok(()) => unreachable!("the stream loop only ends with an error"),
        Err(e) => (progressed, e),
    }
}

/// Runs the ADS client forever: one stream at a time, reconnecting with backoff. Events go to
/// `on_event`; the state (and so the last snapshot) survives reconnects.
pub async fn run(cfg: AdsConfig, mut on_event: impl FnMut(AdsEvent) + Send) {
    let mut state = AdsState::default();
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    for attempt in 1u64.. {
        let span =
            info_span!("ads_stream", istiod = %cfg.addr, node = %cfg.node.node_id(), attempt);
        let (progressed, err) = stream_once(&cfg, &mut state, &mut on_event)
            .instrument(span.clone())
            .await;
        if progressed {
            backoff.reset();
        }
        let retry_in = backoff.next_delay();
        span.in_scope(|| {
            warn!(error = %err, retry_in_ms = retry_in.as_millis() as u64, kept_last_good = state.snapshot().is_some(), "ADS stream ended; reconnecting")
        });
        on_event(AdsEvent::Disconnected {
            error: err.to_string(),
            retry_in,
        });
        tokio::time::sleep(retry_in).await;
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::{
        cluster::v3::{Cluster, cluster},
        core::v3::{Address, BindConfig, SocketAddress, address, socket_address},
        endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        },
        listener::v3::Listener,
    };

    use super::*;
    use crate::xds::typed::to_any;

    fn sock(ip: &str, port: u32) -> SocketAddress {
        SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        }
    }
    fn addr(ip: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(sock(ip, port))),
        }
    }
    fn listener(name: &str, port: u32) -> Listener {
        Listener {
            name: name.into(),
            address: Some(addr("0.0.0.0", port)),
            ..Default::default()
        }
    }
    fn resp(
        ty: &str,
        version: &str,
        nonce: &str,
        res: Vec<envoy_types::pb::google::protobuf::Any>,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources: res,
            type_url: ty.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }
    fn lds(version: &str, nonce: &str, inbound: u32) -> DiscoveryResponse {
        resp(
            TYPE_LISTENER,
            version,
            nonce,
            vec![
                to_any(TYPE_LISTENER, &listener("virtualOutbound", 15001)),
                to_any(TYPE_LISTENER, &listener("virtualInbound", inbound)),
            ],
        )
    }
    fn cds(version: &str, nonce: &str) -> DiscoveryResponse {
        let pt = Cluster {
            name: "InboundPassthroughClusterIpv4".into(),
            upstream_bind_config: Some(BindConfig {
                source_address: Some(sock("127.0.0.6", 0)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let eds = Cluster {
            name: "outbound|80||a.default.svc.cluster.local".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        };
        resp(
            TYPE_CLUSTER,
            version,
            nonce,
            vec![to_any(TYPE_CLUSTER, &pt), to_any(TYPE_CLUSTER, &eds)],
        )
    }
    fn eds(version: &str, nonce: &str, ip: &str) -> DiscoveryResponse {
        let mut md = envoy_types::pb::envoy::config::core::v3::Metadata::default();
        md.filter_metadata.insert(
            "envoy.transport_socket_match".into(),
            envoy_types::pb::google::protobuf::Struct {
                fields: [(
                    "tlsMode".to_string(),
                    crate::xds::node::json_to_value(&serde_json::json!("istio")),
                )]
                .into(),
            },
        );
        let cla = ClusterLoadAssignment {
            cluster_name: "outbound|80||a.default.svc.cluster.local".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(addr(ip, 80)),
                        ..Default::default()
                    })),
                    metadata: Some(md),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        resp(
            TYPE_ENDPOINTS,
            version,
            nonce,
            vec![to_any(TYPE_ENDPOINTS, &cla)],
        )
    }

    #[test]
    fn ack_nack_subscribe_and_keep_last_good() {
        let mut s = AdsState::default();
        let first = s.start_stream(Node::default());
        assert_eq!(
            first
                .iter()
                .map(|r| r.type_url.as_str())
                .collect::<Vec<_>>(),
            [TYPE_CLUSTER, TYPE_LISTENER]
        );
        assert!(first[0].node.is_some() && first[1].node.is_none());

        let out = s.on_response(&cds("c1", "n1"));
        assert!(out.rejected.is_none() && !out.changed, "no listeners yet");
        assert_eq!(out.requests[0].version_info, "c1");
        assert_eq!(out.requests[0].response_nonce, "n1");
        assert_eq!(
            out.requests[1].type_url, TYPE_ENDPOINTS,
            "EDS subscription follows CDS"
        );
        assert_eq!(
            out.requests[1].resource_names,
            ["outbound|80||a.default.svc.cluster.local"]
        );

        let out = s.on_response(&lds("l1", "n2", 15006));
        assert!(out.changed);
        let snap = s.snapshot().unwrap();
        assert_eq!(
            (snap.outbound_port, snap.inbound_port),
            (Some(15001), Some(15006))
        );
        assert_eq!(
            snap.inbound_passthrough_binds,
            ["127.0.0.6".parse::<IpAddr>().unwrap()]
        );

        let out = s.on_response(&eds("e1", "n3", "10.0.0.9"));
        assert!(out.changed && out.requests[0].resource_names.len() == 1);
        assert_eq!(s.snapshot().unwrap().mesh_endpoints.len(), 1);

        // A bad listener: NACK naming it, with the last accepted version; nothing changes.
        let out = s.on_response(&lds("l2", "n4", 0));
        let nack = &out.requests[0];
        assert_eq!(nack.version_info, "l1");
        assert_eq!(nack.response_nonce, "n4");
        let detail = nack.error_detail.as_ref().unwrap();
        assert!(detail.message.contains("virtualInbound"), "{detail:?}");
        assert!(!out.changed);
        assert_eq!(s.snapshot().unwrap().inbound_port, Some(15006));

        // Undecodable bytes: NACK naming the resource's index.
        let mut bad = lds("l3", "n5", 15006);
        bad.resources[1].value = vec![0xff, 0xff, 0xff];
        let out = s.on_response(&bad);
        assert!(
            out.requests[0]
                .error_detail
                .as_ref()
                .unwrap()
                .message
                .contains("listener #1")
        );

        // A good push moves the port.
        let out = s.on_response(&lds("l4", "n6", 15007));
        assert!(out.changed && out.requests[0].error_detail.is_none());
        assert_eq!(s.snapshot().unwrap().inbound_port, Some(15007));

        // A new stream resumes with the accepted versions and the EDS subscription.
        let again = s.start_stream(Node::default());
        assert_eq!(
            again
                .iter()
                .map(|r| (
                    r.type_url.as_str(),
                    r.version_info.as_str(),
                    r.response_nonce.as_str()
                ))
                .collect::<Vec<_>>(),
            [
                (TYPE_CLUSTER, "c1", ""),
                (TYPE_ENDPOINTS, "e1", ""),
                (TYPE_LISTENER, "l4", "")
            ]
        );
    }

    #[test]
    fn backoff_is_capped_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
