//! NIXL v1, the llm-d fork's protocol: top-level `do_remote_decode` / `do_remote_prefill` and
//! `remote_*` fields instead of `kv_transfer_params`.

use bytes::Bytes;

use super::{DecodePlan, Handoff, ReplyError};
use crate::json_edit::{Edit, JsonObject};

/// The fields the prefiller returns and the decoder needs, all of them or none.
const REMOTE_FIELDS: [&str; 4] = [
    "remote_block_ids",
    "remote_engine_id",
    "remote_host",
    "remote_port",
];

/// Fields a client may have injected are dropped: only the prefiller's reply may set them.
pub(super) const PREFILL_EDITS: [(&str, Edit<'static>); 7] = [
    ("do_remote_decode", Edit::Set("true")),
    ("do_remote_prefill", Edit::Remove),
    ("remote_block_ids", Edit::Remove),
    ("remote_engine_id", Edit::Remove),
    ("remote_host", Edit::Remove),
    ("remote_port", Edit::Remove),
    ("kv_transfer_params", Edit::Remove),
];

pub(super) fn decode_plan(
    request: &JsonObject<'_>,
    reply: &Bytes,
) -> Result<DecodePlan, ReplyError> {
    let reply = JsonObject::parse(reply).map_err(|e| ReplyError::NotJson(e.to_string()))?;
    let values: Vec<Option<&str>> = REMOTE_FIELDS
        .iter()
        .map(|k| reply.get(k).map(|v| v.get()).filter(|v| *v != "null"))
        .collect();
    let complete = values.iter().all(Option::is_some);
    // A decoder given partial remote parameters misbehaves in vLLM, so send all or none.
    let mut edits: Vec<(&str, Edit<'_>)> = vec![
        ("do_remote_decode", Edit::Remove),
        ("kv_transfer_params", Edit::Remove),
        (
            "do_remote_prefill",
            if complete {
                Edit::Set("true")
            } else {
                Edit::Remove
            },
        ),
    ];
    for (key, value) in REMOTE_FIELDS.iter().zip(&values) {
        let edit = match value {
            Some(v) if complete => Edit::Set(v),
            _ => Edit::Remove,
        };
        edits.push((key, edit));
    }
    let handoff = if complete {
        Handoff::Remote
    } else {
        Handoff::LocalPrefill("the prefill reply lacks some remote_* fields")
    };
    Ok(DecodePlan {
        body: request.rewrite(&edits),
        handoff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_uses_top_level_fields() {
        assert_eq!(
            crate::connector::completion_prefill(
                crate::Connector::Nixl,
                r#"{"prompt":"hi","stream":true,"remote_host":"evil"}"#,
                &Default::default()
            ),
            r#"{"prompt":"hi","stream":false,"max_tokens":1,"max_completion_tokens":1,"do_remote_decode":true}"#
        );
    }

    #[test]
    fn decode_gets_all_four_fields_verbatim() {
        let source = Bytes::from_static(br#"{"prompt":"hi","stream":true}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let reply = br#"{"remote_block_ids":[1,2,3],"remote_engine_id":"e","remote_host":"h","remote_port":5600,"kv_transfer_params":null}"#;
        let plan = decode_plan(&obj, &Bytes::from_static(reply)).unwrap();
        assert_eq!(plan.handoff, Handoff::Remote);
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"prompt":"hi","stream":true,"do_remote_prefill":true,"remote_block_ids":[1,2,3],"remote_engine_id":"e","remote_host":"h","remote_port":5600}"#)
        );
    }

    #[test]
    fn partial_reply_means_local_prefill_without_partial_fields() {
        let source = Bytes::from_static(br#"{"prompt":"hi","remote_port":1}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let plan = decode_plan(
            &obj,
            &Bytes::from_static(br#"{"remote_block_ids":[1],"remote_engine_id":"e"}"#),
        )
        .unwrap();
        assert!(matches!(plan.handoff, Handoff::LocalPrefill(_)));
        assert_eq!(
            plan.body.to_bytes(),
            Bytes::from_static(br#"{"prompt":"hi"}"#)
        );
    }
}
