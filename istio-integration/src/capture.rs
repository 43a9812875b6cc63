//! Istio's sidecar capture rules (REDIRECT mode), as istio-cni renders them for a pod: the `nat`
//! table in iptables-restore syntax. Defaults are Istio's; the fields map to Istio's pod
//! annotations (`traffic.sidecar.istio.io/*`). The same [`CaptureConfig`] is read back from a
//! pod's `iptables-save` output by [`parse_iptables_save`] (`meshaccel doctor --netns`).
/// Which inbound ports are captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: every port except the excluded ones (Istio's default).
    All,
    /// Only these ports (`includeInboundPorts`); the exclusions are then not emitted.
    Only(Vec<u16>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Envoy's outbound capture port (`virtualOutbound`).
    pub proxy_port: u16,
    /// Envoy's inbound capture port (`virtualInbound`).
    pub inbound_capture_port: u16,
    /// The HBONE tunnel port, never captured.
    pub tunnel_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_ports: InboundPorts,
    /// `excludeInboundPorts` (Istio adds its own status/metrics ports by default).
    pub exclude_inbound_ports: Vec<u16>,
    /// `excludeOutboundPorts` (default: the agent's status port 15020).
    pub exclude_outbound_ports: Vec<u16>,
    /// `includeOutboundIPRanges`; `None` = `*`.
    pub include_outbound_cidrs: Option<Vec<String>>,
    /// `excludeOutboundIPRanges`.
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            tunnel_port: 15008,
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![15020, 15021, 15090],
            exclude_outbound_ports: vec![15020],
            include_outbound_cidrs: None,
            exclude_outbound_cidrs: vec![],
        }
    }
}

impl CaptureConfig {
    /// Whether an included outbound range covers loopback (then app traffic to 127.x is captured
    /// too, and Istio drops its "loopback traffic of apps returns" rules).
    fn captures_loopback(&self) -> bool {
        self.include_outbound_cidrs
            .as_ref()
            .is_some_and(|c| c.iter().any(|r| r.starts_with("127.")))
    }

    /// The `nat` table as istio-cni writes it (iptables-restore input).
    pub fn render_nat(&self) -> String {
        let mut r = String::from("* nat\n");
        let mut add = |line: String| {
            r.push_str(&line);
            r.push('\n');
        };
        for chain in [
            "ISTIO_INBOUND",
            "ISTIO_REDIRECT",
            "ISTIO_IN_REDIRECT",
            "ISTIO_OUTPUT",
        ] {
            add(format!("-N {chain}"));
        }
        add(format!(
            "-A ISTIO_INBOUND -p tcp --dport {} -j RETURN",
            self.tunnel_port
        ));
        add(format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.proxy_port
        ));
        add(format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_capture_port
        ));
        add("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
        match &self.inbound_ports {
            InboundPorts::All => {
                for p in &self.exclude_inbound_ports {
                    add(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
                }
                add("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
            }
            InboundPorts::Only(ports) => {
                for p in ports {
                    add(format!(
                        "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"
                    ));
                }
            }
        }
        add("-A OUTPUT -j ISTIO_OUTPUT".into());
        for p in &self.exclude_outbound_ports {
            add(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
            add(format!("-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN"));
        }
        add("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into());
        let loopback = self.captures_loopback();
        for (kind, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            add(format!(
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport {} -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT",
                self.tunnel_port
            ));
            if !loopback {
                add(format!(
                    "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
                ));
            }
            add(format!(
                "-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"
            ));
        }
        add("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
        for c in &self.exclude_outbound_cidrs {
            add(format!("-A ISTIO_OUTPUT -d {c} -j RETURN"));
        }
        match &self.include_outbound_cidrs {
            None => add("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into()),
            Some(cidrs) => {
                for c in cidrs {
                    add(format!("-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT"));
                }
            }
        }
        r.push_str("COMMIT\n");
        r
    }

    /// Outbound traffic is sent to Envoy: `ISTIO_OUTPUT` jumps to `ISTIO_REDIRECT` for some
    /// destination (an empty include list declares the capture and applies it to nothing).
    pub fn captures_outbound(&self) -> bool {
        self.include_outbound_cidrs
            .as_ref()
            .is_none_or(|c| !c.is_empty())
    }

    /// Inbound traffic is sent to Envoy: `ISTIO_INBOUND` jumps to its redirect for some port.
    pub fn captures_inbound(&self) -> bool {
        self.inbound_ports != InboundPorts::Only(vec![])
    }
}

/// Istio's capture read back from a pod's rules by [`parse_iptables_save`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedCapture {
    /// The capture the rules carry. A port or the proxy uid that no rule states keeps Istio's
    /// default (the accessors below tell); a list no rule adds to is empty.
    pub config: CaptureConfig,
    /// Inbound traffic is captured with TPROXY (`ISTIO_TPROXY`, in the `mangle` table, which
    /// [`CaptureConfig::render_nat`] does not write) rather than REDIRECT.
    pub tproxy: bool,
    named: Named,
}

/// Which of the config's values a rule states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Named {
    proxy_port: bool,
    inbound_capture_port: bool,
    proxy_uid: bool,
}

impl SavedCapture {
    /// `ISTIO_REDIRECT`'s `--to-ports` (Envoy's virtualOutbound).
    pub fn proxy_port(&self) -> Option<u16> {
        self.named.proxy_port.then_some(self.config.proxy_port)
    }

    /// `ISTIO_IN_REDIRECT`'s `--to-ports`, or `ISTIO_TPROXY`'s `--on-port` (virtualInbound).
    pub fn inbound_capture_port(&self) -> Option<u16> {
        self.named
            .inbound_capture_port
            .then_some(self.config.inbound_capture_port)
    }

    /// The proxy's uid (`-m owner --uid-owner N -j RETURN` in `ISTIO_OUTPUT`).
    pub fn proxy_uid(&self) -> Option<u32> {
        self.named.proxy_uid.then_some(self.config.proxy_uid)
    }
}

/// Reads Istio's capture back from `iptables-save` output (all tables; chains declared by `-N` or
/// `:` lines); `None` when it has no ISTIO_* chain. It reads what [`CaptureConfig::render_nat`]
/// writes, and TPROXY's inbound capture; rules the config does not model (an outbound port
/// include, DNS capture) are passed over.
pub fn parse_iptables_save(save: &str) -> Option<SavedCapture> {
    let mut chains = false;
    let (mut proxy_port, mut inbound_port, mut tunnel_port) = (None, None, None);
    let (mut proxy_uid, mut proxy_gid) = (None, None);
    let mut tproxy = false;
    let (mut inbound_all, mut inbound_only) = (false, Vec::new());
    let (mut outbound_all, mut outbound_only) = (false, Vec::new());
    let mut exclude_inbound_ports = Vec::new();
    let mut exclude_outbound_ports = Vec::new();
    let mut exclude_outbound_cidrs = Vec::new();
    for line in save.lines() {
        let line = line.trim();
        if line.starts_with("-N ISTIO_") || line.starts_with(":ISTIO_") {
            chains = true;
        }
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 2 || (words[0] != "-A" && words[0] != "-I") {
            continue;
        }
        // iptables-save names the protocol's match module (`-p tcp -m tcp --dport 80`); the
        // rules as Istio writes them do not.
        while let Some(i) = words
            .windows(2)
            .position(|w| w[0] == "-m" && (w[1] == "tcp" || w[1] == "udp"))
        {
            words.drain(i..i + 2);
        }
        let chain = words[1];
        match (chain, after(&words, "-j")) {
            ("ISTIO_REDIRECT", Some("REDIRECT")) => {
                proxy_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_IN_REDIRECT", Some("REDIRECT")) => {
                inbound_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_TPROXY", Some("TPROXY")) => {
                tproxy = true;
                inbound_port = after(&words, "--on-port").and_then(|p| p.parse().ok());
            }
            ("ISTIO_OUTPUT", Some("ISTIO_REDIRECT")) => match unnegated(&words, "-d") {
                Some(cidr) => outbound_only.push(cidr.to_string()),
                None => outbound_all = true,
            },
            ("ISTIO_INBOUND", Some("ISTIO_IN_REDIRECT" | "ISTIO_TPROXY")) => {
                match unnegated(&words, "--dport").and_then(|p| p.parse().ok()) {
                    Some(port) => inbound_only.push(port),
                    None => inbound_all = true,
                }
            }
            ("ISTIO_INBOUND", Some("RETURN")) => {
                if let ["-p", "tcp", "--dport", port, "-j", "RETURN"] = words[2..]
                    && let Ok(port) = port.parse()
                {
                    exclude_inbound_ports.push(port);
                }
            }
            ("ISTIO_OUTPUT", Some("ISTIO_IN_REDIRECT")) => {
                // The proxy's own traffic to a pod address comes back in, except to the tunnel.
                if tunnel_port.is_none()
                    && let Some(i) = words.iter().position(|w| *w == "--dport")
                    && words.get(i.wrapping_sub(1)) == Some(&"!")
                {
                    tunnel_port = words.get(i + 1).and_then(|p| p.parse().ok());
                }
            }
            ("ISTIO_OUTPUT", Some("RETURN")) => match words[2..] {
                ["-p", "tcp", "--dport", port, "-j", "RETURN"] => {
                    exclude_outbound_ports.extend(port.parse::<u16>().ok());
                }
                // Loopback's own address is always let through, not configured.
                ["-d", cidr, "-j", "RETURN"] if cidr != "127.0.0.1/32" => {
                    exclude_outbound_cidrs.push(cidr.to_string());
                }
                _ => {
                    if proxy_uid.is_none() {
                        proxy_uid = owner(&words, "--uid-owner");
                    }
                    if proxy_gid.is_none() {
                        proxy_gid = owner(&words, "--gid-owner");
                    }
                }
            },
            _ => {}
        }
    }
    if !chains {
        return None;
    }
    let defaults = CaptureConfig::default();
    let tunnel_port = tunnel_port.unwrap_or(defaults.tunnel_port);
    // The tunnel port's RETURN comes first in ISTIO_INBOUND; it is no configured exclusion.
    if let Some(i) = exclude_inbound_ports.iter().position(|p| *p == tunnel_port) {
        exclude_inbound_ports.remove(i);
    }
    Some(SavedCapture {
        config: CaptureConfig {
            proxy_port: proxy_port.unwrap_or(defaults.proxy_port),
            inbound_capture_port: inbound_port.unwrap_or(defaults.inbound_capture_port),
            tunnel_port,
            proxy_uid: proxy_uid.unwrap_or(defaults.proxy_uid),
            proxy_gid: proxy_gid.unwrap_or(defaults.proxy_gid),
            inbound_ports: if inbound_all {
                InboundPorts::All
            } else {
                InboundPorts::Only(inbound_only)
            },
            exclude_inbound_ports,
            exclude_outbound_ports,
            include_outbound_cidrs: (!outbound_all).then_some(outbound_only),
            exclude_outbound_cidrs,
        },
        tproxy,
        named: Named {
            proxy_port: proxy_port.is_some(),
            inbound_capture_port: inbound_port.is_some(),
            proxy_uid: proxy_uid.is_some(),
        },
    })
}

/// The word after `flag`.
fn after<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| *w == flag)?;
    words.get(i + 1).copied()
}

/// The word after `flag`, unless the match is negated (`! flag value`).
fn unnegated<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| *w == flag)?;
    if words.get(i.wrapping_sub(1)) == Some(&"!") {
        return None;
    }
    words.get(i + 1).copied()
}

/// The id of a `-m owner --uid-owner N` (or `--gid-owner`) match that is not negated.
fn owner(words: &[&str], flag: &str) -> Option<u32> {
    unnegated(words, flag).and_then(|id| id.parse().ok())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

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

    fn parse(rel: &str) -> SavedCapture {
        parse_iptables_save(&fixture(rel)).unwrap_or_else(|| panic!("{rel}: no ISTIO_* chain"))
    }

    #[test]
    fn capture_from_istio_goldens() {
        let basic = parse("istio-cni-sidecar/basic.txt.golden");
        assert_eq!(
            basic,
            SavedCapture {
                config: CaptureConfig::default(),
                tproxy: false,
                named: Named {
                    proxy_port: true,
                    inbound_capture_port: true,
                    proxy_uid: true,
                },
            }
        );
        assert_eq!(
            (
                basic.proxy_port(),
                basic.inbound_capture_port(),
                basic.proxy_uid()
            ),
            (Some(15001), Some(15006), Some(1337))
        );
        assert!(
            basic.config.captures_outbound() && basic.config.captures_inbound(),
            "{basic:?}"
        );
        let tp = parse("istio-cni-sidecar/tproxy.txt.golden");
        assert!(
            tp.tproxy && tp.config.captures_inbound() && tp.config.captures_outbound(),
            "{tp:?}"
        );
        assert_eq!(
            (tp.proxy_port(), tp.inbound_capture_port()),
            (Some(15001), Some(15006))
        );
        let uid = parse("istio-cni-sidecar/custom-uid.txt.golden");
        assert!(uid.proxy_uid().is_some_and(|u| u != 1337), "{uid:?}");
        // No include ranges: outbound capture is declared but not applied.
        let empty = parse("istio-iptables-capture/empty.golden");
        assert!(!empty.config.captures_outbound(), "{empty:?}");
        // iptables-save's own format declares chains with ':'.
        let saved = ":ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n";
        assert!(parse_iptables_save(saved).is_some());
        assert_eq!(
            parse_iptables_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }

    /// iptables-save spells out the protocol's match module; the capture reads the same.
    #[test]
    fn iptables_save_spelling_reads_the_same() {
        let rendered = CaptureConfig {
            exclude_outbound_ports: vec![5555],
            ..Default::default()
        }
        .render_nat();
        let saved = rendered
            .replace("-p tcp --dport", "-p tcp -m tcp --dport")
            .replace("-p udp --dport", "-p udp -m udp --dport");
        assert_ne!(saved, rendered);
        assert_eq!(parse_iptables_save(&saved), parse_iptables_save(&rendered));
        assert_eq!(
            parse_iptables_save(&saved).map(|s| s.config.exclude_outbound_ports),
            Some(vec![5555])
        );
    }
}
