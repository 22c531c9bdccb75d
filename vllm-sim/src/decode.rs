//! Decode side (§7.10): validating remote params, pulling blocks from the prefiller over the
//! side channel, and notifying it on abort or reject.

use super::config::{Era, OnUnknownLease, Protocol, SimConfig};
use super::http_util::call;
use super::state::Shared;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Side-channel calls are loopback; anything slower than this is treated as a failure.
const SIDE_CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and what a decode request pulls.
#[derive(Clone, Debug)]
pub struct DecodeTarget {
    /// `host:port` of the prefiller's side channel.
    pub endpoint: String,
    pub engine_id: String,
    /// Lease key on P: `remote_request_id` (B/C) or D's own unsuffixed id (A, nixl-v1).
    pub remote_request_id: String,
    pub block_ids: Vec<u32>,
}

/// The object holding the remote params for this protocol (top level for nixl-v1).
pub fn params_object(protocol: Protocol, body: &Map<String, Value>) -> Option<&Map<String, Value>> {
    match protocol {
        Protocol::NixlV1 => Some(body),
        _ => body.get("kv_transfer_params").and_then(Value::as_object),
    }
}

pub fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Null) | None => false,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

pub fn wants_remote_decode(protocol: Protocol, body: &Map<String, Value>) -> bool {
    params_object(protocol, body).is_some_and(|p| truthy(p.get("do_remote_decode")))
}

pub fn wants_remote_prefill(protocol: Protocol, body: &Map<String, Value>) -> bool {
    params_object(protocol, body).is_some_and(|p| truthy(p.get("do_remote_prefill")))
}

/// Whether this protocol/era puts a random suffix on internal ids (and ships
/// `remote_request_id`).
pub fn uses_remote_request_id(cfg: &SimConfig) -> bool {
    cfg.protocol == Protocol::Nixlv2 && cfg.kv_params_era != Era::A
}

/// Result of strict param validation.
pub struct Validated {
    pub target: DecodeTarget,
    pub flat_in_era_c: bool,
}

/// §7.10.1 step 1. `own_id` is D's unsuffixed internal id, used when no
/// `remote_request_id` is part of the protocol.
pub fn validate_params(
    cfg: &SimConfig,
    body: &Map<String, Value>,
    own_id: &str,
) -> Result<Validated, String> {
    let p = params_object(cfg.protocol, body).ok_or("kv_transfer_params is not an object")?;
    let engine_id = p
        .get("remote_engine_id")
        .and_then(Value::as_str)
        .ok_or("remote_engine_id missing or not a string")?;
    let host = p
        .get("remote_host")
        .and_then(Value::as_str)
        .ok_or("remote_host missing or not a string")?;
    let port = p
        .get("remote_port")
        .and_then(Value::as_u64)
        .filter(|p| (1..=65535).contains(p))
        .ok_or("remote_port missing or not a valid port")?;
    let remote_request_id = if uses_remote_request_id(cfg) {
        p.get("remote_request_id")
            .and_then(Value::as_str)
            .ok_or("remote_request_id missing or not a string")?
            .to_string()
    } else {
        own_id.to_string()
    };
    let ids = p
        .get("remote_block_ids")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or("remote_block_ids missing or empty")?;
    let as_ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let nested = ids.iter().all(Value::is_array);
    let era_c = cfg.kv_params_era == Era::C && cfg.protocol == Protocol::Nixlv2;
    let (block_ids, flat_in_era_c) = if nested {
        if !era_c {
            return Err("remote_block_ids must be a list of ints in this era".into());
        }
        let mut out = Vec::new();
        for g in ids {
            let g = g
                .as_array()
                .and_then(|g| as_ids(g))
                .ok_or("remote_block_ids groups must hold ints")?;
            out.extend(g);
        }
        (out, false)
    } else {
        let flat = as_ids(ids).ok_or("remote_block_ids must hold non-negative ints")?;
        (flat, era_c)
    };
    if block_ids.is_empty() {
        return Err("remote_block_ids missing or empty".into());
    }
    Ok(Validated {
        target: DecodeTarget {
            endpoint: format!("{host}:{port}"),
            engine_id: engine_id.to_string(),
            remote_request_id,
            block_ids,
        },
        flat_in_era_c,
    })
}

/// Best-effort address of P for a reject notify (§7.10.3): needs host, port and an id.
pub fn reject_target(
    cfg: &SimConfig,
    body: &Map<String, Value>,
    own_id: Option<&str>,
) -> Option<(String, String)> {
    let p = params_object(cfg.protocol, body)?;
    if !truthy(p.get("do_remote_prefill")) {
        return None;
    }
    let host = p.get("remote_host").and_then(Value::as_str)?;
    let port = p.get("remote_port").and_then(Value::as_u64)?;
    let id = if uses_remote_request_id(cfg) {
        p.get("remote_request_id")
            .and_then(Value::as_str)?
            .to_string()
    } else {
        own_id?.to_string()
    };
    Some((format!("{host}:{port}"), id))
}

/// POSTs `/nixl/notify`; returns whether P acknowledged it. Failures count as
/// `side_channel_errors` (the lease then expires on P).
pub async fn notify(shared: &Shared, endpoint: &str, id: &str, reason: &str) -> bool {
    let body = json!({"remote_request_id": id, "reason": reason}).to_string();
    match call(
        endpoint,
        "POST",
        "/nixl/notify",
        Some(body.into_bytes()),
        SIDE_CHANNEL_TIMEOUT,
    )
    .await
    {
        Ok((200, _)) => true,
        Ok((s, _)) => {
            tracing::warn!(endpoint, id, status = s, "notify refused");
            shared.update(|i| i.counters.side_channel_errors += 1);
            false
        }
        Err(e) => {
            tracing::warn!(endpoint, id, error = %e, "notify failed");
            shared.update(|i| i.counters.side_channel_errors += 1);
            false
        }
    }
}

/// Why a pull failed (always surfaces as a KV load failure).
#[derive(Debug)]
pub struct PullError(pub String);

/// Handshake (cached per endpoint), transfer sleep, then `/nixl/read` at the end of the
/// transfer, as vLLM frees P's blocks only once the read completed (§7.10.1 step 3).
pub async fn pull(
    shared: &Shared,
    t: &DecodeTarget,
    transfer: Duration,
    prompt_tokens: u64,
    prompt_hash: &str,
    side_channel_down: bool,
) -> Result<(), PullError> {
    if side_channel_down {
        shared.update(|i| i.counters.side_channel_errors += 1);
        return Err(PullError("side channel down (injected)".into()));
    }
    let cached = shared.read(|i| i.handshakes.get(&t.endpoint).cloned());
    let remote_engine = match cached {
        Some(e) => e,
        None => {
            let r = call(&t.endpoint, "GET", "/nixl/meta", None, SIDE_CHANNEL_TIMEOUT).await;
            let meta: Value = match r {
                Ok((200, b)) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                Ok((s, _)) => return Err(PullError(format!("handshake status {s}"))),
                Err(e) => {
                    shared.update(|i| i.counters.side_channel_errors += 1);
                    return Err(PullError(e));
                }
            };
            let e = meta
                .get("engine_id")
                .and_then(Value::as_str)
                .ok_or_else(|| PullError("handshake without engine_id".into()))?
                .to_string();
            shared.update(|i| i.handshakes.insert(t.endpoint.clone(), e.clone()));
            e
        }
    };
    if remote_engine != t.engine_id {
        return Err(PullError("Remote NIXL agent engine ID mismatch".into()));
    }
    tokio::time::sleep(transfer).await;
    let body = json!({
        "remote_request_id": t.remote_request_id,
        "engine_id": t.engine_id,
        "block_ids": t.block_ids,
        "prompt_tokens": prompt_tokens,
        "prompt_hash": prompt_hash,
        "consumer_engine_id": shared.engine_id(),
    })
    .to_string();
    match call(
        &t.endpoint,
        "POST",
        "/nixl/read",
        Some(body.into_bytes()),
        SIDE_CHANNEL_TIMEOUT,
    )
    .await
    {
        Ok((200, _)) => Ok(()),
        Ok((404, _)) => {
            let policy = shared.read(|i| i.cfg.on_unknown_lease);
            match policy {
                OnUnknownLease::Fail => Err(PullError("unknown lease".into())),
                OnUnknownLease::Stale => {
                    tracing::warn!(id = %t.remote_request_id, "stale KV read: lease unknown on P");
                    shared.update(|i| i.counters.decode_stale_reads += 1);
                    Ok(())
                }
            }
        }
        Ok((s, b)) => Err(PullError(format!(
            "read status {s}: {}",
            String::from_utf8_lossy(&b)
        ))),
        Err(e) => {
            shared.update(|i| i.counters.side_channel_errors += 1);
            Err(PullError(e))
        }
    }
}

/// Heartbeat mode on D: every `kv_lease_duration/6`, extend the leases of every decode
/// request still waiting for its pull, batched per prefiller.
pub async fn heartbeat_loop(shared: std::sync::Arc<Shared>) {
    loop {
        let (interval, on) = shared.read(|i| {
            let on = i.cfg.effective_lease_mode() == super::config::LeaseMode::Heartbeat;
            (
                Duration::from_millis((i.cfg.kv_lease_duration_ms / 6).max(10)),
                on,
            )
        });
        tokio::time::sleep(interval).await;
        if !on {
            continue;
        }
        let mut by_ep: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        shared.read(|i| {
            for f in i.in_flight.values() {
                if let Some((ep, id)) = &f.pull {
                    by_ep.entry(ep.clone()).or_default().push(id.clone());
                }
            }
        });
        for (ep, ids) in by_ep {
            let body = json!({"remote_request_ids": ids}).to_string();
            match call(
                &ep,
                "POST",
                "/nixl/heartbeat",
                Some(body.into_bytes()),
                SIDE_CHANNEL_TIMEOUT,
            )
            .await
            {
                Ok((200, _)) => shared.update(|i| i.counters.heartbeats_sent += 1),
                _ => shared.update(|i| i.counters.side_channel_errors += 1),
            }
        }
    }
}
