//! Istio-injected workloads for the cluster tests, without istiod: the objects Istio's sidecar
//! injector and istiod would produce for a Deployment, written out by hand.
//!
//! A [`Workload`] becomes a ServiceAccount, a Service, a ConfigMap with the sidecar's Envoy
//! bootstrap, a Secret with its mTLS certificate (issued by the test's mesh CA, [`Pki`]) and a
//! Deployment whose pod carries what the injector writes:
//! - labels `security.istio.io/tlsMode: istio`, `service.istio.io/canonical-*`, and the
//!   `sidecar.istio.io/status` annotation;
//! - an `istio-init` init container with istio-iptables' own arguments (`-p 15001 -z 15006 -u
//!   1337 -m REDIRECT ...`), NET_ADMIN + NET_RAW, run by the tool's `istio-iptables` stand-in,
//!   which applies the capture rules istio-integration renders (proven equal to Istio's);
//! - an `istio-proxy` container: real Envoy 1.40 as uid 1337, configured as istiod configures a
//!   sidecar (virtualOutbound/virtualInbound, the 127.0.0.6 passthrough, mTLS between sidecars:
//!   [`crate::envoy::bootstrap`]). Like pilot-agent it fills in the pod's IP at start (the
//!   bootstrap is written with [`POD_IP_PLACEHOLDER`]);
//! - the app container: `meshaccel-e2e-tool <app args>` as uid 1000.
//!
//! Pure: the manifests are returned as one `v1/List` (JSON) for `kubectl apply`.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    APP_UID, PROXY_UID,
    envoy::{self, CertPaths, ENVOY_CONCURRENCY, Pki, SidecarSpec},
};

/// Written into the bootstrap where the pod's IP goes; the proxy container replaces it with
/// `$POD_IP` (a TEST-NET-1 address: never a real pod's).
pub const POD_IP_PLACEHOLDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The tool inside the mesh image.
pub const TOOL: &str = "/usr/local/bin/meshaccel-e2e-tool";
/// Where the proxy container finds its bootstrap and certificates.
const PROXY_CONFIG_DIR: &str = "/etc/istio/proxy";
const CERTS_DIR: &str = "/etc/certs";

/// One injected workload (a Deployment of one pod).
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// The proxy image: Envoy, iptables and the tool (the init and proxy containers).
    pub image: String,
    /// The app container's image (default: `image`).
    pub app_image: Option<String>,
    /// The app: `meshaccel-e2e-tool <app...>`.
    pub app: Vec<String>,
    /// Ports the app listens on.
    pub ports: Vec<u16>,
    /// Services it calls: (name = the server workload, its pod IP, port). Static, as the
    /// bootstrap is: a server that moves needs its clients re-created.
    pub upstreams: Vec<(String, Ipv4Addr, u16)>,
    /// Extra pod labels (e.g. the opt-out `meshaccel.io/enabled: "false"`).
    pub pod_labels: BTreeMap<String, String>,
    /// Extra pod annotations (e.g. `meshaccel.io/app-sockets: trusted`).
    pub pod_annotations: BTreeMap<String, String>,
}

impl Workload {
    pub fn new(name: &str, namespace: &str, image: &str) -> Self {
        Workload {
            name: name.into(),
            namespace: namespace.into(),
            image: image.into(),
            app_image: None,
            app: Vec::new(),
            ports: Vec::new(),
            upstreams: Vec::new(),
            pod_labels: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
        }
    }

    /// The sidecar's bootstrap (with [`POD_IP_PLACEHOLDER`]) as the proxy container reads it.
    pub fn bootstrap(&self) -> Value {
        let spec = SidecarSpec {
            pod_name: self.name.clone(),
            pod_ip: POD_IP_PLACEHOLDER,
            inbound_ports: self.ports.clone(),
            upstreams: self.upstreams.clone(),
            admin_port: crate::sidecar::ADMIN_PORT,
        };
        let certs = CertPaths {
            cert_chain: PathBuf::from(CERTS_DIR).join("cert-chain.pem"),
            private_key: PathBuf::from(CERTS_DIR).join("key.pem"),
            root_cert: PathBuf::from(CERTS_DIR).join("root-cert.pem"),
        };
        envoy::bootstrap(&spec, &certs)
    }

    fn pod_labels(&self) -> Value {
        let mut labels: BTreeMap<String, String> = [
            ("app", self.name.as_str()),
            ("security.istio.io/tlsMode", "istio"),
            ("service.istio.io/canonical-name", self.name.as_str()),
            ("service.istio.io/canonical-revision", "latest"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        labels.extend(self.pod_labels.clone());
        json!(labels)
    }

    fn pod_spec(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
            .collect();
        // pilot-agent's part: the pod IP into the bootstrap, then Envoy as Istio starts it.
        let proxy_script = format!(
            "sed \"s/{POD_IP_PLACEHOLDER}/$POD_IP/g\" {PROXY_CONFIG_DIR}/envoy.json > /tmp/envoy.json && \
             exec envoy -c /tmp/envoy.json --concurrency {ENVOY_CONCURRENCY} --disable-hot-restart \
             --local-address-ip-version v4 --drain-time-s 1 --drain-strategy immediate --log-level warning"
        );
        json!({
            "serviceAccountName": self.name,
            "terminationGracePeriodSeconds": 2,
            "initContainers": [{
                "name": "istio-init",
                "image": self.image,
                "imagePullPolicy": "Never",
                "command": [TOOL],
                "args": istio_integration::annotations::INJECTOR_INIT_ARGS,
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                    "privileged": false,
                    "readOnlyRootFilesystem": false,
                    "runAsGroup": 0,
                    "runAsNonRoot": false,
                    "runAsUser": 0,
                },
            }],
            "containers": [
                {
                    "name": "app",
                    "image": self.app_image.as_ref().unwrap_or(&self.image),
                    "imagePullPolicy": "Never",
                    "command": [TOOL],
                    "args": self.app,
                    "ports": ports,
                    "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
                },
                {
                    "name": "istio-proxy",
                    "image": self.image,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", proxy_script],
                    "env": [
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    ],
                    "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]},
                        "privileged": false,
                        "readOnlyRootFilesystem": false,
                        "runAsGroup": PROXY_UID,
                        "runAsNonRoot": true,
                        "runAsUser": PROXY_UID,
                    },
                    "volumeMounts": [
                        {"name": "istio-envoy", "mountPath": PROXY_CONFIG_DIR, "readOnly": true},
                        {"name": "istio-certs", "mountPath": CERTS_DIR, "readOnly": true},
                    ],
                },
            ],
            "volumes": [
                {"name": "istio-envoy", "configMap": {"name": format!("{}-istio-proxy", self.name)}},
                {"name": "istio-certs", "secret": {"secretName": format!("{}-istio-certs", self.name)}},
            ],
        })
    }

    /// Every object of the workload, as one `v1/List` for `kubectl apply -f -`; its
    /// certificate is issued by `pki`.
    pub fn manifests(&self, pki: &Pki) -> anyhow::Result<Value> {
        let certs = pki.issue(&self.name)?;
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let bootstrap =
            serde_json::to_string_pretty(&self.bootstrap()).context("serializing the bootstrap")?;
        let meta = |name: String| json!({"name": name, "namespace": self.namespace});
        let status = json!({
            "initContainers": ["istio-init"],
            "containers": ["istio-proxy"],
            "volumes": ["istio-envoy", "istio-certs"],
            "imagePullSecrets": null,
            "revision": "default",
        });
        let mut annotations: BTreeMap<String, String> = [
            ("sidecar.istio.io/status", status.to_string()),
            ("kubectl.kubernetes.io/default-container", "app".into()),
            ("kubectl.kubernetes.io/default-logs-container", "app".into()),
            ("prometheus.io/port", "15020".into()),
            ("prometheus.io/scrape", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        annotations.extend(self.pod_annotations.clone());
        let service_ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": format!("tcp-{p}"), "port": p, "targetPort": p}))
            .collect();
        let mut items = vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(self.name.clone())}),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": meta(format!("{}-istio-proxy", self.name)),
                   "data": {"envoy.json": bootstrap}}),
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": meta(format!("{}-istio-certs", self.name)),
            "stringData": {
                "cert-chain.pem": read(&certs.cert_chain)?,
                "key.pem": read(&certs.private_key)?,
                "root-cert.pem": read(&certs.root_cert)?,
            }}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(self.name.clone()),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": self.name}},
                "template": {
                    "metadata": {
                        "labels": self.pod_labels(),
                        "annotations": annotations,
                    },
                    "spec": self.pod_spec(),
                },
            }}),
        ];
        if !service_ports.is_empty() {
            items.push(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": meta(self.name.clone()),
                "spec": {"selector": {"app": self.name}, "ports": service_ports}}));
        }
        Ok(json!({"apiVersion": "v1", "kind": "List", "items": items}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_is_what_the_injector_writes() {
        let mut w = Workload::new("server", "mesh", "img:1");
        w.ports = vec![8080];
        w.app = vec!["echo".into(), "--listen".into(), "0.0.0.0:8080".into()];
        let spec = w.pod_spec();
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], "istio-init");
        assert_eq!(init["args"][0], "istio-iptables");
        assert_eq!(spec["containers"][1]["name"], "istio-proxy");
        assert_eq!(
            spec["containers"][1]["securityContext"]["runAsUser"],
            PROXY_UID
        );
        assert!(
            spec["containers"][1]["command"][2]
                .as_str()
                .unwrap()
                .contains("192.0.2.254/$POD_IP")
        );
        let labels = w.pod_labels();
        assert_eq!(labels["security.istio.io/tlsMode"], "istio");
        // The bootstrap carries the placeholder where the pod IP goes.
        assert!(w.bootstrap().to_string().contains("192.0.2.254"));
    }
}
