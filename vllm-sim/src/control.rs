//! Test-only control endpoints under `/sim/` (§7.3, §7.12).

use super::counters::Counters;
use super::http_util::{json_response, not_found, Resp};
use super::kv::{KvPool, LeaseState};
use super::state::{Inner, Shared};
use http::{Method, StatusCode};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Resp {
    json_response(status, &json!({"error": msg.into()}))
}

/// Body as a JSON object; an empty body counts as `{}`.
fn object(raw: &[u8]) -> Result<Map<String, Value>, String> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err("body must be a JSON object".into()),
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    method: &Method,
    path: &str,
    query: &str,
    raw: &[u8],
) -> Resp {
    match (method, path) {
        (&Method::GET, "/sim/state") => json_response(StatusCode::OK, &shared.state_json()),
        (&Method::GET, "/sim/requests") => {
            let since = query_param(query, "since")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let recs = shared.read(|i| i.log.since(since));
            json_response(StatusCode::OK, &recs)
        }
        (&Method::POST, "/sim/reset") => match object(raw) {
            Ok(b) => reset(&shared, &b),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (&Method::POST, "/sim/config") => match object(raw) {
            Ok(b) => config(&shared, &b),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (&Method::GET, "/sim/config") => {
            let v = shared.read(|i| json!({"config": i.cfg, "faults": i.faults.to_json()}));
            json_response(StatusCode::OK, &v)
        }
        (&Method::GET, "/sim/wait") => wait(&shared, query).await,
        (&Method::POST, "/sim/expire_leases") => match object(raw) {
            Ok(b) => expire(&shared, &b),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        _ => not_found(),
    }
}

fn flag(b: &Map<String, Value>, k: &str, default: bool) -> bool {
    b.get(k).and_then(Value::as_bool).unwrap_or(default)
}

fn reset(shared: &Shared, b: &Map<String, Value>) -> Resp {
    shared.update(|i| {
        if flag(b, "release_leases", false) {
            for id in i.kv.held_ids() {
                i.release_lease(&id, LeaseState::ReleasedByReset);
            }
        }
        if flag(b, "counters", true) {
            // Held leases survive a counter reset, so re-base `leases_created` on them to
            // keep the lease-accounting invariant true.
            i.counters = Counters {
                leases_created: i.kv.leases_held() as u64,
                ..Counters::default()
            };
        }
        if flag(b, "requests", true) {
            i.log.clear();
        }
        if flag(b, "faults", false) {
            i.faults = Default::default();
        }
    });
    json_response(StatusCode::OK, &shared.state_json())
}

fn apply_config(i: &mut Inner, b: &Map<String, Value>) -> Result<(), String> {
    let mut faults = i.faults.clone();
    if let Some(f) = b.get("faults") {
        faults.patch(f)?;
    }
    if let Some(d) = b.get("dead") {
        faults.dead = d.as_bool().ok_or("dead must be a boolean")?;
    }
    let mut rest = b.clone();
    rest.remove("faults");
    rest.remove("dead");
    let cfg = i.cfg.merge_patch(&rest)?;
    if cfg.num_gpu_blocks != i.cfg.num_gpu_blocks {
        if !i.is_idle() || i.kv.leases_held() > 0 {
            return Err("num_gpu_blocks can only change while idle with no leases".into());
        }
        i.kv = KvPool::new(cfg.num_gpu_blocks);
    }
    if cfg.engine_id != i.cfg.engine_id {
        // A new id stands for a restarted engine (§7.20); null draws a fresh uuid4.
        i.engine_id = cfg
            .engine_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    }
    i.log.set_cap(cfg.request_log_size);
    i.cfg = cfg;
    i.faults = faults;
    Ok(())
}

fn config(shared: &Shared, b: &Map<String, Value>) -> Resp {
    match shared.update(|i| apply_config(i, b)) {
        Ok(()) => {
            let v = shared.read(|i| json!({"config": i.cfg, "faults": i.faults.to_json()}));
            json_response(StatusCode::OK, &v)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

fn condition(until: &str) -> Option<fn(&Inner) -> bool> {
    Some(match until {
        "idle" => |i: &Inner| i.is_idle(),
        "no_leases" => |i: &Inner| i.kv.leases_held() == 0,
        "idle_and_no_leases" => |i: &Inner| i.is_idle() && i.kv.leases_held() == 0,
        // Extensions so tests can synchronise on "the request has arrived".
        "busy" => |i: &Inner| !i.is_idle(),
        "queued" => |i: &Inner| i.in_flight.values().any(|f| f.queued),
        "running" => |i: &Inner| i.in_flight.values().any(|f| !f.queued),
        "leases" => |i: &Inner| i.kv.leases_held() > 0,
        _ => return None,
    })
}

async fn wait(shared: &Shared, query: &str) -> Resp {
    let until = query_param(query, "until").unwrap_or("idle");
    let Some(pred) = condition(until) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown condition {until:?}"),
        );
    };
    let ms = query_param(query, "timeout_ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let ok = tokio::time::timeout(Duration::from_millis(ms), shared.wait_until(pred))
        .await
        .is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::REQUEST_TIMEOUT
    };
    json_response(status, &shared.state_json())
}

fn expire(shared: &Shared, b: &Map<String, Value>) -> Resp {
    let n = shared.update(|i| {
        let ids: Vec<String> = match b.get("remote_request_ids").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            None => i.kv.held_ids(),
        };
        ids.iter()
            .filter(|id| i.release_lease(id, LeaseState::Expired))
            .count()
    });
    json_response(StatusCode::OK, &json!({"expired": n}))
}
