//! The local mesh used by meshaccel's tests, benchmarks and demo.
//!
//! A [`Mesh`] is one run: a "switch" network namespace holding a Linux bridge, and [`Pod`]s, each a
//! network namespace (with `eth0` on that bridge, optionally Istio's iptables rules) plus its own
//! cgroup v2 directory under the run's cgroup ([`Mesh::cgroup_root`], where the accelerator's
//! sock_ops program is attached). [`Mesh::spawn`] starts a process inside a pod's cgroup and netns,
//! optionally as another uid (Istio's proxy is 1337). Everything a run creates carries its run id,
//! and dropping the `Mesh` (also while a test panics) removes exactly that and nothing else.
//!
//! The programs run in the pods (a relay standing in for Envoy, a checksumming sink and sender,
//! an echo server and a ping-pong client, HTTP and A/B load, the soak pair) live in [`tool`], a
//! module per subcommand of this crate's `meshaccel-e2e-tool` binary. Servers print `ready` on
//! stdout once listening: see [`wait_ready`].
//!
//! Everything here needs root (see [`require_root`]).

pub mod accel;
pub mod bpf;
mod cgroup;
mod mesh;
pub mod pattern;
mod pod;
mod process;
pub mod sock;
pub mod tool;

use std::{
    env,
    path::{Path, PathBuf},
};

pub use mesh::{Mesh, split_capture_log};
pub use pod::{Pod, TcpCounters};
pub use process::{wait_output_timeout, wait_ready, wait_ready_timeout};

/// Istio's proxy uid and gid: Envoy, or the tool's relay standing in for it, runs as this, and
/// Istio's iptables rules let its own connections out uncaptured.
pub const PROXY_UID: u32 = 1337;
/// The uid apps run as (anything but [`PROXY_UID`], so that Istio's capture rules apply).
pub const APP_UID: u32 = 1000;

/// Panics with a clear message unless the effective uid is 0.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (BPF, netns, cgroups): run it as root");
    }
}

/// The shared fixtures: `$MESHACCEL_FIXTURES`, else `<workspace root>/../shared/fixtures`.
///
/// Panics with a clear message when the directory does not exist.
pub fn fixtures_dir() -> PathBuf {
    let dir = match env::var_os("MESHACCEL_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    match dir.canonicalize() {
        Ok(dir) if dir.is_dir() => dir,
        _ => panic!(
            "fixtures directory {} not found: set MESHACCEL_FIXTURES to the shared fixtures \
             (the directory holding iptables/ and config_dump/)",
            dir.display()
        ),
    }
}

/// A binary of this workspace, next to the running executable.
///
/// Test executables live in `target/<profile>/deps/`, examples in `target/<profile>/examples/`,
/// binaries in `target/<profile>/`; the workspace's binaries are in `target/<profile>/`.
/// `$MESHACCEL_BIN_DIR` overrides the directory. Panics with a clear message when the binary is
/// missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = match env::var_os("MESHACCEL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = env::current_exe().expect("cannot find the running executable");
            let mut dir = exe
                .parent()
                .expect("executable has no directory")
                .to_path_buf();
            if matches!(
                dir.file_name().and_then(|n| n.to_str()),
                Some("deps" | "examples")
            ) {
                dir.pop();
            }
            dir
        }
    };
    let bin = dir.join(name);
    if !bin.is_file() {
        panic!(
            "{} not found: build it first: cargo build --workspace --bins \
             (with the same profile as this executable)",
            bin.display()
        );
    }
    bin
}
pub mod ads;
pub mod cluster;
pub mod cluster_mesh;
pub mod containerd;
pub mod envoy;
pub mod http;
pub mod image;
pub mod injected;
pub mod kube_api;
pub mod sidecar;

/// helm: `$MESHACCEL_HELM`, else scripts/install-helm.sh's cache (`helm-v3.17.*/helm`).
pub fn helm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHACCEL_HELM") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("MESHACCEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/meshaccel"));
    let found = std::fs::read_dir(&cache).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path().join("helm"))
            .find(|p| {
                p.is_file()
                    && p.parent()
                        .and_then(|d| d.file_name())
                        .is_some_and(|n| n.to_string_lossy().starts_with("helm-v3.17"))
            })
    });
    found.unwrap_or_else(|| {
        panic!(
            "helm not found: run scripts/install-helm.sh (scripts/test.sh does) or set MESHACCEL_HELM"
        )
    })
}
