//! The rendered capture rules equal Istio's real istio-cni goldens, byte for byte, and parsing a
//! golden gives back the config it was rendered from.
use std::path::PathBuf;

use istio_integration::capture::{CaptureConfig, InboundPorts, parse_iptables_save};

fn golden(name: &str) -> String {
    let dir = std::env::var_os("MESHACCEL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let path = dir
        .join("iptables/istio-cni-sidecar")
        .join(format!("{name}.txt.golden"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (set MESHACCEL_FIXTURES to the shared fixtures)",
            path.display()
        )
    })
}

#[track_caller]
fn same(cfg: &CaptureConfig, name: &str) {
    let ours = cfg.render_nat();
    let theirs = golden(name);
    assert!(
        ours == theirs,
        "{name}: rendered rules differ from Istio's golden\n--- ours\n{ours}--- istio\n{theirs}"
    );
}

/// The configs the goldens were rendered from, by golden.
fn include_exclude_ports() -> CaptureConfig {
    CaptureConfig {
        inbound_ports: InboundPorts::Only(vec![1111, 2222]),
        exclude_inbound_ports: vec![3333, 4444],
        exclude_outbound_ports: vec![5555, 6666],
        ..Default::default()
    }
}

fn custom_uid() -> CaptureConfig {
    CaptureConfig {
        proxy_uid: 1000670000,
        proxy_gid: 1000670001,
        ..Default::default()
    }
}

fn include_exclude_ip() -> CaptureConfig {
    CaptureConfig {
        include_outbound_cidrs: Some(vec!["127.0.0.0/8".into()]),
        exclude_outbound_cidrs: vec!["10.0.0.0/8".into()],
        ..Default::default()
    }
}

#[test]
fn default_sidecar_capture_equals_istio_basic() {
    same(&CaptureConfig::default(), "basic");
}

#[test]
fn include_inbound_and_exclude_outbound_ports_equal_istio() {
    same(&include_exclude_ports(), "include-exclude-ports");
}

#[test]
fn custom_proxy_uid_equals_istio() {
    same(&custom_uid(), "custom-uid");
}

#[test]
fn include_and_exclude_ip_ranges_equal_istio() {
    same(&include_exclude_ip(), "include-exclude-ip");
}

#[test]
fn parsing_each_golden_gives_back_its_config() {
    let ports = CaptureConfig {
        // With an include list Istio writes no inbound exclusions: the golden cannot carry them.
        exclude_inbound_ports: vec![],
        ..include_exclude_ports()
    };
    for (name, cfg) in [
        ("basic", CaptureConfig::default()),
        ("include-exclude-ports", ports),
        ("custom-uid", custom_uid()),
        ("include-exclude-ip", include_exclude_ip()),
    ] {
        let saved = parse_iptables_save(&golden(name))
            .unwrap_or_else(|| panic!("{name}: no ISTIO_* chain read"));
        assert_eq!(saved.config, cfg, "{name}");
        assert!(
            !saved.tproxy
                && saved.proxy_port().is_some()
                && saved.inbound_capture_port().is_some()
                && saved.proxy_uid().is_some(),
            "{name}: {saved:?}"
        );
    }
}
