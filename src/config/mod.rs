//! The validated configuration the server runs with, built from the flags before any port is
//! bound, so a bad value fails at start with the flag named. The compatibility rules (renamed
//! pairs, profile defaults, unbuilt features) are in `compat.rs`.

pub mod compat;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Parsed;
use crate::connector::{Connector, PairingPorts};
use crate::encode::EcConnector;
use crate::observe::logging::LogSettings;
use crate::observe::otel::settings::{self as otel_settings, Settings as TracingSettings};
pub use crate::pd::{PrefillFailurePolicy, RetryPolicy};
use crate::security::allowlist::Rule;
use crate::security::inference_pool::PoolApi;
use crate::security::tls::ClientTls;
use crate::upstream::Target;

/// Idle connections kept per upstream when `-max-idle-conns-per-host` is 0 or less. Each holds
/// about 16 KiB of buffers; 256 covers vLLM's default batch (`max_num_seqs`) with no
/// reconnects, without leaving a burst's worth of idle connections behind.
pub const DEFAULT_MAX_IDLE_PER_HOST: usize = 256;

/// Everything the server needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sidecar listens.
    pub listen: SocketAddr,
    /// The local vLLM decode server (with data parallelism, rank 0).
    pub decoder: Target,
    /// `-data-parallel-size` > 1: the decoders of ranks 1.. (rank i on the model-server port
    /// plus i), each served on the listener port plus i. Empty without data parallelism.
    pub rank_decoders: Vec<Target>,
    pub connector: Connector,
    /// Request bodies on P/D routes (and inference routes passed through, unless
    /// `trust_client_kv_params`) larger than this get 413.
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// After SIGTERM, how long requests are still served (with `/readyz` at 503) before the
    /// drain starts (`-drain-delay`; 0: at once).
    pub drain_delay: Duration,
    /// How often vLLM's `/health` is checked for `/readyz` (`-readiness-interval`; positive).
    pub readiness_interval: Duration,
    pub log: LogSettings,
    pub prefill_timeout: Duration,
    pub decode_first_byte_timeout: Duration,
    pub prefill_failure_policy: PrefillFailurePolicy,
    pub prefill_retry: RetryPolicy,
    pub prefiller_breaker: crate::pd::BreakerPolicy,
    /// `-tokenize-once`.
    pub tokenize_once: bool,
    /// Pick the prefiller at random from the header's list (`-enable-prefiller-sampling`).
    pub prefiller_sampling: bool,
    /// 0: no limit.
    pub max_in_flight: usize,
    pub max_idle_per_host: usize,
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    /// Most headers per request (`-max-header-count`).
    pub max_header_count: usize,
    /// Most client connections at once; 0: no limit.
    pub max_connections: usize,
    /// A connection with no request in progress this long is closed; 0: never.
    pub idle_timeout: Duration,
    /// SSRF protection: `None` when off.
    pub ssrf: Option<SsrfConfig>,
    /// How long an abandoned decode may stay open to be admitted (see `pd/handoff.rs`).
    pub decode_admission_grace: Duration,
    /// How long an abandoned prefill vLLM received may run on (see `pd/handoff.rs`).
    pub prefill_abandon_grace: Duration,
    /// Serve TLS (`-secure-proxy`): `Some(cert dir)` or `Some(None)` for a self-signed cert.
    pub server_tls: Option<Option<PathBuf>>,
    pub cert_reload_interval: Duration,
    /// Use TLS to prefillers named without a scheme.
    pub prefiller_use_tls: bool,
    /// Use TLS to encoders named without a scheme (`-enable-tls=encoder`).
    pub encoder_use_tls: bool,
    /// `-ec-connector`: what encoder calls are for, when `x-encoder-hosts-ports` names any.
    pub ec_connector: Option<EcConnector>,
    /// `-decode-chunk-size`: chat decodes run as requests of at most this many tokens; 0: off.
    pub decode_chunk_size: u32,
    pub prefiller_tls: ClientTls,
    pub decoder_tls: ClientTls,

    /// Runtime threads; `None` means one per available core.
    pub worker_threads: Option<usize>,
    /// Busy-polling window (`-busy-poll`); zero when off.
    pub busy_poll: Duration,
    /// Where the admin listener (/metrics, /health) binds; `None` with `-metrics-port=0`.
    pub metrics_listen: Option<SocketAddr>,
    /// The metrics port was left at its default: failing to bind it does not stop serving.
    pub metrics_port_defaulted: bool,
    /// A request's `x-kv-cache-source-host-port` peer is pulled from: always with the
    /// offloading connector, with `-enable-p2p-pull` for nixlv2 (vLLM's MultiConnector).
    pub p2p_pull: bool,
    /// `POD_IP` (`-pod-ip`): `POD_IP:<a listener's port>` names this sidecar, as a KV cache
    /// source or in `x-data-parallel-host-port`.
    pub pod_ip: Option<IpAddr>,
    /// `-rewrite-cached-tokens`.
    pub rewrite_cached_tokens: bool,
    /// `-trust-client-kv-params`: the client's transfer parameters reach vLLM as sent.
    pub trust_client_kv_params: bool,
    /// The prefill pod's ports the sglang, offloading and mooncake connectors name.
    pub pairing_ports: PairingPorts,
    /// Tracing, from the `OTEL_*` environment, `-tracing` and `-otlp-endpoint` (`None`: off).
    pub tracing: Option<TracingSettings>,
    /// Whose defaults apply, for the startup log line.
    pub defaults: String,
    /// Flags accepted that have no effect here, logged at startup.
    pub notices: Vec<String>,
}

/// What SSRF protection allows.
#[derive(Debug, Clone)]
pub struct SsrfConfig {
    /// `-allowed-prefillers`.
    pub rules: Vec<Rule>,
    /// The InferencePool `(namespace, name)` whose pods are allowed, with `-enable-ssrf-protection`.
    pub inference_pool: Option<(String, String)>,
    pub pool_api: PoolApi,
}

/// A flag value that parses but cannot be used; each message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("-{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    /// A pd-sidecar feature another piece of work builds; refused rather than ignored.
    #[error("{flag}: {what} is not built in this sidecar yet")]
    NotBuilt { flag: String, what: &'static str },
    #[error("-tls-ca-file {0} is not a readable file")]
    CaFileUnreadable(String),
    #[error("-cert-path {dir}: {file} is missing")]
    CertFileMissing { dir: String, file: &'static str },
    #[error("-vllm-host '{0}' is not a valid host")]
    BadVllmHost(String),
    #[error("-max-header-size must be at least 8KiB")]
    HeaderLimitTooSmall,
    #[error("-allowed-prefillers: {0}")]
    BadAllowRule(String),
    #[error(
        "-enable-ssrf-protection needs -inference-pool (or INFERENCE_POOL), or the older \
         -inference-pool-namespace and -inference-pool-name"
    )]
    NoInferencePool,
    /// `-otlp-endpoint` (the message names it).
    #[error("{0}")]
    BadOtlpEndpoint(String),
    /// [`Config::new`]'s decoder address.
    #[error("'{0}' is not host:port")]
    NotHostPort(String),
    /// [`Config::new`]'s flags (never expected: they are built in).
    #[error("{0}")]
    Flags(String),
}

impl Config {
    /// A configuration for a decoder at `decoder` (`host:port`), with every other setting
    /// at its default. For embedding and tests.
    pub fn new(decoder: &str, connector: Connector) -> Result<Self, ConfigError> {
        let parsed = crate::cli::parse_from(["sidecar", "-connector", connector.name()])
            .map_err(|e| ConfigError::Flags(e.to_string()))?;
        let mut config = Config::try_from(parsed)?;
        config.decoder = Target::http(
            decoder
                .parse()
                .map_err(|_| ConfigError::NotHostPort(decoder.to_string()))?,
        );
        Ok(config)
    }
}

/// Ports `start..start+ranks` must all be valid (a data-parallel rank i uses `start+i`).
fn check_port_range(flag: &'static str, start: u16, ranks: u32) -> Result<(), ConfigError> {
    let end = u32::from(start) + ranks.saturating_sub(1);
    if end > u32::from(u16::MAX) {
        return Err(ConfigError::Invalid {
            flag,
            reason: format!("port range {start}-{end} exceeds 65535"),
        });
    }
    Ok(())
}

impl TryFrom<Parsed> for Config {
    type Error = ConfigError;

    fn try_from(parsed: Parsed) -> Result<Self, ConfigError> {
        let defaults = compat::defaults(&parsed.profile);
        let connector = compat::connector(&parsed)?;
        let (port_flag, model_server_port) = compat::model_server_port(&parsed);
        let args = &parsed.args;
        let ranks = args.data_parallel_size;
        if args.tokenize_once && connector != Connector::NixlV2 {
            // Only nixlv2's decode leg carries the prefiller's kv_transfer_params as they are.
            return Err(ConfigError::Invalid {
                flag: "tokenize-once",
                reason: format!(
                    "needs -connector=nixlv2 (the decoder gets the token ids in \
                     kv_transfer_params), not {}",
                    connector.name()
                ),
            });
        }
        if args.port == 0 && ranks > 1 {
            return Err(ConfigError::Invalid {
                flag: "port",
                reason: "0 (any free port) cannot serve several data-parallel ranks".into(),
            });
        }
        check_port_range("port", args.port, ranks)?;
        check_port_range(port_flag, model_server_port, ranks)?;
        check_port_range("p2p-connector-port", args.p2p_connector_port, ranks)?;
        let otlp_endpoint = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty());
        if let Some(e) = otlp_endpoint {
            check_otlp_endpoint(e).map_err(ConfigError::BadOtlpEndpoint)?;
        }
        // The OpenTelemetry variables are the process's: read once, here.
        let tracing = otel_settings::resolve(
            &|name| std::env::var(name).ok(),
            otel_settings::Flags {
                tracing: args.tracing,
                otlp_endpoint,
            },
        );
        let mut notices = compat::notices(&parsed);
        notices.extend(tracing.notices);
        if args.prefill_max_retries > 0 && args.prefill_retry_backoff.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "prefill-retry-backoff",
                reason: "must be positive when -prefill-max-retries > 0".into(),
            });
        }
        // Zero would close an abandoned decode before it is admitted, or poll without pause.
        for (flag, value) in [
            ("decode-admission-grace", args.decode_admission_grace),
            ("cert-reload-interval", args.cert_reload_interval),
            ("readiness-interval", args.readiness_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: "must be positive".into(),
                });
            }
        }
        compat::refuse_unbuilt(&parsed)?;
        let (ec_connector, decode_chunk_size) = compat::encode_and_chunking(&parsed)?;
        let tls = compat::leg_tls(&parsed);

        let ca_file = args.tls_ca_file.as_ref().map(PathBuf::from);
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                return Err(ConfigError::CaFileUnreadable(ca.display().to_string()));
            }
        }
        let cert_path = args
            .cert_path
            .as_ref()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let secure_proxy = args.secure_proxy.unwrap_or(defaults.secure_proxy);
        if let (true, Some(dir)) = (secure_proxy, &cert_path) {
            for f in ["tls.crt", "tls.key"] {
                if !dir.join(f).is_file() {
                    return Err(ConfigError::CertFileMissing {
                        dir: dir.display().to_string(),
                        file: f,
                    });
                }
            }
        }
        let host = match args.vllm_host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => args.vllm_host.clone(),
        };
        // Rank i's decoder is on the model-server port plus i (the range was checked above).
        let decoder_at = |rank: u32| -> Result<Target, ConfigError> {
            let port = model_server_port + rank as u16;
            let authority = format!("{host}:{port}")
                .parse()
                .map_err(|_| ConfigError::BadVllmHost(args.vllm_host.clone()))?;
            Ok(Target::new(authority, tls.decoder))
        };
        let ssrf = ssrf_config(&parsed)?;
        if args.max_header_size < 8192 {
            return Err(ConfigError::HeaderLimitTooSmall);
        }
        let metrics_port = args.metrics_port.unwrap_or(compat::DEFAULT_METRICS_PORT);
        Ok(Config {
            prefill_timeout: args.prefill_timeout,
            decode_first_byte_timeout: args.decode_first_byte_timeout,
            prefill_failure_policy: args.prefill_failure_policy,
            prefill_retry: RetryPolicy {
                max_retries: args.prefill_max_retries,
                backoff: args.prefill_retry_backoff,
            },
            prefiller_breaker: crate::pd::BreakerPolicy {
                failures: args.prefiller_breaker_failures,
                backoff: args.prefiller_breaker_backoff,
                ..crate::pd::BreakerPolicy::default()
            },
            prefiller_sampling: args.enable_prefiller_sampling,
            tokenize_once: args.tokenize_once,
            max_in_flight: args.max_in_flight,
            max_idle_per_host: usize::try_from(args.max_idle_conns_per_host)
                .ok()
                .filter(|n| *n > 0)
                .unwrap_or(DEFAULT_MAX_IDLE_PER_HOST),
            header_read_timeout: args.header_read_timeout,
            max_header_size: args.max_header_size,
            max_header_count: args.max_header_count as usize,
            max_connections: args.max_connections as usize,
            idle_timeout: args.idle_timeout,
            ssrf,
            decode_admission_grace: args.decode_admission_grace,
            prefill_abandon_grace: args.prefill_abandon_grace,
            server_tls: secure_proxy.then_some(cert_path),
            cert_reload_interval: args.cert_reload_interval,
            prefiller_use_tls: tls.prefiller,
            encoder_use_tls: tls.encoder,
            ec_connector,
            decode_chunk_size,
            prefiller_tls: ClientTls {
                insecure_skip_verify: tls.prefiller_skip_verify,
                ca_file: ca_file.clone(),
            },
            decoder_tls: ClientTls {
                insecure_skip_verify: tls.decoder_skip_verify,
                ca_file,
            },
            listen: SocketAddr::new(args.bind_address, args.port),
            rank_decoders: (1..ranks).map(decoder_at).collect::<Result<_, _>>()?,
            decoder: decoder_at(0)?,
            connector,
            max_body_bytes: args.max_request_body_size,
            connect_timeout: args.connect_timeout,
            drain_timeout: args.drain_timeout,
            drain_delay: args.drain_delay,
            readiness_interval: args.readiness_interval,
            log: compat::log_settings(&parsed, defaults),
            worker_threads: args.worker_threads.map(usize::from),
            busy_poll: args.busy_poll,
            metrics_listen: (metrics_port != 0)
                .then(|| SocketAddr::new(args.bind_address, metrics_port)),
            metrics_port_defaulted: !parsed.is_set("metrics-port"),
            p2p_pull: connector == Connector::Offloading
                || (args.enable_p2p_pull && connector == Connector::NixlV2),
            pod_ip: args.pod_ip,
            rewrite_cached_tokens: args.rewrite_cached_tokens,
            trust_client_kv_params: args.trust_client_kv_params,
            pairing_ports: PairingPorts {
                sglang_bootstrap: args.sglang_bootstrap_port,
                p2p: args.p2p_connector_port,
                mooncake_bootstrap: args.mooncake_bootstrap_port,
            },
            tracing: tracing.settings,
            defaults: compat::describe(&parsed.profile),
            notices,
        })
    }
}

/// `-otlp-endpoint` is a collector's base URL: `http(s)://host[:port][/path]`.
fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("-otlp-endpoint '{endpoint}': {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(format!(
            "-otlp-endpoint '{endpoint}' must be an http(s):// URL"
        )),
    }
}

fn ssrf_config(parsed: &Parsed) -> Result<Option<SsrfConfig>, ConfigError> {
    let args = &parsed.args;
    let rules = args
        .allowed_prefillers
        .iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.parse::<Rule>().map_err(ConfigError::BadAllowRule))
        .collect::<Result<Vec<_>, _>>()?;
    // Checked even when SSRF protection is off, so a typo fails now, not when it is turned on.
    let pool = compat::inference_pool(parsed)?;
    let inference_pool = if args.enable_ssrf_protection {
        Some(pool.ok_or(ConfigError::NoInferencePool)?)
    } else {
        None
    };
    if rules.is_empty() && inference_pool.is_none() {
        return Ok(None);
    }
    Ok(Some(SsrfConfig {
        rules,
        inference_pool,
        pool_api: args.pool_group,
    }))
}

#[cfg(test)]
mod tests;
