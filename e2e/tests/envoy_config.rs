//! The generated Envoy sidecar configuration: accepted by the real Envoy 1.40, shaped like
//! istiod's (compared field by field with a real Istio 1.18.2 config dump), and carrying real
//! traffic between two pods with Istio's iptables rules: app A → Envoy A (15001) → mutual TLS →
//! Envoy B (15006) → 127.0.0.6 → app B.
//!
//! Needs the Envoy binary: `scripts/install-envoy.sh`. The pod test needs root.
//! Run: `cargo test -p meshaccel-e2e --test envoy_config`.

mod support;

use std::{
    collections::HashMap,
    fs::{self, File},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use meshaccel_e2e::{
    APP_UID, Mesh, Pod, fixtures_dir, require_root,
    sidecar::{ADMIN_PORT, PodSpec, SidecarMesh},
    wait_output_timeout, wait_ready,
};
use serde_json::Value;

use meshaccel_e2e::envoy::{self, CertPaths, Pki, SidecarSpec};

fn envoy_bin() -> PathBuf {
    match envoy::envoy_binary() {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    }
}

fn spec(
    pod: &str,
    ip: [u8; 4],
    inbound: &[u16],
    upstreams: &[(&str, [u8; 4], u16)],
) -> SidecarSpec {
    SidecarSpec {
        pod_name: pod.to_string(),
        pod_ip: Ipv4Addr::from(ip),
        inbound_ports: inbound.to_vec(),
        upstreams: upstreams
            .iter()
            .map(|(n, ip, p)| (n.to_string(), Ipv4Addr::from(*ip), *p))
            .collect(),
        admin_port: 15000,
    }
}

/// `a.b.0.c` path lookup; `Value::Null` when missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) if v.is_array() => &v[i],
            _ => &v[key],
        })
}

/// Asserts that `path` is equal in both documents (and present in the fixture).
fn same(what: &str, ours: &Value, theirs: &Value, path: &str) {
    let (a, b) = (at(ours, path), at(theirs, path));
    assert!(
        !b.is_null(),
        "{what}: fixture has no {path} (wrong fixture?)"
    );
    assert_eq!(a, b, "{what}: {path} differs: ours {a}, istiod's {b}");
}

fn named<'a>(items: &'a [Value], name: &str) -> &'a Value {
    items.iter().find(|v| v["name"] == name).unwrap_or_else(|| {
        panic!(
            "no {name} among {:?}",
            items.iter().map(|v| &v["name"]).collect::<Vec<_>>()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The real istiod dump

struct Dump {
    listeners: Vec<Value>,
    clusters: Vec<Value>,
    bootstrap: Value,
}

fn istio_dump() -> Dump {
    let path = fixtures_dir().join("config_dump/istio-1.18.2_sidecar_hotelres-geo_with-eds.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dump: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let configs = dump["configs"].as_array().expect("configs");
    let of = |suffix: &str| {
        configs
            .iter()
            .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(suffix)))
            .unwrap_or_else(|| panic!("no {suffix} in the dump"))
    };
    // virtualInbound is only in error_state (Envoy NACKed it for a user Lua filter): the
    // istiod-generated listener is its failed_configuration.
    let listeners = of("ListenersConfigDump")["dynamic_listeners"]
        .as_array()
        .expect("dynamic_listeners")
        .iter()
        .filter_map(|l| {
            l.pointer("/active_state/listener")
                .or_else(|| l.pointer("/error_state/failed_configuration"))
                .cloned()
        })
        .collect();
    let clusters = of("ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .expect("dynamic_active_clusters")
        .iter()
        .map(|c| c["cluster"].clone())
        .collect();
    Dump {
        listeners,
        clusters,
        bootstrap: of("BootstrapConfigDump")["bootstrap"].clone(),
    }
}

fn tcp_proxy_cluster(chain: &Value) -> &str {
    chain["filters"]
        .as_array()
        .expect("filters")
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.tcp_proxy")
        .and_then(|f| f["typed_config"]["cluster"].as_str())
        .unwrap_or_else(|| panic!("no tcp_proxy in chain {chain}"))
}

/// The TCP (tcp_proxy) chains of a virtualInbound listener that select `pick`, keyed by their
/// filter_chain_match with the destination port taken out.
fn tcp_chains(listener: &Value, pick: impl Fn(&Value) -> bool) -> Vec<(Value, &Value)> {
    listener["filter_chains"]
        .as_array()
        .expect("filter_chains")
        .iter()
        .filter(|c| pick(&c["filter_chain_match"]))
        .filter(|c| {
            c["filters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == "envoy.filters.network.tcp_proxy")
        })
        .map(|c| {
            let mut m = c["filter_chain_match"].clone();
            m.as_object_mut().unwrap().remove("destination_port");
            (m, c)
        })
        .collect()
}

/// What matters of an Istio mTLS server context, in a form comparable across the SAN matcher's
/// old (`match_subject_alt_names`) and new (`match_typed_subject_alt_names`) spelling and across
/// static vs SDS-served secrets.
fn downstream_tls_summary(chain: &Value) -> Value {
    let ts = &chain["transport_socket"];
    if ts.is_null() {
        return Value::Null;
    }
    let tc = &ts["typed_config"];
    let ctx = &tc["common_tls_context"];
    let dvc = &ctx["combined_validation_context"]["default_validation_context"];
    let san = if dvc["match_typed_subject_alt_names"].is_array() {
        let m = &dvc["match_typed_subject_alt_names"][0];
        assert_eq!(m["san_type"], "URI", "SAN type");
        m["matcher"].clone()
    } else {
        dvc["match_subject_alt_names"][0].clone()
    };
    serde_json::json!({
        "name": ts["name"],
        "type": tc["@type"],
        "require_client_certificate": tc["require_client_certificate"],
        "tls_min": ctx["tls_params"]["tls_minimum_protocol_version"],
        "tls_max": ctx["tls_params"]["tls_maximum_protocol_version"],
        "alpn": ctx["alpn_protocols"],
        "cert_secret": ctx["tls_certificate_sds_secret_configs"][0]["name"],
        "root_secret": ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
        "san": san,
    })
}

// ---------------------------------------------------------------------------------------------
// b) shape

#[test]
fn shapes_match_istiod_dump() {
    let istio = istio_dump();
    let s = spec(
        "geo",
        [10, 77, 0, 2],
        &[8083],
        &[("mongodb-user", [10, 68, 54, 170], 27017)],
    );
    let ours_l = envoy::listeners(&s);
    let ours_c = envoy::clusters(&s);

    // virtualOutbound
    let (o, t) = (
        named(&ours_l, "virtualOutbound"),
        named(&istio.listeners, "virtualOutbound"),
    );
    for p in [
        "@type",
        "address.socket_address.address",
        "address.socket_address.port_value",
        "use_original_dst",
        "traffic_direction",
        "filter_chains.0.name",
        "filter_chains.0.filter_chain_match",
        "filter_chains.1.name",
    ] {
        same("virtualOutbound", o, t, p);
    }
    assert_eq!(o["use_original_dst"], true);
    assert_eq!(
        o["filter_chains"].as_array().unwrap().len(),
        t["filter_chains"].as_array().unwrap().len()
    );
    for i in 0..2 {
        let chain = &format!("filter_chains.{i}");
        assert_eq!(
            tcp_proxy_cluster(at(o, chain)),
            tcp_proxy_cluster(at(t, chain)),
            "virtualOutbound {chain}"
        );
    }

    // virtualInbound
    let (o, t) = (
        named(&ours_l, "virtualInbound"),
        named(&istio.listeners, "virtualInbound"),
    );
    for p in [
        "@type",
        "address.socket_address.address",
        "address.socket_address.port_value",
        "traffic_direction",
        "listener_filters_timeout",
        "continue_on_listener_filters_timeout",
        "listener_filters.0",
        "listener_filters.1",
    ] {
        same("virtualInbound", o, t, p);
    }
    let names = |l: &Value| -> Vec<String> {
        l["listener_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut theirs = names(t);
    // No HTTP chains here (TCP-level sidecar), so no http_inspector.
    theirs.retain(|n| n != "envoy.filters.listener.http_inspector");
    assert_eq!(names(o), theirs, "virtualInbound listener filters");
    assert_eq!(names(o)[0], "envoy.filters.listener.original_dst");

    // The blackhole chain for connections made to 15006 itself.
    let blackhole = |l: &Value| {
        l["filter_chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "virtualInbound-blackhole")
            .cloned()
            .unwrap()
    };
    let (ob, tb) = (blackhole(o), blackhole(t));
    same("virtualInbound-blackhole", &ob, &tb, "filter_chain_match");
    assert_eq!(tcp_proxy_cluster(&ob), tcp_proxy_cluster(&tb));

    // The TCP chains of the app port (8083 in the dump) and of the passthrough (0.0.0.0/0).
    for (what, pick, cluster) in [
        (
            "port 8083",
            &(|m: &Value| m["destination_port"] == 8083) as &dyn Fn(&Value) -> bool,
            "inbound|8083||",
        ),
        (
            "passthrough",
            &|m: &Value| m["prefix_ranges"].is_array(),
            "InboundPassthroughClusterIpv4",
        ),
    ] {
        let ours = tcp_chains(o, pick);
        let theirs = tcp_chains(t, pick);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "virtualInbound {what}: number of TCP chains"
        );
        assert_eq!(theirs.len(), 3, "the dump has 3 TCP chains for {what}");
        for (m, tc) in &theirs {
            let (_, oc) = ours
                .iter()
                .find(|(om, _)| om == m)
                .unwrap_or_else(|| panic!("virtualInbound {what}: no chain matching {m}"));
            same(&format!("virtualInbound {what} {m}"), oc, tc, "name");
            assert_eq!(tcp_proxy_cluster(oc), cluster, "{what} {m}");
            assert_eq!(tcp_proxy_cluster(tc), cluster, "{what} {m} (fixture)");
            let (os, ts) = (downstream_tls_summary(oc), downstream_tls_summary(tc));
            assert_eq!(os, ts, "virtualInbound {what} {m}: TLS termination differs");
        }
        // Exactly one chain terminates mutual TLS, and it requires a client certificate.
        let terminating: Vec<_> = ours
            .iter()
            .filter(|(_, c)| !c["transport_socket"].is_null())
            .collect();
        assert_eq!(terminating.len(), 1, "{what}");
        assert_eq!(
            terminating[0].1["transport_socket"]["typed_config"]["require_client_certificate"],
            true
        );
    }

    // Clusters of the inbound leg: ORIGINAL_DST, source 127.0.0.6.
    for (ours, theirs) in [
        (
            "InboundPassthroughClusterIpv4",
            "InboundPassthroughClusterIpv4",
        ),
        ("inbound|8083||", "inbound|8083||"),
        ("PassthroughCluster", "PassthroughCluster"),
    ] {
        let (o, t) = (named(&ours_c, ours), named(&istio.clusters, theirs));
        for p in [
            "@type",
            "type",
            "lb_policy",
            "connect_timeout",
            "circuit_breakers",
        ] {
            same(ours, o, t, p);
        }
        assert_eq!(o["type"], "ORIGINAL_DST");
        assert_eq!(
            o["upstream_bind_config"], t["upstream_bind_config"],
            "{ours}: upstream_bind_config"
        );
    }
    for name in ["InboundPassthroughClusterIpv4", "inbound|8083||"] {
        assert_eq!(
            at(
                named(&ours_c, name),
                "upstream_bind_config.source_address.address"
            ),
            "127.0.0.6"
        );
    }
    same(
        "BlackHoleCluster",
        named(&ours_c, "BlackHoleCluster"),
        named(&istio.clusters, "BlackHoleCluster"),
        "type",
    );

    // Outbound: the per-service listener and its mTLS cluster.
    let (o, t) = (
        named(&ours_l, "10.68.54.170_27017"),
        named(&istio.listeners, "10.68.54.170_27017"),
    );
    for p in ["@type", "address", "traffic_direction", "bind_to_port"] {
        same("outbound listener", o, t, p);
    }
    assert_eq!(o["bind_to_port"], false);
    let cluster = tcp_proxy_cluster(at(o, "filter_chains.0"));
    // Same cluster name format (namespace hr2 there, default here).
    assert_eq!(
        cluster,
        tcp_proxy_cluster(at(t, "filter_chains.0")).replace(".hr2.", ".default."),
        "outbound listener → cluster"
    );
    assert_eq!(
        cluster,
        "outbound|27017||mongodb-user.default.svc.cluster.local"
    );
    let (oc, tc) = (
        named(&ours_c, cluster),
        named(
            &istio.clusters,
            "outbound|27017||mongodb-user.hr2.svc.cluster.local",
        ),
    );
    for p in [
        "@type",
        "lb_policy",
        "connect_timeout",
        "circuit_breakers",
        "transport_socket_matches.0.name",
        "transport_socket_matches.0.match",
        "transport_socket_matches.0.transport_socket.name",
        "transport_socket_matches.0.transport_socket.typed_config.@type",
        "transport_socket_matches.0.transport_socket.typed_config.common_tls_context.tls_params",
        "transport_socket_matches.0.transport_socket.typed_config.common_tls_context.alpn_protocols",
        "transport_socket_matches.1",
    ] {
        same("outbound cluster", oc, tc, p);
    }
    let utls = "transport_socket_matches.0.transport_socket.typed_config";
    // Same SNI and peer identity formats (namespace hr2 there, default here).
    let sni = |c: &Value| {
        at(c, &format!("{utls}.sni"))
            .as_str()
            .unwrap()
            .replace(".hr2.", ".default.")
    };
    assert_eq!(sni(oc), sni(tc));
    let our_san = at(
        oc,
        &format!(
            "{utls}.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names.0"
        ),
    );
    assert_eq!(our_san["san_type"], "URI");
    assert_eq!(
        our_san["matcher"]["exact"],
        "spiffe://cluster.local/ns/default/sa/mongodb-user"
    );
    let their_san = at(
        tc,
        &format!(
            "{utls}.common_tls_context.combined_validation_context.default_validation_context.match_subject_alt_names.0.exact"
        ),
    );
    assert!(
        their_san
            .as_str()
            .unwrap()
            .starts_with("spiffe://cluster.local/ns/hr2/sa/"),
        "{their_san}"
    );
    for p in [
        "common_tls_context.tls_certificate_sds_secret_configs.0.name",
        "common_tls_context.combined_validation_context.validation_context_sds_secret_config.name",
    ] {
        same("outbound cluster secrets", oc, tc, &format!("{utls}.{p}"));
    }
    // Our static endpoints carry the label istiod's EDS endpoints carry.
    assert_eq!(
        oc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"]["filter_metadata"]["envoy.transport_socket_match"]
            ["tlsMode"],
        "istio"
    );
    same(
        "outbound cluster",
        oc,
        tc,
        "metadata.filter_metadata.istio.services.0.name",
    );

    // Bootstrap: node id format and admin address.
    let certs = CertPaths {
        cert_chain: "/c".into(),
        private_key: "/k".into(),
        root_cert: "/r".into(),
    };
    let b = envoy::bootstrap(&s, &certs);
    same("bootstrap", &b, &istio.bootstrap, "admin.address");
    let parts = |id: &Value| {
        id.as_str()
            .unwrap()
            .split('~')
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (ours, theirs) = (
        parts(&b["node"]["id"]),
        parts(&istio.bootstrap["node"]["id"]),
    );
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[0], theirs[0]); // "sidecar"
    assert_eq!(ours[1], "10.77.0.2");
    assert_eq!(ours[2], "geo.default");
    assert!(theirs[3].ends_with(".svc.cluster.local") && ours[3] == "default.svc.cluster.local");
    assert_eq!(
        b["static_resources"]["listeners"][0]["@type"],
        Value::Null,
        "no @type inside the bootstrap"
    );
}

// ---------------------------------------------------------------------------------------------
// a) envoy --mode validate

fn validate(config: &Path) {
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .args(["--disable-hot-restart", "--log-level", "warn"])
        .output()
        .expect("running envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy --mode validate -c {} failed ({}):\n{}\n{}",
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn envoy_validates_generated_config() {
    let bin = envoy_bin();
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .expect("envoy --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains(&format!("/{}/", envoy::ENVOY_VERSION)),
        "unexpected envoy version: {version}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path()).expect("creating the CA");
    for (s, certs) in [
        // A server with two app ports that calls two services (one of them with two endpoints).
        (
            spec(
                "geo",
                [10, 77, 0, 2],
                &[8080, 8081],
                &[
                    ("mongodb", [10, 77, 0, 3], 27017),
                    ("rate", [10, 77, 0, 4], 8080),
                    ("rate", [10, 77, 0, 5], 8080),
                ],
            ),
            pki.issue("geo").unwrap(),
        ),
        // A pure client, and a pod with neither inbound ports nor upstreams.
        (
            spec(
                "client",
                [10, 77, 0, 6],
                &[],
                &[("geo", [10, 77, 0, 2], 8080)],
            ),
            pki.issue("client").unwrap(),
        ),
        (
            spec("lonely", [10, 77, 0, 7], &[], &[]),
            pki.issue("lonely").unwrap(),
        ),
    ] {
        let path = envoy::write_bootstrap(tmp.path(), &s, &certs).unwrap();
        validate(&path);
    }
}

#[test]
fn pki_issues_spiffe_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path()).unwrap();
    let certs = pki.issue("server").unwrap();
    // openssl is part of the project's setup (scripts/env.sh).
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&certs.cert_chain)
        .output()
        .expect("running openssl");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/server"),
        "{text}"
    );
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(pki.root_cert())
        .arg(&certs.cert_chain)
        .output()
        .expect("running openssl");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    use std::os::unix::fs::PermissionsExt as _;
    for p in [
        tmp.path(),
        &certs.cert_chain,
        &certs.private_key,
        &certs.root_cert,
    ] {
        let mode = fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode & 0o004, 0o004, "{} not world-readable", p.display());
    }
    // A 0700 parent is refused with a clear message.
    let err = Pki::new(&tmp.path().join("a/b")).err();
    assert!(err.is_none(), "subdirectories of a 0755 dir are fine");
    let private = tempfile::tempdir().unwrap();
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let err = Pki::new(&private.path().join("pki"))
        .err()
        .expect("0700 parent must be refused");
    assert!(format!("{err:#}").contains("not traversable"), "{err:#}");
}

// ---------------------------------------------------------------------------------------------
// c) two pods, real traffic

/// Envoy's admin `/stats` (counters and gauges) of the sidecar in `pod`.
fn stats(pod: &Pod, admin_port: u16) -> HashMap<String, u64> {
    let out = pod
        .netns_exec(
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{admin_port}/stats"),
            ],
        )
        .expect("curl /stats");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(": ")?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn stat(stats: &HashMap<String, u64>, pod: &str, name: &str) -> u64 {
    *stats.get(name).unwrap_or_else(|| {
        let mut near: Vec<_> = stats
            .keys()
            .filter(|k| k.contains(name.split('.').nth(1).unwrap_or("")))
            .collect();
        near.sort();
        panic!("envoy in pod {pod} has no stat {name}; similar: {near:?}")
    })
}

/// Established TCP sockets in `pod` as (local, peer) strings, from `ss`.
fn sockets(pod: &Pod) -> Vec<(String, String)> {
    let out = pod
        .netns_exec("ss", &["-Htn", "state", "established"])
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer
            (f.len() >= 4).then(|| (f[2].to_string(), f[3].to_string()))
        })
        .collect()
}

fn spawn_tool(mesh: &mut Mesh, pod: &Pod, args: &[&str], log: &Path) -> Child {
    let mut cmd = Command::new(support::tool());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log).unwrap());
    mesh.spawn_cmd(pod, Some(APP_UID), cmd)
        .expect("spawning the tool")
}

#[test]
fn two_sidecars_carry_mtls_traffic_between_pods() {
    require_root();
    const SINK: u16 = 8080;
    const ECHO: u16 = 8081;
    const HTTP: u16 = 8082;
    let mut m = SidecarMesh::start(&[
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("server", &[SINK, ECHO, HTTP]),
    ])
    .unwrap_or_else(|e| panic!("starting the pods and their Envoys: {e:#}"));
    let (a, b) = (m.pod("client").clone(), m.pod("server").clone());
    let dir = m.dir().to_path_buf();
    let dir = dir.as_path();
    let mesh = &mut m.mesh;
    let dump_logs = || {
        let mut s = String::new();
        for p in ["client", "server"] {
            for ext in ["log", "stderr"] {
                s += &format!(
                    "--- envoy-{p}.{ext}\n{}\n",
                    fs::read_to_string(dir.join(format!("envoy-{p}.{ext}"))).unwrap_or_default()
                );
            }
        }
        s
    };

    // Apps (uid 1000, so they are captured) in pod B: a checksumming sink and an echo server.
    let mut sink = spawn_tool(
        mesh,
        &b,
        &["sink", "--listen", &format!("0.0.0.0:{SINK}")],
        &dir.join("sink.log"),
    );
    wait_ready(&mut sink).expect("sink ready");
    let mut echo = spawn_tool(
        mesh,
        &b,
        &["echo", "--listen", &format!("0.0.0.0:{ECHO}")],
        &dir.join("echo.log"),
    );
    wait_ready(&mut echo).expect("echo ready");

    // 1. Bulk bytes, with a pause after connecting so the three legs can be seen established.
    const BYTES: u64 = 4 << 20;
    let send = spawn_tool(
        mesh,
        &a,
        &[
            "send",
            "--connect",
            &format!("{}:{SINK}", b.ip),
            "--bytes",
            &BYTES.to_string(),
            "--pause-ms",
            "3000",
        ],
        &dir.join("send.log"),
    );
    let inbound_leg = format!("{}:{SINK}", b.ip);
    let deadline = Instant::now() + Duration::from_millis(2500);
    let (mut seen_b, mut seen_a) = (Vec::new(), Vec::new());
    let mut found = false;
    while Instant::now() < deadline {
        seen_b = sockets(&b);
        seen_a = sockets(&a);
        let leg3 = seen_b
            .iter()
            .any(|(l, p)| l.starts_with("127.0.0.6:") && *p == inbound_leg);
        let leg2 = seen_b
            .iter()
            .any(|(l, p)| *l == format!("{}:15006", b.ip) && p.starts_with(&format!("{}:", a.ip)));
        let leg1 = seen_a
            .iter()
            .any(|(l, p)| *l == "127.0.0.1:15001" && p.starts_with(&format!("{}:", a.ip)));
        if leg1 && leg2 && leg3 {
            found = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        found,
        "did not see all three legs established (app→127.0.0.1:15001 in A, A→{}:15006 and \
         127.0.0.6→{inbound_leg} in B)\npod A: {seen_a:?}\npod B: {seen_b:?}\n{}",
        b.ip,
        dump_logs()
    );
    let out = wait_output_timeout(send, Duration::from_secs(60)).expect("send");
    assert!(
        out.status.success(),
        "send failed ({}): {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        fs::read_to_string(dir.join("send.log")).unwrap_or_default(),
        dump_logs()
    );

    // 2. Ping-pong through the same path (second app port, bytes both ways).
    let pp = spawn_tool(
        mesh,
        &a,
        &[
            "pingpong",
            "--connect",
            &format!("{}:{ECHO}", b.ip),
            "--count",
            "200",
        ],
        &dir.join("pingpong.log"),
    );
    let out = wait_output_timeout(pp, Duration::from_secs(60)).expect("pingpong");
    assert!(
        out.status.success(),
        "pingpong failed ({}): {}\n{}",
        out.status,
        fs::read_to_string(dir.join("pingpong.log")).unwrap_or_default(),
        dump_logs()
    );

    // 3. HTTP/1.1 keep-alive: two requests on one connection (curl as root in pod A is captured
    // like the app: only uid/gid 1337 is exempt).
    let www = dir.join("www");
    fs::create_dir(&www).unwrap();
    fs::write(www.join("hello.txt"), b"hello through two sidecars\n").unwrap();
    let mut http = Command::new("/usr/bin/python3");
    http.args([
        "-m",
        "http.server",
        "--protocol",
        "HTTP/1.1",
        "--bind",
        "0.0.0.0",
        "--directory",
    ])
    .arg(&www)
    .arg(HTTP.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(dir.join("http.log")).unwrap());
    // Killed and reaped by the mesh at teardown, like every process it spawned.
    let apps = vec![
        sink,
        echo,
        mesh.spawn_cmd(&b, Some(APP_UID), http)
            .expect("spawning python3 -m http.server"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(
        &b.netns_exec("ss", &["-Hltn", &format!("sport = :{HTTP}")])
            .unwrap()
            .stdout,
    )
    .contains(&format!(":{HTTP}"))
    {
        assert!(
            Instant::now() < deadline,
            "http.server not listening:\n{}",
            fs::read_to_string(dir.join("http.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://{}:{HTTP}/hello.txt", b.ip);
    let out = a
        .netns_exec(
            "curl",
            &[
                "-sS",
                "--http1.1",
                "--max-time",
                "10",
                "-w",
                "%{http_code} %{num_connects}\n",
                &url,
                &url,
            ],
        )
        .unwrap_or_else(|e| panic!("curl {url} from pod A: {e:#}\n{}", dump_logs()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text, "hello through two sidecars\n200 1\nhello through two sidecars\n200 0\n",
        "two requests, the second reusing the connection"
    );

    // 4. Envoy's own account of it.
    let sa = stats(&a, ADMIN_PORT);
    let sb = stats(&b, ADMIN_PORT);
    let outbound = envoy::outbound_cluster_name(&b.name, SINK);
    let outbound_echo = envoy::outbound_cluster_name(&b.name, ECHO);
    let inbound = envoy::inbound_cluster_name(SINK);
    let (pa, pb) = (a.name.as_str(), b.name.as_str());
    let interesting = |s: &HashMap<String, u64>| {
        let mut v: Vec<String> = s
            .iter()
            .filter(|(k, v)| {
                **v > 0 && !k.contains("circuit_breakers") && !k.contains("expiration")
            })
            .filter(|(k, _)| {
                ["listener.", "cluster.", "tcp."]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        v.sort();
        v.join("\n")
    };
    let report = format!(
        "client stats:\n{}\nserver stats:\n{}",
        interesting(&sa),
        interesting(&sb)
    );
    // A: captured on 15001 (seen above), handed over by original destination to the listener
    // <podB>_<port> (which is what counts the connection: virtualOutbound's own
    // downstream_cx_total stays 0 on a hand-over), then mTLS upstream.
    for port in [SINK, ECHO, HTTP] {
        assert_eq!(
            stat(
                &sa,
                pa,
                &format!("listener.{}_{port}.downstream_cx_total", b.ip)
            ),
            1,
            "{report}"
        );
        let cluster = envoy::outbound_cluster_name(&b.name, port);
        assert_eq!(
            stat(&sa, pa, &format!("cluster.{cluster}.ssl.handshake")),
            1,
            "{report}"
        );
        assert_eq!(
            stat(
                &sb,
                pb,
                &format!(
                    "cluster.{}.upstream_cx_total",
                    envoy::inbound_cluster_name(port)
                )
            ),
            1,
            "{report}"
        );
    }
    assert_eq!(
        stat(&sa, pa, &format!("tcp.{outbound}.downstream_cx_total")),
        1,
        "{report}"
    );
    assert_eq!(
        stat(&sa, pa, &format!("tcp.{outbound_echo}.downstream_cx_total")),
        1,
        "{report}"
    );
    // Envoy counts the plaintext it hands to the TLS socket.
    assert_eq!(
        stat(
            &sa,
            pa,
            &format!("cluster.{outbound}.upstream_cx_tx_bytes_total")
        ),
        BYTES,
        "{report}"
    );
    assert_eq!(
        stat(&sa, pa, "cluster.PassthroughCluster.upstream_cx_total"),
        0,
        "{report}"
    );
    // B: captured on 15006, mTLS terminated, forwarded from 127.0.0.6 to the app port.
    assert_eq!(
        stat(&sb, pb, "listener.0.0.0.0_15006.downstream_cx_total"),
        3,
        "{report}"
    );
    assert_eq!(
        stat(&sb, pb, "listener.0.0.0.0_15006.ssl.handshake"),
        3,
        "{report}"
    );
    assert_eq!(
        stat(&sb, pb, "listener.0.0.0.0_15006.ssl.no_certificate"),
        0,
        "{report}"
    );
    assert_eq!(
        stat(
            &sb,
            pb,
            &format!("cluster.{inbound}.upstream_cx_tx_bytes_total")
        ),
        BYTES,
        "{report}"
    );
    assert_eq!(
        stat(
            &sb,
            pb,
            "cluster.InboundPassthroughClusterIpv4.upstream_cx_total"
        ),
        0,
        "{report}"
    );
    drop(apps);
    drop(m);
}
