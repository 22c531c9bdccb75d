//! `-otlp-endpoint`: the request span and its per-leg spans reach an OTLP/HTTP collector, in the
//! trace both legs carry in `traceparent`. Its own test binary: it installs a subscriber.

// Test code: a failed expectation is the test failing, and its servers are bounded by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

// The shared support module; this binary uses only part of it.
#[allow(dead_code)]
#[path = "it/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;
use sidecar::observe::logging::{self, LogFormat, LogLevel, LogSettings, LogTime};
use sidecar::observe::otlp;
use sidecar::Connector;
use support::recorder::Recorder;
use support::*;

const ACCEPTED: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// `#[tokio::test]` runs every task on this thread, so a thread-local subscriber sees them all.
#[tokio::test]
async fn request_and_leg_spans_are_exported_in_the_requests_trace() {
    let mut collector = Recorder::start(ACCEPTED).await;
    let (layer, exporter) = otlp::pipeline(
        &format!("http://{}", collector.addr),
        Duration::from_millis(50),
    )
    .unwrap();
    let _guard = tracing::subscriber::set_default(logging::subscriber(
        LogSettings {
            level: LogLevel::Verbosity(0),
            format: LogFormat::Text,
            time: LogTime::Rfc3339,
        },
        false,
        std::io::sink,
        Some(layer),
    ));
    tokio::spawn(exporter.run());

    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let (resp, _) = call(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(p.api_addr()),
            r#"{"prompt":"x","max_tokens":2}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let traceparent = record_header(&sim_requests(&d).await[0], "traceparent")
        .unwrap()
        .to_string();
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();

    // Collect exported spans until the request's three have arrived.
    let mut spans: Vec<Value> = Vec::new();
    while !["request", "prefill", "decode"].iter().all(|n| {
        spans
            .iter()
            .any(|s| s["name"] == *n && s["traceId"] == trace_id.as_str())
    }) {
        let post = collector.next().await;
        assert!(
            post.head.starts_with("POST /v1/traces HTTP/1.1"),
            "{}",
            post.head
        );
        let body = json(&post.body);
        for s in body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
        {
            spans.push(s.clone());
        }
    }
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name && s["traceId"] == trace_id.as_str())
            .unwrap()
    };
    let (request, prefill, decode) = (find("request"), find("prefill"), find("decode"));
    assert_eq!(request["kind"], 2, "SERVER");
    for leg in [prefill, decode] {
        assert_eq!(leg["kind"], 3, "CLIENT");
        assert_eq!(leg["parentSpanId"], request["spanId"]);
    }
    let route = request["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "route")
        .unwrap();
    assert_eq!(route["value"]["stringValue"], "pd");
}
