//! Arbitrary bytes as the resources of listener, cluster and endpoint responses, through the
//! client's protocol state and the translation: no panic, and every response is either accepted
//! or NACKed with a detail, never half applied.
#![no_main]

use envoy_types::pb::{envoy::service::discovery::v3::DiscoveryResponse, google::protobuf::Any};
use istio_integration::xds::{
    AdsState,
    typed::{TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_LISTENER},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

const TYPES: [&str; 3] = [TYPE_LISTENER, TYPE_CLUSTER, TYPE_ENDPOINTS];

fuzz_target!(|data: &[u8]| {
    let mut state = AdsState::default();
    // Chunks: [type selector][len][bytes]… each chunk one resource of one response.
    let mut rest = data;
    let mut n = 0u32;
    while rest.len() >= 2 {
        let (sel, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (bytes, tail) = rest.split_at(take);
        rest = tail;
        n += 1;
        let ty = TYPES[usize::from(sel) % 3];
        // Either a resource of the response's type, of another type, or a whole response.
        let resp = if sel & 0x80 != 0 {
            match DiscoveryResponse::decode(bytes) {
                Ok(mut r) => {
                    r.type_url = ty.to_string();
                    r
                }
                Err(_) => continue,
            }
        } else {
            let res_ty = if sel & 0x40 != 0 {
                TYPES[usize::from(sel >> 2) % 3]
            } else {
                ty
            };
            DiscoveryResponse {
                version_info: format!("v{n}"),
                type_url: ty.to_string(),
                nonce: format!("n{n}"),
                resources: vec![Any {
                    type_url: res_ty.to_string(),
                    value: bytes.to_vec(),
                }],
                ..Default::default()
            }
        };
        let before = state.snapshot();
        let out = state.on_response(&resp);
        let ack = &out.requests[0];
        assert_eq!(ack.response_nonce, resp.nonce);
        assert_eq!(ack.error_detail.is_some(), out.rejected.is_some());
        if out.rejected.is_some() {
            assert_eq!(
                state.snapshot(),
                before,
                "a rejected response changes nothing"
            );
        }
    }
});
