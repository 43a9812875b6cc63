//! Istio semantics meshaccel depends on, with no aya dependency.
//!
//! * [`capture`]: the sidecar traffic capture rules Istio installs in a pod (istio-init /
//!   istio-cni), rendered the way Istio renders them, so that the local mesh and the demo need no
//!   copy of Istio's output; tests prove the rendering equals Istio's real goldens. The same config
//!   is read back from a pod's `iptables-save` output (`meshaccel doctor --netns`).
pub mod annotations;
pub mod capture;
pub mod xds;
