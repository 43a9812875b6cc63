//! The cgroup v2 folder the agent attaches sock_ops to.
use std::path::{Path, PathBuf};

use super::{Check, Level};

pub(super) fn cgroup_check(given: Option<&Path>, checks: &mut Vec<Check>) -> Option<PathBuf> {
    let v1_too = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("cgroup"))
    });
    let path = match given {
        Some(p) => crate::cgroup::resolve(p),
        None => match crate::cgroup::cgroup2_root() {
            Some(p) => p,
            None => {
                checks.push(
                    Check::new("cgroup v2", Level::Fail, "no cgroup2 mount in /proc/mounts")
                        .fix("mount cgroup v2 (`mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host), or pass --cgroup"),
                );
                return None;
            }
        },
    };
    if !crate::cgroup::is_cgroup2(&path) {
        checks.push(
            Check::new(
                "cgroup v2",
                Level::Fail,
                format!("{} is not a cgroup v2 folder", path.display()),
            )
            .fix("pass --cgroup (MESHACCEL_CGROUP) a folder of the cgroup v2 hierarchy; in the Helm chart set hostPaths.cgroup to the node's cgroup v2 root"),
        );
        return None;
    }
    checks.push(Check::new(
        "cgroup v2",
        Level::Ok,
        format!(
            "{}{}",
            path.display(),
            if v1_too {
                " (hybrid host: cgroup v1 is mounted too; sock_ops uses v2)"
            } else {
                ""
            }
        ),
    ));
    Some(path)
}
