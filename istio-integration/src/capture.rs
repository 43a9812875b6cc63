//! Istio's sidecar capture rules (REDIRECT mode), as istio-cni renders them for a pod: the `nat`
//! table in iptables-restore syntax. Defaults are Istio's; the fields map to Istio's pod
//! annotations (`traffic.sidecar.istio.io/*`).
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
}
