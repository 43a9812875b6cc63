//! What the sources, the reconciler and the HTTP endpoints share: each source's last good
//! contribution and their merge, the agent's readiness, its metrics and its state file.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    dataplane::Dataplane,
    desired::{self, DesiredState, Inputs},
    metrics::Metrics,
    sources::Source,
    state_files::StateFile,
};

/// The last good contribution of each source.
#[derive(Clone, Debug, Default)]
pub struct SourceState {
    /// From the static workloads file, netns already resolved to cookies.
    pub static_file: Option<Inputs>,
    /// From Kubernetes (node-local pods).
    pub kube: Option<Inputs>,
    /// From istiod (xDS): the last good snapshot; its capture ports and passthrough addresses
    /// override the static file's (see [`Capture::apply_xds`](crate::workloads::Capture::apply_xds)).
    pub xds: Option<istio_integration::xds::XdsSnapshot>,
    /// The dataplane's tunables (agent flags).
    pub tuning: desired::Tuning,
}

impl SourceState {
    /// All sources merged: the global switch is off if the static file turns it off.
    pub fn merged(&self) -> Inputs {
        let base = self.static_file.clone().unwrap_or_default();
        let mut out = Inputs {
            enabled: self.static_file.as_ref().is_none_or(|s| s.enabled),
            scope: base.scope,
            capture: base.capture,
            workloads: Vec::new(),
            tuning: self.tuning,
        };
        // A netns claimed by two sources: the static file wins (it is the operator's explicit
        // word), the other claim is dropped and logged rather than failing the whole state.
        for src in [&self.static_file, &self.kube].into_iter().flatten() {
            for w in &src.workloads {
                if let Some(first) = out.workloads.iter().find(|o| o.netns == w.netns) {
                    tracing::warn!(workload = %w.id, kept = %first.id, netns = ?w.netns, "two sources claim one network namespace; keeping the first");
                    continue;
                }
                out.workloads.push(w.clone());
            }
        }
        if let Some(x) = &self.xds {
            out.capture.apply_xds(x);
        }
        out
    }
}

/// Per source: whether readiness waits for it, whether it is in sync now, and whether it ever
/// was (readiness needs the first sync only: a source that loses sync later, istiod gone or an
/// API server blip, keeps its last good contribution in use; that shows in its metric, it does
/// not pull a working agent out of its Service).
#[derive(Clone, Copy, Debug, Default)]
struct SourceHealth {
    required: bool,
    synced: bool,
    ever_synced: bool,
}

/// What `/readyz` waits for besides the pinned programs: the first reconcile, and every source
/// the agent was configured with.
#[derive(Debug, Default)]
struct Readiness {
    sources: BTreeMap<Source, SourceHealth>,
    /// Set once the first reconcile after start succeeded.
    synced: bool,
}

impl Readiness {
    fn require(&mut self, source: Source) {
        self.sources.entry(source).or_default().required = true;
    }

    fn source_synced(&mut self, source: Source, synced: bool) {
        let h = self.sources.entry(source).or_default();
        h.synced = synced;
        h.ever_synced |= synced;
    }

    /// `Ok` when every required source has synced once, else the ones that never did.
    fn sources_ready(&self) -> Result<(), Vec<Source>> {
        let waiting: Vec<Source> = self
            .sources
            .iter()
            .filter(|(_, h)| h.required && !h.ever_synced)
            .map(|(s, _)| *s)
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting)
        }
    }

    /// Whether `source` is in sync now (or not required).
    fn source_current(&self, source: Source) -> bool {
        self.sources
            .get(&source)
            .is_none_or(|h| h.synced || !h.required)
    }

    #[cfg(test)]
    fn required_sources(&self) -> std::collections::BTreeSet<Source> {
        self.sources
            .iter()
            .filter(|(_, h)| h.required)
            .map(|(s, _)| *s)
            .collect()
    }
}

/// Made once at start; the sources, the reconciler and the HTTP endpoints each hold it.
pub struct Shared {
    sources: Mutex<SourceState>,
    changed: Notify,
    readiness: Mutex<Readiness>,
    bpffs: PathBuf,
    /// For `meshaccel status`: the workload names and the HTTP address.
    state_file: Mutex<StateFile>,
    /// Served on `/metrics`.
    pub metrics: Metrics,
}

impl Shared {
    /// `required`: the sources the agent runs with; it is ready only once each has synced.
    pub fn new(
        bpffs: &Path,
        state_file: StateFile,
        tuning: desired::Tuning,
        required: &[Source],
    ) -> Self {
        let metrics = Metrics::new(bpffs);
        let mut readiness = Readiness::default();
        for &s in required {
            readiness.require(s);
            metrics.register_source(s);
        }
        Self {
            sources: Mutex::new(SourceState {
                tuning,
                ..Default::default()
            }),
            changed: Notify::new(),
            readiness: Mutex::new(readiness),
            bpffs: bpffs.to_path_buf(),
            state_file: Mutex::new(state_file),
            metrics,
        }
    }

    /// Lets a source change its contribution and wakes the reconciler.
    pub fn update(&self, f: impl FnOnce(&mut SourceState)) {
        f(&mut self.sources.lock().expect("sources lock"));
        self.changed.notify_one();
    }

    pub fn snapshot(&self) -> SourceState {
        self.sources.lock().expect("sources lock").clone()
    }

    /// Resolves when a source changed its contribution since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A source has synced (`true`: its contribution is current) or lost sync (`false`: e.g. a
    /// watch restarting, istiod unreachable; the last good contribution stays in use).
    pub fn source_synced(&self, source: Source, synced: bool) {
        self.readiness
            .lock()
            .expect("readiness lock")
            .source_synced(source, synced);
        self.metrics.source_synced(source, synced);
    }

    /// Counts one error of a source; its sync state stays as it is.
    pub fn source_error(&self, source: Source) {
        self.metrics.source_error(source);
    }

    /// Whether `source` is in sync now (or not required).
    pub fn source_current(&self, source: Source) -> bool {
        self.readiness
            .lock()
            .expect("readiness lock")
            .source_current(source)
    }

    /// Whether the first reconcile after start succeeded.
    pub fn synced(&self) -> bool {
        self.readiness.lock().expect("readiness lock").synced
    }

    /// One reconcile finished: its duration, and the desired state it applied (`None`: failed).
    /// Writes the workload names to the state file when they changed.
    pub fn reconciled(&self, took: Duration, applied: Option<&DesiredState>) {
        self.metrics.reconciled(took, applied);
        let Some(desired) = applied else { return };
        self.readiness.lock().expect("readiness lock").synced = true;
        let mut sf = self.state_file.lock().expect("state file lock");
        let changed = sf.set_names(&desired.names);
        if (changed || !sf.written())
            && let Err(e) = sf.write()
        {
            tracing::warn!(error = %e, "cannot write the state file (status shows netns cookies only)");
        }
    }

    /// Records the address the HTTP endpoints listen on (in the state file).
    pub fn set_http_addr(&self, addr: std::net::SocketAddr) {
        self.state_file
            .lock()
            .expect("state file lock")
            .set_metrics_addr(addr);
    }

    /// Why the agent is not ready, one reason per entry; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !Dataplane::is_installed(&self.bpffs) {
            why.push(format!(
                "programs not attached: no pinned sock_ops link under {}",
                self.bpffs.display()
            ));
        }
        let readiness = self.readiness.lock().expect("readiness lock");
        if !readiness.synced {
            why.push("the first sync of the kernel maps is not done".to_string());
        }
        for s in readiness.sources_ready().err().unwrap_or_default() {
            why.push(format!("source {s} has not synced yet"));
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{desired::NetnsRef, workloads::Capture};
    use istio_integration::xds::XdsSnapshot;

    #[test]
    fn xds_overrides_what_it_states_and_only_that() {
        let mut c = Capture::default();
        let defaults = c.clone();
        c.apply_xds(&XdsSnapshot::default());
        assert_eq!(c, defaults, "an empty snapshot changes nothing");
        let x = XdsSnapshot {
            outbound_port: Some(16001),
            inbound_port: Some(16006),
            inbound_passthrough_binds: vec!["127.0.0.7".parse().unwrap()],
            ..Default::default()
        };
        c.apply_xds(&x);
        assert_eq!((c.outbound_port, c.inbound_port), (16001, 16006));
        assert_eq!(c.passthrough_addresses, x.inbound_passthrough_binds);
        assert_eq!(c.proxy_uid, defaults.proxy_uid);
    }

    #[test]
    fn the_agents_merged_inputs_take_the_xds_capture() {
        let mut s = SourceState::default();
        assert_eq!(
            s.merged().capture,
            Capture::default(),
            "Istio's defaults until xDS"
        );
        s.xds = Some(XdsSnapshot {
            inbound_port: Some(15007),
            ..Default::default()
        });
        let m = s.merged();
        assert_eq!(
            (m.capture.outbound_port, m.capture.inbound_port),
            (15001, 15007)
        );
    }

    use crate::desired::WorkloadSpec;

    fn spec(id: &str, cookie: u64) -> WorkloadSpec {
        WorkloadSpec {
            id: id.into(),
            netns: NetnsRef::Cookie(cookie),
            enabled: true,
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            app_sockets: Default::default(),
        }
    }

    #[test]
    fn a_netns_claimed_twice_keeps_the_static_claim() {
        let s = SourceState {
            static_file: Some(Inputs {
                enabled: true,
                workloads: vec![spec("ns/static", 7)],
                ..Default::default()
            }),
            kube: Some(Inputs {
                enabled: true,
                workloads: vec![spec("ns/kube", 7), spec("ns/other", 8)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let ids: Vec<_> = s.merged().workloads.into_iter().map(|w| w.id).collect();
        assert_eq!(ids, ["ns/static", "ns/other"]);
    }

    #[test]
    fn sources_merge_and_the_static_switch_wins() {
        let mut s = SourceState::default();
        assert!(
            s.merged().enabled,
            "no source: on, with nothing to accelerate"
        );
        s.kube = Some(Inputs {
            enabled: true,
            workloads: vec![spec("ns/k", 1)],
            ..Default::default()
        });
        s.static_file = Some(Inputs {
            enabled: false,
            workloads: vec![spec("ns/s", 2)],
            ..Default::default()
        });
        let m = s.merged();
        assert!(!m.enabled);
        assert_eq!(
            m.workloads
                .iter()
                .map(|w| w.id.as_str())
                .collect::<Vec<_>>(),
            ["ns/s", "ns/k"]
        );
    }

    #[test]
    fn readiness_waits_for_required_sources_only() {
        let mut m = Readiness::default();
        assert_eq!(m.sources_ready(), Ok(()));
        m.require(Source::Kubernetes);
        m.require(Source::StaticFile);
        assert_eq!(
            m.sources_ready(),
            Err(vec![Source::StaticFile, Source::Kubernetes])
        );
        m.source_synced(Source::StaticFile, true);
        assert_eq!(m.sources_ready(), Err(vec![Source::Kubernetes]));
        m.source_synced(Source::Kubernetes, true);
        assert_eq!(m.sources_ready(), Ok(()));
        // Losing sync later (an API server blip, istiod gone) does not make it unready again.
        m.source_synced(Source::Kubernetes, false);
        assert_eq!(m.sources_ready(), Ok(()));
        assert!(!m.source_current(Source::Kubernetes));
        assert!(m.source_current(Source::StaticFile));
        assert_eq!(
            m.required_sources().into_iter().collect::<Vec<_>>(),
            [Source::StaticFile, Source::Kubernetes]
        );
    }
}
