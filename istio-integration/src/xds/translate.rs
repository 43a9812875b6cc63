//! The core of the translation: the few facts meshaccel reads from listeners, clusters and
//! endpoints, and pure functions turning them into an [`XdsSnapshot`].
//!
//! Both sources of xDS resources go through here: typed resources received from istiod
//! ([`super::typed`]) and the JSON of an Envoy admin config dump ([`super::dump`]) are first
//! reduced to these facts, so the rules (and their validation, which decides ACK or NACK) exist
//! once.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::error::{Result, TranslateError};

/// Istio's outbound capture listener (`ISTIO_REDIRECT` sends the app's connections there).
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Istio's inbound capture listener (`ISTIO_IN_REDIRECT` sends incoming connections there).
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
/// Prefix of Istio's inbound passthrough clusters (`InboundPassthroughClusterIpv4`/`Ipv6`, and
/// the single dual-stack `InboundPassthroughCluster` of newer releases).
pub const INBOUND_PASSTHROUGH_PREFIX: &str = "InboundPassthroughCluster";
/// Prefix of the per-port inbound clusters (`inbound|8080||`), bound to the same source address
/// since Istio 1.10.
pub const INBOUND_CLUSTER_PREFIX: &str = "inbound|";
/// The endpoint metadata that marks a sidecar (mutual TLS capable) workload: istiod sets
/// `filter_metadata["envoy.transport_socket_match"]["tlsMode"] = "istio"` on the endpoints of pods
/// with a sidecar.
pub const TLS_MODE_FILTER: &str = "envoy.transport_socket_match";
pub const TLS_MODE_KEY: &str = "tlsMode";
pub const TLS_MODE_ISTIO: &str = "istio";

/// A socket address as a resource states it (not yet validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFact {
    pub address: String,
    /// `port_value`; `None` for a named port or none at all.
    pub port: Option<u32>,
}

/// What meshaccel reads from a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerFacts {
    pub name: String,
    /// `address.socket_address`; `None` for a pipe, an internal address or no address.
    pub socket: Option<SocketFact>,
    pub use_original_dst: bool,
}

/// What meshaccel reads from a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    pub name: String,
    /// `upstream_bind_config`: `source_address` and the extra/additional source addresses.
    pub bind_addresses: Vec<String>,
    /// For an EDS cluster, the name its endpoints are requested by (`service_name`, else the
    /// cluster name).
    pub eds_name: Option<String>,
    /// Inline endpoints (`load_assignment` of a STATIC cluster).
    pub inline_endpoints: Vec<EndpointFact>,
}

/// What meshaccel reads from one `LbEndpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointFact {
    /// `endpoint.address.socket_address`; `None` for a pipe or an internal address.
    pub socket: Option<SocketFact>,
    /// `metadata.filter_metadata["envoy.transport_socket_match"]["tlsMode"]`, when a string.
    pub tls_mode: Option<String>,
}

/// What meshaccel reads from a `ClusterLoadAssignment`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointsFacts {
    pub cluster_name: String,
    pub endpoints: Vec<EndpointFact>,
}

/// What one LDS response says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ListenerPart {
    pub outbound_port: Option<u16>,
    pub inbound_port: Option<u16>,
}

/// What one CDS response says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterPart {
    /// Source addresses of the inbound passthrough leg (sorted, no duplicates).
    pub inbound_passthrough_binds: Vec<IpAddr>,
    /// Names to request over EDS (sorted, no duplicates).
    pub eds_names: Vec<String>,
    /// Mesh endpoints of clusters with inline endpoints.
    pub inline_mesh_endpoints: BTreeSet<IpAddr>,
}

/// The versions of the state a snapshot was made from (`version_info` of the accepted
/// responses; a config dump's `version_info`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsVersions {
    pub listeners: String,
    pub clusters: String,
    pub endpoints: String,
}

/// Everything meshaccel learns from a sidecar's xDS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsSnapshot {
    /// Port of `virtualOutbound`; `None`: the sidecar has no outbound capture listener.
    pub outbound_port: Option<u16>,
    /// Port of `virtualInbound`; `None`: the sidecar has no inbound capture listener.
    pub inbound_port: Option<u16>,
    /// Source addresses Envoy binds the inbound passthrough leg (Envoy → app) to, from
    /// `InboundPassthroughCluster*` and `inbound|…` clusters (sorted, no duplicates).
    pub inbound_passthrough_binds: Vec<IpAddr>,
    /// Endpoint IPs with `tlsMode: istio`: workloads that have a sidecar.
    pub mesh_endpoints: BTreeSet<IpAddr>,
    pub versions: XdsVersions,
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// Validates a capture listener's address: an IP and a port 1..=65535.
fn capture_port(l: &ListenerFacts) -> Result<u16> {
    let Some(sock) = &l.socket else {
        return Err(TranslateError::resource(
            "listener",
            &l.name,
            "has no socket address (a capture listener must listen on an IP and port)",
        ));
    };
    if parse_ip(&sock.address).is_none() {
        return Err(TranslateError::resource(
            "listener",
            &l.name,
            format!("address {:?} is not an IP address", sock.address),
        ));
    }
    match sock.port {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Some(p) => Err(TranslateError::resource(
            "listener",
            &l.name,
            format!("port {p} is not a usable capture port (1..=65535)"),
        )),
        None => Err(TranslateError::resource(
            "listener",
            &l.name,
            "has no port_value (a named port cannot be a capture port)",
        )),
    }
}

/// Names are unique in a response; unnamed resources (static bootstrap listeners in a dump) are
/// not compared.
fn no_duplicates<'a>(kind: &'static str, names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = BTreeSet::new();
    for n in names.filter(|n| !n.is_empty()) {
        if !seen.insert(n) {
            return Err(TranslateError::Duplicate {
                kind,
                name: n.to_string(),
            });
        }
    }
    Ok(())
}

/// The capture ports of one complete set of listeners (an LDS response is state of the world).
///
/// `virtualOutbound` and `virtualInbound` must listen on an IP and a real port; anything else
/// about them, and every other listener, is Envoy's business, not meshaccel's.
pub fn listeners(facts: &[ListenerFacts]) -> Result<ListenerPart> {
    no_duplicates("listener", facts.iter().map(|l| l.name.as_str()))?;
    let mut out = ListenerPart::default();
    for l in facts {
        match l.name.as_str() {
            VIRTUAL_OUTBOUND => out.outbound_port = Some(capture_port(l)?),
            VIRTUAL_INBOUND => out.inbound_port = Some(capture_port(l)?),
            _ => {}
        }
    }
    Ok(out)
}

/// True for the clusters whose bind address is the inbound passthrough source.
pub fn is_inbound_passthrough(name: &str) -> bool {
    name.starts_with(INBOUND_PASSTHROUGH_PREFIX) || name.starts_with(INBOUND_CLUSTER_PREFIX)
}

/// The mesh endpoints among `endpoints` (of the cluster or CLA `owner`): IPs with `tlsMode:
/// istio`. Endpoints given by host name (DNS clusters) are skipped; a `tlsMode: istio` endpoint
/// whose address is neither an IP nor a host name is an error.
fn mesh_ips(
    kind: &'static str,
    owner: &str,
    endpoints: &[EndpointFact],
    out: &mut BTreeSet<IpAddr>,
) -> Result<()> {
    for e in endpoints {
        if e.tls_mode.as_deref() != Some(TLS_MODE_ISTIO) {
            continue;
        }
        let Some(sock) = &e.socket else { continue };
        match parse_ip(&sock.address) {
            Some(ip) => {
                out.insert(ip);
            }
            None if is_host_name(&sock.address) => {}
            None => {
                return Err(TranslateError::resource(
                    kind,
                    owner,
                    format!(
                        "endpoint address {:?} is neither an IP nor a host name",
                        sock.address
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The inbound passthrough addresses, EDS names and inline mesh endpoints of one complete set
/// of clusters (a CDS response is state of the world).
pub fn clusters(facts: &[ClusterFacts]) -> Result<ClusterPart> {
    no_duplicates("cluster", facts.iter().map(|c| c.name.as_str()))?;
    let mut binds = BTreeSet::new();
    let mut eds = BTreeSet::new();
    let mut out = ClusterPart::default();
    for c in facts {
        if is_inbound_passthrough(&c.name) {
            for a in &c.bind_addresses {
                let ip = parse_ip(a).ok_or_else(|| {
                    TranslateError::resource(
                        "cluster",
                        &c.name,
                        format!("upstream bind address {a:?} is not an IP address"),
                    )
                })?;
                binds.insert(ip);
            }
        }
        if let Some(n) = &c.eds_name {
            eds.insert(n.clone());
        }
        mesh_ips(
            "cluster",
            &c.name,
            &c.inline_endpoints,
            &mut out.inline_mesh_endpoints,
        )?;
    }
    out.inbound_passthrough_binds = binds.into_iter().collect();
    out.eds_names = eds.into_iter().collect();
    Ok(out)
}

/// The mesh endpoints of one `ClusterLoadAssignment`.
pub fn endpoints(facts: &EndpointsFacts) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    mesh_ips("endpoints", &facts.cluster_name, &facts.endpoints, &mut out)?;
    Ok(out)
}

/// The mesh endpoints of a set of `ClusterLoadAssignment`s (no two for the same cluster).
pub fn endpoints_all(facts: &[EndpointsFacts]) -> Result<BTreeMap<String, BTreeSet<IpAddr>>> {
    no_duplicates("endpoints", facts.iter().map(|e| e.cluster_name.as_str()))?;
    facts
        .iter()
        .map(|f| Ok((f.cluster_name.clone(), endpoints(f)?)))
        .collect()
}

/// The snapshot of the accepted parts: listeners, clusters and the endpoints of the clusters
/// that still exist (EDS state of a cluster that is gone is ignored).
pub fn snapshot(
    listeners: &ListenerPart,
    clusters: &ClusterPart,
    eds: &BTreeMap<String, BTreeSet<IpAddr>>,
    versions: XdsVersions,
) -> XdsSnapshot {
    let mut mesh = clusters.inline_mesh_endpoints.clone();
    for name in &clusters.eds_names {
        if let Some(ips) = eds.get(name) {
            mesh.extend(ips.iter().copied());
        }
    }
    XdsSnapshot {
        outbound_port: listeners.outbound_port,
        inbound_port: listeners.inbound_port,
        inbound_passthrough_binds: clusters.inbound_passthrough_binds.clone(),
        mesh_endpoints: mesh,
        versions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str, addr: &str, port: Option<u32>) -> ListenerFacts {
        ListenerFacts {
            name: name.into(),
            socket: Some(SocketFact {
                address: addr.into(),
                port,
            }),
            use_original_dst: false,
        }
    }

    #[test]
    fn listener_table() {
        struct Case {
            name: &'static str,
            facts: Vec<ListenerFacts>,
            want: std::result::Result<(Option<u16>, Option<u16>), &'static str>,
        }
        let cases = [
            Case {
                name: "istio defaults",
                facts: vec![
                    l("virtualOutbound", "0.0.0.0", Some(15001)),
                    l("virtualInbound", "0.0.0.0", Some(15006)),
                    l("10.0.0.1_80", "10.0.0.1", Some(80)),
                ],
                want: Ok((Some(15001), Some(15006))),
            },
            Case {
                name: "moved ports, IPv6 wildcard",
                facts: vec![
                    l("virtualOutbound", "::", Some(16001)),
                    l("virtualInbound", "0.0.0.0", Some(16006)),
                ],
                want: Ok((Some(16001), Some(16006))),
            },
            Case {
                name: "no capture listeners",
                facts: vec![l("x", "0.0.0.0", Some(1))],
                want: Ok((None, None)),
            },
            Case {
                name: "port 0",
                facts: vec![l("virtualInbound", "0.0.0.0", Some(0))],
                want: Err("listener virtualInbound: port 0"),
            },
            Case {
                name: "port too large",
                facts: vec![l("virtualOutbound", "0.0.0.0", Some(70000))],
                want: Err("listener virtualOutbound: port 70000"),
            },
            Case {
                name: "not an IP",
                facts: vec![l("virtualInbound", "not-an-ip", Some(15006))],
                want: Err("listener virtualInbound: address \"not-an-ip\""),
            },
            Case {
                name: "named port",
                facts: vec![l("virtualInbound", "0.0.0.0", None)],
                want: Err("listener virtualInbound: has no port_value"),
            },
            Case {
                name: "pipe",
                facts: vec![ListenerFacts {
                    name: "virtualOutbound".into(),
                    socket: None,
                    use_original_dst: true,
                }],
                want: Err("listener virtualOutbound: has no socket address"),
            },
            Case {
                name: "duplicate",
                facts: vec![
                    l("virtualInbound", "0.0.0.0", Some(15006)),
                    l("virtualInbound", "0.0.0.0", Some(15007)),
                ],
                want: Err("listener virtualInbound appears twice"),
            },
        ];
        for c in cases {
            match (listeners(&c.facts), c.want) {
                (Ok(p), Ok(w)) => assert_eq!((p.outbound_port, p.inbound_port), w, "{}", c.name),
                (Err(e), Err(w)) => assert!(e.to_string().starts_with(w), "{}: {e}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }

    fn ep(addr: &str, tls: Option<&str>) -> EndpointFact {
        EndpointFact {
            socket: Some(SocketFact {
                address: addr.into(),
                port: Some(80),
            }),
            tls_mode: tls.map(Into::into),
        }
    }

    #[test]
    fn clusters_and_endpoints() {
        let cs = vec![
            ClusterFacts {
                name: "InboundPassthroughCluster".into(),
                bind_addresses: vec!["127.0.0.6".into(), "::6".into()],
                eds_name: None,
                inline_endpoints: vec![],
            },
            ClusterFacts {
                name: "inbound|8080||".into(),
                bind_addresses: vec!["127.0.0.6".into()],
                eds_name: None,
                inline_endpoints: vec![],
            },
            ClusterFacts {
                name: "PassthroughCluster".into(),
                bind_addresses: vec!["10.9.9.9".into()],
                eds_name: None,
                inline_endpoints: vec![],
            },
            ClusterFacts {
                name: "outbound|80||a".into(),
                bind_addresses: vec![],
                eds_name: Some("outbound|80||a".into()),
                inline_endpoints: vec![],
            },
            ClusterFacts {
                name: "outbound|80||b".into(),
                bind_addresses: vec![],
                eds_name: None,
                inline_endpoints: vec![
                    ep("10.0.0.2", Some("istio")),
                    ep("10.0.0.3", None),
                    ep("b.example.com", Some("istio")),
                ],
            },
        ];
        let part = clusters(&cs).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            part.inbound_passthrough_binds,
            vec![ip("127.0.0.6"), ip("::6")]
        );
        assert_eq!(part.eds_names, vec!["outbound|80||a".to_string()]);
        let eds = endpoints_all(&[
            EndpointsFacts {
                cluster_name: "outbound|80||a".into(),
                endpoints: vec![
                    ep("10.0.0.4", Some("istio")),
                    ep("10.0.0.5", Some("disabled")),
                ],
            },
            EndpointsFacts {
                cluster_name: "gone".into(),
                endpoints: vec![ep("10.0.0.6", Some("istio"))],
            },
        ])
        .unwrap();
        let s = snapshot(
            &ListenerPart::default(),
            &part,
            &eds,
            XdsVersions::default(),
        );
        assert_eq!(
            s.mesh_endpoints.into_iter().collect::<Vec<_>>(),
            vec![ip("10.0.0.2"), ip("10.0.0.4")]
        );

        let bad = vec![ClusterFacts {
            name: "InboundPassthroughClusterIpv4".into(),
            bind_addresses: vec!["127.0.0.x".into()],
            eds_name: None,
            inline_endpoints: vec![],
        }];
        let e = clusters(&bad).unwrap_err().to_string();
        assert!(
            e.contains("InboundPassthroughClusterIpv4") && e.contains("127.0.0.x"),
            "{e}"
        );
        let e = endpoints(&EndpointsFacts {
            cluster_name: "outbound|80||c".into(),
            endpoints: vec![ep("10.0.0.1/8", Some("istio"))],
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("outbound|80||c") && e.contains("10.0.0.1/8"),
            "{e}"
        );
    }
}
