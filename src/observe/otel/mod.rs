//! Tracing on the OpenTelemetry crates: settings from the standard `OTEL_*` environment and the
//! flags ([`settings`]), the exporter and our batching processor ([`export`]), and the spans
//! of a request ([`spans`]). Design and costs: docs/decisions/0002-tracing-on-opentelemetry.md.

pub mod export;
pub mod settings;
pub mod spans;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::observe::metrics::Metrics;
use crate::upstream::Upstream;
use export::{Batcher, Handle};
use settings::{SamplerSetting, Settings};

/// The running tracer: what the proxy opens spans with, and the exporter's handle for the
/// flush at shutdown.
#[derive(Clone)]
pub struct Tracing {
    tracer: SdkTracer,
    handle: Handle,
    /// `url.scheme` of the requests this sidecar serves.
    scheme: &'static str,
    // Kept so the processor lives as long as the proxy.
    _provider: SdkTracerProvider,
}

impl Tracing {
    /// Builds the exporter and tracer from `settings` and spawns the export task (so it must
    /// run on the runtime). Spans are counted in `metrics`.
    pub fn start(
        settings: &Settings,
        client: Upstream,
        metrics: Metrics,
        tls: bool,
    ) -> Result<Tracing, String> {
        // The version first, so `OTEL_RESOURCE_ATTRIBUTES` can say otherwise.
        let resource = Resource::builder_empty()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_service_name(settings.service_name.clone())
            .with_attributes(
                settings
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let mut exporter = export::exporter(settings, client)?;
        // The SDK hands the resource to its own processors; ours gives it to the exporter.
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let count: export::CountSpans = Arc::new(move |outcome, n| metrics.trace_spans(outcome, n));
        let (batcher, handle, task) = Batcher::new(exporter, settings.batching, count);
        // Process-long: it ends at the shutdown the app asks for after its drain.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(task);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batcher)
            .with_sampler(sampler(settings.sampler))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("llm-d-routing-sidecar")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Tracing {
            tracer,
            handle,
            scheme: if tls { "https" } else { "http" },
            _provider: provider,
        })
    }

    pub fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// Exports the spans still queued, within `within`. False if that took longer.
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.handle.shutdown(within).await
    }
}

fn sampler(setting: SamplerSetting) -> Sampler {
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    match setting {
        SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
        SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
        SamplerSetting::Ratio(r) => Sampler::TraceIdRatioBased(r),
        SamplerSetting::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
        SamplerSetting::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
        SamplerSetting::ParentBasedRatio(r) => parent_based(Sampler::TraceIdRatioBased(r)),
    }
}
