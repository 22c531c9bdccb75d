//! Prometheus metrics: every name, label and bucket is defined here.
//!
//! Exposed names (prefix `llm_d_sidecar_`; prometheus-client appends `_total` to counters):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `requests_total` | counter | `connector`, `route`, `outcome` |
//! | `in_flight_requests` | gauge | `route` |
//! | `ready` | gauge | |
//! | `prefill_duration_seconds` | histogram | `connector` |
//! | `decode_first_byte_seconds` | histogram | `connector` |
//! | `upstream_errors_total` | counter | `leg`, `kind` |
//! | `cancellations_total` | counter | `route`, `phase` |
//! | `relayed_bytes_total` | counter | `route`, `direction` |
//! | `prefill_retries_total` | counter | `reason` |
//! | `connections_refused_total` | counter | `reason` |
//! | `rejected_requests_total` | counter | `reason` |
//! | `trace_spans_total` | counter | `outcome` |
//! | `data_parallel_requests_total` | counter | `rank`, `via` |
//! | `client_params_removed_total` | counter | `field` |
//!
//! pd-sidecar's families (llm-d-router#1677), under their own prefix `llm_d_disagg_sidecar_`, so
//! dashboards built for it work unchanged: `requests_total{api_type}`,
//! `disagg_requests_total{disagg_type}`, `encode_duration_seconds`, `prefill_duration_seconds`,
//! `decode_duration_seconds` (histograms with its buckets) and `request_errors_total{stage}`.
//!
//! Every series whose label values are known is created at zero when the registry is built, so
//! a rate or an alert works from the first scrape.
//!
//! Labels carry only low-cardinality values the server controls (connector, route, phase…),
//! never user input: the prefiller address comes from a request header, so it is never a label
//! (it is in the logs instead). Every label value is a `&'static str` from the enums below.
//!
//! Per request, [`Metrics::track`] returns a [`RequestGuard`], an RAII guard: it holds the in-flight
//! gauge up and knows the request's phase. Dropped before the response body ended, it counts a
//! cancellation in that phase; this is how a client that leaves is detected, since hyper drops
//! the handler future or the response body when the connection closes.

mod guard;

use std::fmt;
use std::sync::Arc;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::Span;

use crate::connector::Connector;
use crate::error::ProxyError;
pub use crate::routing::Route;
use crate::upstream::Leg;

pub use guard::{CountedRequest, RequestGuard};

/// Every exposed name starts with this.
pub const PREFIX: &str = "llm_d_sidecar";

/// Every exposed metric family, as scraped (docs/operating.md's list is checked against this).
pub const NAMES: [&str; 23] = [
    "llm_d_sidecar_requests_total",
    "llm_d_sidecar_in_flight_requests",
    "llm_d_sidecar_ready",
    "llm_d_sidecar_prefill_duration_seconds",
    "llm_d_sidecar_decode_first_byte_seconds",
    "llm_d_sidecar_upstream_errors_total",
    "llm_d_sidecar_cancellations_total",
    "llm_d_sidecar_relayed_bytes_total",
    "llm_d_sidecar_prefill_retries_total",
    "llm_d_sidecar_connections_refused_total",
    "llm_d_sidecar_rejected_requests_total",
    "llm_d_sidecar_trace_spans_total",
    "llm_d_sidecar_data_parallel_requests_total",
    "llm_d_sidecar_encoders_denied_total",
    "llm_d_sidecar_client_params_removed_total",
    "llm_d_sidecar_prefiller_breakers",
    "llm_d_sidecar_degraded_requests_total",
    "llm_d_disagg_sidecar_requests_total",
    "llm_d_disagg_sidecar_disagg_requests_total",
    "llm_d_disagg_sidecar_encode_duration_seconds",
    "llm_d_disagg_sidecar_prefill_duration_seconds",
    "llm_d_disagg_sidecar_decode_duration_seconds",
    "llm_d_disagg_sidecar_request_errors_total",
];

/// What became of a sampled span (`trace_spans_total`'s `outcome`).
pub const SPAN_OUTCOMES: [&str; 3] = ["exported", "dropped", "failed"];

/// pd-sidecar's prefix for its families.
pub const PD_SIDECAR_PREFIX: &str = "llm_d_disagg_sidecar";

/// pd-sidecar's buckets for its stage histograms (seconds).
const STAGE_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// pd-sidecar's `api_type` for a route (it counts `/v1/completions` and `/v1/messages` as
/// `chat_completions`, and so do we, for its dashboards).
pub(crate) fn api_type(api: crate::api::Api) -> &'static str {
    use crate::api::Api;
    match api {
        Api::Completions | Api::ChatCompletions | Api::Messages => "chat_completions",
        Api::Responses => "responses",
        Api::Generate => "generate",
    }
}

/// The stages pd-sidecar's `request_errors_total` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Encode,
    Prefill,
    Decode,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Encode => "encode",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
        }
    }
}

/// Where a request was when its client left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the request or waiting for the prefiller (P/D only).
    Prefill,
    /// The prefill is done; the decoder has not answered yet (P/D only).
    Handoff,
    /// Waiting for the decoder (pass-through: for the local vLLM); no body byte sent yet.
    Decode,
    /// The response body is being relayed.
    Streaming,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Handoff => "handoff",
            Phase::Decode => "decode",
            Phase::Streaming => "streaming",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The response was sent in full with this status.
    Status(StatusCode),
    /// The upstream body broke after the status had been sent.
    StreamError,
    /// The client left first.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Status(s) if s.is_success() => "2xx",
            Outcome::Status(s) if s.is_redirection() => "3xx",
            Outcome::Status(s) if s.is_client_error() => "4xx",
            Outcome::Status(s) if s.is_server_error() => "5xx",
            Outcome::Status(_) => "1xx",
            Outcome::StreamError => "stream_error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

const OUTCOMES: [&str; 7] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "stream_error",
    "cancelled",
];
const ERROR_KINDS: [&str; 7] = [
    "unreachable",
    "circuit_open",
    "http_5xx",
    "bad_reply",
    "timeout",
    "stream_broken",
    "other",
];

/// The `kind` label of an upstream error.
pub(crate) fn error_kind(e: &ProxyError) -> &'static str {
    match e.kind() {
        // Upstream failures only; anything else counted here is a kind of its own to add.
        kind if ERROR_KINDS.contains(&kind) || kind == "http_4xx" => kind,
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    connector: &'static str,
    route: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabels {
    connector: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    leg: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CancelLabels {
    route: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Why a P/D request was served without a KV hand-off (`degraded_requests_total`'s reason,
/// and the `x-prefill-fallback` header's value with `_` as `-`).
pub const DEGRADED_REASONS: [&str; 2] = ["decode_local", "no_kv_params"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    route: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    /// A number below `-data-parallel-size`: bounded by the operator, not by requests.
    rank: String,
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FieldLabels {
    /// One of [`crate::security::client_params::Field`]'s labels.
    field: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiTypeLabels {
    api_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DisaggLabels {
    disagg_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

type Histograms = Family<ConnectorLabels, Histogram, fn() -> Histogram>;

/// pd-sidecar's families, fed by the same guard as ours.
struct PdSidecar {
    requests: Family<ApiTypeLabels, Counter>,
    disagg_requests: Family<DisaggLabels, Counter>,
    encode_duration: Histogram,
    prefill_duration: Histogram,
    decode_duration: Histogram,
    errors: Family<StageLabels, Counter>,
}

/// 5 ms to ~82 s: a cached one-token prefill is milliseconds, a long prompt on a busy
/// prefiller tens of seconds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl PdSidecar {
    fn register(registry: &mut Registry) -> Self {
        let stage_histogram = || Histogram::new(STAGE_BUCKETS);
        let requests = Family::<ApiTypeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests on the inference API routes, by API type (pd-sidecar's name)",
            requests.clone(),
        );
        let disagg_requests = Family::<DisaggLabels, Counter>::default();
        registry.register(
            "disagg_requests",
            "Requests routed through disaggregation, by disaggregation type (p/d, e/p/d, e/d)",
            disagg_requests.clone(),
        );
        let encode_duration = stage_histogram();
        registry.register(
            "encode_duration_seconds",
            "Encode stage latency in seconds: from the first encoder call to the last reply or \
             the first failure",
            encode_duration.clone(),
        );
        let prefill_duration = stage_histogram();
        registry.register(
            "prefill_duration_seconds",
            "Prefill stage latency in seconds, retries included, until the prefiller's whole \
             reply or its failure",
            prefill_duration.clone(),
        );
        let decode_duration = stage_histogram();
        registry.register(
            "decode_duration_seconds",
            "Decode stage latency in seconds, from sending the decode leg to the response's end",
            decode_duration.clone(),
        );
        let errors = Family::<StageLabels, Counter>::default();
        registry.register(
            "request_errors",
            "Stage errors, by stage (encode, prefill, decode)",
            errors.clone(),
        );
        for api_type in ["chat_completions", "responses", "generate"] {
            let _ = requests.get_or_create(&ApiTypeLabels { api_type });
        }
        for disagg_type in ["p/d", "e/p/d", "e/d"] {
            let _ = disagg_requests.get_or_create(&DisaggLabels { disagg_type });
        }
        for stage in ["encode", "prefill", "decode"] {
            let _ = errors.get_or_create(&StageLabels { stage });
        }
        PdSidecar {
            requests,
            disagg_requests,
            encode_duration,
            prefill_duration,
            decode_duration,
            errors,
        }
    }
}

/// The sidecar's metrics and their registry. Cheap to clone: clones share the counters.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    ready: Gauge,
    requests: Family<RequestLabels, Counter>,
    in_flight: Family<RouteLabels, Gauge>,
    prefill_duration: Histograms,
    decode_first_byte: Histograms,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    cancellations: Family<CancelLabels, Counter>,
    relayed_bytes: Family<BytesLabels, Counter>,
    prefill_retries: Family<RetryLabels, Counter>,
    connections_refused: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    trace_spans: Family<OutcomeLabels, Counter>,
    data_parallel: Family<RankLabels, Counter>,
    encoders_denied: Counter,
    client_params_removed: Family<FieldLabels, Counter>,
    prefiller_breakers: Family<StateLabels, Gauge>,
    degraded: Family<ReasonLabels, Counter>,
    pd_sidecar: PdSidecar,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, and `connector`'s series at zero.
    pub fn for_connector(connector: Connector) -> Self {
        let m = Self::new();
        let connector = connector.name();
        let inner = &m.0;
        for route in [Route::Pd, Route::PassThrough] {
            for outcome in OUTCOMES {
                let _ = inner.requests.get_or_create(&RequestLabels {
                    connector,
                    route: route.as_str(),
                    outcome,
                });
            }
        }
        let _ = inner
            .prefill_duration
            .get_or_create(&ConnectorLabels { connector });
        let _ = inner
            .decode_first_byte
            .get_or_create(&ConnectorLabels { connector });
        // Rank 0 is every sidecar's, data-parallel or not.
        let _ = m.data_parallel_rank(0);
        m
    }

    /// A fresh registry with every metric registered. Each sidecar (and each test) owns one.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix(PREFIX);
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests served, by connector, route (pd, pass_through) and outcome (2xx, 4xx, 5xx, \
             stream_error, cancelled); /health and /readyz are not counted",
            requests.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while /readyz answers 200 (every vLLM rank's /health answers 2xx and the sidecar \
             is not draining), else 0",
            ready.clone(),
        );
        let in_flight = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "in_flight_requests",
            "Requests received and not yet answered in full, by route",
            in_flight.clone(),
        );
        let prefill_duration = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "prefill_duration_seconds",
            "Time from sending the prefill leg to having the prefiller's whole 2xx reply",
            prefill_duration.clone(),
        );
        let decode_first_byte = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "decode_first_byte_seconds",
            "Time from sending the decode leg to relaying the decoder's first body byte \
             (streaming: the first token event)",
            decode_first_byte.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Upstream failures, by leg (encode, prefill, decode) and kind (unreachable, \
             circuit_open, http_4xx, http_5xx, bad_reply, stream_broken, other)",
            upstream_errors.clone(),
        );
        let cancellations = Family::default();
        registry.register(
            "cancellations",
            "Requests whose client left before the response ended, by route and phase \
             (prefill, handoff, decode, streaming)",
            cancellations.clone(),
        );
        let relayed_bytes = Family::default();
        registry.register(
            "relayed_bytes",
            "Body bytes received from clients (direction=request) and sent to them \
             (direction=response), by route",
            relayed_bytes.clone(),
        );
        let prefill_retries = Family::default();
        registry.register(
            "prefill_retries",
            "Prefill legs sent again (-prefill-max-retries), by what failed: connect, http_502, \
             http_503, http_504",
            prefill_retries.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections closed without a request served, by reason: over_limit \
             (-max-connections), no_request_in_time (-header-read-timeout), head_too_large \
             (over twice -max-header-size or -max-header-count: hyper's bare 431)",
            connections_refused.clone(),
        );
        let rejected = Family::default();
        registry.register(
            "rejected_requests",
            "Requests answered 503 without being served, by reason: max_in_flight \
             (-max-in-flight)",
            rejected.clone(),
        );
        let trace_spans = Family::default();
        registry.register(
            "trace_spans",
            "Sampled trace spans, by outcome: exported, dropped (the export queue was full), \
             failed (the collector refused them or did not answer in time)",
            trace_spans.clone(),
        );
        let data_parallel = Family::default();
        registry.register(
            "data_parallel_requests",
            "Requests served by each data-parallel rank, by how they reached it: via=listener \
             (its own port) or via=header (x-data-parallel-host-port named it)",
            data_parallel.clone(),
        );
        let encoders_denied = Counter::default();
        registry.register(
            "encoders_denied",
            "Encoders named in x-encoder-hosts-ports that SSRF protection does not allow, \
             dropped from their request",
            encoders_denied.clone(),
        );
        let prefiller_breakers = Family::<StateLabels, Gauge>::default();
        registry.register(
            "prefiller_breakers",
            "Prefillers whose circuit breaker is not closed, by state: open (skipped until its \
             backoff ends) or half_open (one request is trying it)",
            prefiller_breakers.clone(),
        );
        for state in ["open", "half_open"] {
            prefiller_breakers
                .get_or_create(&StateLabels { state })
                .set(0);
        }
        let degraded = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "degraded_requests",
            "P/D requests answered without the prefiller's KV cache, by reason: decode_local \
             (the prefill failed; -prefill-failure-policy=decode-local) or no_kv_params (the \
             prefiller returned no usable kv_transfer_params: the decoder recomputes the prompt)",
            degraded.clone(),
        );
        for reason in DEGRADED_REASONS {
            let _ = degraded.get_or_create(&ReasonLabels { reason });
        }
        let client_params_removed = Family::default();
        registry.register(
            "client_params_removed",
            "Transfer parameters a client sent, removed before its request reached vLLM \
             (-trust-client-kv-params=false), by field: kv_transfer_params, ec_transfer_params, \
             v1_remote_fields (top-level remote_*/do_remote_*), extra_args (generate's \
             sampling_params.extra_args), vllm_xargs",
            client_params_removed.clone(),
        );
        for field in crate::security::client_params::Field::ALL {
            let _ = client_params_removed.get_or_create(&FieldLabels {
                field: field.label(),
            });
        }
        // Series with known label values exist from the start: 0 rather than nothing.
        for route in [Route::Pd, Route::PassThrough] {
            let route = route.as_str();
            in_flight.get_or_create(&RouteLabels { route }).set(0);
            for direction in ["request", "response"] {
                let _ = relayed_bytes.get_or_create(&BytesLabels { route, direction });
            }
        }
        for phase in [
            Phase::Prefill,
            Phase::Handoff,
            Phase::Decode,
            Phase::Streaming,
        ] {
            let _ = cancellations.get_or_create(&CancelLabels {
                route: Route::Pd.as_str(),
                phase: phase.as_str(),
            });
        }
        for phase in [Phase::Decode, Phase::Streaming] {
            let _ = cancellations.get_or_create(&CancelLabels {
                route: Route::PassThrough.as_str(),
                phase: phase.as_str(),
            });
        }
        for leg in ["prefill", "decode"] {
            for kind in ERROR_KINDS {
                let _ = upstream_errors.get_or_create(&UpstreamErrorLabels { leg, kind });
            }
        }
        for reason in ["connect", "http_502", "http_503", "http_504"] {
            let _ = prefill_retries.get_or_create(&RetryLabels { reason });
        }
        for reason in ["over_limit", "no_request_in_time", "head_too_large"] {
            let _ = connections_refused.get_or_create(&ReasonLabels { reason });
        }
        let _ = rejected.get_or_create(&ReasonLabels {
            reason: "max_in_flight",
        });
        for outcome in SPAN_OUTCOMES {
            let _ = trace_spans.get_or_create(&OutcomeLabels { outcome });
        }
        let pd_sidecar = PdSidecar::register(root.sub_registry_with_prefix(PD_SIDECAR_PREFIX));
        Self(Arc::new(Inner {
            registry: root,
            ready,
            requests,
            in_flight,
            prefill_duration,
            decode_first_byte,
            upstream_errors,
            cancellations,
            relayed_bytes,
            prefill_retries,
            connections_refused,
            rejected,
            trace_spans,
            data_parallel,
            encoders_denied,
            client_params_removed,
            prefiller_breakers,
            degraded,
            pd_sidecar,
        }))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.0.registry);
        text
    }

    /// Sets `ready` (see [`crate::readiness`]).
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.set(i64::from(ready));
    }

    /// Starts tracking one request: in flight until the returned guard is finished or dropped.
    pub fn track(&self, connector: Connector, route: Route, span: Span) -> RequestGuard {
        self.0
            .in_flight
            .get_or_create(&RouteLabels {
                route: route.as_str(),
            })
            .inc();
        RequestGuard::new(self.clone(), connector, route, span)
    }

    /// Counts a request on an inference API route in pd-sidecar's `requests_total`, and in its
    /// `disagg_requests_total` under the stages it runs remotely (`p/d`, `e/p/d`, `e/d`).
    pub fn inference_request(&self, api: crate::api::Api, disagg_type: Option<&'static str>) {
        let pd = &self.0.pd_sidecar;
        pd.requests
            .get_or_create(&ApiTypeLabels {
                api_type: api_type(api),
            })
            .inc();
        if let Some(disagg_type) = disagg_type {
            pd.disagg_requests
                .get_or_create(&DisaggLabels { disagg_type })
                .inc();
        }
    }

    /// An encode stage that ran (`ok`) or failed, and how long it took.
    pub fn encode_stage(&self, seconds: f64, ok: bool) {
        self.0.pd_sidecar.encode_duration.observe(seconds);
        if !ok {
            self.stage_error(Stage::Encode);
        }
    }

    /// A prefiller's breaker moved between states (`None`: closed, not counted).
    pub fn prefiller_breaker(&self, from: Option<&'static str>, to: Option<&'static str>) {
        let family = &self.0.prefiller_breakers;
        if let Some(state) = from {
            family.get_or_create(&StateLabels { state }).dec();
        }
        if let Some(state) = to {
            family.get_or_create(&StateLabels { state }).inc();
        }
    }

    /// A P/D request was answered without a KV hand-off (`reason`: one of
    /// [`DEGRADED_REASONS`]).
    pub fn degraded(&self, reason: &'static str) {
        self.0
            .degraded
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Encoders the request named that SSRF protection does not allow (dropped from it).
    pub fn encoders_denied(&self, n: usize) {
        self.0.encoders_denied.inc_by(n as u64);
    }

    /// Counts one request's removal of a client's transfer parameters, by `field` label.
    pub fn client_param_removed(&self, field: &'static str) {
        self.0
            .client_params_removed
            .get_or_create(&FieldLabels { field })
            .inc();
    }

    /// Rank `rank`'s request counters (created at zero): arrived on its listener, and sent to
    /// it by `x-data-parallel-host-port`.
    pub fn data_parallel_rank(&self, rank: usize) -> [Counter; 2] {
        ["listener", "header"].map(|via| {
            self.0
                .data_parallel
                .get_or_create(&RankLabels {
                    rank: rank.to_string(),
                    via,
                })
                .clone()
        })
    }

    /// Counts a request answered 503 unserved; `reason` says why.
    pub fn rejected(&self, reason: &'static str) {
        self.0
            .rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts `n` sampled spans that were `outcome` (one of [`SPAN_OUTCOMES`]).
    pub fn trace_spans(&self, outcome: &'static str, n: u64) {
        self.0
            .trace_spans
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n);
    }

    fn stage_error(&self, stage: Stage) {
        self.0
            .pd_sidecar
            .errors
            .get_or_create(&StageLabels {
                stage: stage.as_str(),
            })
            .inc();
    }

    /// Counts one prefill retry; `reason` is what failed before it.
    pub fn prefill_retry(&self, reason: &'static str) {
        self.0
            .prefill_retries
            .get_or_create(&RetryLabels { reason })
            .inc();
    }

    /// Counts a connection closed before serving a request; `reason` says why.
    pub fn connection_refused(&self, reason: &'static str) {
        self.0
            .connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn upstream_error(&self, leg: Leg, kind: &'static str) {
        let leg = match leg {
            Leg::Encode => "encode",
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        };
        self.0
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels { leg, kind })
            .inc();
    }

    fn bytes(&self, route: Route, direction: &'static str, n: usize) {
        self.bytes_counter(route, direction).inc_by(n as u64);
    }

    /// The `relayed_bytes_total` series of one route and direction, for a body to count into
    /// frame by frame without a label lookup per frame.
    fn bytes_counter(&self, route: Route, direction: &'static str) -> Counter {
        self.0
            .relayed_bytes
            .get_or_create(&BytesLabels {
                route: route.as_str(),
                direction,
            })
            .clone()
    }
}
