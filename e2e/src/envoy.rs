//! Real Envoy sidecars, configured the way istiod configures an Istio sidecar.
//!
//! The listeners and clusters follow the shapes of a real istiod config dump
//! (`config_dump/istio-1.18.2_sidecar_hotelres-geo_with-eds.json` in the shared fixtures):
//!
//! - `virtualOutbound` on `0.0.0.0:15001` with `use_original_dst`: a connection the app made to
//!   `svc:port` (REDIRECTed here by `ISTIO_OUTPUT`) is handed over to the listener named
//!   `<ip>_<port>` for its original destination, else to `PassthroughCluster`.
//! - Per upstream service a listener `<ip>_<port>`, bound to the service address with
//!   `bind_to_port: false` (it only receives hand-overs), whose `tcp_proxy` forwards to
//!   `outbound|<port>||<name>.default.svc.cluster.local`; that cluster's endpoints carry
//!   `tlsMode: istio`, so its `transport_socket_matches` select Istio mutual TLS
//!   (`UpstreamTlsContext` with the pod's certificate, ALPN `istio-peer-exchange, istio`, SNI
//!   `outbound_.<port>_._.<host>`, peer SAN checked against the upstream's SPIFFE id).
//! - `virtualInbound` on `0.0.0.0:15006` with the `original_dst` and `tls_inspector` listener
//!   filters. Per inbound port three chains as in PERMISSIVE mode (mutual TLS with Istio ALPN is
//!   terminated, with `require_client_certificate`; plain TCP and the app's own TLS are passed on)
//!   forwarding to `inbound|<port>||`, an ORIGINAL_DST cluster bound to source `127.0.0.6`; the
//!   same three chains for any other port go to `InboundPassthroughClusterIpv4` (also 127.0.0.6),
//!   and connections made to 15006 itself go to `BlackHoleCluster`.
//!
//! What is left out: Istio's own filters (`istio.stats`, `istio.metadata_exchange`,
//! `istio_authn`: they exist only in istio-proxy builds, not in upstream Envoy), access logs,
//! HTTP connection managers (everything is TCP-level `tcp_proxy`, which is what Istio uses for
//! TCP ports and the mTLS leg carries either way), `http_inspector`, and the 15090/15021 agent
//! listeners. Certificates come from static bootstrap secrets named `default` and `ROOTCA`,
//! the names istiod's SDS uses, so the TLS contexts reference them exactly as istiod's do (by
//! SDS secret name), just without an `sds_config`.
//!
//! [`listeners`] and [`clusters`] build the xDS resources separately from [`bootstrap`], so that
//! they can later be served over ADS instead of as static resources.

use std::{
    collections::BTreeMap,
    env, fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

use crate::PROXY_UID;

/// The Envoy release that `scripts/install-envoy.sh` installs.
pub const ENVOY_VERSION: &str = "1.40.0";
/// Worker threads per sidecar: Istio's default (`ProxyConfig.concurrency`, 2 in the node
/// metadata of the fixtures' istiod config dump), which is what users' sidecars run with. One
/// worker serialised all of a sidecar's connections and cost the mesh benchmark's 16
/// connections a tenth of their gain (p50 ratio 0.69 with one worker, 0.61 with two, 5 Dec 2026).
pub const ENVOY_CONCURRENCY: u32 = 2;
/// `virtualOutbound`: where `ISTIO_REDIRECT` sends the app's outgoing connections.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// `virtualInbound`: where `ISTIO_IN_REDIRECT` sends incoming connections.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The source address of the inbound passthrough leg (Envoy → app), exempted from capture by
/// `ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN`.
pub const INBOUND_PASSTHROUGH_BIND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The trust domain of the SPIFFE ids.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Every pod of the local mesh lives in this Kubernetes namespace, with a service account named
/// after the pod.
pub const NAMESPACE: &str = "default";

const CONNECT_TIMEOUT: &str = "10s";
const TLS_TYPE: &str = "envoy.transport_sockets.tls";
/// ALPN that Istio's client sidecar offers on a TCP (non-HTTP) mTLS connection.
const ISTIO_TCP_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
/// The SDS secret names istiod uses for the workload certificate and the root CA.
const SECRET_CERT: &str = "default";
const SECRET_ROOT: &str = "ROOTCA";

/// One pod's sidecar.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// The pod (and service account) name; the workload identity is
    /// `spiffe://cluster.local/ns/default/sa/<pod_name>`.
    pub pod_name: String,
    pub pod_ip: Ipv4Addr,
    /// Ports the app listens on (on the pod IP or 0.0.0.0); each gets an `inbound|<port>||`
    /// cluster and its own `virtualInbound` filter chains.
    pub inbound_ports: Vec<u16>,
    /// Services this pod may call, as (name, address, port). The name is both the service name
    /// (host `<name>.default.svc.cluster.local`) and the service account of its pods (the peer
    /// identity checked on the mTLS leg). In the local mesh a service address is the server pod's
    /// IP (there is no kube-proxy); entries sharing (name, port) form one cluster with several
    /// endpoints.
    pub upstreams: Vec<(String, Ipv4Addr, u16)>,
    /// Envoy's admin port, on 127.0.0.1 (Istio: 15000).
    pub admin_port: u16,
}

impl SidecarSpec {
    /// Envoy's node id, in istiod's format `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        format!(
            "sidecar~{}~{}.{NAMESPACE}~{NAMESPACE}.svc.{TRUST_DOMAIN}",
            self.pod_ip, self.pod_name
        )
    }
}

/// The workload identity of a pod (its service account is named after it).
pub fn spiffe_id(pod: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{pod}")
}

/// The Kubernetes host name of a service of the local mesh.
pub fn service_host(name: &str) -> String {
    format!("{name}.{NAMESPACE}.svc.{TRUST_DOMAIN}")
}

/// istiod's name of the outbound cluster of a service port.
pub fn outbound_cluster_name(name: &str, port: u16) -> String {
    format!("outbound|{port}||{}", service_host(name))
}

/// istiod's name of the inbound cluster of an app port.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

// ---------------------------------------------------------------------------------------------
// PKI

/// Where one pod's certificate files are (Istio's file names).
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// The pod's certificate (`cert-chain.pem`).
    pub cert_chain: PathBuf,
    /// Its private key (`key.pem`).
    pub private_key: PathBuf,
    /// The mesh root CA certificate (`root-cert.pem`).
    pub root_cert: PathBuf,
}

/// A throwaway mesh CA: a self-signed root whose certificate is `<dir>/root-cert.pem`, issuing
/// pod certificates with SPIFFE URI SANs into `<dir>/<pod>/`. Everything written is readable by
/// any uid (Envoy runs as 1337); the CA key stays in memory only.
pub struct Pki {
    dir: PathBuf,
    root_cert: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Creates the CA and writes its certificate into `dir` (created if missing, made mode
    /// 0755). Fails when an ancestor of `dir` is not traversable by other uids (a `tempfile`
    /// directory is 0700: use it as `dir` itself, not as a parent).
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        chmod(&dir, 0o755)?;
        for ancestor in dir.ancestors().skip(1) {
            let mode = fs::metadata(ancestor)
                .with_context(|| format!("stat {}", ancestor.display()))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                bail!(
                    "{} (mode {:o}) is not traversable by other uids, so Envoy (uid {PROXY_UID}) \
                     could not read certificates under {}",
                    ancestor.display(),
                    mode & 0o7777,
                    dir.display()
                );
            }
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, TRUST_DOMAIN);
        dn.push(DnType::CommonName, "meshaccel e2e root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let ca = CertifiedIssuer::self_signed(params, key).context("self-signing the CA")?;
        let root_cert = dir.join("root-cert.pem");
        write_public(&root_cert, ca.pem().as_bytes())?;
        Ok(Pki { dir, root_cert, ca })
    }

    /// Issues a certificate for `pod` with the URI SAN `spiffe://cluster.local/ns/default/sa/<pod>`
    /// (usable as client and server certificate, as Istio's are) and writes it to `<dir>/<pod>/`.
    pub fn issue(&self, pod: &str) -> anyhow::Result<CertPaths> {
        if pod.is_empty()
            || !pod
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            bail!("pod name {pod:?} is not a DNS label");
        }
        let mut params = CertificateParams::default();
        // Istio workload certificates have an empty subject; a CN makes them easier to read.
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, pod);
        let id = spiffe_id(pod);
        params.subject_alt_names = vec![SanType::URI(
            id.clone().try_into().with_context(|| format!("SAN {id}"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a pod key")?;
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("signing {id}"))?;

        let dir = self.dir.join(pod);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        chmod(&dir, 0o755)?;
        let paths = CertPaths {
            cert_chain: dir.join("cert-chain.pem"),
            private_key: dir.join("key.pem"),
            root_cert: dir.join("root-cert.pem"),
        };
        write_public(&paths.cert_chain, cert.pem().as_bytes())?;
        // World-readable on purpose: a throwaway key of a throwaway CA, read by uid 1337.
        write_public(&paths.private_key, key.serialize_pem().as_bytes())?;
        write_public(&paths.root_cert, self.ca.pem().as_bytes())?;
        Ok(paths)
    }

    /// A server certificate for the DNS name `dns` (e.g. istiod's `istiod.istio-system.svc`),
    /// signed by the mesh CA: (certificate PEM, key PEM).
    pub fn issue_server(&self, dns: &str) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, dns);
        params.subject_alt_names = vec![SanType::DnsName(
            dns.try_into().with_context(|| format!("DNS name {dns}"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a server key")?;
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("signing {dns}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root CA certificate (PEM).
    pub fn root_cert(&self) -> &Path {
        &self.root_cert
    }
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn write_public(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    chmod(path, 0o644)
}

// ---------------------------------------------------------------------------------------------
// xDS resources

fn socket_address(ip: impl ToString, port: u16) -> Value {
    json!({ "socket_address": { "address": ip.to_string(), "port_value": port } })
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        }
    })
}

fn tls_params() -> Value {
    json!({ "tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3" })
}

/// The workload certificate and the root CA, referenced by istiod's SDS secret names (static
/// secrets here: no `sds_config`).
fn common_tls_context(alpn: &[&str], san_matcher: Value) -> Value {
    json!({
        "tls_params": tls_params(),
        "alpn_protocols": alpn,
        "tls_certificate_sds_secret_configs": [{ "name": SECRET_CERT }],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": san_matcher }]
            },
            "validation_context_sds_secret_config": { "name": SECRET_ROOT },
        },
    })
}

/// Istio mutual TLS on the server side: any workload of the trust domain may connect.
fn downstream_mtls() -> Value {
    json!({
        "name": TLS_TYPE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": common_tls_context(
                &["istio-peer-exchange", "h2", "http/1.1"],
                json!({ "prefix": format!("spiffe://{TRUST_DOMAIN}/") }),
            ),
            "require_client_certificate": true,
        }
    })
}

/// Istio mutual TLS on the client side, checking the server's identity.
fn upstream_mtls(peer_identity: &str, sni: &str) -> Value {
    json!({
        "name": TLS_TYPE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context(&ISTIO_TCP_ALPN, json!({ "exact": peer_identity })),
            "sni": sni,
        }
    })
}

/// The three TCP chains `virtualInbound` has per destination (PERMISSIVE mode): Istio mTLS is
/// terminated, the app's own TLS and plain TCP are passed on as they are.
fn inbound_chains(name: &str, port: Option<u16>, cluster: &str) -> Vec<Value> {
    let base = |transport: &str| {
        let mut m = json!({ "transport_protocol": transport });
        match port {
            Some(port) => m["destination_port"] = json!(port),
            None => m["prefix_ranges"] = json!([{ "address_prefix": "0.0.0.0", "prefix_len": 0 }]),
        }
        m
    };
    let mut mtls_match = base("tls");
    mtls_match["application_protocols"] = json!(ISTIO_TCP_ALPN);
    vec![
        json!({
            "name": name,
            "filter_chain_match": mtls_match,
            "filters": [tcp_proxy(cluster)],
            "transport_socket": downstream_mtls(),
        }),
        json!({ "name": name, "filter_chain_match": base("raw_buffer"), "filters": [tcp_proxy(cluster)] }),
        json!({ "name": name, "filter_chain_match": base("tls"), "filters": [tcp_proxy(cluster)] }),
    ]
}

/// Upstream services grouped by (name, port), with their addresses in first-seen order.
fn services(spec: &SidecarSpec) -> BTreeMap<(String, u16), Vec<Ipv4Addr>> {
    let mut out: BTreeMap<(String, u16), Vec<Ipv4Addr>> = BTreeMap::new();
    for (name, ip, port) in &spec.upstreams {
        let ips = out.entry((name.clone(), *port)).or_default();
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    out
}

fn ports(spec: &SidecarSpec) -> Vec<u16> {
    let mut ports = spec.inbound_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The sidecar's listeners: `virtualOutbound`, `virtualInbound` and one `<ip>_<port>` per
/// upstream address (v3 `Listener` resources, `@type` included).
pub fn listeners(spec: &SidecarSpec) -> Vec<Value> {
    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    let mut out = Vec::new();

    out.push(json!({
        "@type": LISTENER,
        "name": "virtualOutbound",
        "address": socket_address(Ipv4Addr::UNSPECIFIED, OUTBOUND_CAPTURE_PORT),
        "filter_chains": [
            {
                "name": "virtualOutbound-blackhole",
                "filter_chain_match": { "destination_port": OUTBOUND_CAPTURE_PORT },
                "filters": [tcp_proxy("BlackHoleCluster")],
            },
            { "name": "virtualOutbound-catchall-tcp", "filters": [tcp_proxy("PassthroughCluster")] },
        ],
        "use_original_dst": true,
        "traffic_direction": "OUTBOUND",
    }));

    let mut chains = vec![json!({
        "name": "virtualInbound-blackhole",
        "filter_chain_match": { "destination_port": INBOUND_CAPTURE_PORT },
        "filters": [tcp_proxy("BlackHoleCluster")],
    })];
    chains.extend(inbound_chains(
        "virtualInbound",
        None,
        "InboundPassthroughClusterIpv4",
    ));
    for port in ports(spec) {
        chains.extend(inbound_chains(
            &format!("0.0.0.0_{port}"),
            Some(port),
            &inbound_cluster_name(port),
        ));
    }
    // tls_inspector is what sets transport_protocol/application_protocols for the chain match;
    // as istiod does, it is skipped for connections made to 15006 itself.
    let not_on_capture_port = json!({ "destination_port_range": { "start": INBOUND_CAPTURE_PORT, "end": INBOUND_CAPTURE_PORT + 1 } });
    out.push(json!({
        "@type": LISTENER,
        "name": "virtualInbound",
        "address": socket_address(Ipv4Addr::UNSPECIFIED, INBOUND_CAPTURE_PORT),
        "filter_chains": chains,
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            },
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                },
                "filter_disabled": not_on_capture_port,
            },
        ],
        "listener_filters_timeout": "0s",
        "continue_on_listener_filters_timeout": true,
        "traffic_direction": "INBOUND",
    }));

    let mut seen = Vec::new();
    for ((name, port), ips) in services(spec) {
        let cluster = outbound_cluster_name(&name, port);
        for ip in ips {
            if seen.contains(&(ip, port)) {
                continue; // one address, two service names: the first one wins, as in istiod
            }
            seen.push((ip, port));
            out.push(json!({
                "@type": LISTENER,
                "name": format!("{ip}_{port}"),
                "address": socket_address(ip, port),
                "filter_chains": [{ "filters": [tcp_proxy(&cluster)] }],
                "traffic_direction": "OUTBOUND",
                "bind_to_port": false,
            }));
        }
    }
    out
}

fn circuit_breakers() -> Value {
    let max = u32::MAX;
    json!({ "thresholds": [{
        "max_connections": max, "max_pending_requests": max, "max_requests": max,
        "max_retries": max, "track_remaining": true,
    }]})
}

fn original_dst_cluster(name: &str, bind: Option<Ipv4Addr>) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "ORIGINAL_DST",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "CLUSTER_PROVIDED",
        "circuit_breakers": circuit_breakers(),
    });
    if let Some(ip) = bind {
        c["upstream_bind_config"] =
            json!({ "source_address": { "address": ip.to_string(), "port_value": 0 } });
    }
    c
}

/// The sidecar's clusters: `BlackHoleCluster`, `PassthroughCluster`,
/// `InboundPassthroughClusterIpv4`, one `inbound|<port>||` per inbound port and one
/// `outbound|<port>||<host>` per upstream service port (v3 `Cluster` resources).
pub fn clusters(spec: &SidecarSpec) -> Vec<Value> {
    let mut out = vec![
        json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "BlackHoleCluster",
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
        }),
        original_dst_cluster("PassthroughCluster", None),
        original_dst_cluster(
            "InboundPassthroughClusterIpv4",
            Some(INBOUND_PASSTHROUGH_BIND),
        ),
    ];
    for port in ports(spec) {
        out.push(original_dst_cluster(
            &inbound_cluster_name(port),
            Some(INBOUND_PASSTHROUGH_BIND),
        ));
    }
    for ((name, port), ips) in services(spec) {
        let cluster = outbound_cluster_name(&name, port);
        let host = service_host(&name);
        // istiod serves these endpoints over EDS; the tlsMode label of each endpoint is what
        // selects mutual TLS through transport_socket_matches (auto mTLS).
        let endpoints: Vec<Value> = ips
            .iter()
            .map(|ip| {
                json!({
                    "endpoint": { "address": socket_address(ip, port) },
                    "metadata": { "filter_metadata": {
                        "envoy.transport_socket_match": { "tlsMode": "istio" },
                        "istio": { "workload": format!("{name};{NAMESPACE};{name};;Kubernetes") },
                    }},
                })
            })
            .collect();
        out.push(json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": circuit_breakers(),
            "metadata": { "filter_metadata": { "istio": { "services": [
                { "host": host, "name": name, "namespace": NAMESPACE }
            ]}}},
            "load_assignment": { "cluster_name": cluster, "endpoints": [{ "lb_endpoints": endpoints }] },
            "transport_socket_matches": [
                {
                    "name": "tlsMode-istio",
                    "match": { "tlsMode": "istio" },
                    "transport_socket": upstream_mtls(&spiffe_id(&name), &format!("outbound_.{port}_._.{host}")),
                },
                {
                    "name": "tlsMode-disabled",
                    "match": {},
                    "transport_socket": {
                        "name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                        },
                    },
                },
            ],
        }));
    }
    out
}

/// The clusters as istiod serves them over ADS: every cluster with inline endpoints
/// (`outbound|…`) becomes an EDS cluster (`eds_config: ads`, `service_name` = its name), and its
/// endpoints a separate `ClusterLoadAssignment` (returned second, with their `tlsMode` metadata).
pub fn eds_split(clusters: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
    let mut out = Vec::new();
    let mut assignments = Vec::new();
    for mut c in clusters {
        if let Some(la) = c.as_object_mut().and_then(|o| o.remove("load_assignment")) {
            c["type"] = json!("EDS");
            c["eds_cluster_config"] = json!({
                "eds_config": { "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" },
                "service_name": c["name"].clone(),
            });
            assignments.push(la);
        }
        out.push(c);
    }
    (out, assignments)
}

/// The cluster through which Envoy reaches the ADS server: a Unix socket, as Istio's sidecars
/// reach pilot-agent (`xds-grpc` → `./etc/istio/proxy/XDS`), with HTTP/2.
fn xds_grpc_cluster(uds: &Path) -> Value {
    json!({
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": { "cluster_name": "xds-grpc", "endpoints": [{ "lb_endpoints": [{
            "endpoint": { "address": { "pipe": { "path": uds.to_string_lossy() } } }
        }]}]},
        "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} },
        }},
    })
}

/// [`bootstrap`] for a sidecar whose listeners and clusters come over ADS from the server on
/// the Unix socket `uds` (state of the world, `set_node_on_first_message_only` as Istio's
/// bootstrap; Istio itself uses `DELTA_GRPC`). The secrets stay static.
pub fn bootstrap_ads(spec: &SidecarSpec, certs: &CertPaths, uds: &Path) -> Value {
    let mut b = bootstrap(spec, certs);
    b["static_resources"] = json!({
        "clusters": [xds_grpc_cluster(uds)],
        "secrets": secrets(certs),
    });
    let ads = json!({ "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" });
    b["dynamic_resources"] = json!({
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }],
            "set_node_on_first_message_only": true,
        },
        "cds_config": ads.clone(),
        "lds_config": ads,
    });
    b
}

/// The static secrets `default` (the pod's certificate) and `ROOTCA` (v3 `Secret` resources).
pub fn secrets(certs: &CertPaths) -> Vec<Value> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        json!({
            "name": SECRET_CERT,
            "tls_certificate": {
                "certificate_chain": { "filename": path(&certs.cert_chain) },
                "private_key": { "filename": path(&certs.private_key) },
            },
        }),
        json!({
            "name": SECRET_ROOT,
            "validation_context": { "trusted_ca": { "filename": path(&certs.root_cert) } },
        }),
    ]
}

/// A complete Envoy v3 bootstrap for one sidecar: node identity as istiod's, admin on
/// `127.0.0.1:<admin_port>`, and [`listeners`], [`clusters`] and [`secrets`] as static resources.
pub fn bootstrap(spec: &SidecarSpec, certs: &CertPaths) -> Value {
    // `@type` is not a field of the bootstrap's repeated Listener/Cluster messages.
    let strip = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.remove("@type");
        }
        v
    };
    json!({
        "node": {
            "id": spec.node_id(),
            "cluster": format!("{}.{NAMESPACE}", spec.pod_name),
            "metadata": {
                "NAME": spec.pod_name,
                "NAMESPACE": NAMESPACE,
                "INSTANCE_IPS": spec.pod_ip.to_string(),
                "INTERCEPTION_MODE": "REDIRECT",
                "SERVICE_ACCOUNT": spec.pod_name,
                "WORKLOAD_NAME": spec.pod_name,
                "ISTIO_VERSION": "meshaccel-e2e",
            },
        },
        "admin": {
            "address": socket_address(Ipv4Addr::LOCALHOST, spec.admin_port),
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/null",
                },
            }],
        },
        "layered_runtime": { "layers": [
            { "name": "global config", "static_layer": { "re2.max_program_size.error_level": "32768" } },
            { "name": "admin", "admin_layer": {} },
        ]},
        // As Istio's bootstrap: an explicit (effectively unlimited) downstream connection limit.
        "overload_manager": { "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 2147483647,
            },
        }]},
        "static_resources": {
            "listeners": listeners(spec).into_iter().map(strip).collect::<Vec<_>>(),
            "clusters": clusters(spec).into_iter().map(strip).collect::<Vec<_>>(),
            "secrets": secrets(certs),
        },
    })
}

/// Writes [`bootstrap`] to `<dir>/envoy-<pod>.json` (mode 0644) and returns its path.
pub fn write_bootstrap(
    dir: &Path,
    spec: &SidecarSpec,
    certs: &CertPaths,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("envoy-{}.json", spec.pod_name));
    let text = serde_json::to_string_pretty(&bootstrap(spec, certs))
        .context("serializing the bootstrap")?;
    write_public(&path, text.as_bytes())?;
    Ok(path)
}

/// Writes [`bootstrap_ads`] to `<dir>/envoy-<pod>.json` (mode 0644) and returns its path.
pub fn write_bootstrap_ads(
    dir: &Path,
    spec: &SidecarSpec,
    certs: &CertPaths,
    uds: &Path,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("envoy-{}.json", spec.pod_name));
    let text = serde_json::to_string_pretty(&bootstrap_ads(spec, certs, uds))
        .context("serializing the bootstrap")?;
    write_public(&path, text.as_bytes())?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Running Envoy

/// The Envoy binary installed by `scripts/install-envoy.sh`: `$MESHACCEL_ENVOY` if set, else
/// `$MESHACCEL_CACHE/envoy-1.40.0/envoy` (cache default `/var/cache/meshaccel`).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let path = match env::var_os("MESHACCEL_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache =
                env::var_os("MESHACCEL_CACHE").unwrap_or_else(|| "/var/cache/meshaccel".into());
            PathBuf::from(cache)
                .join(format!("envoy-{ENVOY_VERSION}"))
                .join("envoy")
        }
    };
    let meta = fs::metadata(&path).map_err(|e| {
        anyhow::anyhow!(
            "Envoy {ENVOY_VERSION} not found at {} ({e}): run scripts/install-envoy.sh",
            path.display()
        )
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o001 == 0 {
        bail!(
            "{} is not a file executable by other uids (Envoy runs as uid {PROXY_UID}): run scripts/install-envoy.sh",
            path.display()
        );
    }
    Ok(path)
}

/// Envoy's command line (without the binary) for one sidecar of a test: `--base-id` must differ
/// between the Envoys of one host, [`ENVOY_CONCURRENCY`] workers, logs to `log` (which uid 1337 must be able
/// to write: see [`create_log_file`]). Like Istio's agent, hot restart is disabled (so no shared
/// memory is used and the base id only keeps instances apart should it ever be enabled).
pub fn envoy_args(config: &Path, base_id: u32, log: &Path) -> Vec<String> {
    [
        "-c",
        &config.to_string_lossy(),
        "--base-id",
        &base_id.to_string(),
        "--concurrency",
        &ENVOY_CONCURRENCY.to_string(),
        "--disable-hot-restart",
        "--local-address-ip-version",
        "v4",
        "--drain-time-s",
        "1",
        "--drain-strategy",
        "immediate",
        "--file-flush-interval-msec",
        "200",
        "--log-level",
        "info",
        "--log-path",
        &log.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Creates (or truncates) `path` as a file owned by `uid:uid`, mode 0644, for Envoy's log.
pub fn create_log_file(path: &Path, uid: u32) -> anyhow::Result<()> {
    fs::write(path, b"").with_context(|| format!("creating {}", path.display()))?;
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .with_context(|| format!("chown {}", path.display()))?;
    chmod(path, 0o644)
}
