//! HTTP plumbing: the response body type (whole or one-frame-per-event channel), JSON and
//! vLLM-style error responses, and a minimal loopback HTTP/1.1 client for the side channel.

use super::config::ErrorFormat;
use super::responses::Obj;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use serde::Serialize;
use serde_json::json;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Items of a streamed body: one SSE event per frame, or a deliberate connection abort.
pub enum StreamItem {
    Event(Bytes),
    Abort,
}

/// Response body: a complete buffer, or a channel whose items become separate frames.
pub enum SimBody {
    Full(Option<Bytes>),
    Channel {
        rx: mpsc::Receiver<StreamItem>,
        /// After each frame we yield once so hyper flushes it before the next is polled:
        /// events are never coalesced into one write.
        yielded: bool,
    },
}

impl SimBody {
    pub fn empty() -> Self {
        SimBody::Full(None)
    }
    pub fn channel(rx: mpsc::Receiver<StreamItem>) -> Self {
        SimBody::Channel { rx, yielded: false }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Channel { rx, yielded } => {
                if *yielded {
                    *yielded = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(StreamItem::Event(b))) => {
                        *yielded = true;
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Poll::Ready(Some(StreamItem::Abort)) => Poll::Ready(Some(Err(
                        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "sim fault"),
                    ))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Channel { .. } => SizeHint::default(),
        }
    }
}

pub type Resp = Response<SimBody>;

pub fn bytes_response(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(SimBody::Full(Some(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    bytes_response(status, "application/json", Bytes::from(body))
}

pub fn empty_response(status: StatusCode) -> Resp {
    let mut r = Response::new(SimBody::empty());
    *r.status_mut() = status;
    r
}

pub fn not_found() -> Resp {
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}))
}

/// A vLLM error (§4.3): status, `type`, message and `param`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: u16,
    pub kind: String,
    pub message: String,
    pub param: Option<String>,
    /// A request-schema failure (§7.4 steps 0–3), answered by vLLM's validation handler in
    /// the OpenAI shape even on the Messages route.
    pub schema: bool,
}

impl ApiError {
    pub fn new(status: u16, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: kind.into(),
            message: message.into(),
            param: None,
            schema: false,
        }
    }
    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.into());
        self
    }
    /// Request-schema failures: "Bad Request" in the current handler, BadRequestError before.
    pub fn validation(fmt: ErrorFormat, message: impl Into<String>) -> Self {
        let kind = match fmt {
            ErrorFormat::Current => "Bad Request",
            ErrorFormat::Legacy => "BadRequestError",
        };
        ApiError {
            schema: true,
            ..ApiError::new(400, kind, message)
        }
    }
    pub fn internal() -> Self {
        ApiError::new(500, "InternalServerError", "Internal server error")
    }
    /// Error type derived from an injected status code, as llm-d's simulator does.
    pub fn for_status(status: u16) -> Self {
        let kind = match status {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            s if s >= 500 => "InternalServerError",
            _ => "BadRequestError",
        };
        let msg = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        ApiError::new(status, kind, format!("Injected fault: {msg}"))
    }

    /// vLLM's key order: message, type, param, code.
    pub fn body(&self, fmt: ErrorFormat) -> String {
        let fields = |o: Obj| {
            o.field("message", &self.message)
                .field("type", &self.kind)
                .field("param", &self.param)
                .field("code", &self.status)
        };
        match fmt {
            ErrorFormat::Current => Obj::new()
                .raw("error", &fields(Obj::new()).finish())
                .finish(),
            ErrorFormat::Legacy => fields(Obj::new().field("object", "error")).finish(),
        }
    }

    /// The in-stream form: always the `{"error":{...}}` event (§4.2).
    pub fn sse_event(&self) -> Bytes {
        Bytes::from(format!("data: {}\n\n", self.body(ErrorFormat::Current)))
    }

    pub fn response(&self, fmt: ErrorFormat) -> Resp {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        bytes_response(status, "application/json", Bytes::from(self.body(fmt)))
    }
}

/// Outcome of a side-channel call: HTTP status and body, or a transport error text.
pub type CallResult = Result<(u16, Bytes), String>;

/// One HTTP/1.1 request on a fresh loopback connection. Side-channel traffic is rare and
/// local, so a pool would add state without saving anything measurable.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> CallResult {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        let has_body = body.is_some();
        let full = http_body_util::Full::new(Bytes::from(body.unwrap_or_default()));
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr);
        if has_body {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(full).map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = tx
                .send_request(req)
                .await
                .map_err(|e| format!("request {addr}{path}: {e}"))?;
            let status = resp.status().as_u16();
            let b = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body {addr}{path}: {e}"))?;
            Ok((status, b.to_bytes()))
        };
        // Drive the connection inside this future (no detached task that could outlive an
        // aborted caller); if it ends first, the exchange still drains what was buffered.
        tokio::pin!(exchange);
        tokio::pin!(conn);
        tokio::select! {
            biased;
            r = &mut exchange => r,
            _ = &mut conn => exchange.await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout calling {addr}{path}")),
    }
}
