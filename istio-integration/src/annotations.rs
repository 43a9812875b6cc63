//! Istio's per-pod traffic annotations and sidecar capture flags, parsed and validated the way
//! Istio's injector (`pkg/kube/inject/validate.go`) and `istio-iptables` read them.
//!
//! A value Istio would reject is an [`AnnotationError`] naming the annotation, its value and why:
//! the caller treats that pod as not accelerated (its capture is unknown), never as "default".
use std::{collections::BTreeMap, net::IpAddr};

/// Set by the injector on every injected pod (JSON naming the injected containers).
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// `REDIRECT` (default), `TPROXY` or `NONE`.
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// The name of the injected sidecar container.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// meshaccel's own pod annotation: how the pod's apps read their sockets, `auto` (default:
/// meshaccel finds out) or `trusted` (non-blocking reads only: app sockets accelerated like
/// the sidecar's).
pub const APP_SOCKETS: &str = "meshaccel.io/app-sockets";
/// The name of the injected init container that installs the capture rules (absent with
/// istio-cni).
pub const INIT_CONTAINER: &str = "istio-init";
/// istio-init's arguments as Istio 1.2x's injector writes them (REDIRECT mode, defaults).
pub const INJECTOR_INIT_ARGS: [&str; 17] = [
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// A pod annotation (or capture flag) Istio would reject.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}={value:?}: {message}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub message: String,
}

fn err(key: &str, value: &str, message: impl Into<String>) -> AnnotationError {
    AnnotationError {
        key: key.into(),
        value: value.into(),
        message: message.into(),
    }
}

/// How the sidecar's capture rules steer traffic into Envoy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InterceptionMode {
    #[default]
    Redirect,
    Tproxy,
    /// No capture rules at all: the app talks to Envoy explicitly (or not at all).
    None,
}

/// A set of ports that may be the wildcard `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PortSet {
    /// `*` (and Istio's default for includeInboundPorts).
    #[default]
    All,
    /// The listed ports only; empty = none.
    Only(Vec<u16>),
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::All => true,
            PortSet::Only(p) => p.contains(&port),
        }
    }
}

/// An IP prefix (`10.0.0.0/8`, `fd00::/8`); the address has its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bytes: &[u8], prefix: u8) -> Vec<u8> {
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let bits = (prefix as usize).saturating_sub(8 * i).min(8) as u32;
                    b & (0xffu16 << (8 - bits)) as u8
                })
                .collect()
        }
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                masked(&a.octets(), self.prefix) == masked(&b.octets(), self.prefix)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                masked(&a.octets(), self.prefix) == masked(&b.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is no CIDR (address/prefix)"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is no IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{p:?} is no prefix length (0-{max})"))?;
        let addr = match addr {
            IpAddr::V4(v) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix)
                };
                IpAddr::from((u32::from(v) & m).to_be_bytes())
            }
            IpAddr::V6(v) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                IpAddr::from((u128::from(v) & m).to_be_bytes())
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

/// IP ranges that may be the wildcard `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum IpRanges {
    #[default]
    All,
    Only(Vec<Cidr>),
}

/// Istio's traffic annotations of one pod, defaults filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficAnnotations {
    pub interception_mode: InterceptionMode,
    pub exclude_inbound_ports: Vec<u16>,
    /// Inbound ports captured into the sidecar (`*` by default).
    pub include_inbound_ports: PortSet,
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound ports captured even outside the included IP ranges.
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ip_ranges: Vec<Cidr>,
    /// Outbound destinations captured into the sidecar (`*` by default).
    pub include_outbound_ip_ranges: IpRanges,
}

/// A comma-separated port list; empty (or only blanks) = no ports. Ports are 1-65535.
fn ports(key: &str, value: &str) -> Result<Vec<u16>, AnnotationError> {
    let mut out = Vec::new();
    for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n != 0 => {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
            _ => return Err(err(key, value, format!("{p:?} is no port (1-65535)"))),
        }
    }
    Ok(out)
}

fn port_set(key: &str, value: &str) -> Result<PortSet, AnnotationError> {
    if value.trim() == "*" {
        return Ok(PortSet::All);
    }
    ports(key, value).map(PortSet::Only)
}

fn cidrs(key: &str, value: &str) -> Result<Vec<Cidr>, AnnotationError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<Cidr>().map_err(|m| err(key, value, m)))
        .collect()
}

impl TrafficAnnotations {
    /// Reads the annotations of one pod. Unknown `*.istio.io` keys are ignored (they are not
    /// about capture); a known key with a value Istio would reject is an error.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, AnnotationError> {
        let mut t = TrafficAnnotations::default();
        let get = |k: &str| annotations.get(k).map(String::as_str);
        if let Some(v) = get(INTERCEPTION_MODE) {
            t.interception_mode = match v {
                "REDIRECT" => InterceptionMode::Redirect,
                "TPROXY" => InterceptionMode::Tproxy,
                "NONE" => InterceptionMode::None,
                _ => {
                    return Err(err(
                        INTERCEPTION_MODE,
                        v,
                        "must be REDIRECT, TPROXY or NONE",
                    ));
                }
            };
        }
        if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
            t.exclude_inbound_ports = ports(EXCLUDE_INBOUND_PORTS, v)?;
        }
        if let Some(v) = get(INCLUDE_INBOUND_PORTS) {
            t.include_inbound_ports = port_set(INCLUDE_INBOUND_PORTS, v)?;
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
            t.exclude_outbound_ports = ports(EXCLUDE_OUTBOUND_PORTS, v)?;
        }
        if let Some(v) = get(INCLUDE_OUTBOUND_PORTS) {
            t.include_outbound_ports = ports(INCLUDE_OUTBOUND_PORTS, v)?;
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
            t.exclude_outbound_ip_ranges = cidrs(EXCLUDE_OUTBOUND_IP_RANGES, v)?;
        }
        if let Some(v) = get(INCLUDE_OUTBOUND_IP_RANGES) {
            t.include_outbound_ip_ranges = if v.trim() == "*" {
                IpRanges::All
            } else {
                IpRanges::Only(cidrs(INCLUDE_OUTBOUND_IP_RANGES, v)?)
            };
        }
        Ok(t)
    }

    /// Whether Istio captures inbound traffic to `port` into the sidecar.
    pub fn captures_inbound(&self, port: u16) -> bool {
        self.interception_mode != InterceptionMode::None
            && self.include_inbound_ports.contains(port)
            && !self.exclude_inbound_ports.contains(&port)
    }

    /// Whether Istio captures outbound traffic to `ip:port` into the sidecar (istio-iptables:
    /// excluded ports and ranges first, then included ports, then included ranges).
    pub fn captures_outbound(&self, ip: IpAddr, port: u16) -> bool {
        if self.interception_mode == InterceptionMode::None
            || self.exclude_outbound_ports.contains(&port)
            || self
                .exclude_outbound_ip_ranges
                .iter()
                .any(|c| c.contains(ip))
        {
            return false;
        }
        if self.include_outbound_ports.contains(&port) {
            return true;
        }
        match &self.include_outbound_ip_ranges {
            IpRanges::All => true,
            IpRanges::Only(r) => r.iter().any(|c| c.contains(ip)),
        }
    }
}

/// Capture settings of one sidecar: the ports Envoy's capture listeners use and the proxy's UID,
/// as the `istio-init` container's `istio-iptables` arguments or the `istio-proxy` container's
/// `runAsUser` say. `None` = not set there (Istio's defaults apply).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureFlags {
    /// `-p` / `--proxy-port` (virtualOutbound, 15001).
    pub outbound_port: Option<u16>,
    /// `-z` / `--inbound-capture-port` (virtualInbound, 15006).
    pub inbound_port: Option<u16>,
    /// `-u` / `--proxy-uid` (1337).
    pub proxy_uid: Option<u32>,
}

impl CaptureFlags {
    /// Reads `istio-iptables` arguments (`istio-init`'s `args`, the program name included or
    /// not); other flags are ignored.
    pub fn parse_istio_iptables(args: &[String]) -> Result<Self, AnnotationError> {
        let mut out = CaptureFlags::default();
        let key = "istio-init args";
        let mut it = args.iter().map(String::as_str);
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with('-') => (f, Some(v)),
                _ => (a, None),
            };
            let which = match flag {
                "-p" | "--proxy-port" => 0,
                "-z" | "--inbound-capture-port" => 1,
                "-u" | "--proxy-uid" => 2,
                _ => continue,
            };
            let v = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| err(key, a, format!("{flag} has no value")))?,
            };
            let bad = || err(key, v, format!("{flag} wants a number"));
            match which {
                0 => out.outbound_port = Some(v.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?),
                1 => out.inbound_port = Some(v.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?),
                _ => out.proxy_uid = Some(v.parse().map_err(|_| bad())?),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_absent() {
        let t = TrafficAnnotations::parse(&ann(&[])).unwrap();
        assert_eq!(t, TrafficAnnotations::default());
        assert!(t.captures_inbound(8080));
        assert!(t.captures_outbound("10.1.2.3".parse().unwrap(), 80));
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            ann: &'static [(&'static str, &'static str)],
            check: fn(&TrafficAnnotations) -> bool,
        }
        let cases = [
            Case {
                name: "port lists with blanks and duplicates",
                ann: &[
                    (EXCLUDE_INBOUND_PORTS, " 15020, 8080,8080 "),
                    (EXCLUDE_OUTBOUND_PORTS, "5432"),
                ],
                check: |t| {
                    t.exclude_inbound_ports == [15020, 8080]
                        && t.exclude_outbound_ports == [5432]
                        && !t.captures_inbound(8080)
                        && t.captures_inbound(9090)
                        && !t.captures_outbound("10.0.0.1".parse().unwrap(), 5432)
                },
            },
            Case {
                name: "empty lists are valid and mean none",
                ann: &[(EXCLUDE_INBOUND_PORTS, ""), (INCLUDE_INBOUND_PORTS, "")],
                check: |t| {
                    t.exclude_inbound_ports.is_empty()
                        && t.include_inbound_ports == PortSet::Only(vec![])
                        && !t.captures_inbound(80)
                },
            },
            Case {
                name: "include inbound list",
                ann: &[(INCLUDE_INBOUND_PORTS, "8080,9090")],
                check: |t| t.captures_inbound(8080) && !t.captures_inbound(7070),
            },
            Case {
                name: "wildcards",
                ann: &[
                    (INCLUDE_INBOUND_PORTS, "*"),
                    (INCLUDE_OUTBOUND_IP_RANGES, "*"),
                ],
                check: |t| {
                    t.include_inbound_ports == PortSet::All
                        && t.include_outbound_ip_ranges == IpRanges::All
                },
            },
            Case {
                name: "ip ranges: exclude wins, include narrows, include ports widen",
                ann: &[
                    (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8, fd00::/8"),
                    (EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.7/16"),
                    (INCLUDE_OUTBOUND_PORTS, "443"),
                ],
                check: |t| {
                    let c = |ip: &str, p| t.captures_outbound(ip.parse().unwrap(), p);
                    c("10.1.0.1", 80)
                        && c("fd00::1", 80)
                        && !c("10.96.3.3", 80)
                        && !c("192.168.0.1", 80)
                        && c("192.168.0.1", 443)
                        && t.exclude_outbound_ip_ranges[0].addr
                            == "10.96.0.0".parse::<IpAddr>().unwrap()
                },
            },
            Case {
                name: "interception modes",
                ann: &[(INTERCEPTION_MODE, "NONE")],
                check: |t| {
                    t.interception_mode == InterceptionMode::None
                        && !t.captures_inbound(80)
                        && !t.captures_outbound("10.0.0.1".parse().unwrap(), 80)
                },
            },
            Case {
                name: "tproxy",
                ann: &[(INTERCEPTION_MODE, "TPROXY")],
                check: |t| t.interception_mode == InterceptionMode::Tproxy,
            },
        ];
        for c in cases {
            let t = TrafficAnnotations::parse(&ann(c.ann))
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert!((c.check)(&t), "{}: {t:?}", c.name);
        }
    }

    #[test]
    fn malformed_values_name_key_and_value() {
        for (k, v, needle) in [
            (EXCLUDE_INBOUND_PORTS, "80,http", "\"http\""),
            (EXCLUDE_OUTBOUND_PORTS, "70000", "70000"),
            (INCLUDE_INBOUND_PORTS, "0", "\"0\""),
            (INCLUDE_INBOUND_PORTS, "*,80", "\"*\""),
            (EXCLUDE_OUTBOUND_IP_RANGES, "*", "no CIDR"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "prefix"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0/8", "no IP address"),
            (INTERCEPTION_MODE, "redirect", "REDIRECT, TPROXY or NONE"),
        ] {
            let e = TrafficAnnotations::parse(&ann(&[(k, v)])).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_str()), (k, v));
            let s = e.to_string();
            assert!(s.contains(k) && s.contains(needle), "{s}");
        }
    }

    #[test]
    fn istio_init_args() {
        let args: Vec<String> = INJECTOR_INIT_ARGS
            .iter()
            .chain(&["--log_output_level=default:info"])
            .map(|a| a.to_string())
            .collect();
        let f = CaptureFlags::parse_istio_iptables(&args).unwrap();
        assert_eq!(
            f,
            CaptureFlags {
                outbound_port: Some(15001),
                inbound_port: Some(15006),
                proxy_uid: Some(1337)
            }
        );
        let f = CaptureFlags::parse_istio_iptables(
            &["--proxy-uid=2000", "--inbound-capture-port=15106"].map(String::from),
        )
        .unwrap();
        assert_eq!(
            (f.outbound_port, f.inbound_port, f.proxy_uid),
            (None, Some(15106), Some(2000))
        );
        assert!(CaptureFlags::parse_istio_iptables(&["-u".into()]).is_err());
        assert!(CaptureFlags::parse_istio_iptables(&["-p".into(), "x".into()]).is_err());
    }
}
