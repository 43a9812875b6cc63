//! The desired content of the kernel maps, computed by pure functions from the inputs.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use meshaccel_common::{
    Config, DIR_INBOUND, DIR_OUTBOUND, POLICY_ENABLED, POLICY_TRUST_APPS, PortKey, SCOPE_ALL,
    SCOPE_MESH, WorkloadPolicy,
};

use crate::{
    error::{Error, Result},
    workloads::{AppSockets, Capture, Scope, WorkloadsFile},
};

/// What the maps should hold. Only enabled workloads get entries; a workload that is absent
/// and a disabled one look the same to the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub enabled: bool,
    /// The kernel's global config, but the epoch (the reconciler owns it).
    pub config: Config,
    /// netns cookie -> policy.
    pub workloads: BTreeMap<u64, WorkloadPolicy>,
    pub excluded_ports: BTreeSet<PortKey>,
    /// netns cookie -> `namespace/name`, for logs and status (not in the kernel).
    pub names: BTreeMap<u64, String>,
    /// netns cookie -> the file it was named by, when a source named it by file (where the
    /// agent attaches the adopting program, see `adopter`).
    pub netns_paths: BTreeMap<u64, std::path::PathBuf>,
}

impl DesiredState {
    /// The workloads whose apps' sockets enter the sockhash only after their first write
    /// (enabled, apps not trusted): they need the adopting program on their `lo`.
    pub fn adopting(&self) -> std::collections::BTreeSet<u64> {
        self.workloads
            .iter()
            .filter(|(_, p)| p.flags & POLICY_ENABLED != 0 && p.flags & POLICY_TRUST_APPS == 0)
            .map(|(c, _)| *c)
            .collect()
    }
}

/// A stable small id for a workload name, shown by status.
pub fn workload_id(id: &str) -> u32 {
    // FNV-1a: stable across runs and binaries.
    id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Where a workload's network namespace is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsRef {
    /// A netns file (/run/netns/NAME, /proc/PID/ns/net): resolved to its cookie at compute time.
    Path(std::path::PathBuf),
    /// Already known (e.g. learned on a node).
    Cookie(u64),
}

/// One local workload (a pod: one netns), whatever source it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// `namespace/name`.
    pub id: String,
    pub netns: NetnsRef,
    pub enabled: bool,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub app_sockets: AppSockets,
}

/// The dataplane's tunables (agent flags), see `meshaccel_common::tuning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Bytes a receiving socket may have unread before its sender is held on TCP (0: no limit;
    /// the kernel itself bounds no sk_msg ingress queue).
    pub max_unread_bytes: u32,
    /// TCP keepalive idle time for accelerated sockets without their own (0: none).
    pub keepalive_secs: u32,
    /// How long a service seen streaming small writes keeps new connections on TCP (0: never).
    pub small_write_secs: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_unread_bytes: meshaccel_common::tuning::QUEUE_LIMIT,
            keepalive_secs: meshaccel_common::tuning::KEEPALIVE_SECS,
            small_write_secs: meshaccel_common::tuning::SMALL_WRITE_SECS,
        }
    }
}

/// Everything the desired state is computed from. Sources (the static file, Kubernetes, xDS)
/// each contribute workloads; the global switch is on unless a source turns it off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    pub enabled: bool,
    pub scope: Scope,
    /// Istio's capture configuration (the static file's, or learned from xDS).
    pub capture: Capture,
    pub workloads: Vec<WorkloadSpec>,
    pub tuning: Tuning,
}

/// The kernel config for a scope and a capture configuration.
pub fn kernel_config(enabled: bool, scope: Scope, capture: &Capture, tuning: Tuning) -> Config {
    let mut c = Config {
        enabled: enabled.into(),
        epoch: 0,
        scope: match scope {
            Scope::Mesh => SCOPE_MESH,
            Scope::All => SCOPE_ALL,
        },
        outbound_port: capture.outbound_port.into(),
        inbound_port: capture.inbound_port.into(),
        passthrough_v4_be: 0,
        passthrough_v6_be: [0; 4],
        queue_limit: tuning.max_unread_bytes,
        keepalive_secs: tuning.keepalive_secs,
        small_write_secs: tuning.small_write_secs,
        proxy_uid: capture.proxy_uid,
    };
    for a in &capture.passthrough_addresses {
        match a {
            std::net::IpAddr::V4(v4) => c.passthrough_v4_be = u32::from_ne_bytes(v4.octets()),
            std::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                for (i, w) in c.passthrough_v6_be.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
            }
        }
    }
    c
}

impl Inputs {
    /// The static workloads file's contribution.
    pub fn from_static(file: &WorkloadsFile) -> Self {
        Self {
            enabled: file.enabled,
            scope: file.scope,
            capture: file.capture.clone(),
            workloads: file
                .workloads
                .iter()
                .map(|w| WorkloadSpec {
                    id: w.id(),
                    netns: NetnsRef::Path(w.netns.clone()),
                    enabled: w.enabled,
                    exclude_inbound_ports: w.exclude_inbound_ports.clone(),
                    exclude_outbound_ports: w.exclude_outbound_ports.clone(),
                    app_sockets: w.app_sockets,
                })
                .collect(),
            tuning: Tuning::default(),
        }
    }
}

/// The desired map contents. `cookie_of` resolves a netns path (the only side effect, passed in
/// so this stays a pure function under test). A netns claimed by two workloads is an error
/// naming both.
pub fn compute(
    inputs: &Inputs,
    mut cookie_of: impl FnMut(&Path) -> std::io::Result<u64>,
) -> Result<DesiredState> {
    let mut out = DesiredState {
        enabled: inputs.enabled,
        config: kernel_config(inputs.enabled, inputs.scope, &inputs.capture, inputs.tuning),
        ..Default::default()
    };
    for w in &inputs.workloads {
        let cookie = match &w.netns {
            NetnsRef::Cookie(c) => *c,
            NetnsRef::Path(p) => cookie_of(p).map_err(|e| Error::Netns {
                entry: w.id.clone(),
                netns: p.clone(),
                message: e.to_string(),
            })?,
        };
        if let Some(other) = out.names.insert(cookie, w.id.clone()) {
            return Err(Error::Netns {
                entry: w.id.clone(),
                netns: match &w.netns {
                    NetnsRef::Path(p) => p.clone(),
                    NetnsRef::Cookie(c) => format!("cookie:{c}").into(),
                },
                message: format!("is the same network namespace as {other}'s"),
            });
        }
        if let NetnsRef::Path(p) = &w.netns {
            out.netns_paths.insert(cookie, p.clone());
        }
        if !w.enabled {
            continue;
        }
        out.workloads.insert(
            cookie,
            WorkloadPolicy {
                flags: POLICY_ENABLED
                    | match w.app_sockets {
                        AppSockets::Auto => 0,
                        AppSockets::Trusted => POLICY_TRUST_APPS,
                    },
                workload_id: workload_id(&w.id),
            },
        );
        for &p in &w.exclude_inbound_ports {
            out.excluded_ports
                .insert(PortKey::new(cookie, p, DIR_INBOUND));
        }
        for &p in &w.exclude_outbound_ports {
            out.excluded_ports
                .insert(PortKey::new(cookie, p, DIR_OUTBOUND));
        }
    }
    Ok(out)
}

/// Desired state from the static workloads file alone.
pub fn from_static(
    file: &WorkloadsFile,
    cookie_of: impl FnMut(&Path) -> std::io::Result<u64>,
) -> Result<DesiredState> {
    compute(&Inputs::from_static(file), cookie_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> WorkloadsFile {
        WorkloadsFile::parse(Path::new("t.yaml"), text).unwrap()
    }

    fn cookies(p: &Path) -> std::io::Result<u64> {
        match p.to_str().unwrap() {
            "/ns/a" => Ok(11),
            "/ns/b" => Ok(22),
            "/ns/b-again" => Ok(22),
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            yaml: &'static str,
            enabled: bool,
            workloads: &'static [u64],
            ports: &'static [(u64, u16, u8)],
        }
        let cases = [
            Case {
                name: "empty",
                yaml: "",
                enabled: true,
                workloads: &[],
                ports: &[],
            },
            Case {
                name: "two enabled, one excludes ports",
                yaml: "workloads:\n- {name: a, netns: /ns/a, excludeInboundPorts: [8080], excludeOutboundPorts: [5432]}\n- {name: b, netns: /ns/b}\n",
                enabled: true,
                workloads: &[11, 22],
                ports: &[(11, 8080, DIR_INBOUND), (11, 5432, DIR_OUTBOUND)],
            },
            Case {
                name: "disabled workload has no entries at all",
                yaml: "workloads:\n- {name: a, netns: /ns/a, enabled: false, excludeInboundPorts: [1]}\n- {name: b, netns: /ns/b}\n",
                enabled: true,
                workloads: &[22],
                ports: &[],
            },
            Case {
                name: "global switch off keeps the workloads",
                yaml: "enabled: false\nworkloads:\n- {name: a, netns: /ns/a}\n",
                enabled: false,
                workloads: &[11],
                ports: &[],
            },
        ];
        for c in cases {
            let d =
                from_static(&file(c.yaml), cookies).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(d.enabled, c.enabled, "{}", c.name);
            assert_eq!(
                d.workloads.keys().copied().collect::<Vec<_>>(),
                c.workloads,
                "{}",
                c.name
            );
            let ports: BTreeSet<PortKey> = c
                .ports
                .iter()
                .map(|&(n, p, d)| PortKey::new(n, p, d))
                .collect();
            assert_eq!(d.excluded_ports, ports, "{}", c.name);
            assert!(
                d.workloads.values().all(|p| p.flags == POLICY_ENABLED),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn missing_or_shared_netns_names_the_entry() {
        let e = from_static(
            &file("workloads:\n- {name: gone, namespace: ns1, netns: /ns/missing}\n"),
            cookies,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ns1/gone") && e.contains("/ns/missing"), "{e}");
        let e = from_static(
            &file("workloads:\n- {name: b, netns: /ns/b}\n- {name: c, netns: /ns/b-again}\n"),
            cookies,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("default/c") && e.contains("default/b"), "{e}");
    }

    /// Pinned values, not the function against itself: a changed id would show other names
    /// for the workloads an earlier agent wrote (the ids live in the pinned maps).
    #[test]
    fn workload_ids_are_fnv1a_32() {
        // The FNV-1a 32-bit test vectors of the FNV reference (draft-eastlake-fnv).
        assert_eq!(workload_id(""), 0x811c_9dc5);
        assert_eq!(workload_id("a"), 0xe40c_292c);
        assert_eq!(workload_id("foobar"), 0xbf9c_f968);
        // Names as the agent writes them (computed independently, in Python).
        assert_eq!(workload_id("bookinfo/reviews-v1"), 0x4e8f_b2f8);
        assert_eq!(workload_id("a/b"), 0x3a8e_75c1);
        assert_eq!(workload_id("a/c"), 0x398e_742e);
    }
}
