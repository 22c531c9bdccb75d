//! Every log line of a request carries its request id and trace id.
//!
//! Alone in its test binary: tracing caches per-callsite interest process-wide, so tests on
//! other threads logging without a subscriber could race this test's thread-local one.

// Test code: a failed expectation is the test failing, and its servers are bounded by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

// The shared support module; this binary uses only part of it.
#[allow(dead_code)]
#[path = "it/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sidecar::observe::logging::{self, LogFormat, LogLevel, LogSettings, LogTime};
use sidecar::Connector;
use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A log sink the test can read back.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("UTF-8")
    }
}

/// This thread's subscriber at `level` in `format`, writing to a sink the test reads back.
/// `#[tokio::test]` runs every task on this thread, so it sees the sidecar's and the
/// simulators' logs.
fn capture(level: LogLevel, format: LogFormat) -> (Capture, tracing::subscriber::DefaultGuard) {
    let sink = Capture::default();
    let writer = sink.clone();
    let settings = LogSettings {
        level,
        format,
        time: LogTime::Epoch,
    };
    let guard = tracing::subscriber::set_default(logging::subscriber(settings, false, move || {
        writer.clone()
    }));
    (sink, guard)
}

/// One P/D completion carrying the client's `x-request-id` (req-42) and [`TRACEPARENT`];
/// returns the prefiller's address.
async fn pd_call_with_ids() -> std::net::SocketAddr {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let mut req = post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"p"}"#);
    req.headers_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    req.headers_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    p.api_addr()
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn json_logs_carry_the_request_and_trace_ids_on_every_request_line() {
    let (sink, _guard) = capture(LogLevel::Verbosity(4), LogFormat::Json);
    pd_call_with_ids().await;
    let text = sink.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_request: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "request"))
        })
        .collect();
    assert!(in_request.len() >= 2, "{text}");
    for line in &in_request {
        let request = line["spans"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "request"))
            .expect("request span");
        assert_eq!(request["request_id"], "req-42", "{line}");
        assert_eq!(
            request["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{line}"
        );
        assert_eq!(request["route"], "pd");
    }
    // Leg logs are inside their leg's span, under the request span.
    let leg = |name: &str| {
        in_request.iter().any(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == name))
        })
    };
    assert!(leg("prefill"), "{text}");
    assert!(
        in_request.iter().any(|l| l["message"] == "decode started"),
        "{text}"
    );
}

/// The text format (the default): each request line starts with the request span's fields,
/// then the message, then the event's fields; a leg's lines name the leg's span too.
#[tokio::test]
async fn text_logs_carry_the_request_span_fields_then_the_message() {
    let (sink, _guard) = capture(LogLevel::Verbosity(4), LogFormat::Text);
    let p = pd_call_with_ids().await;
    let text = sink.text();
    let span = format!(
        "request{{route=pd method=POST path=/v1/completions prefiller={} \
         request_id=\"req-42\" trace_id=4bf92f3577b34da6a3ce929d0e0e4736}}",
        p
    );
    let line = text
        .lines()
        .find(|l| l.contains("decode started"))
        .unwrap_or_else(|| panic!("no decode line: {text}"));
    let (_, after) = line
        .split_once(&span)
        .unwrap_or_else(|| panic!("{span} not in {line}"));
    assert!(after.starts_with(": decode started prefill_ms="), "{line}");
    assert!(line.contains(" status=200"), "{line}");
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("{span}:prefill: "))),
        "{text}"
    );
}

/// At the default level the legs open no span of their own, yet a leg's lines still name the
/// request: the leg runs in the request's task, inside its span.
#[tokio::test]
async fn a_legs_info_lines_carry_the_request_span_at_the_default_level() {
    let (sink, _guard) = capture(LogLevel::Verbosity(0), LogFormat::Text);
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_503"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, _metrics) = sidecar_configured(d.api_addr(), fast_retries(1)).await;
    let (resp, _) = call_naming(
        sidecar.addr,
        &format!("{},{}", p1.api_addr(), p2.api_addr()),
    )
    .await;
    assert_eq!(resp.status(), 200);

    let text = sink.text();
    let line = text
        .lines()
        .find(|l| l.contains("prefill failed before pinning KV blocks"))
        .unwrap_or_else(|| panic!("no retry line: {text}"));
    assert!(
        line.contains(&format!(
            "request{{route=pd method=POST path=/v1/completions prefiller={} request_id=",
            p1.api_addr()
        )),
        "{line}"
    );
    assert!(!line.contains(":prefill:"), "{line}");
}
