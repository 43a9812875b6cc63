//! Whether `--max-unread-bytes` bounds anything on this kernel (kernel hazard 5).
use std::path::Path;

use super::{Check, Level};

/// Whether `--max-unread-bytes` bounds anything on this kernel (kernel hazard 5): probed with a
/// loopback connection in a probe cgroup, else judged by the kernel version.
pub(super) fn queue_bound(cgroup: Option<&Path>) -> Check {
    let probed = match cgroup {
        Some(cg) => crate::queue_charge::probe(cg),
        None => Err("no cgroup v2 to probe in".into()),
    };
    queue_bound_check(&probed, &crate::queue_charge::release())
}

/// The check from the probe's result, or from the release when it could not probe (pure).
fn queue_bound_check(probed: &Result<crate::queue_charge::Probed, String>, release: &str) -> Check {
    use crate::queue_charge::{ByVersion, CHARGED_SINCE, CONSEQUENCE, Probed};
    const NAME: &str = "queue bound";
    const FIX: &str = "use Linux 6.13 or later, or a stable kernel with the backport of \"tcp_bpf: charge receive socket buffer in bpf_tcp_ingress()\"";
    let since = format!("{}.{}", CHARGED_SINCE.0, CHARGED_SINCE.1);
    match probed {
        Ok(Probed::Charged { redirected }) => Check::new(
            NAME,
            Level::Ok,
            format!(
                "redirected bytes count against the receiving socket (probed: a sender to a reader that read nothing was held on TCP after {redirected} bytes): --max-unread-bytes bounds what a stalled reader queues"
            ),
        ),
        Ok(Probed::NotCharged { redirected }) => Check::new(
            NAME,
            Level::Warn,
            format!(
                "redirected bytes do not count against the receiving socket on this kernel (probed: {redirected} bytes redirected to a reader that read none, never held): {CONSEQUENCE}"
            ),
        )
        .fix(FIX),
        Err(why) => match crate::queue_charge::judge_release(release) {
            Some(ByVersion::Charged) => Check::new(
                NAME,
                Level::Info,
                format!(
                    "not probed ({why}); Linux {release} is {since} or later, which counts redirected bytes against the receiving socket"
                ),
            ),
            Some(ByVersion::NotUnlessBackported) => Check::new(
                NAME,
                Level::Warn,
                format!(
                    "not probed ({why}); Linux {release} is older than {since}: unless it carries the backport, redirected bytes do not count against the receiving socket and {CONSEQUENCE}"
                ),
            )
            .fix(FIX),
            None => Check::new(
                NAME,
                Level::Warn,
                format!("not probed ({why}), and the kernel version {release:?} cannot be read"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_bound_probed_or_judged_by_version() {
        use crate::queue_charge::Probed;
        let c = queue_bound_check(&Ok(Probed::Charged { redirected: 65536 }), "5.10.0");
        assert_eq!(c.level, Level::Ok, "a probe beats the version: {c:?}");
        let c = queue_bound_check(&Ok(Probed::NotCharged { redirected: 262144 }), "6.18.0");
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("262144 bytes") && c.detail.contains("bounds nothing"),
            "{c:?}"
        );
        let why = Err("cannot create a probe cgroup".to_string());
        let c = queue_bound_check(&why, "6.13.2");
        assert_eq!(c.level, Level::Info, "{c:?}");
        assert!(
            c.detail
                .contains("not probed (cannot create a probe cgroup)"),
            "{c:?}"
        );
        let c = queue_bound_check(&why, "6.6.58-lts");
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("older than 6.13")
                && c.detail.contains("--max-unread-bytes bounds nothing"),
            "{c:?}"
        );
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("backport")));
        assert_eq!(queue_bound_check(&why, "??").level, Level::Warn);
    }
}
