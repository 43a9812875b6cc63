//! Arbitrary pod annotations (lines `key=value`; a key without a dot gets Istio's
//! `traffic.sidecar.istio.io/` prefix, so the known keys are hit often) and istio-init
//! arguments (the same text split on whitespace): parsed without a panic.
#![no_main]

use std::collections::BTreeMap;

use istio_integration::annotations::{CaptureFlags, TrafficAnnotations};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        let k = if k.contains('.') {
            k.to_string()
        } else {
            format!("traffic.sidecar.istio.io/{k}")
        };
        annotations.insert(k, v.to_string());
    }
    if let Ok(t) = TrafficAnnotations::parse(&annotations) {
        // The queries the policy makes on a parsed value.
        let _ = t.captures_inbound(8080);
        let _ = t.captures_outbound("10.0.0.1".parse().unwrap(), 80);
        let _ = t.captures_outbound("2001:db8::1".parse().unwrap(), 443);
    }
    let args: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let _ = CaptureFlags::parse_istio_iptables(&args);
});
