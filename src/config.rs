//! The validated configuration the server runs with, built from the flags before any port is
//! bound, so a bad value fails at start with the flag named.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::cli::Args;
use crate::connector::Connector;
use crate::logging::LogFormat;
use crate::metrics::Metrics;
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
    /// Where the admin listener (/metrics, /health) binds; `None` with `-metrics-port=0`.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// The metrics the proxy reports to and the admin listener serves.
    pub metrics: Metrics,
}

impl Config {
    /// A configuration for a decoder at `decoder` (`host:port`), with every other setting
    /// at its default. For embedding and tests.
    pub fn new(decoder: &str, connector: Connector) -> Result<Self, String> {
        let args = crate::cli::parse_from(["sidecar", "-connector", connector.name()])
            .map_err(|e| e.to_string())?;
        let mut config = Config::try_from(args)?;
        config.decoder = Target::http(
            decoder
                .parse()
                .map_err(|_| format!("'{decoder}' is not host:port"))?,
        );
        Ok(config)
    }
}

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(args: Args) -> Result<Self, String> {
        // Flags accepted for compatibility with the Go sidecar whose features this build
        // lacks: refusing to start beats silently serving without TLS or SSRF protection.
        let unsupported = [
            (args.secure_proxy, "-secure-proxy"),
            (args.prefiller_use_tls, "-prefiller-use-tls"),
            (args.decoder_use_tls, "-decoder-use-tls"),
            (args.enable_ssrf_protection, "-enable-ssrf-protection"),
        ];
        if let Some((_, flag)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!(
                "{flag}=true is not supported by this build yet; run with {flag}=false"
            ));
        }
        let host = match args.vllm_host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => args.vllm_host.clone(),
        };
        let authority = format!("{host}:{}", args.vllm_port)
            .parse()
            .map_err(|_| format!("-vllm-host '{}' is not a valid host", args.vllm_host))?;
        Ok(Config {
            listen: SocketAddr::new(args.bind_address, args.port),
            decoder: Target::http(authority),
            connector: args.connector,
            max_body_bytes: args.max_request_body_size,
            connect_timeout: args.connect_timeout,
            drain_timeout: args.drain_timeout,
            verbosity: args.verbosity,
            metrics_listen: (args.metrics_port != 0)
                .then(|| SocketAddr::new(args.bind_address, args.metrics_port)),
            log_format: args.log_format,
            metrics: Metrics::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, String> {
        let args = crate::cli::parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(args)
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
    fn unsupported_features_refuse_to_start() {
        let e = config(&["-secure-proxy"]).unwrap_err();
        assert!(e.contains("-secure-proxy"), "{e}");
        assert!(config(&["-secure-proxy=false"]).is_ok());
    }
}
