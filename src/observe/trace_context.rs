//! Per-request tracing: the request span every log line of a request is written in, and W3C
//! Trace Context (`traceparent`) so both P/D legs belong to one trace.
//!
//! With tracing off, the sidecar forwards the client's `traceparent` unchanged, keeping the
//! client's span the parent of vLLM's; when the client sent none, it starts a trace so the
//! prefill and decode legs share one trace id. With tracing on, `otel::spans` has already
//! pointed the request's `traceparent` at the sidecar's own span, and each leg at its own.

use http::header::{HeaderMap, HeaderValue};
use tracing::field::Empty;
use tracing::Span;

use crate::headers::{REQUEST_ID, TRACEPARENT, TRACESTATE};
use crate::routing::Route;

/// The span of one request. `request_id` and `trace_id` are filled in once known: for P/D by
/// [`record_ids`], for pass-through from the client's headers here.
pub fn request_span(
    route: Route,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
    prefiller: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        "request",
        route = %route.as_str(),
        method = %method,
        path = %path,
        prefiller = prefiller.map(tracing::field::display),
        request_id = Empty,
        trace_id = Empty,
    );
    if route == Route::PassThrough {
        // Pass-through adds no headers of its own, so the ids are the client's, if any.
        if let Some(id) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
            span.record("request_id", id);
        }
        if let Some(trace_id) = headers.get(TRACEPARENT).and_then(trace_id) {
            span.record("trace_id", tracing::field::display(trace_id));
        }
    }
    span
}

/// Records the ids both P/D legs carry on the request's span (passed in, not taken from
/// `Span::current()`, so it does not matter which span the caller runs in).
pub fn record_ids(span: &Span, request_id: &HeaderValue, trace_id: &str) {
    match request_id.to_str() {
        Ok(id) => span.record("request_id", id),
        Err(_) => span.record(
            "request_id",
            String::from_utf8_lossy(request_id.as_bytes()).as_ref(),
        ),
    };
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Makes sure `headers` carry a valid `traceparent` and returns its trace id.
///
/// A valid one is kept unchanged, with its `tracestate`. A missing or malformed one is replaced
/// by a new trace (random 16-byte trace id, 8-byte span id, sampled); a malformed one's
/// `tracestate` is dropped, as W3C Trace Context §3.3 says to when restarting a trace.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> String {
    let mut values = headers.get_all(TRACEPARENT).iter();
    // Two traceparent headers are invalid (§3.2): which would be the parent?
    if let (Some(value), None) = (values.next(), values.next()) {
        if let Some(id) = trace_id(value) {
            return id.to_string();
        }
    }
    let trace = crate::runtime::ids::next_hex::<16>();
    let parent = crate::runtime::ids::next_hex::<8>();
    let mut value = String::with_capacity(55);
    for part in ["00-", &trace, "-", &parent, "-01"] {
        value.push_str(part);
    }
    // Lowercase hex and dashes are always a valid header value; taken without a copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(TRACEPARENT, v);
    }
    headers.remove(TRACESTATE);
    trace
}

/// The trace id of a valid `traceparent` (`version-traceid-parentid-flags`, §3.2).
pub fn trace_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let mut fields = text.split('-');
    let version = fields.next()?;
    let trace = fields.next()?;
    let parent = fields.next()?;
    let flags = fields.next()?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = lower_hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || fields.next().is_none())
        && lower_hex(trace, 32)
        && !all_zero(trace)
        && lower_hex(parent, 16)
        && !all_zero(parent)
        && lower_hex(flags, 2);
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_and_its_tracestate_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        assert_eq!(
            ensure_traceparent(&mut h),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(h[TRACEPARENT], VALID);
        assert_eq!(h[TRACESTATE], "vendor=x");
    }

    #[test]
    fn a_missing_or_bad_traceparent_starts_a_trace() {
        for bad in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("garbage"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(v) = bad {
                h.insert(TRACEPARENT, HeaderValue::from_static(v));
                h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
            }
            let trace = ensure_traceparent(&mut h);
            let value = h[TRACEPARENT].to_str().unwrap().to_string();
            assert_eq!(trace_id(&h[TRACEPARENT]), Some(trace.as_str()), "{value}");
            assert!(
                value.starts_with("00-") && value.ends_with("-01"),
                "{value}"
            );
            assert_eq!(value.len(), 55);
            assert!(h.get(TRACESTATE).is_none());
        }
    }

    #[test]
    fn later_versions_may_carry_more_fields() {
        let v = HeaderValue::from_static(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
        );
        assert!(trace_id(&v).is_some());
    }
}
