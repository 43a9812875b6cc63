//! Least privilege: the agent does its whole job with only the capabilities the Helm chart
//! grants (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON), and says clearly what is missing
//! when one of them is taken away.
mod support;

use meshaccel_e2e::{
    Mesh,
    accel::{Accel, Workload},
    require_root,
};
use support::*;

/// The capabilities `charts/meshaccel` adds to the agent's container (nothing else is granted).
const CHART_CAPS: [&str; 4] = ["bpf", "net_admin", "sys_admin", "perfmon"];

fn setpriv(caps: &[&str]) -> Vec<String> {
    let set = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--bounding-set",
        &set,
        "--inh-caps",
        "-all",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// With exactly the chart's capabilities, and even with CAP_SYS_ADMIN alone, the agent installs,
/// attaches and accelerates the three Istio legs.
#[test]
fn agent_accelerates_with_only_the_charts_capabilities() {
    require_root();
    for caps in [&CHART_CAPS[..], &["sys_admin"]] {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh_pod(&mut mesh, "a");
        let b = mesh_pod(&mut mesh, "b");
        let launcher = setpriv(caps);
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        let (accel, started) =
            Accel::start_launched(&mesh, &[Workload::on(&a), Workload::on(&b)], &launcher);
        started
            .unwrap_or_else(|e| panic!("caps {caps:?}: {e:#}\nagent log:\n{}", accel.agent_log()));
        let target = format!("{}:8080", b.ip);
        sink(&mut mesh, &b, &target);
        let c0 = counters(&accel);
        finished(
            send(&mut mesh, &a, &["--connect", &target, "--bytes", "8000000"]),
            "least privilege",
        );
        let c1 = counters(&accel);
        assert_eq!(delta(&c1, &c0, "inserted"), 6, "caps {caps:?}: {c1}");
        assert!(
            delta(&c1, &c0, "redirect_bytes") >= 3 * 8_000_000,
            "caps {caps:?}: {c1}"
        );
    }
}

/// CAP_SYS_ADMIN is the one the agent cannot do without (mounting its bpffs, entering pod
/// network namespaces). The kernel lets it stand in for CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
/// (`bpf_capable()`, `bpf_net_capable()`), so dropping one of those alone changes nothing.
#[test]
fn agent_without_a_needed_capability_fails_clearly() {
    require_root();
    let missing = "sys_admin";
    let mut mesh = Mesh::new().expect("mesh");
    let a = mesh_pod(&mut mesh, "a");
    let caps: Vec<&str> = CHART_CAPS.into_iter().filter(|c| *c != missing).collect();
    let launcher = setpriv(&caps);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let (mut accel, started) = Accel::start_launched(&mesh, &[Workload::on(&a)], &launcher);
    assert!(
        started.is_err(),
        "without CAP_{missing} the agent must not run"
    );
    let log = accel.agent_log();
    assert!(
        accel.agent_exit().is_some_and(|s| !s.success()),
        "without CAP_{missing} the agent exits with an error:\n{log}"
    );
    assert!(
        log.contains("Error:") && log.to_lowercase().contains("not permitted"),
        "without CAP_{missing} the error says what was refused:\n{log}"
    );
}
