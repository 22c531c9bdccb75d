//! Command-line flags, spelled as the Go sidecar's manifests spell them.
//!
//! Go's `flag` package accepts `-name=value`, `-name value`, `--name=value` and bare booleans
//! (`-secure-proxy`, `-secure-proxy=false`). clap wants `--name`, so single-dash long flags
//! are rewritten before clap sees them. Flags are raw here; `config.rs` validates them.

use std::ffi::OsString;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::connector::Connector;
use crate::observe::logging::LogFormat;

/// P/D (prefill/decode disaggregation) routing sidecar for vLLM.
///
/// Runs next to a vLLM decode server. Completions carrying `x-prefiller-host-port` (or
/// `x-prefiller-url`) are prefilled on that server, then decoded locally; everything else
/// passes straight through to vLLM.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "llm-d-routing-sidecar",
    version,
    after_help = "Flags may be written Go-style too: -port=8000, -port 8000, -secure-proxy=false."
)]
pub struct Args {
    /// Port the sidecar listens on
    #[arg(long, default_value_t = 8000, value_name = "PORT")]
    pub port: u16,

    /// Port of the local vLLM (decode) server
    #[arg(long = "vllm-port", default_value_t = 8001, value_name = "PORT")]
    pub vllm_port: u16,

    /// Host of the local vLLM (decode) server
    #[arg(long = "vllm-host", default_value = "localhost", value_name = "HOST")]
    pub vllm_host: String,

    /// P/D connector: nixlv2 (vLLM NixlConnector), nixl (legacy llm-d v1) or lmcache
    #[arg(long, default_value = "nixlv2", value_parser = parse_connector, value_name = "NAME")]
    pub connector: Connector,

    /// Address the sidecar binds
    #[arg(long = "bind-address", default_value = "0.0.0.0", value_name = "IP")]
    pub bind_address: IpAddr,

    /// Largest request body accepted on P/D routes (bytes; KiB, MiB, GiB suffixes allowed)
    #[arg(long = "max-request-body-size", default_value = "32MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_request_body_size: usize,

    /// Time allowed to connect to an upstream (e.g. 5s, 500ms)
    #[arg(long = "connect-timeout", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests and streams may run before exit
    #[arg(long = "drain-timeout", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// Log verbosity, as klog's -v: 0-3 info, 4 debug (routing decisions), 5 trace (bodies).
    /// RUST_LOG, when set, takes precedence
    #[arg(long = "v", default_value_t = 0, value_name = "N")]
    pub verbosity: u8,

    /// Serve TLS on -port, with -cert-path's certificate or a self-signed one (the Go
    /// sidecar's default was true; ours is plain HTTP)
    #[arg(long = "secure-proxy", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub secure_proxy: bool,

    /// Directory holding tls.crt and tls.key for -secure-proxy
    #[arg(long = "cert-path", value_name = "DIR")]
    pub cert_path: Option<String>,

    /// Use TLS to prefillers
    #[arg(long = "prefiller-use-tls", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub prefiller_use_tls: bool,

    /// Use TLS to the decoder
    #[arg(long = "decoder-use-tls", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub decoder_use_tls: bool,

    /// Skip certificate verification to prefillers
    #[arg(long = "prefiller-tls-insecure-skip-verify", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub prefiller_tls_insecure_skip_verify: bool,

    /// Skip certificate verification to the decoder
    #[arg(long = "decoder-tls-insecure-skip-verify", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub decoder_tls_insecure_skip_verify: bool,

    /// Allow only prefillers of the InferencePool (SSRF protection)
    #[arg(long = "enable-ssrf-protection", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL")]
    pub enable_ssrf_protection: bool,

    /// Namespace of the InferencePool
    #[arg(
        long = "inference-pool-namespace",
        env = "INFERENCE_POOL_NAMESPACE",
        value_name = "NS"
    )]
    pub inference_pool_namespace: Option<String>,

    /// Name of the InferencePool
    #[arg(
        long = "inference-pool-name",
        env = "INFERENCE_POOL_NAME",
        value_name = "NAME"
    )]
    pub inference_pool_name: Option<String>,

    /// Accepted and ignored: klog's logging destination flags (logs always go to stderr)
    #[arg(long = "logtostderr", hide = true, default_value = "true", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub logtostderr: bool,

    /// Accepted and ignored, as -logtostderr
    #[arg(long = "alsologtostderr", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub alsologtostderr: bool,

    /// Deadline for the whole prefill leg (request, queueing, reply); exceeded: 504
    #[arg(long = "prefill-timeout", default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    pub prefill_timeout: Duration,

    /// Deadline for the decoder's response head (a non-streaming reply's head comes with the
    /// whole generation); exceeded: 504
    #[arg(long = "decode-first-byte-timeout", default_value = "600s", value_parser = parse_duration, value_name = "DURATION")]
    pub decode_first_byte_timeout: Duration,

    /// When the prefill fails (5xx, unreachable, timeout, unusable reply): `error` answers the
    /// client with it; `decode-local` sends the request to the decoder without KV handoff
    #[arg(long = "prefill-failure-policy", default_value = "error", value_parser = parse_failure_policy, value_name = "POLICY")]
    pub prefill_failure_policy: crate::pd::PrefillFailurePolicy,

    /// Most requests served at once; beyond it requests get 503 (0: no limit)
    #[arg(long = "max-in-flight", default_value_t = 4096, value_name = "N")]
    pub max_in_flight: usize,

    /// Time a client has to send its request headers
    #[arg(long = "header-read-timeout", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,

    /// Largest request head (request line and headers) accepted; larger gets 431
    #[arg(long = "max-header-size", default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_header_size: usize,

    /// Prefillers allowed, comma-separated HOST[:PORT] or CIDR[:PORT] (e.g. 10.0.0.0/8:8000);
    /// setting it turns SSRF protection on without Kubernetes
    #[arg(
        long = "allowed-prefillers",
        value_delimiter = ',',
        value_name = "LIST"
    )]
    pub allowed_prefillers: Vec<String>,

    /// When a client leaves after its prefill, the decode is still delivered so vLLM frees the
    /// prefiller's KV blocks; it is closed once the decoder admits it, or after this long
    #[arg(long = "decode-admission-grace", default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub decode_admission_grace: Duration,

    /// PEM file of CA certificates trusted for upstream TLS, besides the public web roots
    #[arg(long = "tls-ca-file", value_name = "FILE")]
    pub tls_ca_file: Option<String>,

    /// How often -cert-path is checked for a rotated certificate
    #[arg(long = "cert-reload-interval", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub cert_reload_interval: Duration,

    /// Threads serving requests (default: the cores this process may run on). 1 runs
    /// everything on one thread, the fastest setting when the sidecar is given one core
    #[arg(long = "worker-threads", value_parser = clap::value_parser!(u16).range(1..), value_name = "N")]
    pub worker_threads: Option<u16>,

    /// After each request received and each leg sent, poll for events without sleeping for
    /// this long (e.g. 200us): lower latency at low load for more CPU. 0 turns it off
    #[arg(long = "busy-poll", default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
    pub busy_poll: Duration,

    /// Port of the admin listener serving /metrics (Prometheus) and /health; 0 disables it
    #[arg(long = "metrics-port", default_value_t = 9090, value_name = "PORT")]
    pub metrics_port: u16,

    /// API group of the InferencePool for -enable-ssrf-protection: inference.networking.k8s.io
    /// (v1) or inference.networking.x-k8s.io (v1alpha2)
    #[arg(long = "pool-group", default_value = "inference.networking.k8s.io", value_parser = parse_pool_api, value_name = "GROUP")]
    pub pool_group: crate::security::inference_pool::PoolApi,

    /// Export spans over OTLP/HTTP (JSON) to this collector, e.g. http://otel-collector:4318
    #[arg(long = "otlp-endpoint", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Log line format: text or json (one object per line)
    #[arg(long = "log-format", default_value = "text", value_parser = parse_log_format, value_name = "FORMAT")]
    pub log_format: LogFormat,
}

/// Parses flags from `args` (program name first), accepting Go's single-dash spelling.
pub fn parse_from<I, T>(args: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    Args::try_parse_from(go_style(args))
}

/// Prints a parse failure. Help and version go to stdout with exit 0; errors are one line on
/// stderr with exit 2, as Go's flag package does.
pub fn report(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    let line = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    eprintln!(
        "llm-d-routing-sidecar: {} (see -help)",
        line.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// Rewrites `-name[=value]` to `--name[=value]`, and `-h`/`-help` to `--help`.
fn go_style<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut verbatim = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        let text = arg.to_str().map(str::to_owned);
        match text {
            Some(t) if i > 0 && !verbatim && t == "--" => {
                verbatim = true;
                out.push(arg);
            }
            Some(t)
                if i > 0
                    && !verbatim
                    && t.len() > 1
                    && t.starts_with('-')
                    && !t.starts_with("--") =>
            {
                let body = &t[1..];
                let name = body.split('=').next().unwrap_or(body);
                if name == "h" || name == "help" {
                    out.push("--help".into());
                } else {
                    out.push(format!("-{t}").into());
                }
            }
            Some(t) if i > 0 && !verbatim && (t == "--h") => out.push("--help".into()),
            _ => out.push(arg),
        }
    }
    out
}

fn parse_connector(s: &str) -> Result<Connector, String> {
    s.parse()
}

fn parse_failure_policy(s: &str) -> Result<crate::pd::PrefillFailurePolicy, String> {
    s.parse()
}

fn parse_pool_api(s: &str) -> Result<crate::security::inference_pool::PoolApi, String> {
    s.parse()
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// Go's `strconv.ParseBool` spellings.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("'{other}' is not a boolean (use true or false)")),
    }
}

/// `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 500ms)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit (use ns, us, ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{s}' is out of range"))
}

/// A byte count with an optional binary or decimal suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 32MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "KiB" | "Ki" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" | "Mi" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" | "Gi" => 1 << 30,
        _ => return Err(format!("'{s}' has an unknown unit (use KiB, MiB or GiB)")),
    };
    value
        .checked_mul(scale)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn go_and_gnu_spellings_are_equivalent() {
        for args in [
            &["-port=9000", "-vllm-port=9001", "-connector=lmcache"][..],
            &[
                "-port",
                "9000",
                "-vllm-port",
                "9001",
                "-connector",
                "lmcache",
            ],
            &["--port=9000", "--vllm-port", "9001", "--connector=lmcache"],
        ] {
            let a = parse(args).unwrap();
            assert_eq!(
                (a.port, a.vllm_port, a.connector),
                (9000, 9001, Connector::LmCache)
            );
        }
    }

    #[test]
    fn defaults_match_the_go_sidecar() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.port, a.vllm_port, a.connector),
            (8000, 8001, Connector::NixlV2)
        );
        assert_eq!(a.max_request_body_size, 32 << 20);
        assert!(!a.secure_proxy);
    }

    #[test]
    fn booleans_are_bare_or_assigned() {
        assert!(
            parse(&["-enable-ssrf-protection"])
                .unwrap()
                .enable_ssrf_protection
        );
        assert!(!parse(&["-secure-proxy=false"]).unwrap().secure_proxy);
        assert!(parse(&["--secure-proxy=T"]).unwrap().secure_proxy);
        assert!(parse(&["-secure-proxy=maybe"]).is_err());
    }

    #[test]
    fn klog_verbosity_is_accepted() {
        assert_eq!(parse(&["-v=5"]).unwrap().verbosity, 5);
        assert_eq!(parse(&["-v", "4"]).unwrap().verbosity, 4);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["-port=http"]).is_err());
        assert!(parse(&["-connector=sglang"]).is_err());
        assert!(parse(&["-no-such-flag"]).is_err());
        assert!(parse(&["-max-request-body-size=0"]).is_err());
    }

    #[test]
    fn help_is_requested_by_every_spelling() {
        for h in ["-h", "-help", "--help"] {
            assert_eq!(
                parse(&[h]).unwrap_err().kind(),
                clap::error::ErrorKind::DisplayHelp
            );
        }
    }

    #[test]
    fn worker_threads_must_be_positive() {
        assert_eq!(parse(&[]).unwrap().worker_threads, None);
        assert_eq!(
            parse(&["-worker-threads=1"]).unwrap().worker_threads,
            Some(1)
        );
        assert!(parse(&["-worker-threads=0"]).is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("1.5µs").unwrap(), Duration::from_nanos(1500));
        assert!(parse_duration("3 days").is_err());
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("5").unwrap(), 5);
        assert!(parse_size("lots").is_err());
    }
}
