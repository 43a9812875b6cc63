//! Arbitrary text as the workloads file: parsed and validated without a panic; an error names
//! the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshaccel::workloads::WorkloadsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/fuzz/workloads.yaml");
    if let Err(e) = WorkloadsFile::parse(path, text) {
        assert!(e.to_string().contains("/fuzz/workloads.yaml"), "{e}");
    }
});
