//! Whether this process holds the capabilities the agent needs (its effective set).
use super::{Check, Level};

/// Bits of the effective capability set (`CapEff` in /proc/self/status).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub(super) fn capabilities() -> Check {
    const FIX: &str = "run as root; in a container grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON (the Helm chart does)";
    let Some(eff) = effective_caps() else {
        return Check::new(
            "capabilities",
            Level::Warn,
            "cannot read CapEff from /proc/self/status",
        );
    };
    let has = |c: u32| eff & (1 << c) != 0;
    let missing = |caps: &[(u32, &'static str)]| -> Vec<&'static str> {
        caps.iter()
            .filter(|(c, _)| !has(*c))
            .map(|(_, n)| *n)
            .collect()
    };
    let hard = missing(&[
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]);
    let soft = missing(&[(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]);
    if !hard.is_empty() {
        Check::new(
            "capabilities",
            Level::Fail,
            format!(
                "missing {} (attaching to a cgroup and entering network namespaces need them)",
                hard.join(", ")
            ),
        )
        .fix(FIX)
    } else if !soft.is_empty() {
        Check::new(
            "capabilities",
            Level::Warn,
            format!(
                "missing {}; CAP_SYS_ADMIN stands in for them on this kernel if the probes below pass",
                soft.join(", ")
            ),
        )
        .fix(FIX)
    } else {
        Check::new(
            "capabilities",
            Level::Ok,
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_parsed() {
        let s = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let caps = parse_cap_eff(s).unwrap();
        assert!(caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(parse_cap_eff("nothing"), None);
    }
}
