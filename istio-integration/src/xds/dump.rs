//! Facts from the JSON of an Envoy admin `/config_dump` (xDS v2 `admin.v2alpha` and v3
//! `admin.v3` shapes, complete or partial), translated by the same rules as what istiod sends.
//!
//! Listeners: `static_listeners[].listener`; v2 `dynamic_active_listeners[].listener` (and
//! warming); v3 `dynamic_listeners[]` with `active_state` (else `warming_state`) `.listener`.
//! A v3 listener Envoy rejected is only in `error_state.failed_configuration`: it is not what
//! the sidecar runs, so it is reported in [`DumpTranslation::rejected_listeners`], not used.
//! Clusters: `static_clusters[]`/`dynamic_active_clusters[]`/`dynamic_warming_clusters[]`
//! `.cluster`. Endpoints: `static_endpoint_configs[]`/`dynamic_endpoint_configs[]`
//! `.endpoint_config`.
use serde_json::Value;

use super::{
    error::{Result, TranslateError},
    translate::{
        self, ClusterFacts, EndpointFact, EndpointsFacts, ListenerFacts, SocketFact,
        TLS_MODE_FILTER, TLS_MODE_KEY, XdsSnapshot, XdsVersions,
    },
};

fn socket(addr: &Value) -> Option<SocketFact> {
    let s = addr.get("socket_address")?;
    Some(SocketFact {
        address: s.get("address")?.as_str()?.to_string(),
        port: s.get("port_value").and_then(Value::as_u64).map(|p| {
            // Out-of-range values stay out of range (validation names them).
            u32::try_from(p).unwrap_or(u32::MAX)
        }),
    })
}

/// A BoolValue in JSON is a plain bool (older dumps may wrap it in `{"value": …}`).
fn bool_value(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Object(o)) => o.get("value").and_then(Value::as_bool).unwrap_or(false),
        _ => false,
    }
}

fn name_of(v: &Value) -> String {
    v.get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Facts of one listener (the JSON of a `Listener`).
pub fn listener(v: &Value) -> ListenerFacts {
    ListenerFacts {
        name: name_of(v),
        socket: v.get("address").and_then(socket),
        use_original_dst: bool_value(v.get("use_original_dst")),
    }
}

fn lb_endpoints(cla: &Value) -> Vec<EndpointFact> {
    let mut out = Vec::new();
    for locality in cla
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for lb in locality
            .get("lb_endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push(EndpointFact {
                socket: lb.pointer("/endpoint/address").and_then(socket),
                tls_mode: lb
                    .pointer("/metadata/filter_metadata")
                    .and_then(|m| m.get(TLS_MODE_FILTER))
                    .and_then(|m| m.get(TLS_MODE_KEY))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    out
}

/// Facts of one cluster (the JSON of a `Cluster`).
pub fn cluster(v: &Value) -> ClusterFacts {
    let name = name_of(v);
    let mut bind_addresses = Vec::new();
    if let Some(b) = v.get("upstream_bind_config") {
        if let Some(a) = b.pointer("/source_address/address").and_then(Value::as_str) {
            bind_addresses.push(a.to_string());
        }
        for extra in b
            .get("extra_source_addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(a) = extra.pointer("/address/address").and_then(Value::as_str) {
                bind_addresses.push(a.to_string());
            }
        }
        for extra in b
            .get("additional_source_addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(a) = extra.get("address").and_then(Value::as_str) {
                bind_addresses.push(a.to_string());
            }
        }
    }
    let eds = v.get("type").and_then(Value::as_str) == Some("EDS");
    let eds_name = eds.then(|| {
        v.pointer("/eds_cluster_config/service_name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map_or_else(|| name.clone(), str::to_string)
    });
    ClusterFacts {
        inline_endpoints: v
            .get("load_assignment")
            .map(lb_endpoints)
            .unwrap_or_default(),
        name,
        bind_addresses,
        eds_name,
    }
}

/// Facts of one `ClusterLoadAssignment`.
pub fn endpoints(v: &Value) -> EndpointsFacts {
    EndpointsFacts {
        cluster_name: v
            .get("cluster_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        endpoints: lb_endpoints(v),
    }
}

/// Which admin API shape a dump has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpApi {
    /// `envoy.admin.v2alpha` (Istio ≤ 1.5).
    V2,
    /// `envoy.admin.v3`.
    V3,
}

/// All facts of a dump, and what it says.
#[derive(Clone, Debug)]
pub struct DumpTranslation {
    pub api: DumpApi,
    /// Which sections the dump has: listeners, clusters, endpoints.
    pub sections: (bool, bool, bool),
    pub listeners: Vec<ListenerFacts>,
    /// Listeners Envoy rejected (v3 `error_state.failed_configuration`), not in `listeners`.
    pub rejected_listeners: Vec<ListenerFacts>,
    pub clusters: Vec<ClusterFacts>,
    pub endpoints: Vec<EndpointsFacts>,
    /// The translation of the active configuration, by the same rules as a live ADS stream.
    pub snapshot: XdsSnapshot,
}

fn items<'a>(section: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    section
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn version(section: &Value) -> String {
    section
        .get("version_info")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Translates a whole `/config_dump` JSON document.
pub fn translate(doc: &Value) -> Result<DumpTranslation> {
    let configs = doc
        .get("configs")
        .and_then(Value::as_array)
        .ok_or_else(|| TranslateError::Dump {
            message: "no \"configs\" array (not an Envoy /config_dump)".into(),
        })?;
    let mut api = None;
    let mut sections = (false, false, false);
    let mut listeners = Vec::new();
    let mut rejected = Vec::new();
    let mut clusters = Vec::new();
    let mut eds = Vec::new();
    let mut versions = XdsVersions::default();
    for c in configs {
        let ty = c.get("@type").and_then(Value::as_str).unwrap_or_default();
        let (pkg, kind) = ty.rsplit_once('.').unwrap_or(("", ty));
        let this_api = if pkg.ends_with("envoy.admin.v2alpha") {
            DumpApi::V2
        } else if pkg.ends_with("envoy.admin.v3") {
            DumpApi::V3
        } else {
            continue;
        };
        if api.is_some_and(|a| a != this_api) {
            return Err(TranslateError::Dump {
                message: "mixes v2 and v3 admin sections".into(),
            });
        }
        api = Some(this_api);
        match kind {
            "ListenersConfigDump" => {
                sections.0 = true;
                versions.listeners = version(c);
                for l in items(c, "static_listeners")
                    .chain(items(c, "dynamic_active_listeners"))
                    .filter_map(|x| x.get("listener"))
                {
                    listeners.push(listener(l));
                }
                // v2 warming listeners replace nothing active; take those not active yet.
                for l in items(c, "dynamic_warming_listeners").filter_map(|x| x.get("listener")) {
                    let f = listener(l);
                    if !listeners.iter().any(|a| a.name == f.name) {
                        listeners.push(f);
                    }
                }
                for d in items(c, "dynamic_listeners") {
                    let state = d
                        .pointer("/active_state/listener")
                        .or_else(|| d.pointer("/warming_state/listener"));
                    if let Some(l) = state {
                        listeners.push(listener(l));
                    } else if let Some(l) = d.pointer("/error_state/failed_configuration") {
                        rejected.push(listener(l));
                    }
                }
            }
            "ClustersConfigDump" => {
                sections.1 = true;
                versions.clusters = version(c);
                for cl in items(c, "static_clusters")
                    .chain(items(c, "dynamic_active_clusters"))
                    .filter_map(|x| x.get("cluster"))
                {
                    clusters.push(cluster(cl));
                }
                for cl in items(c, "dynamic_warming_clusters").filter_map(|x| x.get("cluster")) {
                    let f = cluster(cl);
                    if !clusters.iter().any(|a| a.name == f.name) {
                        clusters.push(f);
                    }
                }
            }
            "EndpointsConfigDump" => {
                sections.2 = true;
                for e in items(c, "static_endpoint_configs")
                    .chain(items(c, "dynamic_endpoint_configs"))
                    .filter_map(|x| x.get("endpoint_config"))
                {
                    let f = endpoints(e);
                    // Envoy lists a static cluster's inline endpoints here too: one per name.
                    if !eds
                        .iter()
                        .any(|a: &EndpointsFacts| a.cluster_name == f.cluster_name)
                    {
                        eds.push(f);
                    }
                }
                if let Some(v) = c
                    .pointer("/dynamic_endpoint_configs/0/version_info")
                    .and_then(Value::as_str)
                {
                    versions.endpoints = v.to_string();
                }
            }
            _ => {}
        }
    }
    let api = api.ok_or_else(|| TranslateError::Dump {
        message: "no admin.v2alpha or admin.v3 section".into(),
    })?;
    let lp = translate::listeners(&listeners)?;
    let cp = translate::clusters(&clusters)?;
    let ep = translate::endpoints_all(&eds)?;
    // A dump has no EDS subscription to follow: every endpoint section counts (a partial dump
    // may have endpoints without the clusters that own them).
    let mut all_eds = cp.clone();
    all_eds.eds_names = ep.keys().cloned().collect();
    let snapshot = translate::snapshot(&lp, &all_eds, &ep, versions);
    Ok(DumpTranslation {
        api,
        sections,
        listeners,
        rejected_listeners: rejected,
        clusters,
        endpoints: eds,
        snapshot,
    })
}
