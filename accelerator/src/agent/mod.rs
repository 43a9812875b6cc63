//! The agent: its sources (the static workloads file, Kubernetes, xDS) each keep their last good
//! contribution in [`Shared`]; one loop merges them, computes the desired state and makes the
//! maps equal to it.
mod node_report;
pub mod shared;

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, info_span, warn};

use crate::{
    agent::{node_report::NodeReport, shared::Shared},
    config::AgentConfig,
    dataplane::Dataplane,
    desired::{self, DesiredState},
    http, netns,
    sources::{kube, kube::events::NodeFinding, static_file, xds},
    state_files::{self, StateFile},
};

/// Computes the desired state from all sources and applies it.
fn reconcile(dp: &mut Dataplane, shared: &Shared, why: &str) -> Option<DesiredState> {
    let _span = info_span!("reconcile", trigger = why).entered();
    let started = std::time::Instant::now();
    let mut inputs = shared.snapshot().merged();
    // Without the kernel's socket offsets nothing is accelerated safely (the startup check
    // told the operator): the workloads' entries stay, the switch stays off.
    inputs.enabled &= dp.socket_offsets;
    let desired = match desired::compute(&inputs, netns::cookie_of_path) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "cannot compute the desired state; the maps keep the last good state");
            shared.reconciled(started.elapsed(), None);
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
            shared.reconciled(started.elapsed(), Some(&desired));
            Some(desired)
        }
        Err(e) => {
            error!(error = %e, "applying the desired state failed; will retry");
            shared.reconciled(started.elapsed(), None);
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

/// Runs the agent: starts the configured sources and the HTTP endpoints, installs or adopts the
/// dataplane, then keeps the maps equal to the merged sources until SIGTERM, SIGINT, or an
/// uninstall of this agent's installation.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // First: a SIGTERM while the agent starts and installs (a pod deleted as it starts) must end
    // it cleanly at the loop below, not kill it half-way.
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let shared = Arc::new(Shared::new(
        &cfg.bpffs,
        StateFile::new(&cfg.state_dir, &cfg.bpffs),
        cfg.tuning,
        &cfg.sources(),
    ));
    if let Some(opts) = cfg.kube.clone() {
        kube::spawn(opts, shared.clone()).await?;
    }
    if let Some(ads) = cfg.xds.clone() {
        let status = state_files::xds_status_path(&cfg.state_dir, &cfg.bpffs);
        tokio::spawn(xds::run(ads, shared.clone(), status));
    }
    if let Some(addr) = cfg.metrics_addr {
        let (_, serve) = http::bind(addr, shared.clone()).await?;
        tokio::spawn(serve);
    }
    // The startup checks: what this node lacks is told before installing (a kernel without BTF
    // still installs, and accelerates nothing).
    let report = NodeReport::new(&cfg).await;
    for check in crate::doctor::startup_checks() {
        report.report(NodeFinding::Check, &check.line()).await;
    }
    if let Some(w) = &cfg.queue_limit_warning {
        report.report(NodeFinding::Check, w).await;
    }
    let max_unread = shared.snapshot().tuning.max_unread_bytes;
    if let Some(w) = crate::queue_charge::agent_warning(&crate::queue_charge::release(), max_unread)
    {
        report
            .report(NodeFinding::Check, &format!("queue bound: {w}"))
            .await;
    }
    let mut dp = match Dataplane::install_or_adopt(&cfg.cgroup, &cfg.bpffs, &cfg.install) {
        Ok(dp) => dp,
        // Refusing to install after an uninstall is the agent doing its job, not a node problem.
        Err(e @ crate::error::Error::Uninstalled { .. }) => return Err(e.into()),
        Err(e) => {
            let line = format!(
                "cannot install the dataplane ({e:#}); `meshaccel doctor` on the node tells why and how to fix it"
            );
            report.report(NodeFinding::InstallFailed, &line).await;
            return Err(e.into());
        }
    };
    if dp.sk_msg_reattached {
        shared.metrics.sk_msg_reattached();
    }
    info!(
        adopted = dp.adopted,
        sk_msg_reattached = dp.sk_msg_reattached,
        max_unread_bytes = max_unread,
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        workloads = ?cfg.workloads,
        "agent started"
    );
    if let Some(path) = &cfg.workloads {
        static_file::reload(&shared, path, "start");
    }
    if !gated_reconcile(&mut dp, &shared, &cfg, "start") {
        return Ok(());
    }
    let mut seen = cfg.workloads.as_deref().and_then(static_file::stamp);
    let mut poll = tokio::time::interval(cfg.poll);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = poll.tick() => {
                if let Some(path) = &cfg.workloads {
                    let now = static_file::stamp(path);
                    if now != seen {
                        seen = now;
                        static_file::reload(&shared, path, "file changed");
                    }
                }
            }
            _ = shared.changed() => {
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
                    static_file::reload(&shared, path, "resync");
                }
                if !gated_reconcile(&mut dp, &shared, &cfg, "resync") {
                    break;
                }
            }
            _ = hup.recv() => {
                if let Some(path) = &cfg.workloads {
                    static_file::reload(&shared, path, "SIGHUP");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    warn!("agent stopping; acceleration stays in place (pinned) for the next agent");
    Ok(())
}
