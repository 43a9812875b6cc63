//! The static workloads file (YAML): which local workloads (pods) are accelerated.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Istio's capture configuration. Defaults are Istio's; xDS overrides them later.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capture {
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    #[serde(default = "default_proxy_uid")]
    pub proxy_uid: u32,
    /// Source addresses of Envoy's inbound passthrough (the sidecar → app leg).
    #[serde(default = "default_passthrough")]
    pub passthrough_addresses: Vec<IpAddr>,
}

fn default_passthrough() -> Vec<IpAddr> {
    vec![
        IpAddr::from([127, 0, 0, 6]),
        IpAddr::from([0, 0, 0, 0, 0, 0, 0, 6]),
    ]
}

/// Which connections of enabled workloads are accelerated.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Istio's three legs only (app ↔ sidecar via the capture ports, sidecar ↔ sidecar, the
    /// inbound passthrough).
    #[default]
    Mesh,
    /// Every TCP connection between sockets of enabled workloads on the node.
    All,
}

/// How a workload's apps read their sockets, which decides whether its app sockets may be
/// accelerated (kernel hazard 4: a socket in a sockmap reads through the kernel's tcp_bpf path,
/// where a blocking read can fail with EAGAIN and `splice` misses redirected bytes).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AppSockets {
    /// meshaccel finds out: an app's socket is accelerated towards its sidecar only while it is
    /// non-blocking, and nothing is redirected into it.
    #[default]
    Auto,
    /// The operator vouches that the apps read only with non-blocking `recv`/`read` (an event
    /// loop; no splice, no `SO_RCVLOWAT`): app sockets are accelerated like the sidecar's.
    Trusted,
}

impl AppSockets {
    /// The annotation's / file's value, or an error naming the accepted ones.
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        match v {
            "auto" => Ok(Self::Auto),
            "trusted" => Ok(Self::Trusted),
            _ => Err(format!("{v:?} is not one of \"auto\", \"trusted\"")),
        }
    }
}

fn default_outbound_port() -> u16 {
    15001
}
fn default_inbound_port() -> u16 {
    15006
}
fn default_proxy_uid() -> u32 {
    1337
}
fn yes() -> bool {
    true
}

impl Capture {
    /// Merges istiod's word (the xDS snapshot) in: a capture port or the passthrough addresses
    /// it states replace the configured ones; what it does not state (no `virtualInbound`
    /// listener, no passthrough cluster) leaves them as configured.
    pub fn apply_xds(&mut self, x: &istio_integration::xds::XdsSnapshot) {
        if let Some(p) = x.outbound_port {
            self.outbound_port = p;
        }
        if let Some(p) = x.inbound_port {
            self.inbound_port = p;
        }
        if !x.inbound_passthrough_binds.is_empty() {
            self.passthrough_addresses = x.inbound_passthrough_binds.clone();
        }
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self {
            outbound_port: default_outbound_port(),
            inbound_port: default_inbound_port(),
            proxy_uid: default_proxy_uid(),
            passthrough_addresses: default_passthrough(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Path of the workload's network namespace (e.g. /run/netns/reviews-v1).
    pub netns: PathBuf,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// `auto` (default) or `trusted`, see [`AppSockets`].
    #[serde(default)]
    pub app_sockets: AppSockets,
}

fn default_namespace() -> String {
    "default".into()
}

impl Workload {
    /// `namespace/name`, how errors and status name a workload.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadsFile {
    /// The global switch: false turns all acceleration off (live connections fall back to TCP).
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

impl WorkloadsFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadWorkloads {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates; every error names the entry and the field.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let invalid = |message: String| Error::InvalidWorkloads {
            path: path.into(),
            message,
        };
        let file: WorkloadsFile = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut names = BTreeSet::new();
        let mut ips: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut netns: BTreeMap<&Path, String> = BTreeMap::new();
        for (i, w) in file.workloads.iter().enumerate() {
            let entry = format!("workloads[{i}] ({})", w.id());
            if w.name.trim().is_empty() || w.namespace.trim().is_empty() {
                return Err(invalid(format!(
                    "workloads[{i}]: name and namespace must not be empty"
                )));
            }
            if !names.insert(w.id()) {
                return Err(invalid(format!("{entry}: duplicate workload {}", w.id())));
            }
            if !w.netns.is_absolute() {
                return Err(invalid(format!(
                    "{entry}: netns {} must be an absolute path",
                    w.netns.display()
                )));
            }
            if let Some(other) = netns.insert(&w.netns, w.id()) {
                return Err(invalid(format!(
                    "{entry}: netns {} is also the netns of {other}; one netns is one workload",
                    w.netns.display()
                )));
            }
            for ip in &w.ips {
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    return Err(invalid(format!("{entry}: {ip} is not a workload address")));
                }
                if let Some(other) = ips.insert(*ip, w.id()) {
                    return Err(invalid(format!(
                        "{entry}: IP {ip} is also assigned to {other}"
                    )));
                }
            }
            for (field, ports) in [
                ("excludeInboundPorts", &w.exclude_inbound_ports),
                ("excludeOutboundPorts", &w.exclude_outbound_ports),
            ] {
                if ports.contains(&0) {
                    return Err(invalid(format!("{entry}: {field}: port 0 is not a port")));
                }
            }
        }
        for (field, port) in [
            ("capture.outboundPort", file.capture.outbound_port),
            ("capture.inboundPort", file.capture.inbound_port),
        ] {
            if port == 0 {
                return Err(invalid(format!("{field}: port 0 is not a port")));
            }
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WorkloadsFile> {
        WorkloadsFile::parse(Path::new("w.yaml"), text)
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let f = parse(
            "capture:\n  outboundPort: 15001\n  inboundPort: 15006\n  proxyUid: 1337\nworkloads:\n  - name: reviews-v1\n    namespace: bookinfo\n    netns: /run/netns/reviews-v1\n    ips: [10.77.0.2]\n    enabled: true\n    excludeInboundPorts: [15020]\n    excludeOutboundPorts: []\n",
        )
        .unwrap();
        assert!(f.enabled);
        assert_eq!(f.capture, Capture::default());
        assert_eq!(f.workloads[0].id(), "bookinfo/reviews-v1");
        assert_eq!(f.workloads[0].exclude_inbound_ports, vec![15020]);
        let minimal = parse("workloads:\n  - name: a\n    netns: /run/netns/a\n").unwrap();
        assert!(minimal.workloads[0].enabled);
        assert_eq!(minimal.workloads[0].namespace, "default");
        assert_eq!(minimal.workloads[0].app_sockets, AppSockets::Auto);
        let trusted =
            parse("workloads:\n  - name: a\n    netns: /run/netns/a\n    appSockets: trusted\n")
                .unwrap();
        assert_eq!(trusted.workloads[0].app_sockets, AppSockets::Trusted);
        assert!(parse("").is_ok_and(|f| f.workloads.is_empty()));
    }

    #[track_caller]
    fn rejects(text: &str, needles: &[&str]) {
        let err = parse(text).expect_err("must be rejected").to_string();
        for n in needles {
            assert!(err.contains(n), "error {err:?} should mention {n:?}");
        }
        assert!(err.contains("w.yaml"), "error {err:?} should name the file");
    }

    #[test]
    fn bad_input_is_rejected_with_the_entry_named() {
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    colour: red\n",
            &["workloads[0]", "colour"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    ips: [10.0.0.300]\n",
            &["workloads[0]"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    appSockets: yes\n",
            &["workloads[0]", "appSockets", "auto", "trusted"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    ips: [10.0.0.2]\n  - name: b\n    netns: /y\n    ips: [10.0.0.2]\n",
            &["workloads[1] (default/b)", "10.0.0.2", "default/a"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n  - name: a\n    netns: /y\n",
            &["duplicate", "default/a"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n  - name: b\n    netns: /x\n",
            &["workloads[1]", "/x"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: relative\n",
            &["absolute"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    ips: [127.0.0.1]\n",
            &["not a workload address"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    excludeInboundPorts: [70000]\n",
            &["workloads[0]"],
        );
        rejects(
            "workloads:\n  - name: a\n    netns: /x\n    excludeOutboundPorts: [0]\n",
            &["excludeOutboundPorts"],
        );
        rejects("workloads:\n  - netns: /x\n", &["name"]);
        rejects("enabled: maybe\n", &["enabled"]);
        rejects("capture:\n  inboundPort: 0\n", &["capture.inboundPort"]);
        rejects("workloads: {}\n", &["workloads"]);
    }
}
