//! vLLM's OffloadingConnector with its P2P tier: the prefiller keeps the KV cache under an id
//! the sidecar makes up, and the decoder pulls it from the prefiller's P2P port.

use super::{remote_kv_source, unbracketed, DecodePlan, Handoff, Pairing};
use crate::json_edit::{Edit, JsonObject};

/// The prefill leg's own edit: the id the decoder will pull (llm-d-router#2140's names), and
/// the peer to pull a cached prefix from first, if the scheduler named one.
pub(super) fn prefill_params(pairing: &Pairing) -> String {
    let store = format!(r#"{{"remote_decoder":{{"kv_request_id":"{}"}}"#, pairing.id);
    match remote_kv_source(pairing) {
        Some(source) => format!(r#"{store},"remote_kv_source":{source}}}"#),
        None => store + "}",
    }
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

    #[test]
    fn a_kv_source_is_pulled_by_the_prefill_or_alone_by_a_decoder_only_request() {
        let pairing = Pairing {
            id: uuid::Uuid::from_u128(1),
            p2p_port: 7777,
            kv_source_host: Some("[fd00::9]".into()),
            ..Pairing::default()
        };
        assert_eq!(
            prefill_params(&pairing),
            r#"{"remote_decoder":{"kv_request_id":"00000000-0000-0000-0000-000000000001"},"remote_kv_source":{"kv_request_id":"00000000-0000-0000-0000-0000000000fe","remote_host":"fd00::9","remote_port":7777}}"#
        );
        let source = Bytes::from_static(br#"{"prompt":"hi","kv_transfer_params":{"evil":1}}"#);
        let obj = JsonObject::parse(&source).unwrap();
        assert_eq!(
            crate::connector::with_kv_source(&obj, &pairing)
                .unwrap()
                .to_bytes(),
            Bytes::from_static(
                br#"{"prompt":"hi","kv_transfer_params":{"remote_kv_source":{"kv_request_id":"00000000-0000-0000-0000-0000000000fe","remote_host":"fd00::9","remote_port":7777}}}"#
            )
        );
        assert!(crate::connector::with_kv_source(&obj, &Pairing::default()).is_none());
    }
}
