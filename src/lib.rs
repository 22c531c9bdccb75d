//! llm-d routing sidecar: a P/D (prefill/decode) reverse proxy for vLLM.
//!
//! Module map:
//! - [`cli`] flags (Go-style spellings accepted) and [`config`] their validated form;
//! - [`server`] the listener and graceful shutdown; [`proxy`] routing and pass-through;
//! - [`disagg`] the P/D request path ([`decoder_health`] keeps it from prefilling for a dead decoder); [`connector`] one file per connector's rewrites;
//! - [`json_edit`] byte-preserving body rewriting; [`upstream`] the pooled client;
//! - [`allowlist`] SSRF protection, kept current by [`inference_pool`]; [`tls`] rustls server and client settings;
//! - [`headers`], [`body`], [`error`] (the one status table), [`logging`];
//! - [`metrics`] every Prometheus metric and the per-request guard, served by [`admin`] on
//!   `-metrics-port`; [`telemetry`] the request span and W3C `traceparent`, exported by
//!   [`otlp`] with `-otlp-endpoint`;
//! - [`sim`] the vLLM P/D simulator behind the `vllm-sim` binary.

pub mod admin;
pub mod allowlist;
pub mod body;
pub mod busy_poll;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod connector;
pub mod decoder_health;
pub mod disagg;
pub mod error;
pub mod headers;
pub mod ids;
pub mod inference_pool;
pub mod json_edit;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod proxy;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use connector::Connector;
pub use server::run;
