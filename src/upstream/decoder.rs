//! The local vLLM decode server: where every decode leg and every pass-through request goes,
//! always under the first-byte deadline, with connect failures noted in its health.

use std::future::Future;
use std::time::Duration;

use http::header::CONTENT_LENGTH;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;

use super::decoder_health::DecoderHealth;
use super::{Leg, Target, Upstream};
use crate::body::coalesce::Coalesce;
use crate::body::{self, ProxyBody};
use crate::error::{describe, ProxyError};
use crate::headers::{self, Framing};
use crate::observe::otel::spans::LegSpan;

/// Why a decode leg got no response head.
pub enum LegFailure {
    /// The HTTP client failed (connect, write, read).
    Upstream(hyper_util::client::legacy::Error),
    /// The task that sent it failed; never expected.
    Task(String),
}

/// The local decoder, shared by pass-through and the P/D path.
pub struct Decoder {
    target: Target,
    upstream: Upstream,
    first_byte_timeout: Duration,
    health: DecoderHealth,
}

impl Decoder {
    pub fn new(
        target: Target,
        upstream: Upstream,
        first_byte_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let health = DecoderHealth::new(target.authority(), connect_timeout);
        Self {
            target,
            upstream,
            first_byte_timeout,
            health,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The decoder's URI for a request's path and query.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        self.target.uri(path_and_query)
    }

    pub fn health(&self) -> &DecoderHealth {
        &self.health
    }

    /// The client for decode legs sent outside [`Decoder::send`] (the KV hand-off).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Sends a decode leg and waits for its response head, within the first-byte deadline.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        let sending = async {
            self.upstream
                .send(Leg::Decode, req)
                .await
                .map_err(LegFailure::Upstream)
        };
        self.within_deadline(sending).await
    }

    /// Waits for a decode leg sent some other way (see `pd/handoff.rs`) under the same
    /// deadline and error mapping as [`Decoder::send`]. The one place both are decided.
    pub async fn within_deadline(
        &self,
        sending: impl Future<Output = Result<Response<Incoming>, LegFailure>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match crate::runtime::within(self.first_byte_timeout, sending).await {
            Ok(Ok(resp)) => self.framed(resp),
            Ok(Err(LegFailure::Upstream(e))) => {
                self.health.record(&e);
                Err(self.unreachable(describe(&e)))
            }
            Ok(Err(LegFailure::Task(detail))) => Err(ProxyError::Internal(detail)),
            Err(_) => Err(ProxyError::Timeout {
                leg: Leg::Decode,
                target: self.target.authority().to_string(),
                after: self.first_byte_timeout,
            }),
        }
    }

    /// The response, with framing a client can trust (RFC 9112 §6.3): hyper has decoded a
    /// chunked body, so a `Content-Length` beside `Transfer-Encoding` is dropped rather than
    /// relayed (it would truncate the body, or make an HTTP/2 response malformed). A coding
    /// other than `chunked` cannot be relayed (the client would get its encoded bytes
    /// unlabelled): 502.
    fn framed(&self, mut resp: Response<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        match headers::framing(resp.headers()) {
            Framing::Plain => Ok(resp),
            Framing::Chunked => {
                resp.headers_mut().remove(CONTENT_LENGTH);
                Ok(resp)
            }
            Framing::Other(codings) => {
                if let Some(span) = resp.extensions().get::<LegSpan>() {
                    span.failed("bad_reply");
                }
                Err(ProxyError::DecoderBadFraming {
                    decoder: self.target.authority().to_string(),
                    detail: format!("Transfer-Encoding '{codings}'"),
                })
            }
        }
    }

    /// The decoder gave no response, for `detail`.
    pub fn unreachable(&self, detail: String) -> ProxyError {
        ProxyError::DecoderUnreachable {
            decoder: self.target.authority().to_string(),
            detail,
        }
    }
}

/// The decoder's response as ours: same status, headers (less hop-by-hop) and body frames,
/// relayed as they arrive (frames that are ready together go out as one write).
pub fn from_upstream(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // A traced leg's span ends with the body it relays, not with the head.
    let body = match parts.extensions.remove::<LegSpan>() {
        None => body::boxed(Coalesce::new(body)),
        Some(span) => body::boxed(span.over(Coalesce::new(body))),
    };
    Response::from_parts(parts, body)
}
