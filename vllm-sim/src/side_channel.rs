//! Side-channel server (§7.9): the sim's HTTP stand-in for NIXL handshake, reads,
//! notifications and heartbeats, plus the LMCache lookup (§7.10.4) and the KV-source
//! lookup (§7.22).

use super::config::LeaseMode;
use super::http_util::{json_response, not_found, Resp};
use super::kv::{LeaseState, ReadError};
use super::state::Shared;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bad_request(msg: &str) -> Resp {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"ok": false, "reason": msg}),
    )
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, std::io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let raw = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e)),
    };
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let resp = match (method, path.as_str()) {
        (Method::GET, "/nixl/meta") => {
            let (bs, n) = shared.update(|i| {
                i.counters.side_channel_in.meta += 1;
                (i.cfg.block_size, i.kv.total())
            });
            json_response(
                StatusCode::OK,
                &json!({"engine_id": shared.engine_id(), "block_size": bs, "num_blocks": n, "compat": "sim-1"}),
            )
        }
        (Method::POST, "/nixl/read") => read(&shared, &body),
        (Method::POST, "/kv/fetch") => super::handoff::serve_fetch(&shared, &body).await,
        (Method::POST, "/p2p/source") => super::p2p_source::serve(&shared, &body),
        (Method::GET, "/query") => {
            shared.update(|i| i.counters.side_channel_in.query += 1);
            let worker = format!("{}:{}", shared.advertised_host, shared.side_addr.port());
            json_response(
                StatusCode::OK,
                &super::mooncake::query_body(&shared.engine_id(), &worker),
            )
        }
        (Method::GET, "/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (Method::POST, "/nixl/notify") => notify(&shared, &body),
        (Method::POST, "/nixl/heartbeat") => heartbeat(&shared, &body),
        (Method::GET, "/lmcache/has") => {
            let hash = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("hash="))
                .unwrap_or("");
            let has = shared.read(|i| i.lmcache.contains(hash));
            json_response(StatusCode::OK, &json!({"has": has}))
        }
        _ => not_found(),
    };
    Ok(resp)
}

fn read(shared: &Shared, body: &Value) -> Resp {
    let Some(id) = str_field(body, "remote_request_id") else {
        shared.update(|i| i.counters.side_channel_in.read += 1);
        return bad_request("remote_request_id missing");
    };
    let blocks: Vec<u32> = body
        .get("block_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect()
        })
        .unwrap_or_default();
    let hash = str_field(body, "prompt_hash").unwrap_or("");
    let res = shared.update(|i| {
        i.counters.side_channel_in.read += 1;
        let r = i.kv.read(id, &blocks, hash);
        if r.is_ok() {
            // KvPool::read already moved the lease to `pulled`; count it here.
            i.counters.leases_pulled += 1;
        }
        r
    });
    match res {
        Ok(()) => json_response(StatusCode::OK, &json!({"ok": true})),
        Err(ReadError::UnknownLease) => {
            tracing::error!(id, "Potentially invalid KV blocks for unrecognized request were retrieved by a decode worker. They may have expired.");
            json_response(
                StatusCode::NOT_FOUND,
                &json!({"ok": false, "reason": "unknown_lease"}),
            )
        }
        Err(ReadError::BlockMismatch) => json_response(
            StatusCode::CONFLICT,
            &json!({"ok": false, "reason": "block_mismatch"}),
        ),
        Err(ReadError::PromptMismatch) => json_response(
            StatusCode::CONFLICT,
            &json!({"ok": false, "reason": "prompt_mismatch"}),
        ),
    }
}

fn notify(shared: &Shared, body: &Value) -> Resp {
    let id = str_field(body, "remote_request_id").unwrap_or("");
    let state = match str_field(body, "reason") {
        Some("rejected") => LeaseState::ReleasedByReject,
        _ => LeaseState::ReleasedByNotify,
    };
    let ok = shared.update(|i| {
        i.counters.side_channel_in.notify += 1;
        let ok = i.release_lease(id, state);
        if !ok {
            i.counters.notify_unknown += 1;
        }
        ok
    });
    tracing::info!(id, ok, reason = ?str_field(body, "reason"), "side-channel notify");
    json_response(StatusCode::OK, &json!({"ok": ok}))
}

fn heartbeat(shared: &Shared, body: &Value) -> Resp {
    let ids: Vec<String> = body
        .get("remote_request_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let n = shared.update(|i| {
        i.counters.side_channel_in.heartbeat += 1;
        if i.cfg.effective_lease_mode() != LeaseMode::Heartbeat {
            return 0;
        }
        // vLLM extends to max(old, now + duration*2/3).
        let ext = Duration::from_millis(i.cfg.kv_lease_duration_ms * 2 / 3);
        i.kv.heartbeat(&ids, Instant::now(), ext)
    });
    json_response(StatusCode::OK, &json!({"extended": n}))
}

/// Expires overdue leases; runs every 10 ms (§7.8 granularity).
pub async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        shared.update_if(|i| {
            let gone = i.kv.sweep(now);
            for id in &gone {
                tracing::info!(id, "Releasing expired KV blocks: lease expired");
            }
            i.counters.leases_expired += gone.len() as u64;
            ((), !gone.is_empty())
        });
    }
}
