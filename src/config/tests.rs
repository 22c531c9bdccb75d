//! Resolution and validation: renamed pairs, profile defaults, unbuilt features, ranges.

use super::*;
use crate::observe::logging::{LogFormat, LogLevel, LogTime};

fn config(args: &[&str]) -> Result<Config, String> {
    let parsed = crate::cli::parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    Config::try_from(parsed).map_err(|e| e.to_string())
}

fn ok(args: &[&str]) -> Config {
    config(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn decoder_is_local_model_server_port() {
    let c = ok(&["-vllm-port=8001"]);
    assert_eq!(c.decoder.authority(), "localhost:8001");
    assert_eq!(c.listen.port(), 8000);
    assert_eq!(ok(&[]).decoder.authority(), "localhost:8200");
    assert_eq!(ok(&["-vllm-host=::1"]).decoder.authority(), "[::1]:8200");
}

#[test]
fn model_server_port_precedence_is_pd_sidecars() {
    // flag model-server-port > flag vllm-port > YAML model-server-port > YAML vllm-port.
    let port = |args: &[&str]| ok(args).decoder.port();
    assert_eq!(port(&["--model-server-port=1", "--vllm-port=2"]), 1);
    assert_eq!(port(&["--vllm-port=2", "--model-server-port=1"]), 1);
    assert_eq!(
        port(&["--vllm-port=2", "--configuration={model-server-port: 3}"]),
        2
    );
    assert_eq!(
        port(&["--configuration={model-server-port: 3, vllm-port: 4}"]),
        3
    );
    assert_eq!(port(&["--configuration={vllm-port: 4}"]), 4);
}

#[test]
fn connector_precedence_and_names() {
    let connector = |args: &[&str]| ok(args).connector;
    assert_eq!(connector(&[]), Connector::NixlV2);
    assert_eq!(
        connector(&["--kv-connector=shared-storage"]),
        Connector::SharedStorage
    );
    assert_eq!(
        connector(&["--connector=nixl", "--kv-connector=lmcache"]),
        Connector::SharedStorage
    );
    // The current name wins from anywhere, as in pd-sidecar's migration.
    assert_eq!(
        connector(&[
            "--connector=nixl",
            "--configuration={kv-connector: lmcache}"
        ]),
        Connector::SharedStorage
    );
    assert_eq!(connector(&["--kv-connector=sglang"]), Connector::SgLang);
    assert_eq!(connector(&["-connector=offloading"]), Connector::Offloading);
    assert_eq!(connector(&["--kv-connector=mooncake"]), Connector::Mooncake);
    let e = config(&["-connector=vllm"]).unwrap_err();
    assert!(e.starts_with("-connector: unknown connector 'vllm'"), "{e}");
}

#[test]
fn profile_defaults() {
    let go = ok(&["-port=8000", "-vllm-port=8001"]);
    assert_eq!(go.server_tls, None);
    assert_eq!(go.log.format, LogFormat::Text);
    assert_eq!(go.defaults, "llm-d-routing-sidecar (Go sidecar flags only)");
    let pd = ok(&["--port=8000", "--kv-connector=nixlv2"]);
    assert_eq!(
        pd.server_tls,
        Some(None),
        "pd-sidecar serves TLS by default"
    );
    assert_eq!(pd.log.format, LogFormat::Json);
    assert_eq!(pd.defaults, "pd-sidecar (because --kv-connector)");
    // Explicit values win over either profile.
    let c = ok(&[
        "--kv-connector=nixlv2",
        "--secure-proxy=false",
        "--log-format=text",
    ]);
    assert_eq!((c.server_tls, c.log.format), (None, LogFormat::Text));
    assert_eq!(ok(&["-secure-proxy"]).server_tls, Some(None));
    // Both profiles share the rest.
    for c in [&go, &pd] {
        assert_eq!(c.decoder.port(), if c == &go { 8001 } else { 8200 });
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(9090));
        assert!(c.metrics_port_defaulted);
        assert_eq!(c.max_idle_per_host, DEFAULT_MAX_IDLE_PER_HOST);
    }
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.defaults == other.defaults
    }
}

#[test]
fn logging_maps_zap_and_klog() {
    let log = |args: &[&str]| ok(args).log;
    assert_eq!(log(&[]).level, LogLevel::Verbosity(0));
    assert_eq!(log(&["-v=4"]).level, LogLevel::Verbosity(4));
    assert_eq!(log(&["--zap-log-level=5"]).level, LogLevel::Verbosity(5));
    assert_eq!(log(&["--zap-log-level=error"]).level, LogLevel::Errors);
    assert_eq!(log(&["--zap-log-level=panic"]).level, LogLevel::Off);
    // zap's debug is logr V(1), as in pd-sidecar.
    assert_eq!(
        log(&["--zap-log-level=debug"]).level,
        LogLevel::Verbosity(1)
    );
    // The command line beats YAML whichever flag it uses.
    assert_eq!(
        log(&["-v=4", "--configuration={zap-log-level: error}"]).level,
        LogLevel::Verbosity(4)
    );
    assert_eq!(
        log(&["-v=4", "--zap-log-level=2"]).level,
        LogLevel::Verbosity(2)
    );
    let devel = log(&["--zap-devel"]);
    assert_eq!(
        (devel.level, devel.format),
        (LogLevel::Verbosity(1), LogFormat::Text)
    );
    let devel = log(&["--zap-devel", "--zap-encoder=json", "--zap-log-level=info"]);
    assert_eq!(
        (devel.level, devel.format),
        (LogLevel::Verbosity(0), LogFormat::Json)
    );
    assert_eq!(log(&["--zap-time-encoding=epoch"]).time, LogTime::Epoch);
}

#[test]
fn tls_stages_and_old_booleans_add_up() {
    let c = ok(&[
        "--enable-tls=decoder",
        "-prefiller-use-tls",
        "--tls-insecure-skip-verify=prefiller",
    ]);
    assert!(c.prefiller_use_tls);
    assert!(c.decoder.uri(None).to_string().starts_with("https://"));
    assert!(c.prefiller_tls.insecure_skip_verify && !c.decoder_tls.insecure_skip_verify);
    let c = ok(&["-decoder-use-tls", "-decoder-tls-insecure-skip-verify"]);
    assert!(c.decoder_tls.insecure_skip_verify && !c.prefiller_use_tls);
}

#[test]
fn old_tls_booleans_from_yaml_yield_to_the_command_lines_list() {
    let c = ok(&["--configuration={prefiller-use-tls: true}"]);
    assert!(c.prefiller_use_tls);
    let c = ok(&[
        "--configuration={prefiller-use-tls: true}",
        "--enable-tls=decoder",
    ]);
    assert!(
        !c.prefiller_use_tls,
        "pd-sidecar ignores the YAML boolean here"
    );
    let c = ok(&["-prefiller-use-tls", "--enable-tls=decoder"]);
    assert!(c.prefiller_use_tls, "on the command line both count");
}

#[test]
fn the_log_format_follows_precedence() {
    let format = |args: &[&str]| ok(args).log.format;
    assert_eq!(
        format(&[
            "--zap-encoder=console",
            "--configuration={log-format: json}"
        ]),
        LogFormat::Text
    );
    assert_eq!(
        format(&["--zap-encoder=console", "--log-format=json"]),
        LogFormat::Json
    );
}

#[test]
fn inference_pool_forms_and_precedence() {
    let pool = |args: &[&str]| ok(args).ssrf.and_then(|s| s.inference_pool);
    let on = "-enable-ssrf-protection";
    assert_eq!(
        pool(&[on, "--inference-pool=ns/p"]),
        Some(("ns".into(), "p".into()))
    );
    assert_eq!(
        pool(&[on, "--inference-pool=p"]),
        Some(("default".into(), "p".into()))
    );
    assert_eq!(
        pool(&[on, "-inference-pool-namespace=a", "-inference-pool-name=b"]),
        Some(("a".into(), "b".into()))
    );
    // The current name wins from anywhere, as in pd-sidecar's migration.
    assert_eq!(
        pool(&[
            on,
            "--inference-pool=ns/p",
            "-inference-pool-namespace=a",
            "-inference-pool-name=b"
        ]),
        Some(("ns".into(), "p".into()))
    );
    assert_eq!(
        pool(&[
            on,
            "--configuration={inference-pool: ns/p}",
            "-inference-pool-namespace=a",
            "-inference-pool-name=b"
        ]),
        Some(("ns".into(), "p".into()))
    );
    for bad in ["a/b/c", "/p", "ns/"] {
        let e = config(&[on, &format!("--inference-pool={bad}")]).unwrap_err();
        assert!(e.starts_with("-inference-pool: "), "{bad}: {e}");
    }
    let e = config(&[on]).unwrap_err();
    assert!(e.contains("-inference-pool (or INFERENCE_POOL)"), "{e}");
    assert!(ok(&[]).ssrf.is_none());
    let c = ok(&["-allowed-prefillers=10.0.0.0/8:8000,prefill:8000"]);
    assert_eq!(c.ssrf.unwrap().rules.len(), 2);
    assert!(config(&["-allowed-prefillers=10.0.0.0/99"]).is_err());
}

#[test]
fn encoder_and_chunking_flags_resolve() {
    let c = config(&["--ec-connector=ec-nixl", "--decode-chunk-size=256"]).unwrap();
    assert_eq!(c.ec_connector, Some(crate::encode::EcConnector::Nixl));
    assert_eq!(c.decode_chunk_size, 256);
    let c = config(&["--ec-connector=ec-example", "--enable-tls=encoder"]).unwrap();
    assert_eq!(c.ec_connector, Some(crate::encode::EcConnector::Example));
    assert!(c.encoder_use_tls && !c.prefiller_use_tls);
    let c = config(&[]).unwrap();
    assert_eq!((c.ec_connector, c.decode_chunk_size), (None, 0));
    // Encoder legs share the prefiller's client: skipping verification for them alone
    // would be a flag that does nothing.
    let e = config(&["--tls-insecure-skip-verify=encoder"]).unwrap_err();
    assert!(e.contains("prefiller,encoder"), "{e}");
}

#[test]
fn unbuilt_features_are_refused_by_name() {
    for (args, wanted) in [
        (&["--moriio-write-mode"][..], "-moriio-*: AMD MoRI-IO"),
        (&["--moriio-remote-hosts=a,b"], "-moriio-*"),
    ] {
        let e = config(args).unwrap_err();
        assert!(e.starts_with(wanted), "{args:?}: {e}");
        assert!(e.ends_with("is not built in this sidecar yet"), "{e}");
    }
    for (args, wanted) in [
        (
            &["--ec-connector=ec-bogus"][..],
            "-ec-connector: 'ec-bogus'",
        ),
        (
            &["--decode-chunk-size=-1"],
            "-decode-chunk-size: -1 is out of range",
        ),
    ] {
        let e = config(args).unwrap_err();
        assert!(e.starts_with(wanted), "{args:?}: {e}");
    }
    // Their defaults, written out, are fine.
    ok(&[
        "--ec-connector=",
        "--data-parallel-size=1",
        "--decode-chunk-size=0",
        "--tracing=false",
    ]);
}

#[test]
fn port_ranges_cover_every_rank() {
    let e = config(&["--port=65535", "--data-parallel-size=2"]).unwrap_err();
    assert_eq!(e, "-port: port range 65535-65536 exceeds 65535");
    let e = config(&["--vllm-port=65535", "--data-parallel-size=2"]).unwrap_err();
    assert_eq!(e, "-vllm-port: port range 65535-65536 exceeds 65535");
    let e = config(&["--port=0", "--data-parallel-size=2"]).unwrap_err();
    assert!(e.starts_with("-port: 0"), "{e}");
}

#[test]
fn each_data_parallel_rank_has_its_decoder() {
    let c = ok(&["--port=8000", "--vllm-port=8200", "--data-parallel-size=3"]);
    assert_eq!(c.decoder.authority(), "localhost:8200");
    let ranks: Vec<_> = c.rank_decoders.iter().map(|t| t.authority()).collect();
    assert_eq!(ranks, ["localhost:8201", "localhost:8202"]);
    assert!(ok(&[]).rank_decoders.is_empty());
}

#[test]
fn retries_and_pool_sizes() {
    let c = ok(&["--prefill-max-retries=3", "--prefill-retry-backoff=50ms"]);
    assert_eq!(c.prefill_retry.max_retries, 3);
    assert_eq!(c.prefill_retry.backoff, Duration::from_millis(50));
    let e = config(&["--prefill-max-retries=1", "--prefill-retry-backoff=0s"]).unwrap_err();
    assert!(
        e.starts_with("-prefill-retry-backoff: must be positive"),
        "{e}"
    );
    assert_eq!(
        ok(&["--max-idle-conns-per-host=0"]).max_idle_per_host,
        DEFAULT_MAX_IDLE_PER_HOST
    );
    assert_eq!(
        ok(&["--max-idle-conns-per-host=-5"]).max_idle_per_host,
        DEFAULT_MAX_IDLE_PER_HOST
    );
    assert_eq!(
        ok(&["--max-idle-conns-per-host=1024"]).max_idle_per_host,
        1024
    );
    assert!(!ok(&["--metrics-port=9090"]).metrics_port_defaulted);
}

#[test]
fn breaker_and_tokenize_once_flags() {
    let c = ok(&[]);
    assert_eq!((c.prefiller_breaker.failures, c.tokenize_once), (5, false));
    assert_eq!(c.prefiller_breaker.backoff, Duration::from_secs(5));
    let c = ok(&[
        "-prefiller-breaker-failures=0",
        "-prefiller-breaker-backoff=250ms",
        "-tokenize-once",
    ]);
    assert_eq!(c.prefiller_breaker.failures, 0);
    assert_eq!(c.prefiller_breaker.backoff, Duration::from_millis(250));
    assert!(c.tokenize_once);
    let e = config(&["-tokenize-once=true", "-connector=sglang"]).unwrap_err();
    assert!(
        e.starts_with("-tokenize-once: needs -connector=nixlv2"),
        "{e}"
    );
}

#[test]
fn klog_flags_without_effect_are_named() {
    let c = ok(&["-log_dir=/var/log", "-vmodule=x=2", "-logtostderr=false"]);
    assert_eq!(c.notices.len(), 3, "{:?}", c.notices);
    assert!(
        c.notices[0].starts_with("-log_dir has no effect"),
        "{:?}",
        c.notices
    );
    assert!(ok(&["-v=6", "-logtostderr"]).notices.is_empty());
}

#[test]
fn tls_flags_are_checked_at_start() {
    let e = config(&["-secure-proxy", "-cert-path=/nonexistent"]).unwrap_err();
    assert!(e.contains("tls.crt"), "{e}");
    assert!(config(&["-tls-ca-file=/nonexistent"]).is_err());
}

#[test]
fn zero_durations_mean_no_limit_or_are_refused() {
    let c = ok(&[
        "-connect-timeout=0s",
        "-prefill-timeout=0",
        "-decode-first-byte-timeout=0s",
        "-header-read-timeout=0ms",
        "-drain-timeout=0s",
    ]);
    assert!(c.prefill_timeout.is_zero() && c.decode_first_byte_timeout.is_zero());
    for flag in [
        "decode-admission-grace",
        "cert-reload-interval",
        "readiness-interval",
    ] {
        let e = config(&[&format!("-{flag}=0s")]).unwrap_err();
        assert_eq!(e, format!("-{flag}: must be positive"));
    }
}

#[test]
fn readiness_and_drain_delay_flags() {
    let c = ok(&[]);
    assert_eq!(
        (c.readiness_interval, c.drain_delay),
        (Duration::from_secs(2), Duration::ZERO),
        "the drain starts at once unless asked"
    );
    let c = ok(&["-readiness-interval=500ms", "--drain-delay", "5s"]);
    assert_eq!(
        (c.readiness_interval, c.drain_delay),
        (Duration::from_millis(500), Duration::from_secs(5))
    );
    let c = ok(&["-configuration={readiness-interval: 1s, drain-delay: 3s}"]);
    assert_eq!(
        (c.readiness_interval, c.drain_delay),
        (Duration::from_secs(1), Duration::from_secs(3))
    );
    assert!(config(&["-drain-delay=soon"]).is_err());
}

#[test]
fn tracing_is_on_with_its_flags_and_off_without() {
    use crate::observe::otel::settings::Protocol;
    assert!(ok(&[]).tracing.is_none());
    // pd-sidecar's switch: OTLP/gRPC to the default collector.
    let t = ok(&["--tracing"]).tracing.expect("on");
    assert_eq!(
        (t.protocol, t.endpoint.as_str()),
        (Protocol::Grpc, "http://localhost:4317")
    );
    // Our older shortcut: OTLP/HTTP to the collector named.
    let t = ok(&["-otlp-endpoint=http://c:4318/"]).tracing.expect("on");
    assert_eq!(
        (t.protocol, t.endpoint.as_str()),
        (Protocol::HttpProtobuf, "http://c:4318/v1/traces")
    );
    assert!(ok(&["--tracing=false"]).tracing.is_none());
    let e = config(&["-otlp-endpoint=collector:4318"]).unwrap_err();
    assert!(e.contains("must be an http(s):// URL"), "{e}");
}
