//! Diffs the desired map contents against what the kernel maps hold: the plan that
//! `Dataplane::reconcile` applies, computed without touching the kernel.
use std::collections::{BTreeMap, BTreeSet};

use meshaccel_common::{Config, POLICY_ENABLED, PortKey, SCOPE_ALL, WorkloadPolicy};

use crate::desired::DesiredState;

/// What the maps hold now (the part the reconciler owns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActualState {
    pub config: Config,
    pub workloads: BTreeMap<u64, WorkloadPolicy>,
    pub excluded_ports: BTreeSet<PortKey>,
    /// Workloads that have a per-workload stats entry.
    pub stats: BTreeSet<u64>,
}

/// The changes to make, in the order they are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert_workloads: Vec<(u64, WorkloadPolicy)>,
    pub remove_workloads: Vec<u64>,
    pub add_ports: Vec<PortKey>,
    pub remove_ports: Vec<PortKey>,
    /// The config to write, if it changes.
    pub config: Option<Config>,
    /// Per-workload stats entries to create (zeroed) and to delete.
    pub add_stats: Vec<u64>,
    pub remove_stats: Vec<u64>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

fn redirects(p: Option<&WorkloadPolicy>) -> bool {
    p.is_some_and(|p| p.flags & POLICY_ENABLED != 0)
}

/// Pure: the plan that turns `actual` into `desired`. The epoch moves when something that may
/// be redirecting has to stop (a workload disabled or gone, the switch turned off), so that
/// redirecting senders re-check at their next message and fall back to TCP.
pub fn plan(desired: &DesiredState, actual: &ActualState) -> Plan {
    let mut p = Plan::default();
    for (k, v) in &desired.workloads {
        if actual.workloads.get(k) != Some(v) {
            p.upsert_workloads.push((*k, *v));
        }
    }
    let mut stops = false;
    for (k, v) in &actual.workloads {
        if !desired.workloads.contains_key(k) {
            p.remove_workloads.push(*k);
        }
        if redirects(Some(v)) && !redirects(desired.workloads.get(k)) {
            stops = true;
        }
    }
    p.add_ports = desired
        .excluded_ports
        .difference(&actual.excluded_ports)
        .copied()
        .collect();
    p.remove_ports = actual
        .excluded_ports
        .difference(&desired.excluded_ports)
        .copied()
        .collect();
    let want = Config {
        epoch: actual.config.epoch,
        ..desired.config
    };
    let have = actual.config;
    // Turning off, narrowing the scope, or moving the capture can stop redirects.
    if (have.enabled != 0 && want.enabled == 0)
        || (have.scope == SCOPE_ALL && want.scope != SCOPE_ALL)
        || (
            have.outbound_port,
            have.inbound_port,
            have.passthrough_v4_be,
            have.passthrough_v6_be,
        ) != (
            want.outbound_port,
            want.inbound_port,
            want.passthrough_v4_be,
            want.passthrough_v6_be,
        )
    {
        stops = true;
    }
    if stops || want != have {
        p.config = Some(Config {
            epoch: if stops {
                have.epoch.wrapping_add(1)
            } else {
                have.epoch
            },
            ..want
        });
    }
    p.add_stats = desired
        .workloads
        .keys()
        .filter(|k| !actual.stats.contains(k))
        .copied()
        .collect();
    p.remove_stats = actual
        .stats
        .iter()
        .filter(|k| !desired.workloads.contains_key(k))
        .copied()
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use meshaccel_common::DIR_INBOUND;

    use super::*;

    fn on(id: u32) -> WorkloadPolicy {
        WorkloadPolicy {
            flags: POLICY_ENABLED,
            workload_id: id,
        }
    }

    fn desired(enabled: bool, wl: &[(u64, u32)], ports: &[(u64, u16)]) -> DesiredState {
        DesiredState {
            enabled,
            config: Config {
                enabled: enabled.into(),
                ..Default::default()
            },
            workloads: wl.iter().map(|&(k, id)| (k, on(id))).collect(),
            excluded_ports: ports
                .iter()
                .map(|&(n, p)| PortKey::new(n, p, DIR_INBOUND))
                .collect(),
            names: BTreeMap::new(),
            netns_paths: BTreeMap::new(),
        }
    }

    fn actual_after(d: &DesiredState, epoch: u32) -> ActualState {
        ActualState {
            config: Config { epoch, ..d.config },
            workloads: d.workloads.clone(),
            excluded_ports: d.excluded_ports.clone(),
            stats: d.workloads.keys().copied().collect(),
        }
    }

    #[test]
    fn converged_state_needs_nothing() {
        let d = desired(true, &[(1, 1), (2, 2)], &[(1, 80)]);
        assert!(plan(&d, &actual_after(&d, 5)).is_empty());
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            from: DesiredState,
            to: DesiredState,
            epoch_moves: bool,
            upserts: usize,
            removes: usize,
        }
        let cases = [
            Case {
                name: "first sync from empty maps",
                from: DesiredState::default(),
                to: desired(true, &[(1, 1)], &[]),
                epoch_moves: false,
                upserts: 1,
                removes: 0,
            },
            Case {
                name: "enable another workload",
                from: desired(true, &[(1, 1)], &[]),
                to: desired(true, &[(1, 1), (2, 2)], &[]),
                epoch_moves: false,
                upserts: 1,
                removes: 0,
            },
            Case {
                name: "disable (remove) a workload",
                from: desired(true, &[(1, 1), (2, 2)], &[]),
                to: desired(true, &[(1, 1)], &[]),
                epoch_moves: true,
                upserts: 0,
                removes: 1,
            },
            Case {
                name: "global switch off",
                from: desired(true, &[(1, 1)], &[]),
                to: desired(false, &[(1, 1)], &[]),
                epoch_moves: true,
                upserts: 0,
                removes: 0,
            },
            Case {
                name: "global switch on",
                from: desired(false, &[(1, 1)], &[]),
                to: desired(true, &[(1, 1)], &[]),
                epoch_moves: false,
                upserts: 0,
                removes: 0,
            },
            Case {
                name: "exclude a port",
                from: desired(true, &[(1, 1)], &[]),
                to: desired(true, &[(1, 1)], &[(1, 8080)]),
                epoch_moves: false,
                upserts: 0,
                removes: 0,
            },
        ];
        for c in cases {
            let a = actual_after(&c.from, 7);
            let p = plan(&c.to, &a);
            let epoch = p.config.map_or(7, |c| c.epoch);
            assert_eq!(epoch != 7, c.epoch_moves, "{}: {p:?}", c.name);
            assert_eq!(p.upsert_workloads.len(), c.upserts, "{}", c.name);
            assert_eq!(p.remove_workloads.len(), c.removes, "{}", c.name);
            // Applying the plan to the model converges.
            let mut b = a.clone();
            for (k, v) in &p.upsert_workloads {
                b.workloads.insert(*k, *v);
            }
            for k in &p.remove_workloads {
                b.workloads.remove(k);
            }
            b.excluded_ports.extend(p.add_ports.iter().copied());
            for k in &p.remove_ports {
                b.excluded_ports.remove(k);
            }
            if let Some(cfg) = p.config {
                b.config = cfg;
            }
            b.stats.extend(p.add_stats.iter().copied());
            for k in &p.remove_stats {
                b.stats.remove(k);
            }
            assert!(plan(&c.to, &b).is_empty(), "{}: not converged", c.name);
        }
    }
}

#[cfg(test)]
mod scope_tests {
    use meshaccel_common::{SCOPE_ALL, SCOPE_MESH};

    use super::*;

    fn with(scope: u32, inbound: u32) -> DesiredState {
        DesiredState {
            enabled: true,
            config: Config {
                enabled: 1,
                scope,
                inbound_port: inbound,
                outbound_port: 15001,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn actual(d: &DesiredState) -> ActualState {
        ActualState {
            config: Config {
                epoch: 3,
                ..d.config
            },
            ..Default::default()
        }
    }

    #[test]
    fn narrowing_the_scope_or_moving_a_capture_port_moves_the_epoch() {
        let epoch = |from: &DesiredState, to: &DesiredState| {
            plan(to, &actual(from)).config.map(|c| c.epoch)
        };
        let all = with(SCOPE_ALL, 15006);
        let mesh = with(SCOPE_MESH, 15006);
        assert_eq!(epoch(&all, &mesh), Some(4), "all → mesh can stop redirects");
        assert_eq!(epoch(&mesh, &all), Some(3), "mesh → all only widens");
        assert_eq!(
            epoch(&mesh, &with(SCOPE_MESH, 15007)),
            Some(4),
            "inbound port moved"
        );
        assert_eq!(epoch(&mesh, &mesh), None, "nothing changed");
    }
}
