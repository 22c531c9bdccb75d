//! The command line as both Go sidecars' manifests write it.

use super::*;

fn parse(args: &[&str]) -> Result<Parsed, CliError> {
    parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
}

fn ok(args: &[&str]) -> Parsed {
    parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn err(args: &[&str]) -> String {
    match parse(args) {
        Ok(_) => panic!("{args:?} parsed"),
        Err(CliError::Clap(e)) => first_line(&e),
        Err(CliError::Configuration(e)) => e,
    }
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
        &[
            "-port=9000",
            "-model-server-port=9001",
            "-kv-connector=lmcache",
        ],
        &[
            "--port",
            "9000",
            "--model-server-port",
            "9001",
            "--kv-connector",
            "lmcache",
        ],
    ] {
        let a = ok(args).args;
        assert_eq!(a.port, 9000, "{args:?}");
        assert_eq!(a.vllm_port.or(a.model_server_port), Some(9001), "{args:?}");
        assert_eq!(a.connector.or(a.kv_connector).as_deref(), Some("lmcache"));
    }
}

#[test]
fn the_profile_follows_the_spelling() {
    for args in [
        &["-port=8000", "-vllm-port=8001", "-connector=nixlv2", "-v=6"][..],
        &["--port=8000", "--vllm-port=8001"],
        &[
            "-secure-proxy=false",
            "-inference-pool-name=p",
            "-metrics-port=0",
        ],
    ] {
        assert_eq!(ok(args).profile, Profile::GoSidecar, "{args:?}");
    }
    for (args, because) in [
        (
            &["--port=8000", "--kv-connector=nixlv2"][..],
            "--kv-connector",
        ),
        (
            &["--port=8000", "--vllm-port=8200", "--zap-encoder=json"],
            "--zap-encoder",
        ),
        (&["--model-server-port=8200"], "--model-server-port"),
        (&["--configuration={port: 8085}"], "--configuration"),
        (&["--data-parallel-size=1"], "--data-parallel-size"),
        (
            &["--enable-prefiller-sampling"],
            "--enable-prefiller-sampling",
        ),
    ] {
        assert_eq!(
            ok(args).profile,
            Profile::PdSidecar {
                because: because.into()
            },
            "{args:?}"
        );
    }
    // The environment alone does not choose: a Go-era manifest may set INFERENCE_POOL.
    assert_eq!(ok(&[]).profile, Profile::GoSidecar);
}

#[test]
fn booleans_are_bare_or_assigned() {
    assert!(ok(&["-enable-ssrf-protection"]).args.enable_ssrf_protection);
    assert_eq!(ok(&["-secure-proxy=false"]).args.secure_proxy, Some(false));
    assert_eq!(ok(&["--secure-proxy=T"]).args.secure_proxy, Some(true));
    assert_eq!(
        ok(&["--secure-serving=false"]).args.secure_proxy,
        Some(false)
    );
    assert_eq!(ok(&[]).args.secure_proxy, None);
    assert!(ok(&["--zap-devel"]).args.zap_devel);
    assert!(err(&["-secure-proxy=maybe"]).contains("secure-proxy"));
}

#[test]
fn stage_lists_take_commas_and_repeats() {
    let a = ok(&[
        "--enable-tls=prefiller,decoder",
        "--tls-insecure-skip-verify",
        "encoder",
    ])
    .args;
    assert_eq!(a.enable_tls, [TlsStage::Prefiller, TlsStage::Decoder]);
    assert_eq!(a.tls_insecure_skip_verify, [TlsStage::Encoder]);
    let a = ok(&["--enable-tls=prefiller", "--enable-tls=decoder"]).args;
    assert_eq!(a.enable_tls, [TlsStage::Prefiller, TlsStage::Decoder]);
    assert!(err(&["--enable-tls=prefill"]).contains("enable-tls"));
}

#[test]
fn zap_flags_parse_as_zap_and_bad_values_name_the_flag() {
    let a = ok(&[
        "--zap-encoder=console",
        "--zap-log-level=debug",
        "--zap-time-encoding=iso8601",
        "--zap-stacktrace-level=panic",
    ])
    .args;
    assert_eq!(a.zap_encoder, Some(LogFormat::Text));
    assert_eq!(a.zap_log_level, Some(LogLevel::Verbosity(1)));
    assert_eq!(a.zap_time_encoding, Some(LogTime::Rfc3339));
    for (args, flag) in [
        (&["--zap-log-level=verbose"][..], "--zap-log-level"),
        (&["--zap-log-level=0"], "--zap-log-level"),
        (&["--zap-encoder=text"], "--zap-encoder"),
        (&["--zap-time-encoding=unix"], "--zap-time-encoding"),
        (&["--zap-stacktrace-level=warn"], "--zap-stacktrace-level"),
        (&["--zap-devel=sometimes"], "--zap-devel"),
    ] {
        let e = err(args);
        assert!(e.contains(flag), "{args:?}: {e}");
    }
}

#[test]
fn every_pd_sidecar_flag_parses() {
    // llm-d-router ebab6879 pkg/sidecar/proxy/options.go, every flag with a valid value.
    let a = ok(&[
        "--port=8000",
        "--model-server-port=8200",
        "--vllm-port=8200",
        "--data-parallel-size=1",
        "--kv-connector=nixlv2",
        "--ec-connector=",
        "--mooncake-bootstrap-port=8998",
        "--p2p-connector-port=7777",
        "--enable-p2p-pull=false",
        "--secure-proxy=false",
        "--cert-path=",
        "--enable-tls=decoder",
        "--tls-insecure-skip-verify=decoder",
        "--enable-ssrf-protection=false",
        "--inference-pool=ns/pool",
        "--pool-group=inference.networking.x-k8s.io",
        "--enable-prefiller-sampling=true",
        "--max-idle-conns-per-host=1024",
        "--prefill-max-retries=2",
        "--prefill-retry-backoff=1s",
        "--decode-chunk-size=0",
        "--tracing=false",
        "--metrics-port=9091",
        "--zap-devel=false",
        "--zap-encoder=json",
        "--zap-log-level=4",
        "--zap-stacktrace-level=error",
        "--zap-time-encoding=rfc3339nano",
        "--moriio-write-mode=false",
        "--moriio-parallel-dispatch=false",
        "--moriio-parallel-decode-wait-timeout=30s",
        "--moriio-local-pod-ip=10.0.0.1",
        "--moriio-decode-notify-port=61005",
        "--moriio-decode-handshake-port=6301",
        "--moriio-prefill-handshake-port=6301",
        "--moriio-prefill-notify-port=61005",
        "--moriio-tp-size=1",
        "--moriio-dp-size=1",
        "--moriio-dp-size-local=0",
        "--moriio-remote-hosts=",
        "--moriio-decode-hosts=",
    ])
    .args;
    assert_eq!(a.prefill_max_retries, 2);
    assert_eq!(a.prefill_retry_backoff, Duration::from_secs(1));
    assert_eq!(a.max_idle_conns_per_host, 1024);
    assert!(a.enable_prefiller_sampling);
}

#[test]
fn every_go_sidecar_flag_parses() {
    // llm-d-routing-sidecar 78051b86 cmd/llm-d-routing-sidecar/main.go, flag and klog.
    ok(&[
        "-port=8000",
        "-vllm-port=8001",
        "-connector=nixl",
        "-prefiller-use-tls",
        "-decoder-use-tls=false",
        "-prefiller-tls-insecure-skip-verify",
        "-decoder-tls-insecure-skip-verify=false",
        "-secure-proxy=false",
        "-cert-path=",
        "-enable-ssrf-protection=false",
        "-inference-pool-namespace=ns",
        "-inference-pool-name=pool",
        "-v=6",
        "-vmodule=proxy=5",
        "-logtostderr=true",
        "-alsologtostderr=false",
        "-log_dir=/tmp",
        "-log_file=/tmp/x",
        "-log_file_max_size=1800",
        "-one_output=false",
        "-skip_headers=false",
        "-skip_log_headers=false",
        "-stderrthreshold=2",
        "-add_dir_header=false",
        "-log_backtrace_at=proxy.go:1",
    ]);
}

#[test]
fn yaml_sits_below_the_command_line_and_above_the_default() {
    let p = ok(&[
        "--configuration={port: 8085, model-server-port: 8203, enable-tls: [decoder], secure-proxy: false}",
        "--port=9000",
    ]);
    assert_eq!(p.args.port, 9000);
    assert_eq!(p.source("port"), Source::CommandLine);
    assert_eq!(p.args.model_server_port, Some(8203));
    assert_eq!(p.source("model-server-port"), Source::Configuration);
    assert_eq!(p.args.enable_tls, [TlsStage::Decoder]);
    assert_eq!(p.args.secure_proxy, Some(false));
    assert_eq!(p.source("vllm-port"), Source::Default);
    // Our own flags are keys too.
    let p = ok(&["--configuration=prefill-timeout: 5s\nconnector: lmcache\n"]);
    assert_eq!(p.args.prefill_timeout, Duration::from_secs(5));
    assert_eq!(p.args.connector.as_deref(), Some("lmcache"));
}

#[test]
fn yaml_is_strict() {
    for (yaml, wanted) in [
        ("{prot: 8000}", "unknown key 'prot'"),
        ("{port: http}", "--port"),
        ("{port: [1, 2]}", "'port' takes one value"),
        ("{port: ~}", "'port' has no value"),
        ("{enable-tls: {a: b}}", "'enable-tls' must be a plain value"),
        ("[port, 8000]", "expected a mapping"),
        ("{port: 1, port: 2}", "not valid YAML"),
        ("{configuration: x}", "unknown key 'configuration'"),
        ("{1: 2}", "keys must be flag names"),
        ("{kv-connector: nixlv2", "not valid YAML"),
    ] {
        let e = err(&[&format!("--configuration={yaml}")]);
        assert!(e.starts_with("-configuration"), "{yaml}: {e}");
        assert!(e.contains(wanted), "{yaml}: {e}");
    }
    assert!(ok(&["--configuration="]).args.configuration.is_some());
}

#[test]
fn configuration_file_and_inline_are_exclusive() {
    let dir = std::env::temp_dir().join(format!("sidecar-yaml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.yaml");
    std::fs::write(&file, "port: 8085\nkv-connector: shared-storage\n").unwrap();
    let path = file.to_string_lossy().into_owned();
    let p = ok(&[&format!("--configuration-file={path}")]);
    assert_eq!(p.args.port, 8085);
    assert_eq!(p.args.kv_connector.as_deref(), Some("shared-storage"));
    let e = err(&[
        &format!("--configuration-file={path}"),
        "--configuration={port: 1}",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = err(&["--configuration-file=/nonexistent/sidecar.yaml"]);
    assert!(
        e.starts_with("-configuration-file /nonexistent/sidecar.yaml"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_values_are_errors() {
    for (args, flag) in [
        (&["-port=http"][..], "--port"),
        (&["-port=65536"], "--port"),
        (&["-model-server-port=0"], "--model-server-port"),
        (&["-vllm-port=0"], "--vllm-port"),
        (&["-data-parallel-size=0"], "--data-parallel-size"),
        (&["-mooncake-bootstrap-port=0"], "--mooncake-bootstrap-port"),
        (&["-p2p-connector-port=70000"], "--p2p-connector-port"),
        (&["-prefill-max-retries=-1"], "--prefill-max-retries"),
        (&["-prefill-retry-backoff=soon"], "--prefill-retry-backoff"),
        (&["-max-request-body-size=0"], "--max-request-body-size"),
        (&["-worker-threads=0"], "--worker-threads"),
        (&["-max-header-count=2000000000"], "--max-header-count"),
        (&["-max-connections=5000000000"], "--max-connections"),
        (&["-no-such-flag"], "--no-such-flag"),
    ] {
        let e = err(args);
        assert!(e.contains(flag), "{args:?}: {e}");
    }
    assert_eq!(
        ok(&["--max-idle-conns-per-host=-1"])
            .args
            .max_idle_conns_per_host,
        -1
    );
}

#[test]
fn help_is_requested_by_every_spelling() {
    for h in ["-h", "-help", "--help"] {
        match parse(&[h]) {
            Err(CliError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp)
            }
            other => panic!("{h}: {other:?}"),
        }
    }
}

#[test]
fn help_names_old_flags_as_such() {
    let help = Args::command().render_long_help().to_string();
    for (old, current) in [
        ("--vllm-port", "-model-server-port"),
        ("--connector", "-kv-connector"),
        ("--prefiller-use-tls", "-enable-tls=prefiller"),
        ("--inference-pool-name", "-inference-pool"),
    ] {
        let line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(old))
            .nth(1)
            .unwrap_or_default();
        assert!(line.contains(current), "{old}: {line}");
    }
}

#[test]
fn yaml_zeros_mean_unset_as_in_pd_sidecar() {
    let p = ok(&["--configuration={port: 0, model-server-port: 0, cert-path: '', enable-tls: []}"]);
    assert_eq!(p.args.port, 8000);
    assert_eq!(p.args.model_server_port, None);
    assert_eq!(p.source("port"), Source::Default);
}

#[test]
fn a_flag_given_twice_takes_the_last_value() {
    assert_eq!(ok(&["--port=8000", "--port=8001"]).args.port, 8001);
    assert_eq!(ok(&["-v=2", "-v", "5"]).args.verbosity, 5);
}

#[test]
fn a_value_may_start_with_a_dash() {
    let a = ok(&["-max-idle-conns-per-host", "-1", "-port", "9"]).args;
    assert_eq!((a.max_idle_conns_per_host, a.port), (-1, 9));
}

#[test]
fn flag_variables_sit_below_yaml_and_name_themselves_when_bad() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let parse = |args: &[&str], vars| {
        parse_with_env(
            std::iter::once("sidecar").chain(args.iter().copied()),
            env(vars),
        )
    };
    let p = parse(
        &[],
        &[
            ("ENABLE_PREFILLER_SAMPLING", "true"),
            ("P2P_CONNECTOR_PORT", "7000"),
        ],
    )
    .unwrap();
    assert!(p.args.enable_prefiller_sampling);
    assert_eq!(p.args.p2p_connector_port, 7000);
    assert_eq!(p.source("enable-prefiller-sampling"), Source::Environment);
    // Empty is unset; YAML and the command line win.
    let p = parse(
        &[
            "--configuration={p2p-connector-port: 7100}",
            "--enable-prefiller-sampling=false",
        ],
        &[
            ("ENABLE_PREFILLER_SAMPLING", "true"),
            ("P2P_CONNECTOR_PORT", "7000"),
            ("MOONCAKE_BOOTSTRAP_PORT", ""),
        ],
    )
    .unwrap();
    assert!(!p.args.enable_prefiller_sampling);
    assert_eq!(p.args.p2p_connector_port, 7100);
    assert_eq!(p.args.mooncake_bootstrap_port, 8998);
    for (var, value) in [
        ("ENABLE_PREFILLER_SAMPLING", "maybe"),
        ("MOONCAKE_BOOTSTRAP_PORT", "0"),
        ("P2P_CONNECTOR_PORT", "http"),
    ] {
        let vars: &'static [(&'static str, &'static str)] =
            Box::leak(vec![(var, value)].into_boxed_slice());
        match parse(&[], vars) {
            Err(CliError::Configuration(e)) => {
                assert!(e.starts_with(&format!("{var}=\"{value}\"")), "{e}")
            }
            other => panic!("{var}={value}: {other:?}"),
        }
    }
}
