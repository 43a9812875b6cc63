//! Safe transitions: no byte reordered or lost when acceleration starts, stops, is uninstalled,
//! or the agent restarts or upgrades — with bytes unread at the receivers at that moment.
//!
//! Pods carry Istio's golden capture rules and a UID-1337 relay standing in for Envoy, so every
//! connection crosses the three Istio legs. Every transfer is checked end to end by the sink's
//! byte count and CRC over the whole stream (order included).
mod support;

use std::time::Duration;

use meshaccel_e2e::{
    Mesh, Pod,
    accel::{Accel, Workload},
    bpf, require_root, wait_output_timeout,
};
use serde_json::Value;
use support::*;

fn swarm(mesh: &mut Mesh, from: &Pod, target: &str, args: &[&str]) -> std::process::Child {
    mesh.spawn(
        from,
        Some(APP_UID),
        &tool(),
        &[&["swarm", "--connect", target], args].concat(),
    )
    .expect("swarm")
}

fn swarm_report(child: std::process::Child, what: &str) -> Value {
    let out = wait_output_timeout(child, Duration::from_secs(180)).expect("swarm finished");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: bad report {text:?}: {e}"));
    assert!(
        out.status.success() && v["ok"] == true && v["failed"] == 0,
        "{what}: bytes lost or reordered: {v}"
    );
    v
}

/// Keeps both CPUs busy (so that sockets are inserted late relative to the client's first
/// write); killed with the mesh.
#[allow(
    clippy::zombie_processes,
    reason = "the mesh tracks, kills and reaps it"
)]
fn burn_cpus(mesh: &mut Mesh) {
    for _ in 0..2 {
        let _ = mesh
            .spawn_host(
                std::path::Path::new("/bin/sh"),
                &["-c", "while :; do :; done"],
            )
            .expect("cpu burner");
    }
}

/// Thousands of clients write right after connect() returns, with the CPUs busy: whatever each
/// direction decides at its first message, every byte arrives in order on every leg.
#[test]
fn first_message_races_keep_every_byte_in_order() {
    require_root();
    let (mut mesh, a, b, accel) = two_mesh_pods(&[]);
    sink(&mut mesh, &b, &format!("{}:8080", b.ip));
    burn_cpus(&mut mesh);
    let c0 = counters(&accel);
    let r = swarm_report(
        swarm(
            &mut mesh,
            &a,
            &format!("{}:8080", b.ip),
            &[
                "--connections",
                "1500",
                "--concurrency",
                "48",
                "--bytes",
                "20000",
                "--chunk",
                "1000",
            ],
        ),
        "race",
    );
    let c1 = counters(&accel);
    eprintln!(
        "race: {r}; inserted {}, redirected {} msgs, TCP for life at the first message: {} (no peer yet)",
        delta(&c1, &c0, "inserted"),
        delta(&c1, &c0, "redirect_msgs"),
        delta(&c1, &c0, "fallback_no_peer")
    );
    assert!(
        delta(&c1, &c0, "inserted") >= 6 * 1500 - 100,
        "the sockets were inserted: {c1}"
    );
    assert!(delta(&c1, &c0, "redirect_bytes") > 0, "{c1}");
}

/// Enabling a workload while its connections carry data with bytes unread at the receiver:
/// those connections stay on TCP (their sockets predate the enable), new ones are accelerated.
#[test]
fn enabling_under_load_leaves_live_connections_on_tcp() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let wl_off = [Workload::off(&a), Workload::off(&b)];
    let wl_on = [Workload::on(&a), Workload::on(&b)];
    let mut accel = Accel::start(&mesh, true, &wl_off).expect("agent");
    let target = format!("{}:8080", b.ip);
    sink_delayed(&mut mesh, &b, &target, 800);
    let c0 = counters(&accel);
    let live = send(
        &mut mesh,
        &a,
        &[
            "--connect",
            &target,
            "--bytes",
            "4000000",
            "--chunk",
            "65536",
            "--hold-ms",
            "15",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    accel.set_workloads(true, &wl_on).unwrap();
    finished(live, "enabled mid-transfer");
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        0,
        "live sockets never enter: {c1}"
    );
    assert_eq!(delta(&c1, &c0, "redirect_bytes"), 0, "{c1}");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "2000000"]),
        "new connection",
    );
    let c2 = counters(&accel);
    assert_eq!(delta(&c2, &c1, "inserted"), 6, "{c2}");
    assert!(delta(&c2, &c1, "redirect_bytes") >= 3 * 2_000_000, "{c2}");
}

/// Disable either end, switch off globally, remove the pod from the mesh — each while the
/// receiving app holds redirected bytes it has not read yet: it reads every byte, in order
/// (redirected ones first, then what came over TCP after the switch).
#[test]
fn turning_off_with_unread_redirected_bytes_loses_nothing() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let both = vec![Workload::on(&a), Workload::on(&b)];
    let mut accel = Accel::start(&mesh, true, &both).expect("agent");
    let cases: [(&str, bool, Vec<Workload>); 4] = [
        (
            "server pod disabled",
            true,
            vec![Workload::on(&a), Workload::off(&b)],
        ),
        (
            "client pod disabled",
            true,
            vec![Workload::off(&a), Workload::on(&b)],
        ),
        ("global switch off", false, both.clone()),
        ("server pod removed", true, vec![Workload::on(&a)]),
    ];
    for (i, (name, enabled, wl)) in cases.into_iter().enumerate() {
        accel.set_workloads(true, &both).unwrap();
        let target = format!("{}:{}", b.ip, 8100 + i);
        sink_delayed(&mut mesh, &b, &target, 1500);
        let c0 = counters(&accel);
        let t = send(
            &mut mesh,
            &a,
            &[
                "--connect",
                &target,
                "--bytes",
                "3000000",
                "--chunk",
                "32768",
                "--hold-ms",
                "5",
            ],
        );
        wait_until("redirected bytes are waiting at the receiver", || {
            counter(&accel, "redirect_bytes") > c0["redirect_bytes"].as_u64().unwrap() + 1_000_000
        });
        accel.set_workloads(enabled, &wl).unwrap();
        finished(t, name);
        let c1 = counters(&accel);
        assert!(
            delta(&c1, &c0, "fallback_disabled") >= 1,
            "{name}: senders fell back to TCP: {c1}"
        );
        assert!(
            delta(&c1, &c0, "tcp_bytes") > 0,
            "{name}: the rest went over TCP: {c1}"
        );
    }
}

/// A full sockhash: new connections stay on TCP (counted), nothing fails, and the connection
/// holding the map keeps its unread redirected bytes.
#[test]
fn full_sockhash_falls_back_to_tcp() {
    require_root();
    // Room for one connection through the three legs (six sockets).
    let (mut mesh, a, b, accel) = two_mesh_pods(&[("MESHACCEL_SOCKHASH_CAPACITY", "6")]);
    let target = format!("{}:8080", b.ip);
    sink_delayed(&mut mesh, &b, &target, 1200);
    let c0 = counters(&accel);
    let first = send(
        &mut mesh,
        &a,
        &[
            "--connect",
            &target,
            "--bytes",
            "2000000",
            "--chunk",
            "65536",
            "--hold-ms",
            "10",
        ],
    );
    wait_until("the first connection fills the sockhash", || {
        accel.status().unwrap()["sockets"].as_u64() == Some(6)
    });
    let second = send(&mut mesh, &a, &["--connect", &target, "--bytes", "1000000"]);
    finished(second, "second connection, sockhash full");
    finished(first, "first connection");
    let c1 = counters(&accel);
    assert_eq!(delta(&c1, &c0, "inserted"), 6, "{c1}");
    assert!(
        delta(&c1, &c0, "insert_failed") >= 1,
        "the full map refused sockets: {c1}"
    );
}

/// Uninstall while 100 accelerated connections hold unread data: no byte lost; when the
/// connections end, the kernel holds no meshaccel program, link or map.
#[test]
fn uninstall_with_unread_data_loses_nothing_and_leaves_nothing() {
    require_root();
    let (mut mesh, a, b, mut accel) = two_mesh_pods(&[]);
    let target = format!("{}:8080", b.ip);
    sink_delayed(&mut mesh, &b, &target, 2500);
    let c0 = counters(&accel);
    let load = swarm(
        &mut mesh,
        &a,
        &target,
        &[
            "--connections",
            "100",
            "--concurrency",
            "100",
            "--bytes",
            "65536",
            "--chunk",
            "8192",
        ],
    );
    wait_until("100 connections hold unread bytes at the sinks", || {
        counter(&accel, "redirect_bytes")
            >= c0["redirect_bytes"].as_u64().unwrap() + 3 * 100 * 65536 - 100 * 65536
            && counter(&accel, "inserted") >= c0["inserted"].as_u64().unwrap() + 600
    });
    // As an operator does: stop the agent, then uninstall.
    accel.kill_agent();
    let report = accel.uninstall().expect("uninstall");
    assert_eq!(report["drained"], false, "connections are live: {report}");
    assert!(
        report["sockets_draining"].as_u64().unwrap() >= 200,
        "{report}"
    );
    swarm_report(load, "uninstalled while unread");
    let again = accel.uninstall_wait(30).expect("second uninstall");
    assert_eq!(
        again["drained"], true,
        "the kernel freed everything once the connections closed: {again}"
    );
}

/// One map of the kernel by id (`bpftool map dump`): its entries' raw bytes. Fails the test
/// when bpftool does.
fn map_dump(id: u64) -> Vec<Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .expect("bpftool (scripts/env.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool map dump id {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool map dump id {id}: {e}"))
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("bpftool map dump id {id}: not a list"))
}

fn le_u64(bytes: &Value) -> u64 {
    bytes
        .as_array()
        .expect("raw bytes")
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, b)| {
            let b = u64::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            b << (8 * i)
        })
        .sum()
}

/// The id of one of the agent's maps, by name, among the ids `status` lists.
fn map_id(status: &Value, name: &str) -> u64 {
    status["map_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .find(|id| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "id", &id.to_string()])
                .output()
                .expect("bpftool");
            serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["name"] == name)
        })
        .unwrap_or_else(|| panic!("no map {name} among {status}"))
}

/// Off stays off. `meshaccel uninstall` runs while the agent reconciles as fast as it can (the
/// workloads file flips the switch every 30 ms) and while senders redirect: afterwards the
/// switch in the (unpinned, still live) config map is off, no message is redirected any more,
/// the agent has stopped by itself, and an agent started again with the same arguments (what a
/// DaemonSet does) refuses, attaching and pinning nothing. A new install generation installs.
#[test]
fn uninstall_stays_off_through_a_reconcile_storm_and_a_restarted_agent() {
    require_root();
    let (mut mesh, a, b, mut accel) = two_mesh_pods(&[]);
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let status = accel.status().unwrap();
    let (cfg_id, stats_id) = (
        map_id(&status, "MESHACCEL_CFG"),
        map_id(&status, "MESHACCEL_STATS"),
    );
    // 20 connections writing 1 KiB every 20 ms for ~8 s: they keep the maps alive after the
    // uninstall and keep sending through it.
    let load = swarm(
        &mut mesh,
        &a,
        &target,
        &[
            "--connections",
            "20",
            "--concurrency",
            "20",
            "--bytes",
            "409600",
            "--chunk",
            "1024",
            "--hold-ms",
            "20",
        ],
    );
    let r0 = counter(&accel, "redirect_msgs");
    wait_until("the senders redirect", || {
        counter(&accel, "redirect_msgs") >= r0 + 20 * 10
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        let path = accel.workloads_path().to_path_buf();
        let texts = [true, false].map(|on| {
            meshaccel_e2e::accel::workloads_yaml(
                on,
                Default::default(),
                &[Workload::on(&a), Workload::on(&b)],
            )
        });
        std::thread::spawn(move || {
            let tmp = path.with_extension("storm");
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&tmp, &texts[i % 2]).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            // Ends on "on": what a late reconcile would write back.
            std::fs::write(&tmp, &texts[0]).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let report = accel.uninstall().expect("uninstall");
    assert!(
        !report["removed_pins"].as_array().unwrap().is_empty(),
        "{report}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    storm.join().unwrap();
    wait_until("the agent stops by itself", || accel.agent_exit().is_some());
    accel.kill_agent(); // reaps it
    std::thread::sleep(Duration::from_millis(300));
    let cfg = map_dump(cfg_id);
    assert_eq!(
        le_u64(&cfg[0]["value"]) & 0xffff_ffff,
        0,
        "the switch stays off after the uninstall: {cfg:?}"
    );
    let redirected = || -> u64 {
        map_dump(stats_id)
            .iter()
            .find(|e| le_u64(&e["key"]) == 3)
            .expect("the redirect_msgs counter")["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| le_u64(&v["value"]))
            .sum()
    };
    let r1 = redirected();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        redirected(),
        r1,
        "no sender redirects after the uninstall (the senders kept writing)"
    );
    // What a DaemonSet does next: the same agent again.
    let (status, err) = accel
        .run_agent_expecting_exit(Duration::from_secs(20))
        .expect("the restarted agent exits");
    assert!(
        !status.success() && err.contains("uninstalled") && err.contains("--install-generation"),
        "the restarted agent refuses, naming the fix: {err}"
    );
    for sub in ["maps", "links"] {
        assert!(
            !accel.bpffs().join(sub).exists(),
            "nothing pinned after the refused start: {}",
            accel.bpffs().join(sub).display()
        );
    }
    assert!(
        accel.status().is_err(),
        "status finds nothing installed after the refused start"
    );
    swarm_report(load, "senders through the uninstall");
    // A new installation is asked for explicitly: it installs and accelerates.
    accel.set_agent_env("MESHACCEL_INSTALL_GENERATION", "2");
    accel
        .start_agent()
        .expect("a new install generation installs");
    let r2 = counter(&accel, "redirect_msgs");
    swarm_report(
        swarm(
            &mut mesh,
            &a,
            &target,
            &["--connections", "2", "--bytes", "65536"],
        ),
        "after the new install",
    );
    assert!(counter(&accel, "redirect_msgs") > r2, "accelerated again");
}

/// The agent is SIGKILLed and restarted, then replaced by a binary that replaces the programs
/// (an upgrade), all under load: nothing lost or reordered; the upgrade swaps the programs under
/// the same pinned link and maps.
#[test]
fn agent_restart_and_upgrade_under_load_lose_nothing() {
    require_root();
    let (mut mesh, a, b, mut accel) = two_mesh_pods(&[]);
    let before = accel.status().unwrap();
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let load = swarm(
        &mut mesh,
        &a,
        &target,
        &[
            "--connections",
            "1200",
            "--concurrency",
            "8",
            "--bytes",
            "262144",
            "--chunk",
            "16384",
            "--hold-ms",
            "1",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    accel.kill_agent();
    std::thread::sleep(Duration::from_millis(200));
    accel.start_agent().expect("restart");
    std::thread::sleep(Duration::from_millis(300));
    accel.kill_agent();
    accel.set_agent_env("MESHACCEL_REPLACE_PROGRAMS", "true");
    accel.start_agent().expect("upgrade");
    let inserted_at_upgrade = counter(&accel, "inserted");
    let r = swarm_report(load, "restart and upgrade under load");
    let after = accel.status().unwrap();
    eprintln!("restart+upgrade under load: {r}");
    assert_eq!(before["link_id"], after["link_id"], "same pinned link");
    assert_eq!(before["map_ids"], after["map_ids"], "same pinned maps");
    assert_ne!(
        before["prog_ids"], after["prog_ids"],
        "the programs were replaced: {after}"
    );
    // The new programs pair and redirect new connections.
    let c0 = counters(&accel);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "1000000"]),
        "after the upgrade",
    );
    let c1 = counters(&accel);
    assert_eq!(delta(&c1, &c0, "inserted"), 6, "{c1}");
    assert!(delta(&c1, &c0, "redirect_bytes") >= 3 * 1_000_000, "{c1}");
    assert!(counter(&accel, "inserted") > inserted_at_upgrade);
}

/// The sk_msg programs attached to the pinned sockhash, read from the kernel.
fn sk_msg_programs(accel: &Accel) -> Vec<u32> {
    use std::os::fd::AsFd as _;
    let socks = bpf::obj_get(&accel.bpffs().join("maps/MESHACCEL_SOCKS"), 0).expect("sockhash pin");
    bpf::prog_query(socks.as_fd(), bpf::BPF_SK_MSG_VERDICT).expect("query the sockhash")
}

/// An agent that stopped between pinning the sock_ops link and attaching sk_msg leaves a
/// sockhash that takes sockets in and redirects nothing (shown here by detaching sk_msg from the
/// pinned sockhash): the next agent finds no sk_msg program on it when it adopts the pins,
/// attaches its own, counts it, and new connections are accelerated again. An agent that finds
/// one attached leaves it (no second attach).
#[test]
fn adoption_reattaches_a_missing_sk_msg_program() {
    use std::os::fd::AsFd as _;
    require_root();
    let (mut mesh, a, b, mut accel) = two_mesh_pods(&[]);
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let transfer = |mesh: &mut Mesh, accel: &Accel, what: &str| {
        let c0 = counters(accel);
        finished(
            send(mesh, &a, &["--connect", &target, "--bytes", "1000000"]),
            what,
        );
        let c1 = counters(accel);
        (
            delta(&c1, &c0, "inserted"),
            delta(&c1, &c0, "redirect_bytes"),
        )
    };
    let attached = sk_msg_programs(&accel);
    assert_eq!(attached.len(), 1, "{attached:?}");
    accel.kill_agent();
    let socks = bpf::obj_get(&accel.bpffs().join("maps/MESHACCEL_SOCKS"), 0).expect("sockhash pin");
    let prog = bpf::prog_fd_by_id(attached[0]).expect("the sk_msg program");
    bpf::prog_detach(socks.as_fd(), prog.as_fd(), bpf::BPF_SK_MSG_VERDICT).expect("detach sk_msg");
    drop((socks, prog));
    assert!(sk_msg_programs(&accel).is_empty());
    // The broken state: sockets are inserted, nothing is redirected.
    let (inserted, redirected) = transfer(&mut mesh, &accel, "without sk_msg");
    assert_eq!(
        (inserted, redirected),
        (6, 0),
        "sock_ops inserts, no sk_msg redirects"
    );

    accel.start_agent().expect("restart");
    let now = sk_msg_programs(&accel);
    assert_eq!(now.len(), 1, "the adopting agent attached sk_msg: {now:?}");
    assert_eq!(
        metric(&accel, "meshaccel_sk_msg_reattached_total"),
        Some(1.0),
        "and counted it"
    );
    let (inserted, redirected) = transfer(&mut mesh, &accel, "after the reattach");
    assert_eq!(inserted, 6);
    assert!(
        redirected >= 3 * 1_000_000,
        "all three legs redirect again: {redirected}"
    );

    // With sk_msg in place, a restart adopts without attaching anything.
    accel.kill_agent();
    accel.start_agent().expect("second restart");
    assert_eq!(
        sk_msg_programs(&accel),
        now,
        "the same single sk_msg program"
    );
    assert_eq!(
        metric(&accel, "meshaccel_sk_msg_reattached_total"),
        Some(0.0)
    );
    let (_, redirected) = transfer(&mut mesh, &accel, "after a plain restart");
    assert!(redirected >= 3 * 1_000_000, "{redirected}");
}
