//! Intake of `/v1/completions` and `/v1/chat/completions`: logging, validation, faults,
//! classification (§7.5), ids (§7.6); then hands the request to an engine task.

use super::config::Protocol;
use super::counters::Class;
use super::decode::{self, DecodeTarget};
use super::engine::{Head, Job, Overrides};
use super::faults::Faults;
use super::handoff::{self, Leg};
use super::http_util::{ApiError, Resp, SimBody};
use super::p2p_source;
use super::reqlog::RequestRecord;
use super::state::{Flight, Shared};
use super::validate::{self, Endpoint, Forwarded};
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Lowercase header name -> all values, for the request log.
pub fn header_map(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        m.entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    m
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    header_str(h, name).and_then(|v| v.trim().parse().ok())
}

/// Appends a log record and returns its seq.
pub fn log_request(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> u64 {
    let t_ms = shared.t_ms();
    shared.update(|i| {
        i.next_seq += 1;
        let seq = i.next_seq;
        i.log.push(RequestRecord {
            seq,
            t_ms,
            method: method.into(),
            path: path.into(),
            headers: header_map(headers),
            body: String::from_utf8_lossy(body).into_owned(),
            ignored_fields: vec![],
            class: None,
            public_id: None,
            internal_id: None,
            status: None,
            outcome: None,
            disconnect_at_ms: None,
            first_byte_ms: None,
            events_sent: 0,
            p2p_source: None,
            prompt_token_ids: None,
        });
        seq
    })
}

/// Public id, internal id (the P-side lease key), and D's unsuffixed id (§7.6).
struct Ids {
    public: String,
    internal: String,
    unsuffixed: String,
}

fn base_id(headers: &HeaderMap, body: Option<&Map<String, Value>>) -> Option<String> {
    header_str(headers, "x-request-id")
        .map(str::to_string)
        .or_else(|| body?.get("request_id")?.as_str().map(str::to_string))
}

fn unsuffixed_id(endpoint: Endpoint, base: &str) -> String {
    endpoint.unsuffixed_id(base)
}

/// Counts a rejection (§7.4) and, for a remote-prefill request, tells P (§7.10.3).
async fn reject(
    shared: &Shared,
    seq: u64,
    err: ApiError,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Option<&Map<String, Value>>,
) -> Resp {
    let cfg = shared.read(|i| i.cfg.clone());
    if let Some(Ok(Leg::Prefill { key })) = body.map(|b| handoff::classify(&cfg, b)) {
        // A keyed prefill that never runs leaves no KV: its decoder fails at once (§7.18).
        shared.update(|i| i.mark_handoff_failed(&key));
    }
    if cfg.notify_on_reject {
        if let Some(body) = body {
            let own = base_id(headers, Some(body)).map(|b| unsuffixed_id(endpoint, &b));
            if let Some((ep, id)) = decode::reject_target(&cfg, body, own.as_deref()) {
                if decode::notify(shared, &ep, &id, "rejected").await {
                    shared.update(|i| i.counters.decode_reject_notifies_sent += 1);
                }
            }
        }
    }
    shared.update(|i| {
        i.counters.requests_rejected += 1;
        if let Some(r) = i.log.get_mut(seq) {
            r.status = Some(err.status);
            r.outcome = Some("rejected");
        }
    });
    super::wire::error_response(endpoint, &err, cfg.error_format)
}

/// Malformed `kv_transfer_params` under `--on-invalid-kv-params reject` (§7.10.1 step 1).
fn invalid_params(reason: &str) -> ApiError {
    ApiError::new(
        400,
        "BadRequestError",
        format!("invalid kv_transfer_params: {reason}"),
    )
    .param("kv_transfer_params")
}

/// A duplicate id or key: counted as a rejection, nothing sent to a prefiller.
fn reject_dup(
    shared: &Shared,
    seq: u64,
    err: ApiError,
    endpoint: Endpoint,
    fmt: super::config::ErrorFormat,
) -> Resp {
    shared.update(|i| {
        i.counters.requests_rejected += 1;
        if let Some(r) = i.log.get_mut(seq) {
            r.status = Some(err.status);
            r.outcome = Some("rejected");
        }
    });
    super::wire::error_response(endpoint, &err, fmt)
}

/// Handles one generation request end to end. `Err` makes hyper close the connection
/// without a response (fault `drop_before_headers`).
pub async fn handle(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Resp, std::io::Error> {
    let (parts, body) = req.into_parts();
    let raw = body
        .collect()
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e))?
        .to_bytes();
    let h = &parts.headers;
    let seq = log_request(&shared, parts.method.as_str(), parts.uri.path(), h, &raw);
    let (cfg, inst_faults) = shared.update(|i| {
        i.counters.requests_total += 1;
        (i.cfg.clone(), i.faults.clone())
    });
    let fmt = cfg.error_format;

    let mut hdr_faults = Faults::default();
    if let Some(v) = header_str(h, "x-sim-fault") {
        if let Err(e) = hdr_faults.parse_list(v) {
            let err = ApiError::validation(fmt, format!("x-sim-fault: {e}"));
            return Ok(reject(&shared, seq, err, endpoint, h, None).await);
        }
    }
    let faults = inst_faults.merged(&hdr_faults);

    let mut parsed = match validate::parse(endpoint, header_str(h, "content-type"), &raw, &cfg) {
        Ok(p) => p,
        Err(rej) => {
            return Ok(reject(&shared, seq, rej.error, endpoint, h, rej.body.as_ref()).await)
        }
    };
    // An encoder's chat request (§7.23) is neither leg of a P/D pair, and is answered in one
    // body: the sidecar's encoder calls are never streamed.
    let encoder = cfg.mm_encoder_only && endpoint == Endpoint::Chat;
    if encoder {
        parsed.stream = false;
        parsed.include_usage = false;
    }

    let base =
        base_id(h, Some(&parsed.body)).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let unsuffixed = unsuffixed_id(endpoint, &base);
    let public = endpoint.public_id(&base);

    // Classification (§7.5); prefill wins if both flags are set, like vLLM's branch order.
    let mut class = Class::Plain;
    let mut target: Option<DecodeTarget> = None;
    let mut without_params = false;
    let mut handoff_target: Option<handoff::Target> = None;
    let mut handoff_key: Option<String> = None;
    match cfg.protocol {
        _ if encoder => {}
        _ if cfg.keyed_handoff() => match handoff::classify(&cfg, &parsed.body) {
            Ok(Leg::Plain) => {}
            Ok(Leg::Prefill { key }) => {
                class = Class::Prefill;
                handoff_key = Some(key);
            }
            Ok(Leg::Decode(t)) => {
                class = Class::Decode;
                handoff_target = Some(t);
            }
            Err(handoff::Invalid::Field { param, message }) => {
                let err = ApiError::validation(fmt, message).param(param);
                return Ok(reject(&shared, seq, err, endpoint, h, Some(&parsed.body)).await);
            }
            Err(handoff::Invalid::Params(reason)) => {
                shared.update(|i| i.counters.decode_invalid_kv_params += 1);
                tracing::warn!(%reason, "Got invalid KVTransferParams");
                if cfg.on_invalid_kv_params == super::config::OnInvalidKvParams::Reject {
                    let err = invalid_params(&reason);
                    return Ok(reject(&shared, seq, err, endpoint, h, Some(&parsed.body)).await);
                }
            }
        },
        Protocol::Lmcache => {
            // Completions has no `max_completion_tokens`, but llm-d's lmcache connector sets
            // both; the other APIs have one limit, already in `max_tokens`.
            let classic = matches!(endpoint, Endpoint::Completions | Endpoint::Chat);
            let limit = parsed.max_tokens.or_else(|| {
                parsed
                    .body
                    .get("max_completion_tokens")
                    .and_then(Value::as_u64)
                    .filter(|_| classic)
            });
            class = if limit == Some(1) {
                Class::Prefill
            } else {
                Class::Decode
            };
        }
        p => {
            if decode::wants_remote_decode(p, &parsed.body) {
                class = Class::Prefill;
            } else if decode::wants_remote_prefill(p, &parsed.body) {
                match decode::validate_params(&cfg, &parsed.body, &unsuffixed) {
                    Ok(v) => {
                        class = Class::Decode;
                        target = Some(v.target);
                        if v.flat_in_era_c {
                            shared.update(|i| i.counters.decode_block_ids_flat_in_era_c += 1);
                        }
                    }
                    Err(reason) => {
                        shared.update(|i| i.counters.decode_invalid_kv_params += 1);
                        tracing::warn!(%reason, "Got invalid KVTransferParams");
                        if cfg.on_invalid_kv_params == super::config::OnInvalidKvParams::Reject {
                            let err = invalid_params(&reason);
                            return Ok(
                                reject(&shared, seq, err, endpoint, h, Some(&parsed.body)).await
                            );
                        }
                    }
                }
            } else if p == Protocol::Nixlv2
                && parsed.body.get("kv_transfer_params") == Some(&Value::Null)
            {
                without_params = true;
            }
        }
    }

    // A KV source (§7.22) is read where vLLM's P2P tier runs beside the handoff; a decode
    // loads from its prefiller instead (vLLM prefers `remote_prefiller` too).
    let mut source = None;
    if matches!(cfg.protocol, Protocol::Nixlv2 | Protocol::Offloading)
        && class != Class::Decode
        && !encoder
    {
        match p2p_source::parse(&parsed.body) {
            Ok(s) => source = s,
            Err(reason) => {
                shared.update(|i| i.counters.decode_invalid_kv_params += 1);
                tracing::warn!(%reason, "Got invalid KVTransferParams");
                if cfg.on_invalid_kv_params == super::config::OnInvalidKvParams::Reject {
                    let err = invalid_params(&reason);
                    return Ok(reject(&shared, seq, err, endpoint, h, Some(&parsed.body)).await);
                }
            }
        }
    }

    // vLLM-based keyed protocols suffix ids like Era B/C; SGLang keeps the request's rid.
    let suffixed = decode::uses_remote_request_id(&cfg)
        || matches!(cfg.protocol, Protocol::Offloading | Protocol::Mooncake);
    let internal = if suffixed {
        let sfx = shared.update(|i| i.next_rand()) as u32;
        format!("{unsuffixed}-{sfx:08x}")
    } else {
        unsuffixed.clone()
    };
    let ids = Ids {
        public,
        internal,
        unsuffixed,
    };

    // Register in flight; an in-flight duplicate internal id (Era A only) is rejected.
    let pull = target
        .as_ref()
        .map(|t| (t.endpoint.clone(), t.remote_request_id.clone()));
    let key_in_use = |i: &super::state::Inner, k: &str| {
        i.kv.is_held(k)
            || i.in_flight
                .values()
                .any(|f| f.handoff_key.as_deref() == Some(k))
    };
    let dup = shared.update(|i| {
        if i.in_flight.values().any(|f| f.internal_id == ids.internal) {
            return Some((
                true,
                format!("Request id {} already running.", ids.internal),
            ));
        }
        if let Some(k) = &handoff_key {
            if key_in_use(i, k) {
                return Some((false, format!("KV transfer key {k} already in use.")));
            }
            i.clear_handoff_failed(k);
        }
        if without_params {
            i.counters.decode_without_kv_params += 1;
        }
        match parsed.forwarded {
            Some(Forwarded::Reused) => i.counters.prompt_token_ids_reused += 1,
            Some(Forwarded::Ignored) => i.counters.prompt_token_ids_ignored += 1,
            None => {}
        }
        i.in_flight.insert(
            seq,
            Flight {
                class,
                queued: true,
                internal_id: ids.internal.clone(),
                pull,
                handoff_key: handoff_key.clone(),
            },
        );
        i.queue.push_back(seq);
        if let Some(r) = i.log.get_mut(seq) {
            r.class = Some(class);
            r.public_id = Some(ids.public.clone());
            r.internal_id = Some(ids.internal.clone());
            r.ignored_fields = parsed.ignored_fields.clone();
            r.prompt_token_ids = parsed.forwarded.map(Forwarded::as_str);
        }
        None
    });
    if let Some((by_id, msg)) = dup {
        let err = ApiError::new(400, "BadRequestError", msg);
        if by_id && handoff_key.is_none() {
            return Ok(reject(&shared, seq, err, endpoint, h, Some(&parsed.body)).await);
        }
        // Not through `reject`'s failure mark: the key belongs to the other request.
        return Ok(reject_dup(&shared, seq, err, endpoint, cfg.error_format));
    }
    tracing::debug!(seq, class = class.as_str(), id = %ids.internal, unsuffixed = %ids.unsuffixed, "request admitted to queue");

    let overrides = Overrides {
        ttft_ms: header_u64(h, "x-sim-ttft-ms"),
        itl_ms: header_u64(h, "x-sim-itl-ms"),
        tokens: header_u64(h, "x-sim-tokens"),
    };
    let (head_tx, head_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(64);
    let job = Job {
        shared: shared.clone(),
        seq,
        received: std::time::Instant::now(),
        parsed,
        class,
        target,
        handoff: handoff_target,
        handoff_key,
        source,
        public_id: ids.public,
        internal_id: ids.internal,
        faults,
        overrides,
        cfg,
        head: Some(head_tx),
        tx,
        blocks: Vec::new(),
        admitted: false,
        status: None,
        events_sent: 0,
        first_byte_ms: None,
        disconnect_at_ms: None,
        tokens: 0,
        finish_reason: "",
        limit: 0,
    };
    shared.spawn(job.run());

    // Awaiting here is what ties the engine to the client: if hyper drops this future (the
    // client went away), `rx` is dropped and the engine sees its sender closed.
    match head_rx.await {
        Ok(Head::Full(resp)) => Ok(resp),
        Ok(Head::Stream) => {
            let mut resp = Resp::new(SimBody::channel(rx));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            Ok(resp)
        }
        Ok(Head::Drop) | Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "dropped",
        )),
    }
}
