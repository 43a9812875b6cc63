//! The xDS translation on every real istiod config dump of the shared fixtures (v2 and v3
//! shapes, complete and partial, one with `virtualInbound` only in `error_state`).
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use istio_integration::xds::dump::{self, DumpApi};

fn dumps_dir() -> PathBuf {
    let dir = std::env::var_os("MESHACCEL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let dir = dir.join("config_dump");
    assert!(
        dir.is_dir(),
        "{} not found: set MESHACCEL_FIXTURES to the shared fixtures",
        dir.display()
    );
    dir
}

fn all_dumps(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_dumps(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

struct Case {
    file: &'static str,
    api: DumpApi,
    /// listeners, clusters, endpoints sections present
    sections: (bool, bool, bool),
    outbound: Option<u16>,
    inbound: Option<u16>,
    /// (name, port) of listeners Envoy rejected
    rejected: &'static [(&'static str, u32)],
    binds: &'static [&'static str],
    mesh_count: usize,
    mesh_sample: &'static [&'static str],
    /// IPs that must NOT be mesh endpoints (endpoints without tlsMode: istio)
    not_mesh: &'static [&'static str],
    versions: (&'static str, &'static str),
}

#[test]
fn every_config_dump_translates() {
    let cases = [
        Case {
            file: "istio-1.18.2_sidecar_hotelres-geo_with-eds.json",
            api: DumpApi::V3,
            sections: (true, true, true),
            outbound: Some(15001),
            // Envoy NACKed virtualInbound (a user Lua EnvoyFilter): the sidecar runs without it.
            inbound: None,
            rejected: &[("virtualInbound", 15006), ("virtualInbound", 15006)],
            binds: &["127.0.0.6"],
            // 28 lb_endpoints with tlsMode istio, on 22 distinct pod IPs.
            mesh_count: 22,
            mesh_sample: &["172.16.188.1", "172.16.18.234", "172.16.19.26"],
            not_mesh: &["127.0.0.1"],
            versions: ("2025-02-17T14:49:37Z/296", "2025-02-17T14:50:01Z/310"),
        },
        Case {
            file: "istio-1.3.0-rc.2_sidecar_productpage.json",
            api: DumpApi::V2,
            sections: (true, true, false),
            outbound: Some(15001),
            inbound: Some(15006),
            rejected: &[],
            binds: &["127.0.0.6", "::6"],
            mesh_count: 0,
            mesh_sample: &[],
            not_mesh: &[],
            versions: ("2019-09-11T17:00:00Z/20", "2019-09-10T20:22:19Z/15"),
        },
        Case {
            file: "istio-1.4-alpha_sidecar_productpage.json",
            api: DumpApi::V2,
            sections: (true, true, false),
            outbound: Some(15001),
            inbound: Some(15006),
            rejected: &[],
            binds: &["127.0.0.6", "::6"],
            // tlsMode appears only in transport_socket_matches, never on an endpoint.
            mesh_count: 0,
            mesh_sample: &[],
            not_mesh: &[],
            versions: ("2019-10-21T14:42:37Z/10", "2019-10-21T14:42:47Z/11"),
        },
        Case {
            file: "partial/istio-2023-06_sidecar_listeners-only.json",
            api: DumpApi::V3,
            sections: (true, false, false),
            outbound: Some(15001),
            inbound: Some(15006),
            rejected: &[],
            binds: &[],
            mesh_count: 0,
            mesh_sample: &[],
            not_mesh: &[],
            versions: ("2023-06-20T09:08:58Z/4", ""),
        },
        Case {
            file: "partial/istio-2022-07_sidecar_eds-only.json",
            api: DumpApi::V3,
            sections: (false, false, true),
            outbound: None,
            inbound: None,
            rejected: &[],
            binds: &[],
            mesh_count: 8,
            mesh_sample: &["10.244.0.177", "10.244.0.195"],
            not_mesh: &["127.0.0.1"],
            versions: ("", ""),
        },
    ];
    let dir = dumps_dir();
    let mut files = Vec::new();
    all_dumps(&dir, &mut files);
    let covered: BTreeSet<PathBuf> = cases.iter().map(|c| dir.join(c.file)).collect();
    for f in &files {
        assert!(
            covered.contains(f),
            "{} has no case in this table: add one",
            f.display()
        );
    }
    let ip = |s: &&str| s.parse::<IpAddr>().unwrap();
    for c in &cases {
        let path = dir.join(c.file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let t = dump::translate(&doc).unwrap_or_else(|e| panic!("{}: {e}", c.file));
        let s = &t.snapshot;
        assert_eq!(t.api, c.api, "{}", c.file);
        assert_eq!(t.sections, c.sections, "{}", c.file);
        assert_eq!(s.outbound_port, c.outbound, "{}", c.file);
        assert_eq!(s.inbound_port, c.inbound, "{}", c.file);
        let rejected: Vec<(&str, u32)> = t
            .rejected_listeners
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.socket.as_ref().and_then(|s| s.port).unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(rejected, c.rejected, "{}", c.file);
        assert_eq!(
            s.inbound_passthrough_binds,
            c.binds.iter().map(ip).collect::<Vec<_>>(),
            "{}",
            c.file
        );
        assert_eq!(s.mesh_endpoints.len(), c.mesh_count, "{}", c.file);
        for m in c.mesh_sample {
            assert!(s.mesh_endpoints.contains(&ip(m)), "{}: {m}", c.file);
        }
        for m in c.not_mesh {
            assert!(!s.mesh_endpoints.contains(&ip(m)), "{}: {m}", c.file);
        }
        assert_eq!(
            (s.versions.listeners.as_str(), s.versions.clusters.as_str()),
            c.versions,
            "{}",
            c.file
        );
        // Every capture listener of the dump is either active or rejected, never lost.
        let active_capture = t
            .listeners
            .iter()
            .filter(|l| l.name.starts_with("virtual"))
            .count();
        eprintln!(
            "{}: outbound {:?} inbound {:?} binds {:?} mesh endpoints {} ({} capture listeners active, {} rejected)",
            c.file,
            s.outbound_port,
            s.inbound_port,
            s.inbound_passthrough_binds,
            s.mesh_endpoints.len(),
            active_capture,
            t.rejected_listeners.len()
        );
    }
}

/// What istiod meant for the NACKed listener: its rejected configuration still carries the
/// inbound capture port, and translating it as if accepted gives 15006.
#[test]
fn the_rejected_virtual_inbound_still_names_its_port() {
    let path = dumps_dir().join("istio-1.18.2_sidecar_hotelres-geo_with-eds.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let t = dump::translate(&doc).unwrap();
    let mut with_rejected = t.listeners.clone();
    with_rejected.push(t.rejected_listeners[0].clone());
    let p = istio_integration::xds::translate::listeners(&with_rejected).unwrap();
    assert_eq!(
        (p.outbound_port, p.inbound_port),
        (Some(15001), Some(15006))
    );
}

#[test]
fn not_a_dump_is_an_error() {
    let e = dump::translate(&serde_json::json!({"foo": 1}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("configs"), "{e}");
}
