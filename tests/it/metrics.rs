//! The admin listener's `/metrics` after real traffic: P/D, pass-through, failing prefills and
//! clients that leave in each phase. Scrapes are taken after a synchronising event (the full
//! response, or `/sim/wait`), never after a sleep.

use crate::support::observed::Observed;
use crate::support::*;
use sidecar::Connector;
use std::net::SocketAddr;
use vllm_sim::SimServer;

/// The value of one series (`name{labels}`), if exposed.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.parse().ok()
    })
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

async fn pd_pair() -> (SimServer, SimServer) {
    (sim(|_| {}).await, sim(|_| {}).await)
}

#[tokio::test]
async fn pd_and_pass_through_requests_are_counted_with_latencies() {
    let (p, d) = pd_pair().await;
    let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
    let before = s.scrape().await;
    assert_eq!(
        value(&before, "llm_d_sidecar_in_flight_requests{route=\"pd\"}"),
        Some(0.0)
    );

    let (resp, _) = call_pd(s.addr(), &p, r#"{"prompt":"p","max_tokens":3}"#).await;
    assert_eq!(resp.status(), 200);
    let (resp, body) = call(
        s.addr(),
        post(
            "/v1/chat/completions",
            Some(p.api_addr()),
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // vLLM's own /metrics stays on the main port, passed through.
    let (resp, vllm_metrics) = call(s.addr(), get("/metrics")).await;
    assert_eq!(resp.status(), 200);
    let vllm_metrics = String::from_utf8_lossy(&vllm_metrics);
    assert!(vllm_metrics.contains("vllm:"), "{vllm_metrics}");
    assert!(!vllm_metrics.contains("llm_d_sidecar"));
    // Probes are not requests.
    let (resp, _) = call(s.addr(), get("/health")).await;
    assert_eq!(resp.status(), 200);

    let m = s.scrape().await;
    let pd_ok = "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pd\",outcome=\"2xx\"}";
    assert_eq!(must(&m, pd_ok), 2.0);
    let pt_ok =
        "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pass_through\",outcome=\"2xx\"}";
    assert_eq!(must(&m, pt_ok), 1.0);
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_prefill_duration_seconds_count{connector=\"nixlv2\"}"
        ),
        2.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_decode_first_byte_seconds_count{connector=\"nixlv2\"}"
        ),
        2.0
    );
    assert!(
        must(
            &m,
            "llm_d_sidecar_prefill_duration_seconds_sum{connector=\"nixlv2\"}"
        ) > 0.0
    );
    for route in ["pd", "pass_through"] {
        let series = format!("llm_d_sidecar_in_flight_requests{{route=\"{route}\"}}");
        assert_eq!(must(&m, &series), 0.0);
        let series = format!(
            "llm_d_sidecar_relayed_bytes_total{{route=\"{route}\",direction=\"response\"}}"
        );
        assert!(must(&m, &series) > 0.0);
    }
    assert!(
        must(
            &m,
            "llm_d_sidecar_relayed_bytes_total{route=\"pd\",direction=\"request\"}"
        ) > 0.0
    );
    assert_eq!(
        nonzero(&m, "llm_d_sidecar_upstream_errors_total"),
        Vec::<&str>::new()
    );
    assert_eq!(
        nonzero(&m, "llm_d_sidecar_cancellations_total"),
        Vec::<&str>::new()
    );
    // pd-sidecar's names count the same requests: two P/D POSTs, timed to their end.
    let pd = |series: &str| must(&m, &format!("llm_d_disagg_sidecar_{series}"));
    assert_eq!(
        pd("requests_total{api_type=\"chat_completions\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(pd("disagg_requests_total{disagg_type=\"p/d\"}"), 2.0, "{m}");
    assert_eq!(pd("prefill_duration_seconds_count"), 2.0, "{m}");
    assert_eq!(pd("decode_duration_seconds_count"), 2.0, "{m}");
    assert_eq!(
        nonzero(&m, "llm_d_disagg_sidecar_request_errors_total"),
        Vec::<&str>::new()
    );
}

/// The series starting with `prefix` whose value is not 0.
fn nonzero<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) != Some(0.0))
        .collect()
}

/// A fresh process exports every family, ours and pd-sidecar's, with every series whose label
/// values are known at 0.
#[tokio::test]
async fn a_fresh_process_exports_every_family_at_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-d-routing-sidecar"))
        .args(["-port=0", "-bind-address=127.0.0.1", "-connector=sglang"])
        .arg(format!("-metrics-port={port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the sidecar");
    let event = readiness(&mut child).await;
    assert_eq!(event["metrics_port"], port, "{event}");
    let (resp, body) = call(SocketAddr::from(([127, 0, 0, 1], port)), get("/metrics")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(resp.status(), 200);
    let m = String::from_utf8(body.to_vec()).expect("UTF-8");
    for name in sidecar::observe::metrics::NAMES {
        assert!(
            m.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} missing:\n{m}"
        );
    }
    for series in [
        "llm_d_sidecar_requests_total{connector=\"sglang\",route=\"pd\",outcome=\"2xx\"}",
        "llm_d_sidecar_requests_total{connector=\"sglang\",route=\"pass_through\",outcome=\"cancelled\"}",
        "llm_d_sidecar_prefill_duration_seconds_count{connector=\"sglang\"}",
        "llm_d_sidecar_decode_first_byte_seconds_count{connector=\"sglang\"}",
        "llm_d_sidecar_upstream_errors_total{leg=\"prefill\",kind=\"timeout\"}",
        "llm_d_sidecar_upstream_errors_total{leg=\"decode\",kind=\"stream_broken\"}",
        "llm_d_sidecar_cancellations_total{route=\"pd\",phase=\"handoff\"}",
        "llm_d_sidecar_cancellations_total{route=\"pass_through\",phase=\"streaming\"}",
        "llm_d_sidecar_relayed_bytes_total{route=\"pd\",direction=\"response\"}",
        "llm_d_sidecar_prefill_retries_total{reason=\"http_503\"}",
        "llm_d_sidecar_connections_refused_total{reason=\"over_limit\"}",
        "llm_d_sidecar_rejected_requests_total{reason=\"max_in_flight\"}",
        "llm_d_sidecar_in_flight_requests{route=\"pd\"}",
        "llm_d_disagg_sidecar_requests_total{api_type=\"chat_completions\"}",
        "llm_d_disagg_sidecar_requests_total{api_type=\"responses\"}",
        "llm_d_disagg_sidecar_requests_total{api_type=\"generate\"}",
        "llm_d_disagg_sidecar_disagg_requests_total{disagg_type=\"p/d\"}",
        "llm_d_disagg_sidecar_disagg_requests_total{disagg_type=\"e/p/d\"}",
        "llm_d_disagg_sidecar_disagg_requests_total{disagg_type=\"e/d\"}",
        "llm_d_disagg_sidecar_encode_duration_seconds_count",
        "llm_d_disagg_sidecar_prefill_duration_seconds_count",
        "llm_d_disagg_sidecar_decode_duration_seconds_count",
        "llm_d_disagg_sidecar_request_errors_total{stage=\"encode\"}",
        "llm_d_disagg_sidecar_request_errors_total{stage=\"prefill\"}",
        "llm_d_disagg_sidecar_request_errors_total{stage=\"decode\"}",
    ] {
        assert_eq!(value(&m, series), Some(0.0), "{series} in:\n{m}");
    }
    // pd-sidecar's buckets.
    assert!(
        m.contains("llm_d_disagg_sidecar_prefill_duration_seconds_bucket{le=\"300\"} 0"),
        "{m}"
    );
    assert_eq!(nonzero(&m, "llm_d_"), Vec::<&str>::new());
}

#[tokio::test]
async fn failing_prefills_are_upstream_errors_by_kind() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
    let dead = dead_addr().await;
    let (resp, _) = call(
        s.addr(),
        post("/v1/completions", Some(dead), r#"{"prompt":"p"}"#),
    )
    .await;
    assert_eq!(resp.status(), 502);
    let mut req = post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"p"}"#);
    req.headers_mut()
        .insert("x-sim-fault", "prefill_http_500".parse().unwrap());
    let (resp, _) = call(s.addr(), req).await;
    assert_eq!(resp.status(), 502);
    // A bad header is the client's fault, not an upstream's.
    let mut req = post("/v1/completions", None, r#"{"prompt":"p"}"#);
    req.headers_mut()
        .insert("x-prefiller-host-port", "h:notaport".parse().unwrap());
    let (resp, _) = call(s.addr(), req).await;
    assert_eq!(resp.status(), 400);

    let m = s.scrape().await;
    let errors = |kind: &str| {
        value(
            &m,
            &format!("llm_d_sidecar_upstream_errors_total{{leg=\"prefill\",kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(errors("unreachable"), Some(1.0), "{m}");
    assert_eq!(errors("http_5xx"), Some(1.0), "{m}");
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pd\",outcome=\"5xx\"}"
        ),
        2.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pd\",outcome=\"4xx\"}"
        ),
        1.0
    );
    // Failed prefills are not in our latency histogram, and no decode was sent.
    let zero = |series: &str| assert_eq!(value(&m, series), Some(0.0), "{series}: {m}");
    zero("llm_d_sidecar_prefill_duration_seconds_count{connector=\"nixlv2\"}");
    zero("llm_d_sidecar_decode_first_byte_seconds_count{connector=\"nixlv2\"}");
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
    // pd-sidecar's names: both failures are prefill stage errors, timed; the refused header
    // is a request on the route but no disaggregation.
    let pd = |series: &str| must(&m, &format!("llm_d_disagg_sidecar_{series}"));
    assert_eq!(pd("request_errors_total{stage=\"prefill\"}"), 2.0, "{m}");
    assert_eq!(pd("request_errors_total{stage=\"decode\"}"), 0.0, "{m}");
    assert_eq!(pd("prefill_duration_seconds_count"), 2.0, "{m}");
    assert_eq!(pd("decode_duration_seconds_count"), 0.0, "{m}");
    assert_eq!(
        pd("requests_total{api_type=\"chat_completions\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(pd("disagg_requests_total{disagg_type=\"p/d\"}"), 2.0, "{m}");
}

#[tokio::test]
async fn an_unreachable_decoder_is_a_decode_upstream_error() {
    let dead = dead_addr().await;
    let s = Observed::start(dead, Connector::NixlV2).await;
    let (resp, _) = call(s.addr(), get("/v1/models")).await;
    assert_eq!(resp.status(), 502);
    let m = s.scrape().await;
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_upstream_errors_total{leg=\"decode\",kind=\"unreachable\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_a_streaming_cancellation() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
    let mut client = send_pd(
        s.addr(),
        &p,
        r#"{"prompt":"p","max_tokens":5,"stream":true}"#,
    )
    .await;
    assert_eq!(client.head().await.status(), 200);
    client.next_data().await.expect("a first token");
    let m = s.scrape().await;
    assert_eq!(
        must(&m, "llm_d_sidecar_in_flight_requests{route=\"pd\"}"),
        1.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_decode_first_byte_seconds_count{connector=\"nixlv2\"}"
        ),
        1.0
    );

    drop(client);
    // The decoder goes idle once the sidecar dropped the response body, which is what counts.
    assert!(sim_wait(&d, "idle", LIMIT).await);
    let m = s.scrape().await;
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_cancellations_total{route=\"pd\",phase=\"streaming\"}"
        ),
        1.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pd\",outcome=\"cancelled\"}"
        ),
        1.0
    );
    assert_eq!(
        must(&m, "llm_d_sidecar_in_flight_requests{route=\"pd\"}"),
        0.0
    );
}

#[tokio::test]
async fn a_client_leaving_during_prefill_or_handoff_is_counted_in_that_phase() {
    // During the prefill (a slow prefiller); after it, before the decoder answered (a slow
    // decoder: a non-streaming decode answers last).
    for (slow_prefill, phase) in [(true, "prefill"), (false, "handoff")] {
        let slow = |c: &mut vllm_sim::SimConfig| c.ttft_ms = 60_000;
        let p = sim(|c| {
            if slow_prefill {
                slow(c)
            }
        })
        .await;
        let d = sim(|c| {
            if !slow_prefill {
                slow(c)
            }
        })
        .await;
        let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
        let client = send_pd(s.addr(), &p, r#"{"prompt":"p"}"#).await;
        let busy = if slow_prefill { &p } else { &d };
        assert!(sim_wait(busy, "busy", LIMIT).await);
        leave_and_wait_idle(client, busy).await;
        let m = s.scrape().await;
        let series = format!("llm_d_sidecar_cancellations_total{{route=\"pd\",phase=\"{phase}\"}}");
        assert_eq!(must(&m, &series), 1.0, "{m}");
        assert_eq!(
            must(&m, "llm_d_sidecar_in_flight_requests{route=\"pd\"}"),
            0.0
        );
    }
}

#[tokio::test]
async fn a_pass_through_client_that_leaves_is_a_decode_cancellation() {
    let d = sim(|c| c.ttft_ms = 60_000).await;
    let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
    let client = send(
        s.addr(),
        post("/v1/completions", None, r#"{"prompt":"p","max_tokens":2}"#),
    )
    .await;
    assert!(sim_wait(&d, "busy", LIMIT).await);
    leave_and_wait_idle(client, &d).await;
    let m = s.scrape().await;
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_cancellations_total{route=\"pass_through\",phase=\"decode\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_admin_listener_serves_health_and_nothing_else() {
    let d = sim(|_| {}).await;
    let s = Observed::start(d.api_addr(), Connector::SharedStorage).await;
    let (resp, _) = call(s.admin, get("/health")).await;
    assert_eq!(resp.status(), 200);
    let (resp, _) = call(s.admin, get("/v1/models")).await;
    assert_eq!(resp.status(), 404);
    let (resp, _) = call(s.admin, post("/metrics", None, "{}")).await;
    assert_eq!(resp.status(), 405);
    let m = s.scrape().await;
    // Families without samples are not exposed; gauges start at 0 so they always are.
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_in_flight_requests{route=\"pass_through\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn a_decoder_stream_that_breaks_is_a_stream_error() {
    let (p, d) = pd_pair().await;
    let s = Observed::start(d.api_addr(), Connector::NixlV2).await;
    // Only the decoder breaks: the prefill leg carries the client's headers too.
    sim_config(&d, r#"{"faults":["drop_after_tokens:2"]}"#).await;
    let req = post(
        "/v1/completions",
        Some(p.api_addr()),
        r#"{"prompt":"p","max_tokens":8,"stream":true}"#,
    );
    let mut client = send(s.addr(), req).await;
    assert_eq!(client.head().await.status(), 200);
    // Read until the sidecar ends the response (it cannot finish a chunked body it lost).
    let body = client.head().await.body_mut();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(LIMIT, http_body_util::BodyExt::frame(body))
        .await
        .map(|f| f.map(|r| r.map(|_| ())))
    {}
    let m = s.scrape().await;
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_upstream_errors_total{leg=\"decode\",kind=\"stream_broken\"}"
        ),
        1.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pd\",outcome=\"stream_error\"}"
        ),
        1.0
    );
}

/// A request refused by `-max-in-flight` is counted like any other answer (a 5xx outcome),
/// and the one holding the slot stays in flight.
#[tokio::test]
async fn a_request_refused_for_max_in_flight_is_counted() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let mut config = config(d.api_addr());
    config.max_in_flight = 1;
    let s = Observed::with(config).await;
    let stream = r#"{"prompt":"x","max_tokens":3,"stream":true}"#;
    let mut first = send_pd(s.addr(), &p, stream).await;
    first
        .next_data()
        .await
        .expect("the first stream holds the one slot");
    let (resp, _) = call(s.addr(), get("/v1/models")).await;
    assert_eq!(resp.status(), 503);
    let m = s.scrape().await;
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_requests_total{connector=\"nixlv2\",route=\"pass_through\",outcome=\"5xx\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        must(&m, "llm_d_sidecar_in_flight_requests{route=\"pd\"}"),
        1.0
    );
    assert_eq!(
        must(
            &m,
            "llm_d_sidecar_rejected_requests_total{reason=\"max_in_flight\"}"
        ),
        1.0,
        "{m}"
    );
}
