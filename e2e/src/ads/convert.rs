//! JSON xDS resources (proto3 JSON mapping, as `envoy.rs` writes them and as Envoy dumps them)
//! to typed envoy-types protos, for the test ADS server.
//!
//! There is no descriptor-driven JSON codec for envoy-types, so this maps fields explicitly:
//! * [`Mode::Full`] covers every field and typed config `envoy.rs` emits and rejects any other
//!   key (nothing is silently dropped: real Envoy ACKing the result and carrying mTLS traffic
//!   proves the conversion);
//! * [`Mode::Subset`] keeps, from real istiod dumps (full of Istio-only filters), what the
//!   agent reads (names, addresses, `use_original_dst`, cluster type, bind config, endpoints
//!   and their metadata) and drops the rest. Such resources are served to the agent only.
use anyhow::{Context as _, Result, anyhow, bail};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{CircuitBreakers, Cluster, circuit_breakers, cluster},
            core::v3::{
                Address, AggregatedConfigSource, ApiVersion, BindConfig, ConfigSource,
                ExtraSourceAddress, Metadata, SocketAddress, TrafficDirection, TransportSocket,
                address, config_source, socket_address, transport_socket,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
            },
            listener::v3::{
                Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
                ListenerFilterChainMatchPredicate, filter, listener_filter,
                listener_filter_chain_match_predicate,
            },
        },
        extensions::{
            filters::{
                listener::{original_dst::v3::OriginalDst, tls_inspector::v3::TlsInspector},
                network::tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
            transport_sockets::{
                raw_buffer::v3::RawBuffer,
                tls::v3::{
                    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
                    SdsSecretConfig, SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext,
                    common_tls_context, subject_alt_name_matcher, tls_parameters,
                },
            },
        },
        r#type::{
            matcher::v3::{StringMatcher, string_matcher},
            v3::Int32Range,
        },
    },
    google::protobuf::{Any, BoolValue, Duration, Struct, UInt32Value},
};
use istio_integration::xds::node::json_to_value;
use serde_json::{Map, Value};

/// How much of a resource to convert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything, unknown keys are errors (`envoy.rs`'s resources).
    Full,
    /// What meshaccel reads; everything else dropped (real dumps).
    Subset,
}

/// A JSON object whose keys are consumed one by one; in [`Mode::Full`], a key left unconsumed
/// is an error naming its path.
struct Obj<'a> {
    m: &'a Map<String, Value>,
    path: String,
    used: Vec<&'static str>,
    mode: Mode,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: impl Into<String>, mode: Mode) -> Result<Self> {
        let path = path.into();
        Ok(Self {
            m: v.as_object()
                .with_context(|| format!("{path}: not an object"))?,
            path,
            used: vec!["@type"],
            mode,
        })
    }
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.used.push(k);
        self.m.get(k)
    }
    fn at(&self, k: &str) -> String {
        format!("{}.{k}", self.path)
    }
    fn obj(&mut self, k: &'static str) -> Result<Option<Obj<'a>>> {
        let path = self.at(k);
        let mode = self.mode;
        self.get(k).map(|v| Obj::new(v, path, mode)).transpose()
    }
    fn str(&mut self, k: &'static str) -> Result<String> {
        match self.get(k) {
            None => Ok(String::new()),
            Some(v) => Ok(v
                .as_str()
                .with_context(|| format!("{}: not a string", self.at(k)))?
                .to_string()),
        }
    }
    fn u32(&mut self, k: &'static str) -> Result<Option<u32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let n = v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .with_context(|| format!("{}: not an unsigned number", self.at(k)))?;
                Ok(Some(u32::try_from(n).with_context(|| {
                    format!("{}: {n} does not fit 32 bits", self.at(k))
                })?))
            }
        }
    }
    fn bool(&mut self, k: &'static str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Object(o)) => Ok(o.get("value").and_then(Value::as_bool)),
            Some(_) => bail!("{}: not a bool", self.at(k)),
        }
    }
    fn arr(&mut self, k: &'static str) -> Result<Vec<(String, &'a Value)>> {
        let path = self.at(k);
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(v) => Ok(v
                .as_array()
                .with_context(|| format!("{path}: not an array"))?
                .iter()
                .enumerate()
                .map(|(i, x)| (format!("{path}[{i}]"), x))
                .collect()),
        }
    }
    fn strings(&mut self, k: &'static str) -> Result<Vec<String>> {
        self.arr(k)?
            .into_iter()
            .map(|(p, v)| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{p}: not a string"))
            })
            .collect()
    }
    fn duration(&mut self, k: &'static str) -> Result<Option<Duration>> {
        let s = self.str(k)?;
        if s.is_empty() {
            return Ok(None);
        }
        let secs = s
            .strip_suffix('s')
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("{}: {s:?} is not a duration", self.at(k)))?;
        Ok(Some(Duration {
            seconds: secs.trunc() as i64,
            nanos: (secs.fract() * 1e9).round() as i32,
        }))
    }
    fn finish(self) -> Result<()> {
        if self.mode == Mode::Full
            && let Some(k) = self.m.keys().find(|k| !self.used.contains(&k.as_str()))
        {
            bail!(
                "{}.{k}: not converted (add it to e2e/src/ads/convert.rs)",
                self.path
            );
        }
        Ok(())
    }
}

fn struct_of(v: &Value) -> Result<Struct> {
    match json_to_value(v).kind {
        Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(s)) => Ok(s),
        _ => bail!("not an object: {v}"),
    }
}

fn socket_address(o: &mut Obj) -> Result<SocketAddress> {
    let a = SocketAddress {
        address: o.str("address")?,
        port_specifier: o
            .u32("port_value")?
            .map(socket_address::PortSpecifier::PortValue),
        ..Default::default()
    };
    Ok(a)
}

fn address(v: &Value, path: String, mode: Mode) -> Result<Address> {
    let mut o = Obj::new(v, path, mode)?;
    let out = if let Some(mut s) = o.obj("socket_address")? {
        let a = socket_address(&mut s)?;
        s.finish()?;
        Some(address::Address::SocketAddress(a))
    } else if let Some(mut p) = o.obj("pipe")? {
        let path = p.str("path")?;
        p.get("mode");
        p.finish()?;
        Some(address::Address::Pipe(
            envoy_types::pb::envoy::config::core::v3::Pipe {
                path,
                ..Default::default()
            },
        ))
    } else {
        None
    };
    o.finish()?;
    Ok(Address { address: out })
}

fn metadata(v: &Value, path: String, mode: Mode) -> Result<Metadata> {
    let mut o = Obj::new(v, path, mode)?;
    let mut md = Metadata::default();
    if let Some(fm) = o.get("filter_metadata") {
        for (k, v) in fm
            .as_object()
            .with_context(|| format!("{}: not an object", o.at("filter_metadata")))?
        {
            md.filter_metadata.insert(k.clone(), struct_of(v)?);
        }
    }
    o.finish()?;
    Ok(md)
}

fn any<M: prost::Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

fn string_matcher(v: &Value, path: String) -> Result<StringMatcher> {
    let mut o = Obj::new(v, path, Mode::Full)?;
    let pattern = if let Some(x) = o.get("exact") {
        string_matcher::MatchPattern::Exact(x.as_str().context("exact")?.into())
    } else if let Some(x) = o.get("prefix") {
        string_matcher::MatchPattern::Prefix(x.as_str().context("prefix")?.into())
    } else {
        bail!("{}: only exact and prefix matchers are converted", o.path);
    };
    o.finish()?;
    Ok(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn tls_version(s: &str) -> Result<i32> {
    Ok(match s {
        "TLS_AUTO" => tls_parameters::TlsProtocol::TlsAuto,
        "TLSv1_0" => tls_parameters::TlsProtocol::TlSv10,
        "TLSv1_1" => tls_parameters::TlsProtocol::TlSv11,
        "TLSv1_2" => tls_parameters::TlsProtocol::TlSv12,
        "TLSv1_3" => tls_parameters::TlsProtocol::TlSv13,
        _ => bail!("unknown TLS version {s:?}"),
    } as i32)
}

fn sds(v: &Value, path: String) -> Result<SdsSecretConfig> {
    let mut o = Obj::new(v, path, Mode::Full)?;
    let name = o.str("name")?;
    o.finish()?;
    Ok(SdsSecretConfig {
        name,
        ..Default::default()
    })
}

fn common_tls(v: &Value, path: String) -> Result<CommonTlsContext> {
    let mut o = Obj::new(v, path, Mode::Full)?;
    let mut c = CommonTlsContext::default();
    if let Some(mut p) = o.obj("tls_params")? {
        let min = p.str("tls_minimum_protocol_version")?;
        let max = p.str("tls_maximum_protocol_version")?;
        c.tls_params = Some(TlsParameters {
            tls_minimum_protocol_version: if min.is_empty() {
                0
            } else {
                tls_version(&min)?
            },
            tls_maximum_protocol_version: if max.is_empty() {
                0
            } else {
                tls_version(&max)?
            },
            ..Default::default()
        });
        p.finish()?;
    }
    c.alpn_protocols = o.strings("alpn_protocols")?;
    c.tls_certificate_sds_secret_configs = o
        .arr("tls_certificate_sds_secret_configs")?
        .into_iter()
        .map(|(p, v)| sds(v, p))
        .collect::<Result<_>>()?;
    if let Some(mut cv) = o.obj("combined_validation_context")? {
        let mut default = CertificateValidationContext::default();
        if let Some(mut d) = cv.obj("default_validation_context")? {
            for (p, m) in d.arr("match_typed_subject_alt_names")? {
                let mut mo = Obj::new(m, p, Mode::Full)?;
                let san_type = match mo.str("san_type")?.as_str() {
                    "URI" => subject_alt_name_matcher::SanType::Uri,
                    "DNS" => subject_alt_name_matcher::SanType::Dns,
                    other => bail!("{}: san_type {other:?} not converted", mo.path),
                } as i32;
                let path = mo.at("matcher");
                let matcher = string_matcher(mo.get("matcher").context("matcher")?, path)?;
                mo.finish()?;
                default
                    .match_typed_subject_alt_names
                    .push(SubjectAltNameMatcher {
                        san_type,
                        matcher: Some(matcher),
                        ..Default::default()
                    });
            }
            d.finish()?;
        }
        let path = cv.at("validation_context_sds_secret_config");
        let sds_cfg = cv
            .get("validation_context_sds_secret_config")
            .map(|v| sds(v, path))
            .transpose()?;
        cv.finish()?;
        c.validation_context_type = Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(default),
                    validation_context_sds_secret_config: sds_cfg,
                    ..Default::default()
                },
            ),
        );
    }
    o.finish()?;
    Ok(c)
}

/// A `typed_config` (JSON with `@type`) as an `Any` of the types `envoy.rs` uses.
fn typed_config(v: &Value, path: String) -> Result<Any> {
    let ty = v
        .get("@type")
        .and_then(Value::as_str)
        .with_context(|| format!("{path}: no @type"))?;
    let mut o = Obj::new(v, path.clone(), Mode::Full)?;
    let out = match ty.rsplit('/').next().unwrap_or_default() {
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => any(
            ty,
            &TcpProxy {
                stat_prefix: o.str("stat_prefix")?,
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(o.str("cluster")?)),
                ..Default::default()
            },
        ),
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" => {
            let p = o.at("common_tls_context");
            let common = o
                .get("common_tls_context")
                .map(|c| common_tls(c, p))
                .transpose()?;
            any(
                ty,
                &DownstreamTlsContext {
                    common_tls_context: common,
                    require_client_certificate: o
                        .bool("require_client_certificate")?
                        .map(|value| BoolValue { value }),
                    ..Default::default()
                },
            )
        }
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => {
            let p = o.at("common_tls_context");
            let common = o
                .get("common_tls_context")
                .map(|c| common_tls(c, p))
                .transpose()?;
            any(
                ty,
                &UpstreamTlsContext {
                    common_tls_context: common,
                    sni: o.str("sni")?,
                    ..Default::default()
                },
            )
        }
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
            any(ty, &OriginalDst::default())
        }
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
            any(ty, &TlsInspector::default())
        }
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => {
            any(ty, &RawBuffer::default())
        }
        _ => bail!("{path}: typed config {ty} not converted"),
    };
    o.finish()?;
    Ok(out)
}

fn transport_socket(v: &Value, path: String) -> Result<TransportSocket> {
    let mut o = Obj::new(v, path, Mode::Full)?;
    let name = o.str("name")?;
    let p = o.at("typed_config");
    let tc = o
        .get("typed_config")
        .map(|t| typed_config(t, p))
        .transpose()?;
    o.finish()?;
    Ok(TransportSocket {
        name,
        config_type: tc.map(transport_socket::ConfigType::TypedConfig),
    })
}

fn filter_chain(v: &Value, path: String) -> Result<FilterChain> {
    let mut o = Obj::new(v, path, Mode::Full)?;
    let mut fc = FilterChain {
        name: o.str("name")?,
        ..Default::default()
    };
    if let Some(mut m) = o.obj("filter_chain_match")? {
        let mut fcm = FilterChainMatch {
            destination_port: m
                .u32("destination_port")?
                .map(|value| UInt32Value { value }),
            transport_protocol: m.str("transport_protocol")?,
            application_protocols: m.strings("application_protocols")?,
            ..Default::default()
        };
        for (p, r) in m.arr("prefix_ranges")? {
            let mut ro = Obj::new(r, p, Mode::Full)?;
            fcm.prefix_ranges
                .push(envoy_types::pb::envoy::config::core::v3::CidrRange {
                    address_prefix: ro.str("address_prefix")?,
                    prefix_len: ro.u32("prefix_len")?.map(|value| UInt32Value { value }),
                });
            ro.finish()?;
        }
        m.finish()?;
        fc.filter_chain_match = Some(fcm);
    }
    for (p, f) in o.arr("filters")? {
        let mut fo = Obj::new(f, p.clone(), Mode::Full)?;
        let name = fo.str("name")?;
        let tp = fo.at("typed_config");
        let tc = fo
            .get("typed_config")
            .map(|t| typed_config(t, tp))
            .transpose()?;
        fo.finish()?;
        fc.filters.push(Filter {
            name,
            config_type: tc.map(filter::ConfigType::TypedConfig),
        });
    }
    let p = o.at("transport_socket");
    fc.transport_socket = o
        .get("transport_socket")
        .map(|t| transport_socket(t, p))
        .transpose()?;
    o.finish()?;
    Ok(fc)
}

fn traffic_direction(s: &str) -> Result<i32> {
    Ok(match s {
        "" | "UNSPECIFIED" => TrafficDirection::Unspecified,
        "INBOUND" => TrafficDirection::Inbound,
        "OUTBOUND" => TrafficDirection::Outbound,
        _ => bail!("traffic_direction {s:?}"),
    } as i32)
}

/// A `Listener` from its JSON.
pub fn listener(v: &Value, mode: Mode) -> Result<Listener> {
    let mut o = Obj::new(v, "listener", mode)?;
    let mut l = Listener {
        name: o.str("name")?,
        ..Default::default()
    };
    o.path = format!("listener {}", l.name);
    let p = o.at("address");
    l.address = o.get("address").map(|a| address(a, p, mode)).transpose()?;
    l.use_original_dst = o.bool("use_original_dst")?.map(|value| BoolValue { value });
    l.traffic_direction = traffic_direction(&o.str("traffic_direction")?)?;
    l.bind_to_port = o.bool("bind_to_port")?.map(|value| BoolValue { value });
    if mode == Mode::Full {
        for (p, fc) in o.arr("filter_chains")? {
            l.filter_chains.push(filter_chain(fc, p)?);
        }
        for (p, lf) in o.arr("listener_filters")? {
            let mut lo = Obj::new(lf, p, Mode::Full)?;
            let name = lo.str("name")?;
            let tp = lo.at("typed_config");
            let tc = lo
                .get("typed_config")
                .map(|t| typed_config(t, tp))
                .transpose()?;
            let filter_disabled = match lo.obj("filter_disabled")? {
                None => None,
                Some(mut d) => {
                    let mut r = d
                        .obj("destination_port_range")?
                        .context("filter_disabled: only destination_port_range is converted")?;
                    let range = Int32Range {
                        start: r.u32("start")?.unwrap_or_default() as i32,
                        end: r.u32("end")?.unwrap_or_default() as i32,
                    };
                    r.finish()?;
                    d.finish()?;
                    Some(ListenerFilterChainMatchPredicate {
                        rule: Some(
                            listener_filter_chain_match_predicate::Rule::DestinationPortRange(
                                range,
                            ),
                        ),
                    })
                }
            };
            lo.finish()?;
            l.listener_filters.push(ListenerFilter {
                name,
                config_type: tc.map(listener_filter::ConfigType::TypedConfig),
                filter_disabled,
            });
        }
        l.listener_filters_timeout = o.duration("listener_filters_timeout")?;
        l.continue_on_listener_filters_timeout = o
            .bool("continue_on_listener_filters_timeout")?
            .unwrap_or_default();
    }
    o.finish()?;
    Ok(l)
}

fn lb_policy(s: &str) -> Result<i32> {
    Ok(match s {
        "" | "ROUND_ROBIN" => cluster::LbPolicy::RoundRobin,
        "LEAST_REQUEST" => cluster::LbPolicy::LeastRequest,
        "RANDOM" => cluster::LbPolicy::Random,
        "CLUSTER_PROVIDED" => cluster::LbPolicy::ClusterProvided,
        _ => bail!("lb_policy {s:?} not converted"),
    } as i32)
}

fn discovery_type(s: &str) -> Result<i32> {
    Ok(match s {
        "" | "STATIC" => cluster::DiscoveryType::Static,
        "STRICT_DNS" => cluster::DiscoveryType::StrictDns,
        "LOGICAL_DNS" => cluster::DiscoveryType::LogicalDns,
        "EDS" => cluster::DiscoveryType::Eds,
        "ORIGINAL_DST" => cluster::DiscoveryType::OriginalDst,
        _ => bail!("cluster type {s:?}"),
    } as i32)
}

/// A `ClusterLoadAssignment` from its JSON.
pub fn load_assignment(v: &Value, mode: Mode) -> Result<ClusterLoadAssignment> {
    let mut o = Obj::new(v, "load_assignment", mode)?;
    let mut cla = ClusterLoadAssignment {
        cluster_name: o.str("cluster_name")?,
        ..Default::default()
    };
    o.path = format!("endpoints {}", cla.cluster_name);
    for (p, loc) in o.arr("endpoints")? {
        let mut lo = Obj::new(loc, p, mode)?;
        let mut out = LocalityLbEndpoints::default();
        for (p, lb) in lo.arr("lb_endpoints")? {
            let mut bo = Obj::new(lb, p, mode)?;
            let mut e = LbEndpoint::default();
            if let Some(mut eo) = bo.obj("endpoint")? {
                let p = eo.at("address");
                let a = eo.get("address").map(|a| address(a, p, mode)).transpose()?;
                eo.finish()?;
                e.host_identifier = Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: a,
                    ..Default::default()
                }));
            }
            let p = bo.at("metadata");
            e.metadata = bo
                .get("metadata")
                .map(|m| metadata(m, p, mode))
                .transpose()?;
            bo.finish()?;
            out.lb_endpoints.push(e);
        }
        lo.finish()?;
        cla.endpoints.push(out);
    }
    o.finish()?;
    Ok(cla)
}

/// A `Cluster` from its JSON.
pub fn cluster(v: &Value, mode: Mode) -> Result<Cluster> {
    let mut o = Obj::new(v, "cluster", mode)?;
    let mut c = Cluster {
        name: o.str("name")?,
        ..Default::default()
    };
    o.path = format!("cluster {}", c.name);
    let ty = o.str("type")?;
    if !ty.is_empty() {
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(discovery_type(&ty)?));
    }
    if let Some(mut b) = o.obj("upstream_bind_config")? {
        let mut bc = BindConfig::default();
        if let Some(mut s) = b.obj("source_address")? {
            bc.source_address = Some(socket_address(&mut s)?);
            s.finish()?;
        }
        for (p, e) in b.arr("extra_source_addresses")? {
            let mut eo = Obj::new(e, p, mode)?;
            if let Some(mut a) = eo.obj("address")? {
                bc.extra_source_addresses.push(ExtraSourceAddress {
                    address: Some(socket_address(&mut a)?),
                    ..Default::default()
                });
                a.finish()?;
            }
            eo.finish()?;
        }
        for (p, e) in b.arr("additional_source_addresses")? {
            let mut eo = Obj::new(e, p, mode)?;
            #[allow(deprecated)]
            bc.additional_source_addresses
                .push(socket_address(&mut eo)?);
            eo.finish()?;
        }
        b.finish()?;
        c.upstream_bind_config = Some(bc);
    }
    if let Some(mut e) = o.obj("eds_cluster_config")? {
        let mut ecc = cluster::EdsClusterConfig {
            service_name: e.str("service_name")?,
            ..Default::default()
        };
        if let Some(mut cs) = e.obj("eds_config")? {
            let mut src = ConfigSource::default();
            if cs.get("ads").is_some() {
                src.config_source_specifier = Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                ));
            }
            src.initial_fetch_timeout = cs.duration("initial_fetch_timeout")?;
            if cs.str("resource_api_version")? == "V3" {
                src.resource_api_version = ApiVersion::V3 as i32;
            }
            if mode == Mode::Full {
                cs.finish()?;
            }
            ecc.eds_config = Some(src);
        }
        e.finish()?;
        c.eds_cluster_config = Some(ecc);
    }
    let p = o.at("load_assignment");
    c.load_assignment = o
        .get("load_assignment")
        .map(|l| load_assignment(l, mode).with_context(|| p.clone()))
        .transpose()?;
    let p = o.at("metadata");
    c.metadata = o
        .get("metadata")
        .map(|m| metadata(m, p, mode))
        .transpose()?;
    if mode == Mode::Full {
        c.connect_timeout = o.duration("connect_timeout")?;
        c.lb_policy = lb_policy(&o.str("lb_policy")?)?;
        if let Some(mut cb) = o.obj("circuit_breakers")? {
            let mut out = CircuitBreakers::default();
            for (p, t) in cb.arr("thresholds")? {
                let mut to = Obj::new(t, p, mode)?;
                let w = |x: Option<u32>| x.map(|value| UInt32Value { value });
                out.thresholds.push(circuit_breakers::Thresholds {
                    max_connections: w(to.u32("max_connections")?),
                    max_pending_requests: w(to.u32("max_pending_requests")?),
                    max_requests: w(to.u32("max_requests")?),
                    max_retries: w(to.u32("max_retries")?),
                    track_remaining: to.bool("track_remaining")?.unwrap_or_default(),
                    ..Default::default()
                });
                to.finish()?;
            }
            cb.finish()?;
            c.circuit_breakers = Some(out);
        }
        for (p, m) in o.arr("transport_socket_matches")? {
            let mut mo = Obj::new(m, p, mode)?;
            let name = mo.str("name")?;
            let r#match = mo.get("match").map(struct_of).transpose()?;
            let tp = mo.at("transport_socket");
            let ts = mo
                .get("transport_socket")
                .map(|t| transport_socket(t, tp))
                .transpose()?;
            mo.finish()?;
            c.transport_socket_matches
                .push(cluster::TransportSocketMatch {
                    name,
                    r#match,
                    transport_socket: ts,
                });
        }
    }
    o.finish()?;
    Ok(c)
}

/// The typed resources of a config dump's JSON (v3 only), in [`Mode::Subset`]: active (else
/// warming) listeners, dynamic clusters, dynamic endpoints. Rejected listeners are left out (the
/// sidecar does not run them).
pub fn from_dump(doc: &Value) -> Result<(Vec<Listener>, Vec<Cluster>, Vec<ClusterLoadAssignment>)> {
    let configs = doc
        .get("configs")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("not a config dump"))?;
    let (mut ls, mut cs, mut es) = (Vec::new(), Vec::new(), Vec::new());
    for c in configs {
        let ty = c.get("@type").and_then(Value::as_str).unwrap_or_default();
        if !ty.contains("envoy.admin.v3.") {
            if ty.contains("envoy.admin.") {
                bail!("{ty}: only v3 dumps can be served");
            }
            continue;
        }
        let items = |k: &str| {
            c.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        if ty.ends_with("ListenersConfigDump") {
            for d in items("dynamic_listeners") {
                if let Some(l) = d
                    .pointer("/active_state/listener")
                    .or_else(|| d.pointer("/warming_state/listener"))
                {
                    ls.push(listener(l, Mode::Subset)?);
                }
            }
        } else if ty.ends_with("ClustersConfigDump") {
            for d in items("dynamic_active_clusters") {
                if let Some(cl) = d.get("cluster") {
                    cs.push(cluster(cl, Mode::Subset)?);
                }
            }
        } else if ty.ends_with("EndpointsConfigDump") {
            for d in items("dynamic_endpoint_configs") {
                if let Some(e) = d.get("endpoint_config") {
                    es.push(load_assignment(e, Mode::Subset)?);
                }
            }
        }
    }
    Ok((ls, cs, es))
}
