//! Operating meshaccel: `/metrics`, `/healthz`, `/readyz` scraped during real traffic through
//! Istio's capture rules, `status` per workload, JSON logs, and `doctor` (OK on this machine; the
//! problems it must name: no bpffs, a foreign sk_msg program, a foreign exclusive sock_ops
//! program on the cgroup, Istio capture present or missing in a pod netns). Root, real kernel.
mod support;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use meshaccel_e2e::{Mesh, bpf, require_root, wait_output_timeout, workspace_bin};
use serde_json::Value;
use support::*;

const MIB: u64 = 1024 * 1024;

fn meshaccel() -> PathBuf {
    workspace_bin("meshaccel")
}

/// `GET path` over HTTP/1.1: (status, content type, body).
fn get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: meshaccel\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// Scrapes and parses the Prometheus text format (prometheus-parse); samples by
/// `name{label=value,...}`.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, ctype, body) = get(addr, "/metrics", "text/plain");
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("the text format does not parse: {e}\n{body}"));
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = if labels.is_empty() {
            s.metric.clone()
        } else {
            format!("{}{{{}}}", s.metric, labels.join(","))
        };
        out.insert(key, v);
    }
    // Every sample's family has a TYPE line before it (the parser is lenient about that).
    let mut typed = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                typed.iter().any(|t| name == t
                    || name
                        .strip_prefix(t.as_str())
                        .is_some_and(|s| { ["_total", "_sum", "_count", "_bucket"].contains(&s) })),
                "sample {line:?} before its TYPE"
            );
        }
    }
    out
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// A strict check of OpenMetrics text: HELP/TYPE before samples, `# EOF` last, counters end in
/// `_total`.
fn check_openmetrics(body: &str) {
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for l in &lines[..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            types.insert(it.next().unwrap().into(), it.next().unwrap().into());
        } else if l.starts_with("# HELP ") || l.starts_with("# UNIT ") {
        } else {
            let name = l.split(['{', ' ']).next().unwrap();
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {l:?}");
            let family = types
                .iter()
                .filter(|(f, _)| name.starts_with(f.as_str()))
                .max_by_key(|(f, _)| f.len())
                .unwrap_or_else(|| panic!("sample {l:?} without TYPE"));
            if family.1 == "counter" {
                assert!(
                    name.ends_with("_total") || name.ends_with("_created"),
                    "counter sample {l:?}"
                );
            }
        }
    }
}

#[test]
fn metrics_readiness_and_status_during_traffic() {
    require_root();
    let (mut mesh, a, b, accel) = two_mesh_pods(&[]);
    let addr = accel.metrics_addr().expect("the agent serves metrics");

    assert_eq!(get(addr, "/healthz", "*/*").0, 200);
    let (st, _, body) = get(addr, "/readyz", "*/*");
    assert_eq!(st, 200, "ready once attached and synced: {body}");
    assert_eq!(get(addr, "/nope", "*/*").0, 404);

    let m0 = scrape(addr);
    assert_eq!(sample(&m0, "meshaccel_dataplane_installed"), 1.0);
    assert_eq!(sample(&m0, "meshaccel_acceleration_enabled"), 1.0);
    assert_eq!(sample(&m0, "meshaccel_accelerated_pods"), 2.0);
    let capacity = sample(&m0, "meshaccel_sockhash_capacity");
    assert_eq!(
        Some(capacity as u64),
        accel.status().unwrap()["sockhash_capacity"].as_u64(),
        "the pinned sockhash's size"
    );
    assert!(capacity >= 1024.0, "{capacity}");
    assert_eq!(
        sample(&m0, "meshaccel_source_synced{source=static_file}"),
        1.0
    );
    assert!(sample(&m0, "meshaccel_reconciles_total{result=ok}") >= 1.0);
    assert!(sample(&m0, "meshaccel_reconcile_duration_seconds_count") >= 1.0);
    for reason in ["no_peer", "disabled", "redirect_failed"] {
        sample(
            &m0,
            &format!("meshaccel_fallbacks_total{{reason={reason}}}"),
        );
    }
    let bytes0 = sample(&m0, "meshaccel_redirected_bytes_total");

    // A slow transfer through all three legs: 8 MiB in 64 KiB writes, 15 ms apart (~2 s).
    sink(&mut mesh, &b, &format!("{}:8080", b.ip));
    let total = 8 * MIB;
    let mut send: Child = mesh
        .spawn(
            &a,
            Some(APP_UID),
            &tool(),
            &[
                "send",
                "--connect",
                &format!("{}:8080", b.ip),
                "--bytes",
                &total.to_string(),
                "--hold-ms",
                "15",
            ],
        )
        .expect("send");
    let mut during = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while send.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the transfer did not finish");
        let m = scrape(addr);
        during.push((
            sample(&m, "meshaccel_redirected_bytes_total"),
            sample(&m, "meshaccel_sockhash_entries"),
        ));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = wait_output_timeout(send, Duration::from_secs(10)).expect("send report");
    let report: Value = serde_json::from_slice(&out.stdout).expect("send JSON");
    assert_eq!(report["ok"], true, "bytes arrived exactly: {report}");
    eprintln!("redirected bytes scraped during the transfer: {during:?}");
    let grew = during.windows(2).filter(|w| w[1].0 > w[0].0).count();
    assert!(
        grew >= 2,
        "redirect counters grow while traffic flows: {during:?}"
    );
    assert!(
        during.iter().any(|(_, socks)| *socks >= 6.0),
        "the three legs' six sockets are in the sockhash during the transfer: {during:?}"
    );
    let m1 = scrape(addr);
    let redirected = sample(&m1, "meshaccel_redirected_bytes_total") - bytes0;
    assert!(
        redirected >= (3 * total) as f64,
        "each leg carries the payload, redirected: {redirected}"
    );
    // Per workload: pod a sends on legs 1 and 2, pod b on leg 3 (and the answers).
    let a_bytes = sample(
        &m1,
        "meshaccel_workload_redirected_bytes_total{workload=e2e/a}",
    );
    let b_bytes = sample(
        &m1,
        "meshaccel_workload_redirected_bytes_total{workload=e2e/b}",
    );
    assert!(a_bytes >= (2 * total) as f64, "e2e/a: {a_bytes}");
    assert!(b_bytes >= total as f64, "e2e/b: {b_bytes}");

    // OpenMetrics on request.
    let (st, ctype, om) = get(
        addr,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    );
    assert_eq!(st, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    check_openmetrics(&om);

    // status: per workload, by name (from the agent's state file), sockets and bytes.
    let s = accel.status().expect("status");
    let rows: BTreeMap<String, &Value> = s["by_workload"]
        .as_array()
        .expect("by_workload")
        .iter()
        .filter_map(|r| Some((r["name"].as_str()?.to_string(), r)))
        .collect();
    assert!(
        rows["e2e/a"]["enabled"] == true && rows["e2e/b"]["enabled"] == true,
        "{s}"
    );
    assert!(
        rows["e2e/a"]["redirect_bytes"].as_u64().unwrap() >= 2 * total,
        "{s}"
    );
    assert!(
        rows["e2e/b"]["redirect_bytes"].as_u64().unwrap() >= total,
        "{s}"
    );
    assert_eq!(s["agent"]["metrics_addr"], addr.to_string());
    let text = Command::new(meshaccel())
        .args(["status", "--bpffs"])
        .arg(accel.bpffs())
        .arg("--state-dir")
        .arg(accel.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("e2e/a") && text.contains("e2e/b"), "{text}");

    // Not ready once the programs are gone (uninstalled under a running agent).
    accel.uninstall().expect("uninstall");
    let (st, _, body) = get(addr, "/readyz", "*/*");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("programs not attached"), "{body}");
    assert_eq!(get(addr, "/healthz", "*/*").0, 200);
    assert_eq!(sample(&scrape(addr), "meshaccel_dataplane_installed"), 0.0);
}

/// Runs `meshaccel doctor --output json` with `args`: (exit code, report).
fn doctor(args: &[&str]) -> (i32, Value) {
    let out = Command::new(meshaccel())
        .arg("doctor")
        .args(args)
        .args(["--output", "json"])
        .output()
        .expect("doctor");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

/// A bpffs mounted on a fresh folder; unmounted and removed on drop.
struct TempBpffs {
    dir: tempfile::TempDir,
}

impl TempBpffs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshaccel-doctor-bpffs-")
            .tempdir()
            .unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a bpffs");
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Another "accelerator": a sockhash with an sk_msg program of its own. Freed when dropped.
struct ForeignSkMsg {
    _map: OwnedFd,
    prog: OwnedFd,
}

impl ForeignSkMsg {
    fn new() -> Self {
        let map = bpf::create_sockhash(1).expect("creating a sockhash");
        let prog = bpf::prog_load_trivial(
            bpf::BPF_PROG_TYPE_SK_MSG,
            bpf::BPF_SK_MSG_VERDICT,
            "foreign_msg",
        )
        .expect("loading a trivial program");
        bpf::prog_attach(map.as_fd(), prog.as_fd(), bpf::BPF_SK_MSG_VERDICT)
            .expect("attaching sk_msg to the sockhash");
        Self { _map: map, prog }
    }
}

/// A sock_ops program attached exclusively (no BPF_F_ALLOW_MULTI) to a cgroup; detached on drop.
struct ForeignSockOps {
    cgroup: std::fs::File,
    prog: OwnedFd,
}

impl ForeignSockOps {
    fn new(cgroup: &Path) -> Self {
        let prog = bpf::prog_load_trivial(
            bpf::BPF_PROG_TYPE_SOCK_OPS,
            bpf::BPF_CGROUP_SOCK_OPS,
            "foreign_ops",
        )
        .expect("loading a trivial program");
        let cgroup = std::fs::File::open(cgroup).unwrap();
        bpf::prog_attach(cgroup.as_fd(), prog.as_fd(), bpf::BPF_CGROUP_SOCK_OPS)
            .expect("attaching sock_ops to the cgroup");
        Self { cgroup, prog }
    }
}

impl Drop for ForeignSockOps {
    fn drop(&mut self) {
        if let Err(e) = bpf::prog_detach(
            self.cgroup.as_fd(),
            self.prog.as_fd(),
            bpf::BPF_CGROUP_SOCK_OPS,
        ) {
            eprintln!("detaching the test's sock_ops program: {e}");
        }
    }
}

fn prog_id(fd: &OwnedFd) -> u32 {
    bpf::obj_id(fd.as_fd()).expect("prog info")
}

/// Polls doctor until `pred` holds on its report (the kernel frees programs asynchronously).
fn doctor_until(args: &[&str], what: &str, pred: impl Fn(i32, &Value) -> bool) -> (i32, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, r) = doctor(args);
        if pred(code, &r) {
            return (code, r);
        }
        assert!(Instant::now() < deadline, "{what}: last report {r:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn doctor_is_ok_here_and_names_what_breaks_acceleration() {
    require_root();
    let mut mesh = Mesh::new().expect("mesh");
    let istio = mesh_pod(&mut mesh, "istio");
    let plain = mesh.add_pod("plain", None).expect("pod without capture");
    let bpffs = TempBpffs::new();
    let pins = bpffs.path().join("meshaccel");
    let cgroup = mesh.cgroup_root().to_path_buf();
    let base = [
        "--bpffs",
        pins.to_str().unwrap(),
        "--cgroup",
        cgroup.to_str().unwrap(),
    ];

    // This machine: everything probed works.
    let (code, r) = doctor_until(&base, "doctor OK on this machine", |c, _| c == 0);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    for name in [
        "program types",
        "map types",
        "load",
        "attach",
        "bpffs",
        "cgroup v2",
        "other sk_msg",
        "other sock_ops",
        // Probed: this kernel (6.18) counts redirected bytes against the receiver.
        "queue bound",
    ] {
        assert_eq!(check(&r, name)["level"], "ok", "{name}: {r:#}");
    }
    assert!(
        check(&r, "queue bound")["detail"]
            .as_str()
            .unwrap()
            .contains("probed"),
        "{r:#}"
    );
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["level"] != "fail"),
        "{r:#}"
    );
    // The attach probe cleaned up its cgroup.
    let leftovers: Vec<_> = std::fs::read_dir(&cgroup)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("meshaccel-doctor-")
        })
        .collect();
    assert!(leftovers.is_empty(), "probe cgroups left: {leftovers:?}");

    // The bpffs unmounted (a plain folder): reported, with the fix; the agent could still mount one.
    let plain_dir = tempfile::tempdir().unwrap();
    let nobpffs = plain_dir.path().join("meshaccel");
    let (code, r) = doctor(&[
        "--bpffs",
        nobpffs.to_str().unwrap(),
        "--cgroup",
        cgroup.to_str().unwrap(),
    ]);
    let c = check(&r, "bpffs");
    assert_eq!(c["level"], "warn", "{r:#}");
    assert!(
        c["detail"].as_str().unwrap().contains("is not on a bpffs"),
        "{c}"
    );
    assert!(c["fix"].as_str().unwrap().contains("mount -t bpf"), "{c}");
    assert_eq!(
        code, 0,
        "a missing bpffs is a warning: the agent mounts one"
    );
    // Text output says it too.
    let text = Command::new(meshaccel())
        .args(["doctor", "--bpffs"])
        .arg(&nobpffs)
        .arg("--cgroup")
        .arg(&cgroup)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("[WARN] bpffs:") && text.contains("fix: mount"),
        "{text}"
    );

    // A foreign sockmap accelerator (an sk_msg program on a sockhash of its own): fail, exit 1.
    {
        let foreign = ForeignSkMsg::new();
        let id = prog_id(&foreign.prog);
        let (code, r) = doctor(&base);
        let c = check(&r, "other sk_msg");
        assert_eq!(c["level"], "fail", "{r:#}");
        assert!(
            c["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("id {id} `foreign_msg`")),
            "{c}"
        );
        assert_eq!((code, &r["ok"]), (1, &Value::Bool(false)));
    }
    doctor_until(&base, "the foreign sk_msg program freed", |c, r| {
        c == 0 && check(r, "other sk_msg")["level"] == "ok"
    });

    // A foreign sock_ops program attached exclusively to the cgroup: attaching would fail.
    let child = cgroup.join("foreign");
    std::fs::create_dir(&child).unwrap();
    {
        let _ops = ForeignSockOps::new(&child);
        let args = [
            "--bpffs",
            pins.to_str().unwrap(),
            "--cgroup",
            child.to_str().unwrap(),
        ];
        let (code, r) = doctor(&args);
        let c = check(&r, "other sock_ops");
        assert_eq!(c["level"], "fail", "{r:#}");
        assert!(c["detail"].as_str().unwrap().contains("foreign_ops"), "{c}");
        assert_eq!(
            check(&r, "attach")["level"],
            "fail",
            "the attach probe fails too: {r:#}"
        );
        assert_eq!(code, 1);
    }
    std::fs::remove_dir(&child).unwrap();

    // Istio's capture rules in a pod's netns: present (ports found), or missing.
    let istio_ns = istio.netns_path.to_str().unwrap().to_string();
    let plain_ns = plain.netns_path.to_str().unwrap().to_string();
    let (_, r) = doctor(&[&base[..], &["--netns", &istio_ns, "--netns", &plain_ns]].concat());
    let c = check(&r, &format!("istio capture {istio_ns}"));
    assert_eq!(c["level"], "ok", "{r:#}");
    let d = c["detail"].as_str().unwrap();
    assert!(
        d.contains("outbound → 15001")
            && d.contains("inbound → 15006")
            && d.contains("proxy uid 1337"),
        "{d}"
    );
    let c = check(&r, &format!("istio capture {plain_ns}"));
    assert_eq!(c["level"], "warn", "{r:#}");
    assert!(
        c["detail"].as_str().unwrap().contains("no ISTIO_* chains"),
        "{c}"
    );
}

#[test]
fn agent_logs_json_lines_when_asked() {
    require_root();
    let mesh = Mesh::new().expect("mesh");
    let dir = tempfile::Builder::new()
        .prefix("meshaccel-logs-")
        .tempdir_in("/run")
        .unwrap();
    let bpffs = dir.path().join("bpffs");
    struct Cleanup<'a>(&'a Path, &'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Command::new(meshaccel())
                .args(["uninstall", "--bpffs"])
                .arg(self.0)
                .arg("--state-dir")
                .arg(self.1)
                .output();
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _cleanup = Cleanup(&bpffs, dir.path());
    for (format, json) in [("json", true), ("text", false)] {
        let mut agent = Command::new(meshaccel())
            .args(["agent", "--cgroup"])
            .arg(mesh.cgroup_root())
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--log-format", format])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = agent.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !meshaccel::dataplane::Dataplane::is_installed(&bpffs) {
            assert!(Instant::now() < deadline, "the agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        // SIGTERM: the agent stops cleanly (acceleration stays pinned).
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        let st = agent.wait().unwrap();
        assert!(st.success(), "agent exit: {st}");
        let log = reader.join().unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{log}");
        for l in &lines {
            let parsed = serde_json::from_str::<Value>(l);
            if json {
                let v = parsed.unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
                assert!(
                    v["level"].is_string() && v["fields"]["message"].is_string(),
                    "{l}"
                );
                assert!(v["timestamp"].is_string(), "{l}");
            } else {
                assert!(parsed.is_err(), "text format printed JSON: {l}");
            }
        }
        assert!(
            log.contains("agent started")
                || log.contains("agent started".replace(' ', "_").as_str()),
            "{log}"
        );
    }
}

/// `--max-unread-bytes auto` is the node's `net.ipv4.tcp_rmem` maximum (the agent's network
/// namespace: here the host's), shown by `status`; an agent restarted with a number adopts the
/// pins and puts that number in the kernel's config.
#[test]
fn the_queue_limit_auto_is_the_nodes_tcp_rmem_maximum() {
    require_root();
    let mesh = Mesh::new().expect("mesh");
    let mut accel = meshaccel_e2e::accel::Accel::start_env(
        &mesh,
        true,
        meshaccel_e2e::accel::Scope::All,
        &[],
        &[("MESHACCEL_MAX_UNREAD_BYTES", "auto")],
    )
    .expect("agent");
    let rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").unwrap();
    let max: u64 = rmem.split_whitespace().nth(2).unwrap().parse().unwrap();
    let limit = |accel: &meshaccel_e2e::accel::Accel| {
        accel.status().unwrap()["queue_limit_bytes"]
            .as_u64()
            .expect("status has queue_limit_bytes")
    };
    assert_eq!(
        limit(&accel),
        max.min(u64::from(u32::MAX)),
        "tcp_rmem {rmem:?}"
    );
    accel.kill_agent();
    accel.set_agent_env("MESHACCEL_MAX_UNREAD_BYTES", "1048576");
    accel.start_agent().expect("agent restarted");
    wait_until("the restarted agent's limit in the kernel's config", || {
        limit(&accel) == 1 << 20
    });
}
