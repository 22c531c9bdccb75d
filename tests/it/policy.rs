//! Failure policy and limits: timeouts, prefill fallback, SSRF allowlist, in-flight and
//! header limits. Each rule fails its test when removed.

use std::time::Duration;

use crate::support::recorder::Recorder;
use crate::support::*;
use sidecar::config::{PrefillFailurePolicy, SsrfConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_prefill_past_its_deadline_is_504_and_is_cancelled() {
    let p = sim(|c| c.ttft_ms = 60_000).await;
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.prefill_timeout = Duration::from_millis(200);
    let sidecar = Sidecar::start(cfg).await;
    let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x"}"#).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(json(&body)["error"]["type"], "GatewayTimeoutError");
    assert!(sim_wait(&p, "idle", LIMIT).await);
    assert_eq!(counter(&sim_state(&p).await, "requests_aborted/prefill"), 1);
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn a_decode_past_its_first_byte_deadline_is_504_and_frees_everything() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let mut cfg = config(d.api_addr());
    cfg.decode_first_byte_timeout = Duration::from_millis(300);
    let sidecar = Sidecar::start(cfg).await;
    let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x","max_tokens":3}"#).await;
    assert_eq!(resp.status(), 504, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("decode"));
    assert!(
        sim_wait(&d, "idle", LIMIT).await,
        "the decode was cancelled"
    );
    assert!(sim_wait(&p, "no_leases", LIMIT).await);
}

#[tokio::test]
async fn decode_local_answers_when_the_prefill_fails() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.prefill_failure_policy = PrefillFailurePolicy::DecodeLocal;
    let sidecar = Sidecar::start(cfg).await;
    let original = r#"{"prompt":"x y","max_tokens":2,"kv_transfer_params":{"remote_host":"evil"}}"#;
    let mut req = post("/v1/completions", Some(p.api_addr()), original);
    req.headers_mut()
        .insert("x-sim-fault", "prefill_http_500".parse().unwrap());
    let (resp, body) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(resp.headers()["x-prefill-fallback"], "decode-local");
    let d_req = &sim_requests(&d).await[0];
    assert_eq!(
        d_req["body"].as_str().unwrap(),
        r#"{"prompt":"x y","max_tokens":2}"#
    );

    // An unreachable prefiller falls back the same way.
    let (resp, _) = call(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(dead_addr().await),
            r#"{"prompt":"x"}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-prefill-fallback"], "decode-local");

    // A prefiller's 4xx judges the client's request: it is returned, never papered over.
    let mut req = post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"x"}"#);
    req.headers_mut()
        .insert("x-sim-fault", "prefill_http_400".parse().unwrap());
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 2);
}

#[tokio::test]
async fn decode_local_covers_an_unusable_2xx_prefill_reply() {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.prefill_failure_policy = PrefillFailurePolicy::DecodeLocal;
    let sidecar = Sidecar::start(cfg).await;
    for (content_type, body) in [
        ("text/html", "<html>hi</html>"),
        ("application/json", r#"{"kv_transfer_params":"x"}"#),
        ("application/json", r#"{"kv_transfer_params":[1]}"#),
        ("application/json", "[]"),
    ] {
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let reply: &'static [u8] = Box::leak(reply.into_bytes().into_boxed_slice());
        let prefiller = Recorder::start(reply).await;
        let before = counter(&sim_state(&d).await, "requests_total");
        let (resp, body) = call(
            sidecar.addr,
            post(
                "/v1/completions",
                Some(prefiller.addr),
                r#"{"prompt":"x y","max_tokens":2}"#,
            ),
        )
        .await;
        let text = String::from_utf8_lossy(reply);
        assert_eq!(
            resp.status(),
            200,
            "{text}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            resp.headers()["x-prefill-fallback"],
            "decode-local",
            "{text}"
        );
        assert_eq!(counter(&sim_state(&d).await, "requests_total"), before + 1);
        let decoded = sim_requests(&d).await.pop().expect("the decode");
        assert!(
            record_body(&decoded).get("kv_transfer_params").is_none(),
            "{text}"
        );
    }
}

#[tokio::test]
async fn the_default_policy_reports_the_prefill_failure() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::start(config(d.api_addr())).await;
    let mut req = post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"x"}"#);
    req.headers_mut()
        .insert("x-sim-fault", "prefill_http_500".parse().unwrap());
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn static_allowlist_admits_listed_prefillers_only() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let stranger = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let mut cfg = config(d.api_addr());
    cfg.ssrf = Some(SsrfConfig {
        rules: vec![p.api_addr().to_string().parse().unwrap()],
        inference_pool: None,
        pool_api: sidecar::security::inference_pool::PoolApi::V1,
    });
    let sidecar = Sidecar::start(cfg).await;
    let (resp, _) = call_pd(sidecar.addr, &p, r#"{"prompt":"x"}"#).await;
    assert_eq!(resp.status(), 200);
    let (resp, body) = call(
        sidecar.addr,
        post("/v1/completions", Some(stranger.addr), r#"{"prompt":"x"}"#),
    )
    .await;
    assert_eq!(resp.status(), 403);
    let v = json(&body);
    assert_eq!(v["error"]["type"], "PermissionDeniedError");
    assert_eq!(v["error"]["param"], "x-prefiller-host-port");
    assert_eq!(
        stranger.count(),
        0,
        "nothing is sent to a refused prefiller"
    );
}

#[tokio::test]
async fn requests_beyond_max_in_flight_get_503_until_a_slot_frees() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let mut cfg = config(d.api_addr());
    cfg.max_in_flight = 1;
    let sidecar = Sidecar::start(cfg).await;
    let stream = r#"{"prompt":"x","max_tokens":3,"stream":true}"#;
    let mut first = send_pd(sidecar.addr, &p, stream).await;
    first.next_data().await.expect("the first stream is open");
    let (resp, body) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(json(&body)["error"]["type"], "ServiceUnavailableError");
    let (resp, _) = call(sidecar.addr, get("/health")).await;
    assert_eq!(resp.status(), 200, "health is never refused");

    drop(first);
    assert!(sim_wait(&d, "idle", LIMIT).await);
    let (resp, _) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(
        resp.status(),
        200,
        "the slot came back when the stream ended"
    );
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.max_header_size = 8192;
    let sidecar = Sidecar::start(cfg).await;
    let mut req = get("/v1/models");
    req.headers_mut()
        .insert("x-big", "a".repeat(16 * 1024).parse().unwrap());
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 431);
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn a_client_that_stalls_in_its_headers_is_cut_off() {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.header_read_timeout = Duration::from_millis(200);
    let sidecar = Sidecar::start(cfg).await;
    let mut sock = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    sock.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The sidecar closes the connection (after a 408, or without one); it never waits forever.
    tokio::time::timeout(LIMIT, sock.read_to_end(&mut buf))
        .await
        .expect("closed by the header read timeout")
        .unwrap();
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test]
async fn zero_timeouts_mean_no_limit() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.connect_timeout = Duration::ZERO;
    cfg.prefill_timeout = Duration::ZERO;
    cfg.decode_first_byte_timeout = Duration::ZERO;
    cfg.header_read_timeout = Duration::ZERO;
    let sidecar = Sidecar::start(cfg).await;
    let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x","max_tokens":2}"#).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (resp, _) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 200);
}
