//! Optional span export over OTLP/HTTP (JSON encoding) with `-otlp-endpoint`.
//!
//! A `tracing` layer turns the request span and its per-leg child spans into OTLP spans, and a
//! background task posts them in batches to `<endpoint>/v1/traces`. The trace id is the one
//! both legs carry in `traceparent`, so the collector joins the sidecar's spans with vLLM's.
//! Export never blocks a request: when the queue is full, spans are dropped and counted in
//! the log.

use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Uri};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::body;
use crate::upstream::Leg;
use crate::upstream::Upstream;

/// Spans waiting for export at most; beyond it new spans are dropped.
const QUEUE: usize = 4096;
/// Spans per request to the collector at most.
const BATCH: usize = 512;

/// The layer that records spans for export.
pub struct OtlpLayer {
    tx: mpsc::Sender<Value>,
}

/// Posts recorded spans to the collector; run it on the runtime with [`Exporter::run`].
pub struct Exporter {
    rx: mpsc::Receiver<Value>,
    endpoint: Uri,
    interval: Duration,
}

/// A layer and its exporter for the collector at `endpoint` (e.g. `http://collector:4318`),
/// flushing at least every `interval`.
pub fn pipeline(endpoint: &str, interval: Duration) -> Result<(OtlpLayer, Exporter), String> {
    let endpoint = traces_uri(endpoint)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok((
        OtlpLayer { tx },
        Exporter {
            rx,
            endpoint,
            interval,
        },
    ))
}

/// The collector's traces URL for `-otlp-endpoint`.
pub fn traces_uri(endpoint: &str) -> Result<Uri, String> {
    let base = endpoint.trim_end_matches('/');
    let uri: Uri = format!("{base}/v1/traces")
        .parse()
        .map_err(|e| format!("-otlp-endpoint '{base}': {e}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(format!("-otlp-endpoint '{base}' must be an http(s):// URL"));
    }
    Ok(uri)
}

impl Exporter {
    /// Batches spans and posts them until every layer handle is gone.
    pub async fn run(mut self) {
        let client = Upstream::new(Duration::from_secs(5));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let deadline = tokio::time::sleep(self.interval);
            tokio::pin!(deadline);
            let closed = loop {
                tokio::select! {
                    span = self.rx.recv() => match span {
                        Some(span) => {
                            batch.push(span);
                            if batch.len() >= BATCH { break false; }
                        }
                        None => break true,
                    },
                    () = &mut deadline => break false,
                }
            };
            if !batch.is_empty() {
                self.post(&client, std::mem::take(&mut batch)).await;
            }
            if closed {
                return;
            }
        }
    }

    async fn post(&self, client: &Upstream, spans: Vec<Value>) {
        let count = spans.len();
        let payload = json!({"resourceSpans": [{
            "resource": {"attributes": [attr("service.name", "llm-d-routing-sidecar")]},
            "scopeSpans": [{"scope": {"name": "llm-d-routing-sidecar", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
        }]});
        let req = Request::post(self.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body::full(payload.to_string()));
        let Ok(req) = req else { return };
        // The collector is not on the request path: a failure costs these spans only.
        match tokio::time::timeout(Duration::from_secs(10), client.send(Leg::Decode, req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {}
            Ok(Ok(resp)) => eprintln!(
                "otlp: collector answered {} for {count} spans",
                resp.status()
            ),
            Ok(Err(e)) => eprintln!("otlp: export of {count} spans failed: {e}"),
            Err(_) => eprintln!("otlp: export of {count} spans timed out"),
        }
    }
}

/// What the layer keeps per span until it closes.
struct SpanData {
    start: SystemTime,
    span_id: String,
    trace_id: Option<String>,
    attributes: Vec<(String, String)>,
}

struct Fields<'a>(&'a mut SpanData);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "trace_id" {
            self.0.trace_id = Some(value);
            return;
        }
        self.0.attributes.retain(|(k, _)| k != field.name());
        self.0.attributes.push((field.name().to_string(), value));
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut data = SpanData {
            start: SystemTime::now(),
            span_id: crate::runtime::ids::next_hex::<8>(),
            trace_id: None,
            attributes: Vec::new(),
        };
        attrs.record(&mut Fields(&mut data));
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(data) = span.extensions_mut().get_mut::<SpanData>() {
                values.record(&mut Fields(data));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        // Children take the trace of the nearest ancestor that knows it (the request span).
        let mut trace_id = data.trace_id.clone();
        let mut parent_span_id = None;
        for (i, ancestor) in span.scope().skip(1).enumerate() {
            let ext = ancestor.extensions();
            if let Some(a) = ext.get::<SpanData>() {
                if i == 0 {
                    parent_span_id = Some(a.span_id.clone());
                }
                if trace_id.is_none() {
                    trace_id.clone_from(&a.trace_id);
                }
            }
        }
        let root = parent_span_id.is_none();
        let otlp = json!({
            "traceId": trace_id.unwrap_or_else(crate::runtime::ids::next_hex::<16>),
            "spanId": data.span_id,
            "parentSpanId": parent_span_id.unwrap_or_default(),
            "name": span.name(),
            // SERVER for the request the sidecar serves, CLIENT for its upstream legs.
            "kind": if root { 2 } else { 3 },
            "startTimeUnixNano": unix_nanos(data.start),
            "endTimeUnixNano": unix_nanos(SystemTime::now()),
            "attributes": data.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
        });
        if self.tx.try_send(otlp).is_err() {
            // Dropping beats blocking a request on a slow collector.
        }
    }
}

fn attr(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_urls() {
        assert!(pipeline("http://collector:4318", Duration::from_secs(1)).is_ok());
        assert!(pipeline("collector:4318", Duration::from_secs(1)).is_err());
        let (_, exporter) = pipeline("http://c:4318/", Duration::from_secs(1)).unwrap();
        assert_eq!(exporter.endpoint.to_string(), "http://c:4318/v1/traces");
    }
}
