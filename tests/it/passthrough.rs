//! Requests the sidecar does not intercept reach vLLM as they were sent, and `/health` is
//! answered locally.

use std::time::Duration;

use crate::support::recorder::Recorder;
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use sidecar::Connector;

const OK: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-upstream: yes\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

#[tokio::test]
async fn completions_without_prefiller_pass_through_byte_for_byte() {
    let mut decoder = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let body = "{ \"prompt\": \"caf\\u00e9\" ,\"seed\":123456789012345678901234567890, \"b\":1 }";
    let req = Request::post("/v1/completions?trace=1&x=%20")
        .header("host", "client.example")
        .header("content-type", "application/json")
        .header("authorization", "Bearer secret")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (resp, bytes) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-upstream"], "yes");
    assert_eq!(&bytes[..], b"{\"ok\":true}");

    let got = decoder.next().await;
    assert!(
        got.head
            .starts_with("POST /v1/completions?trace=1&x=%20 HTTP/1.1\r\n"),
        "{}",
        got.head
    );
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(
        got.header("authorization").as_deref(),
        Some("Bearer secret")
    );
    assert_eq!(got.header("x-custom").as_deref(), Some("kept"));
    assert_eq!(got.header("host"), Some(decoder.addr.to_string()));
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn other_paths_and_methods_pass_through_and_routing_headers_are_dropped() {
    let mut decoder = Recorder::start(OK).await;
    let prefiller = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let cases = [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/completions/"),
    ];
    for (method, path) in cases {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "client")
            .header("x-prefiller-host-port", prefiller.addr.to_string())
            .header("x-prefiller-url", format!("http://{}", prefiller.addr))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let (resp, _) = call(sidecar.addr, req).await;
        assert_eq!(resp.status(), 201, "{method} {path}");
        let got = decoder.next().await;
        assert!(
            got.head.starts_with(&format!("{method} {path} HTTP/1.1")),
            "{}",
            got.head
        );
        assert_eq!(got.header("x-prefiller-host-port"), None);
        assert_eq!(got.header("x-prefiller-url"), None);
    }
    assert_eq!(prefiller.count(), 0, "no prefill for pass-through requests");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let mut decoder = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let req = Request::get("/v1/models")
        .header("host", "client")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic x")
        .header("te", "trailers")
        .header("x-public", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 201);
    let got = decoder.next().await;
    for name in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert_eq!(got.header(name), None, "{name} leaked: {}", got.head);
    }
    assert_eq!(got.header("x-public").as_deref(), Some("1"));
}

#[tokio::test]
async fn health_is_answered_locally() {
    let decoder = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let (resp, body) = call(sidecar.addr, get("/health")).await;
    assert_eq!(resp.status(), 200);
    assert!(body.is_empty());
    assert_eq!(decoder.count(), 0);
}

#[tokio::test]
async fn a_down_decoder_gives_a_502_json_error() {
    let sidecar = Sidecar::for_decoder(dead_addr().await, Connector::NixlV2).await;
    let (resp, body) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v = json(&body);
    assert_eq!(v["error"]["type"], "BadGatewayError");
    assert_eq!(v["error"]["code"], 502);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let mut decoder = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let mut sender = h2_connect(sidecar.addr).await;
    for path in ["/health", "/v1/models"] {
        let req = Request::get(format!("http://sidecar{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(LIMIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await.unwrap();
        assert!(status == 200 || status == 201, "{path}: {status}");
    }
    let got = decoder.next().await;
    assert!(
        got.head.starts_with("GET /v1/models HTTP/1.1"),
        "{}",
        got.head
    );
}

#[tokio::test]
async fn chunked_upstream_bodies_stream_back() {
    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let decoder = Recorder::start(CHUNKED).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let (resp, body) = tokio::time::timeout(
        Duration::from_secs(10),
        call(sidecar.addr, get("/anything")),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&body[..], b"hello world");
}

/// vLLM closes idle keep-alive connections (after 5 s) without warning: a pooled connection
/// the server closed must not fail the next request. (The rarer race, a request written just
/// as the close arrives, is left to hyper-util's `retry_canceled_requests`; this test does not
/// provoke it.)
#[tokio::test]
async fn upstream_connections_the_server_closed_do_not_fail_requests() {
    let decoder = Recorder::start_closing(OK).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    for i in 0..100 {
        let (resp, body) = call(sidecar.addr, get("/v1/models")).await;
        assert_eq!(
            resp.status(),
            201,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(decoder.count(), 100);
}

/// A decoder reply with both framings (RFC 9112 §6.3: Transfer-Encoding wins).
const BOTH_FRAMINGS: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\na\r\n0123456789\r\n0\r\n\r\n";

async fn h2_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> (http::response::Parts, Result<Bytes, String>) {
    let mut sender = h2_connect(addr).await;
    let req = Request::get(format!("http://sidecar{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(LIMIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(LIMIT, body.collect())
        .await
        .unwrap()
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (parts, body)
}

#[tokio::test]
async fn content_length_beside_chunked_is_dropped_not_obeyed() {
    let decoder = Recorder::start(BOTH_FRAMINGS).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let (resp, body) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(&body[..], b"0123456789", "truncated to the Content-Length");
    assert!(resp.headers().get("content-length").is_none());
    let (parts, body) = h2_get(sidecar.addr, "/v1/models").await;
    assert_eq!(parts.status, 200);
    assert_eq!(body.as_deref(), Ok(&b"0123456789"[..]), "HTTP/2");
    assert!(parts.headers.get("content-length").is_none());
}

#[tokio::test]
async fn a_pd_decode_with_both_framings_is_relayed_whole() {
    let p = sim(|_| {}).await;
    let decoder = Recorder::start(BOTH_FRAMINGS).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x","max_tokens":2}"#).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(&body[..], b"0123456789");
}

#[tokio::test]
async fn a_transfer_coding_that_cannot_be_relayed_is_502() {
    const GZIP: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let decoder = Recorder::start(GZIP).await;
    let sidecar = Sidecar::for_decoder(decoder.addr, Connector::NixlV2).await;
    let (resp, body) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&body));
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("Transfer-Encoding 'gzip, chunked'"),
        "{message}"
    );
}
