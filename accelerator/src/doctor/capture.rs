//! Istio's capture rules in a pod's network namespace (`--netns`: its `iptables-save`, read by
//! istio-integration's parser), and whether meshaccel's maps enable its workload.
use std::{fs::File, io, os::fd::AsRawFd as _, path::Path, process::Command};

use istio_integration::capture::parse_iptables_save;

use super::{Check, Level};
use crate::dataplane::Dataplane;

/// `iptables-save` of every backend present, run inside the netns at `path`.
fn iptables_save_in(path: &Path) -> io::Result<String> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; the thread ends right after. Children spawned
            // from it start in this netns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut all = String::new();
            let mut ran = false;
            for tool in ["iptables-legacy-save", "iptables-nft-save", "iptables-save"] {
                if ran && tool == "iptables-save" {
                    break;
                }
                if let Ok(out) = Command::new(tool).output()
                    && out.status.success()
                {
                    ran = true;
                    all.push_str(&String::from_utf8_lossy(&out.stdout));
                }
            }
            if ran {
                Ok(all)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no iptables-save found (install iptables)",
                ))
            }
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

pub(super) fn istio_capture(ns: &Path, bpffs: &Path) -> Vec<Check> {
    let name = format!("istio capture {}", ns.display());
    let mut out = Vec::new();
    let save = match iptables_save_in(ns) {
        Ok(s) => s,
        Err(e) => {
            out.push(
                Check::new(&name, Level::Fail, format!("cannot read the rules there: {e}"))
                    .fix("pass a network namespace file: /proc/PID/ns/net of a process of the pod, or /run/netns/NAME"),
            );
            return out;
        }
    };
    if let Some(c) = parse_iptables_save(&save) {
        let port = |p: Option<u16>| p.map_or("?".to_string(), |p| p.to_string());
        let detail = format!(
            "outbound → {}{}, inbound → {}{} ({}), proxy uid {}",
            port(c.proxy_port()),
            if c.config.captures_outbound() {
                ""
            } else {
                " (not applied to any traffic)"
            },
            port(c.inbound_capture_port()),
            if c.config.captures_inbound() {
                ""
            } else {
                " (not applied to any traffic)"
            },
            if c.tproxy { "TPROXY" } else { "REDIRECT" },
            c.proxy_uid().map_or("?".to_string(), |u| u.to_string()),
        );
        let level = if c.proxy_port().is_some() && c.inbound_capture_port().is_some() {
            Level::Ok
        } else {
            Level::Warn
        };
        out.push(Check::new(&name, level, format!("Istio capture: {detail}")));
    } else {
        out.push(
            Check::new(
                &name,
                Level::Warn,
                "no ISTIO_* chains: this pod has no sidecar capture (istio-init / istio-cni did not run, or it has no sidecar)",
            )
            .fix("label its namespace for injection (`istio-injection=enabled` or `istio.io/rev`) and restart the pod; meshaccel still pairs its other local connections when its workload is enabled"),
        );
    }
    // Is the pod's workload enabled in meshaccel's maps?
    if let (Ok(cookie), Ok(dp)) = (crate::netns::cookie_of_path(ns), Dataplane::open(bpffs)) {
        let on = dp.workload(cookie).is_some();
        out.push(Check::new(
            format!("workload {}", ns.display()),
            Level::Info,
            format!(
                "netns cookie {cookie}: acceleration {} for it in meshaccel's maps",
                if on { "enabled" } else { "not enabled" }
            ),
        ));
    }
    out
}
