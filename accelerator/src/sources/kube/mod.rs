//! The Kubernetes source: node-local mesh pods and their namespaces, watched through the API
//! server (kube-rs watchers: Pods with `spec.nodeName=<node>`, all Namespaces; no polling), turned
//! into the agent's desired workloads.
//!
//! - [`policy`]: the pure function (pods, namespace labels, capture config, pod IP → netns) →
//!   [`crate::desired::Inputs`], with the opt-in rules and Istio's traffic annotations.
//! - [`podnetns`]: how a pod IP is mapped to its network namespace on the node.
//! - [`controller`]: the watch loop: keeps the last good state while the API server is away,
//!   reports its sync state through [`crate::agent::shared::Shared::source_synced`], resyncs without map churn,
//!   and posts a Kubernetes Event on pods whose configuration cannot be honoured.
//! - [`events`]: the Events the agent posts (on those pods, and on its own pod when the node
//!   cannot accelerate as it should).
//!
//! RBAC: `get`, `list`, `watch` on `pods` and `namespaces`, `create` on `events` (core group);
//! nothing else.
pub mod controller;
pub mod events;
pub mod podnetns;
pub mod policy;

use std::{path::PathBuf, time::Duration};

pub use controller::{run, spawn};
pub use policy::{ENABLED_LABEL, OptInLabel};

/// How the agent reaches the API server and finds its pods.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name (pods are selected with `spec.nodeName=<node_name>`).
    pub node_name: String,
    /// A kubeconfig file; `None` = the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Where pod network namespaces are looked for.
    pub scan: crate::netns::ScanConfig,
    /// How often pod netns are re-resolved (IPs can move between namespaces).
    pub resync: Duration,
    /// The longest wait between two attempts to reach the API server.
    pub max_backoff: Duration,
    /// The label key that opts namespaces and pods in.
    pub opt_in_label: OptInLabel,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>, kubeconfig: Option<PathBuf>) -> Self {
        Self {
            node_name: node_name.into(),
            kubeconfig,
            scan: crate::netns::ScanConfig::default(),
            resync: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
            opt_in_label: OptInLabel::default(),
        }
    }
}

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no in-cluster Kubernetes configuration ({source}): pass --kubeconfig outside a cluster"
    )]
    InCluster {
        #[source]
        source: kube::config::InClusterError,
    },
    #[error("Kubernetes client: {source}")]
    Client {
        #[source]
        source: kube::Error,
    },
}
