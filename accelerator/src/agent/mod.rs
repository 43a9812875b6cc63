//! The agent: sources (the static workloads file; Kubernetes and xDS plug in the same way) each
//! keep their last good contribution in [`Shared`]; one reconciler merges them, computes the
//! desired state and makes the maps equal to it.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{error, info, info_span, warn};

use crate::{
    dataplane::Dataplane,
    desired::{self, DesiredState, Inputs, NetnsRef},
    error::Result,
    netns,
    workloads::WorkloadsFile,
};

pub struct AgentConfig {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    /// The static workloads file, if any.
    pub workloads: Option<PathBuf>,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// Options for a fresh install (ignored when pinned maps are adopted).
    pub install: crate::dataplane::InstallOptions,
    /// How often everything is re-resolved and re-applied (netns paths can be recreated with a
    /// new namespace behind them; someone may have edited the maps).
    pub resync: Duration,
}

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

/// State shared by the sources, the reconciler and (later) the HTTP endpoints.
#[derive(Default)]
pub struct Shared {
    sources: Mutex<SourceState>,
    changed: Notify,
    /// Set once the first reconcile after start succeeded.
    synced: std::sync::atomic::AtomicBool,
    /// Metrics and readiness of the sources (see [`crate::metrics`]), served on `/metrics`.
    pub metrics: crate::metrics::Metrics,
}

impl Shared {
    /// Lets a source change its contribution and wakes the reconciler.
    pub fn update(&self, f: impl FnOnce(&mut SourceState)) {
        f(&mut self.sources.lock().expect("sources lock"));
        self.changed.notify_one();
    }

    pub fn snapshot(&self) -> SourceState {
        self.sources.lock().expect("sources lock").clone()
    }

    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the Kubernetes source is in sync with the API server (true when the agent runs
    /// without Kubernetes): the one record of it is the sources' readiness in `metrics`.
    pub fn kube_ready(&self) -> bool {
        self.metrics
            .source_ready(crate::metrics::Source::Kubernetes)
    }

    /// Set by the Kubernetes source: in sync, or not (starting, or the API server is
    /// unreachable: the last good state is kept).
    pub fn set_kube_ready(&self, ready: bool) {
        self.metrics
            .source_synced(crate::metrics::Source::Kubernetes, ready);
    }
}

/// File identity used to notice changes (atomic renames included).
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reads, validates and resolves the workloads file: the file is taken whole or not at all.
pub fn load_static(path: &Path) -> Result<Inputs> {
    let file = WorkloadsFile::load(path)?;
    let mut inputs = Inputs::from_static(&file);
    // Resolve here, so that a bad entry rejects this file only, not the other sources.
    let resolved = desired::compute(&inputs, netns::cookie_of_path)?;
    for w in &mut inputs.workloads {
        if let Some((cookie, _)) = resolved.names.iter().find(|(_, id)| **id == w.id) {
            w.netns = NetnsRef::Cookie(*cookie);
        }
    }
    Ok(inputs)
}

/// Loads `path` into the static source, keeping the last good contribution on error.
fn reload_static(shared: &Shared, path: &Path, why: &str) {
    match load_static(path) {
        Ok(inputs) => {
            let changed = shared.snapshot().static_file.as_ref() != Some(&inputs);
            if changed || why == "start" {
                info!(
                    trigger = why,
                    workloads = inputs.workloads.len(),
                    "workloads file loaded"
                );
            }
            shared.update(|s| s.static_file = Some(inputs));
            shared
                .metrics
                .source_synced(crate::metrics::Source::StaticFile, true);
        }
        Err(e) => {
            shared
                .metrics
                .source_error(crate::metrics::Source::StaticFile);
            let kept = shared.snapshot().static_file.is_some();
            error!(trigger = why, path = %path.display(), error = %e, kept_last_good = kept, "workloads file rejected");
        }
    }
}

/// Computes the desired state from all sources and applies it.
fn reconcile(dp: &mut Dataplane, shared: &Shared, why: &str) -> Option<DesiredState> {
    let _span = info_span!("reconcile", trigger = why).entered();
    let started = std::time::Instant::now();
    let desired = match desired::compute(&shared.snapshot().merged(), netns::cookie_of_path) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "cannot compute the desired state; the maps keep the last good state");
            shared.metrics.reconciled(started.elapsed(), None);
            return None;
        }
    };
    match dp.reconcile(&desired) {
        Ok(plan) => {
            let first = !shared.synced();
            if !plan.is_empty() || first {
                info!(
                    workloads = desired.workloads.len(),
                    excluded_ports = desired.excluded_ports.len(),
                    enabled = desired.enabled,
                    upserts = plan.upsert_workloads.len(),
                    removals = plan.remove_workloads.len(),
                    config_changed = plan.config.is_some(),
                    took_us = started.elapsed().as_micros() as u64,
                    "maps in sync"
                );
            }
            if let Some(a) = &dp.adopter {
                a.sync(&desired.adopting(), &desired.netns_paths);
            }
            shared
                .synced
                .store(true, std::sync::atomic::Ordering::Release);
            shared.metrics.reconciled(started.elapsed(), Some(&desired));
            Some(desired)
        }
        Err(e) => {
            error!(error = %e, "applying the desired state failed; will retry");
            shared.metrics.reconciled(started.elapsed(), None);
            None
        }
    }
}

/// Reconciles under the node's lock, unless this agent's installation was uninstalled meanwhile
/// (`install_gate`): then it writes nothing and says so (false: the agent stops).
fn gated_reconcile(
    dp: &mut Dataplane,
    shared: &Shared,
    cfg: &AgentConfig,
    trigger: &'static str,
) -> bool {
    let gate = match crate::install_gate::lock(&cfg.bpffs) {
        Ok(g) => g,
        Err(e) => {
            error!(error = %e, trigger, "cannot lock the bpffs folder; will retry");
            return true;
        }
    };
    if gate.uninstalled(&cfg.install.generation) {
        warn!(
            bpffs = %cfg.bpffs.display(),
            generation = %cfg.install.generation,
            "meshaccel was uninstalled on this node: stopping without writing anything"
        );
        return false;
    }
    reconcile(dp, shared, trigger);
    true
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let shared = Arc::new(Shared::default());
    run_with(cfg, shared).await
}

/// Runs the agent with a caller-made [`Shared`] (other sources and endpoints hold it too).
pub async fn run_with(cfg: AgentConfig, shared: Arc<Shared>) -> Result<()> {
    let mut dp = Dataplane::install_or_adopt(&cfg.cgroup, &cfg.bpffs, &cfg.install)?;
    if dp.sk_msg_reattached {
        shared.metrics.sk_msg_reattached();
    }

    let max_unread = shared.snapshot().tuning.max_unread_bytes;
    if let Some(w) = crate::queue_charge::agent_warning(&crate::queue_charge::release(), max_unread)
    {
        warn!("{w}");
    }
    info!(
        adopted = dp.adopted,
        sk_msg_reattached = dp.sk_msg_reattached,
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        workloads = ?cfg.workloads,
        "agent started"
    );
    if let Some(path) = &cfg.workloads {
        reload_static(&shared, path, "start");
    }
    if !gated_reconcile(&mut dp, &shared, &cfg, "start") {
        return Ok(());
    }
    let mut seen = cfg.workloads.as_deref().and_then(stamp);
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut poll = tokio::time::interval(cfg.poll);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = poll.tick() => {
                if let Some(path) = &cfg.workloads {
                    let now = stamp(path);
                    if now != seen {
                        seen = now;
                        reload_static(&shared, path, "file changed");
                    }
                }
            }
            _ = shared.changed.notified() => {
                if !gated_reconcile(&mut dp, &shared, &cfg, "source changed") {
                    break;
                }
            }
            _ = resync.tick() => {
                if !Dataplane::is_installed(&cfg.bpffs) {
                    warn!(bpffs = %cfg.bpffs.display(), "meshaccel was uninstalled (the pins are gone): stopping");
                    break;
                }
                if let Some(path) = &cfg.workloads {
                    reload_static(&shared, path, "resync");
                }
                if !gated_reconcile(&mut dp, &shared, &cfg, "resync") {
                    break;
                }
            }
            _ = hup.recv() => {
                if let Some(path) = &cfg.workloads {
                    reload_static(&shared, path, "SIGHUP");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    warn!("agent stopping; acceleration stays in place (pinned) for the next agent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::Capture;
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
    fn a_bad_static_file_names_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.yaml");
        std::fs::write(
            &p,
            "workloads:\n  - name: gone\n    netns: /nonexistent/netns\n",
        )
        .unwrap();
        let e = load_static(&p).unwrap_err().to_string();
        assert!(
            e.contains("default/gone") && e.contains("/nonexistent/netns"),
            "{e}"
        );
        std::fs::write(
            &p,
            "workloads:\n  - name: me\n    netns: /proc/self/ns/net\n",
        )
        .unwrap();
        let ok = load_static(&p).unwrap();
        assert!(matches!(ok.workloads[0].netns, NetnsRef::Cookie(c) if c != 0));
    }
}
