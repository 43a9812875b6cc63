//! Builds the eBPF programs (bpf-progs/ebpf) with the pinned nightly (bpf-progs/TOOLCHAIN) and
//! bpf-linker into OUT_DIR. `scripts/env.sh` installs both.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow!("accelerator has no parent folder"))?;
    let pin = root.join("bpf-progs/TOOLCHAIN");
    println!("cargo:rerun-if-changed={}", pin.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("bpf-progs/common/src").display()
    );
    let toolchain = std::fs::read_to_string(&pin)
        .with_context(|| format!("reading the pinned eBPF toolchain from {}", pin.display()))?;
    let ebpf_dir = root.join("bpf-progs/ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "meshaccel-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain.trim()),
    )
    .context("building the eBPF programs: run `scripts/env.sh` first (pinned nightly + bpf-linker)")
}
