//! Keyed KV handoff shared by `--protocol sglang`, `offloading` and `mooncake`
//! (§7.18–§7.20): a prefill leaves a lease keyed by a proxy-chosen key (sglang room,
//! offloading `kv_request_id`, mooncake `transfer_id`); the decode long-polls the
//! prefiller's `POST /kv/fetch` for that key, which ends the lease as `pulled`.

use super::config::{Protocol, SimConfig};
use super::http_util::{call, json_response, Resp};
use super::state::Shared;
use super::{mooncake, offloading, sglang};
use http::StatusCode;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Longest `/kv/fetch` wait P accepts, whatever the decoder asks.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Slack on top of the wait for the HTTP exchange itself.
const CALL_SLACK: Duration = Duration::from_secs(5);

/// What a request is under a keyed-handoff protocol.
pub enum Leg {
    Plain,
    Prefill { key: String },
    Decode(Target),
}

/// What the decoder does when the key never became ready in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// KV load failure: 500, or the route's stream error event.
    Fail,
    /// Prefill locally and answer normally (vLLM's P2P tier after `_LOAD_TIMEOUT_S`).
    Prefill,
}

/// Where and what a keyed-handoff decode fetches.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` serving `/kv/fetch` (P's bootstrap listener or side channel).
    pub endpoint: String,
    pub key: String,
    /// Mooncake: `(bootstrap host:port, expected engine id)`, checked with `GET /query`.
    pub engine_check: Option<(String, String)>,
    pub wait: Duration,
    pub on_timeout: OnTimeout,
    /// Offloading: a decode cancelled while fetching sends P an abort (`AbortFetchMsg`).
    pub abort_notify: bool,
}

/// A malformed handoff field.
pub enum Invalid {
    /// A top-level field (sglang's `bootstrap_*`): always a validation 400 with `param`.
    Field {
        param: &'static str,
        message: String,
    },
    /// Malformed `kv_transfer_params`: `--on-invalid-kv-params` decides (§7.10.1 step 1).
    Params(String),
}

pub fn classify(cfg: &SimConfig, body: &Map<String, Value>) -> Result<Leg, Invalid> {
    match cfg.protocol {
        Protocol::Sglang => sglang::classify(cfg, body),
        Protocol::Offloading => offloading::classify(cfg, body),
        Protocol::Mooncake => mooncake::classify(cfg, body),
        _ => Ok(Leg::Plain),
    }
}

/// `host:port`, bracketing an IPv6 literal (the sidecar sends hosts unbracketed).
pub fn join_host_port(host: &str, port: u64) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An integer port in 1..=65535.
pub fn port(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
        .filter(|p| (1..=65535).contains(p))
}

/// A non-empty string.
pub fn non_empty(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Why a fetch did not deliver the KV.
#[derive(Debug)]
pub enum FetchError {
    /// The key was not ready within the wait (P answered 404).
    Timeout,
    /// P's prefill of the key ended without KV (410).
    PrefillFailed,
    /// P holds the key for another prompt (409).
    PromptMismatch,
    /// Mooncake: `remote_engine_id` is not P's engine id.
    EngineMismatch,
    Transport(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Timeout => f.write_str("KV not ready before the timeout"),
            FetchError::PrefillFailed => f.write_str("the prefill of this key failed"),
            FetchError::PromptMismatch => f.write_str("the key holds another prompt"),
            FetchError::EngineMismatch => f.write_str("remote engine id mismatch"),
            FetchError::Transport(e) => f.write_str(e),
        }
    }
}

/// D side: optional engine-id check, then the long-poll fetch.
pub async fn fetch(
    shared: &Shared,
    t: &Target,
    prompt_hash: &str,
    side_channel_down: bool,
) -> Result<(), FetchError> {
    if side_channel_down {
        shared.update(|i| i.counters.side_channel_errors += 1);
        return Err(FetchError::Transport("side channel down (injected)".into()));
    }
    if let Some((ep, expected)) = &t.engine_check {
        match call(ep, "GET", "/query", None, CALL_SLACK).await {
            Ok((200, b)) => {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                if !mooncake::query_has_engine(&v, expected) {
                    shared.update(|i| i.counters.handoff_engine_id_mismatches += 1);
                    return Err(FetchError::EngineMismatch);
                }
            }
            Ok((s, _)) => return Err(FetchError::Transport(format!("/query status {s}"))),
            Err(e) => {
                shared.update(|i| i.counters.side_channel_errors += 1);
                return Err(FetchError::Transport(e));
            }
        }
    }
    let wait = t.wait.min(MAX_WAIT);
    let body =
        json!({"key": t.key, "prompt_hash": prompt_hash, "timeout_ms": wait.as_millis() as u64})
            .to_string();
    let r = call(
        &t.endpoint,
        "POST",
        "/kv/fetch",
        Some(body.into_bytes()),
        wait + CALL_SLACK,
    )
    .await;
    match r {
        Ok((200, _)) => Ok(()),
        Ok((404, _)) => Err(FetchError::Timeout),
        Ok((410, _)) => Err(FetchError::PrefillFailed),
        Ok((409, _)) => Err(FetchError::PromptMismatch),
        Ok((s, b)) => Err(FetchError::Transport(format!(
            "fetch status {s}: {}",
            String::from_utf8_lossy(&b)
        ))),
        Err(e) => {
            shared.update(|i| i.counters.side_channel_errors += 1);
            Err(FetchError::Transport(e))
        }
    }
}

/// P side, `POST /kv/fetch {"key","prompt_hash","timeout_ms"}`: waits (re-checked on every
/// state change) until the key's lease is held or its prefill failed, or the wait ends.
pub async fn serve_fetch(shared: &Shared, body: &Value) -> Resp {
    shared.update(|i| i.counters.side_channel_in.fetch += 1);
    let Some(key) = non_empty(body.get("key")) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"ok": false, "reason": "key missing"}),
        );
    };
    let hash = body.get("prompt_hash").and_then(Value::as_str);
    let wait = Duration::from_millis(body.get("timeout_ms").and_then(Value::as_u64).unwrap_or(0))
        .min(MAX_WAIT);
    let ready = |i: &super::state::Inner| i.kv.is_held(key) || i.handoff_failed(key);
    let _ = tokio::time::timeout(wait, shared.wait_until(ready)).await;
    let (status, reason) = shared.update(|i| {
        if let Some(held) = i.kv.held_hash(key) {
            if hash.is_some_and(|h| h != held) {
                return (StatusCode::CONFLICT, "prompt_mismatch");
            }
            i.release_lease(key, super::kv::LeaseState::Pulled);
            (StatusCode::OK, "pulled")
        } else if i.handoff_failed(key) {
            (StatusCode::GONE, "prefill_failed")
        } else {
            (StatusCode::NOT_FOUND, "unknown_key")
        }
    });
    tracing::info!(key, reason, "kv fetch");
    json_response(
        status,
        &json!({"ok": status == StatusCode::OK, "reason": reason}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_brackets_ipv6() {
        assert_eq!(join_host_port("10.0.0.1", 8998), "10.0.0.1:8998");
        assert_eq!(join_host_port("::1", 8998), "[::1]:8998");
        assert_eq!(join_host_port("[::1]", 1), "[::1]:1");
        assert_eq!(port(Some(&json!(0))), None);
        assert_eq!(port(Some(&json!(65536))), None);
        assert_eq!(port(Some(&json!("1"))), None);
        assert_eq!(port(Some(&json!(1))), Some(1));
    }
}
