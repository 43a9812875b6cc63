//! Integrity soak: ≥ 1,000 concurrent connections across Istio's three legs (golden capture
//! rules, a UID-1337 relay as the sidecar), messages of 1 B – 1 MB with random pauses, slow
//! readers (the server stops reading while the client pushes), half-close on every normal
//! connection and RSTs mixed in; faults injected while it runs. Every connection carries a
//! crc32 of each direction; the soak client fails on any lost, extra or reordered byte and on any
//! connection that has not ended by its deadline.
//!
//! CI mode (default): one wave of 1,000 connections. Long mode, `MESHACCEL_SOAK=long`: waves of
//! 1,000 connections until ≥ 10 GB crossed, faults every few seconds:
//! `MESHACCEL_SOAK=long cargo test -p meshaccel-e2e --test soak -- --nocapture --test-threads 1`
mod support;

use std::{
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use meshaccel_e2e::{
    Mesh, Pod,
    accel::{Accel, Workload},
    require_root, wait_output_timeout,
};
use serde_json::Value;
use support::*;

fn long_mode() -> bool {
    std::env::var("MESHACCEL_SOAK").is_ok_and(|v| v == "long")
}

/// [`two_mesh_pods`] with a soak server in pod b on 8080; returns the soak target too.
fn soak_pods(env: &[(&str, &str)]) -> (Mesh, Pod, Pod, Accel, String) {
    let (mut mesh, a, b, accel) = two_mesh_pods(env);
    let target = format!("{}:8080", b.ip);
    soak_server(&mut mesh, &b, &target);
    (mesh, a, b, accel, target)
}

fn soak(mesh: &mut Mesh, from: &Pod, target: &str, args: &[&str]) -> Child {
    mesh.spawn(
        from,
        Some(APP_UID),
        &tool(),
        &[&["soak", "--connect", target], args].concat(),
    )
    .expect("soak")
}

fn soak_report(child: Child, what: &str, timeout: Duration) -> Value {
    let out = wait_output_timeout(child, timeout).expect("soak finished in time (no hang)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: bad report {text:?}: {e}"));
    eprintln!("{what}: {v}");
    assert!(
        out.status.success() && v["ok"] == true && v["failed"] == 0,
        "{what}: a connection lost, reordered or hung: {v}"
    );
    v
}

/// Kernel TCP memory of the whole host (pages, /proc/net/sockstat `TCP: … mem N`): independent
/// of the agent, it includes every socket buffer and sk_msg queue of every netns.
fn tcp_mem_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").expect("sockstat");
    s.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.windows(2)
                .find(|w| w[0] == "mem")
                .and_then(|w| w[1].parse().ok())
        })
        .expect("TCP mem in /proc/net/sockstat")
}

/// The kernel's hard limit for TCP memory (pages): `tcp_mem`'s third value.
fn tcp_mem_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .expect("tcp_mem")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("tcp_mem max")
}

/// Samples the host's TCP memory every 50 ms until dropped; `peak()` is the highest sample.
struct MemSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MemSampler {
    fn start() -> Self {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(tcp_mem_pages(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        });
        MemSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }
    fn peak(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Waits until the pods hold no established TCP connection (every soak connection ended in the
/// kernel too, on every leg, RST ones included) and the sockhash is empty.
fn wait_all_closed(accel: &Accel, pods: &[&Pod]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let estab: Vec<u64> = pods
            .iter()
            .map(|p| p.tcp_counters().expect("snmp").curr_estab)
            .collect();
        let sockets = accel.status().expect("status")["sockets"].as_u64();
        if estab.iter().all(|&n| n == 0) && sockets == Some(0) {
            return;
        }
        if Instant::now() >= deadline {
            // Which processes hold them, and what sits in their queues: for the diagnosis.
            let ss: Vec<String> = pods
                .iter()
                .map(|p| {
                    let run = |cmd: &str, args: &[&str]| {
                        p.netns_exec(cmd, args)
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_else(|e| e.to_string())
                    };
                    // Sockets with memory (r: unread, ingress queue included) and the netns's
                    // TCP error counters (RSTs dropped, challenge ACKs, listen overflows).
                    let counters: String = run("nstat", &["-az"])
                        .lines()
                        .filter(|l| {
                            [
                                "Rst",
                                "Challenge",
                                "Listen",
                                "Reset",
                                "Abort",
                                "InErr",
                                "Syncookies",
                                "Backlog",
                            ]
                            .iter()
                            .any(|k| l.contains(k))
                        })
                        .filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v != "0"))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    format!(
                        "{}{counters}",
                        run("ss", &["-tnpmi", "state", "established"])
                    )
                })
                .collect();
            panic!(
                "connections still established 30 s after the soak: {estab:?}, sockhash {sockets:?}\n{}",
                ss.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The soak with agent faults: while it runs the agent is SIGKILLed and restarted, and restarted
/// as an upgrade (`MESHACCEL_REPLACE_PROGRAMS=true`: a new sock_ops program under the pinned
/// link, a new sk_msg program on the pinned sockhash), alternately.
#[test]
fn soak_every_byte_exact_under_agent_kill_and_upgrade() {
    require_root();
    let long = long_mode();
    // A short keepalive (default 60 s) so that a connection whose RST the kernel dropped (see
    // `Config::keepalive_secs`) ends within the final check's 30 s.
    let (mut mesh, a, b, mut accel, target) = soak_pods(&[("MESHACCEL_KEEPALIVE_SECS", "5")]);
    let c0 = counters(&accel);
    let mem_before = tcp_mem_pages();
    let mut sampler = MemSampler::start();
    let waves = if long { "9" } else { "1" };
    let max_msgs = if long { "32" } else { "4" };
    let started = Instant::now();
    // What a stalled reader's sender pushes (env MESHACCEL_SOAK_SLOW_BYTES, default 64 MiB: above
    // what the chain of 3 legs and 2 relays buffers, 16-32 MiB measured on 6.18).
    let slow_bytes: u64 = std::env::var("MESHACCEL_SOAK_SLOW_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    let client = soak(
        &mut mesh,
        &a,
        &target,
        &[
            "--connections",
            "1000",
            "--waves",
            waves,
            "--max-msgs",
            max_msgs,
            "--slow-bytes",
            &slow_bytes.to_string(),
            "--slow-every",
            "100",
            "--deadline-secs",
            if long { "600" } else { "90" },
        ],
    );
    let pid = client.id();
    // Faults while the client runs (it is our child: /proc/<pid> exists until reaped).
    let mut faults = Vec::new();
    let period = Duration::from_millis(if long { 5000 } else { 1200 });
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    thread::sleep(Duration::from_millis(800));
    while alive(pid) && faults.len() < if long { 1000 } else { 2 } {
        // MESHACCEL_SOAK_FAULTS=kill|upgrade runs one kind only (to find which one a problem
        // follows); default: alternate.
        let upgrade = match std::env::var("MESHACCEL_SOAK_FAULTS").as_deref() {
            Ok("kill") => false,
            Ok("upgrade") => true,
            _ => faults.len() % 2 == 1,
        };
        accel.kill_agent();
        thread::sleep(Duration::from_millis(200));
        accel.set_agent_env(
            "MESHACCEL_REPLACE_PROGRAMS",
            if upgrade { "true" } else { "false" },
        );
        accel.start_agent().expect("agent restarted");
        faults.push(if upgrade {
            "upgrade"
        } else {
            "sigkill+restart"
        });
        thread::sleep(period);
    }
    let r = soak_report(
        client,
        "soak",
        Duration::from_secs(if long { 7200 } else { 150 }),
    );
    let peak = sampler.peak();
    let c1 = counters(&accel);
    let bytes = r["bytes_up"].as_u64().unwrap() + r["bytes_down"].as_u64().unwrap();
    eprintln!(
        "soak: {} connections, {:.1} MB app bytes, faults {faults:?} in {:.1} s; inserted {}, redirected {} B, \
         fallbacks no_peer {} ; host TCP memory {} → peak {} pages (limit {}), in flight per slow connection ≤ {} B",
        r["connections"],
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        delta(&c1, &c0, "inserted"),
        delta(&c1, &c0, "redirect_bytes"),
        delta(&c1, &c0, "fallback_no_peer"),
        mem_before,
        peak,
        tcp_mem_limit(),
        r["slow_max_early_bytes"],
    );
    assert!(
        faults.len() >= 2,
        "both faults hit the running soak: {faults:?}"
    );
    assert_eq!(r["connections"], if long { 9000 } else { 1000 });
    assert!(r["resets"].as_u64().unwrap() >= 90, "RSTs mixed in: {r}");
    assert!(r["slow_ok"].as_u64().unwrap() >= 9, "slow readers: {r}");
    if long {
        assert!(bytes >= 10_000_000_000, "long mode moves ≥ 10 GB: {bytes}");
    }
    // Accelerated: every connection crosses three legs, six sockets.
    assert!(delta(&c1, &c0, "inserted") >= 6 * 900, "{c1}");
    assert!(delta(&c1, &c0, "redirect_bytes") >= bytes, "{c1}");
    // Backpressure: a sender facing a stalled reader is blocked after a bounded amount (the
    // buffers of the chain), far below what it had to send, and the kernel never came near its
    // TCP memory limit.
    assert!(
        r["slow_max_early_bytes"].as_u64().unwrap() < slow_bytes,
        "a stalled reader did not hold its sender back: {r}"
    );
    assert!(peak < tcp_mem_limit() / 2, "TCP memory peak {peak} pages");
    wait_all_closed(&accel, &[&a, &b]);
    // And the memory went back (give the kernel's per-CPU reserves some slack).
    let after = tcp_mem_pages();
    assert!(
        after < mem_before + 4096,
        "TCP memory not returned: {mem_before} → {after} pages"
    );
}

/// A sockhash far too small for the soak: the connections it cannot hold stay on TCP, counted
/// (`insert_failed`), and every byte of every connection still arrives exactly.
#[test]
fn soak_with_full_sockhash_falls_back_and_loses_nothing() {
    require_root();
    let (mut mesh, a, b, accel, target) = soak_pods(&[("MESHACCEL_SOCKHASH_CAPACITY", "64")]);
    let c0 = counters(&accel);
    let r = soak_report(
        soak(
            &mut mesh,
            &a,
            &target,
            &[
                "--connections",
                "300",
                "--max-msgs",
                "3",
                "--max-msg",
                "262144",
                "--slow-bytes",
                "2097152",
            ],
        ),
        "full sockhash",
        Duration::from_secs(120),
    );
    let c1 = counters(&accel);
    eprintln!(
        "full sockhash: {} connections ok; inserted {}, insert_failed {}, redirected {} B",
        r["connections"],
        delta(&c1, &c0, "inserted"),
        delta(&c1, &c0, "insert_failed"),
        delta(&c1, &c0, "redirect_bytes")
    );
    assert!(
        delta(&c1, &c0, "insert_failed") > 0,
        "the sockhash filled: {c1}"
    );
    assert!(delta(&c1, &c0, "inserted") > 0, "{c1}");
    wait_all_closed(&accel, &[&a, &b]);
}

/// A pod's netns deleted (its processes killed) while its accelerated connections carry data
/// with bytes in flight: the kernel frees its sockets; `status` agrees (its netns cookie leaves
/// `sockets_by_netns`, the sockhash count equals the sockets still live); another pod's
/// connections to the same server are unaffected and byte-exact.
#[test]
fn pod_deleted_with_live_accelerated_sockets_leaves_no_entries() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let b = mesh_pod(&mut mesh, "b");
    let c = mesh_pod(&mut mesh, "c");
    let accel = Accel::start(
        &mesh,
        true,
        &[Workload::on(&a), Workload::on(&b), Workload::on(&c)],
    )
    .expect("agent");
    let target = format!("{}:8080", b.ip);
    soak_server(&mut mesh, &b, &target);
    let slow = [
        "--connections",
        "50",
        "--rst-every",
        "0",
        "--slow-every",
        "1",
        "--stall-ms",
        "3000",
        "--slow-bytes",
        "4194304",
        "--max-msg",
        "65536",
    ];
    let doomed = soak(&mut mesh, &a, &target, &slow);
    let survivor = soak(&mut mesh, &c, &target, &slow);
    let cookie_a = a.netns_cookie().expect("cookie").to_string();
    wait_until("pod a's connections are in the sockhash", || {
        accel.status().unwrap()["sockets_by_netns"][&cookie_a]
            .as_u64()
            .is_some_and(|n| n >= 50)
    });
    mesh.remove_pod(&a).expect("remove pod a");
    let out = wait_output_timeout(doomed, Duration::from_secs(10)).expect("killed client reaped");
    assert!(!out.status.success());
    let r = soak_report(survivor, "pod c", Duration::from_secs(120));
    assert_eq!(r["slow_ok"], 50, "{r}");
    // Pod a's sockets are gone from the maps, pod b's ends of its connections closed too.
    wait_until("pod a's netns cookie leaves the maps", || {
        let s = accel.status().unwrap();
        s["sockets_by_netns"].get(&cookie_a).is_none()
    });
    let cookie_c = c.netns_cookie().unwrap().to_string();
    wait_until("pod c's sockets leave the maps", || {
        accel.status().unwrap()["sockets_by_netns"]
            .get(&cookie_c)
            .is_none()
    });
    // What PEERS still lists of pod b are sockets the kernel still has: b's ends of connections
    // to the deleted pod. The FIN/RST of a's sockets may die with a's veth; a TCP socket whose
    // peer vanished stays ESTABLISHED until the application or a keepalive ends it (as without
    // meshaccel). Status must agree with the kernel: no entry for a socket the kernel freed.
    let cookie_b = b.netns_cookie().unwrap().to_string();
    let out = b.netns_exec("ss", &["-Htan"]).expect("ss");
    let kernel: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"))
        .map(str::to_string)
        .collect();
    let s = accel.status().unwrap();
    let in_peers = s["sockets_by_netns"][&cookie_b].as_u64().unwrap_or(0);
    eprintln!("pod b after a's deletion: PEERS {in_peers}, kernel sockets {kernel:?}");
    assert!(
        in_peers as usize <= kernel.len(),
        "PEERS lists sockets the kernel no longer has: {in_peers} > {kernel:?}"
    );
    let others: Vec<_> = s["sockets_by_netns"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| **k != cookie_b)
        .collect();
    assert!(others.is_empty(), "{s}");
    // (The sockhash may hold more than PEERS here: a socket reset by its vanished peer reaches
    // TCP_CLOSE, which removes its PEERS entry, while its fd is still open in the relay; it
    // leaves the sockhash at close().)
}

/// One accelerated connection whose reader stalls for 3 s while its sender pushes 256 MiB in
/// 1 MiB writes, through the three legs. The kernel bounds no sk_msg ingress queue (with
/// `--max-unread-bytes 0` the sender gets all 256 MiB into the reader's socket during the stall:
/// kernel memory, not backpressure); the agent's limit holds the sender on TCP once the reader
/// has 4 MiB unread, TCP's flow control then blocks it, and when the reader has caught up the
/// connection redirects again. Every byte exact both ways.
#[test]
fn stalled_reader_holds_its_sender_back_and_the_connection_resumes() {
    require_root();
    const SLOW: u64 = 256 << 20;
    let run = |limit: Option<&str>| -> (Value, Value, Value) {
        let env: Vec<(&str, &str)> = limit
            .map(|l| ("MESHACCEL_MAX_UNREAD_BYTES", l))
            .into_iter()
            .collect();
        let (mut mesh, a, _b, accel, target) = soak_pods(&env);
        let c0 = counters(&accel);
        let client = soak(
            &mut mesh,
            &a,
            &target,
            &[
                "--connections",
                "1",
                "--rst-every",
                "0",
                "--slow-every",
                "1",
                "--stall-ms",
                "3000",
                "--slow-bytes",
                &SLOW.to_string(),
                "--max-msg",
                "1048576",
            ],
        );
        let r = soak_report(client, "stalled reader", Duration::from_secs(120));
        (r, c0, counters(&accel))
    };

    let (r, c0, c1) = run(None);
    let early = r["slow_max_early_bytes"].as_u64().unwrap();
    eprintln!(
        "limit 4 MiB: {early} B pushed in the first half of the stall; holds {}, resumed {}, redirected {} B",
        delta(&c1, &c0, "hold_queue"),
        delta(&c1, &c0, "resumed"),
        delta(&c1, &c0, "redirect_bytes")
    );
    assert_eq!(r["slow_ok"], 1, "{r}");
    // Three legs, each 4 MiB unread at most, plus the relays' and TCP's buffers.
    assert!(early < 64 << 20, "the sender was not held back: {early} B");
    assert!(delta(&c1, &c0, "hold_queue") >= 1, "{c1}");
    assert!(delta(&c1, &c0, "resumed") >= 1, "{c1}");
    // After the stall the connection redirects again: most of the 256 MiB crossed each leg
    // redirected.
    assert!(
        delta(&c1, &c0, "redirect_bytes") >= 2 * SLOW,
        "the connection did not resume redirecting: {c1}"
    );

    // The kernel on its own: no limit, no backpressure.
    let (r, _, _) = run(Some("0"));
    let unbounded = r["slow_max_early_bytes"].as_u64().unwrap();
    eprintln!("no limit: {unbounded} B pushed in the first half of the stall");
    assert!(
        unbounded > 4 * early,
        "without the limit the kernel held the sender back too ({unbounded} B vs {early} B): the limit proves nothing here"
    );
}

/// A RST the kernel drops (hazard 6: `tcp_add_backlog` at a busy socket with redirected bytes
/// queued) is never resent. Here the drop is made deterministic with an iptables rule in the
/// client pod that eats the app's RST to the sidecar (the rule goes as soon as it has dropped
/// one). With the agent's keepalive on accelerated sockets (2 s here) the sidecar's socket probes,
/// the app's stack answers with a fresh RST and the connection ends; with `--keepalive-secs 0`
/// it would stay established for as long as the sidecar waits.
#[test]
fn a_lost_rst_still_ends_the_connection() {
    require_root();
    let run = |keepalive: &str| -> (bool, u64) {
        let (mut mesh, a, _b, accel, target) =
            soak_pods(&[("MESHACCEL_KEEPALIVE_SECS", keepalive)]);
        let rule = [
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "--dport",
            "15001",
            "--tcp-flags",
            "RST",
            "RST",
            "-j",
            "DROP",
        ];
        let ipt = |op: &str| {
            let out = a
                .netns_exec("iptables", &[&["-w", op], &rule[..]].concat())
                .expect("iptables");
            assert!(out.status.success(), "iptables {op}: {out:?}");
        };
        ipt("-I");
        let c0 = counters(&accel);
        let client = soak(
            &mut mesh,
            &a,
            &target,
            &[
                "--connections",
                "1",
                "--rst-every",
                "1",
                "--slow-every",
                "0",
                "--max-msg",
                "1024",
            ],
        );
        // Remove the rule once it has eaten the app's RST.
        let dropped = || {
            let out = a
                .netns_exec("iptables", &["-w", "-L", "OUTPUT", "-v", "-n", "-x"])
                .expect("iptables -L");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains("DROP") && l.contains("15001"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped() == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let lost = dropped();
        ipt("-D");
        let r = soak_report(client, "aborted client", Duration::from_secs(30));
        assert_eq!(r["resets"], 1, "{r}");
        assert!(delta(&counters(&accel), &c0, "inserted") >= 6);
        // Does the sidecar's end of the reset connection end?
        let deadline = Instant::now() + Duration::from_secs(8);
        let ended = loop {
            let estab = a.tcp_counters().expect("snmp").curr_estab;
            if estab == 0 {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            thread::sleep(Duration::from_millis(100));
        };
        (ended, lost)
    };
    let (ended, lost) = run("2");
    assert_eq!(lost, 1, "the rule dropped the app's RST");
    assert!(
        ended,
        "with keepalive the connection whose RST was lost did not end"
    );
    let (ended, lost) = run("0");
    assert_eq!(lost, 1, "the rule dropped the app's RST");
    assert!(
        !ended,
        "without keepalive the connection ended anyway: this test does not show a lost RST"
    );
}
