//! vLLM's OffloadingConnector with its P2P tier: the prefiller keeps the KV cache under an id
//! the sidecar makes up, and the decoder pulls it from the prefiller's P2P port.

use super::{unbracketed, DecodePlan, Handoff, Pairing};
use crate::json_edit::{Edit, JsonObject};

/// The prefill leg's own edit: the id the decoder will pull (llm-d-router#2140's names).
pub(super) fn prefill_params(pairing: &Pairing) -> String {
    format!(
        r#"{{"remote_decoder":{{"kv_request_id":"{}"}}}}"#,
        pairing.id
    )
}

/// The original request with where to pull the prefilled KV cache from; the prefiller's reply
/// carries nothing the decoder needs.
pub(super) fn decode_plan(
    request: &JsonObject<'_>,
    pairing: &Pairing,
    prefiller_host: &str,
) -> DecodePlan {
    let params = format!(
        r#"{{"remote_prefiller":{{"kv_request_id":"{}","remote_host":"{}","remote_port":{}}}}}"#,
        pairing.id,
        unbracketed(prefiller_host),
        pairing.p2p_port
    );
    DecodePlan {
        body: request.rewrite(&[("kv_transfer_params", Edit::Set(&params))]),
        handoff: Handoff::Remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn decode_names_the_prefiller_and_the_id_the_prefill_used() {
        let source = Bytes::from_static(br#"{"prompt":"hi","kv_transfer_params":{"evil":1}}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let pairing = Pairing {
            id: uuid::Uuid::from_u128(1),
            p2p_port: 7777,
            ..Pairing::default()
        };
        assert_eq!(
            prefill_params(&pairing),
            r#"{"remote_decoder":{"kv_request_id":"00000000-0000-0000-0000-000000000001"}}"#
        );
        assert_eq!(
            decode_plan(&obj, &pairing, "10.0.0.7").body.to_bytes(),
            Bytes::from_static(
                br#"{"prompt":"hi","kv_transfer_params":{"remote_prefiller":{"kv_request_id":"00000000-0000-0000-0000-000000000001","remote_host":"10.0.0.7","remote_port":7777}}}"#
            )
        );
    }
}
