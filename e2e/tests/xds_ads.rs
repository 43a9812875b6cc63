//! meshaccel's ADS client against the test ADS server, over real gRPC on loopback (no root):
//! typed resources from the real config dumps translate as the dumps' JSON does; TLS with a CA
//! file and a bearer token as on istiod's 15012; NACK with detail and the last good state kept;
//! server killed and restarted → reconnect and resync with the accepted versions.
use std::{
    net::Ipv4Addr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use istio_integration::xds::{
    AdsConfig, AdsEvent, NodeIdentity, XdsSnapshot, dump,
    typed::{TYPE_CLUSTER, TYPE_LISTENER},
};
use meshaccel_e2e::{
    ads::{AdsOptions, AdsServer, Resources, convert},
    envoy::{self, SidecarSpec},
    fixtures_dir,
};

fn node(name: &str) -> NodeIdentity {
    NodeIdentity {
        ip: "127.0.0.1".parse().unwrap(),
        name: name.into(),
        namespace: "meshaccel".into(),
        service_account: "meshaccel".into(),
        node_name: "test-node".into(),
        cluster_id: "Kubernetes".into(),
        domain: "cluster.local".into(),
        istio_version: "1.30.0".into(),
    }
}

/// The client on its own runtime thread; events arrive on a channel. Dropping it stops it.
struct Client {
    events: mpsc::Receiver<AdsEvent>,
    rt: Option<tokio::runtime::Runtime>,
    last: Option<XdsSnapshot>,
}

impl Client {
    fn start(cfg: AdsConfig) -> Client {
        let (tx, events) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.spawn(istio_integration::xds::client::run(cfg, move |e| {
            let _ = tx.send(e);
        }));
        Client {
            events,
            rt: Some(rt),
            last: None,
        }
    }

    /// Waits for an event matching `pred` (10 s), keeping the last snapshot seen.
    fn wait(
        &mut self,
        what: &str,
        pred: impl Fn(&AdsEvent, Option<&XdsSnapshot>) -> bool,
    ) -> AdsEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no event: {what} (last snapshot {:?})", self.last));
            if let AdsEvent::Snapshot(s) = &e {
                self.last = Some(s.clone());
            }
            if pred(&e, self.last.as_ref()) {
                return e;
            }
        }
    }

    fn snapshot(&mut self, what: &str, pred: impl Fn(&XdsSnapshot) -> bool) -> XdsSnapshot {
        if let Some(s) = &self.last
            && pred(s)
        {
            return s.clone();
        }
        match self.wait(what, |e, _| matches!(e, AdsEvent::Snapshot(s) if pred(s))) {
            AdsEvent::Snapshot(s) => s,
            _ => unreachable!(),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn fast(mut cfg: AdsConfig) -> AdsConfig {
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    cfg
}

fn without_versions(mut s: XdsSnapshot) -> XdsSnapshot {
    s.versions = Default::default();
    s
}

/// Every v3 dump with listeners, clusters or endpoints: served as typed resources, received by
/// the client, the snapshot equals the translation of the dump's JSON.
#[test]
fn typed_resources_from_every_v3_dump_translate_like_the_dump() -> anyhow::Result<()> {
    let dir = fixtures_dir().join("config_dump");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .chain(std::fs::read_dir(dir.join("partial"))?)
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut served = 0;
    for f in files {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        let want = dump::translate(&doc)?;
        if want.api != dump::DumpApi::V3 {
            // v2 resources cannot be served over a v3 stream.
            continue;
        }
        let (ls, mut cs, es) = convert::from_dump(&doc).with_context(|| f.display().to_string())?;
        if !want.sections.1 {
            // An endpoints-only dump: the EDS clusters that own its endpoints are not in it.
            cs = es
                .iter()
                .map(|e| Cluster {
                    name: e.cluster_name.clone(),
                    cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                        cluster::DiscoveryType::Eds as i32,
                    )),
                    ..Default::default()
                })
                .collect();
        }
        let server = AdsServer::start(AdsOptions::default())?;
        server.edit(|e| *e.default = Resources::typed(&ls, &cs, &es));
        let mut c = Client::start(fast(AdsConfig::new(
            server.addr().to_string(),
            node("dump-reader"),
        )));
        let want_snap = without_versions(want.snapshot.clone());
        let got = c.snapshot(&format!("{}: the dump's snapshot", f.display()), |s| {
            without_versions(s.clone()) == want_snap
        });
        eprintln!(
            "{}: {} listeners, {} clusters, {} assignments served; snapshot {:?}",
            f.file_name().unwrap().to_string_lossy(),
            ls.len(),
            cs.len(),
            es.len(),
            without_versions(got)
        );
        served += 1;
    }
    assert_eq!(served, 3, "three v3 dumps in the fixtures");
    Ok(())
}

/// The resources of one sidecar of the e2e mesh (`envoy.rs`), outbound clusters over EDS.
fn sidecar_resources() -> anyhow::Result<Resources> {
    let spec = SidecarSpec {
        pod_name: "server".into(),
        pod_ip: Ipv4Addr::new(10, 77, 0, 3),
        inbound_ports: vec![8080],
        upstreams: vec![("client".into(), Ipv4Addr::new(10, 77, 0, 2), 9090)],
        admin_port: 15000,
    };
    let (clusters, endpoints) = envoy::eds_split(envoy::clusters(&spec));
    Resources::from_json(&envoy::listeners(&spec), &clusters, &endpoints)
}

#[test]
fn nack_names_the_bad_resource_and_keeps_the_last_good_state() -> anyhow::Result<()> {
    let server = AdsServer::start(AdsOptions::default())?;
    server.edit(|e| *e.default = sidecar_resources().unwrap());
    let n = node("nack");
    let id = n.node_id();
    let mut c = Client::start(fast(AdsConfig::new(server.addr().to_string(), n)));
    let good = c.snapshot("the first snapshot", |s| !s.mesh_endpoints.is_empty());
    assert_eq!(
        (good.outbound_port, good.inbound_port),
        (Some(15001), Some(15006))
    );
    assert_eq!(
        good.inbound_passthrough_binds,
        ["127.0.0.6".parse::<std::net::IpAddr>()?]
    );
    assert_eq!(
        good.mesh_endpoints
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>(),
        ["10.77.0.2"]
    );

    // virtualInbound on port 0: rejected, named, the previous listeners stay.
    server.edit(|e| {
        let mut l = e.default.listener("virtualInbound").unwrap();
        l.address = Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                envoy_types::pb::envoy::config::core::v3::SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0)),
                    ..Default::default()
                },
            )),
        });
        e.default.put_listener(&l);
    });
    c.wait("a Rejected event", |e, _| {
        matches!(e, AdsEvent::Rejected { type_url, error } if type_url == TYPE_LISTENER && error.contains("virtualInbound"))
    });
    let bad_version = server.version();
    let r = server.wait_for("the NACK", Duration::from_secs(5), |r| {
        r.iter()
            .any(|x| x.node == id && x.type_url == TYPE_LISTENER && x.error.is_some())
    })?;
    let nack = r
        .iter()
        .find(|x| x.node == id && x.type_url == TYPE_LISTENER && x.error.is_some())
        .unwrap();
    eprintln!("NACK: {nack:?}");
    assert!(
        nack.error
            .as_ref()
            .unwrap()
            .contains("listener virtualInbound: port 0")
    );
    assert_ne!(
        nack.version_info, bad_version,
        "a NACK carries the last accepted version"
    );
    assert_eq!(
        c.last.as_ref().unwrap().inbound_port,
        Some(15006),
        "last good state kept"
    );

    // Garbage bytes in a cluster: NACKed by index, clusters unchanged.
    server.edit(|e| e.default.clusters[0].value = vec![0x0a, 0xff]);
    c.wait("a Rejected cluster event", |e, _| {
        matches!(e, AdsEvent::Rejected { type_url, error } if type_url == TYPE_CLUSTER && error.contains("cluster #0"))
    });

    // A good push (virtualInbound moved to 15007, clusters repaired): accepted.
    server.edit(|e| {
        *e.default = sidecar_resources().unwrap();
        let mut l = e.default.listener("virtualInbound").unwrap();
        if let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) =
            l.address.as_mut().and_then(|a| a.address.as_mut())
        {
            s.port_specifier = Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    15007,
                ),
            );
        }
        e.default.put_listener(&l);
    });
    let moved = c.snapshot("the moved inbound port", |s| s.inbound_port == Some(15007));
    assert_eq!(moved.versions.listeners, server.version());
    Ok(())
}

#[test]
fn server_killed_and_restarted_reconnect_and_resync() -> anyhow::Result<()> {
    let mut server = AdsServer::start(AdsOptions::default())?;
    server.edit(|e| *e.default = sidecar_resources().unwrap());
    let n = node("restart");
    let id = n.node_id();
    let mut c = Client::start(fast(AdsConfig::new(server.addr().to_string(), n)));
    let before = c.snapshot("the first snapshot", |s| !s.mesh_endpoints.is_empty());
    let accepted = before.versions.clone();

    server.kill();
    c.wait("a disconnect", |e, _| {
        matches!(e, AdsEvent::Disconnected { .. })
    });
    // Several failed attempts while istiod is away; the state is kept.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(c.last.as_ref(), Some(&before));
    server.restart()?;
    let after = c.snapshot("the resynced snapshot", |s| {
        s.versions.listeners == server.version()
    });
    assert_eq!(without_versions(after), without_versions(before));
    // The new stream's first requests resumed from the accepted versions.
    let r = server.received();
    let last_stream = r
        .iter()
        .filter(|x| x.node == id)
        .map(|x| x.stream)
        .max()
        .unwrap();
    let first: Vec<_> = r
        .iter()
        .filter(|x| x.node == id && x.stream == last_stream && x.response_nonce.is_empty())
        .map(|x| (x.type_url.as_str(), x.version_info.as_str()))
        .collect();
    assert!(
        first.contains(&(TYPE_LISTENER, accepted.listeners.as_str())),
        "{first:?}"
    );
    assert!(
        first.contains(&(TYPE_CLUSTER, accepted.clusters.as_str())),
        "{first:?}"
    );
    Ok(())
}

/// TLS with the mesh CA and a bearer token, as a node agent talks to istiod's 15012.
#[test]
fn tls_with_ca_file_and_bearer_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])?
        .signed_by(&key, &ca)?;
    let ca_file = dir.path().join("root-cert.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let token_file = dir.path().join("istio-token");
    std::fs::write(&token_file, "s3cret-token\n")?;

    let server = AdsServer::start(AdsOptions {
        tls: Some((cert.pem(), key.serialize_pem())),
        token: Some("s3cret-token".into()),
        ..Default::default()
    })?;
    server.edit(|e| *e.default = sidecar_resources().unwrap());
    let tls_cfg = |token: &std::path::Path| {
        let mut cfg = fast(AdsConfig::new(
            format!("127.0.0.1:{}", server.addr().port()),
            node("tls"),
        ));
        cfg.ca_file = Some(ca_file.clone());
        cfg.server_name = Some("istiod.istio-system.svc".into());
        cfg.token_file = Some(token.to_path_buf());
        cfg
    };
    let mut ok = Client::start(tls_cfg(&token_file));
    let s = ok.snapshot("a snapshot over TLS", |s| s.inbound_port.is_some());
    assert_eq!(s.outbound_port, Some(15001));

    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "nope")?;
    let mut bad = Client::start(tls_cfg(&wrong));
    match bad.wait("a refused stream", |e, _| {
        matches!(e, AdsEvent::Disconnected { .. })
    }) {
        AdsEvent::Disconnected { error, .. } => {
            assert!(error.to_lowercase().contains("token"), "{error}")
        }
        _ => unreachable!(),
    }
    assert!(bad.last.is_none());
    Ok(())
}

/// The JSON → typed conversion takes every field `envoy.rs` emits, and refuses (naming the
/// path) a field it would otherwise drop.
#[test]
fn conversion_is_complete_or_fails_loudly() -> anyhow::Result<()> {
    let r = sidecar_resources()?;
    let vi = r.listener("virtualInbound").context("virtualInbound")?;
    assert_eq!(
        vi.filter_chains.len(),
        1 + 3 + 3,
        "blackhole, passthrough ×3, port 8080 ×3"
    );
    assert_eq!(vi.listener_filters.len(), 2);
    assert!(vi.listener_filters[1].filter_disabled.is_some());
    let mut l = envoy::listeners(&SidecarSpec {
        pod_name: "p".into(),
        pod_ip: Ipv4Addr::new(10, 0, 0, 1),
        inbound_ports: vec![],
        upstreams: vec![],
        admin_port: 15000,
    })[0]
        .clone();
    l["filter_chains"][0]["filter_chain_match"]["server_names"] = serde_json::json!(["x"]);
    let e = convert::listener(&l, convert::Mode::Full)
        .unwrap_err()
        .to_string();
    assert!(e.contains("filter_chain_match.server_names"), "{e}");
    Ok(())
}
