//! Istio's capture rules in a pod's network namespace (`--netns`), and whether meshaccel's maps
//! enable its workload.
use std::{fs::File, io, os::fd::AsRawFd as _, path::Path, process::Command};

use super::{Check, Level};
use crate::dataplane::Dataplane;

/// Istio's sidecar capture as found in one netns's iptables rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Some ISTIO_* chain exists.
    pub chains: bool,
    /// `ISTIO_REDIRECT`'s `--to-ports` (Envoy's virtualOutbound).
    pub outbound_port: Option<u16>,
    /// `ISTIO_IN_REDIRECT`'s `--to-ports`, or `ISTIO_TPROXY`'s `--on-port` (virtualInbound).
    pub inbound_port: Option<u16>,
    /// Outbound traffic is sent to ISTIO_REDIRECT (not only declared).
    pub outbound_active: bool,
    /// Inbound traffic is sent to ISTIO_IN_REDIRECT / ISTIO_TPROXY.
    pub inbound_active: bool,
    pub tproxy: bool,
    /// The proxy's uid (`-m owner --uid-owner N -j RETURN` in ISTIO_OUTPUT).
    pub proxy_uid: Option<u32>,
}

/// Reads Istio's capture from `iptables-save` output (all tables; `-N` or `:` chain lines).
pub fn parse_capture(save: &str) -> Capture {
    let mut c = Capture::default();
    let after = |words: &[&str], flag: &str| -> Option<String> {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    for line in save.lines() {
        let line = line.trim();
        if line.starts_with("-N ISTIO_") || line.starts_with(":ISTIO_") {
            c.chains = true;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 2 || (words[0] != "-A" && words[0] != "-I") {
            continue;
        }
        let chain = words[1];
        let target = after(&words, "-j");
        match (chain, target.as_deref()) {
            ("ISTIO_REDIRECT", Some("REDIRECT")) => {
                c.outbound_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_IN_REDIRECT", Some("REDIRECT")) => {
                c.inbound_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_TPROXY", Some("TPROXY")) => {
                c.tproxy = true;
                c.inbound_port = after(&words, "--on-port").and_then(|p| p.parse().ok());
            }
            ("ISTIO_OUTPUT", Some("ISTIO_REDIRECT")) => c.outbound_active = true,
            ("ISTIO_INBOUND", Some("ISTIO_IN_REDIRECT" | "ISTIO_TPROXY")) => {
                c.inbound_active = true;
            }
            ("ISTIO_OUTPUT", Some("RETURN")) if c.proxy_uid.is_none() => {
                if let Some(i) = words.iter().position(|w| *w == "--uid-owner")
                    && words.get(i.wrapping_sub(1)) != Some(&"!")
                {
                    c.proxy_uid = words.get(i + 1).and_then(|u| u.parse().ok());
                }
            }
            _ => {}
        }
    }
    c
}

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
    let c = parse_capture(&save);
    if !c.chains {
        out.push(
            Check::new(
                &name,
                Level::Warn,
                "no ISTIO_* chains: this pod has no sidecar capture (istio-init / istio-cni did not run, or it has no sidecar)",
            )
            .fix("label its namespace for injection (`istio-injection=enabled` or `istio.io/rev`) and restart the pod; meshaccel still pairs its other local connections when its workload is enabled"),
        );
    } else {
        let port = |p: Option<u16>| p.map_or("?".to_string(), |p| p.to_string());
        let detail = format!(
            "outbound → {}{}, inbound → {}{} ({}), proxy uid {}",
            port(c.outbound_port),
            if c.outbound_active {
                ""
            } else {
                " (not applied to any traffic)"
            },
            port(c.inbound_port),
            if c.inbound_active {
                ""
            } else {
                " (not applied to any traffic)"
            },
            if c.tproxy { "TPROXY" } else { "REDIRECT" },
            c.proxy_uid.map_or("?".to_string(), |u| u.to_string()),
        );
        let level = if c.outbound_port.is_some() && c.inbound_port.is_some() {
            Level::Ok
        } else {
            Level::Warn
        };
        out.push(Check::new(&name, level, format!("Istio capture: {detail}")));
    }
    // Is the pod's workload enabled in meshaccel's maps?
    if let (Ok(cookie), Ok(dp)) = (crate::netns::cookie_of_path(ns), Dataplane::open(bpffs)) {
        let on = dp.workloads.get(&cookie, 0).is_ok();
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(rel: &str) -> String {
        let dir = std::env::var_os("MESHACCEL_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
        let p = dir.join("iptables").join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "fixture {} not found ({e}): set MESHACCEL_FIXTURES to the shared fixtures",
                p.display()
            )
        })
    }

    #[test]
    fn capture_from_istio_goldens() {
        let basic = parse_capture(&fixture("istio-cni-sidecar/basic.txt.golden"));
        assert_eq!(
            basic,
            Capture {
                chains: true,
                outbound_port: Some(15001),
                inbound_port: Some(15006),
                outbound_active: true,
                inbound_active: true,
                tproxy: false,
                proxy_uid: Some(1337),
            }
        );
        let tp = parse_capture(&fixture("istio-cni-sidecar/tproxy.txt.golden"));
        assert!(
            tp.tproxy && tp.inbound_active && tp.outbound_active,
            "{tp:?}"
        );
        assert_eq!(
            (tp.outbound_port, tp.inbound_port),
            (Some(15001), Some(15006))
        );
        let uid = parse_capture(&fixture("istio-cni-sidecar/custom-uid.txt.golden"));
        assert!(uid.proxy_uid.is_some_and(|u| u != 1337), "{uid:?}");
        // No include ranges: outbound capture is declared but not applied.
        let empty = parse_capture(&fixture("istio-iptables-capture/empty.golden"));
        assert!(empty.chains && !empty.outbound_active, "{empty:?}");
        // iptables-save's own format declares chains with ':'.
        let saved = ":ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n";
        assert!(parse_capture(saved).chains);
        assert_eq!(
            parse_capture("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            Capture::default()
        );
    }
}
