//! The P/D request path: read the body, prefill, build the decode leg, stream the decode back.
//!
//! Cancellation is by ownership: the handler future owns the prefill call, and the response
//! body owns the decoder's body, so a client that leaves drops them and hyper closes those
//! upstream connections at once. The one exception is the short hand-off after a prefill that
//! pinned KV blocks: see [`dispatch_decode`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info_span, trace, warn, Instrument};

use crate::body::{self, CollectError, ProxyBody, SentSignal};
use crate::config::PrefillFailurePolicy;
use crate::connector::Handoff;
use crate::error::{describe, Leg, ProxyError};
use crate::headers::{self, REQUEST_ID};
use crate::json_edit::{JsonObject, Spliced};
use crate::metrics::Tracker;
use crate::proxy::{relay_response, Proxy};
use crate::telemetry;
use crate::upstream::{Target, Upstream};

/// The most of a prefill reply we buffer: a one-token completion is a few KiB at most.
const PREFILL_REPLY_LIMIT: usize = 4 << 20;

type UpstreamResult = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

/// Runs the connector's P/D flow for one request, inside the request span `proxy.rs` opened.
pub async fn serve(
    proxy: &Proxy,
    req: Request<Incoming>,
    prefiller: Target,
    client: SocketAddr,
    tracker: &mut Tracker,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let original = body::collect_limited(body, proxy.max_body_bytes)
        .await
        .map_err(|e| match e {
            CollectError::TooLarge => ProxyError::BodyTooLarge {
                limit: proxy.max_body_bytes,
            },
            CollectError::Read(e) => ProxyError::BodyRead(describe(&*e)),
        })?;
    tracker.request_bytes(original.len());
    let request = JsonObject::parse(&original).map_err(|e| match e {
        crate::json_edit::ParseError::Invalid(e) => ProxyError::InvalidJson(e),
        crate::json_edit::ParseError::NotObject => ProxyError::NotAnObject,
    })?;
    headers::for_upstream(&mut parts.headers);
    headers::append_forwarded_for(&mut parts.headers, client.ip());
    let request_id = headers::request_id(&parts.headers);
    parts.headers.insert(REQUEST_ID, request_id.clone());
    // Both legs carry rewritten bodies; hyper sets the right length for each.
    parts.headers.remove(CONTENT_LENGTH);
    // Both legs clone these headers, so they share the trace id.
    let trace_id = telemetry::ensure_traceparent(&mut parts.headers);
    telemetry::record_ids(&request_id, &trace_id);
    // Shared with the rescue below, which needs the head only if the client leaves.
    let parts = Arc::new(parts);
    trace!(body = %String::from_utf8_lossy(&original), "client request");

    // 1. Prefill, unless the decoder is known to be down: the prefiller would pin KV blocks
    //    for a decode that cannot happen.
    if let Err(e) = proxy.decoder_health.check().await {
        return Err(ProxyError::DecoderUnreachable {
            decoder: proxy.decoder.authority().to_string(),
            detail: format!("{e} (no prefill was sent)"),
        });
    }
    let prefill_body = proxy.connector.prefill_body(&request);
    trace!(body = %prefill_body, "prefill request");
    let prefill_req = leg(
        &parts,
        prefiller.uri(parts.uri.path_and_query()),
        body::spliced(prefill_body),
    );
    tracker.prefill_started();
    let decode_uri = proxy.decoder.uri(parts.uri.path_and_query());
    let rescue = proxy.connector.pins_prefill_blocks().then(|| Rescue {
        connector: proxy.connector,
        original: original.clone(),
        head: Arc::clone(&parts),
        uri: decode_uri.clone(),
        upstream: proxy.upstream.clone(),
        grace: proxy.decode_admission_grace,
    });
    let pending = PrefillGuard::send(&proxy.upstream, prefill_req, &prefiller, rescue);
    let prefilled = tokio::time::timeout(proxy.prefill_timeout, pending.result())
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::Timeout {
                leg: Leg::Prefill,
                target: prefiller.authority().to_string(),
                after: proxy.prefill_timeout,
            })
        });
    let reply = match prefilled {
        Ok(Prefilled::Reply(reply)) => reply,
        Ok(Prefilled::Rejected(resp)) => return Ok(with_request_id(resp, request_id)),
        Err(e) if proxy.prefill_failure_policy == PrefillFailurePolicy::DecodeLocal => {
            warn!(error = %e, "prefill failed; decoding locally (-prefill-failure-policy=decode-local)");
            let body = proxy.connector.local_decode_body(&request, &original);
            let resp = send_decode(proxy, leg(&parts, decode_uri, body::spliced(body))).await?;
            let mut resp = with_request_id(relay_response(resp), request_id);
            resp.headers_mut()
                .insert(PREFILL_FALLBACK, HeaderValue::from_static("decode-local"));
            return Ok(resp);
        }
        Err(e) => return Err(e),
    };
    tracker.prefill_done();
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;

    // 2. The decode leg, from the original request and the prefiller's reply.
    let plan = proxy
        .connector
        .decode_plan(&request, &original, &reply)
        .map_err(|e| ProxyError::PrefillBadReply {
            prefiller: prefiller.authority().to_string(),
            detail: e.to_string(),
        })?;
    if let Handoff::LocalPrefill(why) = plan.handoff {
        warn!(reason = why, "decoder will prefill locally: no KV handoff");
    }
    trace!(body = %plan.body, "decode request");

    // 3. Decode, streamed back unbuffered.
    let pinned = proxy.connector.pins_prefill_blocks() && plan.handoff == Handoff::Remote;
    if !pinned {
        let resp = send_decode(proxy, leg(&parts, decode_uri, body::spliced(plan.body)))
            .instrument(info_span!("decode"))
            .await?;
        return Ok(with_request_id(relay_response(resp), request_id));
    }
    let dispatched = tokio::time::timeout(
        proxy.decode_first_byte_timeout,
        dispatch_decode(proxy, leg_parts(&parts, decode_uri), plan.body)
            .instrument(info_span!("decode")),
    )
    .await
    .map_err(|_| decode_timeout(proxy))?;
    match dispatched {
        Ok(resp) => {
            // Per request, so debug: at info the sidecar logs only what needs attention.
            debug!(
                prefill_ms = format_args!("{prefill_ms:.1}"),
                status = resp.status().as_u16(),
                "decode started"
            );
            Ok(with_request_id(relay_response(resp), request_id))
        }
        // The prefiller's blocks stay pinned until its lease expires: vLLM offers no way to
        // free them (handing the decode to the prefiller itself fails its NIXL handshake).
        Err(e) => {
            warn!("decoder unreachable after prefill; the prefiller's KV blocks wait for lease expiry");
            Err(ProxyError::DecoderUnreachable {
                decoder: proxy.decoder.authority().to_string(),
                detail: e,
            })
        }
    }
}

/// Marks a response the decoder produced without the prefiller's KV cache.
const PREFILL_FALLBACK: http::HeaderName = http::HeaderName::from_static("x-prefill-fallback");

/// Sends a decode leg that needs no hand-off care, within the first-byte deadline.
async fn send_decode(
    proxy: &Proxy,
    req: Request<ProxyBody>,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(
        proxy.decode_first_byte_timeout,
        proxy.upstream.send(Leg::Decode, req),
    )
    .await
    {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            proxy.decoder_health.record(&e);
            Err(ProxyError::DecoderUnreachable {
                decoder: proxy.decoder.authority().to_string(),
                detail: describe(&e),
            })
        }
        Err(_) => Err(decode_timeout(proxy)),
    }
}

fn decode_timeout(proxy: &Proxy) -> ProxyError {
    ProxyError::Timeout {
        leg: Leg::Decode,
        target: proxy.decoder.authority().to_string(),
        after: proxy.decode_first_byte_timeout,
    }
}

/// How long a prefill whose client left may still deliver a reply that is already on its way.
/// A prefiller that finished has pinned KV blocks for the reply: reading it lets a decoder
/// release them. One still prefilling is closed after this, so it aborts.
const LATE_REPLY_GRACE: Duration = Duration::from_millis(50);

/// The prefill leg in its own task; dropped before it resolved (the client left, or the prefill
/// timed out), it closes the leg, unless the reply is already arriving (see `LATE_REPLY_GRACE`).
struct PrefillGuard {
    /// `None` once the result was taken.
    pending: Option<JoinHandle<Result<Prefilled, ProxyError>>>,
    /// What hands late-pinned blocks to a decoder; `None` for connectors that pin none.
    rescue: Option<Rescue>,
}

impl PrefillGuard {
    fn send(
        upstream: &Upstream,
        req: Request<ProxyBody>,
        prefiller: &Target,
        rescue: Option<Rescue>,
    ) -> Self {
        let (upstream, prefiller) = (upstream.clone(), prefiller.clone());
        let leg = async move { prefill(&upstream, req, &prefiller).await };
        Self {
            pending: Some(tokio::spawn(leg.instrument(info_span!("prefill")))),
            rescue,
        }
    }

    async fn result(mut self) -> Result<Prefilled, ProxyError> {
        let Some(pending) = self.pending.as_mut() else {
            return Err(ProxyError::BodyRead("the prefill was abandoned".into()));
        };
        let joined = pending.await;
        self.pending = None;
        joined.unwrap_or_else(|e| {
            Err(ProxyError::PrefillBadReply {
                prefiller: String::new(),
                detail: format!("prefill task failed: {e}"),
            })
        })
    }
}

impl Drop for PrefillGuard {
    fn drop(&mut self) {
        let Some(mut pending) = self.pending.take() else {
            return;
        };
        let Some(rescue) = self.rescue.take() else {
            pending.abort();
            return;
        };
        tokio::spawn(async move {
            match tokio::time::timeout(LATE_REPLY_GRACE, &mut pending).await {
                Ok(Ok(Ok(Prefilled::Reply(reply)))) => rescue.release(&reply),
                Ok(_) => {}
                Err(_) => pending.abort(),
            }
        });
    }
}

/// Everything needed to send the decode leg without the client: after a prefill that pinned
/// blocks, a decoder that sees the request (and is then closed) makes the prefiller free them.
struct Rescue {
    connector: crate::connector::Connector,
    original: Bytes,
    /// The client's request head, and the decode leg's address.
    head: Arc<Parts>,
    uri: http::Uri,
    upstream: Upstream,
    grace: Duration,
}

impl Rescue {
    fn release(self, reply: &Bytes) {
        let Ok(request) = JsonObject::parse(&self.original) else {
            return;
        };
        let Ok(plan) = self.connector.decode_plan(&request, &self.original, reply) else {
            return;
        };
        if plan.handoff == Handoff::Remote {
            debug!("client left as its prefill finished; handing the KV blocks to the decoder to release");
            drop(AbandonOnDrop::send(
                &self.upstream,
                Leg::Decode,
                leg_parts(&self.head, self.uri),
                plan.body,
                self.grace,
            ));
        }
    }
}

enum Prefilled {
    /// The prefiller's 2xx body.
    Reply(Bytes),
    /// The prefiller refused the request (4xx): the client gets that answer as is.
    Rejected(Response<ProxyBody>),
}

async fn prefill(
    upstream: &Upstream,
    req: Request<ProxyBody>,
    prefiller: &Target,
) -> Result<Prefilled, ProxyError> {
    let name = || prefiller.authority().to_string();
    let resp =
        upstream
            .send(Leg::Prefill, req)
            .await
            .map_err(|e| ProxyError::PrefillUnreachable {
                prefiller: name(),
                detail: describe(&e),
            })?;
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let body = body::collect_limited(resp.into_body(), PREFILL_REPLY_LIMIT)
        .await
        .map_err(|e| {
            let detail = match e {
                CollectError::TooLarge => format!("reply longer than {PREFILL_REPLY_LIMIT} bytes"),
                CollectError::Read(e) => describe(&*e),
            };
            ProxyError::PrefillBadReply {
                prefiller: name(),
                detail,
            }
        })?;
    debug!(status = status.as_u16(), bytes = body.len(), "prefill done");
    trace!(body = %String::from_utf8_lossy(&body), "prefill reply");
    if status.is_success() {
        return Ok(Prefilled::Reply(body));
    }
    if status.is_client_error() {
        // The prefiller judged the client's request: its answer is the client's answer.
        let mut resp = Response::new(body::full(body));
        *resp.status_mut() = status;
        if let Some(ct) = content_type {
            resp.headers_mut().insert(CONTENT_TYPE, ct);
        }
        return Ok(Prefilled::Rejected(resp));
    }
    Err(ProxyError::PrefillFailed {
        prefiller: name(),
        status,
        detail: upstream_message(&body),
    })
}

/// The `error.message` of a vLLM error body, else the start of the body.
fn upstream_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .and_then(|m| m.as_str())
    });
    match message {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// Sends the decode leg of a request whose prefiller pinned KV blocks for it.
///
/// If the client leaves before the decoder answered, the request is still written out in
/// full and kept open until the decoder shows it admitted the request (see
/// [`close_when_admitted`]): a decoder that saw the request aborts it and tells the
/// prefiller to free the blocks, where a decode never sent would strand them until vLLM's
/// lease timeout (30 s to 480 s, by version).
async fn dispatch_decode(
    proxy: &Proxy,
    parts: Parts,
    body: Spliced,
) -> Result<Response<Incoming>, String> {
    let sent = AbandonOnDrop::send(
        &proxy.upstream,
        Leg::Decode,
        parts,
        body,
        proxy.decode_admission_grace,
    );
    match sent.response().await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            proxy.decoder_health.record(&e);
            Err(describe(&e))
        }
        Err(task) => Err(task),
    }
}

/// An upstream request in its own task; dropped before completion, it lets the request be
/// written out and admitted, then closes it.
struct AbandonOnDrop {
    /// `None` once the response was handed over: nothing left to abandon.
    pending: Option<JoinHandle<UpstreamResult>>,
    /// Resolves with when hyper took the whole body.
    sent: Option<oneshot::Receiver<Instant>>,
    /// The longest an abandoned request stays open after it was sent.
    grace: Duration,
}

impl AbandonOnDrop {
    fn send(upstream: &Upstream, leg: Leg, parts: Parts, body: Spliced, grace: Duration) -> Self {
        let (body, sent) = SentSignal::new(body);
        let req = Request::from_parts(parts, body::relay(body));
        let upstream = upstream.clone();
        Self {
            pending: Some(tokio::spawn(async move { upstream.send(leg, req).await })),
            sent: Some(sent),
            grace,
        }
    }

    /// The upstream's answer; the outer error is the task's own failure.
    async fn response(mut self) -> Result<UpstreamResult, String> {
        let Some(pending) = self.pending.as_mut() else {
            return Err("the request was abandoned".into());
        };
        let joined = pending.await;
        self.pending = None;
        joined.map_err(|e| format!("upstream task failed: {e}"))
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let (Some(pending), Some(sent)) = (self.pending.take(), self.sent.take()) {
            debug!("closing an abandoned upstream request once it is admitted");
            tokio::spawn(close_when_admitted(pending, sent, self.grace));
        }
    }
}

/// Closes an abandoned request once the upstream shows it admitted it, or `grace` after it
/// was sent, whichever comes first. vLLM answers a JSON request only when done, and sends a
/// stream's headers before it admits the request, so the first stream event is the signal;
/// the deadline bounds how long a request nobody reads may keep a GPU busy.
async fn close_when_admitted(
    mut pending: JoinHandle<UpstreamResult>,
    sent: oneshot::Receiver<Instant>,
    grace: Duration,
) {
    // The sender drops if the request failed before being written: nothing to wait for.
    if let Ok(sent_at) = sent.await {
        let admitted = async {
            if let Ok(Ok(resp)) = (&mut pending).await {
                if is_event_stream(&resp) {
                    let _ = resp.into_body().frame().await;
                }
            }
        };
        let _ = tokio::time::timeout_at(sent_at + grace, admitted).await;
    }
    // Dropping the response, or aborting the task, closes the upstream connection.
    pending.abort();
}

fn is_event_stream(resp: &Response<Incoming>) -> bool {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn leg_parts(parts: &Parts, uri: http::Uri) -> Parts {
    let (mut leg, ()) = Request::new(()).into_parts();
    leg.method = Method::POST;
    leg.uri = uri;
    leg.version = Version::HTTP_11;
    leg.headers = parts.headers.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A decode abandoned before it was even sent is still delivered whole, then closed: the
    /// decoder must see it to release the prefiller's blocks.
    #[tokio::test]
    async fn an_abandoned_decode_is_delivered_then_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Upstream::new(Duration::from_secs(5));
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = Method::POST;
        parts.uri = format!("http://{addr}/v1/completions").parse().unwrap();
        let body = Bytes::from_static(br#"{"prompt":"p","kv_transfer_params":{"x":1}}"#);
        // Dropped at once, as when the client leaves during the hand-off.
        drop(AbandonOnDrop::send(
            &upstream,
            Leg::Decode,
            parts,
            Spliced::from(body.clone()),
            Duration::from_millis(50),
        ));

        let (mut sock, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut received = Vec::new();
        // read_to_end returns once the sidecar closes the connection.
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut received))
            .await
            .expect("the abandoned request is closed after the grace period")
            .unwrap();
        let text = String::from_utf8(received).unwrap();
        assert!(
            text.starts_with("POST /v1/completions HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with(std::str::from_utf8(&body).unwrap()),
            "{text}"
        );
    }
}
