//! The request handler: `/health` and `/readyz` answered here, admission (`-max-in-flight`),
//! the routing decision made once, pass-through to the local vLLM, and the one place an error
//! is logged, counted and answered ([`respond_error`]).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn, Instrument};

use crate::api::Api;
use crate::body::{self, ProxyBody};
use crate::error::ProxyError;
use crate::headers;
use crate::observe::metrics::api_type;
use crate::observe::metrics::{Metrics, RequestGuard};
use crate::observe::otel::spans::{self, ServerSpan};
use crate::observe::otel::Tracing;
use crate::observe::trace_context;
use crate::pd::{self, PdContext};
use crate::routing::{self, Pick, Routing};
use crate::runtime::busy_poll::BusyPoll;
use crate::security::allowlist::Allowlist;
use crate::security::client_params::{self, Outcome};
use crate::upstream::decoder::from_upstream;
use crate::upstream::{Decoder, Target};
use opentelemetry::KeyValue;

/// The shared per-process state the handler reads, built once by [`crate::App::build`].
pub struct Proxy {
    pub(crate) decoder: Arc<Decoder>,
    pub(crate) pd: PdContext,
    /// How the prefiller is picked from the request's header.
    pub(crate) pick: Pick,
    pub(crate) allowlist: Allowlist,
    /// Opened on each request too: the next request of a keep-alive client comes soon.
    pub(crate) busy_poll: BusyPoll,
    /// Bounds concurrent requests (`-max-in-flight`); a permit lives as long as its response
    /// body, so long streams count until they end. `None`: no limit.
    pub(crate) in_flight: Option<(Arc<Semaphore>, usize)>,
    pub(crate) metrics: Metrics,
    /// Request spans, when tracing is on.
    pub(crate) tracing: Option<Tracing>,
    pub(crate) limits: HeadLimits,
    /// `/readyz`: vLLM's health as last checked, and the drain (shared by every rank).
    pub(crate) readiness: crate::readiness::Readiness,
}

/// The request-head limits the handler checks itself, to answer them in JSON.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_header_count: usize,
    pub max_header_size: usize,
}

impl Proxy {
    /// Serves one request. Never fails: errors become vLLM-shaped JSON responses.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        self.serve(req, client, None).await
    }

    /// Answers `error` to a request refused before routing (logged, counted and traced as
    /// any other request).
    pub(crate) async fn refuse(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        error: ProxyError,
    ) -> Response<ProxyBody> {
        self.serve(req, client, Some(error)).await
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        refused: Option<ProxyError>,
    ) -> Response<ProxyBody> {
        self.busy_poll.touch();
        // Probes are answered here: not counted, not traced, never sent to vLLM.
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            match req.uri().path() {
                "/health" => return health(),
                "/readyz" | "/readiness" => return self.readiness.response(),
                _ => {}
            }
        }
        let refused = refused.or_else(|| self.refuse_head(&req));
        let routing = routing::decide(&req, self.pick, &self.allowlist);
        let api = match *req.method() {
            Method::POST => Api::for_path(req.uri().path()),
            _ => None,
        };
        // Before the log span: it rewrites `traceparent`, whose trace id the logs carry.
        let server_span = self
            .tracing
            .as_ref()
            .map(|t| self.server_span(t, &mut req, client, &routing, api));
        let (path, method) = (req.uri().path(), req.method());
        let span = trace_context::request_span(
            routing.route(),
            method,
            path,
            req.headers(),
            routing.prefiller().map(Target::authority),
        );
        // Dropped with this future if the client leaves: that counts the cancellation.
        let mut guard = self
            .metrics
            .track(self.pd.connector, routing.route(), span.clone());
        if let Some(server_span) = server_span {
            guard.trace(server_span);
        }
        if let Some(api) = api {
            self.metrics.inference_request(api, routing.disagg_type());
        }
        match routing.encoders_denied() {
            0 => {}
            denied => self.metrics.encoders_denied(denied),
        }
        let resp = match refused.map_or_else(|| self.admit(), Err) {
            Err(e) => respond_error(&mut guard, client, e),
            Ok(permit) => {
                // The guard lives until the response body ends, so the slot covers streams too.
                guard.hold(permit);
                // Boxed: hyper keeps an allocation the size of this future for the life of the
                // connection, so a large inline state machine would cost every idle stream ~4 KiB.
                Box::pin(
                    self.route(req, client, routing, &mut guard)
                        .instrument(span),
                )
                .await
            }
        };
        guard.attach(resp)
    }

    /// Opens the request's SERVER span with what the routing decided, and marks the request
    /// so each leg opens its CLIENT span under it.
    fn server_span(
        &self,
        tracing: &Tracing,
        req: &mut Request<Incoming>,
        client: SocketAddr,
        routing: &Routing,
        api: Option<Api>,
    ) -> ServerSpan {
        spans::start_server(
            tracing.tracer(),
            tracing.scheme(),
            req,
            client,
            api.map(Api::path),
            || routing_attributes(self.pd.connector.name(), routing, api),
        )
    }

    /// A request head this sidecar will not serve: over `-max-header-count` or
    /// `-max-header-size` (hyper lets heads up to twice those through so the answer is this
    /// JSON 431), or a body in a transfer-coding other than chunked (hyper decodes chunked and
    /// would pass the rest on unlabelled; vLLM cannot decode them anyway).
    fn refuse_head<B>(&self, req: &Request<B>) -> Option<ProxyError> {
        let headers = req.headers();
        if headers.len() > self.limits.max_header_count {
            return Some(ProxyError::HeadersTooLarge(format!(
                "{} headers",
                self.limits.max_header_count
            )));
        }
        let size: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
            + uri_len(req.uri())
            + req.method().as_str().len()
            + 12;
        if size > self.limits.max_header_size {
            return Some(ProxyError::HeadersTooLarge(format!(
                "{} bytes",
                self.limits.max_header_size
            )));
        }
        match headers::framing(headers) {
            headers::Framing::Other(codings) => {
                Some(ProxyError::UnsupportedTransferCoding(codings))
            }
            headers::Framing::Plain | headers::Framing::Chunked => None,
        }
    }

    /// A `-max-in-flight` slot, or the 503 that says there is none.
    fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        match &self.in_flight {
            None => Ok(None),
            Some((slots, limit)) => slots.clone().try_acquire_owned().map(Some).map_err(|_| {
                self.metrics.rejected("max_in_flight");
                ProxyError::Overloaded { limit: *limit }
            }),
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        routing: Routing,
        guard: &mut RequestGuard,
    ) -> Response<ProxyBody> {
        let served = match routing {
            Routing::PassThrough => self.pass_through(req, client, guard).await,
            Routing::Pd(route) => pd::serve(&self.pd, req, route, client, guard).await,
            Routing::KvSource(source) => {
                pd::serve_with_kv_source(&self.pd, req, source, client, guard).await
            }
            Routing::Local(local) => pd::serve_local(&self.pd, req, local, client, guard).await,
            Routing::Refused { error, .. } => Err(error),
        };
        served.unwrap_or_else(|e| respond_error(guard, client, e))
    }

    /// Relays the request to the local vLLM as is: method, path, query, headers (less
    /// hop-by-hop ones) and a streamed body; the response streams back the same way. A POST
    /// to an inference route is read whole instead, to remove the client's transfer
    /// parameters (`security::client_params`), unless `-trust-client-kv-params`.
    async fn pass_through(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        guard: &mut RequestGuard,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let scrub = match parts.method {
            Method::POST if !self.pd.trust_client_kv_params => client_params::pass_through_rules(
                parts.uri.path(),
                parts.headers.get(http::header::CONTENT_TYPE),
            ),
            _ => None,
        };
        headers::for_upstream(&mut parts.headers);
        headers::append_forwarded_for(&mut parts.headers, client.ip());
        parts.uri = self.decoder.uri(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        debug!(method = %parts.method, uri = %parts.uri, "pass-through");
        let body = match scrub {
            None => body::boxed(guard.count_request(body)),
            Some(api) => {
                let whole = pd::read_body(body, self.pd.max_body_bytes).await?;
                guard.request_bytes(whole.len());
                match client_params::strip(api, &whole) {
                    // The client's bytes, and its Content-Length if it sent one.
                    Outcome::Untouched => body::full(whole),
                    Outcome::Stripped { body, removed } => {
                        removed.report(&self.metrics);
                        parts
                            .headers
                            .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
                        body::spliced(body)
                    }
                    Outcome::Unreadable(e) => return Err(ProxyError::InvalidJson(e)),
                }
            }
        };
        let req = Request::from_parts(parts, body);
        Ok(from_upstream(self.decoder.send(req).await?))
    }
}

/// What the routing decided, under pd-sidecar's attribute names.
fn routing_attributes(
    connector: &'static str,
    routing: &Routing,
    api: Option<Api>,
) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("llm_d.pd_proxy.connector", connector),
        KeyValue::new("llm_d.pd_proxy.kv_connector", connector),
        KeyValue::new(
            "llm_d.pd_proxy.disaggregation_used",
            matches!(routing, Routing::Pd(_)),
        ),
    ];
    if let Some(api) = api {
        attrs.push(KeyValue::new("llm_d.openai.api", api_type(api)));
    }
    let address =
        |key: &'static str, target: &Target| KeyValue::new(key, target.authority().to_string());
    match routing {
        Routing::Pd(pd) => {
            attrs.extend(
                pd.prefillers
                    .first()
                    .map(|first| address("llm_d.pd_proxy.prefill_target", first)),
            );
            attrs.push(KeyValue::new(
                "llm_d.pd_proxy.prefill_candidates",
                pd.prefillers.len() as i64,
            ));
            attrs.extend(
                pd.kv_source
                    .as_ref()
                    .map(|source| address("llm_d.pd_proxy.kv_cache_source", source)),
            );
        }
        Routing::KvSource(source) => attrs.push(address("llm_d.pd_proxy.kv_cache_source", source)),
        Routing::Local(_) => {}
        Routing::PassThrough => {
            attrs.push(KeyValue::new("llm_d.pd_proxy.reason", "no_prefill_header"));
        }
        Routing::Refused {
            prefiller: Some(denied),
            error: ProxyError::PrefillerNotAllowed { .. },
        } => {
            attrs.push(KeyValue::new(
                "llm_d.pd_proxy.error",
                "ssrf_protection_denied",
            ));
            attrs.push(address("llm_d.pd_proxy.denied_target", denied));
        }
        Routing::Refused { .. } => {}
    }
    attrs
}

/// The length of `uri` as written in the request line, without formatting it (per request).
fn uri_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// Every failure the client is answered with goes through here: one log line (in the request's
/// span, so with its ids), one count, one vLLM-shaped response.
fn respond_error(
    guard: &mut RequestGuard,
    client: SocketAddr,
    e: ProxyError,
) -> Response<ProxyBody> {
    guard.span().in_scope(|| {
        warn!(error = %e, status = e.status().as_u16(), client = %client, "request failed");
    });
    guard.error(e)
}

/// `GET /health`: the sidecar is up. vLLM's own health stays reachable through pass-through
/// on other paths (e.g. `/v1/models`).
fn health() -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}
