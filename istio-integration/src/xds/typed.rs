//! Facts from typed xDS resources (envoy-types protos, as received from istiod).
use envoy_types::pb::{
    envoy::config::{
        cluster::v3::{Cluster, cluster},
        core::v3::{Address, Metadata, address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        listener::v3::Listener,
    },
    google::protobuf::{Any, value::Kind},
};

use super::{
    error::{Result, TranslateError},
    translate::{
        ClusterFacts, EndpointFact, EndpointsFacts, ListenerFacts, SocketFact, TLS_MODE_FILTER,
        TLS_MODE_KEY,
    },
};

pub const TYPE_LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const TYPE_CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const TYPE_ENDPOINTS: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn socket(a: Option<&Address>) -> Option<SocketFact> {
    match a?.address.as_ref()? {
        address::Address::SocketAddress(s) => Some(SocketFact {
            address: s.address.clone(),
            port: match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => Some(p),
                _ => None,
            },
        }),
        _ => None,
    }
}

fn tls_mode(m: Option<&Metadata>) -> Option<String> {
    let s = m?.filter_metadata.get(TLS_MODE_FILTER)?;
    match s.fields.get(TLS_MODE_KEY)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.clone()),
        _ => None,
    }
}

pub fn listener(l: &Listener) -> ListenerFacts {
    ListenerFacts {
        name: l.name.clone(),
        socket: socket(l.address.as_ref()),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
    }
}

fn lb_endpoints(cla: &ClusterLoadAssignment) -> Vec<EndpointFact> {
    cla.endpoints
        .iter()
        .flat_map(|loc| &loc.lb_endpoints)
        .map(|lb| EndpointFact {
            socket: match &lb.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => socket(e.address.as_ref()),
                _ => None,
            },
            tls_mode: tls_mode(lb.metadata.as_ref()),
        })
        .collect()
}

pub fn cluster(c: &Cluster) -> ClusterFacts {
    let mut bind_addresses = Vec::new();
    if let Some(b) = &c.upstream_bind_config {
        bind_addresses.extend(b.source_address.iter().map(|s| s.address.clone()));
        bind_addresses.extend(
            b.extra_source_addresses
                .iter()
                .filter_map(|e| e.address.as_ref())
                .map(|s| s.address.clone()),
        );
        // Deprecated by extra_source_addresses, still what older istiod versions send.
        #[allow(deprecated)]
        bind_addresses.extend(
            b.additional_source_addresses
                .iter()
                .map(|s| s.address.clone()),
        );
    }
    let eds = matches!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32
    );
    let eds_name = eds.then(|| {
        c.eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| c.name.clone())
    });
    ClusterFacts {
        name: c.name.clone(),
        bind_addresses,
        eds_name,
        inline_endpoints: c
            .load_assignment
            .as_ref()
            .map(lb_endpoints)
            .unwrap_or_default(),
    }
}

pub fn endpoints(cla: &ClusterLoadAssignment) -> EndpointsFacts {
    EndpointsFacts {
        cluster_name: cla.cluster_name.clone(),
        endpoints: lb_endpoints(cla),
    }
}

/// Decodes every resource of a response as `M`; an error names the resource (by index, as it
/// has no readable name) and what went wrong.
fn decode_all<M: prost::Message + Default>(
    kind: &'static str,
    type_url: &str,
    resources: &[Any],
) -> Result<Vec<M>> {
    resources
        .iter()
        .enumerate()
        .map(|(i, any)| {
            if any.type_url != type_url {
                return Err(TranslateError::resource(
                    kind,
                    format!("#{i}"),
                    format!("has type {:?}, expected {type_url:?}", any.type_url),
                ));
            }
            M::decode(any.value.as_slice()).map_err(|e| {
                TranslateError::resource(kind, format!("#{i}"), format!("cannot be decoded: {e}"))
            })
        })
        .collect()
}

pub fn decode_listeners(resources: &[Any]) -> Result<Vec<ListenerFacts>> {
    Ok(
        decode_all::<Listener>("listener", TYPE_LISTENER, resources)?
            .iter()
            .map(listener)
            .collect(),
    )
}

pub fn decode_clusters(resources: &[Any]) -> Result<Vec<ClusterFacts>> {
    Ok(decode_all::<Cluster>("cluster", TYPE_CLUSTER, resources)?
        .iter()
        .map(cluster)
        .collect())
}

pub fn decode_endpoints(resources: &[Any]) -> Result<Vec<EndpointsFacts>> {
    Ok(
        decode_all::<ClusterLoadAssignment>("endpoints", TYPE_ENDPOINTS, resources)?
            .iter()
            .map(endpoints)
            .collect(),
    )
}

/// Packs a message as an `Any` of the given type URL.
pub fn to_any(type_url: &str, m: &impl prost::Message) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}
