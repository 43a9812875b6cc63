//! The dataplane under Istio's real capture rules: root, real sockets, real kernel.
//!
//! Each test builds its own pods (netns + cgroup) with the unmodified istio-cni golden
//! `basic.txt.golden`, a relay standing in for Envoy (UID 1337), and the meshaccel agent attached
//! to the run's cgroup. Teardown (also on panic) kills the processes, uninstalls, and removes the
//! netns, cgroups and bpffs.
mod support;

use meshaccel_e2e::{
    Mesh, Pod,
    accel::{Accel, Scope, Workload},
    bpf, require_root, wait_output_timeout, wait_ready,
};
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};
use support::*;

const MB50: u64 = 50 * 1024 * 1024;

/// All three legs of Istio sidecar traffic on one node, through Istio's real rules:
/// app A → relay A (REDIRECT 15001), relay A → relay B (REDIRECT 15006), relay B → app B (from
/// 127.0.0.6). Off: segments grow with the payload. On: they stay at the handshakes, and the
/// redirect counters carry three times the payload.
#[test]
fn three_istio_legs_are_accelerated_byte_exact() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let wl = [Workload::on(&a), Workload::on(&b)];
    let mut accel = Accel::start(&mesh, false, &wl).expect("agent");
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &format!("{}:8080", b.ip));
    let bytes = MB50.to_string();

    // Baseline: the global switch is off.
    let before = segs(&[&a, &b]);
    let c0 = counters(&accel);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", &bytes]),
        "off",
    );
    let off = in_segs_since(&[&a, &b], &before);
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        0,
        "switch off: nothing may be inserted"
    );
    assert_eq!(delta(&c1, &c0, "redirect_bytes"), 0);

    // Accelerated.
    accel.set_workloads(true, &wl).unwrap();
    let before = segs(&[&a, &b]);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", &bytes]),
        "on",
    );
    let on = in_segs_since(&[&a, &b], &before);
    let c2 = counters(&accel);
    eprintln!("in-segments per pod for 50 MiB: off {off:?}, on {on:?}; counters {c2}");
    // 3 connections = 6 sockets, all paired.
    assert_eq!(
        delta(&c2, &c1, "inserted"),
        6,
        "every socket of the three legs is inserted: {c2}"
    );
    assert_eq!(delta(&c2, &c1, "insert_collision"), 0);
    // Each leg carries the payload once, redirected.
    assert!(
        delta(&c2, &c1, "redirect_bytes") >= 3 * MB50,
        "all three legs redirect: {c2}"
    );
    assert_eq!(delta(&c2, &c1, "fallback_no_peer"), 0, "{c2}");
    for (i, (on, off)) in on.iter().zip(&off).enumerate() {
        assert!(
            *off > 1_000,
            "pod {i}: without acceleration segments grow with the payload ({off})"
        );
        assert!(
            *on < 200,
            "pod {i}: accelerated, only handshakes and teardown cross TCP ({on})"
        );
    }
}

/// Two pods use identical loopback 4-tuples at the same time: no byte crosses pods.
#[test]
fn identical_loopback_tuples_in_two_pods_never_pair_across() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let c = mesh_pod(&mut mesh, "c");
    let d = mesh_pod(&mut mesh, "d");
    // App ↔ app over loopback is no Istio leg: accelerated in the "all" scope.
    let accel = Accel::start_with(
        &mesh,
        true,
        Scope::All,
        &[Workload::on(&c), Workload::on(&d)],
    )
    .expect("agent");
    let c0 = counters(&accel);
    sink(&mut mesh, &c, "127.0.0.1:9000");
    sink(&mut mesh, &d, "127.0.0.1:9000");
    let mut senders = Vec::new();
    for round in 0..5u64 {
        for (pod, seed) in [(&c, 100 + round), (&d, 200 + round)] {
            let seed = seed.to_string();
            let port = format!("127.0.0.1:{}", 41000 + round);
            senders.push(send(
                &mut mesh,
                pod,
                &[
                    "--connect",
                    "127.0.0.1:9000",
                    "--bind",
                    &port,
                    "--bytes",
                    "4000000",
                    "--seed",
                    &seed,
                    "--chunk",
                    "16384",
                ],
            ));
        }
    }
    for (i, s) in senders.into_iter().enumerate() {
        finished(s, &format!("sender {i}"));
    }
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        20,
        "both pods' loopback sockets were accelerated: {c1}"
    );
    assert!(delta(&c1, &c0, "redirect_bytes") >= 10 * 4_000_000, "{c1}");
}

/// A disabled workload, an excluded inbound port and the global switch: not accelerated, still
/// correct; switching off during a transfer falls back to TCP without losing a byte.
#[test]
fn disabled_excluded_and_switched_off_traffic_stays_correct() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let bytes = "8000000";

    // B disabled: nothing of B is inserted, so A's legs toward B find no peer on B's side.
    let mut accel =
        Accel::start(&mesh, true, &[Workload::on(&a), Workload::off(&b)]).expect("agent");
    let c0 = counters(&accel);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", bytes]),
        "b disabled",
    );
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "inserted"),
        3,
        "only A's sockets (app, relay in, relay out): {c1}"
    );
    assert!(
        delta(&c1, &c0, "redirect_bytes") >= 8_000_000,
        "leg 1 (inside A) still redirects: {c1}"
    );
    assert!(
        delta(&c1, &c0, "redirect_bytes") < 2 * 8_000_000,
        "legs 2 and 3 do not: {c1}"
    );

    // B excludes inbound port 8080: the app's accepted socket is never inserted (leg 3 on TCP).
    let mut b_excl = Workload::on(&b);
    b_excl.exclude_inbound_ports = vec![8080];
    accel
        .set_workloads(true, &[Workload::on(&a), b_excl])
        .unwrap();
    let c1 = counters(&accel);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", bytes]),
        "port excluded",
    );
    let c2 = counters(&accel);
    assert_eq!(delta(&c2, &c1, "skip_excluded_port"), 1, "{c2}");
    assert_eq!(delta(&c2, &c1, "inserted"), 5, "{c2}");
    assert!(
        delta(&c2, &c1, "redirect_bytes") >= 2 * 8_000_000,
        "legs 1 and 2 redirect: {c2}"
    );
    assert!(
        delta(&c2, &c1, "redirect_bytes") < 3 * 8_000_000,
        "leg 3 does not: {c2}"
    );

    // Global switch off in the middle of a slow transfer: it completes byte-exact on TCP.
    let wl = [Workload::on(&a), Workload::on(&b)];
    accel.set_workloads(true, &wl).unwrap();
    let c2 = counters(&accel);
    let slow = send(
        &mut mesh,
        &a,
        &[
            "--connect",
            &target,
            "--bytes",
            "6000000",
            "--chunk",
            "65536",
            "--hold-ms",
            "20",
        ],
    );
    wait_until("the slow transfer is redirecting", || {
        counters(&accel)["redirect_bytes"].as_u64().unwrap()
            > c2["redirect_bytes"].as_u64().unwrap() + 1_000_000
    });
    accel.set_workloads(false, &wl).unwrap();
    finished(slow, "switched off mid-transfer");
    let c3 = counters(&accel);
    assert!(
        delta(&c3, &c2, "fallback_disabled") >= 1,
        "senders fell back: {c3}"
    );
    assert!(
        delta(&c3, &c2, "tcp_bytes") > 0,
        "the rest went over TCP: {c3}"
    );
    // New connections while off are not inserted at all.
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", bytes]),
        "off",
    );
    let c4 = counters(&accel);
    assert_eq!(delta(&c4, &c3, "inserted"), 0, "{c4}");
    assert_eq!(delta(&c4, &c3, "redirect_bytes"), 0, "{c4}");
}

/// The agent is SIGKILLed mid-transfer and restarted: the transfer completes byte-exact, the new
/// agent adopts the pins (same link), and uninstall leaves nothing in the kernel once the
/// connections are gone.
#[test]
fn agent_killed_mid_transfer_restarts_adopting_pins_and_uninstall_leaves_nothing() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let wl = [Workload::on(&a), Workload::on(&b)];
    let mut accel = Accel::start(&mesh, true, &wl).expect("agent");
    let first = accel.status().unwrap();
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let slow = send(
        &mut mesh,
        &a,
        &[
            "--connect",
            &target,
            "--bytes",
            "20000000",
            "--chunk",
            "65536",
            "--hold-ms",
            "10",
        ],
    );
    wait_until("the transfer is redirecting", || {
        counters(&accel)["redirect_bytes"].as_u64().unwrap() > 2_000_000
    });
    accel.kill_agent();
    let mid = counters(&accel)["redirect_bytes"].as_u64().unwrap();
    wait_until("redirects continue with no agent", || {
        counters(&accel)["redirect_bytes"].as_u64().unwrap() > mid + 1_000_000
    });
    accel.start_agent().expect("restart");
    let second = accel.status().unwrap();
    assert_eq!(
        first["link_id"], second["link_id"],
        "the restarted agent adopted the pinned link"
    );
    assert_eq!(first["map_ids"], second["map_ids"], "and the pinned maps");
    assert_eq!(
        second["prog_ids"].as_array().unwrap().len(),
        2,
        "no second attach: {second}"
    );
    finished(slow, "agent killed and restarted mid-transfer");
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "1000000"]),
        "after restart",
    );

    // Uninstall while the sink's connection set is idle but the relays hold no data; then end
    // every process: the kernel must hold none of this run's programs, maps or link.
    let ids: Vec<u64> = ["map_ids", "prog_ids"]
        .iter()
        .flat_map(|k| {
            second[*k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .collect();
    let link = second["link_id"].as_u64().expect("link id");
    accel.kill_agent();
    let report = accel.uninstall().expect("uninstall");
    assert_eq!(
        report["removed_pins"].as_array().unwrap().len(),
        13,
        "link + 11 maps + the layout stamp: {report}"
    );
    drop(mesh); // every pod process ends, their sockets close
    // A second uninstall finishes the job: it waits until the kernel freed everything.
    let again = accel.uninstall_wait(20).expect("second uninstall");
    assert_eq!(again["drained"], true, "{again}");
    wait_until(
        "the kernel freed this run's programs, maps and link",
        || {
            let live: Vec<u64> = [bpftool_ids("prog"), bpftool_ids("map")].concat();
            !ids.iter().any(|id| live.contains(id)) && !bpftool_ids("link").contains(&link)
        },
    );
    let names = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .unwrap();
    assert!(
        names.status.success(),
        "`bpftool prog show` failed ({}): {}",
        names.status,
        String::from_utf8_lossy(&names.stderr)
    );
    let text = String::from_utf8_lossy(&names.stdout);
    assert!(
        !text.contains("meshaccel_ops") && !text.contains("meshaccel_msg"),
        "meshaccel programs remain:\n{text}"
    );
    drop(accel);
}

/// A bad workloads file is reported and the last good state stays in the maps: for each bad
/// file, the agent logs a rejection naming the file and counts a static_file source error.
#[test]
fn bad_workloads_file_keeps_the_last_good_state() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let accel = Accel::start_logged(&mesh, true, Scope::All, &[Workload::on(&a)]).expect("agent");
    const ERRORS: &str = "meshaccel_source_errors_total{source=\"static_file\"}";
    let file = accel.workloads_path().display().to_string();
    let rejections = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("workloads file rejected"))
            .map(str::to_string)
            .collect()
    };
    for bad in [
        "workloads:\n  - name: a\n    netns: /run/netns/does-not-exist-meshaccel\n",
        "workloads:\n  - name: a\n    netns: /x\n    colour: red\n",
        "workloads: [",
    ] {
        let errors = metric(&accel, ERRORS).unwrap_or(0.0);
        let logged = rejections(&accel.agent_log()).len();
        accel.write_raw(bad).unwrap();
        wait_until(
            &format!("the agent counts {bad:?} as a source error"),
            || metric(&accel, ERRORS).unwrap_or(0.0) > errors,
        );
        let log = accel.agent_log();
        let new = rejections(&log);
        assert!(
            new.len() > logged && new[logged..].iter().all(|l| l.contains(&file)),
            "a rejection naming {file} was logged for {bad:?}:\n{log}"
        );
        let s = accel.status().unwrap();
        assert_eq!(
            s["workloads_enabled"], 1,
            "last good state kept after {bad:?}: {s}"
        );
        assert_eq!(s["enabled"], true);
    }
    // And the dataplane still accelerates that workload.
    sink(&mut mesh, &a, "127.0.0.1:9000");
    let c0 = counters(&accel);
    finished(
        send(
            &mut mesh,
            &a,
            &["--connect", "127.0.0.1:9000", "--bytes", "1000000"],
        ),
        "after bad files",
    );
    assert_eq!(delta(&counters(&accel), &c0, "inserted"), 2);
}

/// The default "mesh" scope accelerates Istio's legs only: app ↔ app over loopback inside a pod
/// stays on TCP (its passive socket never enters the sockhash), while the relay path of the same
/// pods is accelerated; the "all" scope accelerates both.
#[test]
fn mesh_scope_accelerates_only_istio_legs() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let wl = [Workload::on(&a), Workload::on(&b)];
    let accel = Accel::start(&mesh, true, &wl).expect("agent");
    sink(&mut mesh, &a, "127.0.0.1:9000");
    sink(&mut mesh, &b, &format!("{}:8080", b.ip));
    let c0 = counters(&accel);
    finished(
        send(
            &mut mesh,
            &a,
            &["--connect", "127.0.0.1:9000", "--bytes", "2000000"],
        ),
        "loopback",
    );
    let c1 = counters(&accel);
    assert_eq!(
        delta(&c1, &c0, "skip_not_mesh"),
        1,
        "the sink's socket is no leg: {c1}"
    );
    assert_eq!(delta(&c1, &c0, "redirect_bytes"), 0, "{c1}");
    let target = format!("{}:8080", b.ip);
    finished(
        send(&mut mesh, &a, &["--connect", &target, "--bytes", "2000000"]),
        "legs",
    );
    let c2 = counters(&accel);
    assert_eq!(delta(&c2, &c1, "inserted"), 6, "{c2}");
    assert!(delta(&c2, &c1, "redirect_bytes") >= 3 * 2_000_000, "{c2}");
    // Per-workload traffic: both pods redirected.
    let st = accel.status().unwrap();
    for p in [&a, &b] {
        let w = &st["workloads"][p.netns_cookie().unwrap().to_string()];
        assert!(
            w["redirect_bytes"].as_u64().unwrap() >= 2_000_000,
            "{}: {st}",
            p.name
        );
    }
}

/// `status --sockets` dumps exactly the sockets of a live connection through the three legs:
/// three client/server pairs, each socket in its own pod's netns, the 127.0.0.6 leg in pod b.
#[test]
fn status_lists_the_sockets_of_the_three_legs() {
    require_root();
    let (mut mesh, a, b, accel) = two_mesh_pods(&[]);
    let target = format!("{}:8080", b.ip);
    sink(&mut mesh, &b, &target);
    let slow = send(
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
            "20",
        ],
    );
    let mut rows = Vec::new();
    wait_until("six sockets are listed", || {
        rows = accel.sockets().unwrap();
        rows.len() == 6
    });
    let (ca, cb) = (a.netns_cookie().unwrap(), b.netns_cookie().unwrap());
    let mut seen: Vec<(String, String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["client"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string(),
                r["role"].as_str().unwrap().to_string(),
                r["netns_cookie"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let (ia, ib) = (a.ip.to_string(), "127.0.0.6".to_string());
    let mut want = vec![
        (ia.clone(), "client".to_string(), ca), // app → relay A (15001)
        (ia.clone(), "server".to_string(), ca),
        (ia.clone(), "client".to_string(), ca), // relay A → relay B (15006)
        (ia, "server".to_string(), cb),
        (ib.clone(), "client".to_string(), cb), // relay B → app (127.0.0.6)
        (ib, "server".to_string(), cb),
    ];
    want.sort();
    assert_eq!(seen, want, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["netns_cookie"] == ca || r["netns_cookie"] == cb)
    );
    // None of these applications asked for TCP keepalive; every accelerated socket has it (a
    // RST the kernel drops at a busy socket is never resent: the probe draws a new one).
    for p in [&a, &b] {
        let out = p
            .netns_exec("ss", &["-tnoH", "state", "established"])
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.trim().is_empty() && text.lines().all(|l| l.contains("timer:(keepalive")),
            "accelerated sockets without a keepalive timer in pod {}:\n{text}",
            p.name
        );
    }
    finished(slow, "listed transfer");
}

/// A service whose connection streams small writes faster than its reader reads them (the
/// kernel's redirect moves them one message at a time, TCP coalesces them) is remembered: its
/// next connections stay on plain TCP, on every leg that belongs to it, until
/// `--small-write-secs` has passed; other services and large writes are accelerated as before,
/// and every byte arrives exactly either way. With `--small-write-secs 0` nothing is remembered.
#[test]
fn small_write_streams_keep_their_service_on_tcp_for_a_while() {
    require_root();
    let (mut mesh, a, b, accel, c) = small_write_stream("4");
    assert!(
        c >= 1,
        "the stream was not recognised as a small-write stream"
    );
    let small_svc = format!("{}:8080", b.ip);
    let listed = accel.status().expect("status")["small_write_services"].clone();
    assert!(
        listed.as_array().is_some_and(|l| l
            .iter()
            .any(|s| s["port"] == 8080 && s["direction"] == "outbound")),
        "status lists the service: {listed}"
    );
    // The same service again (64 KiB writes now, but the service is known): the app's leg and
    // its sidecar's leg to the other sidecar (the same service seen from pod a) stay out; the
    // other pod's sidecar → app leg too when its writes were small as well (the relay forwards
    // what it has read).
    let (inserted, skipped) = large_writes(&mut mesh, &accel, &a, &small_svc);
    assert!(
        inserted + skipped == 6 && skipped >= 4,
        "known small-write service: {inserted} sockets inserted, {skipped} kept on TCP"
    );
    // Another service of the same pods: accelerated.
    let other_svc = format!("{}:8081", b.ip);
    assert_eq!(large_writes(&mut mesh, &accel, &a, &other_svc), (6, 0));
    // Once the time has passed, the service is tried again.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        large_writes(&mut mesh, &accel, &a, &small_svc),
        (6, 0),
        "the service is accelerated again after --small-write-secs"
    );
    drop(accel);
    drop(mesh);

    let (mut mesh, a, b, accel, c) = small_write_stream("0");
    assert_eq!(c, 0, "policy off, yet a small-write stream was remembered");
    let small_svc = format!("{}:8080", b.ip);
    assert_eq!(large_writes(&mut mesh, &accel, &a, &small_svc), (6, 0));
}

/// Two mesh pods, sinks on b:8080 (which waits 1 s before reading: its sidecars' queues fill and
/// the app's 200 B writes find their reader behind) and b:8081, and one accelerated connection
/// streaming 32 MiB in 200 B writes to b:8080. Returns the pods, the agent and how often a
/// small-write stream was recognised.
fn small_write_stream(secs: &str) -> (Mesh, Pod, Pod, Accel, u64) {
    let (mut mesh, a, b, accel) = two_mesh_pods(&[("MESHACCEL_SMALL_WRITE_SECS", secs)]);
    let small_svc = format!("{}:8080", b.ip);
    sink_delayed(&mut mesh, &b, &small_svc, 1000);
    sink(&mut mesh, &b, &format!("{}:8081", b.ip));
    const BYTES: u64 = 32 << 20;
    let c0 = counters(&accel);
    finished(
        send(
            &mut mesh,
            &a,
            &[
                "--connect",
                &small_svc,
                "--bytes",
                &BYTES.to_string(),
                "--chunk",
                "200",
            ],
        ),
        "small writes",
    );
    let c1 = counters(&accel);
    eprintln!("small-write stream (--small-write-secs {secs}): {c1}");
    // The app's leg is accelerated and carries the stream. The relay connects its upstream leg
    // after accepting, while the app already writes: when the stream was recognised by then,
    // that leg (the same service, seen from pod a) already stays out.
    let (inserted, skipped) = (
        delta(&c1, &c0, "inserted"),
        delta(&c1, &c0, "skip_small_writes"),
    );
    assert!(
        inserted >= 2 && inserted + skipped == 6,
        "the first connection is accelerated: {c1}"
    );
    assert!(delta(&c1, &c0, "redirect_bytes") >= BYTES, "{c1}");
    let learned = delta(&c1, &c0, "learned_small_writes");
    (mesh, a, b, accel, learned)
}

/// Sends 8 MiB in 64 KiB writes to `to`; returns (sockets inserted, sockets kept on TCP as a
/// small-write service's), once every socket of the connection has closed (and checks that
/// only inserted ones count as `closed`).
fn large_writes(mesh: &mut Mesh, accel: &Accel, from: &Pod, to: &str) -> (u64, u64) {
    let before = counters(accel);
    finished(
        send(mesh, from, &["--connect", to, "--bytes", "8388608"]),
        to,
    );
    wait_until("the connection's sockets closed", || {
        accel.status().expect("status")["sockets"] == 0
    });
    std::thread::sleep(Duration::from_millis(200));
    let after = counters(accel);
    let inserted = delta(&after, &before, "inserted");
    assert_eq!(
        delta(&after, &before, "closed"),
        inserted,
        "`closed` counts inserted sockets only: {after}"
    );
    (inserted, delta(&after, &before, "skip_small_writes"))
}

/// A socket dissolved with `connect(AF_UNSPEC)` and connected again (the kernel allows reusing a
/// TCP socket so) must never receive its old peer's bytes on its new connection — also when its
/// RST to the old peer was lost, so that the old peer goes on sending. (Found by reading: the
/// sockhash kept the socket under its old connection's key, where the old peer redirected; the
/// new connection received 4.2 MB of the old stream.) The app has read everything before it
/// disconnects: bytes redirected into a socket and still unread at a disconnect stay in its
/// sk_msg queue, which the kernel does not purge (docs/design-notes.md).
#[test]
fn a_reconnected_socket_never_receives_its_old_peers_bytes() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    // App ↔ app over loopback: accelerated in the "all" scope.
    let accel = Accel::start_with(&mesh, true, Scope::All, &[Workload::on(&a)]).expect("agent");
    // The client's RST at the disconnect is lost (inside the pod's own netns).
    let out = a
        .netns_exec(
            "iptables",
            &[
                "-w",
                "-I",
                "OUTPUT",
                "-p",
                "tcp",
                "--sport",
                "40001",
                "--tcp-flags",
                "RST",
                "RST",
                "-j",
                "DROP",
            ],
        )
        .expect("iptables");
    assert!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The app runs as the app UID: its script goes where that UID can read it.
    let dir = tempfile::Builder::new()
        .prefix("meshaccel-reconnect-")
        .tempdir()
        .expect("tempdir");
    let script = dir.path().join("reconnect.py");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("apps/reconnect.py"),
        &script,
    )
    .expect("copying the app");
    for p in [dir.path(), script.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    let c0 = counters(&accel);
    let child = mesh
        .spawn(
            &a,
            Some(APP_UID),
            std::path::Path::new("/usr/bin/python3"),
            &[script.to_str().unwrap(), "40001", "9101", "9102"],
        )
        .expect("python3");
    let out = meshaccel_e2e::wait_output_timeout(child, Duration::from_secs(60)).expect("the app");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "the app's report {text:?}: {e}; stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let c1 = counters(&accel);
    assert!(
        delta(&c1, &c0, "redirect_bytes") >= 256 * 1024,
        "the first connection was accelerated: {c1}"
    );
    assert_eq!(
        v["ok"], true,
        "the second connection received exactly its own server's bytes: {v}; counters {c1}"
    );
    assert_eq!(
        delta(&c1, &c0, "skip_reconnected"),
        1,
        "the reconnected socket stays on TCP: {c1}"
    );
}

/// The ids of what the agent attached: (sock_ops programs on the cgroup, the link's program,
/// sk_msg programs on the pinned sockhash), read from the kernel, not from `status`.
fn attached(accel: &Accel) -> (Vec<u32>, u32, Vec<u32>) {
    let cg = std::fs::File::open(accel.cgroup()).expect("the run's cgroup");
    let ops = bpf::prog_query(cg.as_fd(), bpf::BPF_CGROUP_SOCK_OPS).expect("query the cgroup");
    let link = bpf::obj_get(&accel.bpffs().join("links/sock_ops"), 0).expect("the link pin");
    let link_prog = bpf::link_prog_id(link.as_fd()).expect("link info");
    let socks = bpf::obj_get(&pin(accel, "MESHACCEL_SOCKS"), 0).expect("the sockhash pin");
    let msg = bpf::prog_query(socks.as_fd(), bpf::BPF_SK_MSG_VERDICT).expect("query the sockhash");
    (ops, link_prog, msg)
}

fn pin(accel: &Accel, map: &str) -> PathBuf {
    accel.bpffs().join("maps").join(map)
}

/// An agent that finds it cannot start says why, naming the bpffs folder and the fix.
fn assert_refused(accel: &Accel, what: &str, reason: &str) {
    let (status, log) = accel
        .run_agent_expecting_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let bpffs = accel.bpffs().display().to_string();
    assert!(!status.success(), "{what}: the agent started:\n{log}");
    assert!(
        log.contains(reason) && log.contains(&format!("meshaccel uninstall --bpffs {bpffs}")),
        "{what}: the agent's error does not say {reason:?} and name the fix for {bpffs}:\n{log}"
    );
}

/// Pinned maps whose layout stamp (`MESHACCEL_META`, written at install) is another build's, or
/// missing next to the maps, are refused by a starting agent, with the bpffs folder and the fix
/// named, before anything is loaded or attached; `status` refuses to read them too. After
/// `uninstall`, a fresh install accelerates again.
#[test]
fn pinned_maps_of_another_layout_are_refused() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let mut accel = Accel::start_with(&mesh, true, Scope::All, &[Workload::on(&a)]).expect("agent");
    let meta = pin(&accel, "MESHACCEL_META");
    let before = attached(&accel);
    assert_eq!(
        (before.0.len(), before.2.len()),
        (1, 1),
        "one sock_ops, one sk_msg: {before:?}"
    );
    let stamp = bpf::obj_get(&meta, 0).expect("the install pinned a layout stamp");
    let mut ours = [0u8; 16];
    bpf::map_lookup(stamp.as_fd(), &0u32.to_ne_bytes(), &mut ours).expect("read the stamp");
    let hash = u64::from_ne_bytes(ours[8..16].try_into().unwrap());
    assert_eq!(
        accel.status().unwrap()["layout"]["hash"],
        format!("{hash:016x}"),
        "status shows the stamp"
    );
    accel.kill_agent();

    // Another layout hash, the same format (as an older build whose Config fields moved).
    let mut other = ours;
    other[8..16]
        .copy_from_slice(&(u64::from_ne_bytes(ours[8..16].try_into().unwrap()) ^ 1).to_ne_bytes());
    bpf::map_update(stamp.as_fd(), &0u32.to_ne_bytes(), &other).expect("overwrite the stamp");
    assert_refused(&accel, "another layout", "map layout");
    assert_eq!(
        attached(&accel),
        before,
        "nothing attached or replaced by the refused agent"
    );
    let e = accel
        .status()
        .expect_err("status must not read maps of another layout");
    assert!(
        e.to_string().contains("meshaccel uninstall --bpffs"),
        "{e:#}"
    );

    // No stamp at all next to the maps (as left by a build from before stamps).
    drop(stamp);
    std::fs::remove_file(&meta).expect("remove the stamp pin");
    assert_refused(&accel, "no stamp", "no layout stamp");
    assert_eq!(
        attached(&accel),
        before,
        "nothing attached or replaced by the refused agent"
    );

    // The fix the error names: uninstall (which does not switch the foreign maps off, it cannot
    // read them), then a fresh install that accelerates.
    let report = accel.uninstall().expect("uninstall");
    assert_eq!(
        report["removed_pins"].as_array().unwrap().len(),
        12,
        "link + 11 maps, no stamp: {report}"
    );
    // A new install is asked for explicitly: the uninstalled generation stays off.
    accel.set_agent_env("MESHACCEL_INSTALL_GENERATION", "2");
    accel.start_agent().expect("a fresh install");
    let after = attached(&accel);
    assert_ne!(after.1, before.1, "a new program under a new link");
    assert!(
        Path::new(&meta).exists(),
        "the fresh install stamped its maps"
    );
    sink(&mut mesh, &a, "127.0.0.1:9000");
    let c0 = counters(&accel);
    finished(
        send(
            &mut mesh,
            &a,
            &["--connect", "127.0.0.1:9000", "--bytes", "1000000"],
        ),
        "after a fresh install",
    );
    let c1 = counters(&accel);
    assert_eq!(delta(&c1, &c0, "inserted"), 2, "{c1}");
    assert!(delta(&c1, &c0, "redirect_bytes") >= 1_000_000, "{c1}");
}

/// The mode bits of a file or folder.
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Opens `pin` with BPF_OBJ_GET as UID/GID 65534 (nobody), read-only and read-write:
/// `Ok(())` when either open succeeded, else the errnos.
fn open_as_nobody(pin: &Path) -> Result<(), Vec<i64>> {
    let mut errnos = Vec::new();
    for ro in [true, false] {
        let mut cmd = std::process::Command::new(tool());
        cmd.arg("obj-get").arg(pin);
        if ro {
            cmd.arg("--read-only");
        }
        let out = std::os::unix::process::CommandExt::gid(
            std::os::unix::process::CommandExt::uid(&mut cmd, 65534),
            65534,
        )
        .output()
        .expect("run the tool as nobody");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "obj-get as nobody printed no JSON ({e}): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if v["ok"] == true {
            return Ok(());
        }
        errnos.push(v["errno"].as_i64().unwrap_or(-1));
    }
    Err(errnos)
}

/// A bpffs of the test's own, with a pin everybody may open: shows that an unprivileged open
/// of a pin works on this kernel when its mode allows it, so the refusals below are the modes'.
struct OpenPin {
    dir: tempfile::TempDir,
}

impl OpenPin {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshaccel-open-pin-")
            .tempdir_in("/run")
            .unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a bpffs");
        let me = Self { dir };
        let map = bpf::create_array("ma_open_pin", 8, 1).expect("a map");
        bpf::obj_pin(map.as_fd(), &me.pin()).expect("pin it");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(me.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(me.pin(), std::fs::Permissions::from_mode(0o666)).unwrap();
        me
    }
    fn pin(&self) -> PathBuf {
        self.dir.path().join("open")
    }
}

impl Drop for OpenPin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.pin());
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The pins hold kernel socket addresses (PEERS): the bpffs folder and its folders are 0700
/// and every pin 0600 after install, nobody but root can open one, `doctor` flags a pin or
/// folder widened later, and the next agent narrows them again when it adopts the pins.
#[test]
fn pins_are_root_only() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    // Apps not trusted: the workload also gets the adopting program's link (links/adopt/).
    let mut accel = Accel::start(&mesh, true, &[Workload::auto(&a)]).expect("agent");
    let b = accel.bpffs().to_path_buf();
    let folders = [
        b.clone(),
        b.join("maps"),
        b.join("links"),
        b.join("links/adopt"),
    ];
    let mut pins: Vec<PathBuf> = std::fs::read_dir(b.join("maps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pins.push(b.join("links/sock_ops"));
    pins.extend(
        std::fs::read_dir(b.join("links/adopt"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    assert_eq!(pins.len(), 14, "11 maps, the stamp, 2 links: {pins:?}");
    let modes = |what: &str| {
        for f in &folders {
            assert_eq!(
                format!("{:o}", mode(f)),
                "700",
                "{what}: folder {}",
                f.display()
            );
        }
        for p in &pins {
            assert_eq!(
                format!("{:o}", mode(p)),
                "600",
                "{what}: pin {}",
                p.display()
            );
        }
    };
    modes("after install");

    let control = OpenPin::new();
    assert_eq!(
        open_as_nobody(&control.pin()),
        Ok(()),
        "nobody cannot open even a 0666 pin here: this test could not tell a refusal by mode"
    );
    for p in &pins {
        let errnos = open_as_nobody(p).expect_err(&format!("nobody opened {}", p.display()));
        assert!(
            errnos
                .iter()
                .all(|e| *e == i64::from(libc::EACCES) || *e == i64::from(libc::EPERM)),
            "{}: {errnos:?}",
            p.display()
        );
    }

    // Widened by hand: doctor says so, naming what; the next agent narrows it again.
    use std::os::unix::fs::PermissionsExt as _;
    let peers = b.join("maps/MESHACCEL_PEERS");
    for f in &folders[..2] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&peers, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        open_as_nobody(&peers).map_err(|_| ()),
        Ok(()),
        "widened: nobody reads PEERS"
    );
    let out = std::process::Command::new(meshaccel_e2e::workspace_bin("meshaccel"))
        .args(["doctor", "--output", "json", "--bpffs"])
        .arg(&b)
        .arg("--cgroup")
        .arg(accel.cgroup())
        .output()
        .expect("doctor");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
    let c = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pin permissions")
        .unwrap_or_else(|| panic!("no pin permissions check: {r:#}"));
    let d = c["detail"].as_str().unwrap();
    assert_eq!(c["level"], "warn", "{c}");
    assert!(
        d.contains(&format!("{} (755)", b.display())) && d.contains("MESHACCEL_PEERS (644)"),
        "{c}"
    );
    accel.kill_agent();
    accel.start_agent().expect("restart");
    modes("after adoption");
    assert!(open_as_nobody(&peers).is_err());
}

/// The programs' per-CPU counters are updated with atomic adds (BPF `lock … +=`): on one CPU the
/// sock_ops program (softirq) can interrupt the sk_msg program between the load and the store of
/// a plain `+=`, and one of the two updates would be lost. (Found by reading; the race window is
/// two instructions and no test provokes it reliably, so this test reads the loaded code.)
#[test]
fn counters_are_updated_with_atomic_adds() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let accel = Accel::start_with(&mesh, true, Scope::All, &[Workload::on(&a)]).expect("agent");
    let ids: Vec<u64> = accel.status().unwrap()["prog_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(ids.len(), 2, "sock_ops and sk_msg: {ids:?}");
    let mut total = 0;
    for id in ids {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &id.to_string()])
            .output()
            .expect("bpftool (scripts/env.sh installs it)");
        assert!(
            out.status.success(),
            "bpftool prog dump xlated id {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let code = String::from_utf8_lossy(&out.stdout);
        let atomic = code.lines().filter(|l| l.contains("lock *(u64 *)")).count();
        assert!(
            atomic >= 1,
            "program {id} updates its counters with atomic adds:\n{code}"
        );
        total += atomic;
    }
    // At least: redirected messages and bytes, TCP messages and bytes, each globally and per
    // workload, in the sk_msg program alone.
    assert!(total >= 8, "{total} atomic adds in the two programs");
}

/// An app-sockets-auto workload gets the adopting tc program on its `lo` (a tcx egress link
/// pinned under links/adopt/<netns cookie>); declaring its apps trusted removes it, declaring
/// them auto again brings it back, an upgrade swaps its program, and uninstall removes it.
#[test]
fn the_app_socket_adopter_follows_its_workload() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let mut accel = Accel::start(&mesh, true, &[Workload::auto(&a)]).expect("agent");
    let pin = accel
        .bpffs()
        .join("links/adopt")
        .join(a.netns_cookie().expect("cookie").to_string());
    wait_until("the adopter's link is pinned", || pin.exists());
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    // Debian's bpftool names no tcx details: the type (BPF_LINK_TYPE_TCX = 11) and the program.
    assert!(link["type"] == "tcx" || link["type"] == 11, "{link}");
    let prog = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show", "id"])
        .arg(link["prog_id"].to_string())
        .output()
        .expect("bpftool");
    let prog: serde_json::Value = serde_json::from_slice(&prog.stdout).expect("bpftool json");
    assert_eq!(prog["name"], "meshaccel_adopt", "{prog}");
    assert_eq!(prog["type"], "sched_cls", "{prog}");

    accel
        .set_workloads(true, &[Workload::on(&a)])
        .expect("apps trusted");
    wait_until("the link goes with the apps trusted", || !pin.exists());
    accel
        .set_workloads(true, &[Workload::auto(&a)])
        .expect("apps auto again");
    wait_until("the link comes back", || pin.exists());

    // A restart keeps the link and its program; an upgrade gives the same link the new
    // agent's program.
    let prog_of_link = || {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&pin)
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        (
            v["id"].as_u64().expect("link id"),
            v["prog_id"].as_u64().expect("prog id"),
        )
    };
    let (link_id, prog_id) = prog_of_link();
    accel.kill_agent();
    accel.start_agent().expect("restart");
    assert_eq!(
        prog_of_link(),
        (link_id, prog_id),
        "a restart changes nothing"
    );
    accel.kill_agent();
    accel.set_agent_env("MESHACCEL_REPLACE_PROGRAMS", "true");
    accel.start_agent().expect("upgrade");
    let (link_after, prog_after) = prog_of_link();
    assert_eq!(link_after, link_id, "the same link");
    assert_ne!(prog_after, prog_id, "runs the new agent's program");

    accel.kill_agent();
    let report = accel.uninstall().expect("uninstall");
    assert!(
        report["removed_pins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == pin.to_str()),
        "{report}"
    );
    assert!(!pin.exists());
}

/// CPython's client with a timeout (non-blocking, polled: no event loop) connects through the
/// relay standing in for Envoy: its first write keeps it on TCP for life, outside the sockhash.
/// Nothing will ever be redirected into the relay's socket it talks to, so that socket leaves
/// the sockhash too instead of paying tcp_bpf's paths for every message: while the connection
/// is open, `status` lists no socket of the app's leg (the relay's own connection onwards stays
/// accelerated), and the bytes echoed through it are exact.
#[test]
fn a_sidecar_socket_whose_app_stays_on_tcp_leaves_the_sockhash() {
    use std::io::{BufRead as _, Write as _};
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let accel = Accel::start(&mesh, true, &[Workload::auto(&a), Workload::on(&b)]).expect("agent");
    app_server(
        &mut mesh,
        &b,
        &["echo", "--listen", &format!("{}:8080", b.ip)],
    );
    let c0 = counters(&accel);

    const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=20)
data = bytes((i * 31 + 7) % 251 for i in range(64 << 10))
def exchange():
    s.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("early EOF after %d bytes" % len(got))
        got += chunk
    if got != data:
        sys.exit("the echo differs")
exchange()
print("ready", flush=True)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
exchange()
print("exact", flush=True)
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", CLIENT, &b.ip.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut client = mesh.spawn_cmd(&a, Some(APP_UID), cmd).expect("client");
    wait_ready(&mut client).expect("client ready");
    let mut port = String::new();
    std::io::BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut port)
        .expect("port");
    let app = format!("{}:{}", a.ip, port.trim());

    // Rows of `status --sockets` with this role, in this pod, whose client address starts so.
    let count = |rows: &[serde_json::Value], role: &str, pod: &Pod, client: &str| {
        let cookie = pod.netns_cookie().unwrap();
        rows.iter()
            .filter(|r| {
                r["role"] == role
                    && r["netns_cookie"].as_u64() == Some(cookie)
                    && r["client"].as_str().is_some_and(|c| c.starts_with(client))
            })
            .count()
    };
    let mut listed = Vec::new();
    wait_until("the relay's connection onwards is listed", || {
        listed = accel.sockets().unwrap();
        count(&listed, "server", &b, &format!("{}:", a.ip)) == 1
            && count(&listed, "client", &b, "127.0.0.6:") == 1
    });
    assert!(
        !listed.iter().any(|r| r["client"] == app.as_str()),
        "a socket of the app's leg ({app}) is still in the sockhash: {listed:#?}"
    );
    let c1 = counters(&accel);
    assert_eq!(delta(&c1, &c0, "skip_app_no_epoll"), 1, "{c1}");
    assert_eq!(
        delta(&c1, &c0, "fallback_app_receiver"),
        0,
        "the relay's socket left before its first message: {c1}"
    );

    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = wait_output_timeout(client, Duration::from_secs(30)).expect("client");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("exact"),
        "the echo through the relay's socket, back on TCP: {out:?}"
    );
    let c2 = counters(&accel);
    assert!(
        delta(&c2, &c1, "redirect_bytes") >= 2 * (64 << 10),
        "the relay's connection onwards stays accelerated: {c2}"
    );
}
