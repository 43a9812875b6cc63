//! The sources of the desired state. Each keeps its last good contribution in
//! [`crate::agent::shared::Shared`], which merges them, and reports its sync state there.
//!
//! - [`static_file`]: the workloads file (`--workloads`), read by the agent's loop.
//! - [`kube`]: the node's mesh pods, watched through the Kubernetes API (`--node-name`).
//! - [`xds`]: Istio's capture configuration, streamed from istiod (`--istiod`).
pub mod kube;
pub mod static_file;
pub mod xds;

/// A source of the desired state, as a metric label and in readiness reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The static workloads file (`--workloads`).
    StaticFile,
    /// The Kubernetes watcher (pods and namespaces of this node).
    Kubernetes,
    /// Istio's xDS (istiod).
    Xds,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::StaticFile, Source::Kubernetes, Source::Xds];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::StaticFile => "static_file",
            Source::Kubernetes => "kubernetes",
            Source::Xds => "xds",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
