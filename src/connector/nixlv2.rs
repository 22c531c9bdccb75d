//! NIXL v2: vLLM's `kv_transfer_params` handoff.

use bytes::Bytes;

use super::{remote_kv_source, DecodePlan, Handoff, Pairing, ReplyError};
use crate::json_edit::{Edit, JsonObject};

/// What vLLM's NixlConnector expects on the prefill leg (the same as vLLM's toy proxy sends).
const PREFILL_PARAMS: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// The client's own `kv_transfer_params`, if any, are replaced.
pub(super) const PREFILL_EDITS: [(&str, Edit<'static>); 1] =
    [("kv_transfer_params", Edit::Set(PREFILL_PARAMS))];

/// With a KV cache source (`-enable-p2p-pull`), the request also names the peer to pull a
/// cached prefix from, as pd-sidecar does (vLLM's MultiConnector hands `remote_kv_source` to
/// its P2P tier).
pub(super) fn prefill_params_with_source(pairing: &Pairing) -> Option<String> {
    let source = remote_kv_source(pairing)?;
    let params = PREFILL_PARAMS.strip_suffix('}')?;
    Some(format!(r#"{params},"remote_kv_source":{source}}}"#))
}

/// The original request plus the prefiller's `kv_transfer_params`, verbatim: new vLLM versions
/// add fields, so the value is opaque to us. With `tokenize_once`, the reply's
/// `prompt_token_ids` go in front of them, so the decoder skips templating and tokenizing
/// (vllm#48145: vLLM pops the key, and ignores it for echo or non-text content).
pub(super) fn decode_plan(
    request: &JsonObject<'_>,
    reply: &Bytes,
    tokenize_once: bool,
) -> Result<DecodePlan, ReplyError> {
    let reply = JsonObject::parse(reply).map_err(|e| ReplyError::NotJson(e.to_string()))?;
    let with_ids;
    let (edit, handoff) = match reply.get("kv_transfer_params") {
        // Never forward what the client sent in its place: it would aim the decoder's KV pull.
        None => (
            Edit::Remove,
            Handoff::LocalPrefill("no kv_transfer_params in the prefill reply"),
        ),
        Some(v) if v.get() == "null" => (
            Edit::Set("null"),
            Handoff::LocalPrefill("the prefiller returned null kv_transfer_params"),
        ),
        Some(v) if v.get().starts_with('{') => {
            with_ids = tokenize_once
                .then(|| with_prompt_token_ids(v.get(), &reply))
                .flatten();
            let params = with_ids.as_deref().unwrap_or(v.get());
            (Edit::Set(params), Handoff::Remote)
        }
        Some(v) => {
            return Err(ReplyError::BadParams(format!(
                "kv_transfer_params must be an object, got {}",
                truncate(v.get())
            )))
        }
    };
    Ok(DecodePlan {
        body: request.rewrite(&[("kv_transfer_params", edit)]),
        handoff,
    })
}

/// `params` with the reply's top-level `prompt_token_ids` (a non-empty array) as its first
/// key, unless it has the key already. `None`: nothing to add.
fn with_prompt_token_ids(params: &str, reply: &JsonObject<'_>) -> Option<String> {
    let ids = reply.get("prompt_token_ids")?.get();
    if !ids.starts_with('[') || ids[1..].trim_start().starts_with(']') {
        return None;
    }
    let rest = params.strip_prefix('{')?.trim_start();
    if params.contains(r#""prompt_token_ids""#) {
        // The prefiller already sent them (or something under that name): keep its value.
        return None;
    }
    let comma = if rest.starts_with('}') { "" } else { "," };
    Some(format!(r#"{{"prompt_token_ids":{ids}{comma}{rest}"#))
}

fn truncate(s: &str) -> &str {
    s.get(..64).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::completion_prefill;

    #[test]
    fn prefill_sets_params_one_token_and_no_streaming() {
        let req = r#"{"model":"m","prompt":"hi","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"min_tokens":4,"kv_transfer_params":{"evil":1}}"#;
        assert_eq!(
            completion_prefill(crate::Connector::NixlV2, req, &Pairing::default()),
            format!(
                r#"{{"model":"m","prompt":"hi","stream":false,"max_tokens":1,"kv_transfer_params":{PREFILL_PARAMS},"max_completion_tokens":1}}"#
            )
        );
    }

    #[test]
    fn a_kv_source_is_named_in_the_prefills_params() {
        let pairing = Pairing {
            kv_source_host: Some("10.0.0.9".into()),
            id: uuid::Uuid::from_u128(1),
            p2p_port: 7777,
            ..Pairing::default()
        };
        assert_eq!(
            completion_prefill(crate::Connector::NixlV2, r#"{"prompt":"hi"}"#, &pairing),
            r#"{"prompt":"hi","stream":false,"max_tokens":1,"max_completion_tokens":1,"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null,"remote_kv_source":{"kv_request_id":"00000000-0000-0000-0000-0000000000fe","remote_host":"10.0.0.9","remote_port":7777}}}"#
        );
        assert!(prefill_params_with_source(&Pairing::default()).is_none());
    }

    #[test]
    fn decode_restores_the_original_and_adds_params_verbatim() {
        let req =
            br#"{"prompt":"hi","stream":true,"max_tokens":50,"kv_transfer_params":{"evil":1}}"#;
        let req = Bytes::from_static(req);
        let obj = JsonObject::parse(&req).unwrap();
        let reply = br#"{"id":"x","kv_transfer_params":{"remote_block_ids":[[1,2]],"future_field":{"a":9007199254740993}},"usage":{}}"#;
        let plan = decode_plan(&obj, &Bytes::from_static(reply), false).unwrap();
        assert_eq!(plan.handoff, Handoff::Remote);
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"prompt":"hi","stream":true,"max_tokens":50,"kv_transfer_params":{"remote_block_ids":[[1,2]],"future_field":{"a":9007199254740993}}}"#)
        );
    }

    #[test]
    fn missing_or_null_params_mean_local_prefill() {
        let source = Bytes::from_static(br#"{"prompt":"hi","kv_transfer_params":{"evil":1}}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let plan = decode_plan(&obj, &Bytes::from_static(br#"{"id":"x"}"#), false).unwrap();
        assert!(matches!(plan.handoff, Handoff::LocalPrefill(_)));
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"prompt":"hi"}"#)
        );
        let plan = decode_plan(
            &obj,
            &Bytes::from_static(br#"{"kv_transfer_params":null}"#),
            false,
        )
        .unwrap();
        assert!(matches!(plan.handoff, Handoff::LocalPrefill(_)));
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"prompt":"hi","kv_transfer_params":null}"#)
        );
    }

    #[test]
    fn tokenize_once_puts_the_prompt_ids_in_front_of_the_params() {
        let source = Bytes::from_static(br#"{"messages":[],"stream":true}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let reply = Bytes::from_static(
            br#"{"prompt_token_ids":[5,6,7],"kv_transfer_params":{"remote_block_ids":[[1]]}}"#,
        );
        let plan = decode_plan(&obj, &reply, true).unwrap();
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"messages":[],"stream":true,"kv_transfer_params":{"prompt_token_ids":[5,6,7],"remote_block_ids":[[1]]}}"#)
        );
        // Off, or nothing usable to add: the params verbatim.
        for (reply, on) in [
            (&reply[..], false),
            (
                br#"{"prompt_token_ids":null,"kv_transfer_params":{"a":1}}"#,
                true,
            ),
            (
                br#"{"prompt_token_ids":[],"kv_transfer_params":{"a":1}}"#,
                true,
            ),
            (
                br#"{"prompt_token_ids":[1],"kv_transfer_params":{"prompt_token_ids":[2]}}"#,
                true,
            ),
        ] {
            let reply = Bytes::copy_from_slice(reply);
            let plan = decode_plan(&obj, &reply, on).unwrap();
            let body = plan.body.to_bytes();
            let params = |b| {
                JsonObject::parse(b)
                    .unwrap()
                    .get("kv_transfer_params")
                    .unwrap()
                    .get()
            };
            assert_eq!(params(&body), params(&reply));
        }
        let empty = Bytes::from_static(br#"{"prompt_token_ids":[9],"kv_transfer_params":{}}"#);
        let plan = decode_plan(&obj, &empty, true).unwrap();
        assert!(plan
            .body
            .to_bytes()
            .ends_with(br#""kv_transfer_params":{"prompt_token_ids":[9]}}"#));
        // A reply without params is a local prefill: no ids either.
        let plan = decode_plan(
            &obj,
            &Bytes::from_static(br#"{"prompt_token_ids":[9]}"#),
            true,
        )
        .unwrap();
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"messages":[],"stream":true}"#)
        );
    }

    #[test]
    fn bad_replies_are_errors() {
        let source = Bytes::from_static(br#"{"prompt":"hi"}"#);
        let obj = JsonObject::parse(&source).unwrap();
        assert!(matches!(
            decode_plan(&obj, &Bytes::from_static(b"<html>"), false),
            Err(ReplyError::NotJson(_))
        ));
        assert!(matches!(
            decode_plan(
                &obj,
                &Bytes::from_static(br#"{"kv_transfer_params":[1]}"#),
                false
            ),
            Err(ReplyError::BadParams(_))
        ));
    }
}
