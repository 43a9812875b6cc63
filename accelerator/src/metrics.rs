//! Prometheus metrics of the agent.
//!
//! Two kinds of metrics:
//! - **kernel** metrics, read from the pinned maps at every scrape by [`KernelCollector`]
//!   (redirected messages and bytes, fallbacks by reason, sockhash entries and capacity, each
//!   map's kernel memory,
//!   accelerated pods, per-workload sockets and bytes): the maps are the truth, also for
//!   acceleration an earlier agent left in place;
//! - **agent** metrics kept in [`Metrics`]: reconcile duration and results, and the sync state and
//!   errors of each source (static file, Kubernetes, xDS), which the sources report through
//!   [`crate::agent::shared::Shared`] (it also keeps the agent's readiness).
//!
//! Names: `meshaccel_*`; counters end in `_total` in the exposition (the encoder adds it).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{dataplane::Dataplane, desired::DesiredState, sources::Source};

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The agent's metrics registry. One lives in [`crate::agent::shared::Shared`].
pub struct Metrics {
    registry: Registry,
    reconcile_seconds: Histogram,
    reconciles: Family<ResultLabels, Counter>,
    source_synced: Family<SourceLabels, Gauge>,
    source_errors: Family<SourceLabels, Counter>,
    source_last_sync: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    sk_msg_reattached: Counter,
    kernel: Arc<KernelCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `bpffs`: the pinned maps the kernel metrics are read from (the agent's `--bpffs`).
    pub fn new(bpffs: &Path) -> Self {
        let mut registry = Registry::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "meshaccel_reconcile_duration_seconds",
            "Time to compute the desired state and make the kernel maps equal to it",
            reconcile_seconds.clone(),
        );
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "meshaccel_reconciles",
            "Reconciles by result (ok, error: the maps keep the last good state)",
            reconciles.clone(),
        );
        let source_synced = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "meshaccel_source_synced",
            "1 when a source of the desired state (static_file, kubernetes, xds) has synced and is current",
            source_synced.clone(),
        );
        let source_errors = Family::<SourceLabels, Counter>::default();
        registry.register(
            "meshaccel_source_errors",
            "Errors of a source of the desired state (rejected file, watch or stream errors, NACKs)",
            source_errors.clone(),
        );
        let source_last_sync = Family::<SourceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "meshaccel_source_last_sync_timestamp_seconds",
            "Unix time of a source's last successful sync",
            source_last_sync.clone(),
        );
        let sk_msg_reattached = Counter::default();
        registry.register(
            "meshaccel_sk_msg_reattached",
            "Adoptions that found the pinned sockhash without an sk_msg program (nothing was redirected) and attached one",
            sk_msg_reattached.clone(),
        );
        let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register("meshaccel_build_info", "meshaccel's version", build_info);
        let kernel = Arc::new(KernelCollector {
            bpffs: bpffs.to_path_buf(),
            names: Mutex::default(),
        });
        registry.register_collector(Box::new(kernel.clone()));
        Self {
            registry,
            reconcile_seconds,
            reconciles,
            source_synced,
            source_errors,
            source_last_sync,
            sk_msg_reattached,
            kernel,
        }
    }

    /// A source the agent runs with: its sync gauge is present (0) from now on, so a dashboard
    /// sees a source that never synced.
    pub fn register_source(&self, source: Source) {
        let _ = self.source_synced.get_or_create(&SourceLabels { source });
    }

    /// A source has synced (`true`: its contribution is current) or lost sync (`false`: e.g. a
    /// watch restarting, istiod unreachable; the last good contribution stays in use).
    pub fn source_synced(&self, source: Source, synced: bool) {
        self.source_synced
            .get_or_create(&SourceLabels { source })
            .set(i64::from(synced));
        if synced {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.source_last_sync
                .get_or_create(&SourceLabels { source })
                .set(now);
        }
    }

    /// Counts one error of a source (does not change its sync state).
    pub fn source_error(&self, source: Source) {
        self.source_errors
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    /// Counts an adoption that had to attach the missing sk_msg program.
    pub fn sk_msg_reattached(&self) {
        self.sk_msg_reattached.inc();
    }

    /// One reconcile finished: its duration, and the desired state it applied (`None`: failed).
    /// Keeps the workload names for the per-workload metrics.
    pub fn reconciled(&self, took: Duration, applied: Option<&DesiredState>) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabels {
                result: if applied.is_some() { "ok" } else { "error" },
            })
            .inc();
        if let Some(desired) = applied {
            self.kernel
                .names
                .lock()
                .expect("metrics lock")
                .clone_from(&desired.names);
        }
    }

    /// The whole exposition: Prometheus text format 0.0.4, or OpenMetrics 1.0 text when
    /// `openmetrics` (which ends with `# EOF`). Reads the pinned maps: call it off the async loop.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

/// How a kernel counter is exposed (from `meshaccel_common::counter::TABLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterMetric {
    /// A family of its own, without labels.
    Plain(&'static str, &'static str),
    /// One label value of a family with one label.
    Labelled {
        family: &'static str,
        help: &'static str,
        label: &'static str,
        value: &'static str,
    },
}

/// The metric of a kernel counter, by its name; None for a name the table does not have.
pub fn counter_metric(name: &str) -> Option<CounterMetric> {
    use meshaccel_common::counter::{Metric, TABLE, family_help};
    let c = TABLE.iter().find(|c| c.name == name)?;
    Some(match c.metric {
        Metric::Own { family, help } => CounterMetric::Plain(family, help),
        Metric::Reason { family, reason } => CounterMetric::Labelled {
            family,
            help: family_help(family),
            label: "reason",
            value: reason,
        },
    })
}

/// The sockhash's capacity as the kernel created it (the agent can size it), from its pin.
pub fn sockhash_capacity(bpffs: &Path) -> Option<u32> {
    let pin = bpffs.join("maps").join(meshaccel_common::names::SOCKS);
    aya::maps::MapData::from_pin(pin)
        .ok()?
        .info()
        .ok()
        .map(|i| i.max_entries())
}

/// The `memlock:` line of a BPF map's `/proc/<pid>/fdinfo/<fd>`: the kernel memory the map
/// charges (bytes; for hash maps and the sockhash it follows the entries they hold). None when
/// the text has no such line.
pub fn parse_fdinfo_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Kernel memory of each of meshaccel's pinned maps under `bpffs` (fdinfo `memlock`), by map
/// name; maps that are not pinned are left out. (Per-socket storage, `MESHACCEL_STATE` and
/// `MESHACCEL_PEND`'s values, is charged to the sockets, not to its map.)
pub fn map_memory(bpffs: &Path) -> BTreeMap<&'static str, u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut out = BTreeMap::new();
    for name in crate::layout_stamp::all_maps() {
        let Ok(md) = aya::maps::MapData::from_pin(crate::objects::pin_path(bpffs, name)) else {
            continue;
        };
        let fd = md.fd().as_fd().as_raw_fd();
        if let Some(bytes) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .ok()
            .as_deref()
            .and_then(parse_fdinfo_memlock)
        {
            out.insert(name, bytes);
        }
    }
    out
}

/// Reads the pinned maps at every scrape.
#[derive(Debug)]
pub struct KernelCollector {
    bpffs: PathBuf,
    /// netns cookie -> `namespace/name`, from the last applied desired state.
    names: Mutex<BTreeMap<u64, String>>,
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let bpffs = &self.bpffs;
        let dp = Dataplane::open(bpffs);
        gauge(
            &mut enc,
            "meshaccel_dataplane_installed",
            "1 when meshaccel's maps are pinned under the agent's bpffs folder and readable",
            i64::from(dp.is_ok()),
        )?;
        let Ok(dp) = dp else { return Ok(()) };
        let status = match dp.status() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading the kernel maps for /metrics");
                return Ok(());
            }
        };
        gauge(
            &mut enc,
            "meshaccel_acceleration_enabled",
            "1 when the global switch is on",
            i64::from(status.enabled),
        )?;
        gauge(
            &mut enc,
            "meshaccel_sockhash_entries",
            "Sockets in the sockhash (two per accelerated connection)",
            status.sockets as i64,
        )?;
        gauge(
            &mut enc,
            "meshaccel_sockhash_capacity",
            "Capacity of the sockhash (sockets)",
            i64::from(sockhash_capacity(bpffs).unwrap_or(meshaccel_common::capacity::SOCKS)),
        )?;
        let memory = map_memory(bpffs);
        if !memory.is_empty() {
            let mut m = enc.encode_descriptor(
                "meshaccel_map_memory_bytes",
                "Kernel memory of a pinned map (its fdinfo memlock), by map name",
                None,
                MetricType::Gauge,
            )?;
            for (name, bytes) in &memory {
                let labels = [("map", *name)];
                ConstGauge::new(*bytes as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "meshaccel_map_memory_total_bytes",
            "Kernel memory of all of meshaccel's pinned maps (the sum of meshaccel_map_memory_bytes)",
            memory.values().sum::<u64>() as i64,
        )?;
        gauge(
            &mut enc,
            "meshaccel_accelerated_pods",
            "Workloads (pods) with acceleration enabled in the kernel maps",
            status.workloads_enabled as i64,
        )?;
        gauge(
            &mut enc,
            "meshaccel_excluded_ports",
            "Excluded (workload, port, direction) entries in the kernel maps",
            status.excluded_ports as i64,
        )?;

        // Kernel counters, grouped into families.
        let mut plain: Vec<(&str, &str, u64)> = Vec::new();
        // family -> (help, label key, [(label value, count)])
        type Labelled<'a> = (&'a str, &'a str, Vec<(&'a str, u64)>);
        let mut labelled: BTreeMap<&str, Labelled> = BTreeMap::new();
        for (name, v) in &status.counters {
            match counter_metric(name) {
                None => {}
                Some(CounterMetric::Plain(family, help)) => plain.push((family, help, *v)),
                Some(CounterMetric::Labelled {
                    family,
                    help,
                    label,
                    value,
                }) => labelled
                    .entry(family)
                    .or_insert((help, label, Vec::new()))
                    .2
                    .push((value, *v)),
            }
        }
        for (family, help, v) in plain {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(family, help, None, MetricType::Counter)?)?;
        }
        for (family, (help, label, values)) in labelled {
            let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
            for (value, v) in values {
                let labels = [(label, value)];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }

        // Per workload: only workloads the agent knows by name (bounded by the pods of the node).
        let names = self.names.lock().expect("metrics lock").clone();
        let rows: Vec<(&String, crate::dataplane::WorkloadTraffic)> = names
            .iter()
            .map(|(cookie, name)| {
                (
                    name,
                    status
                        .workloads
                        .get(&cookie.to_string())
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .collect();
        type Get = fn(&crate::dataplane::WorkloadTraffic) -> u64;
        let per_workload: [(&str, &str, MetricType, Get); 5] = [
            (
                "meshaccel_workload_sockets",
                "Sockets of a workload in the sockhash",
                MetricType::Gauge,
                |w| w.sockets as u64,
            ),
            (
                "meshaccel_workload_redirected_messages",
                "Messages a workload's sockets sent by redirect",
                MetricType::Counter,
                |w| w.redirect_msgs,
            ),
            (
                "meshaccel_workload_redirected_bytes",
                "Bytes a workload's sockets sent by redirect",
                MetricType::Counter,
                |w| w.redirect_bytes,
            ),
            (
                "meshaccel_workload_tcp_messages",
                "Messages a workload's sockets in the sockhash sent over TCP",
                MetricType::Counter,
                |w| w.tcp_msgs,
            ),
            (
                "meshaccel_workload_tcp_bytes",
                "Bytes a workload's sockets in the sockhash sent over TCP",
                MetricType::Counter,
                |w| w.tcp_bytes,
            ),
        ];
        for (family, help, ty, get) in per_workload {
            if rows.is_empty() {
                continue;
            }
            let mut m = enc.encode_descriptor(family, help, None, ty)?;
            for (name, w) in &rows {
                let labels = [("workload", name.as_str())];
                if ty == MetricType::Counter {
                    ConstCounter::new(get(w)).encode(m.encode_family(&labels)?)?;
                } else {
                    ConstGauge::new(get(w) as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_has_a_metric() {
        for name in meshaccel_common::counter::NAMES {
            assert!(counter_metric(name).is_some(), "{name}");
        }
        assert_eq!(
            counter_metric("fallback_no_peer"),
            Some(CounterMetric::Labelled {
                family: "meshaccel_fallbacks",
                help: meshaccel_common::counter::family_help("meshaccel_fallbacks"),
                label: "reason",
                value: "no_peer"
            })
        );
        assert_eq!(counter_metric("no_such_counter"), None);
    }

    #[test]
    fn memlock_is_read_from_a_maps_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\nmap_type:\t18\n\
                      key_size:\t40\nvalue_size:\t4\nmax_entries:\t1048576\nmap_flags:\t0x0\n\
                      map_extra:\t0x0\nmemlock:\t16777568\nmap_id:\t123\nfrozen:\t0\n";
        assert_eq!(parse_fdinfo_memlock(fdinfo), Some(16_777_568));
        assert_eq!(parse_fdinfo_memlock("memlock: 4096"), Some(4096));
        assert_eq!(parse_fdinfo_memlock("pos:\t0\nflags:\t02\n"), None);
        assert_eq!(parse_fdinfo_memlock("memlock:\tlots\n"), None);
        assert_eq!(parse_fdinfo_memlock(""), None);
    }

    #[test]
    fn agent_metrics_encode_in_both_formats() {
        let m = Metrics::new(Path::new("/nonexistent"));
        m.register_source(Source::Kubernetes);
        m.source_synced(Source::StaticFile, true);
        m.source_error(Source::Xds);
        m.source_error(Source::Xds);
        m.reconciled(Duration::from_millis(3), Some(&DesiredState::default()));
        m.reconciled(Duration::from_millis(1), None);
        m.sk_msg_reattached();
        let text = m.encode(false).unwrap();
        for want in [
            "meshaccel_source_synced{source=\"kubernetes\"} 0",
            "meshaccel_source_synced{source=\"static_file\"} 1",
            "meshaccel_source_errors_total{source=\"xds\"} 2",
            "meshaccel_reconciles_total{result=\"ok\"} 1",
            "meshaccel_reconciles_total{result=\"error\"} 1",
            "meshaccel_reconcile_duration_seconds_count 2",
            "meshaccel_build_info{version=",
            "meshaccel_sk_msg_reattached_total 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        let om = m.encode(true).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
