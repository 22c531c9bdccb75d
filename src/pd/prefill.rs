//! The prefill leg: a one-token request to the prefiller, its reply read in full (it is small),
//! and the prefiller's answer sorted into a reply to use, a refusal for the client, or a failure.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};

use crate::body::{self, CollectError, ProxyBody};
use crate::error::{describe, ProxyError};
use crate::upstream::{Leg, Target, Upstream};

/// The most of a prefill reply we buffer: a one-token completion is a few KiB at most.
const PREFILL_REPLY_LIMIT: usize = 4 << 20;

/// What a prefiller that answered said.
pub enum Prefilled {
    /// The prefiller's 2xx body.
    Reply(Bytes),
    /// The prefiller refused the request (4xx): the client gets that answer as is.
    Rejected(Response<ProxyBody>),
}

/// Sends the prefill leg and reads the prefiller's answer.
pub async fn prefill(
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
    tracing::debug!(status = status.as_u16(), bytes = body.len(), "prefill done");
    tracing::trace!(body = %String::from_utf8_lossy(&body), "prefill reply");
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
