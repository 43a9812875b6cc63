//! A test ADS server standing in for istiod (there is none here): tonic + envoy-types, state of
//! the world, listeners/clusters/endpoints per node id, pushes on every change, records every
//! request (ACKs and NACKs with their error detail), and can be killed and restarted on the same
//! addresses.
//!
//! It listens on TCP (for the agent on the host) and optionally on a Unix socket: Envoys in pod
//! network namespaces reach a path-named Unix socket whatever their netns, the way Istio's
//! sidecars reach pilot-agent's `./etc/istio/proxy/XDS`. Optional TLS (a certificate for
//! `istiod.istio-system.svc`) and a required bearer token model istiod's 15012 port.
//!
//! Resources come from [`convert`]: `envoy.rs`'s JSON (every field), or real config dumps (what
//! the agent reads), or are edited/garbage `Any`s for the change and NACK cases.
pub mod convert;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::Any,
};
use istio_integration::xds::typed::{TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_LISTENER, to_any};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Server};

/// One node's resources (state of the world). Endpoints are keyed by cluster (EDS) name.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub listeners: Vec<Any>,
    pub clusters: Vec<Any>,
    pub endpoints: BTreeMap<String, Any>,
}

impl Resources {
    pub fn typed(
        listeners: &[Listener],
        clusters: &[Cluster],
        endpoints: &[ClusterLoadAssignment],
    ) -> Self {
        Self {
            listeners: listeners.iter().map(|l| to_any(TYPE_LISTENER, l)).collect(),
            clusters: clusters.iter().map(|c| to_any(TYPE_CLUSTER, c)).collect(),
            endpoints: endpoints
                .iter()
                .map(|e| (e.cluster_name.clone(), to_any(TYPE_ENDPOINTS, e)))
                .collect(),
        }
    }

    /// From `envoy.rs`-style JSON (`@type` ignored), converted in full.
    pub fn from_json(
        listeners: &[serde_json::Value],
        clusters: &[serde_json::Value],
        endpoints: &[serde_json::Value],
    ) -> anyhow::Result<Self> {
        use convert::Mode::Full;
        Ok(Self::typed(
            &listeners
                .iter()
                .map(|l| convert::listener(l, Full))
                .collect::<anyhow::Result<Vec<_>>>()?,
            &clusters
                .iter()
                .map(|c| convert::cluster(c, Full))
                .collect::<anyhow::Result<Vec<_>>>()?,
            &endpoints
                .iter()
                .map(|e| convert::load_assignment(e, Full))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ))
    }

    /// The listener named `name`, decoded.
    pub fn listener(&self, name: &str) -> Option<Listener> {
        self.listeners
            .iter()
            .filter_map(|a| <Listener as prost::Message>::decode(a.value.as_slice()).ok())
            .find(|l| l.name == name)
    }

    /// Replaces (or adds) the listener of the same name.
    pub fn put_listener(&mut self, l: &Listener) {
        let any = to_any(TYPE_LISTENER, l);
        match self.listeners.iter().position(|a| {
            <Listener as prost::Message>::decode(a.value.as_slice()).is_ok_and(|x| x.name == l.name)
        }) {
            Some(i) => self.listeners[i] = any,
            None => self.listeners.push(any),
        }
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The node id of the stream (from its first request).
    pub node: String,
    /// Which connection of the server's life (restarts count on).
    pub stream: u64,
    pub type_url: String,
    pub version_info: String,
    pub response_nonce: String,
    pub resource_names: Vec<String>,
    /// A NACK's `error_detail.message`.
    pub error: Option<String>,
}

#[derive(Default)]
struct State {
    version: u64,
    default: Resources,
    per_node: BTreeMap<String, Resources>,
    received: Vec<Received>,
    streams: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    token: Option<String>,
}

impl Shared {
    fn resources_for(&self, node: &str) -> (u64, Resources) {
        let s = self.state.lock().unwrap();
        (
            s.version,
            s.per_node.get(node).unwrap_or(&s.default).clone(),
        )
    }
}

/// How to run the server.
#[derive(Clone, Debug, Default)]
pub struct AdsOptions {
    /// Also listen on this Unix socket (for Envoys in pods).
    pub uds: Option<PathBuf>,
    /// TLS: (certificate PEM, key PEM).
    pub tls: Option<(String, String)>,
    /// Require `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Listen on this address instead of 127.0.0.1 (pods of the cluster tests reach the server
    /// on their bridge's gateway).
    pub bind: Option<std::net::IpAddr>,
}

/// The running (or killed) test ADS server.
pub struct AdsServer {
    shared: Arc<Shared>,
    opts: AdsOptions,
    tcp: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

struct Svc(Arc<Shared>);

type RespStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// Per stream: what each type subscribes to and what was sent last.
#[derive(Default)]
struct Sub {
    names: Vec<String>,
    sent_version: Option<u64>,
    nonce: String,
}

fn response(
    ty: &str,
    version: u64,
    nonce: &str,
    r: &Resources,
    names: &[String],
) -> DiscoveryResponse {
    let resources = match ty {
        TYPE_LISTENER => r.listeners.clone(),
        TYPE_CLUSTER => r.clusters.clone(),
        TYPE_ENDPOINTS => names
            .iter()
            .map(|n| {
                r.endpoints.get(n).cloned().unwrap_or_else(|| {
                    // As istiod: an assignment without endpoints for an unknown name, so that
                    // Envoy's initialization does not wait for it forever.
                    to_any(
                        TYPE_ENDPOINTS,
                        &ClusterLoadAssignment {
                            cluster_name: n.clone(),
                            ..Default::default()
                        },
                    )
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    DiscoveryResponse {
        version_info: format!("v{version}"),
        resources,
        type_url: ty.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    mut input: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let stream_id = {
        let mut s = shared.state.lock().unwrap();
        s.streams += 1;
        s.streams
    };
    let mut changed = shared.changed.subscribe();
    let mut node = String::new();
    let mut subs: BTreeMap<String, Sub> = BTreeMap::new();
    let mut counter = 0u64;
    loop {
        // Which types to (re)send.
        let mut send: Vec<String> = Vec::new();
        tokio::select! {
            req = input.message() => {
                let Ok(Some(req)) = req else { return };
                if node.is_empty() && let Some(n) = &req.node {
                    node = n.id.clone();
                }
                shared.state.lock().unwrap().received.push(Received {
                    node: node.clone(),
                    stream: stream_id,
                    type_url: req.type_url.clone(),
                    version_info: req.version_info.clone(),
                    response_nonce: req.response_nonce.clone(),
                    resource_names: req.resource_names.clone(),
                    error: req.error_detail.as_ref().map(|e| e.message.clone()),
                });
                let sub = subs.entry(req.type_url.clone()).or_default();
                let names_changed = sub.names != req.resource_names;
                sub.names = req.resource_names.clone();
                if req.response_nonce.is_empty() || (names_changed && req.response_nonce == sub.nonce) || (names_changed && req.type_url == TYPE_ENDPOINTS) {
                    send.push(req.type_url.clone());
                }
            }
            r = changed.changed() => {
                if r.is_err() { return }
                let (v, _) = shared.resources_for(&node);
                send.extend(subs.iter().filter(|(_, s)| s.sent_version != Some(v)).map(|(t, _)| t.clone()));
            }
        }
        if send.is_empty() {
            continue;
        }
        let (version, res) = shared.resources_for(&node);
        // Envoy's order: clusters, endpoints, listeners.
        send.sort_by_key(|t| match t.as_str() {
            TYPE_CLUSTER => 0,
            TYPE_ENDPOINTS => 1,
            _ => 2,
        });
        send.dedup();
        for ty in send {
            if ![TYPE_LISTENER, TYPE_CLUSTER, TYPE_ENDPOINTS].contains(&ty.as_str()) {
                continue;
            }
            counter += 1;
            let sub = subs.get_mut(&ty).expect("subscribed");
            sub.nonce = format!("{stream_id}-{counter}");
            sub.sent_version = Some(version);
            let resp = response(&ty, version, &sub.nonce, &res, &sub.names);
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Svc {
    type StreamAggregatedResourcesStream = RespStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<RespStream>, Status> {
        if let Some(t) = &self.0.token {
            let want = format!("Bearer {t}");
            let got = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if got != Some(want.as_str()) {
                return Err(Status::unauthenticated("missing or wrong bearer token"));
            }
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_stream(self.0.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "this test server speaks state-of-the-world ADS only",
        ))
    }
}

impl AdsServer {
    /// Starts on `127.0.0.1:<free port>` (and the Unix socket, if any).
    pub fn start(opts: AdsOptions) -> anyhow::Result<AdsServer> {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed,
            token: opts.token.clone(),
        });
        let ip = opts
            .bind
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let mut s = AdsServer {
            shared,
            opts,
            tcp: SocketAddr::new(ip, 0),
            rt: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ads-server")
            .enable_all()
            .build()?;
        // A restart may find the port briefly still held by the old runtime's sockets.
        let deadline = Instant::now() + Duration::from_secs(5);
        let tcp = loop {
            match rt.block_on(tokio::net::TcpListener::bind(self.tcp)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("binding {}", self.tcp)),
            }
        };
        self.tcp = tcp.local_addr()?;
        let svc = || {
            AggregatedDiscoveryServiceServer::new(Svc(self.shared.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(256 << 20)
        };
        let mut builder = Server::builder();
        if let Some((cert, key)) = &self.opts.tls {
            builder = builder.tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )?;
        }
        let tcp_server = builder
            .clone()
            .add_service(svc())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp));
        rt.spawn(async move {
            if let Err(e) = tcp_server.await {
                eprintln!("ads server (tcp): {e}");
            }
        });
        if let Some(path) = &self.opts.uds {
            let _ = std::fs::remove_file(path);
            let l = {
                let _g = rt.enter();
                tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("binding {}", path.display()))?
            };
            // Envoy runs as uid 1337.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            let uds_server = Server::builder()
                .add_service(svc())
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l));
            rt.spawn(async move {
                if let Err(e) = uds_server.await {
                    eprintln!("ads server (uds): {e}");
                }
            });
        }
        self.rt = Some(rt);
        Ok(())
    }

    /// The TCP address (for `meshaccel agent --istiod`).
    pub fn addr(&self) -> SocketAddr {
        self.tcp
    }

    pub fn uds(&self) -> Option<&Path> {
        self.opts.uds.as_deref()
    }

    /// Kills the server: every connection drops at once, as when istiod's pod dies.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        if let Some(p) = &self.opts.uds {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Starts again on the same addresses with the same resources under a new version (as a
    /// new istiod would push everything again).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.rt.is_some() {
            bail!("the ADS server is running");
        }
        self.edit(|_| {});
        self.spawn()
    }

    pub fn running(&self) -> bool {
        self.rt.is_some()
    }

    /// Changes the resources (all nodes' or one's) and pushes them to every stream.
    pub fn edit(&self, f: impl FnOnce(&mut Edit<'_>)) {
        let v = {
            let mut s = self.shared.state.lock().unwrap();
            s.version += 1;
            let st = &mut *s;
            f(&mut Edit {
                default: &mut st.default,
                per_node: &mut st.per_node,
            });
            st.version
        };
        self.shared.changed.send_replace(v);
    }

    /// The resources served to `node` (the default set when it has none of its own).
    pub fn resources(&self, node: &str) -> Resources {
        self.shared.resources_for(node).1
    }

    /// The current version string (`v<N>`).
    pub fn version(&self) -> String {
        format!("v{}", self.shared.state.lock().unwrap().version)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.state.lock().unwrap().received.clone()
    }

    /// Waits (up to `timeout`) until `pred` holds for the requests received.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.received();
            if pred(&r) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = r.iter().rev().take(12).map(|x| format!("{x:?}")).collect();
                bail!(
                    "ADS server: waiting for {what}: last requests (newest first):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `node` ACKed the current version of `type_url`.
    pub fn wait_acked(&self, node: &str, type_url: &str, timeout: Duration) -> anyhow::Result<()> {
        let v = self.version();
        self.wait_for(&format!("{node} to ACK {type_url} {v}"), timeout, |r| {
            r.iter().any(|x| {
                x.node == node
                    && x.type_url == type_url
                    && x.version_info == v
                    && x.error.is_none()
                    && !x.response_nonce.is_empty()
            })
        })
        .map(|_| ())
    }
}

/// What [`AdsServer::edit`] can change.
pub struct Edit<'a> {
    pub default: &'a mut Resources,
    pub per_node: &'a mut BTreeMap<String, Resources>,
}

impl Edit<'_> {
    /// The resources of `node` (created from the default set when it had none).
    pub fn node(&mut self, node: &str) -> &mut Resources {
        self.per_node
            .entry(node.to_string())
            .or_insert_with(|| self.default.clone())
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
