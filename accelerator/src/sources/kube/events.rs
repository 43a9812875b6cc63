//! Kubernetes Events the agent posts: on mesh pods it refuses to accelerate, and on its own pod
//! when the node cannot accelerate as it should (a startup check failed or warned, the install
//! failed). One shape for both, so `kubectl describe pod` shows them alike.
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, Resource as _, api::PostParams};
use tracing::error;

/// The Event reason on pods meshaccel refuses to accelerate.
pub const NOT_ACCELERATED: &str = "MeshaccelNotAccelerated";

/// What the agent reports about its own node, on its own pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeFinding {
    /// A startup check that did not pass; the agent goes on.
    Check,
    /// Installing the dataplane failed; the agent stops (and the kubelet restarts it).
    InstallFailed,
}

impl NodeFinding {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Check => "MeshaccelNodeCheck",
            Self::InstallFailed => "MeshaccelInstallFailed",
        }
    }
    pub fn action(self) -> &'static str {
        match self {
            Self::Check => "Check",
            Self::InstallFailed => "Install",
        }
    }
}

/// The pod an Event is about. `kubectl describe pod` finds Events by the pod's uid, so it is
/// part of the reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A Warning Event on `pod`, reported by the agent on `node`.
pub fn warning(node: &str, pod: &PodRef, reason: &str, action: &str, message: &str) -> Event {
    let now = Timestamp::now();
    // Unique per post: Events are not updated, a new one is created each time.
    let suffix = format!("{:x}", now.as_nanosecond() as u64);
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{suffix}", pod.name)),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(Pod::api_version(&()).into_owned()),
            kind: Some(Pod::kind(&()).into_owned()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("meshaccel".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("meshaccel".into()),
        reporting_instance: Some(format!("meshaccel-{node}")),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some(action.into()),
        count: Some(1),
        ..Default::default()
    }
}

/// Posts `ev`; a failure is logged, never fatal (the finding has its own log line).
pub async fn post(client: Client, ev: Event) {
    let ns = ev.metadata.namespace.clone().unwrap_or_default();
    let pod = ev.involved_object.name.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client, &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        error!(pod = %format!("{ns}/{pod}"), error = %e, "cannot post a Kubernetes Event: {}", post_failure(&e));
    }
}

/// What a failed post means for the operator.
fn post_failure(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(r) if r.code == 403 => {
            "the agent's ClusterRole needs `create` on `events` (the chart grants it)"
        }
        kube::Error::Api(_) => "the API server refused it",
        _ => "the API server is not reachable (the finding is in this log only)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_post_says_why() {
        let api = |code| {
            kube::Error::Api(
                kube::core::Status::failure("no", "x")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(post_failure(&api(403)).contains("ClusterRole"));
        assert!(post_failure(&api(422)).contains("refused"));
        assert!(
            post_failure(&kube::Error::LinesCodecMaxLineLengthExceeded).contains("not reachable")
        );
    }

    #[test]
    fn warning_names_the_pod_by_uid() {
        let pod = PodRef {
            namespace: "meshaccel-system".into(),
            name: "meshaccel-abcde".into(),
            uid: "u-1".into(),
        };
        let ev = warning(
            "node-1",
            &pod,
            NodeFinding::Check.reason(),
            "Check",
            "no BTF",
        );
        assert_eq!(ev.involved_object.uid.as_deref(), Some("u-1"));
        assert_eq!(ev.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("meshaccel-system"));
        assert!(ev.metadata.name.unwrap().starts_with("meshaccel-abcde."));
        assert_eq!(ev.reason.as_deref(), Some("MeshaccelNodeCheck"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.source.unwrap().host.as_deref(), Some("node-1"));
    }
}
