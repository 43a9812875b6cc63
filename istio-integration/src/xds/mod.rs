//! Istio xDS: what meshaccel learns from istiod, and how it asks.
//!
//! * [`translate`]: the rules, as pure functions over a few facts of listeners, clusters and
//!   endpoints: `virtualOutbound`/`virtualInbound` → the capture ports; the inbound passthrough
//!   clusters' `upstream_bind_config` → the source addresses of the sidecar → app leg; endpoints
//!   with `tlsMode: istio` → which IPs are sidecar workloads. The result is an [`XdsSnapshot`].
//! * [`typed`] reduces typed resources (envoy-types protos, as istiod sends them) to those facts,
//!   [`dump`] reduces the JSON of an Envoy `/config_dump` (v2 and v3) to the same facts, so the
//!   real dumps test the very rules the live client uses.
//! * [`client`]: the ADS client (tonic), ACK/NACK, backoff, last good state.
//! * [`node`]: the node identity and metadata presented to istiod.
pub mod client;
pub mod dump;
mod error;
pub mod node;
pub mod translate;
pub mod typed;

pub use client::{AdsConfig, AdsEvent, AdsState};
pub use error::{ClientError, TranslateError};
pub use node::NodeIdentity;
pub use translate::{XdsSnapshot, XdsVersions};
