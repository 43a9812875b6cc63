//! The node identity meshaccel presents to istiod.
//!
//! istiod serves configuration per proxy, and meshaccel asks as a sidecar would: the node id has
//! istiod's sidecar format `sidecar~<ip>~<name>.<namespace>~<namespace>.svc.<domain>` and the
//! metadata carries the keys istiod parses into its `NodeMetadata` (the same keys a real sidecar
//! sends: see the `node` of the fixtures' config dumps and of Istio's `default_golden` bootstrap).
//! On the TLS port (15012) istiod also checks that `NAMESPACE` and `SERVICE_ACCOUNT` equal the
//! identity of the bearer token, so they must be the agent's own (its pod's namespace and
//! service account). With `INTERCEPTION_MODE: REDIRECT`, istiod generates `virtualOutbound` and
//! `virtualInbound` and the inbound passthrough clusters exactly as for the node's sidecars (they
//! come from the mesh-wide ProxyConfig and do not depend on the pod), and outbound clusters with
//! EDS for every service visible from `NAMESPACE`, whose endpoints carry `tlsMode: istio` for
//! sidecar workloads.
use std::{collections::BTreeMap, net::IpAddr};

use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{Struct, Value, value::Kind},
};

/// Who meshaccel says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// This node's IP (the agent runs with the host network): `INSTANCE_IPS` and the id's IP.
    pub ip: IpAddr,
    /// `NAME`: the agent pod's name (e.g. `meshaccel-abcde`).
    pub name: String,
    /// `NAMESPACE`: the agent's namespace (the token's, on the TLS port).
    pub namespace: String,
    /// `SERVICE_ACCOUNT`: the agent's service account (the token's, on the TLS port).
    pub service_account: String,
    /// `NODE_NAME`: the Kubernetes node.
    pub node_name: String,
    /// `CLUSTER_ID` (Istio's default `Kubernetes`).
    pub cluster_id: String,
    /// The DNS domain suffix and `MESH_ID` (Istio's default `cluster.local`).
    pub domain: String,
    /// `ISTIO_VERSION`: istiod gates features on it; claim the mesh's version.
    pub istio_version: String,
}

impl NodeIdentity {
    /// istiod's sidecar node id.
    pub fn node_id(&self) -> String {
        format!(
            "sidecar~{}~{}.{}~{}.svc.{}",
            self.ip, self.name, self.namespace, self.namespace, self.domain
        )
    }

    /// The metadata, as a sidecar's pilot-agent sends it (the subset istiod reads).
    pub fn metadata(&self) -> BTreeMap<&'static str, serde_json::Value> {
        use serde_json::json;
        BTreeMap::from([
            ("NAME", json!(self.name)),
            ("NAMESPACE", json!(self.namespace)),
            ("INSTANCE_IPS", json!(self.ip.to_string())),
            ("INTERCEPTION_MODE", json!("REDIRECT")),
            ("SERVICE_ACCOUNT", json!(self.service_account)),
            ("WORKLOAD_NAME", json!("meshaccel")),
            ("NODE_NAME", json!(self.node_name)),
            ("CLUSTER_ID", json!(self.cluster_id)),
            ("MESH_ID", json!(self.domain)),
            ("ISTIO_VERSION", json!(self.istio_version)),
            (
                "LABELS",
                json!({ "app": "meshaccel", "service.istio.io/canonical-name": "meshaccel" }),
            ),
            // Not a real sidecar: nothing should be routed to this "proxy".
            ("POD_PORTS", json!("[]")),
        ])
    }

    /// The `Node` of the first request of a stream.
    pub fn to_node(&self) -> Node {
        Node {
            id: self.node_id(),
            cluster: format!("{}.{}", self.name, self.namespace),
            metadata: Some(Struct {
                fields: self
                    .metadata()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json_to_value(&v)))
                    .collect(),
            }),
            user_agent_name: "meshaccel".into(),
            user_agent_version_type: Some(
                envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").into(),
                ),
            ),
            ..Default::default()
        }
    }
}

/// A JSON value as a `google.protobuf.Value`.
pub fn json_to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// A `google.protobuf.Value` as JSON (numbers as f64, as protobuf has them).
pub fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(J::Null, J::Number),
        Some(Kind::StringValue(s)) => J::String(s.clone()),
        Some(Kind::ListValue(l)) => J::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => J::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_has_istiods_sidecar_shape() {
        let n = NodeIdentity {
            ip: "10.1.2.3".parse().unwrap(),
            name: "meshaccel-x1".into(),
            namespace: "meshaccel".into(),
            service_account: "meshaccel".into(),
            node_name: "node-1".into(),
            cluster_id: "Kubernetes".into(),
            domain: "cluster.local".into(),
            istio_version: "1.30.0".into(),
        };
        assert_eq!(
            n.node_id(),
            "sidecar~10.1.2.3~meshaccel-x1.meshaccel~meshaccel.svc.cluster.local"
        );
        let node = n.to_node();
        let md = value_to_json(&Value {
            kind: Some(Kind::StructValue(node.metadata.unwrap())),
        });
        assert_eq!(md["INTERCEPTION_MODE"], "REDIRECT");
        assert_eq!(md["INSTANCE_IPS"], "10.1.2.3");
        assert_eq!(md["LABELS"]["app"], "meshaccel");
        assert_eq!(node.cluster, "meshaccel-x1.meshaccel");
    }
}
