//! `meshaccel status`: the kernel state (pinned maps) per workload, with the names the agent
//! wrote to its state file ([`crate::state_files`]). Works without a running agent: without a
//! state file, workloads are shown by netns cookie.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use crate::{
    dataplane::{Dataplane, KernelStatus, WorkloadTraffic},
    error::Result,
    state_files::{self, AgentState},
};

/// One workload (a pod: one netns).
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadRow {
    /// `namespace/name`, when the agent's state file knows it.
    pub name: Option<String>,
    pub netns_cookie: u64,
    /// Acceleration enabled for it in the kernel maps.
    pub enabled: bool,
    /// Its apps are trusted (`appSockets: trusted`) in the kernel maps.
    pub apps_trusted: bool,
    /// Sockets in the sockhash and the bytes its sockets sent (redirected or over TCP).
    #[serde(flatten)]
    pub traffic: WorkloadTraffic,
}

/// The pinned maps' layout stamp, as `status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayoutStamp {
    pub format: u32,
    /// The layout hash, 16 hex digits.
    pub hash: String,
}

/// What `status` prints (`--output json`: this, serialized; the kernel fields at the top level).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusReport {
    #[serde(flatten)]
    pub kernel: KernelStatus,
    /// The agent's state file, when there is one.
    pub agent: Option<AgentState>,
    /// Per workload, named ones first.
    pub by_workload: Vec<WorkloadRow>,
    /// Sockets the sockhash can hold (from the pinned map).
    pub sockhash_capacity: Option<u32>,
    /// Kernel memory of each pinned map in bytes (its fdinfo `memlock`), by map name.
    pub map_memory: BTreeMap<&'static str, u64>,
    /// The sum of `map_memory`.
    pub map_memory_total: u64,
    /// What the agent learned from istiod, when it runs with `--istiod`.
    pub xds: Option<crate::state_files::XdsStatus>,
    /// The layout stamp of the pinned maps (`MESHACCEL_META`): format and layout hash, which
    /// `open` has already found equal to this build's.
    pub layout: Option<LayoutStamp>,
    /// With `--sockets`: every socket meshaccel holds, with its connection and workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets: Option<Vec<crate::dataplane::SocketRow>>,
}

/// Reads the pinned maps under `bpffs` and the agent's state file in `state_dir`.
pub fn collect(bpffs: &Path, state_dir: &Path, sockets: bool) -> Result<StatusReport> {
    let dp = Dataplane::open(bpffs)?;
    let kernel = dp.status()?;
    let enabled: BTreeMap<u64, u32> = dp
        .workloads()
        .into_iter()
        .map(|(k, p)| (k, p.flags))
        .collect();
    let agent = match state_files::read(state_dir, bpffs) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the agent's state file");
            None
        }
    };
    let mut report = build(kernel, &enabled, agent);
    report.xds = crate::state_files::read_xds_status(state_dir, bpffs);
    report.sockhash_capacity = crate::metrics::sockhash_capacity(bpffs);
    report.map_memory = crate::metrics::map_memory(bpffs);
    report.map_memory_total = report.map_memory.values().sum();
    report.sockets = sockets.then(|| dp.sockets());
    if let crate::layout_stamp::Found::Stamp(m) = crate::layout_stamp::read(bpffs) {
        report.layout = Some(LayoutStamp {
            format: m.format,
            hash: format!("{:016x}", m.layout),
        });
    }
    Ok(report)
}

/// Joins the kernel's per-netns numbers, the enabled workloads (netns cookie → policy flags) and
/// the names (pure, for tests).
pub fn build(
    kernel: KernelStatus,
    enabled: &BTreeMap<u64, u32>,
    agent: Option<AgentState>,
) -> StatusReport {
    let names = agent.as_ref().map(|a| &a.workloads);
    let mut cookies: BTreeSet<u64> = enabled.keys().copied().collect();
    cookies.extend(
        kernel
            .workloads
            .keys()
            .filter_map(|k| k.parse::<u64>().ok()),
    );
    cookies.extend(
        kernel
            .sockets_by_netns
            .keys()
            .filter_map(|k| k.parse::<u64>().ok()),
    );
    if let Some(n) = names {
        cookies.extend(n.keys().filter_map(|k| k.parse::<u64>().ok()));
    }
    let mut rows: Vec<WorkloadRow> = cookies
        .into_iter()
        .map(|c| {
            let key = c.to_string();
            let mut traffic = kernel.workloads.get(&key).cloned().unwrap_or_default();
            if let Some(n) = kernel.sockets_by_netns.get(&key) {
                traffic.sockets = *n;
            }
            WorkloadRow {
                name: names.and_then(|n| n.get(&key).cloned()),
                netns_cookie: c,
                enabled: enabled.contains_key(&c),
                apps_trusted: enabled
                    .get(&c)
                    .is_some_and(|f| f & meshaccel_common::POLICY_TRUST_APPS != 0),
                traffic,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.name.is_none(), &a.name, a.netns_cookie).cmp(&(
            b.name.is_none(),
            &b.name,
            b.netns_cookie,
        ))
    });
    StatusReport {
        kernel,
        agent,
        by_workload: rows,
        sockhash_capacity: None,
        map_memory: BTreeMap::new(),
        map_memory_total: 0,
        xds: None,
        layout: None,
        sockets: None,
    }
}

impl StatusReport {
    /// A workload's name when the agent's state file has it, else its netns cookie.
    fn workload_label(&self, netns_cookie: u64) -> String {
        self.by_workload
            .iter()
            .find(|r| r.netns_cookie == netns_cookie)
            .and_then(|r| r.name.clone())
            .unwrap_or_else(|| format!("netns {netns_cookie}"))
    }

    pub fn render_text(&self) -> String {
        let k = &self.kernel;
        let mut o = String::new();
        let _ = writeln!(o, "bpffs:            {}", k.bpffs.display());
        let _ = writeln!(
            o,
            "acceleration:     {}",
            if k.enabled { "on" } else { "off" }
        );
        match &self.agent {
            Some(a) => {
                let _ = writeln!(
                    o,
                    "agent:            pid {}{}",
                    a.pid,
                    a.metrics_addr
                        .as_deref()
                        .map(|m| format!(", metrics on http://{m}/metrics"))
                        .unwrap_or_default()
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "agent:            no state file (workloads shown by netns cookie)"
                );
            }
        }
        let _ = writeln!(
            o,
            "sockets:          {} (sockhash capacity {})",
            k.sockets,
            self.sockhash_capacity
                .map_or("unknown".to_string(), |c| c.to_string())
        );
        if !self.map_memory.is_empty() {
            let of = |name: &str| self.map_memory.get(name).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "map memory:       {} (sockhash {}, peers {}; kernel, fdinfo memlock)",
                mib(self.map_memory_total),
                mib(of(meshaccel_common::names::SOCKS)),
                mib(of(meshaccel_common::names::PEERS)),
            );
        }
        if let Some(m) = &self.layout {
            let _ = writeln!(o, "map layout:       {} (format {})", m.hash, m.format);
        }
        let _ = writeln!(
            o,
            "queue limit:      {}",
            match k.queue_limit_bytes {
                0 => "none (--max-unread-bytes 0)".to_string(),
                n => format!("{n} bytes unread per receiving socket"),
            }
        );
        let _ = writeln!(o, "workloads on:     {}", k.workloads_enabled);
        let _ = writeln!(o, "excluded ports:   {}", k.excluded_ports);
        let _ = writeln!(
            o,
            "small-write services (new connections on TCP): {}",
            k.small_write_services.len()
        );
        for s in &k.small_write_services {
            let _ = writeln!(
                o,
                "  {} port {} ({}), seen {} s ago",
                self.workload_label(s.netns_cookie),
                s.port,
                s.direction,
                s.seen_secs_ago
            );
        }
        if let Some(x) = &self.xds {
            o.push_str(&x.render_text());
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<40} {:>20} {:>5} {:>7} {:>12} {:>14} {:>10} {:>12}",
            "WORKLOAD",
            "NETNS",
            "ON",
            "SOCKETS",
            "REDIR MSGS",
            "REDIR BYTES",
            "TCP MSGS",
            "TCP BYTES"
        );
        for r in &self.by_workload {
            let t = &r.traffic;
            let _ = writeln!(
                o,
                "{:<40} {:>20} {:>5} {:>7} {:>12} {:>14} {:>10} {:>12}",
                r.name.as_deref().unwrap_or("-"),
                r.netns_cookie,
                match (r.enabled, r.apps_trusted) {
                    (false, _) => "no",
                    (true, false) => "yes",
                    // Its app sockets too (`appSockets: trusted`).
                    (true, true) => "yes+",
                },
                t.sockets,
                t.redirect_msgs,
                t.redirect_bytes,
                t.tcp_msgs,
                t.tcp_bytes
            );
        }
        if self.by_workload.is_empty() {
            let _ = writeln!(o, "(none)");
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "kernel counters (all sockets):");
        for (name, v) in &k.counters {
            let _ = writeln!(o, "  {name:<26}{v}");
        }
        o
    }
}

/// Bytes as MiB with one decimal ("12.3 MiB"), or KiB below one MiB.
fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn kernel() -> KernelStatus {
        KernelStatus {
            bpffs: "/b".into(),
            enabled: true,
            epoch: 1,
            queue_limit_bytes: 4 << 20,
            sockets: 3,
            sockets_by_netns: BTreeMap::from([("11".into(), 2), ("33".into(), 1)]),
            workloads: BTreeMap::from([(
                "11".into(),
                WorkloadTraffic {
                    sockets: 0,
                    redirect_msgs: 5,
                    redirect_bytes: 500,
                    tcp_msgs: 1,
                    tcp_bytes: 10,
                },
            )]),
            workloads_enabled: 2,
            excluded_ports: 0,
            small_write_services: vec![crate::dataplane::SmallWriteService {
                netns_cookie: 11,
                port: 8080,
                direction: "outbound",
                seen_secs_ago: 7,
            }],
            counters: BTreeMap::from([("redirect_bytes", 500)]),
            map_ids: vec![],
            link_id: None,
            prog_ids: vec![],
        }
    }

    #[test]
    fn rows_join_kernel_numbers_enabled_set_and_names() {
        let agent = AgentState {
            workloads: BTreeMap::from([
                ("11".into(), "shop/cart".into()),
                ("22".into(), "shop/web".into()),
            ]),
            ..Default::default()
        };
        let r = build(
            kernel(),
            &BTreeMap::from([(11, 1), (22, 1 | meshaccel_common::POLICY_TRUST_APPS)]),
            Some(agent),
        );
        let rows: Vec<_> = r
            .by_workload
            .iter()
            .map(|r| {
                (
                    r.name.as_deref(),
                    r.netns_cookie,
                    r.enabled,
                    r.apps_trusted,
                    r.traffic.sockets,
                    r.traffic.redirect_bytes,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (Some("shop/cart"), 11, true, false, 2, 500),
                (Some("shop/web"), 22, true, true, 0, 0),
                (None, 33, false, false, 1, 0),
            ]
        );
        let text = r.render_text();
        assert!(text.contains("shop/cart"), "{text}");
        assert!(!text.contains("map memory"), "none read: {text}");
        assert!(
            text.contains("queue limit:      4194304 bytes unread per receiving socket"),
            "{text}"
        );
        assert!(
            text.contains("shop/cart port 8080 (outbound), seen 7 s ago"),
            "small-write services are named: {text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["enabled"], true, "kernel fields stay at the top level");
        assert_eq!(json["by_workload"][0]["name"], "shop/cart");
        assert_eq!(json["by_workload"][0]["redirect_bytes"], 500);
        assert_eq!(json["by_workload"][0]["sockets"], 2);
    }

    #[test]
    fn without_a_state_file_cookies_only() {
        let r = build(kernel(), &BTreeMap::new(), None);
        assert!(r.by_workload.iter().all(|w| w.name.is_none()));
        assert!(r.render_text().contains("no state file"));
    }

    #[test]
    fn map_memory_is_shown_in_total_and_for_the_sockhash() {
        let mut r = build(kernel(), &BTreeMap::new(), None);
        r.map_memory = BTreeMap::from([
            (meshaccel_common::names::SOCKS, 16 << 20),
            (meshaccel_common::names::PEERS, 130 << 20),
            (meshaccel_common::names::CONFIG, 3 << 10),
        ]);
        r.map_memory_total = r.map_memory.values().sum();
        let text = r.render_text();
        assert!(
            text.contains("map memory:       146.0 MiB (sockhash 16.0 MiB, peers 130.0 MiB;"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["map_memory_total"], (146u64 << 20) + (3 << 10));
        assert_eq!(
            json["map_memory"][meshaccel_common::names::SOCKS],
            16u64 << 20
        );
    }
}
