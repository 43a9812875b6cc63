//! What the agent tells the operator about its node: findings of the startup checks (no kernel
//! BTF, a kernel that does not charge redirected bytes, missing program or map types) and a
//! failed install. Each is a warning log line and, when the agent knows its own pod, a Warning
//! Event on that pod: an operator who never reads agent logs still sees, in `kubectl describe
//! pod` or `kubectl get events`, why this node does not accelerate as it should.
use k8s_openapi::api::core::v1::Event;
use kube::Client;
use tracing::warn;

use crate::{
    config::AgentConfig,
    sources::kube::{
        controller,
        events::{self, NodeFinding, PodRef},
    },
};

/// Where the Events go; `None`: log lines only.
pub struct NodeReport {
    events: Option<(Client, String, PodRef)>,
}

impl NodeReport {
    /// With the Kubernetes source and the agent's pod known, Events are posted; otherwise (or
    /// when the client cannot be configured, which the Kubernetes source reports itself) only
    /// logs are written.
    pub async fn new(cfg: &AgentConfig) -> Self {
        let events = match (&cfg.kube, &cfg.pod) {
            (Some(opts), Some(pod)) => controller::client(opts)
                .await
                .ok()
                .map(|c| (c, opts.node_name.clone(), pod.clone())),
            _ => None,
        };
        Self { events }
    }

    /// Logs `line` and posts it as an Event. A `Check` is posted in the background (the agent
    /// goes on); an `InstallFailed` before returning (the process ends next).
    pub async fn report(&self, finding: NodeFinding, line: &str) {
        warn!(reason = finding.reason(), "{line}");
        let Some((client, ev)) = self.event(finding, line) else {
            return;
        };
        match finding {
            NodeFinding::Check => drop(tokio::spawn(events::post(client, ev))),
            NodeFinding::InstallFailed => events::post(client, ev).await,
        }
    }

    fn event(&self, finding: NodeFinding, line: &str) -> Option<(Client, Event)> {
        let (client, node, pod) = self.events.as_ref()?;
        let message = format!("meshaccel on node {node}: {line}");
        let ev = events::warning(node, pod, finding.reason(), finding.action(), &message);
        Some((client.clone(), ev))
    }
}
