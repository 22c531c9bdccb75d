//! P2P prefix pull from a KV source (§7.22): `kv_transfer_params.remote_kv_source`
//! `{kv_request_id, remote_host, remote_port}`, as vLLM's P2P tier parses it
//! (`v1/kv_offload/tiering/p2p/manager.py`, `_remote_kv_source_params`). Before its prefill
//! the instance asks the source's side channel whether it has computed the prompt; a hit
//! replaces the prefill time with the transfer time. No lease on either side.

use super::handoff::{join_host_port, non_empty, port};
use super::http_util::{call, json_response, Resp};
use super::state::Shared;
use http::StatusCode;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Loopback side-channel call; slower than this is an error (a failed pull).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How many computed prompts an instance remembers; the least recently computed go first.
pub const COMPUTED_PROMPTS: usize = 4096;

/// Where a request pulls its prefix from.
#[derive(Clone, Debug)]
pub struct Source {
    /// `remote_host:remote_port`: the source's side channel.
    pub endpoint: String,
    pub kv_request_id: String,
}

/// `remote_kv_source` of the body's `kv_transfer_params`: `Ok(None)` when absent or null,
/// `Err` (a reason) when present but malformed.
pub fn parse(body: &Map<String, Value>) -> Result<Option<Source>, String> {
    let Some(kv) = body.get("kv_transfer_params").and_then(Value::as_object) else {
        return Ok(None);
    };
    let s = match kv.get("remote_kv_source") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(s)) => s,
        Some(_) => return Err("remote_kv_source is not an object".into()),
    };
    let id = non_empty(s.get("kv_request_id"))
        .ok_or("remote_kv_source.kv_request_id missing or empty")?;
    let host =
        non_empty(s.get("remote_host")).ok_or("remote_kv_source.remote_host missing or empty")?;
    let port = port(s.get("remote_port"))
        .ok_or("remote_kv_source.remote_port missing or not a valid port")?;
    Ok(Some(Source {
        endpoint: join_host_port(host, port),
        kv_request_id: id.to_string(),
    }))
}

/// How a pull ended; the request log's `p2p_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pulled {
    Hit,
    Miss,
    /// Unreachable source, non-200 or malformed answer: vLLM's failed pull, a lookup miss.
    Error,
}

impl Pulled {
    pub fn as_str(self) -> &'static str {
        match self {
            Pulled::Hit => "hit",
            Pulled::Miss => "miss",
            Pulled::Error => "error",
        }
    }
}

/// Puller side: `POST /p2p/source` at the source. Counts `side_channel_errors` on a
/// transport failure, as the other side-channel clients do; the caller counts the outcome.
pub async fn ask(
    shared: &Shared,
    s: &Source,
    prompt_hash: &str,
    side_channel_down: bool,
) -> Pulled {
    if side_channel_down {
        shared.update(|i| i.counters.side_channel_errors += 1);
        return Pulled::Error;
    }
    let body = json!({"kv_request_id": s.kv_request_id, "prompt_hash": prompt_hash}).to_string();
    let r = call(
        &s.endpoint,
        "POST",
        "/p2p/source",
        Some(body.into_bytes()),
        CALL_TIMEOUT,
    )
    .await;
    let b = match r {
        Ok((200, b)) => b,
        Ok((status, _)) => {
            tracing::warn!(endpoint = %s.endpoint, status, "P2P source refused the lookup");
            return Pulled::Error;
        }
        Err(e) => {
            tracing::warn!(endpoint = %s.endpoint, error = %e, "P2P source unreachable");
            shared.update(|i| i.counters.side_channel_errors += 1);
            return Pulled::Error;
        }
    };
    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
    match (v.get("hit").and_then(Value::as_bool), v.get("tokens")) {
        (Some(true), Some(t)) if t.is_u64() => Pulled::Hit,
        (Some(false), Some(t)) if t.is_u64() => Pulled::Miss,
        _ => {
            tracing::warn!(endpoint = %s.endpoint, answer = %String::from_utf8_lossy(&b), "malformed P2P source answer");
            Pulled::Error
        }
    }
}

/// Source side, `POST /p2p/source {"kv_request_id","prompt_hash"}` → `{"hit","tokens"}`.
pub fn serve(shared: &Shared, body: &Value) -> Resp {
    let hash = body.get("prompt_hash").and_then(Value::as_str);
    let found = shared.update(|i| {
        i.counters.side_channel_in.p2p_source += 1;
        hash.map(|h| i.computed.tokens(h))
    });
    let Some(found) = found else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"ok": false, "reason": "prompt_hash missing"}),
        );
    };
    let id = body.get("kv_request_id").and_then(Value::as_str);
    tracing::info!(kv_request_id = ?id, hit = found.is_some(), "P2P source lookup");
    json_response(
        StatusCode::OK,
        &json!({"hit": found.is_some(), "tokens": found.unwrap_or(0)}),
    )
}

/// Prompt hashes this instance has computed (a request completed on it), with their token
/// counts: a capped LRU on completion order, so a long run keeps the newest prompts only.
pub struct Computed {
    /// hash -> (generation of its latest insert, prompt tokens)
    entries: HashMap<String, (u64, u64)>,
    /// Insert order; an entry whose generation is stale was re-inserted later.
    order: VecDeque<(String, u64)>,
    generation: u64,
}

impl Computed {
    pub fn new() -> Self {
        Computed {
            entries: HashMap::new(),
            order: VecDeque::new(),
            generation: 0,
        }
    }

    pub fn insert(&mut self, hash: &str, tokens: u64) {
        self.generation += 1;
        let g = self.generation;
        self.entries.insert(hash.to_string(), (g, tokens));
        self.order.push_back((hash.to_string(), g));
        while self.entries.len() > COMPUTED_PROMPTS {
            let Some((h, g)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&h).is_some_and(|e| e.0 == g) {
                self.entries.remove(&h);
            }
        }
        // Re-inserts leave stale order entries; drop them before they outgrow the cap.
        if self.order.len() > 2 * COMPUTED_PROMPTS {
            let entries = &self.entries;
            self.order
                .retain(|(h, g)| entries.get(h).is_some_and(|e| e.0 == *g));
        }
    }

    pub fn tokens(&self, hash: &str) -> Option<u64> {
        self.entries.get(hash).map(|e| e.1)
    }
}

impl Default for Computed {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn parses_the_block() {
        assert!(matches!(parse(&body(json!({}))), Ok(None)));
        assert!(matches!(
            parse(&body(
                json!({"kv_transfer_params": {"remote_kv_source": null}})
            )),
            Ok(None)
        ));
        let ok = parse(&body(json!({"kv_transfer_params": {"remote_kv_source":
            {"kv_request_id": "K", "remote_host": "::1", "remote_port": 5710}}})))
        .expect("valid")
        .expect("present");
        assert_eq!(ok.endpoint, "[::1]:5710");
        assert_eq!(ok.kv_request_id, "K");
        for bad in [
            json!("h:1"),
            json!({}),
            json!({"kv_request_id": "K", "remote_host": "h"}),
            json!({"kv_request_id": "K", "remote_host": "h", "remote_port": "1"}),
            json!({"kv_request_id": "", "remote_host": "h", "remote_port": 1}),
            json!({"kv_request_id": "K", "remote_host": 7, "remote_port": 1}),
        ] {
            let b = body(json!({"kv_transfer_params": {"remote_kv_source": bad}}));
            assert!(parse(&b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn computed_is_a_capped_lru() {
        let mut c = Computed::new();
        c.insert("old", 1);
        for i in 0..COMPUTED_PROMPTS {
            // "old" is refreshed halfway, so it outlives the entries inserted before it.
            if i == COMPUTED_PROMPTS / 2 {
                c.insert("old", 2);
            }
            c.insert(&format!("h{i}"), 3);
        }
        assert_eq!(c.tokens("old"), Some(2));
        assert_eq!(c.tokens("h0"), None);
        assert_eq!(c.tokens(&format!("h{}", COMPUTED_PROMPTS - 1)), Some(3));
        assert_eq!(c.entries.len(), COMPUTED_PROMPTS);
        for _ in 0..3 * COMPUTED_PROMPTS {
            c.insert("hot", 4);
        }
        assert!(c.order.len() <= 2 * COMPUTED_PROMPTS);
        assert_eq!(c.tokens("hot"), Some(4));
    }
}
