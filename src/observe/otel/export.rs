//! Span export: `opentelemetry-otlp`'s exporter for the configured protocol, and the processor
//! that batches spans to it on our runtime.
//!
//! Not the SDK's `BatchSpanProcessor`: its worker is a plain thread calling `block_on`, where
//! our HTTP client (which spawns connection tasks on tokio) cannot run; it does not expose how
//! many spans it dropped; and it shuts down synchronously, where we flush within the drain.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::settings::{Batching, Protocol, Settings};
use crate::body;
use crate::upstream::{Leg, Upstream};

/// Counts spans by outcome: `exported`, `dropped` (queue full), `failed` (export failed).
pub type CountSpans = Arc<dyn Fn(&'static str, u64) + Send + Sync>;

/// The OTLP exporter `settings` name. HTTP goes through `client` (our pooled client, with its
/// TLS roots), so no HTTP client crate is built for it.
pub fn exporter(
    settings: &Settings,
    client: Upstream,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    // Already percent-decoded: the crate's `with_headers` would decode them a second time.
    let mut headers = http::HeaderMap::new();
    for (k, v) in &settings.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    let built = match settings.protocol {
        Protocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers),
                );
            if settings.endpoint.starts_with("https://") {
                // tonic's default TLS settings trust no root.
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_webpki_roots(),
                );
            }
            builder.build()
        }
        Protocol::HttpProtobuf | Protocol::HttpJson => {
            let protocol = if settings.protocol == Protocol::HttpJson {
                opentelemetry_otlp::Protocol::HttpJson
            } else {
                opentelemetry_otlp::Protocol::HttpBinary
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_http_client(Client {
                    upstream: client,
                    timeout: settings.timeout,
                    headers,
                })
                .build()
        }
    };
    built.map_err(|e| format!("tracing: {e}"))
}

/// The collector's replies are small; a larger one is not a collector's.
const REPLY_LIMIT: usize = 1 << 20;

/// `opentelemetry-http`'s client trait on our pooled client.
struct Client {
    upstream: Upstream,
    timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, sent with every export.
    headers: http::HeaderMap,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        mut request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        for (k, v) in &self.headers {
            request.headers_mut().insert(k, v.clone());
        }
        let sending = async {
            let resp = self
                .upstream
                .send(Leg::Decode, request.map(body::full))
                .await?;
            let (parts, reply) = resp.into_parts();
            let reply = body::collect_limited(reply, REPLY_LIMIT)
                .await
                .map_err(|e| format!("collector reply: {e:?}"))?;
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, reply))
        };
        // The trait leaves the timeout to the client.
        tokio::time::timeout(self.timeout, sending)
            .await
            .map_err(|_| format!("no reply within {:?}", self.timeout))?
    }
}

enum Control {
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Queues ended, sampled spans for the export task; never blocks the request that ended them.
pub struct Batcher {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    count: CountSpans,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

/// Asks the export task to flush or stop; kept by the app for its shutdown.
#[derive(Clone)]
pub struct Handle {
    control: mpsc::UnboundedSender<Control>,
}

impl Handle {
    /// Exports what is queued and stops the exporter, within `within`. False if it took longer.
    pub async fn shutdown(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Shutdown(tx)).is_err() {
            return true;
        }
        tokio::time::timeout(within, rx).await.is_ok()
    }
}

impl Batcher {
    /// The processor, its handle, and the export task (to spawn on the runtime).
    pub fn new<E>(
        exporter: E,
        batching: Batching,
        count: CountSpans,
    ) -> (Batcher, Handle, impl std::future::Future<Output = ()>)
    where
        E: opentelemetry_sdk::trace::SpanExporter + 'static,
    {
        let (spans, spans_rx) = mpsc::channel(batching.max_queue);
        let (control, control_rx) = mpsc::unbounded_channel();
        let task = run(exporter, spans_rx, control_rx, batching, Arc::clone(&count));
        (
            Batcher {
                spans,
                control: control.clone(),
                count,
            },
            Handle { control },
            task,
        )
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            // A full queue: dropping the span beats blocking the request.
            (self.count)("dropped", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (tx, _done) = oneshot::channel();
        let _ = self.control.send(Control::Flush(tx));
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // The app awaits the real shutdown through its Handle; this only asks for one.
        let (tx, _done) = oneshot::channel();
        let _ = self.control.send(Control::Shutdown(tx));
        Ok(())
    }
}

async fn run<E: opentelemetry_sdk::trace::SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut control: mpsc::UnboundedReceiver<Control>,
    batching: Batching,
    count: CountSpans,
) {
    let mut out = Outgoing {
        exporter,
        batch: Vec::new(),
        batching,
        count,
    };
    // A zero delay would make the timer always ready: the loop would spin.
    let delay = batching.schedule_delay.max(Duration::from_millis(1));
    let mut deadline = Instant::now() + delay;
    loop {
        tokio::select! {
            biased;
            ctl = control.recv() => {
                if let Some(Control::Flush(_)) = ctl {
                    while let Ok(span) = spans.try_recv() {
                        out.add(span).await;
                    }
                } else {
                    // Spans ended from now on are counted as dropped; the queue is drained whole.
                    spans.close();
                    while let Some(span) = spans.recv().await {
                        out.add(span).await;
                    }
                }
                out.flush().await;
                match ctl {
                    Some(Control::Flush(done)) => {
                        let _ = done.send(());
                    }
                    Some(Control::Shutdown(done)) => {
                        let _ = out.exporter.shutdown();
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                }
            }
            span = spans.recv() => match span {
                Some(span) => out.add(span).await,
                None => {
                    out.flush().await;
                    return;
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                out.flush().await;
                deadline = Instant::now() + delay;
            }
        }
    }
}

/// The batch being filled, and where it goes.
struct Outgoing<E> {
    exporter: E,
    batch: Vec<SpanData>,
    batching: Batching,
    count: CountSpans,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> Outgoing<E> {
    /// Adds `span`, exporting the batch once it is full.
    async fn add(&mut self, span: SpanData) {
        self.batch.push(span);
        if self.batch.len() >= self.batching.max_batch {
            self.flush().await;
        }
    }

    /// Exports what the batch holds, within the export timeout, and counts how it went.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let spans = std::mem::take(&mut self.batch);
        let n = spans.len() as u64;
        let exported =
            tokio::time::timeout(self.batching.export_timeout, self.exporter.export(spans)).await;
        match exported {
            Ok(Ok(())) => (self.count)("exported", n),
            Ok(Err(e)) => {
                (self.count)("failed", n);
                tracing::warn!(spans = n, error = %e, "span export failed");
            }
            Err(_) => {
                (self.count)("failed", n);
                tracing::warn!(spans = n, "span export timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Debug, Clone, Default)]
    struct Recording(Arc<Mutex<Vec<usize>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    fn span(sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(2),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "s".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_shutdown_exports_the_rest() {
        let counted = Arc::new(Mutex::new(HashMap::<&'static str, u64>::new()));
        let c = Arc::clone(&counted);
        let count: CountSpans = Arc::new(move |outcome, n| {
            *c.lock().unwrap().entry(outcome).or_default() += n;
        });
        let exporter = Recording::default();
        let batching = Batching {
            max_queue: 2,
            max_batch: 2,
            schedule_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(5),
        };
        let (batcher, handle, task) = Batcher::new(exporter.clone(), batching, count);
        // The task is not running yet: the queue holds two, the third is dropped.
        for _ in 0..3 {
            batcher.on_end(span(true));
        }
        batcher.on_end(span(false));
        // Bounded by the shutdown below.
        #[allow(clippy::disallowed_methods)]
        let task = tokio::spawn(task);
        assert!(handle.shutdown(Duration::from_secs(5)).await);
        task.await.unwrap();
        assert_eq!(*exporter.0.lock().unwrap(), vec![2]);
        let counted = counted.lock().unwrap();
        assert_eq!(counted.get("exported"), Some(&2));
        assert_eq!(counted.get("dropped"), Some(&1));
    }
}
