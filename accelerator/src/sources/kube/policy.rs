//! Which node-local pods are accelerated, and with which exclusions: a pure function of the pods,
//! their namespaces' labels, the node's capture configuration and a pod IP → netns lookup.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use istio_integration::annotations::{
    self as ann, CaptureFlags, InterceptionMode, PortSet, TrafficAnnotations,
};
use k8s_openapi::api::core::v1::Pod;

use crate::{
    desired::{Inputs, NetnsRef, WorkloadSpec},
    sources::kube::podnetns::Lookup,
    workloads::{AppSockets, Capture},
};

/// The opt-in label, on namespaces and (overriding) on pods.
pub const ENABLED_LABEL: &str = "meshaccel.io/enabled";

/// The opt-in label key in force (`--opt-in-label`): [`ENABLED_LABEL`] unless the agent was given
/// another one; checked once, where the flag is parsed, and handed to the policy with its inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptInLabel(String);

impl Default for OptInLabel {
    fn default() -> Self {
        Self(ENABLED_LABEL.into())
    }
}

impl OptInLabel {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks Kubernetes' syntax for label keys: an optional DNS-subdomain prefix and `/`, then a
    /// name of at most 63 characters of `[A-Za-z0-9._-]` that starts and ends alphanumeric.
    pub fn parse(key: &str) -> Result<Self, String> {
        let (prefix, name) = match key.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, key),
        };
        let alnum = |c: char| c.is_ascii_alphanumeric();
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| alnum(c) || "._-".contains(c))
            && name.starts_with(alnum)
            && name.ends_with(alnum);
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.split('.').all(|l| {
                    !l.is_empty()
                        && l.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                })
        });
        if !(name_ok && prefix_ok) {
            return Err(format!(
                "{key:?} is not a Kubernetes label key (prefix/name, e.g. meshaccel.io/enabled)"
            ));
        }
        Ok(Self(key.to_string()))
    }
}

/// Why a pod is or is not accelerated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accelerated with these exclusions (once its netns is known).
    Accelerate {
        ip: IpAddr,
        exclude_inbound_ports: Vec<u16>,
        exclude_outbound_ports: Vec<u16>,
        app_sockets: AppSockets,
    },
    /// Not accelerated, and nothing is wrong (no sidecar, not opted in, not running, ...).
    Skip(&'static str),
    /// Not accelerated because its configuration cannot be honoured (a malformed annotation, a
    /// capture the kernel cannot recognise): reported with a Kubernetes Event and a log line.
    Invalid(String),
}

/// The decision for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub outcome: Outcome,
}

/// Everything the controller learns from one computation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeDesired {
    /// The Kubernetes source's contribution: accelerated pods whose netns is known.
    pub inputs: Inputs,
    /// Every node-local pod, sorted by id.
    pub decisions: Vec<Decision>,
    /// Accelerated pods whose IP is on no (or on more than one) netns of this node yet.
    pub unresolved: Vec<(String, IpAddr, Lookup)>,
    /// Pods left out because another pod claims the same netns: (pod, the other).
    pub conflicts: Vec<(String, String)>,
}

fn bool_label(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Decides one pod. `ns_labels`: the labels of its namespace (`None` when the namespace is not
/// known (yet): not opted in).
pub fn decide(
    pod: &Pod,
    ns_labels: Option<&BTreeMap<String, String>>,
    capture: &Capture,
    label: &OptInLabel,
) -> Decision {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let outcome = outcome(pod, ns_labels, capture, label);
    Decision {
        id: format!("{namespace}/{name}"),
        namespace,
        name,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        outcome,
    }
}

fn outcome(
    pod: &Pod,
    ns_labels: Option<&BTreeMap<String, String>>,
    capture: &Capture,
    label: &OptInLabel,
) -> Outcome {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();

    let proxy = spec.and_then(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .find(|c| c.name == ann::PROXY_CONTAINER)
    });
    if !annotations.contains_key(ann::SIDECAR_STATUS) && proxy.is_none() {
        return Outcome::Skip("no Istio sidecar");
    }
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Outcome::Skip("hostNetwork pod");
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Outcome::Skip("terminating");
    }
    // Opt-in: the pod label wins both ways, else the namespace label.
    let pod_label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label.as_str()));
    let on = match pod_label {
        Some(v) => match bool_label(v) {
            Some(b) => b,
            None => {
                return Outcome::Invalid(format!(
                    "pod label {}={v:?}: must be \"true\" or \"false\"",
                    label.as_str()
                ));
            }
        },
        None => match ns_labels.and_then(|l| l.get(label.as_str())) {
            None => false,
            Some(v) => match bool_label(v) {
                Some(b) => b,
                None => {
                    return Outcome::Invalid(format!(
                        "namespace label {}={v:?}: must be \"true\" or \"false\" (fix the namespace's label; its pods stay on plain TCP meanwhile)",
                        label.as_str()
                    ));
                }
            },
        },
    };
    if !on {
        return Outcome::Skip(if pod_label.is_some() {
            "opted out by pod label"
        } else {
            "namespace not opted in"
        });
    }
    if status.and_then(|s| s.phase.as_deref()) != Some("Running") {
        return Outcome::Skip("not Running");
    }
    let ip = status.and_then(|s| {
        s.pod_ips
            .as_ref()
            .and_then(|ips| ips.first().map(|i| i.ip.clone()))
            .or_else(|| s.pod_ip.clone())
    });
    let Some(ip) = ip.filter(|i| !i.is_empty()) else {
        return Outcome::Skip("no pod IP yet");
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return Outcome::Invalid(format!("status.podIP {ip:?} is no IP address"));
    };

    let traffic = match TrafficAnnotations::parse(annotations) {
        Ok(t) => t,
        Err(e) => return Outcome::Invalid(format!("malformed annotation {e}")),
    };
    let app_sockets = match annotations
        .get(ann::APP_SOCKETS)
        .map(|v| AppSockets::parse(v))
    {
        None => AppSockets::Auto,
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            return Outcome::Invalid(format!(
                "malformed annotation {}: {e} (remove it for the default, auto)",
                ann::APP_SOCKETS
            ));
        }
    };
    if traffic.interception_mode == InterceptionMode::None {
        return Outcome::Skip("interceptionMode NONE: Istio captures nothing");
    }

    // The sidecar's capture as the pod spec says it (istio-init's istio-iptables arguments, the
    // proxy's runAsUser), checked against the node's: the kernel recognises Istio's legs by one
    // capture configuration per node, so a pod that differs would not be paired correctly.
    let mut flags = CaptureFlags::default();
    if let Some(init) = spec.and_then(|s| {
        s.init_containers
            .iter()
            .flatten()
            .find(|c| c.name == ann::INIT_CONTAINER)
    }) {
        let args: Vec<String> = init
            .command
            .iter()
            .flatten()
            .chain(init.args.iter().flatten())
            .cloned()
            .collect();
        match CaptureFlags::parse_istio_iptables(&args) {
            Ok(f) => flags = f,
            Err(e) => return Outcome::Invalid(format!("malformed {e}")),
        }
    }
    let run_as = proxy
        .and_then(|c| c.security_context.as_ref())
        .and_then(|s| s.run_as_user)
        .or_else(|| {
            spec.and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.run_as_user)
        });
    if flags.proxy_uid.is_none() {
        flags.proxy_uid = run_as.and_then(|u| u32::try_from(u).ok());
    }
    for (what, got, want) in [
        (
            "outbound capture port",
            flags.outbound_port.map(u32::from),
            u32::from(capture.outbound_port),
        ),
        (
            "inbound capture port",
            flags.inbound_port.map(u32::from),
            u32::from(capture.inbound_port),
        ),
        ("proxy UID", flags.proxy_uid, capture.proxy_uid),
    ] {
        if let Some(got) = got.filter(|g| *g != want) {
            return Outcome::Invalid(format!(
                "sidecar {what} is {got} but this node's capture configuration says {want}"
            ));
        }
    }

    // includeInboundPorts narrows the captured inbound ports: the pod's declared ports outside
    // it are excluded too (for any port, uncaptured traffic is no Istio leg in the mesh scope).
    let mut exclude_in: BTreeSet<u16> = traffic.exclude_inbound_ports.iter().copied().collect();
    if let PortSet::Only(included) = &traffic.include_inbound_ports {
        for c in spec.iter().flat_map(|s| s.containers.iter()) {
            if c.name == ann::PROXY_CONTAINER {
                continue;
            }
            for p in c.ports.iter().flatten() {
                if p.protocol.as_deref().is_none_or(|p| p == "TCP")
                    && let Ok(port) = u16::try_from(p.container_port)
                    && !included.contains(&port)
                {
                    exclude_in.insert(port);
                }
            }
        }
    }
    Outcome::Accelerate {
        ip,
        exclude_inbound_ports: exclude_in.into_iter().collect(),
        exclude_outbound_ports: {
            let mut v = traffic.exclude_outbound_ports.clone();
            v.sort_unstable();
            v
        },
        app_sockets,
    }
}

/// The desired contribution of the Kubernetes source. `namespaces`: name → labels. `netns_of`
/// resolves a pod IP on this node (the only side effect, passed in).
pub fn compute<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    capture: &Capture,
    label: &OptInLabel,
    mut netns_of: impl FnMut(&str, IpAddr) -> Lookup,
) -> KubeDesired {
    let mut decisions: Vec<Decision> = pods
        .into_iter()
        .map(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            decide(p, namespaces.get(ns), capture, label)
        })
        .collect();
    decisions.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = KubeDesired {
        inputs: Inputs {
            enabled: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut owner: BTreeMap<u64, String> = BTreeMap::new();
    for d in &decisions {
        let Outcome::Accelerate {
            ip,
            exclude_inbound_ports,
            exclude_outbound_ports,
            app_sockets,
        } = &d.outcome
        else {
            continue;
        };
        let cookie = match netns_of(&d.id, *ip) {
            Lookup::Found(c) => c,
            other => {
                out.unresolved.push((d.id.clone(), *ip, other));
                continue;
            }
        };
        if let Some(other) = owner.get(&cookie) {
            out.conflicts.push((d.id.clone(), other.clone()));
            continue;
        }
        owner.insert(cookie, d.id.clone());
        out.inputs.workloads.push(WorkloadSpec {
            id: d.id.clone(),
            netns: NetnsRef::Cookie(cookie),
            enabled: true,
            exclude_inbound_ports: exclude_inbound_ports.clone(),
            exclude_outbound_ports: exclude_outbound_ports.clone(),
            app_sockets: *app_sockets,
        });
    }
    out.decisions = decisions;
    out
}

#[cfg(test)]
mod label_tests {
    use super::OptInLabel;

    #[test]
    fn bad_label_keys_are_refused_with_the_fix() {
        for bad in [
            "",
            "a/",
            "/x",
            "Bad_Prefix.io/x",
            "x/-y",
            "x/y-",
            &"n".repeat(64),
        ] {
            let e = OptInLabel::parse(bad).unwrap_err();
            assert!(e.contains("not a Kubernetes label key"), "{bad:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(v: Value) -> Pod {
        // Defaults: an injected, Running pod with an IP in namespace "mesh".
        let mut base = json!({
            "metadata": {
                "name": "p", "namespace": "mesh", "uid": "u1",
                "annotations": {"sidecar.istio.io/status": "{}"}
            },
            "spec": {"nodeName": "n1", "containers": [
                {"name": "app", "image": "app", "ports": [{"containerPort": 8080}, {"containerPort": 9090}, {"containerPort": 53, "protocol": "UDP"}]},
                {"name": "istio-proxy", "image": "proxy"}
            ]},
            "status": {"phase": "Running", "podIP": "10.1.0.2"}
        });
        merge(&mut base, v);
        serde_json::from_value(base).unwrap()
    }

    /// JSON merge patch (RFC 7386).
    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    if v.is_null() {
                        a.remove(&k);
                    } else {
                        merge(a.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (a, b) => *a = b,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn on_ns() -> BTreeMap<String, String> {
        labels(&[(ENABLED_LABEL, "true")])
    }

    #[test]
    fn decisions_table() {
        struct Case {
            name: &'static str,
            pod: Value,
            ns: Option<BTreeMap<String, String>>,
            want: Result<(Vec<u16>, Vec<u16>), &'static str>,
        }
        let acc = |i: &[u16], o: &[u16]| Ok((i.to_vec(), o.to_vec()));
        let cases = [
            Case {
                name: "injected, running, namespace on",
                pod: json!({}),
                ns: Some(on_ns()),
                want: acc(&[], &[]),
            },
            Case {
                name: "namespace without the label",
                pod: json!({}),
                ns: Some(labels(&[])),
                want: Err("namespace not opted in"),
            },
            Case {
                name: "namespace label false",
                pod: json!({}),
                ns: Some(labels(&[(ENABLED_LABEL, "false")])),
                want: Err("namespace not opted in"),
            },
            Case {
                name: "namespace unknown",
                pod: json!({}),
                ns: None,
                want: Err("namespace not opted in"),
            },
            Case {
                name: "pod label true opts in",
                pod: json!({"metadata": {"labels": {ENABLED_LABEL: "true"}}}),
                ns: Some(labels(&[])),
                want: acc(&[], &[]),
            },
            Case {
                name: "pod label false opts out",
                pod: json!({"metadata": {"labels": {ENABLED_LABEL: "false"}}}),
                ns: Some(on_ns()),
                want: Err("opted out by pod label"),
            },
            Case {
                name: "sidecar by container only",
                pod: json!({"metadata": {"annotations": null}}),
                ns: Some(on_ns()),
                want: acc(&[], &[]),
            },
            Case {
                name: "native sidecar (init container)",
                pod: json!({"metadata": {"annotations": null}, "spec": {"containers": [{"name": "app", "image": "a"}], "initContainers": [{"name": "istio-proxy", "image": "p", "restartPolicy": "Always"}]}}),
                ns: Some(on_ns()),
                want: acc(&[], &[]),
            },
            Case {
                name: "no sidecar",
                pod: json!({"metadata": {"annotations": null}, "spec": {"containers": [{"name": "app", "image": "a"}]}}),
                ns: Some(on_ns()),
                want: Err("no Istio sidecar"),
            },
            Case {
                name: "hostNetwork never",
                pod: json!({"metadata": {"labels": {ENABLED_LABEL: "true"}}, "spec": {"hostNetwork": true}}),
                ns: Some(on_ns()),
                want: Err("hostNetwork pod"),
            },
            Case {
                name: "pending",
                pod: json!({"status": {"phase": "Pending"}}),
                ns: Some(on_ns()),
                want: Err("not Running"),
            },
            Case {
                name: "running without IP",
                pod: json!({"status": {"podIP": null}}),
                ns: Some(on_ns()),
                want: Err("no pod IP yet"),
            },
            Case {
                name: "terminating",
                pod: json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
                ns: Some(on_ns()),
                want: Err("terminating"),
            },
            Case {
                name: "interception NONE",
                pod: json!({"metadata": {"annotations": {"sidecar.istio.io/interceptionMode": "NONE"}}}),
                ns: Some(on_ns()),
                want: Err("interceptionMode NONE: Istio captures nothing"),
            },
            Case {
                name: "exclusions",
                pod: json!({"metadata": {"annotations": {
                    "traffic.sidecar.istio.io/excludeInboundPorts": "15020,7070",
                    "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,3306",
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12",
                    "sidecar.istio.io/interceptionMode": "TPROXY"}}}),
                ns: Some(on_ns()),
                want: acc(&[7070, 15020], &[3306, 5432]),
            },
            Case {
                name: "includeInboundPorts excludes the other declared TCP ports",
                pod: json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "8080"}}}),
                ns: Some(on_ns()),
                want: acc(&[9090], &[]),
            },
            Case {
                name: "istio-init with the node's capture",
                pod: json!({"spec": {"initContainers": [{"name": "istio-init", "image": "p", "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"]}]}}),
                ns: Some(on_ns()),
                want: acc(&[], &[]),
            },
        ];
        for c in cases {
            let d = decide(
                &pod(c.pod),
                c.ns.as_ref(),
                &Capture::default(),
                &OptInLabel::default(),
            );
            let got = match &d.outcome {
                Outcome::Accelerate {
                    exclude_inbound_ports,
                    exclude_outbound_ports,
                    ip,
                    ..
                } => {
                    assert_eq!(ip.to_string(), "10.1.0.2", "{}", c.name);
                    Ok((
                        exclude_inbound_ports.clone(),
                        exclude_outbound_ports.clone(),
                    ))
                }
                Outcome::Skip(why) => Err(*why),
                Outcome::Invalid(m) => panic!("{}: invalid: {m}", c.name),
            };
            assert_eq!(got, c.want, "{}", c.name);
            assert_eq!(d.id, "mesh/p");
        }
    }

    #[test]
    fn a_bad_namespace_label_is_invalid_and_says_how_to_fix_it() {
        let d = decide(
            &pod(json!({})),
            Some(&labels(&[(ENABLED_LABEL, "yes")])),
            &Capture::default(),
            &OptInLabel::default(),
        );
        let Outcome::Invalid(m) = d.outcome else {
            panic!("{:?}", d.outcome)
        };
        assert!(
            m.contains("namespace label meshaccel.io/enabled=\"yes\"")
                && m.contains("\"true\" or \"false\""),
            "{m}"
        );
    }

    #[test]
    fn the_app_sockets_annotation() {
        let with = |v: Value| {
            let p = pod(json!({"metadata": {"annotations": {"meshaccel.io/app-sockets": v}}}));
            decide(
                &p,
                Some(&on_ns()),
                &Capture::default(),
                &OptInLabel::default(),
            )
            .outcome
        };
        let apps = |o: Outcome| match o {
            Outcome::Accelerate { app_sockets, .. } => Ok(app_sockets),
            Outcome::Invalid(m) => Err(m),
            Outcome::Skip(s) => Err(s.to_string()),
        };
        assert_eq!(apps(with(json!("trusted"))), Ok(AppSockets::Trusted));
        assert_eq!(apps(with(json!("auto"))), Ok(AppSockets::Auto));
        assert_eq!(
            apps(
                decide(
                    &pod(json!({})),
                    Some(&on_ns()),
                    &Capture::default(),
                    &OptInLabel::default()
                )
                .outcome
            ),
            Ok(AppSockets::Auto)
        );
        let err = apps(with(json!("yes"))).unwrap_err();
        assert!(
            err.contains("meshaccel.io/app-sockets")
                && err.contains("\"yes\"")
                && err.contains("trusted"),
            "{err}"
        );
    }

    #[test]
    fn invalid_pods_say_why() {
        for (name, p, needle) in [
            (
                "bad port",
                json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/excludeInboundPorts": "80,http"}}}),
                "excludeInboundPorts",
            ),
            (
                "bad range",
                json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/40"}}}),
                "includeOutboundIPRanges",
            ),
            (
                "bad mode",
                json!({"metadata": {"annotations": {"sidecar.istio.io/interceptionMode": "MAGIC"}}}),
                "interceptionMode",
            ),
            (
                "bad pod label",
                json!({"metadata": {"labels": {ENABLED_LABEL: "yes"}}}),
                "\"yes\"",
            ),
            (
                "other proxy uid",
                json!({"spec": {"containers": [{"name": "istio-proxy", "image": "p", "securityContext": {"runAsUser": 2000}}]}}),
                "proxy UID is 2000",
            ),
            (
                "other inbound port",
                json!({"spec": {"initContainers": [{"name": "istio-init", "image": "p", "args": ["-z", "15106"]}]}}),
                "inbound capture port is 15106",
            ),
            (
                "bad init args",
                json!({"spec": {"initContainers": [{"name": "istio-init", "image": "p", "args": ["-u", "root"]}]}}),
                "istio-init",
            ),
        ] {
            let d = decide(
                &pod(p),
                Some(&on_ns()),
                &Capture::default(),
                &OptInLabel::default(),
            );
            match d.outcome {
                Outcome::Invalid(m) => assert!(m.contains(needle), "{name}: {m}"),
                o => panic!("{name}: {o:?}"),
            }
        }
    }

    #[test]
    fn compute_resolves_netns_and_leaves_the_rest_out() {
        let mut ns = BTreeMap::new();
        ns.insert("mesh".to_string(), on_ns());
        ns.insert("plain".to_string(), labels(&[]));
        let pods = [
            pod(json!({"metadata": {"name": "a", "uid": "ua"}, "status": {"podIP": "10.1.0.2"}})),
            pod(json!({"metadata": {"name": "b", "uid": "ub"}, "status": {"podIP": "10.1.0.3"}})),
            // Not on the node yet.
            pod(json!({"metadata": {"name": "c", "uid": "uc"}, "status": {"podIP": "10.1.0.4"}})),
            // Another pod object on a's netns (e.g. a stale one): left out, named.
            pod(json!({"metadata": {"name": "d", "uid": "ud"}, "status": {"podIP": "10.1.0.5"}})),
            // Malformed: left out, others unaffected.
            pod(
                json!({"metadata": {"name": "e", "uid": "ue", "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "x"}}, "status": {"podIP": "10.1.0.6"}}),
            ),
            pod(
                json!({"metadata": {"name": "f", "namespace": "plain", "uid": "uf"}, "status": {"podIP": "10.1.0.7"}}),
            ),
        ];
        let out = compute(
            &pods,
            &ns,
            &Capture::default(),
            &OptInLabel::default(),
            |_, ip| match ip.to_string().as_str() {
                "10.1.0.2" | "10.1.0.5" => Lookup::Found(11),
                "10.1.0.3" => Lookup::Found(22),
                "10.1.0.6" => Lookup::Found(66),
                _ => Lookup::Missing,
            },
        );
        let ids: Vec<_> = out
            .inputs
            .workloads
            .iter()
            .map(|w| (w.id.as_str(), w.netns.clone()))
            .collect();
        assert_eq!(
            ids,
            [
                ("mesh/a", NetnsRef::Cookie(11)),
                ("mesh/b", NetnsRef::Cookie(22))
            ]
        );
        assert_eq!(
            out.unresolved,
            [(
                "mesh/c".to_string(),
                "10.1.0.4".parse().unwrap(),
                Lookup::Missing
            )]
        );
        assert_eq!(
            out.conflicts,
            [("mesh/d".to_string(), "mesh/a".to_string())]
        );
        assert!(
            matches!(&out.decisions.iter().find(|d| d.id == "mesh/e").unwrap().outcome, Outcome::Invalid(m) if m.contains("excludeOutboundPorts"))
        );
        assert_eq!(
            out.decisions
                .iter()
                .find(|d| d.id == "plain/f")
                .unwrap()
                .outcome,
            Outcome::Skip("namespace not opted in")
        );
        assert!(out.inputs.enabled);
        // Pure: the same input gives the same output.
        let again = compute(
            &pods,
            &ns,
            &Capture::default(),
            &OptInLabel::default(),
            |_, ip| match ip.to_string().as_str() {
                "10.1.0.2" | "10.1.0.5" => Lookup::Found(11),
                "10.1.0.3" => Lookup::Found(22),
                "10.1.0.6" => Lookup::Found(66),
                _ => Lookup::Missing,
            },
        );
        assert_eq!(again, out);
    }
}
