//! What the sidecar tells operators: metrics (and the per-request guard that reports them),
//! the admin listener, logs, the request span with W3C trace context, and OpenTelemetry tracing.

pub mod admin;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod trace_context;
