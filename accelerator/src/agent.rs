//! The agent loop: keep the maps equal to the desired state computed from the workloads file.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, info_span, warn};

use crate::{
    dataplane::Dataplane,
    desired::{self, DesiredState},
    error::Result,
    netns,
    workloads::WorkloadsFile,
};

pub struct AgentConfig {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub workloads: PathBuf,
    /// How often the file is checked for changes, and the state re-resolved (netns paths can be
    /// recreated with a new namespace behind them).
    pub poll: Duration,
    pub resync: Duration,
}

/// File identity used to notice changes (atomic renames included).
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reads, validates and resolves the workloads file into the desired state.
pub fn load_desired(path: &Path) -> Result<DesiredState> {
    let file = WorkloadsFile::load(path)?;
    desired::from_static(&file, netns::cookie_of_path)
}

fn sync(dp: &mut Dataplane, path: &Path, last_good: &mut Option<DesiredState>, why: &str) {
    let _span = info_span!("reconcile", trigger = why).entered();
    let started = std::time::Instant::now();
    match load_desired(path) {
        Ok(d) => match dp.reconcile(&d) {
            Ok(plan) => {
                if !plan.is_empty() || last_good.is_none() {
                    info!(
                        workloads = d.workloads.len(),
                        excluded_ports = d.excluded_ports.len(),
                        enabled = d.enabled,
                        upserts = plan.upsert_workloads.len(),
                        removals = plan.remove_workloads.len(),
                        config_changed = plan.config.is_some(),
                        took_us = started.elapsed().as_micros() as u64,
                        "maps in sync"
                    );
                }
                *last_good = Some(d);
            }
            Err(e) => error!(error = %e, "applying the desired state failed; will retry"),
        },
        Err(e) => {
            // Keep what the maps hold (the last good state) and say exactly what is wrong.
            if last_good.is_some() {
                error!(error = %e, "workloads file rejected; keeping the last good state");
            } else {
                error!(error = %e, "workloads file rejected; no state applied yet");
            }
        }
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let mut dp = Dataplane::install_or_adopt(&cfg.cgroup, &cfg.bpffs)?;
    info!(
        adopted = dp.adopted,
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        workloads = %cfg.workloads.display(),
        "agent started"
    );
    let mut last_good = None;
    sync(&mut dp, &cfg.workloads, &mut last_good, "start");
    let mut seen = stamp(&cfg.workloads);
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut poll = tokio::time::interval(cfg.poll);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = poll.tick() => {
                let now = stamp(&cfg.workloads);
                if now != seen {
                    seen = now;
                    sync(&mut dp, &cfg.workloads, &mut last_good, "file changed");
                }
            }
            _ = resync.tick() => sync(&mut dp, &cfg.workloads, &mut last_good, "resync"),
            _ = hup.recv() => sync(&mut dp, &cfg.workloads, &mut last_good, "SIGHUP"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    warn!("agent stopping; acceleration stays in place (pinned) for the next agent");
    Ok(())
}
