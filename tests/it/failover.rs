//! Prefiller failover and the per-prefiller circuit breaker; the headers that tell machines what
//! happened: the error kind, `Server-Timing`, and `x-prefill-fallback` when no KV was handed
//! over.

use std::time::Duration;

use crate::support::*;
use sidecar::observe::metrics::Metrics;

fn breakers(metrics: &Metrics, state: &str) -> u64 {
    metric(
        metrics,
        &format!("llm_d_sidecar_prefiller_breakers{{state=\"{state}\"}}"),
    )
}

fn header<'a>(resp: &'a http::Response<()>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_prefiller_refusing_connections_fails_over_to_the_next_without_retries() {
    let dead = dead_addr().await;
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    // Default retry settings: -prefill-max-retries=0.
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |_| {}).await;
    let (resp, body) = call_naming(sidecar.addr, &format!("{dead},{}", p.api_addr())).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(prefills(&p).await, 1);
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);
    assert_eq!(
        metric(
            &metrics,
            "llm_d_sidecar_prefill_retries_total{reason=\"connect\"}"
        ),
        1
    );
    // A 503 is not a connection refused: without retries it is the answer.
    let busy = sim(|_| {}).await;
    sim_config(&busy, r#"{"faults":["prefill_http_503"]}"#).await;
    let (resp, _) = call_naming(
        sidecar.addr,
        &format!("{},{}", busy.api_addr(), p.api_addr()),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(prefills(&p).await, 1);
}

#[tokio::test]
async fn the_breaker_opens_skips_the_prefiller_then_a_probe_closes_it() {
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_500"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefiller_breaker.failures = 2;
        c.prefiller_breaker.backoff = Duration::from_millis(200);
    })
    .await;
    let both = format!("{},{}", p1.api_addr(), p2.api_addr());
    let only_p1 = p1.api_addr().to_string();
    assert_eq!(breakers(&metrics, "open"), 0);
    // Two failures in a row: each is the client's answer (a 500 is not retried)...
    for _ in 0..2 {
        assert_eq!(call_naming(sidecar.addr, &both).await.0.status(), 502);
    }
    assert_eq!(prefills(&p1).await, 2);
    // ...and the breaker is open: p1 is skipped, p2 serves.
    assert_eq!(breakers(&metrics, "open"), 1);
    let (resp, body) = call_naming(sidecar.addr, &both).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!((prefills(&p1).await, prefills(&p2).await), (2, 1));
    // With no other prefiller, a fast vLLM-shaped 503 and nothing sent.
    let (resp, body) = call_naming(sidecar.addr, &only_p1).await;
    assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "x-llm-d-error-kind"), Some("circuit_open"));
    assert_eq!(header(&resp, "x-llm-d-error-leg"), Some("prefill"));
    let error = &json(&body)["error"];
    assert_eq!(error["type"], "ServiceUnavailableError");
    assert_eq!(error["param"], "x-prefiller-host-port");
    assert!(
        error["message"].as_str().unwrap().contains(&only_p1),
        "{error}"
    );
    assert_eq!(prefills(&p1).await, 2);
    assert_eq!(
        metric(
            &metrics,
            "llm_d_sidecar_upstream_errors_total{leg=\"prefill\",kind=\"circuit_open\"}"
        ),
        1
    );
    // p1 recovers. Once the backoff is over, one request tries it (half-open) and closes the
    // breaker; until then requests go to p2.
    sim_config(&p1, r#"{"faults":[]}"#).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while prefills(&p1).await == 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no probe reached p1"
        );
        assert_eq!(call_naming(sidecar.addr, &both).await.0.status(), 200);
    }
    assert_eq!(
        (breakers(&metrics, "open"), breakers(&metrics, "half_open")),
        (0, 0)
    );
    let before = prefills(&p2).await;
    assert_eq!(call_naming(sidecar.addr, &both).await.0.status(), 200);
    assert_eq!(
        (prefills(&p1).await, prefills(&p2).await),
        (4, before),
        "closed: p1 first again"
    );
}

#[tokio::test]
async fn errors_carry_their_kind_and_leg() {
    let dead = dead_addr().await;
    let d = sim(|_| {}).await;
    let (sidecar, _) = sidecar_configured(d.api_addr(), |_| {}).await;
    let (resp, _) = call_naming(sidecar.addr, &dead.to_string()).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "x-llm-d-error-kind"), Some("unreachable"));
    assert_eq!(header(&resp, "x-llm-d-error-leg"), Some("prefill"));
    // The sidecar's own refusals: a kind, no leg.
    let p = sim(|_| {}).await;
    let (resp, _) = call(
        sidecar.addr,
        post("/v1/completions", Some(p.api_addr()), "{nope"),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(header(&resp, "x-llm-d-error-kind"), Some("invalid_request"));
    assert_eq!(header(&resp, "x-llm-d-error-leg"), None);
    // The decoder's own answers are relayed as they are.
    sim_config(&d, r#"{"faults":["decode_http_500"]}"#).await;
    let (resp, _) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(header(&resp, "x-llm-d-error-kind"), None);
}

#[tokio::test]
async fn pd_responses_carry_server_timing_and_pass_through_does_not() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, _) = sidecar_configured(d.api_addr(), |_| {}).await;
    let (resp, _) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
    assert_eq!(resp.status(), 200);
    let timing = header(&resp, "server-timing").expect("Server-Timing on P/D");
    let (prefill, decode) = timing.split_once(", ").expect("two metrics");
    let dur = |m: &str, name: &str| -> f64 {
        let rest = m.strip_prefix(name).unwrap_or_else(|| panic!("{timing}"));
        let v = rest
            .strip_prefix(";dur=")
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        v.parse().unwrap()
    };
    assert!(dur(prefill, "prefill") > 0.0, "{timing}");
    assert!(dur(decode, "decode") > 0.0, "{timing}");
    assert!(decode.ends_with(r#";desc="first byte""#), "{timing}");
    let (resp, _) = call(
        sidecar.addr,
        post("/v1/completions", None, r#"{"prompt":"a"}"#),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "server-timing"), None);
}

#[tokio::test]
async fn a_decode_without_kv_params_says_so_and_is_counted() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |_| {}).await;
    let degraded = |reason: &str| {
        metric(
            &metrics,
            &format!("llm_d_sidecar_degraded_requests_total{{reason=\"{reason}\"}}"),
        )
    };
    let (resp, _) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
    assert_eq!(header(&resp, "x-prefill-fallback"), None);
    for fault in ["omit_kv_params", "null_kv_params"] {
        sim_config(&p, &format!(r#"{{"faults":["{fault}"]}}"#)).await;
        let (resp, body) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(
            header(&resp, "x-prefill-fallback"),
            Some("no-kv-params"),
            "{fault}"
        );
    }
    assert_eq!(degraded("no_kv_params"), 2);
    assert_eq!(degraded("decode_local"), 0);
}

#[tokio::test]
async fn a_local_decode_after_a_failed_prefill_says_so_and_is_counted() {
    let dead = dead_addr().await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefill_failure_policy = sidecar::pd::PrefillFailurePolicy::DecodeLocal;
    })
    .await;
    let (resp, body) = call_naming(sidecar.addr, &dead.to_string()).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "x-prefill-fallback"), Some("decode-local"));
    assert_eq!(
        metric(
            &metrics,
            "llm_d_sidecar_degraded_requests_total{reason=\"decode_local\"}"
        ),
        1
    );
}

#[tokio::test]
async fn a_prefiller_hanging_past_the_prefill_timeout_opens_its_breaker() {
    let p = sim(|_| {}).await;
    sim_config(&p, r#"{"faults":["stall_ms:5000"]}"#).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefill_timeout = Duration::from_millis(100);
        c.prefiller_breaker.failures = 1;
    })
    .await;
    let only = p.api_addr().to_string();
    let (resp, _) = call_naming(sidecar.addr, &only).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(header(&resp, "x-llm-d-error-kind"), Some("timeout"));
    assert_eq!(breakers(&metrics, "open"), 1);
    let (resp, _) = call_naming(sidecar.addr, &only).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "x-llm-d-error-kind"), Some("circuit_open"));
    assert_eq!(prefills(&p).await, 1, "the second request sent nothing");
}
