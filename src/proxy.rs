//! Request routing: health answered here, P/D for completions with a prefiller header, and
//! everything else passed through to the local vLLM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tracing::{debug, warn, Instrument};

use crate::allowlist::Allowlist;
use crate::body::{self, ProxyBody};
use crate::busy_poll::BusyPoll;
use crate::coalesce::Coalesce;
use crate::config::{Config, PrefillFailurePolicy};
use crate::connector::Connector;
use crate::decoder_health::DecoderHealth;
use crate::disagg;
use crate::error::{describe, Leg, ProxyError};
use crate::headers;
use crate::metrics::{Metrics, Route, Tracker};
use crate::telemetry;
use crate::upstream::{self, Target, Upstream};

/// Everything a request needs, built once at start.
pub struct Proxy {
    pub(crate) connector: Connector,
    pub(crate) decoder: Target,
    pub(crate) prefiller_use_tls: bool,
    pub(crate) upstream: Upstream,
    /// Opened on each request too: the next request of a keep-alive client comes soon.
    busy_poll: BusyPoll,
    pub(crate) max_body_bytes: usize,
    pub(crate) allowlist: Allowlist,
    pub(crate) prefill_timeout: Duration,
    pub(crate) decode_first_byte_timeout: Duration,
    pub(crate) prefill_failure_policy: PrefillFailurePolicy,
    pub(crate) decode_admission_grace: Duration,
    /// Bounds concurrent requests (`-max-in-flight`); a permit lives as long as its response
    /// body, so long streams count until they end. `None`: no limit.
    in_flight: Option<(Arc<Semaphore>, usize)>,
    pub(crate) metrics: Metrics,
    pub(crate) decoder_health: DecoderHealth,
}

impl Proxy {
    /// Builds the proxy from a validated configuration and the SSRF allowlist. Fails if a
    /// TLS file cannot be used.
    pub fn new(config: &Config, allowlist: Allowlist) -> Result<Self, String> {
        let busy_poll = BusyPoll::start(config.busy_poll);
        Ok(Self {
            connector: config.connector,
            decoder: config.decoder.clone(),
            prefiller_use_tls: config.prefiller_use_tls,
            upstream: Upstream::with_tls(
                config.connect_timeout,
                &config.prefiller_tls,
                &config.decoder_tls,
            )?
            .with_busy_poll(busy_poll.clone()),
            busy_poll,
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
            metrics: config.metrics.clone(),
            decoder_health: DecoderHealth::new(config.decoder.authority(), config.connect_timeout),
        })
    }

    /// Serves one request. Never fails: errors become vLLM-shaped JSON responses.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        self.busy_poll.touch();
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
        let intercepted =
            method == Method::POST && (path == "/v1/completions" || path == "/v1/chat/completions");
        let prefiller = if intercepted {
            upstream::prefiller_from(req.headers(), self.prefiller_use_tls)
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
        // The tracker lives until the response body ends, so the slot covers streams too.
        tracker.hold(permit);
        // Boxed: hyper keeps an allocation the size of this future for the life of the
        // connection, so a large inline state machine would cost every idle stream ~4 KiB.
        let resp = Box::pin(
            self.route(req, client, prefiller, &mut tracker)
                .instrument(span),
        )
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
            Ok(Some(prefiller)) if !self.allowlist.allows(&prefiller) => {
                warn!(client = %client, prefiller = prefiller.authority(), "prefiller refused by SSRF protection");
                tracker.error(ProxyError::PrefillerNotAllowed {
                    prefiller: prefiller.authority().to_string(),
                })
            }
            Ok(Some(prefiller)) => match disagg::serve(self, req, prefiller, client, tracker).await
            {
                Ok(resp) => resp,
                Err(e) => {
                    warn!(error = %e, status = e.status().as_u16(), "request failed");
                    tracker.error(e)
                }
            },
            Err(e) => tracker.error(ProxyError::BadPrefillerHeader(e)),
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
        match tokio::time::timeout(
            self.decode_first_byte_timeout,
            self.upstream.send(Leg::Decode, req),
        )
        .await
        {
            Ok(Ok(resp)) => relay_response(resp),
            Ok(Err(e)) => {
                self.decoder_health.record(&e);
                tracker.error(ProxyError::DecoderUnreachable {
                    decoder: self.decoder.authority().to_string(),
                    detail: describe(&e),
                })
            }
            Err(_) => tracker.error(ProxyError::Timeout {
                leg: Leg::Decode,
                target: self.decoder.authority().to_string(),
                after: self.decode_first_byte_timeout,
            }),
        }
    }
}

/// An upstream response as our response: same status, headers (less hop-by-hop) and body
/// frames, relayed as they arrive (frames that are ready together go out as one write).
pub(crate) fn relay_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body::relay(Coalesce::new(body)))
}

/// `GET /health`: the sidecar is up. vLLM's own health stays reachable through pass-through
/// on other paths (e.g. `/v1/models`).
fn health() -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}
