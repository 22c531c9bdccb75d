//! Request routing: health answered here, P/D for completions with a prefiller header, and
//! everything else passed through to the local vLLM.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tracing::{debug, Instrument};

use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::connector::Connector;
use crate::disagg;
use crate::error::{describe, ProxyError};
use crate::headers;
use crate::metrics::{Metrics, Route, Tracker};
use crate::telemetry;
use crate::upstream::{self, Target, Upstream};

/// Everything a request needs, built once at start.
pub struct Proxy {
    pub(crate) connector: Connector,
    pub(crate) decoder: Target,
    pub(crate) upstream: Upstream,
    pub(crate) max_body_bytes: usize,
    pub(crate) metrics: Metrics,
}

impl Proxy {
    /// Builds the proxy from a validated configuration.
    pub fn new(config: &Config) -> Self {
        Self {
            connector: config.connector,
            decoder: config.decoder.clone(),
            upstream: Upstream::new(config.connect_timeout),
            max_body_bytes: config.max_body_bytes,
            metrics: config.metrics.clone(),
        }
    }

    /// Serves one request. Never fails: errors become vLLM-shaped JSON responses.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let path = req.uri().path();
        let method = req.method();
        if path == "/health" && (method == Method::GET || method == Method::HEAD) {
            return health();
        }
        let intercepted =
            method == Method::POST && (path == "/v1/completions" || path == "/v1/chat/completions");
        let prefiller = if intercepted {
            upstream::prefiller_from(req.headers())
        } else {
            Ok(None)
        };
        let route = match prefiller {
            Ok(None) => Route::PassThrough,
            _ => Route::Pd,
        };
        let prefiller_name = prefiller
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(Target::authority);
        let span = telemetry::request_span(route, method, path, req.headers(), prefiller_name);
        // Dropped with this future if the client leaves: that counts the cancellation.
        let mut tracker = self.metrics.track(self.connector, route, span.clone());
        let resp = self
            .route(req, client, prefiller, &mut tracker)
            .instrument(span)
            .await;
        tracker.relay(resp)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        prefiller: Result<Option<Target>, String>,
        tracker: &mut Tracker,
    ) -> Response<ProxyBody> {
        match prefiller {
            Ok(None) => self.pass_through(req, client, tracker).await,
            Ok(Some(prefiller)) => match disagg::serve(self, req, prefiller, client, tracker).await
            {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(error = %e, status = e.status().as_u16(), "request failed");
                    tracker.error(e)
                }
            },
            Err(e) => ProxyError::BadPrefillerHeader(e).into_response(),
        }
    }

    /// Relays the request to the local vLLM as is: method, path, query, headers (less
    /// hop-by-hop ones) and a streamed body; the response streams back the same way.
    async fn pass_through(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        tracker: &mut Tracker,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        headers::for_upstream(&mut parts.headers);
        headers::append_forwarded_for(&mut parts.headers, client.ip());
        parts.uri = self.decoder.uri(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        debug!(method = %parts.method, uri = %parts.uri, "pass-through");
        let req = Request::from_parts(parts, body::relay(tracker.count_request(body)));
        match self.upstream.send(req).await {
            Ok(resp) => relay_response(resp),
            Err(e) => tracker.error(ProxyError::DecoderUnreachable {
                decoder: self.decoder.authority().to_string(),
                detail: describe(&e),
            }),
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
