//! Connection-level limits: the head limits answered in JSON, connections that never send a
//! request, the connection cap, and transfer-codings a proxy cannot pass on.

use std::time::Duration;

use crate::support::recorder::Recorder;
use crate::support::*;
use sidecar::observe::metrics::Metrics;
use sidecar::{App, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(configure: impl FnOnce(&mut Config)) -> (Sidecar, Metrics, vllm_sim::SimServer) {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    configure(&mut cfg);
    let app = App::build(cfg).await.expect("the sidecar assembles");
    let metrics = app.metrics().clone();
    (Sidecar::serve(app).await, metrics, d)
}

fn refused(metrics: &Metrics, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("llm_d_sidecar_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Sends `bytes` on a new connection and reads until the sidecar closes it.
async fn until_closed(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(LIMIT, sock.read_to_end(&mut buf))
        .await
        .expect("the sidecar closed the connection");
    buf
}

/// Whether a new connection's request is answered within `tries` attempts `pause` apart
/// (a slot under -max-connections frees when the sidecar notices, which sends no event).
async fn served_within(addr: std::net::SocketAddr, tries: usize, pause: Duration) -> bool {
    for _ in 0..tries {
        let reply = until_closed(
            addr,
            b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        if reply.starts_with(b"HTTP/1.1 200") {
            return true;
        }
        tokio::time::sleep(pause).await;
    }
    false
}

#[tokio::test]
async fn many_ordinary_headers_are_served_over_http1() {
    // A raw decoder: the simulator's own HTTP server stops at 100 headers, vLLM's does not.
    let mut decoder = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let sidecar = Sidecar::for_decoder(decoder.addr, sidecar::Connector::NixlV2).await;
    let mut req = get("/v1/models");
    for i in 0..150 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap(),
            "value-of-some-length".parse().unwrap(),
        );
    }
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    let got = decoder.next().await;
    assert_eq!(
        got.head.matches("x-h-").count(),
        150,
        "every header was forwarded"
    );
}

#[tokio::test]
async fn every_431_is_json_and_counted() {
    let (sidecar, metrics, d) = start(|c| c.max_header_count = 32).await;
    let mut req = get("/v1/models");
    for i in 0..40 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let (resp, body) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 431);
    let v = json(&body);
    assert_eq!(v["error"]["type"], "RequestHeaderFieldsTooLargeError");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("32 headers"),
        "{v}"
    );
    let mut req = get("/v1/models");
    req.headers_mut()
        .insert("x-big", "a".repeat(80 * 1024).parse().unwrap());
    let (resp, body) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 431);
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bytes"));
    assert!(metrics.render().contains(
        r#"llm_d_sidecar_requests_total{connector="nixlv2",route="pass_through",outcome="4xx"} 2"#
    ));
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
    // Beyond twice the limit hyper answers itself; that is counted too.
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-huge: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let reply = until_closed(sidecar.addr, head.as_bytes()).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(refused(&metrics, "head_too_large"), 1);
}

#[tokio::test]
async fn connections_that_never_send_a_request_are_closed() {
    let (sidecar, metrics, _d) =
        start(|c| c.header_read_timeout = Duration::from_millis(200)).await;
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("a partial HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        (
            "the HTTP/2 preface without SETTINGS",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ),
        ("a partial request line", b"GET /v1/mod"),
    ] {
        let started = std::time::Instant::now();
        let reply = until_closed(sidecar.addr, bytes).await;
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{what}: closed before the timeout"
        );
        // HTTP/1 answers nothing or a 408; HTTP/2 may have sent its SETTINGS and a GOAWAY.
        assert!(
            reply.is_empty() || reply.starts_with(b"HTTP/1.1 408") || what.contains("HTTP/2"),
            "{what}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    assert!(refused(&metrics, "no_request_in_time") >= 3);
}

#[tokio::test]
async fn connections_without_a_request_do_not_hold_up_the_drain() {
    let (mut sidecar, _, _d) = start(|c| {
        c.header_read_timeout = Duration::from_secs(60);
        c.drain_timeout = Duration::from_secs(60);
    })
    .await;
    let mut idle = Vec::new();
    for bytes in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /",
    ] {
        let mut sock = TcpStream::connect(sidecar.addr).await.unwrap();
        sock.write_all(bytes).await.unwrap();
        idle.push(sock);
    }
    // The accept loop has the connection once a request on another one is answered.
    let (resp, _) = call(sidecar.addr, get("/health")).await;
    assert_eq!(resp.status(), 200);
    let done = tokio::time::timeout(Duration::from_secs(5), sidecar.begin_shutdown()).await;
    assert!(
        done.is_ok(),
        "the drain waited for a connection that never sent a request"
    );
    drop(idle);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_counted() {
    let (sidecar, metrics, _d) = start(|c| c.max_connections = 2).await;
    // Two keep-alive connections, each answered once and left open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut sock = TcpStream::connect(sidecar.addr).await.unwrap();
        sock.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(LIMIT, sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(sock);
    }
    // A third connection is closed without an answer.
    let reply = until_closed(sidecar.addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(refused(&metrics, "over_limit"), 1);
    drop(held);
    // Freed slots are reused.
    assert!(
        served_within(sidecar.addr, 100, Duration::from_millis(10)).await,
        "no slot came back"
    );
}

#[tokio::test]
async fn a_body_in_a_coding_other_than_chunked_is_refused() {
    let (sidecar, _, d) = start(|_| {}).await;
    let reply = until_closed(
        sidecar.addr,
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          transfer-encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert!(
        text.contains("Transfer-Encoding 'gzip, chunked' is not supported"),
        "{text}"
    );
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn idle_http2_connections_give_their_slot_back() {
    let (sidecar, _, _d) = start(|c| {
        c.max_connections = 2;
        c.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut senders = Vec::new();
    for _ in 0..2 {
        let mut sender = h2_connect(sidecar.addr).await;
        let req = http::Request::get("http://s/health")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
        senders.push(sender);
    }
    // Both stay open and idle: after -idle-timeout the sidecar closes them.
    assert!(
        served_within(sidecar.addr, 200, Duration::from_millis(20)).await,
        "idle HTTP/2 connections kept every slot"
    );
    drop(senders);
}

#[tokio::test]
async fn a_request_in_progress_is_not_idle() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 250).await;
    let mut cfg = config(d.api_addr());
    cfg.idle_timeout = Duration::from_millis(100);
    let sidecar = Sidecar::start(cfg).await;
    // A non-streaming completion whose head comes only with the whole generation (~750 ms).
    let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x","max_tokens":4}"#).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
}
