//! meshaccel: accelerate Istio sidecar traffic on one node with sockmap redirects.
//!
//! The agent loads the eBPF programs (bpf-progs/), pins them, and keeps the kernel maps equal to
//! the desired state computed from its inputs (the static workloads file for now).
pub mod agent;
pub mod cgroup;
pub mod dataplane;
pub mod desired;
pub mod error;
pub mod netns;
pub mod reconcile;
pub mod workloads;

pub use error::{Error, Result};
