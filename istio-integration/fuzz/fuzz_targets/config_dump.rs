//! Arbitrary JSON as an Envoy config dump: the dump translation never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = istio_integration::xds::dump::translate(&doc);
    }
});
