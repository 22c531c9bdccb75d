//! The listener: accepts connections (HTTP/1.1 and h2c), serves them, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::data_parallel::Ranks;
use crate::runtime::AbortOnDrop;
use crate::security::tls::ServerTls;

/// Serves rank i on `listeners[i]` until `shutdown` resolves, then stops accepting and lets
/// in-flight requests and streams finish for up to `config.drain_timeout`. Built by
/// [`crate::App`].
pub(crate) async fn run(
    config: &Config,
    ranks: Arc<Ranks>,
    tls: Option<Arc<ServerTls>>,
    listeners: Vec<TcpListener>,
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
    let builder = http_builder(config);
    let graceful = GracefulShutdown::new();
    // Set when draining starts: a connection that has not sent a request yet closes then.
    let (draining_tx, draining) = watch::channel(false);
    let slots =
        (config.max_connections > 0).then(|| Arc::new(Semaphore::new(config.max_connections)));
    // Connection tasks, so the ones still open at the drain deadline are closed when serving
    // ends, in a process that goes on (an embedder, a test) as in one that exits.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    for (rank, listener) in listeners.iter().enumerate() {
        let decoder = match rank {
            0 => &config.decoder,
            i => &config.rank_decoders[i - 1],
        };
        info!(
            addr = %listener.local_addr()?,
            decoder = decoder.authority(),
            rank = (ranks.len() > 1).then_some(rank),
            connector = config.connector.name(),
            tls = config.server_tls.is_some(),
            defaults = config.defaults,
            "listening"
        );
    }
    let metrics = ranks.primary().metrics.clone();
    let mut next = 0;
    loop {
        let (rank, stream, remote) = tokio::select! {
            accepted = accept_any(&listeners, &mut next) => match accepted {
                (rank, Ok((stream, remote))) => (rank, stream, remote),
                (_, Err(e)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Finished connections are reaped here, so the set holds only open ones.
        while connections.try_join_next().is_some() {}
        let slot = match slots.as_ref().map(|s| s.clone().try_acquire_owned()) {
            Some(Err(_)) => {
                // Closed at once: the client sees a reset and may retry elsewhere.
                metrics.connection_refused("over_limit");
                debug!(client = %remote, limit = config.max_connections, "connection refused: -max-connections");
                continue;
            }
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            ranks: ranks.clone(),
            rank,
            builder: builder.clone(),
            acceptor: acceptor.clone(),
            watcher: graceful.watcher(),
            draining: draining.clone(),
            first_request_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        };
        // A connection outlives the accept loop by design: the graceful watcher drains it,
        // and the drain deadline below ends it.
        connections.spawn(async move {
            let _slot = slot;
            conn.serve(stream, remote).await;
        });
    }
    drop(listeners);
    drop(reloader);
    info!("shutting down: draining in-flight requests");
    let _ = draining_tx.send(true);
    match crate::runtime::within(config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => info!("drained"),
        Err(_) => {
            warn!(
                open = connections.len(),
                "drain timeout reached; closing remaining connections"
            );
            connections.abort_all();
            // Their requests end (and are counted, and their spans queued) as they unwind.
            let unwound = async { while connections.join_next().await.is_some() {} };
            let _ = crate::runtime::within(std::time::Duration::from_secs(1), unwound).await;
        }
    }
    Ok(())
}

/// The next connection on any of `listeners`, with the index of the one it came to. The scan
/// starts after the last listener served, so a busy rank cannot starve the others.
async fn accept_any(
    listeners: &[TcpListener],
    next: &mut usize,
) -> (usize, std::io::Result<(TcpStream, SocketAddr)>) {
    std::future::poll_fn(|cx| {
        for k in 0..listeners.len() {
            let i = (*next + k) % listeners.len();
            if let std::task::Poll::Ready(accepted) = listeners[i].poll_accept(cx) {
                *next = i + 1;
                return std::task::Poll::Ready((i, accepted));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// HTTP/1.1 and h2c, with the request-head limits. hyper's own limits sit at twice ours, so a
/// head over ours reaches the proxy, which answers a JSON 431 (`Proxy::handle`); only heads
/// over twice the limit get hyper's bare 431, counted as `head_too_large`.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(crate::runtime::limit(config.header_read_timeout))
        .max_buf_size(config.max_header_size.saturating_mul(2))
        .max_headers(config.max_header_count.saturating_mul(2));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(config.max_header_size.saturating_mul(2)).unwrap_or(u32::MAX),
        );
    builder
}

/// What one accepted connection needs.
struct Connection {
    ranks: Arc<Ranks>,
    /// The data-parallel rank whose listener accepted it.
    rank: usize,
    builder: auto::Builder<TokioExecutor>,
    acceptor: Option<TlsAcceptor>,
    watcher: Watcher,
    draining: watch::Receiver<bool>,
    /// The first request's head must arrive within this (`-header-read-timeout`; 0: none).
    first_request_timeout: Duration,
    /// Closed after this long with no request in progress (`-idle-timeout`; 0: never).
    idle_timeout: Duration,
}

/// Requests in progress on one connection (until their response body is done with) and when
/// the last one ended: what `-idle-timeout` measures.
struct Activity {
    active: AtomicUsize,
    /// Milliseconds from `born` to the end of the last request.
    last_end_ms: AtomicU64,
    born: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Resolves once no request has been in progress for `limit` (never with a zero limit).
    async fn idle_for(&self, limit: Duration) {
        if limit.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let wait = if self.active.load(Ordering::Relaxed) > 0 {
                limit
            } else {
                let since = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
                let idle = self.born.elapsed().saturating_sub(since);
                if idle >= limit {
                    return;
                }
                limit - idle
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// One request in progress on its connection, until dropped.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let a = &self.0;
        let now = u64::try_from(a.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.store(now, Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in progress until hyper is done with it.
struct Active {
    body: ProxyBody,
    _guard: InProgress,
}

impl hyper::body::Body for Active {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Connection {
    async fn serve(self, stream: TcpStream, remote: SocketAddr) {
        let Connection {
            ranks,
            rank,
            builder,
            acceptor,
            watcher,
            mut draining,
            first_request_timeout,
            idle_timeout,
        } = self;
        let started = Arc::new(AtomicBool::new(false));
        let first_request = Arc::new(Notify::new());
        let activity = Arc::new(Activity::new());
        let service = {
            let (ranks, started, activity) = (ranks.clone(), started.clone(), activity.clone());
            let first_request = first_request.clone();
            service_fn(move |req| {
                if !started.swap(true, Ordering::Relaxed) {
                    first_request.notify_one();
                }
                let ranks = ranks.clone();
                // Counted from here, so a long prefill or generation before the response head
                // is in progress too; ends with the response body (or the dropped handler).
                let guard = InProgress::begin(activity.clone());
                async move {
                    let resp = ranks.handle(req, remote, rank).await;
                    Ok::<_, Infallible>(resp.map(|body| {
                        body::boxed(Active {
                            body,
                            _guard: guard,
                        })
                    }))
                }
            })
        };
        let served = async {
            match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream = match crate::runtime::within(
                        first_request_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            debug!(error = %e, client = %remote, "TLS handshake failed");
                            return Ok(());
                        }
                        Err(_) => {
                            debug!(client = %remote, "TLS handshake timed out");
                            return Ok(());
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            }
        };
        tokio::pin!(served);
        // Until its first request, a connection is bounded by the header read timeout (hyper's
        // own covers HTTP/1 heads once bytes arrive, not a silent connection, the protocol
        // detection or the HTTP/2 handshake) and by the drain. From its first request on, by
        // -idle-timeout: the time with no request in progress (HTTP/2 has no idle bound of
        // its own, so idle connections would keep their -max-connections slot).
        let watch = async {
            let deadline = async {
                match crate::runtime::limit(first_request_timeout) {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let cut = tokio::select! {
                () = first_request.notified() => None,
                () = deadline => Some("no_request_in_time"),
                _ = draining.wait_for(|d| *d) => Some("draining"),
            };
            match cut {
                Some(reason) if !started.load(Ordering::Relaxed) => reason,
                _ => {
                    activity.idle_for(idle_timeout).await;
                    "idle"
                }
            }
        };
        let result = tokio::select! {
            result = &mut served => result,
            reason = watch => {
                if reason == "no_request_in_time" {
                    ranks.primary().metrics.connection_refused(reason);
                }
                return debug!(client = %remote, reason, "connection closed");
            }
        };
        if let Err(e) = result {
            if e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse_too_large)
            {
                ranks.primary().metrics.connection_refused("head_too_large");
            }
            debug!(error = %e, client = %remote, "connection ended with an error");
        }
    }
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

/// As [`shutdown_signal`], for a drain in two steps: the first future resolves on the first
/// SIGTERM or SIGINT, the second on the next one (which cuts `-drain-delay` short: Ctrl-C
/// twice hurries). SIGHUP is logged and ignored throughout. The handlers are installed when
/// this is called. Must be called inside the runtime.
pub fn shutdown_signals() -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let (seen, signals) = watch::channel(0u32);
    #[cfg(unix)]
    let counting = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        async move {
            loop {
                tokio::select! {
                    () = next_signal(&mut term) => seen.send_modify(|n| *n += 1),
                    () = next_signal(&mut int) => seen.send_modify(|n| *n += 1),
                    () = next_signal(&mut hup) => info!("SIGHUP ignored (SIGTERM drains and exits)"),
                    () = seen.closed() => return,
                }
            }
        }
    };
    #[cfg(not(unix))]
    let counting = async move {
        loop {
            tokio::select! {
                got = tokio::signal::ctrl_c() => match got {
                    Ok(()) => seen.send_modify(|n| *n += 1),
                    Err(_) => std::future::pending().await,
                },
                () = seen.closed() => return,
            }
        }
    };
    // Counts signals until both futures below are gone; holds nothing else.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(counting);
    let after = |n: u32| {
        let mut signals = signals.clone();
        async move {
            // An error means the counter is gone (the runtime is ending): stop waiting.
            let _ = signals.wait_for(|seen| *seen >= n).await;
        }
    };
    (after(1), after(2))
}

/// The next delivery of `signal`; never, for a handler that could not be installed.
#[cfg(unix)]
async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(signal) = signal {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
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
