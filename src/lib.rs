//! llm-d routing sidecar: a P/D (prefill/decode) reverse proxy for vLLM.
//!
//! This is the one module map (the docs link here).
//! - [`cli`] flags (Go-style spellings accepted) and [`config`] their validated form;
//!   [`app`] assembles everything fallible from a [`Config`] before any port is bound.
//! - [`server`] the listeners, signals and graceful drain; [`data_parallel`] one proxy per vLLM
//!   rank and `x-data-parallel-host-port`; [`proxy`] the request handler:
//!   `/health`, admission, the [`routing`] decision made once, pass-through, and the one place
//!   an error becomes a logged, counted response; [`readiness`] `/readyz` from vLLM's
//!   `/health` and the drain.
//! - [`pd`] the P/D request path (stages in `pd/mod.rs`, the prefill leg in `pd/prefill.rs`,
//!   the KV-lease safety net in `pd/handoff.rs`, chunked decode in `pd/chunked.rs`);
//!   [`encode`] the encoder stage of E/PD; [`connector`] one file per connector's body
//!   rewrites; [`json_edit`] byte-preserving top-level JSON edits.
//! - [`upstream`] pooled clients per leg, the decoder and its deadline, targets and the
//!   prefiller header, decoder health.
//! - [`body`] the response body type, spliced request bodies, frame coalescing; [`headers`]
//!   every header name and the hop-by-hop hygiene; [`error`] the one status table.
//! - [`security`] SSRF allowlist kept current by the InferencePool watch, rustls settings.
//! - [`observe`] Prometheus metrics and the per-request guard, the admin listener, logs,
//!   the request span and W3C `traceparent`, OTLP export.
//! - [`runtime`] busy polling, request/trace ids, allocator tuning.

pub mod api;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod connector;
pub mod data_parallel;
pub mod encode;
pub mod error;
pub mod headers;
pub mod json_edit;
pub mod observe;
pub mod pd;
pub mod proxy;
pub mod readiness;
pub mod routing;
pub mod runtime;
pub mod security;
pub mod server;
pub mod upstream;

pub use app::App;
pub use config::Config;
pub use connector::Connector;
