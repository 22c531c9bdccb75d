//! Assembly: everything fallible built from a [`Config`] (SSRF allowlist and its Kubernetes
//! watch, TLS material, upstream clients, the proxy), before `main` binds a port, so a bad
//! certificate or an unreachable API server fails the start with nothing half-open.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::info;

use crate::config::Config;
use crate::data_parallel::Ranks;
use crate::observe::metrics::Metrics;
use crate::observe::otel::Tracing;
use crate::pd::PdContext;
use crate::proxy::{HeadLimits, Proxy};
use crate::readiness::Readiness;
use crate::routing::Pick;
use crate::runtime::busy_poll::BusyPoll;
use crate::runtime::AbortOnDrop;
use crate::security::allowlist::Allowlist;
use crate::security::inference_pool;
use crate::security::tls::ServerTls;
use crate::server;
use crate::upstream::{Decoder, Upstream};

/// How long the last spans may take to export at shutdown: at most, and at least (when the
/// drain used up its time).
const SPAN_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);
const SPAN_FLUSH_MIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Why the sidecar could not start. Each message names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// `-enable-ssrf-protection` needs the Kubernetes API to watch the InferencePool.
    #[error("-enable-ssrf-protection: no Kubernetes API: {0}")]
    NoKubeApi(String),
    /// A TLS file or setting cannot be used (the message names the flag).
    #[error("{0}")]
    Tls(String),
}

/// The assembled sidecar, ready to serve on a listener.
pub struct App {
    config: Config,
    /// One per data-parallel rank (index = rank); one without data parallelism.
    proxies: Vec<Proxy>,
    metrics: Metrics,
    server_tls: Option<Arc<ServerTls>>,
    /// The InferencePool watch; it stops when the App is dropped (after serving ends).
    _pool_watch: Option<AbortOnDrop>,
    /// `/readyz`, and the task checking vLLM's `/health` for it (stops with the App).
    readiness: Readiness,
    _readiness_watch: AbortOnDrop,
}

impl App {
    /// Builds the sidecar; the Kubernetes client, if SSRF protection needs one, comes from the
    /// in-cluster service account or the kubeconfig.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        Self::build_with_kube_api(config, None).await
    }

    /// As [`App::build`], with the Kubernetes API server at `kube_api` when given (tests run a
    /// fake one).
    pub async fn build_with_kube_api(
        config: Config,
        kube_api: Option<&str>,
    ) -> Result<App, StartupError> {
        let metrics = Metrics::for_connector(config.connector);
        let busy_poll = BusyPoll::start(config.busy_poll);
        let upstream = Upstream::with_tls(
            config.connect_timeout,
            config.max_idle_per_host,
            &config.prefiller_tls,
            &config.decoder_tls,
        )
        .map_err(StartupError::Tls)?
        .with_busy_poll(busy_poll.clone());
        let server_tls = match &config.server_tls {
            None => None,
            Some(cert_dir) => Some(Arc::new(
                ServerTls::new(cert_dir.as_deref()).map_err(StartupError::Tls)?,
            )),
        };
        let (allowlist, pool_watch) = allowlist(&config, kube_api).await?;
        let tracing = config.tracing.as_ref().and_then(|settings| {
            // The collector is not an upstream: its client has default TLS settings.
            let client = Upstream::new(config.connect_timeout);
            match Tracing::start(settings, client, metrics.clone(), server_tls.is_some()) {
                Ok(tracing) => {
                    info!(
                        endpoint = %settings.endpoint,
                        protocol = ?settings.protocol,
                        sampler = ?settings.sampler,
                        "tracing on"
                    );
                    Some(tracing)
                }
                // An observability setting must not take the data path down (the flag's URL
                // was checked already; this is the environment's).
                Err(e) => {
                    tracing::warn!(endpoint = %settings.endpoint, "{e}; tracing is off");
                    None
                }
            }
        });
        let in_flight = (config.max_in_flight > 0).then(|| {
            (
                Arc::new(Semaphore::new(config.max_in_flight)),
                config.max_in_flight,
            )
        });
        let bootstraps = Arc::<crate::pd::Bootstraps>::default();
        let readiness = Readiness::new(metrics.clone());
        let breakers = Arc::new(crate::pd::Breakers::new(
            config.prefiller_breaker,
            config.prefill_timeout,
            metrics.clone(),
        ));
        // One proxy per data-parallel rank: its own decoder, everything else shared (the
        // upstream client, so one pool per upstream; the metrics; the admission limit).
        let rank = |target: &crate::upstream::Target| {
            let decoder = Arc::new(Decoder::new(
                target.clone(),
                upstream.clone(),
                config.decode_first_byte_timeout,
                config.connect_timeout,
            ));
            Proxy {
                pd: PdContext {
                    connector: config.connector,
                    decoder: Arc::clone(&decoder),
                    upstream: upstream.clone(),
                    max_body_bytes: config.max_body_bytes,
                    prefill_timeout: config.prefill_timeout,
                    prefill_failure_policy: config.prefill_failure_policy,
                    prefill_retry: config.prefill_retry,
                    breakers: Arc::clone(&breakers),
                    tokenize_once: config.tokenize_once,
                    decode_admission_grace: config.decode_admission_grace,
                    late_reply_window: config.prefill_abandon_grace,
                    metrics: metrics.clone(),
                    pairing_ports: config.pairing_ports,
                    bootstraps: Arc::clone(&bootstraps),
                    rewrite_cached_tokens: config.rewrite_cached_tokens,
                    trust_client_kv_params: config.trust_client_kv_params,
                    ec_connector: config.ec_connector,
                    decode_chunk_size: config.decode_chunk_size,
                },
                decoder,
                pick: Pick {
                    tls: config.prefiller_use_tls,
                    sampling: config.prefiller_sampling,
                    p2p_pull: config.p2p_pull,
                    // Set to the listener's port by `serve_ranks`.
                    own: None,
                    encode: config.ec_connector.is_some(),
                    encoder_tls: config.encoder_use_tls,
                    chunked: config.decode_chunk_size > 0,
                },
                allowlist: allowlist.clone(),
                busy_poll: busy_poll.clone(),
                in_flight: in_flight.clone(),
                metrics: metrics.clone(),
                tracing: tracing.clone(),
                limits: HeadLimits {
                    max_header_count: config.max_header_count,
                    max_header_size: config.max_header_size,
                },
                readiness: readiness.clone(),
            }
        };
        let proxies: Vec<Proxy> = std::iter::once(&config.decoder)
            .chain(&config.rank_decoders)
            .map(rank)
            .collect();
        // The first check runs now: until it answers, the sidecar is not ready.
        let readiness_watch = readiness.watch(
            proxies.iter().map(|p| Arc::clone(&p.decoder)).collect(),
            config.readiness_interval,
        );
        Ok(App {
            config,
            proxies,
            metrics,
            server_tls,
            _pool_watch: pool_watch,
            readiness,
            _readiness_watch: readiness_watch,
        })
    }

    /// The metrics this sidecar reports to (served by `observe::admin`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What `/readyz` answers (served by `observe::admin` too).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// How many listeners [`App::serve_ranks`] takes: `-data-parallel-size`.
    pub fn ranks(&self) -> usize {
        self.proxies.len()
    }

    /// Serves `listener` until `shutdown` resolves, then drains (see `server.rs`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_ranks(vec![listener], shutdown).await
    }

    /// Serves data-parallel rank i on `listeners[i]` (one per rank) until `shutdown`
    /// resolves, then drains them together.
    pub async fn serve_ranks(
        self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_ranks_with(listeners, shutdown, std::future::pending())
            .await
    }

    /// As [`App::serve_ranks`]: when `shutdown` resolves, `/readyz` turns 503 and requests
    /// are still served for `-drain-delay`, unless `hurry` (the second SIGTERM/SIGINT, see
    /// [`server::shutdown_signals`]) resolves first; then the drain runs.
    pub async fn serve_ranks_with(
        mut self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()>,
        hurry: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        if listeners.len() != self.proxies.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} listeners for {} data-parallel ranks",
                    listeners.len(),
                    self.proxies.len()
                ),
            ));
        }
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let pod_ip = self.config.pod_ip;
        // The scheduler names this pod by its configured ports (a listener bound to port 0
        // has only the one it was given).
        let configured = self.config.listen.port();
        for (i, (proxy, port)) in self.proxies.iter_mut().zip(&ports).enumerate() {
            let port = match configured {
                0 => *port,
                base => base.saturating_add(i as u16),
            };
            proxy.pick.own = pod_ip.map(|ip| std::net::SocketAddr::new(ip, port));
        }
        let ranks = Arc::new(Ranks::new(
            std::mem::take(&mut self.proxies),
            &ports,
            pod_ip,
        ));
        let drain_began = Arc::new(std::sync::OnceLock::new());
        let began = Arc::clone(&drain_began);
        let (readiness, delay) = (self.readiness.clone(), self.config.drain_delay);
        let shutdown = async move {
            shutdown.await;
            readiness.begin_drain();
            if !delay.is_zero() {
                info!(
                    drain_delay = ?delay,
                    "shutting down: /readyz answers 503; serving as usual for -drain-delay"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => info!("drain delay over"),
                    () = hurry => info!("second signal: drain delay cut short"),
                }
            }
            let _ = began.set(tokio::time::Instant::now());
        };
        let served = server::run(
            &self.config,
            Arc::clone(&ranks),
            self.server_tls.clone(),
            listeners,
            shutdown,
        )
        .await;
        // After the drain every request span has ended: export the last batch in what is left
        // of the drain's time (Kubernetes' grace period is sized for it), at least a moment.
        if let Some(tracing) = &ranks.primary().tracing {
            let left = drain_began.get().map_or(SPAN_FLUSH, |began| {
                (*began + self.config.drain_timeout)
                    .saturating_duration_since(tokio::time::Instant::now())
            });
            let within = left.clamp(SPAN_FLUSH_MIN, SPAN_FLUSH);
            if !tracing.shutdown(within).await {
                tracing::warn!("spans still queued after {within:?} were not exported");
            }
        }
        served
    }
}

/// The SSRF allowlist, and the task that keeps it current from the InferencePool.
async fn allowlist(
    config: &Config,
    kube_api: Option<&str>,
) -> Result<(Allowlist, Option<AbortOnDrop>), StartupError> {
    let Some(ssrf) = &config.ssrf else {
        return Ok((Allowlist::disabled(), None));
    };
    let Some((namespace, name)) = &ssrf.inference_pool else {
        return Ok((Allowlist::new(ssrf.rules.clone(), None), None));
    };
    let client = kube_client(kube_api)
        .await
        .map_err(StartupError::NoKubeApi)?;
    let (pool, task) =
        inference_pool::spawn(client, namespace.clone(), name.clone(), ssrf.pool_api);
    info!(namespace = %namespace, pool = %name, "SSRF protection: watching the InferencePool");
    Ok((Allowlist::new(ssrf.rules.clone(), Some(pool)), Some(task)))
}

/// A client for `url`, or from the in-cluster service account or kubeconfig.
async fn kube_client(url: Option<&str>) -> Result<kube::Client, String> {
    match url {
        Some(url) => {
            let uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
            kube::Client::try_from(kube::Config::new(uri)).map_err(|e| e.to_string())
        }
        None => kube::Client::try_default().await.map_err(|e| e.to_string()),
    }
}
