//! Request routing: health answered here, P/D for completions with a prefiller header, and
//! everything else passed through to the local vLLM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::allowlist::Allowlist;
use crate::body::{self, ProxyBody};
use crate::config::{Config, PrefillFailurePolicy};
use crate::connector::Connector;
use crate::disagg;
use crate::error::{describe, ProxyError};
use crate::headers;
use crate::upstream::{self, Target, Upstream};

/// Everything a request needs, built once at start.
pub struct Proxy {
    pub(crate) connector: Connector,
    pub(crate) decoder: Target,
    pub(crate) upstream: Upstream,
    pub(crate) max_body_bytes: usize,
    pub(crate) allowlist: Allowlist,
    pub(crate) prefill_timeout: Duration,
    pub(crate) decode_first_byte_timeout: Duration,
    pub(crate) prefill_failure_policy: PrefillFailurePolicy,
    pub(crate) decode_admission_grace: Duration,
    /// Bounds concurrent requests (`-max-in-flight`); a permit lives as long as its response
    /// body, so long streams count until they end. `None`: no limit.
    in_flight: Option<(Arc<Semaphore>, usize)>,
}

impl Proxy {
    /// Builds the proxy from a validated configuration and the SSRF allowlist.
    pub fn new(config: &Config, allowlist: Allowlist) -> Self {
        Self {
            connector: config.connector,
            decoder: config.decoder.clone(),
            upstream: Upstream::new(config.connect_timeout),
            max_body_bytes: config.max_body_bytes,
            allowlist,
            prefill_timeout: config.prefill_timeout,
            decode_first_byte_timeout: config.decode_first_byte_timeout,
            prefill_failure_policy: config.prefill_failure_policy,
            decode_admission_grace: config.decode_admission_grace,
            in_flight: (config.max_in_flight > 0).then(|| {
                (
                    Arc::new(Semaphore::new(config.max_in_flight)),
                    config.max_in_flight,
                )
            }),
        }
    }

    /// Serves one request. Never fails: errors become vLLM-shaped JSON responses.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let path = req.uri().path();
        let method = req.method();
        if path == "/health" && (method == Method::GET || method == Method::HEAD) {
            return health();
        }
        let permit = match &self.in_flight {
            None => None,
            Some((slots, limit)) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return ProxyError::Overloaded { limit: *limit }.into_response(),
            },
        };
        let resp = self.route(req, client).await;
        match permit {
            Some(permit) => resp.map(|b| body::with_guard(b, permit)),
            None => resp,
        }
    }

    async fn route(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let path = req.uri().path();
        let method = req.method();
        let intercepted =
            method == Method::POST && (path == "/v1/completions" || path == "/v1/chat/completions");
        if !intercepted {
            return self.pass_through(req, client).await;
        }
        match upstream::prefiller_from(req.headers()) {
            Ok(None) => self.pass_through(req, client).await,
            Ok(Some(prefiller)) if !self.allowlist.allows(&prefiller) => {
                warn!(client = %client, prefiller = prefiller.authority(), "prefiller refused by SSRF protection");
                ProxyError::PrefillerNotAllowed {
                    prefiller: prefiller.authority().to_string(),
                }
                .into_response()
            }
            Ok(Some(prefiller)) => disagg::serve(self, req, prefiller, client)
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, status = e.status().as_u16(), "request failed");
                    e.into_response()
                }),
            Err(e) => ProxyError::BadPrefillerHeader(e).into_response(),
        }
    }

    /// Relays the request to the local vLLM as is: method, path, query, headers (less
    /// hop-by-hop ones) and a streamed body; the response streams back the same way.
    async fn pass_through(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        headers::for_upstream(&mut parts.headers);
        headers::append_forwarded_for(&mut parts.headers, client.ip());
        parts.uri = self.decoder.uri(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        debug!(method = %parts.method, uri = %parts.uri, "pass-through");
        let req = Request::from_parts(parts, body::relay(body));
        match self.upstream.send(req).await {
            Ok(resp) => relay_response(resp),
            Err(e) => ProxyError::DecoderUnreachable {
                decoder: self.decoder.authority().to_string(),
                detail: describe(&e),
            }
            .into_response(),
        }
    }
}

/// An upstream response as our response: same status, headers (less hop-by-hop) and body
/// frames, relayed as they arrive.
pub(crate) fn relay_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body::relay(body))
}

/// `GET /health`: the sidecar is up. vLLM's own health stays reachable through pass-through
/// on other paths (e.g. `/v1/models`).
fn health() -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}
