//! The listener: accepts connections (HTTP/1.1 and h2c), serves them, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::allowlist::Allowlist;
use crate::config::Config;
use crate::proxy::Proxy;

/// Serves `listener` until `shutdown` resolves, then stops accepting and lets in-flight
/// requests and streams finish for up to `config.drain_timeout`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let allowlist = match &config.ssrf {
        None => Allowlist::disabled(),
        Some(ssrf) => Allowlist::new(ssrf.rules.clone(), None),
    };
    let proxy = Arc::new(Proxy::new(&config, allowlist));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header read timeout bounds slow-loris clients; the buffer bound caps the request
    // head (hyper answers 431 beyond it).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    info!(
        addr = %listener.local_addr()?,
        decoder = config.decoder.authority(),
        connector = config.connector.name(),
        "listening"
    );
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, remote).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, client = %remote, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!("shutting down: draining in-flight requests");
    match tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => info!("drained"),
        Err(_) => warn!("drain timeout reached; closing remaining connections"),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
