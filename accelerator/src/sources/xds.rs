//! The agent's xDS source: an ADS stream to istiod (`--istiod`, see
//! [`istio_integration::xds::client`]) whose last good snapshot is this source's contribution
//! ([`crate::agent::shared::SourceState::xds`]), merged into the capture configuration by
//! [`Capture::apply_xds`](crate::workloads::Capture::apply_xds):
//! Istio's ports and passthrough addresses come from xDS once istiod answered, and from the
//! workloads file (or Istio's defaults) until then. What it knows goes to its status file
//! ([`crate::state_files::XdsStatus`]), which `meshaccel status` shows.
use std::{path::PathBuf, sync::Arc};

use istio_integration::xds::{AdsConfig, AdsEvent, client};

use crate::{agent::shared::Shared, sources::Source, state_files::XdsStatus};

/// Runs the xDS source forever: every accepted snapshot becomes this source's contribution
/// (which wakes the reconciler); the status file follows every event.
pub async fn run(cfg: AdsConfig, shared: Arc<Shared>, status_file: PathBuf) {
    let mut st = XdsStatus {
        istiod: cfg.addr.clone(),
        node_id: cfg.node.node_id(),
        ..Default::default()
    };
    st.write(&status_file);
    client::run(cfg, move |e| {
        match e {
            AdsEvent::Connected => {
                st.connected = true;
            }
            AdsEvent::Snapshot(s) => {
                st.snapshot = Some(s.clone());
                shared.update(|src| src.xds = Some(s));
                shared.source_synced(Source::Xds, true);
            }
            AdsEvent::Rejected { error, .. } => {
                st.rejected += 1;
                st.last_rejection = Some(error);
                shared.source_error(Source::Xds);
            }
            AdsEvent::Disconnected { error, .. } => {
                // The last good state stays in force; readiness says istiod is away.
                shared.source_error(Source::Xds);
                shared.source_synced(Source::Xds, false);
                st.connected = false;
                st.disconnects += 1;
                st.last_error = Some(error);
            }
        }
        st.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        st.write(&status_file);
    })
    .await;
}
