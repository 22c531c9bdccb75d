//! The per-request guard ([`RequestGuard`]: metrics, the admission slot, the request span,
//! cancellation) and the body wrappers that report to [`Metrics`].

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, Span};

use super::{
    error_kind, CancelLabels, ConnectorLabels, Metrics, Outcome, Phase, RequestLabels, Route,
    RouteLabels, Stage,
};
use crate::body::{BoxError, ProxyBody};
use crate::connector::Connector;
use crate::error::ProxyError;
use crate::headers::SERVER_TIMING;
use crate::observe::otel::spans::ServerSpan;
use crate::upstream::Leg;
use opentelemetry::KeyValue;

/// One request's metrics guard. See the module documentation.
pub struct RequestGuard {
    metrics: Metrics,
    connector: &'static str,
    route: Route,
    phase: Phase,
    prefill_started: Option<Instant>,
    /// How long the prefill took, for the response's `Server-Timing`.
    prefill_took: Option<std::time::Duration>,
    /// When the decode leg went out; taken when its first byte is relayed.
    decode_sent: Option<Instant>,
    /// When the decode leg went out, for pd-sidecar's decode stage (to the response's end).
    decode_started: Option<Instant>,
    done: bool,
    /// The request's span, entered for logs emitted after the handler returned.
    span: Span,
    /// The request's `-max-in-flight` slot, freed when the guard (and so the response body)
    /// is dropped.
    slot: Option<OwnedSemaphorePermit>,
    /// The request's trace span, when tracing is on (boxed: one pointer when it is off).
    server_span: Option<Box<ServerSpan>>,
}

impl RequestGuard {
    /// Called by [`Metrics::track`], which has already counted the request in flight.
    pub(super) fn new(metrics: Metrics, connector: Connector, route: Route, span: Span) -> Self {
        RequestGuard {
            metrics,
            connector: connector.name(),
            route,
            phase: match route {
                Route::Pd => Phase::Prefill,
                Route::PassThrough => Phase::Decode,
            },
            prefill_started: None,
            prefill_took: None,
            decode_sent: None,
            decode_started: None,
            done: false,
            span,
            slot: None,
            server_span: None,
        }
    }

    /// Keeps the request's trace span, ended with the response.
    pub fn trace(&mut self, span: ServerSpan) {
        self.server_span = Some(Box::new(span));
    }

    /// Adds what `attributes` says to the request's trace span, if it is traced.
    pub fn annotate<const N: usize>(&mut self, attributes: impl FnOnce() -> [KeyValue; N]) {
        if let Some(span) = self.server_span.as_mut().filter(|s| s.recording()) {
            span.set(attributes());
        }
    }

    /// The request's span: every log line about the request is written in it.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Keeps the request's in-flight slot until the response is over.
    pub fn hold(&mut self, slot: Option<OwnedSemaphorePermit>) {
        self.slot = slot;
    }

    /// The prefill leg is being sent.
    pub fn prefill_started(&mut self) {
        self.prefill_started = Some(Instant::now());
    }

    /// The prefiller answered 2xx in full; the decode leg goes out now.
    pub fn prefill_done(&mut self) {
        let now = Instant::now();
        if let Some(started) = self.prefill_started.take() {
            self.prefill_took = Some(now - started);
            let seconds = (now - started).as_secs_f64();
            self.metrics
                .0
                .prefill_duration
                .get_or_create(&ConnectorLabels {
                    connector: self.connector,
                })
                .observe(seconds);
            self.metrics.0.pd_sidecar.prefill_duration.observe(seconds);
            self.annotate(|| {
                [KeyValue::new(
                    "llm_d.pd_proxy.prefill.duration_ms",
                    seconds * 1e3,
                )]
            });
        }
        self.phase = Phase::Handoff;
        self.decode_sent = Some(now);
        self.decode_started = Some(now);
    }

    /// The prefill stage ended without a usable reply (a 4xx relayed to the client, or a
    /// failure decoded locally): a prefill stage error in pd-sidecar's families. A failure that
    /// becomes the client's error is counted by [`RequestGuard::error`].
    pub fn prefill_failed(&mut self) {
        if let Some(started) = self.prefill_started.take() {
            self.prefill_took = Some(started.elapsed());
            let pd = &self.metrics.0.pd_sidecar;
            pd.prefill_duration.observe(started.elapsed().as_secs_f64());
            self.metrics.stage_error(Stage::Prefill);
        }
    }

    /// The decoder is asked first (decode-first): a client leaving now leaves a decode, and
    /// the decoder's first byte is timed from here.
    pub fn decode_first(&mut self) {
        self.phase = Phase::Decode;
        let now = Instant::now();
        self.decode_sent = Some(now);
        self.decode_started = Some(now);
    }

    /// The decoder refused (too little cached): the request goes on to its prefill.
    pub fn decode_refused(&mut self) {
        self.phase = Phase::Prefill;
        self.decode_sent = None;
        self.decode_started = None;
    }

    /// Counts the client's request body bytes.
    pub fn request_bytes(&self, n: usize) {
        self.metrics.bytes(self.route, "request", n);
    }

    /// Wraps a streamed client body (pass-through) so its bytes are counted as they go by.
    pub fn count_request<B>(&self, body: B) -> CountedRequest<B> {
        CountedRequest {
            inner: body,
            bytes: self.metrics.bytes_counter(self.route, "request"),
        }
    }

    /// Counts an upstream failure and turns the error into the client's response.
    pub fn error(&mut self, e: ProxyError) -> Response<ProxyBody> {
        if let Some(leg) = e.leg() {
            self.metrics.upstream_error(leg, error_kind(&e));
            if leg == Leg::Prefill {
                self.prefill_failed();
            }
        }
        // Our error body is not the decoder's first byte.
        self.decode_sent = None;
        e.into_response()
    }

    /// Hands the guard to the response body, which finishes it when the body ends.
    pub fn attach(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if matches!(self.phase, Phase::Prefill | Phase::Handoff) {
            self.phase = Phase::Decode;
        }
        let (mut parts, body) = resp.into_parts();
        if let Some(timing) = self.server_timing() {
            parts.headers.append(SERVER_TIMING, timing);
        }
        let tracked = Tracked {
            bytes: self.metrics.bytes_counter(self.route, "response"),
            inner: body,
            status: parts.status,
            guard: self,
        };
        Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(tracked))
    }

    /// `prefill;dur=…, decode;dur=…` (milliseconds) on a P/D response: the prefill leg until
    /// the prefiller's whole reply, and the decode leg until the decoder's response head.
    fn server_timing(&self) -> Option<http::HeaderValue> {
        if self.route != Route::Pd {
            return None;
        }
        use std::fmt::Write;
        if self.prefill_took.is_none() && self.decode_sent.is_none() {
            return None;
        }
        // Milliseconds with three decimals from integer microseconds: float formatting was
        // most of this header's cost, and it is on every P/D response.
        struct Ms(std::time::Duration);
        impl std::fmt::Display for Ms {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let us = u64::try_from(self.0.as_micros()).unwrap_or(u64::MAX);
                write!(f, "{}.{:03}", us / 1000, us % 1000)
            }
        }
        // One allocation.
        let mut value = String::with_capacity(64);
        if let Some(took) = self.prefill_took {
            let _ = write!(value, "prefill;dur={}", Ms(took));
        }
        if let Some(sent) = self.decode_sent {
            let sep = if value.is_empty() { "" } else { ", " };
            let _ = write!(
                value,
                "{sep}decode;dur={};desc=\"first byte\"",
                Ms(sent.elapsed())
            );
        }
        http::HeaderValue::try_from(value).ok()
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.metrics.0;
        m.requests
            .get_or_create(&RequestLabels {
                connector: self.connector,
                route: self.route.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
        m.in_flight
            .get_or_create(&RouteLabels {
                route: self.route.as_str(),
            })
            .dec();
        if let Some(started) = self.decode_started.take() {
            // pd-sidecar's decode stage: P/D requests whose decode leg went out.
            m.pd_sidecar
                .decode_duration
                .observe(started.elapsed().as_secs_f64());
            let failed = match outcome {
                Outcome::Status(s) => !s.is_success(),
                // pd-sidecar counts a client it could not write to as a decode error.
                Outcome::StreamError | Outcome::Cancelled => true,
            };
            if failed {
                self.metrics.stage_error(Stage::Decode);
            }
        }
        if outcome == Outcome::Cancelled {
            m.cancellations
                .get_or_create(&CancelLabels {
                    route: self.route.as_str(),
                    phase: self.phase.as_str(),
                })
                .inc();
            let _enter = self.span.enter();
            debug!(phase = self.phase.as_str(), "client left");
        }
        if let Some(mut span) = self.server_span.take() {
            let (status, failure) = match outcome {
                Outcome::Status(s) => (Some(s), None),
                Outcome::StreamError => (None, Some("stream_error")),
                Outcome::Cancelled => {
                    span.set([KeyValue::new(
                        "llm_d.sidecar.cancelled_phase",
                        self.phase.as_str(),
                    )]);
                    (None, Some("cancelled"))
                }
            };
            span.end(status, failure);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // Dropped unfinished: hyper dropped the handler or the body because the client left.
        self.finish(Outcome::Cancelled);
    }
}

/// A response body that reports its bytes, its first byte and how it ended to its guard.
struct Tracked {
    // Declared first so it drops first: a cancellation is counted before the upstream
    // connection inside `inner` closes, so whoever sees that close sees the count too.
    guard: RequestGuard,
    inner: ProxyBody,
    status: StatusCode,
    /// `relayed_bytes_total{direction="response"}` of the request's route.
    bytes: Counter,
}

impl Tracked {
    fn on_data(&mut self, data: &Bytes) {
        if data.is_empty() {
            return;
        }
        let t = &mut self.guard;
        if let Some(sent) = t.decode_sent.take() {
            t.metrics
                .0
                .decode_first_byte
                .get_or_create(&ConnectorLabels {
                    connector: t.connector,
                })
                .observe(sent.elapsed().as_secs_f64());
            if let Some(span) = t.server_span.as_mut().filter(|s| s.recording()) {
                let ttft = span.elapsed_ms();
                span.set([KeyValue::new("llm_d.pd_proxy.true_ttft_ms", ttft)]);
            }
        }
        t.phase = Phase::Streaming;
        self.bytes.inc_by(data.len() as u64);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.on_data(data);
                }
                // hyper stops polling a body that reports its end, so finish on the last frame.
                if this.inner.is_end_stream() {
                    this.guard.finish(Outcome::Status(this.status));
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard
                    .span
                    .in_scope(|| debug!(error = %e, "upstream body failed mid-response"));
                this.guard
                    .metrics
                    .upstream_error(Leg::Decode, "stream_broken");
                this.guard.finish(Outcome::StreamError);
            }
            Poll::Ready(None) => this.guard.finish(Outcome::Status(this.status)),
            Poll::Pending => {}
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

impl Drop for Tracked {
    fn drop(&mut self) {
        // Bodies hyper never polls (empty ones, HEAD responses) end here, complete.
        if self.inner.is_end_stream() {
            self.guard.finish(Outcome::Status(self.status));
        }
    }
}

/// A request body that counts its bytes; see [`RequestGuard::count_request`].
pub struct CountedRequest<B> {
    inner: B,
    bytes: Counter,
}

impl<B> Body for CountedRequest<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.bytes.inc_by(data.len() as u64);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The series created at zero are the ones requests report: a label added to one list
    /// and not the other would leave a series missing until first used, or one never used.
    #[test]
    fn preset_label_values_are_the_reported_ones() {
        let reported: Vec<&str> = [
            Outcome::Status(StatusCode::CONTINUE),
            Outcome::Status(StatusCode::OK),
            Outcome::Status(StatusCode::FOUND),
            Outcome::Status(StatusCode::NOT_FOUND),
            Outcome::Status(StatusCode::BAD_GATEWAY),
            Outcome::StreamError,
            Outcome::Cancelled,
        ]
        .iter()
        .map(|o| o.as_str())
        .collect();
        assert_eq!(reported, super::super::OUTCOMES);
        let kinds = [
            ProxyError::PrefillUnreachable {
                prefiller: String::new(),
                detail: String::new(),
            },
            ProxyError::PrefillFailed {
                prefiller: String::new(),
                status: StatusCode::BAD_GATEWAY,
                detail: String::new(),
            },
            ProxyError::PrefillBadReply {
                prefiller: String::new(),
                detail: String::new(),
            },
            ProxyError::Timeout {
                leg: Leg::Prefill,
                target: String::new(),
                after: std::time::Duration::ZERO,
            },
            ProxyError::Internal(String::new()),
        ];
        for e in &kinds {
            assert!(super::super::ERROR_KINDS.contains(&error_kind(e)), "{e:?}");
        }
        // Reported by the response body, not by an error: see `Tracked`.
        assert!(super::super::ERROR_KINDS.contains(&"stream_broken"));
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[tokio::test]
    async fn a_finished_body_counts_its_outcome_and_bytes() {
        let m = Metrics::new();
        let t = m.track(Connector::NixlV2, Route::PassThrough, Span::none());
        let resp = t.attach(Response::new(crate::body::full("hello")));
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "llm_d_sidecar_in_flight_requests{route=\"pass_through\"}"
            ),
            Some(1.0)
        );
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello");
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pass_through\",outcome=\"2xx\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "llm_d_sidecar_relayed_bytes_total{route=\"pass_through\",direction=\"response\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &text,
                "llm_d_sidecar_in_flight_requests{route=\"pass_through\"}"
            ),
            Some(0.0)
        );
    }

    #[test]
    fn a_dropped_guard_is_a_cancellation_in_its_phase() {
        let m = Metrics::new();
        let mut t = m.track(Connector::NixlV2, Route::Pd, Span::none());
        t.prefill_started();
        t.prefill_done();
        drop(t);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "llm_d_sidecar_cancellations_total{route=\"pd\",phase=\"handoff\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert!(
            text.contains("llm_d_sidecar_prefill_duration_seconds_count{connector=\"nixlv2\"} 1")
        );
    }

    #[test]
    fn a_client_leaving_a_decode_first_try_leaves_a_decode_and_after_a_refusal_a_prefill() {
        let m = Metrics::new();
        let mut t = m.track(Connector::SharedStorage, Route::Pd, Span::none());
        t.decode_first();
        drop(t);
        let mut t = m.track(Connector::SharedStorage, Route::Pd, Span::none());
        t.decode_first();
        t.decode_refused();
        drop(t);
        let text = m.render();
        for phase in ["decode", "prefill"] {
            let series =
                format!("llm_d_sidecar_cancellations_total{{route=\"pd\",phase=\"{phase}\"}}");
            assert_eq!(value(&text, &series), Some(1.0), "{text}");
        }
    }

    #[tokio::test]
    async fn names_lists_every_family() {
        let m = Metrics::new();
        let mut t = m.track(Connector::NixlV2, Route::Pd, Span::none());
        t.request_bytes(1);
        t.prefill_started();
        t.prefill_done();
        let _ = t.error(ProxyError::DecoderUnreachable {
            decoder: "d".into(),
            detail: "x".into(),
        });
        t.decode_sent = Some(Instant::now());
        let resp = t.attach(Response::new(crate::body::full("x")));
        resp.into_body().collect().await.unwrap();
        drop(m.track(Connector::NixlV2, Route::Pd, Span::none()));
        m.prefill_retry("connect");
        m.connection_refused("over_limit");
        let _ = m.data_parallel_rank(0);
        let text = m.render();
        let mut exposed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        exposed.sort_unstable();
        let mut names = super::super::NAMES.to_vec();
        names.sort_unstable();
        assert_eq!(exposed, names, "{text}");
    }

    /// pd-sidecar's stage series: prefill and decode durations observed, decode and prefill
    /// stage errors.
    fn stages(m: &Metrics) -> [Option<f64>; 4] {
        let text = m.render();
        let pd = |series: &str| value(&text, &format!("llm_d_disagg_sidecar_{series}"));
        [
            pd("prefill_duration_seconds_count"),
            pd("decode_duration_seconds_count"),
            pd("request_errors_total{stage=\"decode\"}"),
            pd("request_errors_total{stage=\"prefill\"}"),
        ]
    }

    #[tokio::test]
    async fn pd_sidecar_stages_time_the_prefill_and_the_decode_to_its_end() {
        let m = Metrics::new();
        // A decoder's 503 after a good prefill.
        let mut t = m.track(Connector::NixlV2, Route::Pd, Span::none());
        t.prefill_started();
        t.prefill_done();
        let mut resp = Response::new(crate::body::full("busy"));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        t.attach(resp).into_body().collect().await.unwrap();
        assert_eq!(
            stages(&m),
            [Some(1.0), Some(1.0), Some(1.0), Some(0.0)],
            "{}",
            m.render()
        );
        // A client leaving during the decode; then a prefill that failed.
        let mut t = m.track(Connector::NixlV2, Route::Pd, Span::none());
        t.prefill_started();
        t.prefill_done();
        drop(t);
        let mut t = m.track(Connector::NixlV2, Route::Pd, Span::none());
        t.prefill_started();
        t.prefill_failed();
        drop(t);
        // Pass-through is no stage of pd-sidecar's.
        let t = m.track(Connector::NixlV2, Route::PassThrough, Span::none());
        t.attach(Response::new(crate::body::full("x")))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            stages(&m),
            [Some(3.0), Some(2.0), Some(2.0), Some(1.0)],
            "{}",
            m.render()
        );
    }

    #[test]
    fn an_empty_body_never_polled_is_complete() {
        let m = Metrics::new();
        let t = m.track(Connector::SharedStorage, Route::PassThrough, Span::none());
        drop(t.attach(Response::new(crate::body::empty())));
        let text = m.render();
        assert!(text.contains("outcome=\"2xx\"} 1"), "{text}");
        assert!(
            text.lines()
                .filter(|l| l.starts_with("llm_d_sidecar_cancellations_total{"))
                .all(|l| l.ends_with(" 0")),
            "{text}"
        );
    }
}
