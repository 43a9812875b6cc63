//! meshaccel's kernel objects as files: the eBPF object this binary carries, and where its link
//! and maps are pinned under the bpffs folder. Below everything that installs, inspects,
//! stamps, protects or probes them.
use std::path::{Path, PathBuf};

/// The eBPF object built by build.rs (loaded to install, and by `doctor` to probe the kernel).
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshaccel-ebpf"));

/// The sock_ops link's pin, under the bpffs folder.
pub(crate) const SOCK_OPS_LINK: &str = "links/sock_ops";

/// The folder of the adopting tc program's links (one pin per workload netns, named by its
/// cookie), under the bpffs folder.
pub(crate) const ADOPT_LINKS: &str = "links/adopt";

/// The pins of the adopting program's links.
pub(crate) fn adopt_link_pins(bpffs: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(bpffs.join(ADOPT_LINKS))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// A map's pin under the bpffs folder.
pub(crate) fn pin_path(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join("maps").join(name)
}
