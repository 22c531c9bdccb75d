//! Every failure the proxy reports, and the one table mapping them to HTTP.
//!
//! Bodies use current vLLM's error shape, `{"error":{"message","type","param","code"}}`, so
//! OpenAI clients parse them as they parse vLLM's own errors.

use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::body::{self, ProxyBody};
use crate::headers::{ERROR_KIND, ERROR_LEG};
use crate::upstream::Leg;

/// A request the proxy could not complete, sorted by who caused it. The message is the
/// client's `error.message`, and the log line's `error`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's body is not valid JSON.
    #[error("Invalid JSON in request body: {0}")]
    InvalidJson(String),
    /// The client's body is JSON but not an object.
    #[error("The request body must be a JSON object")]
    NotAnObject,
    /// The client's body exceeds `-max-request-body-size`.
    #[error("Request body is larger than the sidecar's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The client stopped sending its body midway.
    #[error("Could not read the request body: {0}")]
    BodyRead(String),
    /// The prefiller header names no usable address.
    #[error("Invalid prefiller address: {0}")]
    BadPrefillerHeader(String),
    /// `x-data-parallel-host-port` names none of this sidecar's data-parallel ranks.
    #[error("x-data-parallel-host-port '{0}' is not one of this sidecar's data-parallel ranks")]
    UnknownDataParallelRank(String),
    /// The prefiller could not be reached.
    #[error("Prefiller {prefiller} is unreachable: {detail}")]
    PrefillUnreachable { prefiller: String, detail: String },
    /// The prefiller answered with a server error.
    #[error("Prefiller {prefiller} failed with HTTP {}: {detail}", status.as_u16())]
    PrefillFailed {
        prefiller: String,
        status: StatusCode,
        detail: String,
    },
    /// An encoder call (E/PD) failed: no answer (`status` None), or a non-2xx one.
    #[error("Encoder {encoder} failed on multimodal item {item}: {}{detail}", status.map_or(String::new(), |s| format!("HTTP {}: ", s.as_u16())))]
    EncoderFailed {
        encoder: String,
        item: usize,
        status: Option<StatusCode>,
        detail: String,
    },
    /// Every prefiller the request names has an open circuit breaker (it failed repeatedly
    /// just now): nothing was sent.
    #[error("No prefiller to send to: the circuit breaker of {prefillers} is open (failing; tried again in {:.1} s)", retry_in.as_secs_f64())]
    PrefillersOpen {
        prefillers: String,
        retry_in: std::time::Duration,
    },
    /// The prefiller answered 2xx with something we cannot use.
    #[error("Prefiller {prefiller} sent an unusable reply: {detail}")]
    PrefillBadReply { prefiller: String, detail: String },
    /// The local vLLM (decoder) gave no response.
    #[error("The decode vLLM server at {decoder} gave no response: {detail}")]
    DecoderUnreachable { decoder: String, detail: String },
    /// The local vLLM answered with framing that cannot be relayed faithfully.
    #[error(
        "The decode vLLM server at {decoder} sent a response that cannot be relayed: {detail}"
    )]
    DecoderBadFraming { decoder: String, detail: String },
    /// The request head exceeds `-max-header-size` or `-max-header-count`.
    #[error("Request headers are larger than the sidecar's limit of {0}")]
    HeadersTooLarge(String),
    /// The client's body uses a transfer-coding other than chunked.
    #[error("Transfer-Encoding '{0}' is not supported (only chunked)")]
    UnsupportedTransferCoding(String),
    /// A leg exceeded its deadline (`-prefill-timeout`, `-decode-first-byte-timeout`).
    #[error("The {leg} leg to {target} timed out after {:.3} s", after.as_secs_f64())]
    Timeout {
        leg: Leg,
        target: String,
        after: std::time::Duration,
    },
    /// The prefiller is not on the SSRF allowlist.
    #[error("Prefiller {prefiller} is not allowed by the sidecar's SSRF protection")]
    PrefillerNotAllowed { prefiller: String },
    /// `-max-in-flight` requests are already being served.
    #[error("The sidecar is serving its limit of {limit} requests; retry later")]
    Overloaded { limit: usize },
    /// A state the sidecar should never reach (a leg task that panicked, say).
    #[error("Internal sidecar error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The status the client gets: 4xx when the client's request is at fault, 502/503 when an
    /// upstream is, so retries and alerts go to the right place.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::NotAnObject
            | ProxyError::BodyRead(_)
            | ProxyError::BadPrefillerHeader(_)
            | ProxyError::UnknownDataParallelRank(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::PrefillFailed { status, .. }
                if *status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::PrefillUnreachable { .. }
            | ProxyError::PrefillFailed { .. }
            | ProxyError::PrefillBadReply { .. }
            | ProxyError::EncoderFailed { .. }
            | ProxyError::DecoderUnreachable { .. }
            | ProxyError::DecoderBadFraming { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::PrefillerNotAllowed { .. } => StatusCode::FORBIDDEN,
            ProxyError::Overloaded { .. } | ProxyError::PrefillersOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The upstream leg at fault, if any.
    pub fn leg(&self) -> Option<Leg> {
        match self {
            ProxyError::PrefillUnreachable { .. }
            | ProxyError::PrefillFailed { .. }
            | ProxyError::PrefillBadReply { .. }
            | ProxyError::PrefillersOpen { .. } => Some(Leg::Prefill),
            ProxyError::EncoderFailed { .. } => Some(Leg::Encode),
            ProxyError::DecoderUnreachable { .. } | ProxyError::DecoderBadFraming { .. } => {
                Some(Leg::Decode)
            }
            ProxyError::Timeout { leg, .. } => Some(*leg),
            _ => None,
        }
    }

    /// What went wrong, in one word for machines: the `x-llm-d-error-kind` header, and for
    /// upstream failures the `kind` label of `upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::PrefillUnreachable { .. }
            | ProxyError::DecoderUnreachable { .. }
            | ProxyError::EncoderFailed { status: None, .. } => "unreachable",
            ProxyError::EncoderFailed {
                status: Some(s), ..
            } if s.is_server_error() => "http_5xx",
            ProxyError::EncoderFailed { .. } => "http_4xx",
            ProxyError::PrefillFailed { .. } => "http_5xx",
            ProxyError::PrefillBadReply { .. } | ProxyError::DecoderBadFraming { .. } => {
                "bad_reply"
            }
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::PrefillersOpen { .. } => "circuit_open",
            ProxyError::InvalidJson(_)
            | ProxyError::NotAnObject
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BodyRead(_)
            | ProxyError::BadPrefillerHeader(_)
            | ProxyError::UnknownDataParallelRank(_)
            | ProxyError::HeadersTooLarge(_)
            | ProxyError::UnsupportedTransferCoding(_) => "invalid_request",
            ProxyError::PrefillerNotAllowed { .. } => "ssrf_denied",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Internal(_) => "internal",
        }
    }

    /// The JSON error response.
    pub fn into_response(self) -> Response<ProxyBody> {
        let param = match self {
            ProxyError::BadPrefillerHeader(_)
            | ProxyError::PrefillerNotAllowed { .. }
            | ProxyError::PrefillersOpen { .. } => Some("x-prefiller-host-port"),
            ProxyError::UnknownDataParallelRank(_) => Some("x-data-parallel-host-port"),
            ProxyError::EncoderFailed { .. } => Some("x-encoder-hosts-ports"),
            _ => None,
        };
        let unread_body = matches!(
            self,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::BodyRead(_)
                | ProxyError::HeadersTooLarge(_)
                | ProxyError::UnsupportedTransferCoding(_)
        );
        let mut resp = error_response(self.status(), &self.to_string(), param);
        let headers = resp.headers_mut();
        headers.insert(ERROR_KIND, HeaderValue::from_static(self.kind()));
        if let Some(leg) = self.leg() {
            headers.insert(ERROR_LEG, HeaderValue::from_static(leg.as_str()));
        }
        if unread_body {
            // The rest of the request body is never read, so hyper closes the connection after
            // this response. Say so: a keep-alive client would otherwise send its next request
            // on a connection that is about to close, and that request would fail.
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// An error and its causes on one line: hyper's errors put the useful part (e.g. "connection
/// refused") in their sources.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `type` field for a status, named as OpenAI's clients name their exception classes.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        413 => "RequestTooLargeError",
        429 => "RateLimitError",
        431 => "RequestHeaderFieldsTooLargeError",
        501 => "NotImplementedError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: u16,
}

/// A vLLM-shaped JSON error response.
pub fn error_response(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
) -> Response<ProxyBody> {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind: error_type(status),
            param,
            code: status.as_u16(),
        },
    };
    // Serializing plain strings and integers cannot fail.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_have_vllm_shape_and_status() {
        let e = ProxyError::PrefillUnreachable {
            prefiller: "10.0.0.1:8000".into(),
            detail: "connection refused".into(),
        };
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "BadGatewayError");
        assert_eq!(v["error"]["code"], 502);
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("10.0.0.1:8000"));
    }

    #[test]
    fn prefill_503_stays_503() {
        let e = ProxyError::PrefillFailed {
            prefiller: "p".into(),
            status: StatusCode::SERVICE_UNAVAILABLE,
            detail: String::new(),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            ProxyError::BodyTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn an_unread_body_closes_the_connection_and_says_so() {
        let resp = ProxyError::BodyTooLarge { limit: 1 }.into_response();
        assert_eq!(resp.headers()[CONNECTION], "close");
        let resp = ProxyError::NotAnObject.into_response();
        assert!(resp.headers().get(CONNECTION).is_none());
    }
}
