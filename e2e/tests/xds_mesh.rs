//! Istio xDS end to end: real Envoy 1.40 sidecars take their listeners, clusters and endpoints
//! over ADS from the test ADS server (Envoy ACKing and carrying mTLS traffic proves the served
//! resources valid), and the meshaccel agent is a second client of the same server
//! (`--istiod`): it learns the capture ports, NACKs a malformed resource and keeps its last
//! good state, and rides out the server being killed and restarted while traffic flows.
mod support;

use std::time::Duration;

use istio_integration::xds::typed::{TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_LISTENER};
use meshaccel_e2e::{
    accel::{Accel, Scope, Workload},
    require_root,
    sidecar::{EnvoyConfig, PodSpec, Rules, SidecarMesh},
};
use serde_json::Value;
use support::*;

/// The client/server mesh with ADS-fed Envoys and an agent connected to the same server.
fn mesh_with_agent() -> (SidecarMesh, Accel, String) {
    let mut m = SidecarMesh::start_opts(
        &[
            PodSpec::mesh("client", &[]),
            PodSpec::mesh("server", &[8080]),
        ],
        Rules::IstioGolden,
        EnvoyConfig::Ads,
    )
    .expect("mesh with ADS-fed Envoys");
    let ads = m.ads().unwrap();
    // Envoy is LIVE only after its initial fetch: both ACKed listeners and clusters, the
    // client (which has an upstream) its endpoints too.
    for (pod, types) in [
        ("client", &[TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_LISTENER][..]),
        ("server", &[TYPE_CLUSTER, TYPE_LISTENER][..]),
    ] {
        let node = m.node_id(pod);
        for &ty in types {
            ads.wait_acked(&node, ty, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{pod}'s Envoy: {e:#}"));
        }
    }
    let istiod = ads.addr().to_string();
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    let accel = Accel::start_env(
        &m.mesh,
        true,
        Scope::Mesh,
        &[Workload::on(&client), Workload::on(&server)],
        &[
            ("MESHACCEL_ISTIOD", &istiod),
            ("MESHACCEL_ISTIOD_POD_NAME", "meshaccel-e2e"),
            ("MESHACCEL_ISTIOD_BACKOFF_MAX_MS", "500"),
        ],
    )
    .expect("agent with --istiod");
    m.serve("server", &["http-server", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let agent_node =
        "sidecar~127.0.0.1~meshaccel-e2e.meshaccel~meshaccel.svc.cluster.local".to_string();
    (m, accel, agent_node)
}

fn xds(a: &Accel) -> Value {
    a.status().expect("status")["xds"].clone()
}

fn http_load(m: &mut SidecarMesh, target: &str, extra: &[&str]) -> std::process::Child {
    m.app(
        "client",
        &[&["http-load", "--connect", target, "--size", "1024"], extra].concat(),
    )
    .expect("http-load")
}

/// Capture ports, passthrough address and mesh endpoints learned from the server the Envoys
/// run on; traffic through the ADS-fed Envoys is accelerated; a malformed listener is NACKed
/// with its name by the agent (and by Envoy), and the last good state stays.
#[test]
fn agent_learns_from_the_ads_server_and_nacks_a_malformed_listener() {
    require_root();
    let (mut m, accel, agent_node) = mesh_with_agent();
    let server_ip = m.pod("server").ip.to_string();
    accel
        .wait_status("the agent's xDS snapshot", |s| {
            s["xds"]["snapshot"]["inbound_port"] == 15006 && s["xds"]["connected"] == true
        })
        .unwrap();
    let x = xds(&accel);
    eprintln!("agent's xDS status: {x}");
    let snap = &x["snapshot"];
    assert_eq!(snap["outbound_port"], 15001, "{x}");
    assert_eq!(
        snap["inbound_passthrough_binds"],
        serde_json::json!(["127.0.0.6"]),
        "{x}"
    );
    assert_eq!(
        snap["mesh_endpoints"],
        serde_json::json!([server_ip]),
        "{x}"
    );
    assert_eq!(x["node_id"], agent_node.as_str());

    // Traffic through the ADS-fed sidecars (mTLS) is accelerated.
    let target = format!("{server_ip}:8080");
    let r0 = counter(&accel, "redirect_msgs");
    let v = finished(
        http_load(
            &mut m,
            &target,
            &["--requests", "2000", "--connections", "2"],
        ),
        "load",
    );
    assert_eq!(v["errors"], 0, "{v}");
    let tls = m.envoy_stats("server", "ssl.handshake").unwrap();
    assert!(
        tls.iter().any(|(_, v)| *v > 0),
        "the sidecar leg is mTLS: {tls:?}"
    );
    assert!(
        counter(&accel, "redirect_msgs") - r0 >= 3 * 2000,
        "all three legs redirected"
    );

    // A malformed virtualInbound (an address that is no IP) for every node.
    let ads = m.ads().unwrap();
    ads.edit(|e| {
        let mut nodes: Vec<String> = e.per_node.keys().cloned().collect();
        nodes.push(String::new());
        for n in nodes {
            let r = if n.is_empty() {
                &mut *e.default
            } else {
                e.node(&n)
            };
            let mut l = r.listener("virtualInbound").unwrap();
            if let Some(
                envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s),
            ) = l.address.as_mut().and_then(|a| a.address.as_mut())
            {
                s.address = "not-an-ip".into();
            }
            r.put_listener(&l);
        }
    });
    let received = ads
        .wait_for(
            "NACKs from the agent and the client's Envoy",
            Duration::from_secs(10),
            |r| {
                let nacked = |node: &str| {
                    r.iter()
                        .any(|x| x.node == node && x.type_url == TYPE_LISTENER && x.error.is_some())
                };
                nacked(&agent_node) && nacked(&m.node_id("client"))
            },
        )
        .unwrap();
    for x in received.iter().filter(|x| x.error.is_some()) {
        eprintln!("NACK from {}: {}", x.node, x.error.as_deref().unwrap());
    }
    let agent_nack = received
        .iter()
        .find(|x| x.node == agent_node && x.error.is_some())
        .unwrap();
    let detail = agent_nack.error.as_deref().unwrap();
    assert!(
        detail.contains("listener virtualInbound") && detail.contains("not-an-ip"),
        "{detail}"
    );
    accel
        .wait_status("the rejection in status", |s| {
            s["xds"]["rejected"].as_u64() >= Some(1)
        })
        .unwrap();
    let x = xds(&accel);
    assert_eq!(
        x["snapshot"]["inbound_port"], 15006,
        "last good state kept: {x}"
    );
    // Envoy kept its listeners too: traffic still flows, still accelerated.
    let r1 = counter(&accel, "redirect_msgs");
    let v = finished(
        http_load(
            &mut m,
            &target,
            &["--requests", "1000", "--connections", "1"],
        ),
        "load after the NACK",
    );
    assert_eq!(v["errors"], 0, "{v}");
    assert!(counter(&accel, "redirect_msgs") - r1 >= 3 * 1000);
}

/// The ADS server (istiod) is killed under keep-alive load and restarted: the agent and the
/// Envoys reconnect and resync (the agent resumes with its accepted versions), the agent's
/// snapshot stays meanwhile, and no request fails.
#[test]
fn ads_server_killed_and_restarted_under_load() {
    require_root();
    let (mut m, accel, agent_node) = mesh_with_agent();
    // Whole: listeners, clusters and endpoints accepted (the endpoints come last; a snapshot
    // taken before them is not the one kept while istiod is away).
    accel
        .wait_status("the agent's whole xDS snapshot", |s| {
            let v = &s["xds"]["snapshot"]["versions"];
            s["xds"]["snapshot"]["inbound_port"] == 15006
                && ["listeners", "clusters", "endpoints"]
                    .iter()
                    .all(|k| v[k].as_str().is_some_and(|x| !x.is_empty()))
        })
        .unwrap();
    let before = xds(&accel)["snapshot"].clone();
    let target = format!("{}:8080", m.pod("server").ip);
    let load = http_load(
        &mut m,
        &target,
        &[
            "--duration-ms",
            "6000",
            "--requests",
            "10000000",
            "--connections",
            "2",
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let r0 = counter(&accel, "redirect_msgs");
    let streams_before = m
        .ads()
        .unwrap()
        .received()
        .iter()
        .map(|x| x.stream)
        .max()
        .unwrap();
    m.ads_mut().unwrap().kill();
    accel
        .wait_status("the agent noticing istiod is gone", |s| {
            s["xds"]["connected"] == false
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let x = xds(&accel);
    assert_eq!(
        x["snapshot"], before,
        "last good state kept while istiod is away: {x}"
    );
    m.ads_mut().unwrap().restart().unwrap();
    let ads = m.ads().unwrap();
    let v_new = ads.version();
    // The agent resynced: a new stream that resumed from the accepted versions, then ACKed the
    // new istiod's version.
    let received = ads
        .wait_for(
            "the agent and both Envoys to resync",
            Duration::from_secs(15),
            |r| {
                let acked = |node: &str| {
                    r.iter().any(|x| {
                        x.node == node
                            && x.stream > streams_before
                            && x.type_url == TYPE_LISTENER
                            && x.version_info == v_new
                            && x.error.is_none()
                    })
                };
                acked(&agent_node) && acked(&m.node_id("client")) && acked(&m.node_id("server"))
            },
        )
        .unwrap();
    let resumed = received.iter().find(|x| {
        x.node == agent_node
            && x.stream > streams_before
            && x.type_url == TYPE_LISTENER
            && x.response_nonce.is_empty()
    });
    assert_eq!(
        resumed.map(|x| x.version_info.as_str()),
        before["versions"]["listeners"].as_str(),
        "the agent's first request on the new stream carries its accepted listener version"
    );
    accel
        .wait_status("the agent connected again", |s| {
            s["xds"]["connected"] == true
                && s["xds"]["snapshot"]["versions"]["listeners"] == v_new.as_str()
        })
        .unwrap();
    let v = finished(load, "load across the istiod restart");
    eprintln!("load across the restart: {v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["requests"].as_u64().unwrap() > 1000, "{v}");
    assert!(counter(&accel, "redirect_msgs") > r0, "still accelerated");
}

/// Moves `virtualInbound` to `port` in `res` (address only; the chains match the original
/// destination, which REDIRECT keeps).
fn move_inbound(res: &mut meshaccel_e2e::ads::Resources, port: u32) {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    let mut l = res.listener("virtualInbound").expect("virtualInbound");
    if let Some(address::Address::SocketAddress(s)) =
        l.address.as_mut().and_then(|a| a.address.as_mut())
    {
        s.port_specifier = Some(socket_address::PortSpecifier::PortValue(port));
    }
    res.put_listener(&l);
}

/// The inbound capture port changed by a push: the pods' capture rules and their Envoys move to
/// 15007 first while the agent still has 15006 (the sidecar → sidecar leg, accepted on 15007, is
/// no Istio leg to the kernel then: not accelerated), then the agent gets the push and
/// acceleration follows for new connections without an agent restart; a keep-alive connection
/// open across the agent's change keeps working. Traffic is correct throughout.
#[test]
fn inbound_capture_port_pushed_acceleration_follows() {
    require_root();
    let (mut m, accel, agent_node) = mesh_with_agent();
    accel
        .wait_status("the agent's xDS snapshot", |s| {
            s["xds"]["snapshot"]["inbound_port"] == 15006
        })
        .unwrap();
    let target = format!("{}:8080", m.pod("server").ip);
    let load = |m: &mut SidecarMesh, what: &str| {
        let v = finished(
            http_load(m, &target, &["--requests", "500", "--connections", "1"]),
            what,
        );
        assert_eq!(v["errors"], 0, "{what}: {v}");
    };
    let delta = |a: &Accel, before: &Value, name: &str| {
        a.status().unwrap()["counters"][name].as_u64().unwrap() - before[name].as_u64().unwrap()
    };

    // Baseline on 15006: all six sockets of a connection inserted, none skipped.
    let c0 = accel.status().unwrap()["counters"].clone();
    load(&mut m, "on 15006");
    assert_eq!(
        delta(&accel, &c0, "inserted"),
        6,
        "{}",
        accel.status().unwrap()
    );
    assert_eq!(delta(&accel, &c0, "skip_not_mesh"), 0);

    // Pods and Envoys move to 15007; the agent is not told.
    for pod in ["client", "server"] {
        m.pod(pod)
            .netns_exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-R",
                    "ISTIO_IN_REDIRECT",
                    "1",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15007",
                ],
            )
            .unwrap();
    }
    let (client_node, server_node) = (m.node_id("client"), m.node_id("server"));
    let ads = m.ads().unwrap();
    ads.edit(|e| {
        for n in [&client_node, &server_node] {
            move_inbound(e.node(n), 15007);
        }
    });
    for n in [&client_node, &server_node] {
        ads.wait_acked(n, TYPE_LISTENER, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("Envoy took the moved listener: {e:#}"));
    }
    let c1 = accel.status().unwrap()["counters"].clone();
    load(&mut m, "Envoys on 15007, agent on 15006");
    let skipped = delta(&accel, &c1, "skip_not_mesh");
    assert!(
        skipped >= 1,
        "the server Envoy's socket accepted on 15007 is no leg for an agent that knows 15006: {}",
        accel.status().unwrap()
    );
    assert!(delta(&accel, &c1, "inserted") < 6);

    // A keep-alive connection across the agent's change.
    let long = http_load(
        &mut m,
        &target,
        &[
            "--duration-ms",
            "3000",
            "--requests",
            "10000000",
            "--connections",
            "1",
            "--rate",
            "2000",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    // The push reaches the agent: acceleration follows.
    m.ads().unwrap().edit(|e| move_inbound(e.default, 15007));
    accel
        .wait_status("the agent learning 15007", |s| {
            s["xds"]["snapshot"]["inbound_port"] == 15007
        })
        .unwrap();
    m.ads()
        .unwrap()
        .wait_acked(&agent_node, TYPE_LISTENER, Duration::from_secs(5))
        .unwrap();
    let v = finished(long, "keep-alive load across the agent's change");
    assert_eq!(v["errors"], 0, "{v}");
    let c2 = accel.status().unwrap()["counters"].clone();
    load(&mut m, "everything on 15007");
    assert_eq!(
        delta(&accel, &c2, "inserted"),
        6,
        "all three legs again: {}",
        accel.status().unwrap()
    );
    assert_eq!(delta(&accel, &c2, "skip_not_mesh"), 0);
    assert!(delta(&accel, &c2, "redirect_msgs") >= 3 * 500);
}
