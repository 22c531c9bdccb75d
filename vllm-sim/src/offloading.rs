//! `--protocol offloading` (§7.19): vLLM's OffloadingConnector with the P2P secondary tier
//! (`v1/kv_offload/tiering/p2p/manager.py`). P reads `remote_decoder.kv_request_id` K and
//! keeps K's blocks for the pull; D reads `remote_prefiller{kv_request_id, remote_host,
//! remote_port}` and fetches K from P's P2P port (the sim's side channel).

use super::config::SimConfig;
use super::handoff::{join_host_port, non_empty, port, Invalid, Leg, OnTimeout, Target};
use serde_json::{Map, Value};
use std::time::Duration;

pub fn classify(cfg: &SimConfig, body: &Map<String, Value>) -> Result<Leg, Invalid> {
    let Some(kv) = body.get("kv_transfer_params").and_then(Value::as_object) else {
        return Ok(Leg::Plain);
    };
    // vLLM: the `remote_decoder` block's presence marks a remote-decode request even
    // without an id (its store then fails); producer first, as its branch order does.
    if let Some(d) = kv.get("remote_decoder") {
        let key = non_empty(d.get("kv_request_id")).ok_or_else(|| {
            Invalid::Params("remote_decoder.kv_request_id missing or empty".into())
        })?;
        return Ok(Leg::Prefill { key: key.into() });
    }
    let Some(p) = kv.get("remote_prefiller") else {
        return Ok(Leg::Plain);
    };
    let key = non_empty(p.get("kv_request_id"))
        .ok_or_else(|| Invalid::Params("remote_prefiller.kv_request_id missing or empty".into()))?;
    let host = non_empty(p.get("remote_host"))
        .ok_or_else(|| Invalid::Params("remote_prefiller.remote_host missing or empty".into()))?;
    let port = port(p.get("remote_port")).ok_or_else(|| {
        Invalid::Params("remote_prefiller.remote_port missing or not a valid port".into())
    })?;
    Ok(Leg::Decode(Target {
        endpoint: join_host_port(host, port),
        key: key.into(),
        engine_check: None,
        wait: Duration::from_millis(cfg.p2p_load_timeout_ms),
        on_timeout: OnTimeout::Prefill,
        abort_notify: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn classify_json(v: Value) -> Result<Leg, Invalid> {
        classify(&SimConfig::default(), v.as_object().expect("object"))
    }

    #[test]
    fn roles_from_params() {
        assert!(matches!(classify_json(json!({})), Ok(Leg::Plain)));
        assert!(matches!(
            classify_json(json!({"kv_transfer_params": {"other": 1}})),
            Ok(Leg::Plain)
        ));
        match classify_json(
            json!({"kv_transfer_params": {"remote_decoder": {"kv_request_id": "K"}}}),
        ) {
            Ok(Leg::Prefill { key }) => assert_eq!(key, "K"),
            _ => panic!("prefill expected"),
        }
        assert!(matches!(
            classify_json(json!({"kv_transfer_params": {"remote_decoder": {}}})),
            Err(Invalid::Params(_))
        ));
        let d = json!({"kv_transfer_params": {"remote_prefiller":
            {"kv_request_id": "K", "remote_host": "10.0.0.1", "remote_port": 5710}}});
        match classify_json(d) {
            Ok(Leg::Decode(t)) => {
                assert_eq!(t.endpoint, "10.0.0.1:5710");
                assert_eq!(t.on_timeout, OnTimeout::Prefill);
                assert!(t.abort_notify);
            }
            _ => panic!("decode expected"),
        }
        assert!(matches!(
            classify_json(
                json!({"kv_transfer_params": {"remote_prefiller": {"kv_request_id": "K", "remote_host": "h"}}})
            ),
            Err(Invalid::Params(_))
        ));
    }
}
