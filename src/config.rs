//! The validated configuration the server runs with, built from the flags before any port is
//! bound, so a bad value fails at start with the flag named.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Args;
use crate::connector::Connector;
use crate::observe::logging::LogFormat;
pub use crate::pd::PrefillFailurePolicy;
use crate::security::allowlist::Rule;
use crate::security::inference_pool::PoolApi;
use crate::security::tls::ClientTls;
use crate::upstream::Target;

/// Everything the server needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sidecar listens.
    pub listen: SocketAddr,
    /// The local vLLM decode server.
    pub decoder: Target,
    pub connector: Connector,
    /// Request bodies on P/D routes larger than this get 413.
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// klog-style verbosity.
    pub verbosity: u8,
    pub prefill_timeout: Duration,
    pub decode_first_byte_timeout: Duration,
    pub prefill_failure_policy: PrefillFailurePolicy,
    /// 0: no limit.
    pub max_in_flight: usize,
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    /// SSRF protection: `None` when off.
    pub ssrf: Option<SsrfConfig>,
    /// How long an abandoned decode may stay open to be admitted (see `pd/handoff.rs`).
    pub decode_admission_grace: Duration,
    /// Serve TLS (`-secure-proxy`): `Some(cert dir)` or `Some(None)` for a self-signed cert.
    pub server_tls: Option<Option<PathBuf>>,
    pub cert_reload_interval: Duration,
    /// Use TLS to prefillers named without a scheme.
    pub prefiller_use_tls: bool,
    pub prefiller_tls: ClientTls,
    pub decoder_tls: ClientTls,

    /// Runtime threads; `None` means one per available core.
    pub worker_threads: Option<usize>,
    /// Busy-polling window (`-busy-poll`); zero when off.
    pub busy_poll: Duration,
    /// Where the admin listener (/metrics, /health) binds; `None` with `-metrics-port=0`.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// OTLP/HTTP collector for spans (`-otlp-endpoint`), checked.
    pub otlp_endpoint: Option<String>,
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
        "-enable-ssrf-protection needs -inference-pool-namespace and -inference-pool-name \
         (or INFERENCE_POOL_NAMESPACE and INFERENCE_POOL_NAME)"
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
        let args = crate::cli::parse_from(["sidecar", "-connector", connector.name()])
            .map_err(|e| ConfigError::Flags(e.to_string()))?;
        let mut config = Config::try_from(args)?;
        config.decoder = Target::http(
            decoder
                .parse()
                .map_err(|_| ConfigError::NotHostPort(decoder.to_string()))?,
        );
        Ok(config)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
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
        if let (true, Some(dir)) = (args.secure_proxy, &cert_path) {
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
        let authority = format!("{host}:{}", args.vllm_port)
            .parse()
            .map_err(|_| ConfigError::BadVllmHost(args.vllm_host.clone()))?;
        let ssrf = ssrf_config(&args)?;
        if args.max_header_size < 8192 {
            return Err(ConfigError::HeaderLimitTooSmall);
        }
        Ok(Config {
            prefill_timeout: args.prefill_timeout,
            decode_first_byte_timeout: args.decode_first_byte_timeout,
            prefill_failure_policy: args.prefill_failure_policy,
            max_in_flight: args.max_in_flight,
            header_read_timeout: args.header_read_timeout,
            max_header_size: args.max_header_size,
            ssrf,
            decode_admission_grace: args.decode_admission_grace,
            server_tls: args.secure_proxy.then_some(cert_path),
            cert_reload_interval: args.cert_reload_interval,
            prefiller_use_tls: args.prefiller_use_tls,
            prefiller_tls: ClientTls {
                insecure_skip_verify: args.prefiller_tls_insecure_skip_verify,
                ca_file: ca_file.clone(),
            },
            decoder_tls: ClientTls {
                insecure_skip_verify: args.decoder_tls_insecure_skip_verify,
                ca_file,
            },
            listen: SocketAddr::new(args.bind_address, args.port),
            decoder: Target::new(authority, args.decoder_use_tls),
            connector: args.connector,
            max_body_bytes: args.max_request_body_size,
            connect_timeout: args.connect_timeout,
            drain_timeout: args.drain_timeout,
            verbosity: args.verbosity,
            worker_threads: args.worker_threads.map(usize::from),
            busy_poll: args.busy_poll,
            metrics_listen: (args.metrics_port != 0)
                .then(|| SocketAddr::new(args.bind_address, args.metrics_port)),
            log_format: args.log_format,
            otlp_endpoint: match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
                Some(e) => Some(
                    crate::observe::otlp::traces_uri(e)
                        .map(|_| e.to_string())
                        .map_err(ConfigError::BadOtlpEndpoint)?,
                ),
                None => None,
            },
        })
    }
}

fn ssrf_config(args: &Args) -> Result<Option<SsrfConfig>, ConfigError> {
    let rules = args
        .allowed_prefillers
        .iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.parse::<Rule>().map_err(ConfigError::BadAllowRule))
        .collect::<Result<Vec<_>, _>>()?;
    let inference_pool = if args.enable_ssrf_protection {
        let ns = args
            .inference_pool_namespace
            .clone()
            .filter(|s| !s.is_empty());
        let name = args.inference_pool_name.clone().filter(|s| !s.is_empty());
        match (ns, name) {
            (Some(ns), Some(name)) => Some((ns, name)),
            _ => return Err(ConfigError::NoInferencePool),
        }
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
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, String> {
        let args = crate::cli::parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn decoder_is_local_vllm_port() {
        let c = config(&["-vllm-port=8200"]).unwrap();
        assert_eq!(c.decoder.authority(), "localhost:8200");
        assert_eq!(c.listen.port(), 8000);
        let c = config(&["-vllm-host=::1"]).unwrap();
        assert_eq!(c.decoder.authority(), "[::1]:8001");
    }

    #[test]
    fn ssrf_protection_needs_a_pool_or_rules() {
        assert!(config(&[]).unwrap().ssrf.is_none());
        let e = config(&["-enable-ssrf-protection"]).unwrap_err();
        assert!(e.contains("-inference-pool-name"), "{e}");
        let c = config(&[
            "-enable-ssrf-protection",
            "-inference-pool-namespace=ns",
            "-inference-pool-name=pool",
        ])
        .unwrap();
        assert_eq!(
            c.ssrf.unwrap().inference_pool,
            Some(("ns".into(), "pool".into()))
        );
        let c = config(&["-allowed-prefillers=10.0.0.0/8:8000,prefill:8000"]).unwrap();
        assert_eq!(c.ssrf.unwrap().rules.len(), 2);
        assert!(config(&["-allowed-prefillers=10.0.0.0/99"]).is_err());
    }

    #[test]
    fn tls_flags_are_checked_at_start() {
        assert_eq!(config(&["-secure-proxy"]).unwrap().server_tls, Some(None));
        assert_eq!(config(&["-secure-proxy=false"]).unwrap().server_tls, None);
        let e = config(&["-secure-proxy", "-cert-path=/nonexistent"]).unwrap_err();
        assert!(e.contains("tls.crt"), "{e}");
        assert!(config(&["-tls-ca-file=/nonexistent"]).is_err());
        let c = config(&["-decoder-use-tls", "-decoder-tls-insecure-skip-verify"]).unwrap();
        assert!(c.decoder.uri(None).to_string().starts_with("https://"));
        assert!(c.decoder_tls.insecure_skip_verify && !c.prefiller_tls.insecure_skip_verify);
    }
}
