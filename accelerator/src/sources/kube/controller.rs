//! The watch loop of the Kubernetes source.
//!
//! One session = a Pod watcher (`spec.nodeName=<node>`) and a Namespace watcher, each starting
//! with a full list. The desired workloads are computed only while both have a complete list
//! (after their `InitDone`), so a half-listed state never reaches the maps. Any watch error ends
//! the session: the source reports not-ready, keeps its last good contribution in [`Shared`], and
//! starts a new session after a capped exponential backoff. A new session relists everything and
//! recomputes; the contribution is replaced only when it differs, so a reconnect with nothing
//! changed touches no map.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt as _, StreamExt as _, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use tracing::{error, info, info_span, warn};

use super::{
    Error, KubeOptions, events,
    podnetns::{Lookup, NetnsIndex},
    policy::{self, Outcome},
};
use crate::{agent::shared::Shared, sources::Source};

/// Builds the client: the kubeconfig file if given, else the in-cluster service account.
pub async fn client(opts: &KubeOptions) -> Result<Client, Error> {
    let mut cfg = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::incluster().map_err(|source| Error::InCluster { source })?,
    };
    // Fail fast when the API server is away, so that the backoff (not a hung connect) paces
    // the retries.
    cfg.connect_timeout = Some(Duration::from_secs(3));
    Client::try_from(cfg).map_err(|source| Error::Client { source })
}

/// Capped exponential backoff.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }
    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
}

enum Item {
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
    Ns(Box<Result<Event<Namespace>, watcher::Error>>),
}

/// A list being (re)built during a watcher's init phase, then the live one.
struct Listed<T> {
    live: BTreeMap<String, T>,
    building: Option<BTreeMap<String, T>>,
    complete: bool,
}

impl<T> Default for Listed<T> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            building: None,
            complete: false,
        }
    }
}

impl<T> Listed<T> {
    fn apply(&mut self, ev: Event<(String, T)>) {
        match ev {
            Event::Init => self.building = Some(BTreeMap::new()),
            Event::InitApply((k, v)) => {
                self.building.get_or_insert_with(BTreeMap::new).insert(k, v);
            }
            Event::InitDone => {
                self.live = self.building.take().unwrap_or_default();
                self.complete = true;
            }
            Event::Apply((k, v)) => {
                self.live.insert(k, v);
            }
            Event::Delete((k, _)) => {
                self.live.remove(&k);
            }
        }
    }
}

fn map_event<K, T>(ev: Event<K>, f: impl Fn(K) -> (String, T)) -> Event<(String, T)> {
    match ev {
        Event::Apply(k) => Event::Apply(f(k)),
        Event::Delete(k) => Event::Delete(f(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(k)),
        Event::InitDone => Event::InitDone,
    }
}

fn pod_entry(mut p: Pod) -> (String, Pod) {
    // Only spec, status, labels and annotations are read: drop the bulky rest.
    p.metadata.managed_fields = None;
    let key = format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    );
    (key, p)
}

fn ns_entry(n: Namespace) -> (String, BTreeMap<String, String>) {
    (
        n.metadata.name.unwrap_or_default(),
        n.metadata.labels.unwrap_or_default(),
    )
}

struct Controller {
    opts: KubeOptions,
    shared: Arc<Shared>,
    client: Client,
    pods: Listed<Pod>,
    namespaces: Listed<BTreeMap<String, String>>,
    index: NetnsIndex,
    /// When each accelerated (pod, IP) was first seen: a scan older than that cannot vouch for
    /// it (the IP may have belonged to another, gone, namespace).
    first_seen: HashMap<(String, IpAddr), Instant>,
    /// Unresolved pods are retried on this schedule (reset when a new one appears).
    retry: Backoff,
    retry_at: Option<tokio::time::Instant>,
    last_unresolved: Vec<String>,
    /// Pod uid → the message an Event was posted for.
    reported: HashMap<String, String>,
    last_conflicts: Vec<(String, String)>,
}

impl Controller {
    fn synced(&self) -> bool {
        self.pods.complete && self.namespaces.complete
    }

    fn lookup(&mut self, id: &str, ip: IpAddr, now: Instant, stale: &mut bool) -> Lookup {
        let seen = *self.first_seen.entry((id.to_string(), ip)).or_insert(now);
        if self.index.scanned_at.is_none_or(|s| s < seen) {
            *stale = true;
            return Lookup::Missing;
        }
        self.index.lookup(ip)
    }

    fn compute(&mut self, now: Instant, stale: &mut bool) -> policy::KubeDesired {
        let capture = self.shared.snapshot().merged().capture;
        let pods = std::mem::take(&mut self.pods.live);
        let ns = std::mem::take(&mut self.namespaces.live);
        let label = self.opts.opt_in_label.clone();
        let out = policy::compute(pods.values(), &ns, &capture, &label, |id, ip| {
            self.lookup(id, ip, now, stale)
        });
        self.pods.live = pods;
        self.namespaces.live = ns;
        out
    }

    fn rescan(&mut self) {
        if let Err(e) = self.index.rescan(&self.opts.scan) {
            error!(error = %e, "scanning the node's network namespaces failed");
        }
    }

    /// Recomputes the desired workloads and hands them to the reconciler if they changed.
    fn recompute(&mut self, force_scan: bool) {
        let _span = info_span!("kube_compute").entered();
        let started = Instant::now();
        if force_scan {
            self.rescan();
        }
        let mut stale = false;
        let mut out = self.compute(started, &mut stale);
        if stale {
            self.rescan();
            stale = false;
            out = self.compute(started, &mut stale);
        }
        // Forget (pod, IP) pairs no longer wanted.
        let wanted: std::collections::HashSet<(String, IpAddr)> = out
            .decisions
            .iter()
            .filter_map(|d| match &d.outcome {
                Outcome::Accelerate { ip, .. } => Some((d.id.clone(), *ip)),
                _ => None,
            })
            .collect();
        self.first_seen.retain(|k, _| wanted.contains(k));

        // Unresolved pods: retry with backoff; a new one restarts the schedule.
        let unresolved: Vec<String> = out.unresolved.iter().map(|(id, ..)| id.clone()).collect();
        if unresolved.is_empty() {
            self.retry.reset();
            self.retry_at = None;
        } else {
            if unresolved.iter().any(|u| !self.last_unresolved.contains(u)) {
                self.retry.reset();
                for (id, ip, why) in &out.unresolved {
                    match why {
                        Lookup::Ambiguous(c) => {
                            warn!(pod = %id, %ip, netns_cookies = ?c, "pod IP is on several network namespaces of this node; not accelerated")
                        }
                        _ => {
                            info!(pod = %id, %ip, "pod IP on no network namespace of this node yet; will retry")
                        }
                    }
                }
            }
            self.retry_at = Some(tokio::time::Instant::now() + self.retry.take());
        }
        self.last_unresolved = unresolved;
        if out.conflicts != self.last_conflicts {
            for (pod, other) in &out.conflicts {
                warn!(pod = %pod, other = %other, "pod IP resolves to the network namespace of another pod; not accelerated");
            }
            self.last_conflicts = out.conflicts.clone();
        }

        self.report_invalid(&out.decisions);

        let changed = self.shared.snapshot().kube.as_ref() != Some(&out.inputs);
        if changed {
            info!(
                accelerated = out.inputs.workloads.len(),
                pods = out.decisions.len(),
                unresolved = out.unresolved.len(),
                took_us = started.elapsed().as_micros() as u64,
                "node-local mesh pods changed"
            );
            let inputs = out.inputs;
            self.shared.update(|s| s.kube = Some(inputs));
        }
    }

    /// A log line and one Kubernetes Event per pod and message.
    fn report_invalid(&mut self, decisions: &[policy::Decision]) {
        let mut live = std::collections::HashSet::new();
        for d in decisions {
            let Outcome::Invalid(msg) = &d.outcome else {
                continue;
            };
            live.insert(d.uid.clone());
            if self.reported.get(&d.uid) == Some(msg) {
                continue;
            }
            warn!(pod = %d.id, reason = %msg, "pod not accelerated");
            self.reported.insert(d.uid.clone(), msg.clone());
            let pod = events::PodRef {
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                uid: d.uid.clone(),
            };
            let ev = events::warning(
                &self.opts.node_name,
                &pod,
                events::NOT_ACCELERATED,
                "Accelerate",
                &format!("meshaccel does not accelerate this pod: {msg}"),
            );
            tokio::spawn(events::post(self.client.clone(), ev));
        }
        self.reported.retain(|uid, _| live.contains(uid));
    }
}

/// Starts the Kubernetes source as a task on the current runtime. A configuration error (no
/// kubeconfig, no in-cluster environment) is returned at once; an unreachable API server is not
/// an error (the source retries and reports not-ready).
pub async fn spawn(
    opts: KubeOptions,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    shared.source_synced(Source::Kubernetes, false);
    let client = client(&opts).await?;
    Ok(tokio::spawn(run(opts, client, shared)))
}

/// Runs the Kubernetes source until the process ends.
pub async fn run(opts: KubeOptions, client: Client, shared: Arc<Shared>) {
    shared.source_synced(Source::Kubernetes, false);
    info!(node = %opts.node_name, kubeconfig = ?opts.kubeconfig, "watching node-local pods");
    let mut ctl = Controller {
        retry: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        retry_at: None,
        opts,
        shared,
        client,
        pods: Listed::default(),
        namespaces: Listed::default(),
        index: NetnsIndex::default(),
        first_seen: HashMap::new(),
        last_unresolved: Vec::new(),
        reported: HashMap::new(),
        last_conflicts: Vec::new(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), ctl.opts.max_backoff);
    let mut resync = tokio::time::interval(ctl.opts.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    loop {
        let error = session(&mut ctl, &mut resync, &mut backoff).await;
        ctl.shared.source_synced(Source::Kubernetes, false);
        ctl.shared.source_error(Source::Kubernetes);
        let wait = backoff.take();
        warn!(error = %error, retry_in_ms = wait.as_millis() as u64, kept_last_good = ctl.shared.snapshot().kube.is_some(),
            "Kubernetes API unreachable or watch failed; keeping the last good state");
        tokio::time::sleep(wait).await;
    }
}

/// One watch session; returns why it ended.
async fn session(
    ctl: &mut Controller,
    resync: &mut tokio::time::Interval,
    backoff: &mut Backoff,
) -> String {
    let selector = format!("spec.nodeName={}", ctl.opts.node_name);
    let pods = watcher::watcher(
        Api::<Pod>::all(ctl.client.clone()),
        watcher::Config::default().fields(&selector),
    )
    .map(|e| Item::Pod(Box::new(e)))
    .boxed();
    let nss = watcher::watcher(
        Api::<Namespace>::all(ctl.client.clone()),
        watcher::Config::default(),
    )
    .map(|e| Item::Ns(Box::new(e)))
    .boxed();
    let mut items = stream::select(pods, nss);
    ctl.pods.complete = false;
    ctl.namespaces.complete = false;
    loop {
        let mut force_scan = false;
        let retry_at = ctl.retry_at;
        tokio::select! {
            it = items.next() => {
                let Some(it) = it else { return "watch streams ended".into() };
                if let Err(e) = handle(ctl, it) { return e; }
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                ctl.retry_at = None;
                force_scan = true;
            }
            _ = resync.tick() => force_scan = true,
        }
        // Take every event already waiting, so a burst (a relist, a namespace label touching
        // many pods) is computed once.
        while let Some(Some(it)) = items.next().now_or_never() {
            if let Err(e) = handle(ctl, it) {
                return e;
            }
        }
        // Every wake-up may change the outcome (an event, a retry, a resync).
        if ctl.synced() {
            ctl.recompute(force_scan);
            if !ctl.shared.source_current(Source::Kubernetes) {
                info!(
                    pods = ctl.pods.live.len(),
                    namespaces = ctl.namespaces.live.len(),
                    "Kubernetes source in sync"
                );
            }
            ctl.shared.source_synced(Source::Kubernetes, true);
            backoff.reset();
        }
    }
}

fn handle(ctl: &mut Controller, it: Item) -> Result<(), String> {
    match it {
        Item::Pod(e) => match *e {
            Ok(ev) => ctl.pods.apply(map_event(ev, pod_entry)),
            Err(e) => return Err(format!("pods: {e}")),
        },
        Item::Ns(e) => match *e {
            Ok(ev) => ctl.namespaces.apply(map_event(ev, ns_entry)),
            Err(e) => return Err(format!("namespaces: {e}")),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_swaps_a_relist_in_whole() {
        let mut l: Listed<u32> = Listed::default();
        l.apply(Event::Init);
        l.apply(Event::InitApply(("a".into(), 1)));
        assert!(
            !l.complete && l.live.is_empty(),
            "half a list is never live"
        );
        l.apply(Event::InitDone);
        l.apply(Event::Apply(("b".into(), 2)));
        assert_eq!(l.live.len(), 2);
        // A relist: the old content stays live until the new list is complete.
        l.apply(Event::Init);
        l.apply(Event::InitApply(("b".into(), 3)));
        assert_eq!(l.live.get("a"), Some(&1));
        l.apply(Event::InitDone);
        assert_eq!(l.live.keys().collect::<Vec<_>>(), ["b"]);
        l.apply(Event::Delete(("b".into(), 0)));
        assert!(l.live.is_empty());
    }

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let v: Vec<_> = (0..5).map(|_| b.take().as_millis()).collect();
        assert_eq!(v, [250, 500, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.take().as_millis(), 250);
    }
}
