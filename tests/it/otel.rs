//! OpenTelemetry tracing end to end: a sidecar exporting to a real OTLP receiver for each
//! protocol, the trace tree it exports (ids, parents, kinds, attributes), and the
//! `traceparent` each simulated vLLM received naming the exported leg span.

use sidecar::observe::metrics::Metrics;
use sidecar::observe::otel::settings::{self, Flags};
use sidecar::App;

use crate::support::otlp::{Exported, Receiver, Wire};
use crate::support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The cast of a traced test: an OTLP receiver for `wire`, a prefiller, a decoder and a
/// sidecar in front of it whose tracing settings are resolved from the environment a user
/// would set (the sampler named, or pd-sidecar's default when `None`), and its metrics.
struct Traced {
    receiver: Receiver,
    p: vllm_sim::SimServer,
    d: vllm_sim::SimServer,
    sidecar: Sidecar,
    metrics: Metrics,
}

impl Traced {
    async fn start(wire: Wire, sampler: Option<&str>) -> Traced {
        Traced::with_decoder(wire, sampler, |_| {}).await
    }

    async fn with_decoder(
        wire: Wire,
        sampler: Option<&str>,
        decoder: impl FnOnce(&mut vllm_sim::SimConfig),
    ) -> Traced {
        let receiver = Receiver::start(wire).await;
        let p = sim(|_| {}).await;
        let d = sim(decoder).await;
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", wire.protocol().to_string()),
            ("OTEL_SERVICE_NAME", "decode-sidecar".to_string()),
            // Export within milliseconds rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "10".to_string()),
        ];
        env.extend(sampler.map(|s| ("OTEL_TRACES_SAMPLER", s.to_string())));
        let resolved = settings::resolve(
            &move |name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()),
            Flags {
                tracing: true,
                otlp_endpoint: None,
            },
        );
        let mut config = config(d.api_addr());
        config.tracing = Some(resolved.settings.expect("tracing on"));
        let app = App::build(config).await.expect("the sidecar assembles");
        let metrics = app.metrics().clone();
        Traced {
            receiver,
            p,
            d,
            sidecar: Sidecar::serve(app).await,
            metrics,
        }
    }
}

/// Stops `sidecar` and waits for its end, which includes the flush of the last spans.
async fn stop(mut sidecar: Sidecar) {
    let task = sidecar.begin_shutdown();
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("stopped in time")
        .expect("join")
        .expect("served");
}

fn traced_post(
    prefiller: std::net::SocketAddr,
    flags: &str,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = post(
        "/v1/completions",
        Some(prefiller),
        r#"{"prompt":"a b c","max_tokens":2}"#,
    );
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-{flags}");
    req.headers_mut()
        .insert("traceparent", traceparent.parse().expect("header"));
    req.headers_mut()
        .insert("tracestate", "congo=t61rcWkgMzE".parse().expect("header"));
    req.headers_mut()
        .insert("user-agent", "tracing-test/1".parse().expect("header"));
    req
}

fn named<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {spans:#?}");
    found[0]
}

/// The one request `sim` received, and its `traceparent`.
async fn traceparent_at(sim: &vllm_sim::SimServer) -> String {
    let requests = sim_requests(sim).await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    record_header(&requests[0], "traceparent")
        .expect("a traceparent")
        .to_string()
}

/// A P/D request traced over `wire`: the server span under the client's, the prefill and
/// decode CLIENT spans under it, and each vLLM told its own leg's span.
async fn the_tree_over(wire: Wire) {
    let Traced {
        mut receiver,
        p,
        d,
        sidecar,
        metrics,
    } = Traced::start(wire, Some("parentbased_always_on")).await;
    // Not traced: the sidecar's own health answer.
    let (health, _) = call(sidecar.addr, get("/health")).await;
    assert_eq!(health.status(), 200);
    let (resp, _) = call(sidecar.addr, traced_post(p.api_addr(), "01")).await;
    assert_eq!(resp.status(), 200);

    let spans = receiver.until(|spans| spans.len() >= 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server = named(&spans, "POST /v1/completions");
    let prefill = named(&spans, "llm_d.pd_proxy.prefill");
    let decode = named(&spans, "llm_d.pd_proxy.decode");
    for span in [server, prefill, decode] {
        assert_eq!(span.trace_id, TRACE, "{span:#?}");
        assert_eq!(span.service, "decode-sidecar");
        assert_eq!(span.status, 0, "{span:#?}");
    }
    // SERVER under the client's span; both legs CLIENT spans under the server span.
    assert_eq!(
        (server.kind, server.parent_span_id.as_str()),
        (2, CLIENT_SPAN)
    );
    for leg in [prefill, decode] {
        assert_eq!(leg.kind, 3);
        assert_eq!(leg.parent_span_id, server.span_id);
        assert_eq!(leg.attr("http.request.method"), Some("POST"));
        assert_eq!(leg.attr("http.response.status_code"), Some("200"));
        assert_eq!(leg.attr("server.address"), Some("127.0.0.1"));
    }
    assert_eq!(
        prefill.attr("server.port"),
        Some(p.api_addr().port().to_string().as_str())
    );
    assert_eq!(
        decode.attr("url.full"),
        Some(format!("http://{}/v1/completions", d.api_addr()).as_str())
    );
    // Each vLLM got its own leg's span as the parent, with the client's sampling and state.
    for (sim, leg) in [(&p, prefill), (&d, decode)] {
        let requests = sim_requests(sim).await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(
            record_header(&requests[0], "traceparent"),
            Some(format!("00-{TRACE}-{}-01", leg.span_id).as_str())
        );
        assert_eq!(
            record_header(&requests[0], "tracestate"),
            Some("congo=t61rcWkgMzE")
        );
    }
    // The legs in order, inside the request's span.
    assert!(
        server.start <= prefill.start && prefill.end <= decode.start,
        "{spans:#?}"
    );
    assert!(decode.end <= server.end, "{spans:#?}");
    for (key, value) in [
        ("http.request.method", "POST".to_string()),
        ("http.route", "/v1/completions".to_string()),
        ("url.path", "/v1/completions".to_string()),
        ("url.scheme", "http".to_string()),
        ("http.response.status_code", "200".to_string()),
        ("user_agent.original", "tracing-test/1".to_string()),
        ("llm_d.pd_proxy.connector", "nixlv2".to_string()),
        ("llm_d.pd_proxy.disaggregation_used", "true".to_string()),
        ("llm_d.pd_proxy.prefill_target", p.api_addr().to_string()),
        ("llm_d.pd_proxy.prefill_candidates", "1".to_string()),
        ("llm_d.pd_proxy.decode.streaming", "false".to_string()),
        ("llm_d.openai.api", "chat_completions".to_string()),
    ] {
        assert_eq!(
            server.attr(key),
            Some(value.as_str()),
            "{key} in {server:#?}"
        );
    }
    for key in [
        "llm_d.pd_proxy.request_id",
        "llm_d.pd_proxy.prefill.duration_ms",
        "llm_d.pd_proxy.true_ttft_ms",
        "llm_d.pd_proxy.total_duration_ms",
        "client.address",
    ] {
        assert!(server.attr(key).is_some(), "{key} in {server:#?}");
    }
    if wire != Wire::Grpc {
        assert_eq!(receiver.paths.try_recv().as_deref(), Ok("/v1/traces"));
    }
    stop(sidecar).await;
    assert_eq!(
        metric(
            &metrics,
            "llm_d_sidecar_trace_spans_total{outcome=\"exported\"}"
        ),
        3
    );
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn grpc_receives_the_requests_tree() {
    the_tree_over(Wire::Grpc).await;
}

#[tokio::test]
async fn http_protobuf_receives_the_requests_tree() {
    the_tree_over(Wire::HttpProtobuf).await;
}

#[tokio::test]
async fn http_json_receives_the_requests_tree() {
    the_tree_over(Wire::HttpJson).await;
}

#[tokio::test]
async fn sampling_off_exports_nothing_and_vllm_is_told_not_to_sample() {
    let Traced {
        mut receiver,
        p,
        d,
        sidecar,
        metrics,
    } = Traced::start(Wire::Grpc, Some("always_off")).await;
    let (resp, _) = call(sidecar.addr, traced_post(p.api_addr(), "01")).await;
    assert_eq!(resp.status(), 200);
    // The legs still name spans of their own, unsampled, in the client's trace.
    let (prefill, decode) = (traceparent_at(&p).await, traceparent_at(&d).await);
    for tp in [&prefill, &decode] {
        let fields: Vec<&str> = tp.split('-').collect();
        assert_eq!((fields[1], fields[3]), (TRACE, "00"), "{tp}");
        assert_ne!(fields[2], CLIENT_SPAN, "{tp}");
    }
    assert_ne!(prefill, decode);
    // The stop flushes whatever was queued: nothing was.
    stop(sidecar).await;
    assert!(receiver.received().is_empty());
    for outcome in ["exported", "dropped", "failed"] {
        let series = format!("llm_d_sidecar_trace_spans_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&metrics, &series), 0, "{series}");
    }
}

#[tokio::test]
async fn the_default_sampler_follows_an_unsampled_client() {
    // No sampler named: pd-sidecar's parentbased_traceidratio; the client said "not sampled".
    let Traced {
        mut receiver,
        p,
        d,
        sidecar,
        metrics: _metrics,
    } = Traced::start(Wire::Grpc, None).await;
    let (resp, _) = call(sidecar.addr, traced_post(p.api_addr(), "00")).await;
    assert_eq!(resp.status(), 200);
    assert!(traceparent_at(&d).await.ends_with("-00"));
    stop(sidecar).await;
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn a_request_without_traceparent_is_a_root_and_pass_through_is_traced() {
    let Traced {
        mut receiver,
        d,
        sidecar,
        p: _p,
        metrics: _metrics,
    } = Traced::start(Wire::HttpProtobuf, Some("always_on")).await;
    let (resp, _) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 200);
    let spans = receiver.until(|spans| spans.len() >= 2).await;
    let server = named(&spans, "GET");
    let leg = named(&spans, "llm_d.pd_proxy.decode");
    assert_eq!((server.kind, server.parent_span_id.as_str()), (2, ""));
    assert_eq!(leg.parent_span_id, server.span_id);
    assert_eq!(leg.trace_id, server.trace_id);
    assert_eq!(
        server.attr("llm_d.pd_proxy.disaggregation_used"),
        Some("false")
    );
    assert_eq!(
        server.attr("llm_d.pd_proxy.reason"),
        Some("no_prefill_header")
    );
    assert_eq!(server.attr("http.route"), None);
    assert_eq!(
        traceparent_at(&d).await,
        format!("00-{}-{}-01", server.trace_id, leg.span_id)
    );
}

#[tokio::test]
async fn a_failed_prefill_marks_its_leg_and_the_request_as_errors() {
    let Traced {
        mut receiver,
        sidecar,
        p: _p,
        d: _d,
        metrics: _metrics,
    } = Traced::start(Wire::Grpc, Some("always_on")).await;
    let (resp, _) = call(sidecar.addr, traced_post(dead_addr().await, "01")).await;
    assert_eq!(resp.status(), 502);
    let spans = receiver.until(|spans| spans.len() >= 2).await;
    let server = named(&spans, "POST /v1/completions");
    let prefill = named(&spans, "llm_d.pd_proxy.prefill");
    assert_eq!(prefill.parent_span_id, server.span_id);
    assert_eq!(
        (prefill.status, prefill.attr("error.type")),
        (2, Some("unreachable"))
    );
    assert_eq!((server.status, server.attr("error.type")), (2, Some("502")));
    assert_eq!(server.attr("http.response.status_code"), Some("502"));
}

#[tokio::test]
async fn parent_based_samplers_follow_the_clients_flag() {
    for (sampler, flags, exported) in [
        ("parentbased_always_on", "00", false),
        ("parentbased_always_off", "01", true),
    ] {
        let Traced {
            mut receiver,
            p,
            d,
            sidecar,
            metrics: _metrics,
        } = Traced::start(Wire::Grpc, Some(sampler)).await;
        let (resp, _) = call(sidecar.addr, traced_post(p.api_addr(), flags)).await;
        assert_eq!(resp.status(), 200);
        let tp = traceparent_at(&d).await;
        assert!(
            tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with(flags),
            "{tp}"
        );
        stop(sidecar).await;
        let spans = receiver.received();
        assert_eq!(
            spans.len(),
            if exported { 3 } else { 0 },
            "{sampler}: {spans:#?}"
        );
        assert!(spans.iter().all(|s| s.trace_id == TRACE));
    }
}

#[tokio::test]
async fn a_decode_span_lasts_as_long_as_its_stream() {
    let Traced {
        mut receiver,
        p,
        sidecar,
        d: _d,
        metrics: _metrics,
    } = Traced::with_decoder(Wire::Grpc, Some("always_on"), |c| c.itl_ms = 20).await;
    let (resp, body) = call(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(p.api_addr()),
            r#"{"prompt":"a b c","max_tokens":5,"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    let spans = receiver.until(|spans| spans.len() >= 3).await;
    let decode = named(&spans, "llm_d.pd_proxy.decode");
    let server = named(&spans, "POST /v1/completions");
    // Five tokens 20 ms apart: the span ended with the stream, not with its head.
    assert!(decode.end - decode.start >= 4 * 20_000_000, "{decode:#?}");
    assert_eq!(server.attr("llm_d.pd_proxy.decode.streaming"), Some("true"));
}

#[tokio::test]
async fn two_traceparent_headers_are_no_parent() {
    let Traced {
        mut receiver,
        p,
        d,
        sidecar,
        metrics: _metrics,
    } = Traced::start(Wire::Grpc, Some("always_on")).await;
    let mut req = traced_post(p.api_addr(), "01");
    req.headers_mut().append(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .expect("header"),
    );
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    let spans = receiver.until(|spans| spans.len() >= 3).await;
    let server = named(&spans, "POST /v1/completions");
    assert_eq!(server.parent_span_id, "", "{server:#?}");
    assert_ne!(server.trace_id, TRACE);
    // Restarting the trace drops the client's tracestate (W3C Trace Context §3.3).
    let requests = sim_requests(&d).await;
    assert_eq!(record_header(&requests[0], "tracestate"), None);
    assert!(
        record_header(&requests[0], "traceparent").is_some_and(|tp| tp.contains(&server.trace_id))
    );
}
