//! `--protocol mooncake` (§7.20): vLLM's MooncakeConnector as the sidecar drives it. P
//! reads `{"do_remote_decode":true,"transfer_id":T}` and keeps T's blocks; D reads
//! `{"do_remote_prefill":true,"transfer_id":T,"remote_bootstrap_addr":"http://h:p",
//! "remote_engine_id":E}`, checks E against P's bootstrap `GET /query`, then fetches T.

use super::config::SimConfig;
use super::decode::truthy;
use super::handoff::{non_empty, Invalid, Leg, OnTimeout, Target};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// vLLM's bootstrap `GET /query` answer, `{dp_rank: EngineEntry}`, for one DP rank with
/// one TP/PP worker whose address is the sim's side channel.
pub fn query_body(engine_id: &str, worker_addr: &str) -> Value {
    json!({"0": {"engine_id": engine_id, "worker_addr": {"0": {"0": worker_addr}}}})
}

/// Whether some DP rank of a `/query` answer has engine id `expected`.
pub fn query_has_engine(v: &Value, expected: &str) -> bool {
    v.as_object().is_some_and(|m| {
        m.values()
            .any(|e| e.get("engine_id").and_then(Value::as_str) == Some(expected))
    })
}

fn params(m: &str) -> Invalid {
    Invalid::Params(m.into())
}

pub fn classify(cfg: &SimConfig, body: &Map<String, Value>) -> Result<Leg, Invalid> {
    let Some(kv) = body.get("kv_transfer_params").and_then(Value::as_object) else {
        return Ok(Leg::Plain);
    };
    let transfer_id = || {
        non_empty(kv.get("transfer_id"))
            .map(str::to_string)
            .ok_or_else(|| params("transfer_id missing or not a string"))
    };
    if truthy(kv.get("do_remote_decode")) {
        return Ok(Leg::Prefill {
            key: transfer_id()?,
        });
    }
    if !truthy(kv.get("do_remote_prefill")) {
        return Ok(Leg::Plain);
    }
    let key = transfer_id()?;
    let addr = non_empty(kv.get("remote_bootstrap_addr"))
        .ok_or_else(|| params("remote_bootstrap_addr missing or not a string"))?;
    let ep = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if ep.is_empty() || ep.contains('/') || !ep.contains(':') {
        return Err(params("remote_bootstrap_addr is not http://host:port"));
    }
    let engine = non_empty(kv.get("remote_engine_id"))
        .ok_or_else(|| params("remote_engine_id missing or not a string"))?;
    Ok(Leg::Decode(Target {
        endpoint: ep.into(),
        key,
        engine_check: Some((ep.into(), engine.into())),
        wait: Duration::from_millis(cfg.bootstrap_timeout_ms),
        on_timeout: OnTimeout::Fail,
        abort_notify: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_json(v: Value) -> Result<Leg, Invalid> {
        classify(&SimConfig::default(), v.as_object().expect("object"))
    }

    #[test]
    fn roles_and_query() {
        let p = json!({"kv_transfer_params": {"do_remote_prefill": false, "do_remote_decode": true, "transfer_id": "xfer-1"}});
        match classify_json(p) {
            Ok(Leg::Prefill { key }) => assert_eq!(key, "xfer-1"),
            _ => panic!("prefill expected"),
        }
        let d = json!({"kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
            "transfer_id": "xfer-1", "remote_bootstrap_addr": "http://127.0.0.1:8998", "remote_engine_id": "E"}});
        match classify_json(d) {
            Ok(Leg::Decode(t)) => {
                assert_eq!(t.endpoint, "127.0.0.1:8998");
                assert_eq!(t.engine_check, Some(("127.0.0.1:8998".into(), "E".into())));
            }
            _ => panic!("decode expected"),
        }
        assert!(matches!(
            classify_json(
                json!({"kv_transfer_params": {"do_remote_prefill": true, "transfer_id": "t"}})
            ),
            Err(Invalid::Params(_))
        ));
        assert!(matches!(
            classify_json(json!({"kv_transfer_params": {"do_remote_decode": true}})),
            Err(Invalid::Params(_))
        ));
        let q = query_body("E", "127.0.0.1:5600");
        assert_eq!(
            q.to_string(),
            r#"{"0":{"engine_id":"E","worker_addr":{"0":{"0":"127.0.0.1:5600"}}}}"#
        );
        assert!(query_has_engine(&q, "E"));
        assert!(!query_has_engine(&q, "F"));
    }
}
