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
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::proxy::Proxy;
use crate::runtime::AbortOnDrop;
use crate::security::tls::ServerTls;

/// Serves `listener` until `shutdown` resolves, then stops accepting and lets in-flight
/// requests and streams finish for up to `config.drain_timeout`. Built by [`crate::App`].
pub(crate) async fn run(
    config: &Config,
    proxy: Arc<Proxy>,
    tls: Option<Arc<ServerTls>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.config.clone()));
    let reloader = tls.map(|tls| {
        let interval = config.cert_reload_interval;
        // Lives as long as the handle, dropped below when serving ends.
        #[allow(clippy::disallowed_methods)]
        AbortOnDrop(tokio::spawn(
            async move { tls.reload_forever(interval).await },
        ))
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header read timeout bounds slow-loris clients; the buffer bound caps the request
    // head (hyper answers 431 beyond it).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(crate::runtime::limit(config.header_read_timeout))
        .max_buf_size(config.max_header_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    // Connection tasks, so the ones still open at the drain deadline are closed when serving
    // ends, in a process that goes on (an embedder, a test) as in one that exits.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    info!(
        addr = %listener.local_addr()?,
        decoder = config.decoder.authority(),
        connector = config.connector.name(),
        tls = config.server_tls.is_some(),
        defaults = config.defaults,
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
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let handshake_timeout = config.header_read_timeout;
        // Finished connections are reaped here, so the set holds only open ones.
        while connections.try_join_next().is_some() {}
        // A connection outlives the accept loop by design: the graceful watcher drains it,
        // and the drain deadline below ends it.
        connections.spawn(async move {
            let served = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match crate::runtime::within(handshake_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                return debug!(error = %e, client = %remote, "TLS handshake failed")
                            }
                            Err(_) => return debug!(client = %remote, "TLS handshake timed out"),
                        };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, client = %remote, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(reloader);
    info!("shutting down: draining in-flight requests");
    match crate::runtime::within(config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => info!("drained"),
        Err(_) => {
            warn!(
                open = connections.len(),
                "drain timeout reached; closing remaining connections"
            );
            connections.abort_all();
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). SIGHUP, which a terminal or a supervisor may send,
/// is logged and ignored: its default action would end the process and cut every stream.
/// The handlers are installed when this is called, not when it is first polled, so a signal
/// right after the readiness line is already handled. Must be called inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        let hup = signal(SignalKind::hangup()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hangups = async move {
                if let Some(mut hup) = hup {
                    while hup.recv().await.is_some() {
                        info!("SIGHUP ignored (SIGTERM drains and exits)");
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = wait(term) => {},
                () = wait(int) => {},
                () = hangups => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One thread (`-worker-threads=1`, or one available core): a current-thread runtime, which
/// skips the multi-thread scheduler's cross-thread queues and wake-ups. Otherwise a
/// multi-thread runtime with one worker per thread asked for (default: per available core).
pub fn build_runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
