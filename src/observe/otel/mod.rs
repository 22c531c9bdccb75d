//! Tracing on the OpenTelemetry crates (work in progress: only the settings exist yet; see
//! docs/decisions/0002-tracing-on-opentelemetry.md for the rest of the design).

pub mod export;
pub mod settings;
