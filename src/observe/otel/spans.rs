//! The trace tree: the request's SERVER span, child of the client's `traceparent`, and one
//! CLIENT span per upstream leg under it, whose own id each leg forwards in its `traceparent`
//! so vLLM's spans nest under the leg that caused them.
//!
//! Names and attributes follow pd-sidecar (`llm_d.pd_proxy.*`, `llm_d.openai.api`) and the
//! OpenTelemetry HTTP semantic conventions. An unsampled request still gets span ids (the SDK
//! gives a dropped span one), so the sampling decision reaches vLLM and nothing is exported.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, USER_AGENT};
use http::{Request, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderInjector;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::headers::{TRACEPARENT, TRACESTATE};
use crate::observe::trace_context;
use crate::upstream::Leg;

/// pd-sidecar's span names for its legs.
const ENCODE_SPAN: &str = "llm_d.pd_proxy.encode";
const PREFILL_SPAN: &str = "llm_d.pd_proxy.prefill";
const DECODE_SPAN: &str = "llm_d.pd_proxy.decode";

/// The request's SERVER span, kept by the request's guard and ended when the response ends.
pub struct ServerSpan {
    span: Span,
    started: Instant,
}

/// The server span's context on a request, so the leg sent for it opens a CLIENT span under
/// it. Copied onto each leg's head; taken off by the leg's send.
#[derive(Clone)]
pub struct TraceParent {
    tracer: SdkTracer,
    parent: SpanContext,
}

/// An open leg span. It rides the upstream response's extensions (which need `Clone`) and
/// then its body, and ends when the last holder lets go: for a decode, when the stream ends.
#[derive(Clone)]
pub struct LegSpan(Arc<Mutex<Span>>);

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// Writes `span` into `headers` as `traceparent` (keeping its `tracestate`, absent when
/// empty).
fn inject(span: &SpanContext, headers: &mut HeaderMap) {
    let context = Context::new().with_remote_span_context(span.clone());
    propagator().inject_context(&context, &mut HeaderInjector(headers));
    if headers.get(TRACESTATE).is_some_and(|v| v.is_empty()) {
        headers.remove(TRACESTATE);
    }
}

/// Opens the request's server span under the client's `traceparent` (a new trace when it has
/// none or a malformed one) and points the request's `traceparent` at it, so the logs' trace
/// id and every leg agree; marks the request with the [`TraceParent`] its legs open theirs
/// under.
pub fn start_server<B>(
    tracer: &SdkTracer,
    scheme: &'static str,
    req: &mut Request<B>,
    client: SocketAddr,
    route: Option<&'static str>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> ServerSpan {
    let parent = propagator().extract(&ClientContext::of(req.headers()));
    let method = known_method(req.method());
    // The semconv name: `{method} {http.route}`, or the method alone off the known routes.
    let name = match (method, route) {
        ("_OTHER", _) => "HTTP".to_string(),
        (method, Some(route)) => format!("{method} {route}"),
        (method, None) => method.to_string(),
    };
    // Sampled first: an unsampled span (most, at the default ratio) never builds its attributes.
    let builder = SpanBuilder::from_name(name).with_kind(SpanKind::Server);
    let mut span = tracer.build_with_context(builder, &parent);
    if span.is_recording() {
        let mut attrs = attributes();
        attrs.reserve(8);
        attrs.extend([
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.path", req.uri().path().to_string()),
            KeyValue::new("llm_d.pd_proxy.request_path", req.uri().path().to_string()),
            KeyValue::new("url.scheme", scheme),
            KeyValue::new("network.protocol.version", protocol_version(req.version())),
            KeyValue::new("client.address", client.ip().to_string()),
            KeyValue::new("client.port", i64::from(client.port())),
        ]);
        if let Some(route) = route {
            attrs.push(KeyValue::new("http.route", route));
        }
        if let Some(agent) = req.headers().get(USER_AGENT).and_then(|v| v.to_str().ok()) {
            attrs.push(KeyValue::new("user_agent.original", agent.to_string()));
        }

        span.set_attributes(attrs);
    }
    let context = span.span_context().clone();
    inject(&context, req.headers_mut());
    req.extensions_mut().insert(TraceParent {
        tracer: tracer.clone(),
        parent: context,
    });
    ServerSpan {
        span,
        started: Instant::now(),
    }
}

/// The semconv's method: the known ones as they are, any other as `_OTHER` (a client's made-up
/// method must not become a span name of its own).
fn known_method(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The client's trace context as W3C Trace Context reads it: a parent only from exactly one
/// `traceparent` that [`trace_context::trace_id`] accepts (the SDK's parser is laxer), and every
/// `tracestate` header joined, as the specification allows a list to be split.
struct ClientContext<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<String>,
}

impl<'a> ClientContext<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let traceparent = match (values.next(), values.next()) {
            (Some(one), None) if trace_context::trace_id(one).is_some() => one.to_str().ok(),
            _ => None,
        };
        let states: Vec<&str> = headers
            .get_all(TRACESTATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        ClientContext {
            traceparent,
            tracestate: (!states.is_empty()).then(|| states.join(",")),
        }
    }
}

impl opentelemetry::propagation::Extractor for ClientContext<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" if self.traceparent.is_some() => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

impl ServerSpan {
    pub fn set(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.span.set_attributes(attributes);
    }

    /// False for an unsampled request: its attributes need not be built.
    pub fn recording(&self) -> bool {
        self.span.is_recording()
    }

    /// Milliseconds since the request arrived, as pd-sidecar's `*_ms` attributes are.
    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// Ends the span with the response's fate: its status, or how it broke off.
    pub fn end(mut self, status: Option<StatusCode>, failure: Option<&'static str>) {
        let total = self.elapsed_ms();
        self.span
            .set_attribute(KeyValue::new("llm_d.pd_proxy.total_duration_ms", total));
        if let Some(status) = status {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
        }
        // The semconv: a server span is an error on 5xx only (a 4xx is the client's).
        let error = match (failure, status) {
            (Some(kind), _) => Some(kind.to_string()),
            (None, Some(s)) if s.is_server_error() => Some(s.as_u16().to_string()),
            _ => None,
        };
        if let Some(error) = error {
            self.span
                .set_attribute(KeyValue::new("error.type", error.clone()));
            self.span.set_status(Status::error(error));
        }
        self.span.end();
    }
}

/// Opens `leg`'s CLIENT span when `req` carries a [`TraceParent`] (taking it off), and points
/// the leg's `traceparent` at the new span.
pub fn start_leg<B>(req: &mut Request<B>, leg: Leg) -> Option<LegSpan> {
    let parent = req.extensions_mut().remove::<TraceParent>()?;
    let name = match leg {
        Leg::Encode => ENCODE_SPAN,
        Leg::Prefill => PREFILL_SPAN,
        Leg::Decode => DECODE_SPAN,
    };
    let builder = SpanBuilder::from_name(name).with_kind(SpanKind::Client);
    let under = Context::new().with_remote_span_context(parent.parent);
    let mut span = parent.tracer.build_with_context(builder, &under);
    if span.is_recording() {
        let uri = req.uri();
        let mut attrs = vec![
            KeyValue::new("http.request.method", known_method(req.method())),
            KeyValue::new("url.full", uri.to_string()),
        ];
        if let Some(host) = uri.host() {
            attrs.push(KeyValue::new("server.address", host.to_string()));
        }
        if let Some(port) = uri.port_u16() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        span.set_attributes(attrs);
    }
    inject(span.span_context(), req.headers_mut());
    Some(LegSpan(Arc::new(Mutex::new(span))))
}

/// A leg span until its response head arrives: dropped before that (a deadline passed, or
/// the request was dropped), it ends as an error rather than looking like a success.
pub struct Pending(Option<LegSpan>);

impl Pending {
    pub fn new(span: LegSpan) -> Self {
        Pending(Some(span))
    }

    /// The head arrived (or the send failed): the span goes on with the caller.
    pub fn settle(mut self) -> Option<LegSpan> {
        self.0.take()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(span) = self.0.take() {
            span.failed("cancelled");
        }
    }
}

impl LegSpan {
    fn with(&self, f: impl FnOnce(&mut Span)) {
        // A poisoned lock only means a panic elsewhere; the span is still usable.
        let mut span = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut span);
    }

    /// The upstream answered with `status`; the semconv makes a client span an error on 4xx
    /// and 5xx.
    pub fn responded(&self, status: StatusCode) {
        self.with(|span| {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_client_error() || status.is_server_error() {
                let code = status.as_u16().to_string();
                span.set_attribute(KeyValue::new("error.type", code.clone()));
                span.set_status(Status::error(code));
            }
        });
    }

    /// The leg failed with `kind` (the words of `upstream_errors_total`'s kind label).
    pub fn failed(&self, kind: &'static str) {
        self.with(|span| {
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(kind));
        });
    }

    /// `body`, holding this span until it ends or is dropped, and marking a broken stream.
    pub fn over<B>(self, body: B) -> Traced<B> {
        Traced {
            inner: body,
            span: Some(self),
        }
    }
}

/// An upstream body that ends its leg's span with itself.
pub struct Traced<B> {
    inner: B,
    span: Option<LegSpan>,
}

impl<B> Body for Traced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                if let Some(span) = this.span.take() {
                    span.failed("stream_broken");
                }
            }
            Poll::Ready(None) => this.span = None,
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.span = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
