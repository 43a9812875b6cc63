//! `scale`: how meshaccel holds up as the node's accelerated connections grow. One agent (with
//! `--sockhash-capacity`), one pod with Istio's capture rules: the app (UID 1000, the e2e tool's
//! `scale-client`) connects to a mesh address, `ISTIO_OUTPUT` redirects it to port 15001, where
//! the sidecar stand-in (UID 1337, `scale-server`, one epoll loop) holds every connection and
//! echoes. Both sockets of each connection are in the sockhash, so N connections are 2N
//! accelerated sockets.
//!
//! The client grows the held, idle connections to each size (default 100, 1k, 10k, 100k; each
//! has done one round trip, so both its sockets redirect for life), the bench checks with
//! `meshaccel status` that the sockhash holds them, then measures at that size:
//! - the redirect latency of one active pair: ping-pong of small messages (p50/p99);
//! - connect-to-first-redirected-byte of new connections: from just before `connect()` to the
//!   client's first byte back (it writes 1 byte, the server echoes it), p50/p99 over
//!   `--connects` connections made one after the other;
//! - the agent's RSS (VmRSS, VmHWM), the maps' kernel memory (`status`'s `map_memory`, fdinfo
//!   memlock), socket kernel memory (the TCP and sock_inode_cache slabs, /proc/net/sockstat's
//!   TCP `mem` pages), the growth of the machine's slab, and how long `status` and a /metrics
//!   scrape take.
//!
//! Prints a table with ratios to the smallest size, writes `scale.json` and `scale.png`. Raises
//! RLIMIT_NOFILE for itself and its children, `net.core.somaxconn` inside the pod, and
//! `nf_conntrack_max` when it is too small for the largest size (restored at the end). The
//! targets (issue 18): both latencies within 1.1× of the smallest size's at every size; agent
//! RSS ≤ 64 MB at 100k connections. `--check` exits 1 only when the held sockets are not in the
//! sockhash (acceleration did not engage): latency on a shared machine is no CI verdict.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{ChildStdin, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use meshaccel_benches::{
    driver::{self, Cpus},
    plot::{self, SizeSeries},
    report_tail,
};
use meshaccel_e2e::{
    APP_UID, Mesh, PROXY_UID,
    accel::{Accel, Scope},
    require_root, workspace_bin,
};
use serde_json::{Value, json};

/// Latency and memory as the node's accelerated connections grow.
#[derive(Parser, Debug)]
struct Args {
    /// Held connections at each step (two accelerated sockets each), ascending.
    #[arg(long, env = "MESHACCEL_SCALE_SIZES", value_delimiter = ',', default_values_t = [100usize, 1_000, 10_000, 100_000])]
    sizes: Vec<usize>,
    /// The agent's --sockhash-capacity (sockets); default: the smallest power of two that holds
    /// twice the largest size and 1,000 more.
    #[arg(long, env = "MESHACCEL_SCALE_CAPACITY")]
    capacity: Option<u32>,
    /// Round trips of the active pair at each size (after a warm-up of a tenth of that).
    #[arg(long, env = "MESHACCEL_SCALE_RR", default_value_t = 20_000)]
    rr: usize,
    /// Message size of the round trips.
    #[arg(long, env = "MESHACCEL_SCALE_RR_SIZE", default_value_t = 64)]
    rr_size: usize,
    /// New connections timed at each size.
    #[arg(long, env = "MESHACCEL_SCALE_CONNECTS", default_value_t = 200)]
    connects: usize,
    /// Measurement rounds at each size (rr, then connects, per round); the table shows the
    /// median over rounds.
    #[arg(long, env = "MESHACCEL_SCALE_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Held connections per local address of the client (the ephemeral range per local address
    /// and destination is ~28k).
    #[arg(long, env = "MESHACCEL_SCALE_PER_SOURCE", default_value_t = 25_000)]
    per_source: usize,
    /// Pin client and server to CPU 0 (`same`, as `hop` does) or not (`none`).
    #[arg(long, env = "MESHACCEL_SCALE_PIN", default_value = "same", value_parser = ["same", "none"])]
    pin: String,
    #[command(flatten)]
    common: driver::CommonArgs,
}

/// The targets.
const FLAT: f64 = 1.1;
const RSS_TARGET_MB: f64 = 64.0;

fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (VmRSS, VmHWM) of `pid` in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        kib_field(&s, "VmRSS:") * 1024,
        kib_field(&s, "VmHWM:") * 1024,
    )
}

/// Bytes of the slab caches named (num_objs × objsize, /proc/slabinfo).
fn slab_bytes(names: &[&str]) -> u64 {
    let s = fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && names.contains(&f[0]))
                .then(|| f[2].parse::<u64>().unwrap_or(0) * f[3].parse::<u64>().unwrap_or(0))
        })
        .sum()
}

/// `TCP: inuse … mem …` of /proc/net/sockstat in the pod's netns: (inuse, mem pages).
fn sockstat(pod: &meshaccel_e2e::Pod) -> (u64, u64) {
    let out = pod
        .netns_exec("cat", &["/proc/net/sockstat"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let line = out.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let f: Vec<&str> = line.split_whitespace().collect();
    let get = |k: &str| {
        f.iter()
            .position(|w| *w == k)
            .and_then(|i| f.get(i + 1)?.parse().ok())
            .unwrap_or(0)
    };
    (get("inuse"), get("mem"))
}

/// One scrape of the agent's /metrics: (milliseconds, the text).
fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).context("connecting to /metrics")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, text))
}

/// A metric's value in a Prometheus text exposition (the first sample whose name and labels
/// start with `prefix`).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Sets a sysctl, restoring the old value when dropped.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn raise_to(path: &str, want: u64) -> anyhow::Result<Option<Sysctl>> {
        let old = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        if old.trim().parse::<u64>().unwrap_or(0) >= want {
            return Ok(None);
        }
        fs::write(path, want.to_string()).with_context(|| format!("raising {path} to {want}"))?;
        eprintln!(
            "[scale] {path}: {} → {want} (restored at the end)",
            old.trim()
        );
        Ok(Some(Sysctl {
            path: path.into(),
            old,
        }))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, self.old.trim()) {
            eprintln!("[scale] restoring {}: {e}", self.path.display());
        }
    }
}

/// The client process: commands in, one JSON line out each.
struct ClientIo {
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl ClientIo {
    fn ask(&mut self, cmd: &str, limit: Duration) -> anyhow::Result<Value> {
        self.send(cmd)?;
        self.answer(cmd, limit)
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        driver::check_stop()?;
        writeln!(self.stdin, "{cmd}").with_context(|| format!("sending {cmd:?} to the client"))?;
        self.stdin.flush()?;
        Ok(())
    }

    fn answer(&mut self, cmd: &str, limit: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            driver::check_stop()?;
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .with_context(|| format!("the client's answer to {cmd:?}: {line:?}"))?;
                    if let Some(e) = v["error"].as_str() {
                        bail!("the client, at {cmd:?}: {e}");
                    }
                    return Ok(v);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the client did not answer {cmd:?} within {limit:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the client exited at {cmd:?} (its stderr is above)")
                }
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(b: f64) -> f64 {
    b / 1048576.0
}

fn run(a: &Args) -> anyhow::Result<bool> {
    require_root();
    let sizes: Vec<usize> = if a.common.short {
        vec![100, 1_000]
    } else {
        a.sizes.clone()
    };
    ensure!(
        !sizes.is_empty() && sizes.windows(2).all(|w| w[0] < w[1]) && sizes[0] > 0,
        "--sizes: give ascending, positive sizes"
    );
    let (rounds, rr, connects) = if a.common.short {
        (1, 2_000, 50)
    } else {
        (a.rounds.max(1), a.rr.max(100), a.connects.max(10))
    };
    let max = *sizes.last().expect("sizes");
    // Both sockets of every held connection, the active pair, the timed ones, and room.
    let need_sockets = 2 * max as u64 + 2 * connects as u64 + 1_000;
    let capacity = match a.capacity {
        Some(c) => c,
        None => (need_sockets.next_power_of_two().max(65_536)) as u32,
    };
    ensure!(
        u64::from(capacity) >= need_sockets,
        "--capacity {capacity} cannot hold {need_sockets} sockets ({max} connections)"
    );
    meshaccel::config::parse_sockhash_capacity(&capacity.to_string())
        .map_err(|e| anyhow::anyhow!("--capacity: {e}"))?;
    let t_run = Instant::now();
    let machine = driver::machine();

    // Limits: descriptors for the client and the server (inherited by both), conntrack entries
    // for the REDIRECTed connections.
    let nofile = 2 * max as u64 + 4 * connects as u64 + 10_000;
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    ensure!(
        nofile <= nr_open,
        "{max} connections need {nofile} descriptors per process; fs.nr_open is {nr_open}"
    );
    // Raise RLIMIT_NOFILE as far as allowed (without CAP_SYS_RESOURCE only to the hard
    // limit); the connections are then spread over as many clients and servers as that needs.
    let mut lim = libc::rlimit {
        rlim_cur: nofile,
        rlim_max: nofile,
    };
    // SAFETY: setrlimit/getrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        eprintln!(
            "[scale] RLIMIT_NOFILE stays at its hard limit {} ({e}: no CAP_SYS_RESOURCE): the connections are spread over several clients and servers",
            lim.rlim_max
        );
    }
    let per_proc = (lim.rlim_cur as usize).saturating_sub(1_000).max(1_000);
    // Clients: each holds its share; the first also the active pair and the timed ones.
    let n_clients = (max + connects + 10).div_ceil(per_proc);
    // Servers share the port (SO_REUSEPORT); the kernel's spread is uneven: 30% spare.
    let n_servers = (max * 13 / 10 + connects + 10).div_ceil(per_proc);
    let _conntrack = if std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        Sysctl::raise_to(
            "/proc/sys/net/netfilter/nf_conntrack_max",
            (max as u64 + connects as u64) * 2 + 65_536,
        )?
    } else {
        None
    };

    let cpus: Cpus = (a.pin == "same").then(|| "0".to_string());
    let tmp = driver::shared_tempdir()?;
    let rules = driver::capture_rules(tmp.path())?;
    let mut mesh = Mesh::new()?;
    let app = mesh.add_pod("app", Some(&rules))?;
    let peer = mesh.add_pod("peer", None)?;
    // Local addresses of each client: one for the active and timed connections, then one per
    // `per_source` held ones (10.77.X.100 on, /32s on the pod's eth0; gone with its netns).
    let per_client_sources = 1 + max.div_ceil(n_clients).div_ceil(a.per_source.max(1));
    let n_sources = n_clients * per_client_sources;
    ensure!(
        n_sources <= 150,
        "{n_sources} local addresses: raise --per-source"
    );
    let o = app.ip.octets();
    let sources: Vec<Ipv4Addr> = (0..n_sources)
        .map(|i| Ipv4Addr::new(o[0], o[1], o[2], 100 + i as u8))
        .collect();
    for ip in &sources {
        let out = std::process::Command::new("ip")
            .args(["-n", &app.netns_name, "addr", "add"])
            .arg(format!("{ip}/32"))
            .args(["dev", "eth0"])
            .output()?;
        ensure!(
            out.status.success(),
            "adding {ip} to the app pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    app.netns_exec("sysctl", &["-q", "-w", "net.core.somaxconn=65535"])?;

    let cap = capacity.to_string();
    eprintln!("[scale] agent with --sockhash-capacity {capacity}; sizes {sizes:?}");
    let wl = [a.common.workload(&app)];
    let accel = Accel::start_env(
        &mesh,
        true,
        Scope::Mesh,
        &wl,
        &[("MESHACCEL_SOCKHASH_CAPACITY", &cap)],
    )?;
    let agent_pid = accel.agent_pid().context("the agent's pid")?;
    let metrics_addr = accel.metrics_addr()?;
    let other = driver::OtherLoad::start(mesh.cgroup_root());
    for _ in 0..n_servers {
        driver::serve(
            &mut mesh,
            &app,
            PROXY_UID,
            &cpus,
            &[
                "scale-server".into(),
                "--listen".into(),
                "0.0.0.0:15001".into(),
            ],
        )?;
    }
    let slab0 = slab_bytes(&["TCP", "sock_inode_cache"]);
    let meminfo = || fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kslab0 = kib_field(&meminfo(), "Slab:") * 1024;
    let status0 = accel.status()?;
    eprintln!("[scale] {n_clients} client(s), {n_servers} server(s), {n_sources} local addresses");
    let mut clients = Vec::new();
    for chunk in sources.chunks(per_client_sources) {
        let sources_arg = chunk
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = driver::command(
            &cpus,
            &workspace_bin("meshaccel-e2e-tool"),
            &[
                "scale-client".into(),
                "--connect".into(),
                SocketAddrV4::new(peer.ip, 8080).to_string(),
                "--sources".into(),
                sources_arg,
                "--per-source".into(),
                a.per_source.to_string(),
            ],
        );
        cmd.stdin(Stdio::piped());
        let mut child = mesh.spawn_cmd(&app, Some(APP_UID), cmd)?;
        let stdin = child.stdin.take().context("the client's stdin")?;
        let stdout = child.stdout.take().context("the client's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => {}
            other => bail!("the scale client did not start: {other:?}"),
        }
        clients.push(ClientIo { stdin, lines });
    }
    let mut rows: Vec<Value> = Vec::new();
    let mut engaged = true;
    for &n in &sizes {
        eprintln!("[scale] growing to {n} held connections");
        // Each client its share (the first one the remainder), all growing at once.
        let t_hold = Instant::now();
        for (i, c) in clients.iter_mut().enumerate() {
            let share = n / n_clients + if i == 0 { n % n_clients } else { 0 };
            c.send(&format!("hold {share}"))?;
        }
        let mut answers = Vec::new();
        for c in &mut clients {
            answers.push(c.answer("hold", Duration::from_secs(1800))?);
        }
        let held = json!({
            "ms": t_hold.elapsed().as_millis() as u64,
            "clients": answers,
        });
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let st = accel.status()?;
        let status_ms = t.elapsed().as_secs_f64() * 1e3;
        let sockets = st["sockets"].as_u64().unwrap_or(0);
        // The held pairs and the active one.
        let want = 2 * (n as u64 + 1);
        if sockets < want {
            engaged = false;
            eprintln!(
                "[scale] WARNING: the sockhash holds {sockets} sockets, want ≥ {want} for {n} connections (insert_failed {})",
                st["counters"]["insert_failed"]
            );
        }
        let mut rr_p50 = Vec::new();
        let mut rr_p99 = Vec::new();
        let mut c_p50 = Vec::new();
        let mut c_p99 = Vec::new();
        let mut raw = Vec::new();
        let before = accel.status()?;
        for r in 1..=rounds {
            let p = clients[0].ask(&format!("rr {rr} {}", a.rr_size), Duration::from_secs(600))?;
            let c = clients[0].ask(&format!("connect {connects}"), Duration::from_secs(600))?;
            eprintln!(
                "[scale] {n}: round {r}/{rounds}: rr p50 {} p99 {} µs; connect→first byte p50 {} p99 {} µs",
                p["p50_us"], p["p99_us"], c["p50_us"], c["p99_us"]
            );
            rr_p50.push(p["p50_us"].as_f64().unwrap_or(0.0));
            rr_p99.push(p["p99_us"].as_f64().unwrap_or(0.0));
            c_p50.push(c["p50_us"].as_f64().unwrap_or(0.0));
            c_p99.push(c["p99_us"].as_f64().unwrap_or(0.0));
            raw.push(json!({"rr": p, "connect": c}));
        }
        let after = accel.status()?;
        let delta = |k: &str| {
            after["counters"][k].as_u64().unwrap_or(0) as i64
                - before["counters"][k].as_u64().unwrap_or(0) as i64
        };
        // Each timed connection: 1 byte each way; each round trip: one message each way.
        let want_redirects = (rounds * (rr + rr / 10 + connects) * 2) as i64;
        let redirected = delta("redirect_msgs");
        if redirected < want_redirects {
            engaged = false;
            eprintln!(
                "[scale] WARNING: {redirected} messages redirected while measuring, want {want_redirects}"
            );
        }
        let (scrape_ms, text) = scrape(metrics_addr)?;
        let metric_total = sample(&text, "meshaccel_map_memory_total_bytes");
        let (vm_rss, vm_hwm) = rss(agent_pid);
        let (tcp_inuse, tcp_mem_pages) = sockstat(&app);
        let slab = slab_bytes(&["TCP", "sock_inode_cache"]);
        let kslab = kib_field(&meminfo(), "Slab:") * 1024;
        let row = json!({
            "connections": n,
            "sockets_in_sockhash": sockets,
            "hold": held,
            "status_ms": (status_ms * 10.0).round() / 10.0,
            "metrics_scrape_ms": (scrape_ms * 10.0).round() / 10.0,
            "rr_p50_us": median(rr_p50),
            "rr_p99_us": median(rr_p99),
            "connect_p50_us": median(c_p50),
            "connect_p99_us": median(c_p99),
            "rounds": raw,
            "redirected_messages": redirected,
            "kernel_counters_moved": {
                "fallback_no_peer": delta("fallback_no_peer"),
                "fallback_no_local_peer": delta("fallback_no_local_peer"),
                "insert_failed": delta("insert_failed"),
                "inserted": delta("inserted"),
            },
            "agent_rss_bytes": vm_rss,
            "agent_hwm_bytes": vm_hwm,
            "map_memory_total_bytes": after["map_memory_total"],
            "map_memory_bytes": after["map_memory"],
            "metrics_map_memory_total_bytes": metric_total,
            "tcp_inuse_pod": tcp_inuse,
            "tcp_mem_pages": tcp_mem_pages,
            "socket_slab_growth_bytes": slab.saturating_sub(slab0),
            "kernel_slab_growth_bytes": kslab.saturating_sub(kslab0),
        });
        eprintln!(
            "[scale] {n}: sockhash {sockets} sockets; agent RSS {:.1} MiB; maps {:.1} MiB; socket slab +{:.1} MiB; status {status_ms:.0} ms, /metrics {scrape_ms:.0} ms",
            mib(vm_rss as f64),
            mib(after["map_memory_total"].as_f64().unwrap_or(0.0)),
            mib(slab.saturating_sub(slab0) as f64),
        );
        rows.push(row);
    }
    for c in &mut clients {
        let _ = c.send("quit");
    }
    drop(clients);
    let mut machine = machine;
    machine["loadavg_end"] = json!(driver::loadavg());
    other.record(&mut machine);
    drop(accel);
    drop(mesh);
    let elapsed_s = t_run.elapsed().as_secs();

    // The table.
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let base = rows[0].clone();
    println!();
    println!(
        "scale: held app ↔ sidecar connections under Istio's capture (2 accelerated sockets each), --sockhash-capacity {capacity}; at each size {rounds} round(s) of {rr} round trips of {} B on one active pair and {connects} new connections timed to their first byte back; medians over rounds; pinning {}; {elapsed_s} s",
        a.rr_size, a.pin
    );
    println!("{}", driver::machine_line(&machine));
    println!(
        "(absolute latency on a shared 2-vCPU machine is noisy: read the ratios with the run's own spread in scale.json)"
    );
    println!();
    println!(
        "{:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "conns",
        "sockets",
        "rr p50",
        "rr p99",
        "conn p50",
        "conn p99",
        "grow s",
        "agent",
        "maps",
        "sock slab",
        "all slab",
        "tcp mem"
    );
    println!(
        "{:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "", "", "µs", "µs", "µs", "µs", "", "RSS MiB", "MiB", "+MiB", "+MiB", "pages"
    );
    for r in &rows {
        println!(
            "{:>8} {:>8} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            r["connections"].as_u64().unwrap_or(0),
            r["sockets_in_sockhash"].as_u64().unwrap_or(0),
            f(r, "rr_p50_us"),
            f(r, "rr_p99_us"),
            f(r, "connect_p50_us"),
            f(r, "connect_p99_us"),
            r["hold"]["ms"].as_f64().unwrap_or(0.0) / 1e3,
            mib(f(r, "agent_rss_bytes")),
            mib(f(r, "map_memory_total_bytes")),
            mib(f(r, "socket_slab_growth_bytes")),
            mib(f(r, "kernel_slab_growth_bytes")),
            r["tcp_mem_pages"].as_u64().unwrap_or(0),
        );
    }
    println!();
    println!(
        "ratios to {} connections (target: ≤ {FLAT:.2} at every size):",
        base["connections"]
    );
    let keys = [
        ("rr_p50_us", "rr p50"),
        ("rr_p99_us", "rr p99"),
        ("connect_p50_us", "connect p50"),
        ("connect_p99_us", "connect p99"),
    ];
    let mut ratios = Vec::new();
    for r in &rows {
        let mut o = serde_json::Map::new();
        let mut line = format!("{:>8}", r["connections"].as_u64().unwrap_or(0));
        for (k, label) in keys {
            let x = f(r, k) / f(&base, k).max(1e-9);
            o.insert(k.into(), json!((x * 1000.0).round() / 1000.0));
            line.push_str(&format!(
                "  {label} {x:.2}{}",
                if x <= FLAT { "" } else { " (over)" }
            ));
        }
        println!("{line}");
        ratios.push(json!({"connections": r["connections"], "ratios": o}));
    }
    let last = rows.last().expect("rows");
    let rss_mb = f(last, "agent_rss_bytes") / 1e6;
    println!();
    println!(
        "agent RSS at {} connections: {rss_mb:.1} MB (target ≤ {RSS_TARGET_MB:.0} MB at 100k: {}); maps {:.1} MiB in the kernel (sockhash {:.1} MiB, PEERS {:.1} MiB)",
        last["connections"],
        if rss_mb <= RSS_TARGET_MB {
            "met"
        } else {
            "**missed**"
        },
        mib(f(last, "map_memory_total_bytes")),
        mib(last["map_memory_bytes"]["MESHACCEL_SOCKS"]
            .as_f64()
            .unwrap_or(0.0)),
        mib(last["map_memory_bytes"]["MESHACCEL_PEERS"]
            .as_f64()
            .unwrap_or(0.0)),
    );
    if !engaged {
        println!(
            "WARNING: acceleration did not engage for every connection (see above and scale.json)"
        );
    }

    let result = json!({
        "bench": "scale",
        "what": "held app ↔ sidecar connections under Istio's capture; active-pair ping-pong and connect-to-first-byte at each size",
        "sizes": sizes,
        "sockhash_capacity": capacity,
        "clients": n_clients,
        "servers": n_servers,
        "rlimit_nofile": lim.rlim_cur,
        "rounds": rounds,
        "rr": rr,
        "rr_size": a.rr_size,
        "connects": connects,
        "pin": a.pin,
        "short": a.common.short,
        "elapsed_s": elapsed_s,
        "machine": machine,
        "engaged": engaged,
        "map_memory_before": status0["map_memory"],
        "rows": rows,
        "ratios": ratios,
        "targets": {"flat_within": FLAT, "agent_rss_mb_at_100k": RSS_TARGET_MB},
    });
    let series = |k: &str, label: &str, color| SizeSeries {
        label: label.into(),
        color,
        points: rows
            .iter()
            .map(|r| (r["connections"].as_u64().unwrap_or(1), f(r, k), None))
            .collect(),
    };
    let lat = [
        series("rr_p50_us", "ping-pong p50", plot::ACCELERATED),
        series("rr_p99_us", "ping-pong p99", plot::ALT[1]),
        series("connect_p50_us", "connect → first byte p50", plot::BASELINE),
        series("connect_p99_us", "connect → first byte p99", plot::ALT[0]),
    ];
    let mem_series = |k: &str, label: &str, color| {
        let mut s = series(k, label, color);
        for p in &mut s.points {
            p.1 = mib(p.1);
        }
        s
    };
    let mem = [
        mem_series("agent_rss_bytes", "agent RSS", plot::ACCELERATED),
        mem_series("map_memory_total_bytes", "maps (kernel)", plot::BASELINE),
        mem_series(
            "socket_slab_growth_bytes",
            "TCP + inode slabs (growth)",
            plot::ALT[0],
        ),
    ];
    report_tail::write_results("scale", &a.common.out, &result, (1400, 560), |area| {
        let (l, r) = area.split_horizontally(760);
        plot::by_count(
            &l,
            "scale: latency as held connections grow",
            "held connections (2 accelerated sockets each)",
            "µs",
            &lat,
            true,
        )?;
        plot::by_count(&r, "memory", "held connections", "MiB", &mem, true)
    })?;
    Ok(!a.common.check || engaged)
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::install_signal_handlers();
    report_tail::exit("scale", run(&a))
}
