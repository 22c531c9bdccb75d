//! The prefill leg: a one-token request to the prefiller, its reply read in full (it is small),
//! and the prefiller's answer sorted into a reply to use, a refusal for the client, or a failure;
//! sent again, per the [`RetryPolicy`], when the failure cannot have pinned KV blocks.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};

use hyper_util::client::legacy::connect::capture_connection;
use tracing::info;

use super::breaker::Breakers;
use super::handoff::Abandoned;
use super::retry::RetryPolicy;
use crate::body::{self, CollectError, ProxyBody, SentSignal};
use crate::error::{describe, ProxyError};
use crate::json_edit::Spliced;
use crate::observe::metrics::Metrics;
use crate::upstream::{Leg, Target, Upstream};

/// The most of a prefill reply we buffer: a one-token completion is a few KiB, plus the
/// prompt's token ids with `-tokenize-once` (under 8 bytes a token: a million-token prompt).
const PREFILL_REPLY_LIMIT: usize = 16 << 20;

/// What a prefiller that answered said.
pub enum Prefilled {
    /// The prefiller's 2xx body, and which prefiller sent it (a retry may have moved on).
    Reply { body: Bytes, from: Target },
    /// The prefiller refused the request (4xx): the client gets that answer as is.
    Rejected(Response<ProxyBody>),
}

/// What a prefill needs besides its request: where to send it, and how often.
pub struct Attempts<'a> {
    pub upstream: &'a Upstream,
    /// The prefill leg's body, the same bytes for every attempt.
    pub body: &'a Spliced,
    /// The prefiller picked first, then the header's other allowed entries, in order.
    pub prefillers: &'a [Target],
    pub policy: RetryPolicy,
    /// The prefillers' circuit breakers: an open one is skipped.
    pub breakers: &'a Breakers,
    /// Set once the request was dropped: no further attempt is sent.
    pub abandoned: &'a Abandoned,
    pub metrics: &'a Metrics,
}

/// Sends the prefill leg built by `request` and reads the prefiller's answer, from the first
/// prefiller of the list whose breaker admits it. A prefiller that refuses the connection is
/// followed at once by the next one not tried yet (failover). A failure that cannot have
/// pinned KV blocks (no connection; 502, 503 or 504) is otherwise retried up to
/// `policy.max_retries` times, each on the next admitted prefiller, after a backoff. Never
/// after a 2xx, never once the client left (`abandoned`).
pub async fn prefill(
    attempts: Attempts<'_>,
    request: impl Fn(&Target, ProxyBody) -> Request<ProxyBody>,
) -> Result<Prefilled, ProxyError> {
    let list = attempts.prefillers;
    let breakers = attempts.breakers;
    // Which entries were tried, as bits (a header names a handful; past 64 none is "untried").
    let mut tried = 0u64;
    let untried = |tried: u64, i: usize| i >= 64 || tried & (1 << i) == 0;
    // The first prefiller from position `from` on (cycling) whose breaker admits a request.
    let pick = |from: usize, tried: u64, untried_only: bool| {
        (0..list.len())
            .map(|k| (from + k) % list.len())
            .filter(|&i| !untried_only || untried(tried, i))
            .find_map(|i| breakers.admit(&list[i]).map(|admission| (i, admission)))
    };
    let Some(mut current) = pick(0, tried, false) else {
        return Err(all_open(list, breakers));
    };
    let mut retries = 0;
    loop {
        let (at, admission) = current;
        let prefiller = &list[at];
        if at < 64 {
            tried |= 1 << at;
        }
        // Each attempt sends the same bytes: the pieces are shared, not copied.
        let (body, sent) = SentSignal::new(attempts.body.clone());
        let mut req = request(prefiller, body::boxed(body));
        attempts
            .abandoned
            .track(prefiller, capture_connection(&mut req), sent);
        let failure = match once(attempts.upstream, req, prefiller, attempts.abandoned).await {
            Ok(prefilled) => {
                admission.succeeded();
                return Ok(prefilled);
            }
            Err(failure) => failure,
        };
        if attempts.abandoned.is_set() {
            // The sidecar closed the attempt itself: no verdict on the prefiller.
            drop(admission);
            return Err(failure.error);
        }
        admission.failed();
        let Some(reason) = failure.retry_reason else {
            return Err(failure.error);
        };
        let next = (at + 1) % list.len();
        // No connection: nothing reached vLLM, and another prefiller costs nobody a wait.
        let failover = (reason == "connect")
            .then(|| pick(next, tried, true))
            .flatten();
        if let Some(other) = failover {
            info!(
                error = %failure.error,
                to = list[other.0].authority(),
                "prefill failed before pinning KV blocks; failing over to the next prefiller"
            );
            attempts.metrics.prefill_retry(reason);
            current = other;
            continue;
        }
        if retries >= attempts.policy.max_retries {
            return Err(failure.error);
        }
        retries += 1;
        let delay = attempts.policy.delay(retries);
        info!(
            error = %failure.error,
            retry = retries,
            delay_ms = delay.as_millis() as u64,
            "prefill failed before pinning KV blocks; retrying"
        );
        attempts.metrics.prefill_retry(reason);
        tokio::time::sleep(delay).await;
        if attempts.abandoned.is_set() {
            return Err(failure.error);
        }
        current = match pick(next, tried, false) {
            Some(picked) => picked,
            None => return Err(failure.error),
        };
    }
}

/// The error for a request whose every prefiller has an open breaker.
pub fn all_open(prefillers: &[Target], breakers: &Breakers) -> ProxyError {
    let names: Vec<&str> = prefillers.iter().map(Target::authority).collect();
    let retry_in = prefillers
        .iter()
        .filter_map(|p| breakers.open_for(p))
        .min()
        .unwrap_or_default();
    ProxyError::PrefillersOpen {
        prefillers: names.join(", "),
        retry_in,
    }
}

/// A failed attempt, and whether it may be sent again (`Some(reason)` for the metric).
struct Failure {
    error: ProxyError,
    retry_reason: Option<&'static str>,
}

/// One attempt on `prefiller`.
async fn once(
    upstream: &Upstream,
    req: Request<ProxyBody>,
    prefiller: &Target,
    abandoned: &Abandoned,
) -> Result<Prefilled, Failure> {
    let name = || prefiller.authority().to_string();
    let resp = upstream
        .send(Leg::Prefill, req)
        .await
        .map_err(|e| Failure {
            // Only a connection never made is sure not to have reached vLLM.
            retry_reason: e.is_connect().then_some("connect"),
            error: ProxyError::PrefillUnreachable {
                prefiller: name(),
                detail: describe(&e),
            },
        })?;
    abandoned.head_arrived();
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    // The head is kept until the reply is read: the leg's trace span ends with it.
    let (head, reply) = resp.into_parts();
    let body = body::collect_limited(reply, PREFILL_REPLY_LIMIT)
        .await
        .map_err(|e| {
            let detail = match e {
                CollectError::TooLarge => format!("reply longer than {PREFILL_REPLY_LIMIT} bytes"),
                CollectError::Read(e) => describe(&*e),
            };
            Failure {
                error: ProxyError::PrefillBadReply {
                    prefiller: name(),
                    detail,
                },
                retry_reason: None,
            }
        })?;
    drop(head);
    tracing::debug!(status = status.as_u16(), bytes = body.len(), "prefill done");
    tracing::trace!(body = %String::from_utf8_lossy(&body), "prefill reply");
    if status.is_success() {
        return Ok(Prefilled::Reply {
            body,
            from: prefiller.clone(),
        });
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
    Err(Failure {
        retry_reason: match status.as_u16() {
            502 => Some("http_502"),
            503 => Some("http_503"),
            504 => Some("http_504"),
            _ => None,
        },
        error: ProxyError::PrefillFailed {
            prefiller: name(),
            status,
            detail: upstream_message(&body),
        },
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
