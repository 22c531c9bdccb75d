//! vLLM's MooncakeConnector: both legs carry one `transfer_id`; the decoder finds the
//! prefiller's engine through its bootstrap server, whose `GET /query` the sidecar asks first
//! (`pd/bootstrap.rs`).

use serde_json::Value;

use super::{DecodePlan, Handoff, Pairing};
use crate::json_edit::{Edit, JsonObject};

/// One data-parallel rank of a prefiller, from its bootstrap server's `/query`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Engine {
    pub dp_rank: String,
    pub engine_id: String,
}

/// The prefill leg's `kv_transfer_params`.
pub(super) fn prefill_params(pairing: &Pairing) -> String {
    format!(
        r#"{{"do_remote_prefill":false,"do_remote_decode":true,"transfer_id":"{}"}}"#,
        transfer_id(pairing)
    )
}

/// The original request with the transfer to pull and where its engine's bootstrap is.
pub(super) fn decode_plan(
    request: &JsonObject<'_>,
    pairing: &Pairing,
    prefiller_host: &str,
) -> DecodePlan {
    let params = serde_json::json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "transfer_id": transfer_id(pairing),
        // The host as a URI has it: IPv6 in brackets.
        "remote_bootstrap_addr": format!("http://{prefiller_host}:{}", pairing.mooncake_port),
        "remote_engine_id": pairing.engine.engine_id,
    })
    .to_string();
    DecodePlan {
        body: request.rewrite(&[("kv_transfer_params", Edit::Set(&params))]),
        handoff: Handoff::Remote,
    }
}

/// The `transfer_id` both legs carry.
fn transfer_id(pairing: &Pairing) -> String {
    format!("xfer-{}", pairing.id)
}

/// The engines of a bootstrap server's `/query` answer, `{"<dp_rank>":{"engine_id":…},…}`.
pub fn parse_query(body: &[u8]) -> Result<Vec<Engine>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let ranks = v.as_object().ok_or("not a JSON object")?;
    let engines: Vec<Engine> = ranks
        .iter()
        .filter_map(|(rank, entry)| {
            Some(Engine {
                dp_rank: rank.clone(),
                engine_id: entry.get("engine_id")?.as_str()?.to_owned(),
            })
        })
        .collect();
    if engines.is_empty() {
        return Err("no rank with an engine_id".into());
    }
    Ok(engines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn query_answers_are_read_per_rank() {
        let engines =
            parse_query(br#"{"0":{"engine_id":"e0","worker_addr":{}},"1":{"engine_id":"e1"}}"#)
                .unwrap();
        assert_eq!(engines.len(), 2);
        assert_eq!(engines[1].engine_id, "e1");
        assert!(parse_query(b"[]").is_err());
        assert!(parse_query(br#"{"0":{}}"#).is_err());
    }

    #[test]
    fn both_legs_name_one_transfer() {
        let source = Bytes::from_static(br#"{"prompt":"hi","kv_transfer_params":{"evil":1}}"#);
        let obj = JsonObject::parse(&source).unwrap();
        let pairing = Pairing {
            id: uuid::Uuid::from_u128(1),
            mooncake_port: 8998,
            engine: Engine {
                dp_rank: "0".into(),
                engine_id: "e0".into(),
            },
            ..Pairing::default()
        };
        assert_eq!(
            prefill_params(&pairing),
            r#"{"do_remote_prefill":false,"do_remote_decode":true,"transfer_id":"xfer-00000000-0000-0000-0000-000000000001"}"#
        );
        assert_eq!(
            decode_plan(&obj, &pairing, "[fd00::2]").body.to_bytes(),
            Bytes::from_static(
                br#"{"prompt":"hi","kv_transfer_params":{"do_remote_decode":false,"do_remote_prefill":true,"remote_bootstrap_addr":"http://[fd00::2]:8998","remote_engine_id":"e0","transfer_id":"xfer-00000000-0000-0000-0000-000000000001"}}"#
            )
        );
    }
}
