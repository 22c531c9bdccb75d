//! The P/D request path: read the body, prefill, build the decode leg, stream the decode back.
//!
//! [`serve`] holds the stages in order; the prefill leg is in `prefill.rs`, and what becomes of
//! each leg when the client leaves (the KV-lease safety net) is in `handoff.rs`. This module
//! sees only its [`PdContext`], never the router's state, and returns errors for the router
//! to log, count and answer once.

mod bootstrap;
mod breaker;
mod chunked;
mod concurrent;
mod decode_first;
mod handoff;
mod kv_source;
mod local;
mod prefill;
mod retry;

pub use bootstrap::Bootstraps;
pub use breaker::{BreakerPolicy, Breakers};
pub use kv_source::serve as serve_with_kv_source;
pub use local::serve as serve_local;
pub use retry::RetryPolicy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, debug_span, trace, warn, Instrument};

use crate::api::Api;
use crate::body::{self, CollectError, ProxyBody};
use crate::connector::{Connector, Flow, Handoff, Pairing, PairingPorts};
use crate::error::{describe, ProxyError};
use crate::headers::{self, DATA_PARALLEL_RANK, PREFILL_FALLBACK, REQUEST_ID};
use crate::json_edit::{JsonObject, ParseError};
use crate::observe::metrics::{Metrics, RequestGuard};
use crate::observe::otel::spans::TraceParent;
use crate::observe::trace_context;
use crate::security::client_params;
use crate::upstream::decoder::from_upstream;
use crate::upstream::{Decoder, Leg, Upstream};
use opentelemetry::KeyValue;

use handoff::{Abandoned, LateReplyRelease};
use prefill::{Attempts, Prefilled};

/// What to do when the prefill leg fails on the upstream's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillFailurePolicy {
    /// Return the failure to the client (502/503/504).
    Error,
    /// Decode without KV handoff, so the user still gets an answer (slower: full prefill on D).
    DecodeLocal,
}

impl std::str::FromStr for PrefillFailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Self::Error),
            "decode-local" => Ok(Self::DecodeLocal),
            other => Err(format!(
                "unknown policy '{other}' (expected error or decode-local)"
            )),
        }
    }
}

/// What the P/D path needs, and nothing else of the proxy's.
pub struct PdContext {
    pub connector: Connector,
    pub decoder: Arc<Decoder>,
    /// The client for prefill legs.
    pub upstream: Upstream,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    pub prefill_timeout: Duration,
    pub prefill_failure_policy: PrefillFailurePolicy,
    pub prefill_retry: RetryPolicy,
    /// The prefillers' circuit breakers (shared by the data-parallel ranks).
    pub breakers: Arc<Breakers>,
    /// `-tokenize-once`: nixlv2 chat decodes reuse the prefill's prompt token ids.
    pub tokenize_once: bool,
    /// How long an abandoned pinned decode may stay open to be admitted.
    pub decode_admission_grace: Duration,
    /// How long an abandoned prefill vLLM received may run on for its reply (`handoff.rs`).
    pub late_reply_window: Duration,
    /// For the retry count; everything else is counted by the request's guard.
    pub metrics: Metrics,
    /// The prefill pod's ports a connector's pairing names (SGLang, P2P, Mooncake).
    pub pairing_ports: PairingPorts,
    /// The prefillers' Mooncake engines (shared by the data-parallel ranks).
    pub bootstraps: Arc<bootstrap::Bootstraps>,
    /// `-rewrite-cached-tokens`: nixlv2 decodes report the prefiller's cached tokens.
    pub rewrite_cached_tokens: bool,
    /// `-trust-client-kv-params`: the client's transfer parameters are not removed (here and
    /// on pass-through; see `security::client_params`).
    pub trust_client_kv_params: bool,
    /// `-ec-connector`: what the encoders named in `x-encoder-hosts-ports` are called for.
    pub ec_connector: Option<crate::encode::EcConnector>,
    /// `-decode-chunk-size`: chat decodes in requests of at most this many tokens; 0: off.
    pub decode_chunk_size: u32,
}

/// Runs the connector's P/D flow for one request. `route.prefillers` holds the one picked first,
/// then the ones a retry may go to.
pub async fn serve(
    cx: &PdContext,
    req: Request<Incoming>,
    route: crate::routing::Pd,
    client: SocketAddr,
    guard: &mut RequestGuard,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let crate::routing::Pd {
        api,
        prefillers,
        kv_source,
        encoders,
    } = route;
    let Some(prefiller) = prefillers.first().cloned() else {
        return Err(ProxyError::Internal("P/D without a prefiller".into()));
    };

    // 1. The client's request, whole, and the head both legs share.
    let (parts, original, request_id) = read_request(cx, req, client, guard).await?;
    let original = encode_stage(cx, &parts, original, &encoders, &request_id).await?;
    let request = parse(&original)?;
    guard.annotate(|| {
        let streaming = request.get("stream").is_some_and(|v| v.get() == "true");
        [KeyValue::new("llm_d.pd_proxy.decode.streaming", streaming)]
    });

    // 2. Prefill, unless the decoder is known to be down: the prefiller would pin KV blocks
    //    for a decode that cannot happen.
    if let Err(e) = cx.decoder.health().check().await {
        return Err(cx.decoder.unreachable(format!("{e} (no prefill was sent)")));
    }
    let mut pairing = Pairing::new(cx.pairing_ports);
    // Routing names a source only where the prefill can pull from it (vLLM's P2P tier).
    pairing.kv_source_host = kv_source.map(|s| s.host().to_owned());
    // vLLM renders the messages anyway for echo: the ids would be bytes for nothing.
    pairing.tokenize_once = cx.tokenize_once
        && api == crate::api::Api::ChatCompletions
        && request.get("echo").is_none_or(|v| v.get() != "true");
    let decode_uri = cx.decoder.uri(parts.uri.path_and_query());
    let flow = cx.connector.flow(&request);
    if flow == Flow::DecodeFirst {
        guard.decode_first();
        let tried = decode_first::try_decode(cx, &parts, &original, decode_uri.clone());
        match tried.instrument(debug_span!("decode_first")).await? {
            decode_first::Tried::Answered(resp) => return Ok(with_request_id(resp, request_id)),
            decode_first::Tried::BelowThreshold => {
                guard.decode_refused();
                debug!("below the decoder's cache hit threshold: prefilling remotely");
            }
        }
    }
    if flow == Flow::Concurrent {
        // Both legs name one prefiller: the first whose breaker would let it through.
        let Some(prefiller) = prefillers.iter().find(|p| cx.breakers.usable(p)).cloned() else {
            return Err(prefill::all_open(&prefillers, &cx.breakers));
        };
        let mut prefill_head = Arc::clone(&parts);
        if cx.connector == Connector::Mooncake {
            pairing.engine = cx
                .bootstraps
                .engine(&cx.upstream, &prefiller, pairing.mooncake_port)
                .await?;
            // vLLM's Mooncake prefiller serves the rank its engine was looked up for.
            if let Ok(rank) = HeaderValue::from_str(&pairing.engine.dp_rank) {
                let mut head = (*parts).clone();
                head.headers.insert(DATA_PARALLEL_RANK, rank);
                prefill_head = Arc::new(head);
            }
        }
        let legs = concurrent::Legs {
            prefill_head,
            prefill_body: cx
                .connector
                .prefill_body(api, &request, &pairing, prefiller.host()),
            decode_head: parts,
            decode_body: cx
                .connector
                .decode_plan(
                    &request,
                    &original,
                    &bytes::Bytes::new(),
                    &pairing,
                    prefiller.host(),
                )
                .map_err(|e| ProxyError::Internal(e.to_string()))?
                .body,
        };
        guard.prefill_started();
        let served = concurrent::serve(cx, legs, prefiller.clone(), decode_uri, guard).await;
        if served
            .as_ref()
            .map_or(true, |r| r.status().is_server_error())
        {
            // A restarted prefiller has a new engine: ask its bootstrap again next time.
            cx.bootstraps.forget(&prefiller);
        }
        return Ok(with_request_id(served?, request_id));
    }
    let prefill_body = cx
        .connector
        .prefill_body(api, &request, &pairing, prefiller.host());
    trace!(body = %prefill_body, "prefill request");
    guard.prefill_started();
    let release = cx
        .connector
        .pins_prefill_blocks()
        .then(|| LateReplyRelease {
            connector: cx.connector,
            original: original.clone(),
            head: Arc::clone(&parts),
            uri: decode_uri.clone(),
            upstream: cx.decoder.upstream().clone(),
            grace: cx.decode_admission_grace,
            pairing: pairing.clone(),
        });
    let abandoned = Abandoned::default();
    let prefill_leg = {
        let (upstream, metrics, head) =
            (cx.upstream.clone(), cx.metrics.clone(), Arc::clone(&parts));
        let (policy, abandoned) = (cx.prefill_retry, abandoned.clone());
        let breakers = Arc::clone(&cx.breakers);
        async move {
            let attempts = Attempts {
                upstream: &upstream,
                body: &prefill_body,
                prefillers: &prefillers,
                policy,
                breakers: &breakers,
                abandoned: &abandoned,
                metrics: &metrics,
            };
            prefill::prefill(attempts, |to, body| {
                leg(&head, to.uri(head.uri.path_and_query()), body)
            })
            .await
        }
        .instrument(debug_span!("prefill"))
    };
    let watch = abandoned.clone();
    let pending = handoff::send_prefill(prefill_leg, release, abandoned, cx.late_reply_window);
    let prefilled = match crate::runtime::within(cx.prefill_timeout, pending.result()).await {
        Ok(Ok(prefilled)) => prefilled,
        Ok(Err(task)) => Err(ProxyError::Internal(task)),
        Err(_) => {
            // The sidecar ends the attempt itself: its breaker hears of it here.
            let in_flight = watch.in_flight().unwrap_or_else(|| prefiller.clone());
            cx.breakers.timed_out(&in_flight);
            Err(ProxyError::Timeout {
                leg: Leg::Prefill,
                target: in_flight.authority().to_string(),
                after: cx.prefill_timeout,
            })
        }
    };
    let (reply, answered) = match prefilled {
        Ok(Prefilled::Reply { body, from }) => {
            if from != prefiller {
                // A retry moved on: the request's logs name the prefiller that answered.
                guard
                    .span()
                    .record("prefiller", tracing::field::display(from.authority()));
            }
            (body, from)
        }
        Ok(Prefilled::Rejected(resp)) => {
            guard.prefill_failed();
            return Ok(with_request_id(resp, request_id));
        }
        Err(e) if cx.prefill_failure_policy == PrefillFailurePolicy::DecodeLocal => {
            guard.prefill_failed();
            return decode_local(cx, &parts, &request, &original, decode_uri, request_id, e).await;
        }
        Err(e) => return Err(e),
    };
    guard.prefill_done();
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;

    // 3. The decode leg, from the original request and the prefiller's reply.
    let plan =
        match cx
            .connector
            .decode_plan(&request, &original, &reply, &pairing, answered.host())
        {
            Ok(plan) => plan,
            Err(e) => {
                let e = ProxyError::PrefillBadReply {
                    prefiller: answered.authority().to_string(),
                    detail: e.to_string(),
                };
                if cx.prefill_failure_policy == PrefillFailurePolicy::DecodeLocal {
                    // A 2xx that cannot be used may still have pinned blocks: they wait for their
                    // lease, as after any unusable reply; the user gets an answer.
                    return decode_local(
                        cx, &parts, &request, &original, decode_uri, request_id, e,
                    )
                    .await;
                }
                return Err(e);
            }
        };
    let recompute = matches!(plan.handoff, Handoff::LocalPrefill(_));
    if let Handoff::LocalPrefill(why) = plan.handoff {
        warn!(reason = why, "decoder will prefill locally: no KV handoff");
        cx.metrics.degraded("no_kv_params");
    }
    trace!(body = %plan.body, "decode request");

    // 4. Decode, streamed back unbuffered. A decode after blocks were pinned is delivered
    //    even if the client leaves, so the decoder releases them (see `handoff.rs`).
    let pinned = cx.connector.pins_prefill_blocks() && plan.handoff == Handoff::Remote;
    let chunking = (api == crate::api::Api::ChatCompletions)
        .then(|| chunked::applies(cx.decode_chunk_size, &request))
        .flatten();
    if let Some(chunking) = chunking {
        let first = chunked::FirstChunk {
            body: plan.body,
            pinned,
        };
        let resp = chunked::decode(cx, parts, decode_uri, original.clone(), first, chunking)
            .instrument(debug_span!("chunked_decode"))
            .await?;
        return Ok(with_request_id(degraded(resp, recompute), request_id));
    }
    let resp = if pinned {
        let sent = handoff::deliver_then_close(
            cx.decoder.upstream(),
            leg_parts(&parts, decode_uri),
            plan.body,
            cx.decode_admission_grace,
        );
        cx.decoder
            .within_deadline(sent.response())
            .instrument(debug_span!("decode"))
            .await
            .inspect_err(|_| {
                // vLLM offers no call to free them (handing the decode to the prefiller
                // itself fails its NIXL handshake); the router logs the failure itself.
                debug!("decode failed after the prefill: its KV blocks wait for their lease");
            })?
    } else {
        cx.decoder
            .send(leg(&parts, decode_uri, body::spliced(plan.body)))
            .instrument(debug_span!("decode"))
            .await?
    };
    // Per request, so debug: at info the sidecar logs only what needs attention.
    debug!(
        prefill_ms = format_args!("{prefill_ms:.1}"),
        status = resp.status().as_u16(),
        "decode started"
    );
    let mut resp = from_upstream(resp);
    if cx.rewrite_cached_tokens && cx.connector == Connector::NixlV2 && pinned {
        let cached = body::usage::cached_tokens(&reply);
        let sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        resp.headers_mut().remove(CONTENT_LENGTH);
        resp = resp.map(|b| body::boxed(body::usage::CachedTokens::new(b, cached, sse)));
    }
    Ok(with_request_id(degraded(resp, recompute), request_id))
}

/// Reads the client's request whole, within `-max-request-body-size`, and cleans the head both
/// legs share: hop-by-hop and routing headers out, `x-forwarded-for`, one request id and one
/// trace id in.
async fn read_request(
    cx: &PdContext,
    req: Request<Incoming>,
    client: SocketAddr,
    guard: &mut RequestGuard,
) -> Result<(Arc<Parts>, bytes::Bytes, HeaderValue), ProxyError> {
    let (mut parts, body) = req.into_parts();
    let original = read_body(body, cx.max_body_bytes).await?;
    guard.request_bytes(original.len());
    // The client's transfer parameters go before any leg is built from its body; every
    // route here is an inference route.
    let original = match Api::for_path(parts.uri.path()) {
        Some(api) if !cx.trust_client_kv_params => {
            client_params::scrub(api, original, &cx.metrics)?
        }
        _ => original,
    };
    headers::for_upstream(&mut parts.headers);
    headers::append_forwarded_for(&mut parts.headers, client.ip());
    let request_id = headers::request_id(&parts.headers);
    parts.headers.insert(REQUEST_ID, request_id.clone());
    // Every leg carries a rewritten body; hyper sets the right length for each.
    parts.headers.remove(CONTENT_LENGTH);
    // Both legs clone these headers, so they share the trace id.
    let trace_id = trace_context::ensure_traceparent(&mut parts.headers);
    trace_context::record_ids(guard.span(), &request_id, &trace_id);
    guard.annotate(|| {
        let id = String::from_utf8_lossy(request_id.as_bytes()).into_owned();
        [KeyValue::new("llm_d.pd_proxy.request_id", id)]
    });
    trace!(body = %String::from_utf8_lossy(&original), "client request");
    // Shared with the late-reply release, which needs the head only if the client leaves.
    Ok((Arc::new(parts), original, request_id))
}

/// The client's body, whole, within `limit` bytes (413 beyond it).
pub(crate) async fn read_body(body: Incoming, limit: usize) -> Result<bytes::Bytes, ProxyError> {
    body::collect_limited(body, limit)
        .await
        .map_err(|e| match e {
            CollectError::TooLarge => ProxyError::BodyTooLarge { limit },
            CollectError::Read(e) => ProxyError::BodyRead(describe(&*e)),
        })
}

/// The encode stage (E/PD), when the request names allowed encoders and `-ec-connector` is
/// set: the body the prefill and decode legs then start from.
async fn encode_stage(
    cx: &PdContext,
    parts: &Parts,
    original: bytes::Bytes,
    encoders: &crate::routing::Encoders,
    request_id: &HeaderValue,
) -> Result<bytes::Bytes, ProxyError> {
    let Some(connector) = cx.ec_connector.filter(|_| !encoders.allowed.is_empty()) else {
        return Ok(original);
    };
    let request = parse(&original)?;
    let stage = crate::encode::Encode {
        connector,
        upstream: &cx.upstream,
        encoders: &encoders.allowed,
        request_id,
        head: parts,
        timeout: cx.prefill_timeout,
        metrics: &cx.metrics,
    };
    let encoded = crate::encode::run(stage, &request).await?;
    drop(request);
    Ok(encoded.unwrap_or(original))
}

/// The client's body as the JSON object every P/D route takes.
fn parse(original: &bytes::Bytes) -> Result<JsonObject<'_>, ProxyError> {
    JsonObject::parse(original).map_err(|e| match e {
        ParseError::Invalid(e) => ProxyError::InvalidJson(e),
        ParseError::NotObject => ProxyError::NotAnObject,
    })
}

/// `-prefill-failure-policy=decode-local`: the decoder prefills itself, without KV handoff.
async fn decode_local(
    cx: &PdContext,
    parts: &Parts,
    request: &JsonObject<'_>,
    original: &bytes::Bytes,
    decode_uri: http::Uri,
    request_id: HeaderValue,
    failure: ProxyError,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Logged here because the client gets a 2xx: no error reaches the router.
    warn!(error = %failure, "prefill failed; decoding locally (-prefill-failure-policy=decode-local)");
    let body = cx.connector.local_decode_body(request, original);
    let resp = cx
        .decoder
        .send(leg(parts, decode_uri, body::spliced(body)))
        .await?;
    cx.metrics.degraded("decode_local");
    let mut resp = with_request_id(from_upstream(resp), request_id);
    resp.headers_mut()
        .insert(PREFILL_FALLBACK, HeaderValue::from_static("decode-local"));
    Ok(resp)
}

/// Marks a decode the decoder prefilled itself because the prefiller returned no usable
/// `kv_transfer_params` (router#2855: the recompute is otherwise silent).
fn degraded(mut resp: Response<ProxyBody>, recompute: bool) -> Response<ProxyBody> {
    if recompute {
        resp.headers_mut()
            .insert(PREFILL_FALLBACK, HeaderValue::from_static("no-kv-params"));
    }
    resp
}

/// The head of a leg: POST to `uri` over HTTP/1.1 with the client's (cleaned) headers.
fn leg_parts(parts: &Parts, uri: http::Uri) -> Parts {
    let (mut leg, ()) = Request::new(()).into_parts();
    leg.method = Method::POST;
    leg.uri = uri;
    leg.version = Version::HTTP_11;
    leg.headers = parts.headers.clone();
    // A traced request's legs open their spans under the request's.
    if let Some(parent) = parts.extensions.get::<TraceParent>() {
        leg.extensions.insert(parent.clone());
    }
    leg
}

fn leg(parts: &Parts, uri: http::Uri, body: ProxyBody) -> Request<ProxyBody> {
    Request::from_parts(leg_parts(parts, uri), body)
}

/// Tells the client which id both legs used, unless the decoder already did.
fn with_request_id(mut resp: Response<ProxyBody>, id: HeaderValue) -> Response<ProxyBody> {
    resp.headers_mut().entry(REQUEST_ID).or_insert(id);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().remove(REQUEST_ID);
    }
    resp
}
