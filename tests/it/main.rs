//! The sidecar's integration tests: one binary (one link of the dependency graph instead of
//! one per file), one support module. `logs.rs` stays a separate binary because it installs a
//! global subscriber, and tracing caches callsite interest per process.

// Test code: a failed expectation is the test failing, and its servers are bounded by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

mod cancel;
mod chunked_decode;
mod cli;
mod client_params;
mod connections;
mod connectors;
mod dashboard;
mod data_parallel;
mod deploy;
mod encode;
mod errors;
mod failover;
mod fuzz_corpus;
mod manifests;
mod metrics;
mod otel;
mod passthrough;
mod pd_flow;
mod policy;
mod readiness;
mod readme;
mod retries;
mod routes;
mod shared_storage;
mod shutdown;
mod ssrf_pool;
mod streaming;
mod tls;
mod tokenize_once;
mod trace_context;
