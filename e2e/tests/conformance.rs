//! Application conformance: ordinary apps (C, CPython, OpenJDK, Go, HAProxy with splicing, nginx)
//! run through the two-pod mesh (real Envoy sidecars, Istio's capture rules, the agent with its
//! defaults: `appSockets: auto`), each once with acceleration off and once on, with their own
//! normal code (e2e/conformance/). With acceleration on, every app must see exactly what it saw
//! on plain TCP: both sides correct, the same outcome, the same byte counts, within the time
//! bound (a hang is a failure). Event-loop apps must stay accelerated. The report lists, per
//! case, whether it was correct and what meshaccel did with its sockets.
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use meshaccel_e2e::{
    APP_UID, Pod,
    accel::{Accel, Workload},
    require_root,
    sidecar::{PodSpec, SidecarMesh},
    wait_output_timeout, wait_ready,
};
use serde_json::Value;

/// The apps' sources, and where they are built for this run (readable by the apps' UID).
struct Apps {
    src: PathBuf,
    out: tempfile::TempDir,
}

impl Apps {
    fn build() -> Apps {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance");
        for tool in ["gcc", "go", "javac", "java", "haproxy", "nginx", "python3"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is missing: the conformance apps need it (run scripts/install-apps.sh, which scripts/test.sh runs)"
            );
        }
        let out = tempfile::Builder::new()
            .prefix("meshaccel-conform-")
            .tempdir()
            .expect("tempdir");
        chmod(out.path(), 0o755);
        for script in ["build-c.sh", "build-apps.sh"] {
            let st = Command::new(src.join(script))
                .arg(out.path())
                .status()
                .unwrap_or_else(|e| panic!("running {script}: {e}"));
            assert!(st.success(), "{script} failed: {st}");
        }
        Apps { src, out }
    }

    /// Program and arguments of one runtime's app.
    fn cmd(&self, rt: Rt, args: &[String]) -> (PathBuf, Vec<String>) {
        let out = self.out.path();
        let (prog, mut pre): (PathBuf, Vec<String>) = match rt {
            Rt::C => (out.join("conform-c"), vec![]),
            Rt::Go => (out.join("conform-go"), vec![]),
            Rt::Py => (
                "/usr/bin/python3".into(),
                vec![self.src.join("python/conform.py").display().to_string()],
            ),
            Rt::Java => (
                "/usr/bin/java".into(),
                vec![
                    "-cp".into(),
                    out.join("java").display().to_string(),
                    "Conform".into(),
                ],
            ),
        };
        pre.extend_from_slice(args);
        (prog, pre)
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[derive(Clone, Copy, Debug)]
enum Rt {
    C,
    Py,
    Java,
    Go,
}

/// Where the app's traffic goes.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The mode's client in the client pod, its server in the server pod.
    Direct(Rt, &'static str),
    /// A TCP proxy app next to the client (the client connects to it over loopback, it connects
    /// through the mesh) or next to the server (Envoy's inbound leg reaches the proxy, which
    /// connects to the server over loopback); Go's echo client and server at the ends.
    Proxy(ProxyKind, Side),
    /// nginx as the server, Go's keep-alive HTTP client fetching a file.
    Nginx,
}

#[derive(Clone, Copy, Debug)]
enum ProxyKind {
    /// Go's `io.Copy` between two `*net.TCPConn` (it splices).
    GoCopy,
    /// HAProxy in TCP mode with `option splice-request/splice-response`.
    Haproxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

struct Case {
    name: &'static str,
    shape: Shape,
    conns: u32,
    /// Event-loop apps: their sockets must stay accelerated (adopted after their first write,
    /// never sent back to TCP as blocking) and bytes must be redirected.
    event_loop: bool,
}

const fn case(name: &'static str, shape: Shape, conns: u32, event_loop: bool) -> Case {
    Case {
        name,
        shape,
        conns,
        event_loop,
    }
}

fn cases() -> Vec<Case> {
    use Rt::*;
    use Shape::*;
    vec![
        case("c threads", Direct(C, "threads"), 3, false),
        case("c signal-restart", Direct(C, "signal-restart"), 2, false),
        case("c signal-eintr", Direct(C, "signal-eintr"), 2, false),
        case("c waitall", Direct(C, "waitall"), 2, false),
        case("c rcvlowat", Direct(C, "rcvlowat"), 2, false),
        case("c peek", Direct(C, "peek"), 2, false),
        case("c rcvtimeo", Direct(C, "rcvtimeo"), 2, false),
        case("c fionread", Direct(C, "fionread"), 2, false),
        case("c halfclose", Direct(C, "halfclose"), 3, false),
        case("c rst", Direct(C, "rst"), 2, false),
        case("c splice", Direct(C, "splice"), 2, false),
        case("c splice-et", Direct(C, "splice-et"), 2, false),
        case("c splice-client", Direct(C, "splice-client"), 2, false),
        case("c connect-timeout", Direct(C, "connect-timeout"), 3, false),
        case("c tfo", Direct(C, "tfo"), 2, false),
        case("c tfo-nb", Direct(C, "tfo-nb"), 2, false),
        case("python threads", Direct(Py, "py-threads"), 3, false),
        case("python halfclose", Direct(Py, "py-halfclose"), 3, false),
        case(
            "python timeout-then-blocking",
            Direct(Py, "py-timeout-then-blocking"),
            3,
            false,
        ),
        case("python asyncio", Direct(Py, "py-asyncio"), 3, true),
        case("java threads", Direct(Java, "java-threads"), 3, false),
        case("java halfclose", Direct(Java, "java-halfclose"), 3, false),
        case("go http", Direct(Go, "go-http"), 3, true),
        case("go stream", Direct(Go, "go-stream"), 3, true),
        case(
            "go io.Copy proxy at the client",
            Proxy(ProxyKind::GoCopy, Side::Client),
            3,
            true,
        ),
        case(
            "go io.Copy proxy at the server",
            Proxy(ProxyKind::GoCopy, Side::Server),
            3,
            true,
        ),
        case(
            "haproxy splice at the client",
            Proxy(ProxyKind::Haproxy, Side::Client),
            3,
            false,
        ),
        case(
            "haproxy splice at the server",
            Proxy(ProxyKind::Haproxy, Side::Server),
            3,
            true,
        ),
        case("nginx + go client", Nginx, 3, true),
    ]
}

/// One run of a case: both apps' final JSON lines (a proxy or nginx prints none).
struct Run {
    client: Value,
    server: Value,
    /// Agent counters moved during the run.
    counters: BTreeMap<&'static str, u64>,
    /// Bytes the pods' sockets redirected during the run (client pod, server pod).
    redirected: (u64, u64),
}

const COUNTERS: [&str; 11] = [
    "inserted",
    "redirect_bytes",
    "skip_app_blocking",
    "skip_app_unaccepted",
    "fallback_app_receiver",
    "fallback_app_blocking",
    "left",
    "deferred_app",
    "adopted_app",
    "skip_app_no_epoll",
    "skip_no_local_peer",
];

fn workload_redirected(status: &Value, pod: &Pod) -> u64 {
    let cookie = pod.netns_cookie().expect("netns cookie");
    status["by_workload"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["netns_cookie"].as_u64() == Some(cookie))
        .and_then(|r| r["redirect_bytes"].as_u64())
        .unwrap_or(0)
}

struct Bench<'a> {
    m: &'a mut SidecarMesh,
    apps: &'a Apps,
    client: Pod,
    server: Pod,
    /// A folder the helper servers (HAProxy, nginx) may write.
    scratch: tempfile::TempDir,
}

impl Bench<'_> {
    fn spawn(&mut self, pod: &Pod, rt_or_prog: (PathBuf, Vec<String>)) -> Child {
        let (prog, args) = rt_or_prog;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.m
            .mesh
            .spawn(pod, Some(APP_UID), &prog, &args)
            .unwrap_or_else(|e| panic!("spawning {}: {e:#}", prog.display()))
    }

    /// Starts a server-like process and waits for its `ready` line.
    fn serve(&mut self, pod: &Pod, cmd: (PathBuf, Vec<String>)) -> Child {
        let mut c = self.spawn(pod, cmd);
        wait_ready(&mut c).expect("server ready");
        c
    }

    /// HAProxy or nginx from a template, as the apps' UID; returns once it listens.
    fn daemon(&mut self, pod: &Pod, kind: &str, vars: &[(&str, String)], port: u16) -> Child {
        let dir = self.scratch.path().join(format!("{kind}-{port}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let _ = std::os::unix::fs::chown(&dir, Some(APP_UID), Some(APP_UID));
        let tmpl = std::fs::read_to_string(self.apps.src.join(match kind {
            "haproxy" => "haproxy/haproxy.cfg.tmpl",
            _ => "nginx/nginx.conf.tmpl",
        }))
        .expect("template");
        let mut text = tmpl.replace("{{DIR}}", &dir.display().to_string());
        for (k, v) in vars {
            text = text.replace(&format!("{{{{{k}}}}}"), v);
        }
        let conf = dir.join(format!("{kind}.conf"));
        std::fs::write(&conf, text).expect("config");
        let (prog, args): (PathBuf, Vec<String>) = if kind == "haproxy" {
            (
                "/usr/sbin/haproxy".into(),
                vec!["-f".into(), conf.display().to_string(), "-db".into()],
            )
        } else {
            // The file nginx serves: byte i = (i*31 + 7) % 251 (the Go client's pattern).
            let data: Vec<u8> = (0..NGINX_FILE)
                .map(|i| ((i * 31 + 7) % 251) as u8)
                .collect();
            std::fs::write(dir.join("data.bin"), data).expect("data.bin");
            let _ = std::os::unix::fs::chown(dir.join("data.bin"), Some(APP_UID), Some(APP_UID));
            (
                "/usr/sbin/nginx".into(),
                vec![
                    "-p".into(),
                    format!("{}/", dir.display()),
                    "-c".into(),
                    conf.display().to_string(),
                    "-e".into(),
                    dir.join("error.log").display().to_string(),
                ],
            )
        };
        let child = self.spawn(pod, (prog, args));
        // They print no `ready`: wait until the port listens in the pod.
        let want = format!(":{port} ");
        support::wait_until(&format!("{kind} listening on {port}"), || {
            pod.netns_exec("ss", &["-Htln"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&want))
        });
        child
    }

    fn run(&mut self, accel: &Accel, c: &Case, port: u16) -> Run {
        let before = accel.status().expect("status");
        let n = c.conns.to_string();
        let sip = self.server.ip.to_string();
        let target = format!("{sip}:{port}");
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (client_pod, server_pod) = (self.client.clone(), self.server.clone());
        let mut extra: Vec<Child> = Vec::new();
        let (server, client) = match c.shape {
            Shape::Direct(rt, mode) => {
                let p = port.to_string();
                let s = self.serve(
                    &server_pod,
                    self.apps
                        .cmd(rt, &args(&["server", mode, "--port", &p, "--conns", &n])),
                );
                let cl = self.spawn(
                    &client_pod,
                    self.apps.cmd(
                        rt,
                        &args(&["client", mode, "--target", &target, "--conns", &n]),
                    ),
                );
                (Some(s), cl)
            }
            Shape::Proxy(kind, side) => {
                let local = port + 1000;
                let (backend_pod, backend_port, proxy_pod, listen, upstream) = match side {
                    // The client talks to the proxy over loopback; the proxy goes through the
                    // mesh to the echo server.
                    Side::Client => (
                        server_pod.clone(),
                        port,
                        client_pod.clone(),
                        ("127.0.0.1", local),
                        target.clone(),
                    ),
                    // Envoy's inbound leg reaches the proxy; the proxy reaches the echo server
                    // over loopback in the server pod.
                    Side::Server => (
                        server_pod.clone(),
                        local,
                        server_pod.clone(),
                        ("0.0.0.0", port),
                        format!("127.0.0.1:{local}"),
                    ),
                };
                let bp = backend_port.to_string();
                let s = self.serve(
                    &backend_pod,
                    self.apps.cmd(
                        Rt::Go,
                        &args(&["server", "echo", "--port", &bp, "--conns", &n]),
                    ),
                );
                match kind {
                    ProxyKind::GoCopy => {
                        let l = format!("{}:{}", listen.0, listen.1);
                        let p = self.serve(
                            &proxy_pod,
                            self.apps.cmd(
                                Rt::Go,
                                &args(&[
                                    "proxy",
                                    "--listen",
                                    &l,
                                    "--upstream",
                                    &upstream,
                                    "--conns",
                                    &n,
                                ]),
                            ),
                        );
                        extra.push(p);
                    }
                    ProxyKind::Haproxy => {
                        let d = self.daemon(
                            &proxy_pod,
                            "haproxy",
                            &[
                                ("BIND", listen.0.to_string()),
                                ("LISTEN_PORT", listen.1.to_string()),
                                ("BACKEND", upstream.clone()),
                            ],
                            listen.1,
                        );
                        extra.push(d);
                    }
                }
                let to = match side {
                    Side::Client => format!("127.0.0.1:{local}"),
                    Side::Server => target.clone(),
                };
                let cl = self.spawn(
                    &client_pod,
                    self.apps.cmd(
                        Rt::Go,
                        &args(&["client", "echo", "--target", &to, "--conns", &n]),
                    ),
                );
                (Some(s), cl)
            }
            Shape::Nginx => {
                let d = self.daemon(
                    &server_pod,
                    "nginx",
                    &[("LISTEN_PORT", port.to_string())],
                    port,
                );
                extra.push(d);
                let size = NGINX_FILE.to_string();
                let cl = self.spawn(
                    &client_pod,
                    self.apps.cmd(
                        Rt::Go,
                        &args(&[
                            "client",
                            "go-fetch",
                            "--target",
                            &target,
                            "--conns",
                            &n,
                            "--path",
                            "/data.bin",
                            "--size",
                            &size,
                        ]),
                    ),
                );
                // nginx prints no report: the client's checks are the verdict.
                (None, cl)
            }
        };
        let client = report(client, "client");
        let server = match server {
            Some(s) => report(s, "server"),
            None => serde_json::json!({"ok": true, "outcome": "-", "bytes_in": 0, "bytes_out": 0}),
        };
        for mut e in extra {
            // A proxy that already reported (Go's, after its N connections) has exited; the
            // daemons are stopped here.
            let _ = e.kill();
            let out = wait_output_timeout(e, Duration::from_secs(10)).expect("helper exit");
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(last) = text.lines().rev().find(|l| l.trim_start().starts_with('{'))
                && let Ok(v) = serde_json::from_str::<Value>(last)
            {
                assert!(
                    v["ok"] == true,
                    "{}: the proxy app reported a failure: {v}",
                    c.name
                );
            }
        }
        let after = accel.status().expect("status");
        let counters = COUNTERS
            .iter()
            .map(|&k| {
                (
                    k,
                    after["counters"][k].as_u64().unwrap_or(0)
                        - before["counters"][k].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let redirected = (
            workload_redirected(&after, &self.client) - workload_redirected(&before, &self.client),
            workload_redirected(&after, &self.server) - workload_redirected(&before, &self.server),
        );
        Run {
            client,
            server,
            counters,
            redirected,
        }
    }
}

const NGINX_FILE: usize = 16 << 10;

/// The app's final JSON line, within the time bound (a hang is a failure, reported as such).
fn report(child: Child, side: &str) -> Value {
    match wait_output_timeout(child, Duration::from_secs(60)) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines()
                .rev()
                .find(|l| l.trim_start().starts_with('{'))
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| {
                    serde_json::json!({"ok": false, "outcome": "no-report",
                        "errors": [format!("{side} printed no JSON line ({}): {text}", out.status)]})
                })
        }
        Err(e) => {
            serde_json::json!({"ok": false, "outcome": "hung", "errors": [format!("{side}: {e:#}")]})
        }
    }
}

fn verdict(v: &Value) -> (bool, String, u64, u64) {
    (
        v["ok"] == true,
        v["outcome"].as_str().unwrap_or("?").to_string(),
        v["bytes_in"].as_u64().unwrap_or(0),
        v["bytes_out"].as_u64().unwrap_or(0),
    )
}

#[test]
fn ordinary_apps_see_plain_tcp_with_acceleration_on() {
    require_root();
    let apps = Apps::build();
    let all = cases();
    let ports: Vec<u16> = (0..all.len() as u16).map(|i| 9100 + i).collect();
    let mut m = SidecarMesh::start(&[
        PodSpec::mesh("client", &[]),
        PodSpec::mesh("server", &ports),
    ])
    .expect("mesh");
    let (client, server) = (m.pod("client").clone(), m.pod("server").clone());
    // MESHACCEL_CONFORMANCE_APP_SOCKETS=trusted runs the suite as if the apps were declared
    // trusted (app sockets accelerated like the sidecar's, as before the default was `auto`):
    // that is how the suite shows what ordinary apps would see without the default's care.
    let trusted = std::env::var("MESHACCEL_CONFORMANCE_APP_SOCKETS").is_ok_and(|v| v == "trusted");
    let wl = if trusted {
        [Workload::on(&client), Workload::on(&server)]
    } else {
        [Workload::auto(&client), Workload::auto(&server)]
    };
    let mut accel = Accel::start(&m.mesh, false, &wl).expect("agent");
    let scratch = tempfile::Builder::new()
        .prefix("meshaccel-conform-run-")
        .tempdir()
        .expect("tempdir");
    chmod(scratch.path(), 0o755);
    let mut bench = Bench {
        m: &mut m,
        apps: &apps,
        client,
        server,
        scratch,
    };
    let filter = std::env::var("MESHACCEL_CONFORMANCE_CASES").unwrap_or_default();
    let mut table = String::from(
        "| case | off | on | correct | redirected bytes (client pod, server pod) | app sockets: skipped blocking / unaccepted, kept out as receivers, left | app sockets deferred / adopted / no epoll / blocking at first write |\n|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (c, &port) in all.iter().zip(&ports) {
        if !filter.is_empty() && !filter.split(',').any(|f| c.name.contains(f)) {
            continue;
        }
        accel.set_workloads(false, &wl).expect("off");
        let mut off = bench.run(&accel, c, port);
        // The reference is plain TCP through real Envoy, with meshaccel off: when it fails, the
        // app and Envoy did so on their own (seen once in ~10 suite runs: py-threads, a premature
        // EOF at the server). It is run again once, and said so; the accelerated run never is.
        if !(verdict(&off.client).0 && verdict(&off.server).0) {
            eprintln!(
                "conformance: {}: the reference run (acceleration off) failed on its own, running it again: client {} server {}",
                c.name, off.client, off.server
            );
            off = bench.run(&accel, c, port);
        }
        accel.set_workloads(true, &wl).expect("on");
        let on = bench.run(&accel, c, port);
        let (vo, vn) = (
            (verdict(&off.client), verdict(&off.server)),
            (verdict(&on.client), verdict(&on.server)),
        );
        let mut why = Vec::new();
        if !(vo.0.0 && vo.1.0) {
            why.push(format!(
                "the app failed even with acceleration off (a broken test app): client {} server {}",
                off.client, off.server
            ));
        }
        if !(vn.0.0 && vn.1.0) {
            why.push(format!(
                "with acceleration on: client {} server {}",
                on.client, on.server
            ));
        }
        if vo != vn {
            why.push(format!("off and on differ: off {vo:?}, on {vn:?}"));
        }
        let k = &on.counters;
        if c.event_loop
            && (k["skip_app_blocking"] != 0
                || k["fallback_app_blocking"] != 0
                || k["adopted_app"] == 0
                || on.redirected.0 == 0)
        {
            why.push(format!(
                "an event-loop app must stay accelerated: counters {k:?}, redirected {:?}",
                on.redirected
            ));
        }
        // App sockets that all went TCP before they ever redirected (decided at their first
        // write) leave their sidecars' sockets nothing to receive: those leave the sockhash (or
        // never enter it) before their own first message, instead of staying in on TCP.
        let decided_tcp = k["skip_app_no_epoll"] + k["fallback_app_blocking"];
        if k["deferred_app"] > 0
            && k["adopted_app"] == 0
            && (k["fallback_app_receiver"] != 0
                || k["left"] + k["skip_no_local_peer"] < decided_tcp)
        {
            why.push(format!(
                "the sidecar's sockets of apps kept on TCP must leave the sockhash: counters {k:?}"
            ));
        }
        let correct = if why.is_empty() { "yes" } else { "NO" };
        let ok = why.is_empty();
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} / {} | {} / {}, {}, {} | {} / {} / {} / {} |",
            c.name,
            vo.0.1,
            vn.0.1,
            correct,
            on.redirected.0,
            on.redirected.1,
            k["skip_app_blocking"],
            k["skip_app_unaccepted"],
            k["fallback_app_receiver"],
            k["left"],
            k["deferred_app"],
            k["adopted_app"],
            k["skip_app_no_epoll"],
            k["fallback_app_blocking"],
        );
        eprintln!(
            "conformance: {}: {}",
            c.name,
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failures.push(format!("{}: {}", c.name, why.join("; ")));
        }
    }
    eprintln!("\n{table}");
    assert!(
        failures.is_empty(),
        "apps that saw a difference:\n{}",
        failures.join("\n")
    );
}
