//! meshaccel: accelerate Istio sidecar traffic on one node with sockmap redirects.
//!
//! The agent loads the eBPF programs (bpf-progs/), pins them, and keeps the kernel maps equal to
//! the desired state computed from its sources (a static workloads file, Kubernetes, istiod).
pub mod agent;
pub mod cgroup;
pub mod config;
pub mod dataplane;
pub mod desired;
pub mod doctor;
pub mod error;
pub mod http;
pub mod install_gate;
pub mod layout_stamp;
pub mod metrics;
pub mod netns;
mod objects;
pub mod pin_mode;
pub mod queue_charge;
pub mod queue_limit;
pub mod reconcile;
pub mod sources;
pub mod state_files;
pub mod status;
pub mod workloads;

pub use error::{Error, Result};
