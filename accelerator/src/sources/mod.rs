//! The sources of the desired state besides the static workloads file. Each keeps its last good
//! contribution in [`crate::agent::Shared`], which merges them.
//!
//! - [`kube`]: the node's mesh pods, watched through the Kubernetes API (`--node-name`).
//! - [`xds`]: Istio's capture configuration, streamed from istiod (`--istiod`).
pub mod kube;
pub mod xds;
