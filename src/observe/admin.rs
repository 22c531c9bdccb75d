//! The admin listener (`-metrics-port`): `GET /metrics` (Prometheus text), `GET /health`
//! (liveness) and `GET /readyz` / `/readiness` (as on the main port, see [`crate::readiness`]).
//!
//! It is separate from the main port because `/metrics` there belongs to vLLM (passed
//! through), and so scrapes and probes never queue behind inference traffic.

use std::convert::Infallible;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE as PROMETHEUS_TEXT;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::observe::metrics::Metrics;
use crate::readiness::Readiness;

/// Serves `listener` forever, answering `/readyz` and `/readiness` from `readiness`
/// ([`crate::App::readiness`]). The caller ends it by dropping (aborting) the task; there is
/// nothing to drain, a scrape is one small response.
pub async fn serve_with_readiness(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "admin listener serving /metrics, /health and /readyz");
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        let service = service_fn(move |req| {
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            async move { Ok::<_, Infallible>(handle(&req, &metrics, &readiness)) }
        });
        // One admin connection: bounded by its header timeout; no request of the proxy owns it.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                // Bounds how long a slow client may hold a connection with a partial request.
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, client = %remote, "admin connection ended with an error");
            }
        });
    }
}

fn handle(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = Response::new(body::full(metrics.render()));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            resp
        }
        "/health" => status(StatusCode::OK),
        "/readyz" | "/readiness" => readiness.response(),
        _ => status(StatusCode::NOT_FOUND),
    }
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = code;
    resp
}
