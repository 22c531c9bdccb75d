//! Bad input and upstream failures get vLLM-shaped JSON errors with the right status, nothing
//! reaches an upstream that should not, and the sidecar keeps serving.

use crate::support::recorder::Recorder;
use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use sidecar::Connector;

fn assert_error(status: u16, body: &[u8], want_status: u16, want_type: &str) -> serde_json::Value {
    assert_eq!(status, want_status, "{}", String::from_utf8_lossy(body));
    let v = json(body);
    assert_eq!(v["error"]["type"], want_type, "{v}");
    assert_eq!(v["error"]["code"], want_status);
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    v
}

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

#[tokio::test]
async fn malformed_bodies_are_400_and_reach_no_upstream() {
    let p = Recorder::start(OK).await;
    let d = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::NixlV2).await;
    for body in [
        "{\"prompt\": ",
        "not json",
        "",
        "[1,2]",
        "\"text\"",
        "{} {}",
    ] {
        let (resp, bytes) = call(sidecar.addr, post("/v1/completions", Some(p.addr), body)).await;
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_error(resp.status().as_u16(), &bytes, 400, "BadRequestError");
    }
    assert_eq!((p.count(), d.count()), (0, 0));
}

#[tokio::test]
async fn the_sidecar_keeps_serving_after_bad_requests() {
    let Pd { p, d: _d, sidecar } = Pd::start(Connector::NixlV2).await;
    let (resp, _) = call(
        sidecar.addr,
        post("/v1/completions", Some(p.api_addr()), "{oops"),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let bad_header = Request::post("/v1/completions")
        .header("x-prefiller-host-port", "host:notaport")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (resp, bytes) = call(sidecar.addr, bad_header).await;
    let v = assert_error(resp.status().as_u16(), &bytes, 400, "BadRequestError");
    assert_eq!(v["error"]["param"], "x-prefiller-host-port");
    let (resp, _) = call_pd(sidecar.addr, &p, r#"{"prompt":"ok"}"#).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn oversized_bodies_are_413_whether_sized_or_chunked() {
    let p = Recorder::start(OK).await;
    let d = Recorder::start(OK).await;
    let mut config = config(d.addr);
    config.max_body_bytes = 1024;
    let sidecar = Sidecar::start(config).await;
    let big = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2048));
    let (resp, bytes) = call(sidecar.addr, post("/v1/completions", Some(p.addr), &big)).await;
    assert_error(resp.status().as_u16(), &bytes, 413, "RequestTooLargeError");

    // A chunked body has no length up front: the limit applies as it streams in.
    let stream = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let chunks = Chunks(big.into_bytes(), 0);
    let req = Request::post("/v1/completions")
        .header("x-prefiller-host-port", p.addr.to_string())
        .body(chunks)
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!((p.count(), d.count()), (0, 0));
}

/// A body of 256-byte frames and no length, as a chunked upload sends it.
struct Chunks(Vec<u8>, usize);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let start = self.1;
        if start >= self.0.len() {
            return std::task::Poll::Ready(None);
        }
        let end = (start + 256).min(self.0.len());
        self.1 = end;
        let frame = hyper::body::Frame::data(Bytes::copy_from_slice(&self.0[start..end]));
        std::task::Poll::Ready(Some(Ok(frame)))
    }
}

#[tokio::test]
async fn a_prefiller_4xx_reaches_the_client_with_its_body() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let (resp, bytes) = call_pd(
        sidecar.addr,
        &p,
        r#"{"model":"no-such-model","prompt":"x"}"#,
    )
    .await;
    let v = assert_error(resp.status().as_u16(), &bytes, 404, "NotFoundError");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no-such-model"));
    assert_eq!(
        counter(&sim_state(&d).await, "requests_total"),
        0,
        "no decode after a refused prefill"
    );
}

#[tokio::test]
async fn prefiller_5xx_is_502_and_503_stays_503_naming_the_prefiller() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    for (fault, status, kind) in [
        ("prefill_http_500", 502, "BadGatewayError"),
        ("prefill_http_503", 503, "ServiceUnavailableError"),
    ] {
        let mut req = post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"x"}"#);
        req.headers_mut()
            .insert("x-sim-fault", fault.parse().unwrap());
        let (resp, bytes) = call(sidecar.addr, req).await;
        let v = assert_error(resp.status().as_u16(), &bytes, status, kind);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&p.api_addr().to_string()),
            "{v}"
        );
    }
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn an_unreachable_prefiller_is_502_and_the_decoder_is_not_called() {
    let d = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::NixlV2).await;
    let gone = dead_addr().await;
    let (resp, bytes) = call(
        sidecar.addr,
        post("/v1/completions", Some(gone), r#"{"prompt":"x"}"#),
    )
    .await;
    let v = assert_error(resp.status().as_u16(), &bytes, 502, "BadGatewayError");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&gone.to_string()));
    assert_eq!(d.count(), 0);
}

#[tokio::test]
async fn a_prefiller_reply_that_is_not_json_is_502() {
    const HTML: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\n\r\n<html>";
    let p = Recorder::start(HTML).await;
    let d = Recorder::start(OK).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::NixlV2).await;
    let (resp, bytes) = call(
        sidecar.addr,
        post("/v1/completions", Some(p.addr), r#"{"prompt":"x"}"#),
    )
    .await;
    assert_error(resp.status().as_u16(), &bytes, 502, "BadGatewayError");
    assert_eq!(d.count(), 0);
}

#[tokio::test]
async fn a_down_decoder_after_prefill_is_502() {
    let p = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(dead_addr().await, Connector::NixlV2).await;
    let (resp, bytes) = call_pd(sidecar.addr, &p, r#"{"prompt":"x"}"#).await;
    let v = assert_error(resp.status().as_u16(), &bytes, 502, "BadGatewayError");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("decode"),
        "{v}"
    );
}

/// Writes `head` and `body` on a raw connection, then reads until the server closes: the
/// bytes received, and whether the close was clean (FIN) rather than a reset.
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8], body: &[u8]) -> (Vec<u8>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head).await.unwrap();
    // The server may answer and stop reading midway: later writes may fail, which is the point.
    let _ = conn.write_all(body).await;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, conn.read(&mut buf)).await {
            Ok(Ok(0)) => return (received, true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (received, false),
            Err(_) => panic!("the server did not close"),
        }
    }
}

#[tokio::test]
async fn a_413_is_delivered_and_the_connection_closes_cleanly() {
    let p = Recorder::start(OK).await;
    let d = Recorder::start(OK).await;
    let mut cfg = config(d.addr);
    cfg.max_body_bytes = 1024;
    let sidecar = Sidecar::start(cfg).await;
    let prompt = "a".repeat(8 << 20);
    let body = format!(r#"{{"prompt":"{prompt}"}}"#);
    // Sized (refused from its Content-Length) and chunked (refused midway).
    let mut chunked = Vec::new();
    for piece in body.as_bytes().chunks(16 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for (framing, bytes) in [
        (format!("content-length: {}", body.len()), body.as_bytes()),
        ("transfer-encoding: chunked".to_string(), &chunked[..]),
    ] {
        for _ in 0..10 {
            let head = format!(
                "POST /v1/completions HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\n\
                 x-prefiller-host-port: {}\r\n{framing}\r\n\r\n",
                p.addr
            );
            let (received, clean) = raw_exchange(sidecar.addr, head.as_bytes(), bytes).await;
            let text = String::from_utf8_lossy(&received);
            assert!(text.starts_with("HTTP/1.1 413"), "{framing}: {text}");
            assert!(text.contains("RequestTooLargeError"), "{text}");
            assert!(clean, "{framing}: the connection was reset after the 413");
        }
    }
    assert_eq!(p.count(), 0);
}
