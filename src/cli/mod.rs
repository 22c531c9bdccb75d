//! Command-line flags, as the Go sidecar's and pd-sidecar's manifests spell them.
//!
//! Every flag of both (and their old names) parses, in Go's single-dash and in double-dash
//! spelling (`go_style.rs`); `--configuration[-file]` adds YAML values below the command line
//! (`yaml.rs`). Flags stay raw here: [`Parsed`] records where each value came from and which
//! defaults apply ([`Profile`]), and `config.rs` resolves and validates them.

mod go_style;
mod values;
mod yaml;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

pub use values::{parse_duration, parse_go_bool, parse_size, TlsStage};

use crate::observe::logging::{LogFormat, LogLevel, LogTime};

const LISTEN: &str = "Serving";
const PD: &str = "P/D";
const TLS: &str = "TLS";
const SSRF: &str = "SSRF protection";
const LIMITS: &str = "Limits and timeouts";
const OBSERVE: &str = "Logs, metrics and traces";
const OLD: &str = "Old names (the Go sidecar's, still accepted)";

/// P/D (prefill/decode disaggregation) routing sidecar for vLLM.
///
/// Runs next to a vLLM decode server. Completions carrying `x-prefiller-host-port` (or
/// `x-prefiller-url`) are prefilled on that server, then decoded locally; everything else
/// passes straight through to vLLM.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "llm-d-routing-sidecar",
    version,
    // As Go's flag package and pflag: a flag given twice takes the last value.
    args_override_self = true,
    after_help = "Flags may be written Go-style too: -port=8000, -port 8000, -secure-proxy=false. \
                  Defaults marked (profile) follow the spelling: any pd-sidecar-only flag or \
                  --configuration selects pd-sidecar's. Also accepted: klog's -log_dir, -log_file, \
                  -vmodule and its other flags (logs always go to stderr), and pd-sidecar's \
                  --moriio-* flags (AMD MoRI-IO: turning it on exits 2)."
)]
pub struct Args {
    /// Port the sidecar listens on (0: any free port)
    #[arg(long, default_value_t = 8000, value_name = "PORT", help_heading = LISTEN)]
    pub port: u16,

    /// Port of the local vLLM (model server) [default: 8200]
    #[arg(long = "model-server-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), help_heading = LISTEN)]
    pub model_server_port: Option<u16>,

    /// Host of the local vLLM (decode) server
    #[arg(long = "vllm-host", default_value = "localhost", value_name = "HOST", help_heading = LISTEN)]
    pub vllm_host: String,

    /// Address the sidecar binds
    #[arg(long = "bind-address", default_value = "0.0.0.0", value_name = "IP", help_heading = LISTEN)]
    pub bind_address: IpAddr,

    /// How often vLLM's own /health is checked for /readyz (200 only while every rank's answers
    /// 2xx and the sidecar is not draining); each check may take the interval, at most 1s
    #[arg(long = "readiness-interval", default_value = "2s", value_parser = parse_duration, value_name = "DURATION", help_heading = LISTEN)]
    pub readiness_interval: Duration,

    /// Settings as inline YAML, keys named as flags, e.g. '{port: 8085, model-server-port: 8203}'
    #[arg(long = "configuration", value_name = "YAML", conflicts_with = "configuration_file", help_heading = LISTEN)]
    pub configuration: Option<String>,

    /// Settings from a YAML file, as -configuration
    #[arg(long = "configuration-file", value_name = "FILE", help_heading = LISTEN)]
    pub configuration_file: Option<String>,

    /// KV connector: nixlv2 (vLLM NixlConnector), nixl (legacy llm-d v1) or shared-storage
    /// (alias lmcache) [default: nixlv2]
    #[arg(long = "kv-connector", value_name = "NAME", help_heading = PD)]
    pub kv_connector: Option<String>,

    /// Pick the prefiller uniformly from the header's list instead of its first entry (env
    /// ENABLE_PREFILLER_SAMPLING)
    #[arg(long = "enable-prefiller-sampling", default_value = "false",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = PD)]
    pub enable_prefiller_sampling: bool,

    /// Retries of a failed prefill that cannot have pinned KV blocks (connect failure, or
    /// 502/503/504), each on the next prefiller of the header's list. A prefiller refusing the
    /// connection is followed by the next untried one at once, without using a retry
    #[arg(long = "prefill-max-retries", default_value_t = 0, value_name = "N", help_heading = PD)]
    pub prefill_max_retries: u32,

    /// Delay before the first prefill retry; doubles for each further one, with jitter
    #[arg(long = "prefill-retry-backoff", default_value = "200ms", value_parser = parse_duration, value_name = "DURATION", help_heading = PD)]
    pub prefill_retry_backoff: Duration,

    /// nixlv2 chat: the prefill returns the prompt's token ids and the decoder gets them in
    /// kv_transfer_params.prompt_token_ids, so it skips templating and tokenizing (vLLM >= 0.32)
    #[arg(long = "tokenize-once", default_value = "false",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = PD)]
    pub tokenize_once: bool,

    /// Consecutive failures (no connection, 5xx, unreadable reply) after which a prefiller is
    /// skipped for -prefiller-breaker-backoff, then tried by one request (0: no breaker)
    #[arg(long = "prefiller-breaker-failures", default_value_t = 5, value_name = "N", help_heading = PD)]
    pub prefiller_breaker_failures: u32,

    /// How long an open prefiller breaker skips its prefiller; doubles each time its trial
    /// request fails (at most 5 min)
    #[arg(long = "prefiller-breaker-backoff", default_value = "5s", value_parser = parse_duration, value_name = "DURATION", help_heading = PD)]
    pub prefiller_breaker_backoff: Duration,

    /// When the prefill fails (5xx, unreachable, timeout, unusable reply): `error` answers the
    /// client with it; `decode-local` sends the request to the decoder without KV handoff
    #[arg(long = "prefill-failure-policy", default_value = "error", value_parser = parse_failure_policy, value_name = "POLICY", help_heading = PD)]
    pub prefill_failure_policy: crate::pd::PrefillFailurePolicy,

    /// When a client leaves during its prefill, how long a prefill vLLM has received may run
    /// on: one that finishes pins KV blocks only a decode frees, so its reply is read and the
    /// decode sent anyway; after this it is closed and vLLM aborts it (0: close at once)
    #[arg(long = "prefill-abandon-grace", default_value = "500ms", value_parser = parse_duration, value_name = "DURATION", help_heading = PD)]
    pub prefill_abandon_grace: Duration,

    /// When a client leaves after its prefill, the decode is still delivered so vLLM frees the
    /// prefiller's KV blocks; it is closed once the decoder admits it, or after this long
    #[arg(long = "decode-admission-grace", default_value = "500ms", value_parser = parse_duration, value_name = "DURATION", help_heading = PD)]
    pub decode_admission_grace: Duration,

    /// This pod's IP (env POD_IP, from the downward API): a KV cache source naming
    /// POD_IP:port is this sidecar itself
    #[arg(long = "pod-ip", hide = true, value_name = "IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// Offloading connector's P2P tier port on prefill pods, rank r on port+r (env
    /// P2P_CONNECTOR_PORT)
    #[arg(long = "p2p-connector-port", default_value_t = 7777,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT", help_heading = PD)]
    pub p2p_connector_port: u16,

    /// Put the prefiller's cached tokens in the decoder's usage (nixlv2, vLLM before 0.31)
    #[arg(long = "rewrite-cached-tokens", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = PD)]
    pub rewrite_cached_tokens: bool,

    /// SGLang connector's bootstrap port on prefill pods (env SGLANG_BOOTSTRAP_PORT, which is
    /// all pd-sidecar reads)
    #[arg(long = "sglang-bootstrap-port", default_value_t = 8998,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT", help_heading = PD)]
    pub sglang_bootstrap_port: u16,

    /// Mooncake connector's bootstrap port on prefill pods (env MOONCAKE_BOOTSTRAP_PORT)
    #[arg(long = "mooncake-bootstrap-port", default_value_t = 8998,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT", help_heading = PD)]
    pub mooncake_bootstrap_port: u16,

    /// Serve TLS on -port, with -cert-path's certificate or a self-signed one
    /// [default (profile): false, pd-sidecar: true]
    #[arg(long = "secure-proxy", visible_alias = "secure-serving", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = TLS)]
    pub secure_proxy: Option<bool>,

    /// Directory holding tls.crt and tls.key for -secure-proxy
    #[arg(long = "cert-path", value_name = "DIR", help_heading = TLS)]
    pub cert_path: Option<String>,

    /// How often -cert-path is checked for a rotated certificate
    #[arg(long = "cert-reload-interval", default_value = "10s", value_parser = parse_duration, value_name = "DURATION", help_heading = TLS)]
    pub cert_reload_interval: Duration,

    /// Legs that use TLS: prefiller, decoder, encoder (comma-separated or repeated)
    #[arg(long = "enable-tls", value_delimiter = ',', action = ArgAction::Append, value_parser = values::parse_tls_stage, value_name = "STAGES", help_heading = TLS)]
    pub enable_tls: Vec<TlsStage>,

    /// Legs whose certificates are not verified: prefiller, decoder, encoder
    #[arg(long = "tls-insecure-skip-verify", value_delimiter = ',', action = ArgAction::Append, value_parser = values::parse_tls_stage, value_name = "STAGES", help_heading = TLS)]
    pub tls_insecure_skip_verify: Vec<TlsStage>,

    /// PEM file of CA certificates trusted for upstream TLS, besides the public web roots
    #[arg(long = "tls-ca-file", value_name = "FILE", help_heading = TLS)]
    pub tls_ca_file: Option<String>,

    /// Allow only prefillers of the InferencePool (-inference-pool)
    #[arg(long = "enable-ssrf-protection", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = SSRF)]
    pub enable_ssrf_protection: bool,

    /// The InferencePool, namespace/name or name (namespace default)
    #[arg(long = "inference-pool", env = "INFERENCE_POOL", value_name = "NS/NAME", help_heading = SSRF)]
    pub inference_pool: Option<String>,

    /// API group of the InferencePool: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2)
    #[arg(long = "pool-group", default_value = "inference.networking.k8s.io", value_parser = parse_pool_api, value_name = "GROUP", help_heading = SSRF)]
    pub pool_group: crate::security::inference_pool::PoolApi,

    /// Prefillers allowed, comma-separated HOST[:PORT] or CIDR[:PORT] (e.g. 10.0.0.0/8:8000);
    /// setting it turns SSRF protection on without Kubernetes
    #[arg(long = "allowed-prefillers", value_delimiter = ',', action = ArgAction::Append, value_name = "LIST", help_heading = SSRF)]
    pub allowed_prefillers: Vec<String>,

    /// Forward the client's kv_transfer_params, ec_transfer_params and NIXL v1 remote_* fields
    /// to vLLM instead of removing them: only behind a gateway that sets them itself
    #[arg(long = "trust-client-kv-params", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = SSRF)]
    pub trust_client_kv_params: bool,

    /// Largest request body accepted on P/D routes and, unless -trust-client-kv-params, on
    /// inference routes passed through (bytes; KiB, MiB, GiB suffixes allowed)
    #[arg(long = "max-request-body-size", default_value = "32MiB", value_parser = parse_size, value_name = "SIZE", help_heading = LIMITS)]
    pub max_request_body_size: usize,

    /// Most requests served at once; beyond it requests get 503 (0: no limit)
    #[arg(long = "max-in-flight", default_value_t = 4096, value_name = "N", help_heading = LIMITS)]
    pub max_in_flight: usize,

    /// Idle keep-alive connections kept per upstream (0 or less: the default)
    #[arg(long = "max-idle-conns-per-host", default_value_t = 256, allow_negative_numbers = true, value_name = "N", help_heading = LIMITS)]
    pub max_idle_conns_per_host: i64,

    /// Time allowed to connect to an upstream (e.g. 5s, 500ms; 0: no limit)
    #[arg(long = "connect-timeout", default_value = "5s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub connect_timeout: Duration,

    /// Deadline for the whole prefill leg (request, queueing, reply, retries); exceeded: 504.
    /// 0: no limit
    #[arg(long = "prefill-timeout", default_value = "120s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub prefill_timeout: Duration,

    /// Deadline for the decoder's response head (a non-streaming reply's head comes with the
    /// whole generation); exceeded: 504. 0: no limit
    #[arg(long = "decode-first-byte-timeout", default_value = "600s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub decode_first_byte_timeout: Duration,

    /// Time a client has to send its request headers (0: no limit)
    #[arg(long = "header-read-timeout", default_value = "30s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub header_read_timeout: Duration,

    /// Most headers a request may carry; more gets 431
    #[arg(long = "max-header-count", default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=8192), value_name = "N", help_heading = LIMITS)]
    pub max_header_count: u32,

    /// Most client connections open at once; beyond it new ones are closed at once (0: no
    /// limit)
    #[arg(long = "max-connections", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(0..=1_000_000), value_name = "N", help_heading = LIMITS)]
    pub max_connections: u32,

    /// Largest request head (request line and headers) accepted; larger gets 431
    #[arg(long = "max-header-size", default_value = "64KiB", value_parser = parse_size, value_name = "SIZE", help_heading = LIMITS)]
    pub max_header_size: usize,

    /// A client connection with no request in progress for this long is closed (0: never)
    #[arg(long = "idle-timeout", default_value = "300s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests and streams may run before exit (0: until
    /// they end)
    #[arg(long = "drain-timeout", default_value = "30s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub drain_timeout: Duration,

    /// On SIGTERM/SIGINT, /readyz turns 503 at once and requests are still served as usual for
    /// this long, while endpoints and gateways stop routing here; then the drain
    /// (-drain-timeout). A second signal ends the wait. vLLM gets SIGTERM too: keep it serving
    /// as long (0: drain at once)
    #[arg(long = "drain-delay", default_value = "0s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub drain_delay: Duration,

    /// Threads serving requests (default: the cores this process may run on). 1 runs
    /// everything on one thread, the fastest setting when the sidecar is given one core
    #[arg(long = "worker-threads", value_parser = clap::value_parser!(u16).range(1..), value_name = "N", help_heading = LIMITS)]
    pub worker_threads: Option<u16>,

    /// After each request received and each leg sent, poll for events without sleeping for
    /// this long (e.g. 200us): lower latency at low load for more CPU. 0 turns it off
    #[arg(long = "busy-poll", default_value = "0s", value_parser = parse_duration, value_name = "DURATION", help_heading = LIMITS)]
    pub busy_poll: Duration,

    /// Log verbosity, as klog's -v: 0-3 info, 4 debug (routing decisions), 5 trace (bodies).
    /// RUST_LOG, when set, takes precedence
    #[arg(long = "v", default_value_t = 0, value_name = "N", help_heading = OBSERVE)]
    pub verbosity: u8,

    /// Log verbosity, as zap's: debug (logr V(1)), info, error, panic (nothing), or N as -v=N
    #[arg(long = "zap-log-level", value_parser = values::parse_zap_level, value_name = "LEVEL", help_heading = OBSERVE)]
    pub zap_log_level: Option<LogLevel>,

    /// Log line format: text or json (one object per line) [default (profile): text,
    /// pd-sidecar: json]
    #[arg(long = "log-format", value_parser = parse_log_format, value_name = "FORMAT", help_heading = OBSERVE)]
    pub log_format: Option<LogFormat>,

    /// Log line format, as zap's: json, or console (text)
    #[arg(long = "zap-encoder", value_parser = values::parse_zap_encoder, value_name = "ENCODER", help_heading = OBSERVE)]
    pub zap_encoder: Option<LogFormat>,

    /// zap's development mode: text lines at zap's debug level, unless set otherwise
    #[arg(long = "zap-devel", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OBSERVE)]
    pub zap_devel: bool,

    /// Line timestamps: epoch, millis, nano, or iso8601/rfc3339/rfc3339nano (RFC 3339, UTC, us)
    #[arg(long = "zap-time-encoding", value_parser = values::parse_zap_time, value_name = "ENCODING", help_heading = OBSERVE)]
    pub zap_time_encoding: Option<LogTime>,

    /// Accepted as zap's (info, error, panic); the sidecar logs no stack traces
    #[arg(long = "zap-stacktrace-level", value_parser = values::parse_zap_stacktrace, value_name = "LEVEL", help_heading = OBSERVE)]
    pub zap_stacktrace_level: Option<String>,

    /// Port of the admin listener serving /metrics (Prometheus), /health and /readyz; 0
    /// disables it. If the default port is taken, the sidecar serves without it [default: 9090]
    #[arg(long = "metrics-port", value_name = "PORT", help_heading = OBSERVE)]
    pub metrics_port: Option<u16>,

    /// Trace requests to this OTLP collector, e.g. http://otel-collector:4318 (OTLP/HTTP protobuf
    /// unless OTEL_EXPORTER_OTLP_PROTOCOL says otherwise)
    #[arg(long = "otlp-endpoint", value_name = "URL", help_heading = OBSERVE)]
    pub otlp_endpoint: Option<String>,

    /// Trace requests over OTLP as the OTEL_* variables say (OTLP/gRPC to localhost:4317 by default)
    #[arg(long = "tracing", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OBSERVE)]
    pub tracing: bool,

    /// vLLM data-parallel ranks: rank i served on port+i in front of model-server-port+i
    #[arg(long = "data-parallel-size", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), value_name = "N", help_heading = LISTEN)]
    pub data_parallel_size: u32,

    /// Encoder connector for E/PD with x-encoder-hosts-ports: ec-example (shared cache) or ec-nixl
    #[arg(long = "ec-connector", default_value = "", hide_default_value = true, value_name = "NAME", help_heading = PD)]
    pub ec_connector: String,

    /// Chat decodes run as requests of at most N tokens, each continuing the last (0: off)
    #[arg(long = "decode-chunk-size", default_value_t = 0, value_name = "N", help_heading = PD)]
    pub decode_chunk_size: i64,

    /// nixlv2 prefills pull a cached prefix from x-kv-cache-source-host-port (SSRF-checked)
    #[arg(long = "enable-p2p-pull", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = PD)]
    pub enable_p2p_pull: bool,

    /// Old name of -model-server-port
    #[arg(long = "vllm-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), help_heading = OLD)]
    pub vllm_port: Option<u16>,

    /// Old name of -kv-connector
    #[arg(long, value_name = "NAME", help_heading = OLD)]
    pub connector: Option<String>,

    /// Old form of -enable-tls=prefiller
    #[arg(long = "prefiller-use-tls", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OLD)]
    pub prefiller_use_tls: bool,

    /// Old form of -enable-tls=decoder
    #[arg(long = "decoder-use-tls", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OLD)]
    pub decoder_use_tls: bool,

    /// Old form of -tls-insecure-skip-verify=prefiller
    #[arg(long = "prefiller-tls-insecure-skip-verify", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OLD)]
    pub prefiller_tls_insecure_skip_verify: bool,

    /// Old form of -tls-insecure-skip-verify=decoder
    #[arg(long = "decoder-tls-insecure-skip-verify", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set, value_name = "BOOL", help_heading = OLD)]
    pub decoder_tls_insecure_skip_verify: bool,

    /// Old form of -inference-pool's namespace
    #[arg(long = "inference-pool-namespace", env = "INFERENCE_POOL_NAMESPACE", value_name = "NS", help_heading = OLD)]
    pub inference_pool_namespace: Option<String>,

    /// Old form of -inference-pool's name
    #[arg(long = "inference-pool-name", env = "INFERENCE_POOL_NAME", value_name = "NAME", help_heading = OLD)]
    pub inference_pool_name: Option<String>,

    #[command(flatten)]
    pub klog: Klog,

    #[command(flatten)]
    pub moriio: MoriIo,
}

/// klog's flags the Go sidecar had besides `-v`: accepted so its manifests start; the ones
/// that would change where logs go are reported at startup as having no effect.
#[derive(clap::Args, Debug, Clone)]
pub struct Klog {
    #[arg(long, hide = true, default_value = "true", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub logtostderr: bool,
    #[arg(long, hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub alsologtostderr: bool,
    #[arg(long, hide = true)]
    pub vmodule: Option<String>,
    #[arg(long = "log_dir", hide = true)]
    pub log_dir: Option<String>,
    #[arg(long = "log_file", hide = true)]
    pub log_file: Option<String>,
    #[arg(long = "log_file_max_size", hide = true)]
    pub log_file_max_size: Option<u64>,
    #[arg(long = "one_output", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub one_output: bool,
    #[arg(long = "skip_headers", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub skip_headers: bool,
    #[arg(long = "skip_log_headers", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub skip_log_headers: bool,
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    #[arg(long = "add_dir_header", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub add_dir_header: bool,
    #[arg(long = "log_backtrace_at", hide = true)]
    pub log_backtrace_at: Option<String>,
}

/// pd-sidecar's AMD MoRI-IO flags: parsed so a manifest's values are checked; any value but
/// the default asks for a feature this sidecar does not have (`config.rs` refuses it).
#[derive(clap::Args, Debug, Clone)]
pub struct MoriIo {
    #[arg(long = "moriio-write-mode", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub write_mode: bool,
    #[arg(long = "moriio-parallel-dispatch", hide = true, default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set)]
    pub parallel_dispatch: bool,
    #[arg(long = "moriio-parallel-decode-wait-timeout", hide = true, default_value = "30s", value_parser = parse_duration)]
    pub parallel_decode_wait_timeout: Duration,
    #[arg(long = "moriio-local-pod-ip", hide = true)]
    pub local_pod_ip: Option<String>,
    #[arg(
        long = "moriio-decode-notify-port",
        hide = true,
        default_value_t = 61005
    )]
    pub decode_notify_port: u16,
    #[arg(
        long = "moriio-decode-handshake-port",
        hide = true,
        default_value_t = 6301
    )]
    pub decode_handshake_port: u16,
    #[arg(
        long = "moriio-prefill-handshake-port",
        hide = true,
        default_value_t = 6301
    )]
    pub prefill_handshake_port: u16,
    #[arg(
        long = "moriio-prefill-notify-port",
        hide = true,
        default_value_t = 61005
    )]
    pub prefill_notify_port: u16,
    #[arg(long = "moriio-tp-size", hide = true, default_value_t = 1)]
    pub tp_size: u32,
    #[arg(long = "moriio-dp-size", hide = true, default_value_t = 1)]
    pub dp_size: u32,
    #[arg(long = "moriio-dp-size-local", hide = true, default_value_t = 0)]
    pub dp_size_local: u32,
    #[arg(long = "moriio-remote-hosts", hide = true, value_delimiter = ',', action = ArgAction::Append)]
    pub remote_hosts: Vec<String>,
    #[arg(long = "moriio-decode-hosts", hide = true, value_delimiter = ',', action = ArgAction::Append)]
    pub decode_hosts: Vec<String>,
}

/// Flags only pd-sidecar has (the Go sidecar, and this sidecar before them, did not): any of
/// them on the command line selects [`Profile::PdSidecar`].
const PD_SIDECAR_ONLY: &[&str] = &[
    "model-server-port",
    "data-parallel-size",
    "kv-connector",
    "ec-connector",
    "mooncake-bootstrap-port",
    "p2p-connector-port",
    "enable-p2p-pull",
    "enable-tls",
    "tls-insecure-skip-verify",
    "inference-pool",
    "enable-prefiller-sampling",
    "max-idle-conns-per-host",
    "prefill-max-retries",
    "prefill-retry-backoff",
    "decode-chunk-size",
    "tracing",
    "configuration",
    "configuration-file",
    "zap-log-level",
    "zap-encoder",
    "zap-devel",
    "zap-time-encoding",
    "zap-stacktrace-level",
];

/// Whose defaults apply where the Go sidecar and pd-sidecar differ (`config.rs` lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// The command line uses only flags the Go sidecar (or this sidecar) has.
    GoSidecar,
    /// The command line uses a pd-sidecar-only flag: `because` names the first one.
    PdSidecar { because: String },
}

/// Where a flag's value came from, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    CommandLine,
    Configuration,
    Environment,
    Default,
}

/// The flags, where each value came from, and whose defaults apply.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub args: Args,
    pub profile: Profile,
    /// Flags given a value, by long name; absent ones have their default.
    sources: HashMap<String, Source>,
}

impl Parsed {
    /// Where the flag `long` (its long name) got its value.
    pub fn source(&self, long: &str) -> Source {
        self.sources.get(long).copied().unwrap_or(Source::Default)
    }

    /// Whether the flag `long` was given at all (command line, YAML or environment).
    pub fn is_set(&self, long: &str) -> bool {
        self.source(long) != Source::Default
    }
}

/// A command line that cannot be used: clap's own errors, and `--configuration`'s.
#[derive(Debug)]
pub enum CliError {
    Clap(clap::Error),
    Configuration(String),
}

impl From<clap::Error> for CliError {
    fn from(e: clap::Error) -> Self {
        CliError::Clap(e)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{e}"),
            CliError::Configuration(e) => f.write_str(e),
        }
    }
}

/// Variables pd-sidecar reads as flags' defaults, below YAML. Empty means unset; a value the
/// flag would refuse is an error naming the variable.
const FLAG_ENV: [(&str, &str); 5] = [
    ("ENABLE_PREFILLER_SAMPLING", "enable-prefiller-sampling"),
    ("MOONCAKE_BOOTSTRAP_PORT", "mooncake-bootstrap-port"),
    ("P2P_CONNECTOR_PORT", "p2p-connector-port"),
    ("POD_IP", "pod-ip"),
    ("SGLANG_BOOTSTRAP_PORT", "sglang-bootstrap-port"),
];

/// Parses flags from `args` (program name first), accepting Go's single-dash spelling, and
/// merges `--configuration[-file]` and the environment under them.
pub fn parse_from<I, T>(args: I) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with_env(args, |name| std::env::var(name).ok())
}

/// As [`parse_from`], reading [`FLAG_ENV`] variables through `env` (tests pass their own).
pub fn parse_with_env<I, T>(
    args: I,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let command = Args::command();
    let takes_value = |long: &str| {
        command.get_arguments().any(|a| {
            a.get_long() == Some(long)
                && a.get_num_args().is_none_or(|n| n.min_values() > 0)
                && matches!(a.get_action(), ArgAction::Set | ArgAction::Append)
        })
    };
    let argv = go_style::rewrite(args, takes_value);
    let first = command.clone().try_get_matches_from(&argv)?;
    // Each flag given on the command line, with where it first appears.
    let given: Vec<(usize, String)> = command
        .get_arguments()
        .filter(|a| first.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|a| {
            let at = first.index_of(a.get_id().as_str()).unwrap_or(usize::MAX);
            Some((at, a.get_long()?.to_owned()))
        })
        .collect();
    let on_command_line: HashSet<String> = given.iter().map(|(_, f)| f.clone()).collect();
    // The first pd-sidecar-only flag as the user wrote them.
    let profile = given
        .iter()
        .filter(|(_, f)| PD_SIDECAR_ONLY.contains(&f.as_str()))
        .min()
        .map_or(Profile::GoSidecar, |(_, f)| Profile::PdSidecar {
            because: format!("--{f}"),
        });
    let mut sources: HashMap<String, Source> = on_command_line
        .iter()
        .map(|f| (f.clone(), Source::CommandLine))
        .collect();

    let yaml = match (
        first.get_one::<String>("configuration"),
        first.get_one::<String>("configuration_file"),
    ) {
        (Some(text), _) => Some((text.clone(), "-configuration".to_string())),
        (None, Some(path)) => Some((
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Configuration(format!("-configuration-file {path}: {e}")))?,
            format!("-configuration-file {path}"),
        )),
        (None, None) => None,
    };
    let mut yaml_args = Vec::new();
    if let Some((text, origin)) = &yaml {
        for (key, arg) in yaml::to_args(&command, text, origin).map_err(CliError::Configuration)? {
            if let std::collections::hash_map::Entry::Vacant(slot) = sources.entry(key) {
                slot.insert(Source::Configuration);
                yaml_args.push(arg);
            }
        }
    }
    let mut env_args = Vec::new();
    for (var, long) in FLAG_ENV {
        let Some(value) = env(var).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        if sources.contains_key(long) {
            continue;
        }
        let arg = format!("--{long}={}", value.trim());
        command
            .clone()
            .try_get_matches_from(["sidecar", arg.as_str()])
            .map_err(|e| CliError::Configuration(format!("{var}={value:?}: {}", first_line(&e))))?;
        sources.insert(long.to_string(), Source::Environment);
        env_args.push(OsString::from(arg));
    }

    let matches = if yaml_args.is_empty() && env_args.is_empty() {
        first
    } else {
        // Lowest precedence first: later values override earlier ones.
        let mut merged = Vec::with_capacity(argv.len() + yaml_args.len() + env_args.len());
        merged.extend(argv.first().cloned());
        merged.extend(env_args);
        merged.extend(yaml_args);
        merged.extend(argv.iter().skip(1).cloned());
        command.clone().try_get_matches_from(&merged).map_err(|e| {
            let origin = yaml.as_ref().map_or("", |(_, o)| o.as_str());
            CliError::Configuration(format!("{origin}: {}", first_line(&e)))
        })?
    };
    // What clap itself read from the environment (INFERENCE_POOL and the like).
    for a in command.get_arguments() {
        if let Some(long) = a.get_long() {
            if matches.value_source(a.get_id().as_str()) == Some(ValueSource::EnvVariable) {
                sources
                    .entry(long.to_string())
                    .or_insert(Source::Environment);
            }
        }
    }
    let args = Args::from_arg_matches(&matches)?;
    Ok(Parsed {
        args,
        profile,
        sources,
    })
}

/// Prints a parse failure. Help and version go to stdout with exit 0; errors are one line on
/// stderr with exit 2, as Go's flag package does.
pub fn report(err: CliError) -> ExitCode {
    use clap::error::ErrorKind;
    let line = match err {
        CliError::Clap(e) => {
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            first_line(&e)
        }
        CliError::Configuration(e) => e,
    };
    eprintln!("llm-d-routing-sidecar: {line} (see -help)");
    ExitCode::from(2)
}

/// clap's message without its "error: " prefix and usage lines.
fn first_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string()
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

#[cfg(test)]
mod tests;
