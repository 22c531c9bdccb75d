//! Shared helpers for the simulator integration tests: in-process servers and a tiny
//! loopback HTTP/1.1 client that can also abandon a request mid-flight.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use vllm_sim::{spawn, SimConfig, SimServer};

/// Every test body runs under this bound so a hang fails instead of stalling CI.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test exceeded its time bound")
}

pub async fn sim(tweak: impl FnOnce(&mut SimConfig)) -> SimServer {
    let mut cfg = SimConfig::default();
    tweak(&mut cfg);
    spawn(cfg).await.expect("sim binds")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request whose connection is owned by the caller, so the test can disconnect.
pub struct Pending {
    pub conn: JoinHandle<()>,
    pub resp: JoinHandle<Result<hyper::Response<Incoming>, hyper::Error>>,
}

impl Pending {
    /// Closes the TCP connection (as a client that went away would).
    pub async fn disconnect(self) {
        self.resp.abort();
        self.conn.abort();
        let _ = self.conn.await;
        let _ = self.resp.await;
    }
    pub async fn response(self) -> (hyper::Response<Incoming>, JoinHandle<()>) {
        let r = self.resp.await.expect("join").expect("response");
        (r, self.conn)
    }
}

pub async fn start(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Pending {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    let mut has_ct = false;
    for (k, v) in headers {
        has_ct |= k.eq_ignore_ascii_case("content-type");
        req = req.header(*k, *v);
    }
    if !has_ct && !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tokio::spawn(async move { tx.send_request(req).await });
    Pending { conn, resp }
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let (r, conn) = start(addr, method, path, body, headers)
        .await
        .response()
        .await;
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    conn.abort();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    send(addr, "POST", path, body, &[]).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, "", &[]).await
}

/// Streams a response, returning each body frame separately.
pub async fn frames(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<Bytes>) {
    let (r, conn) = start(addr, "POST", path, body, headers)
        .await
        .response()
        .await;
    let status = r.status();
    let mut b = r.into_body();
    let mut out = Vec::new();
    while let Some(f) = b.frame().await {
        match f {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.push(d);
                }
            }
            Err(_) => break,
        }
    }
    conn.abort();
    (status, out)
}

pub async fn state(s: &SimServer) -> Value {
    get(s.api_addr(), "/sim/state").await.json()
}

/// `GET /sim/wait`; returns (status, state).
pub async fn wait(s: &SimServer, until: &str, timeout_ms: u64) -> (u16, Value) {
    let r = get(
        s.api_addr(),
        &format!("/sim/wait?until={until}&timeout_ms={timeout_ms}"),
    )
    .await;
    (r.status.as_u16(), r.json())
}

pub fn counter(state: &Value, path: &str) -> u64 {
    let mut v = &state["counters"];
    for p in path.split('.') {
        v = &v[p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("counter {path} missing in {state}"))
}

/// Builds a decode body from the original request and P's returned params (verbatim).
pub fn decode_body(original: &Value, prefill_response: &Value) -> String {
    let mut b = original.clone();
    b["kv_transfer_params"] = prefill_response["kv_transfer_params"].clone();
    b.to_string()
}

/// Prefill variant of a client body, as a proxy would send it to P.
pub fn prefill_body(original: &Value) -> String {
    let mut b = original.clone();
    b["stream"] = Value::Bool(false);
    if let Some(o) = b.as_object_mut() {
        o.remove("stream_options");
    }
    b["max_tokens"] = 1.into();
    b["kv_transfer_params"] = serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
    b.to_string()
}

/// Runs the prefill leg of `original` on `p` at `path` and returns the prefiller's reply.
pub async fn prefilled(p: &SimServer, path: &str, original: &Value) -> Value {
    post(p.api_addr(), path, &prefill_body(original))
        .await
        .json()
}

/// Starts the decode leg of `original` on `d` after the prefill reply `prj`, without waiting.
pub async fn start_decode(d: &SimServer, path: &str, original: &Value, prj: &Value) -> Pending {
    start(d.api_addr(), "POST", path, &decode_body(original, prj), &[]).await
}

/// Runs the decode leg of `original` on `d` after the prefill reply `prj`.
pub async fn decoded(d: &SimServer, path: &str, original: &Value, prj: &Value) -> Reply {
    post(d.api_addr(), path, &decode_body(original, prj)).await
}

/// One client body per route with `max_tokens`-style limit 2, for the keyed-handoff tests.
pub fn route_body(path: &str, stream: bool) -> Value {
    let mut b = match path {
        "/v1/completions" => serde_json::json!({"prompt": "one two three", "max_tokens": 2}),
        "/v1/chat/completions" => {
            serde_json::json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2})
        }
        "/v1/responses" => serde_json::json!({"input": "hi there", "max_output_tokens": 2}),
        "/v1/messages" => serde_json::json!({"model": "sim-model",
            "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}),
        _ => serde_json::json!({"token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2}}),
    };
    if stream {
        b["stream"] = true.into();
    }
    b
}

/// Whether a decode reply (whole body or concatenated stream) carries the two tokens and
/// the route's normal ending.
pub fn route_reply_ok(path: &str, stream: bool, text: &str) -> bool {
    let tokens = if path == "/inference/v1/generate" {
        text.contains("[0]") && text.contains("[1]") || text.contains("[0,1]")
    } else {
        text.contains(" t0") && text.contains(" t1")
    };
    let end = match (path, stream) {
        (_, false) => !text.contains("\"error\""),
        ("/v1/responses", true) => text.contains("response.completed"),
        ("/v1/messages", true) => text.contains("message_stop"),
        _ => text.ends_with("data: [DONE]\n\n"),
    };
    tokens && end
}

/// Sends `body` to `path` and returns (status, body or concatenated stream frames).
pub async fn exchange(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, evs) = frames(addr, path, body, headers).await;
    let text: Vec<u8> = evs.iter().flat_map(|b| b.iter().copied()).collect();
    (status.as_u16(), String::from_utf8_lossy(&text).into_owned())
}

/// The newest `/sim/requests` entry (the request a test just sent).
pub async fn last_logged(s: &SimServer) -> Value {
    let all = get(s.api_addr(), "/sim/requests").await.json();
    all.as_array()
        .and_then(|a| a.last())
        .cloned()
        .expect("a logged request")
}

/// The JSON of one SSE `data:` frame.
pub fn sse_json(frame: &[u8]) -> Value {
    let t = String::from_utf8_lossy(frame);
    let data = t
        .strip_prefix("data: ")
        .and_then(|d| d.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one SSE data event: {t:?}"));
    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
}
