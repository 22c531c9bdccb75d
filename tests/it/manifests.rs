//! The real binary with the exact argument lists (and env) of today's llm-d manifests, each
//! serving a P/D request on the manifest's port in front of a simulated decoder on the
//! manifest's vLLM port.
//!
//! Those ports are fixed (8000, 8200, ...), so each case runs in a network namespace of its
//! own (`unshare -rn`, loopback only): the outer test re-runs this test binary inside it,
//! with `MANIFEST_CASE` naming the case, and the ignored test [`in_namespace`] does the work.
//! The argument lists are copied from the files named in each case (commit noted).

use std::io::Read;
use std::process::{Command, Stdio};

use http_body_util::BodyExt;
use hyper::Request;
use sidecar::upstream::Leg;

use crate::support::otlp::{Receiver, Wire};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-d-routing-sidecar");

/// What a manifest runs, and what it should get.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Where the sidecar listens and where the manifest's vLLM listens.
    listen: u16,
    vllm: u16,
    /// The sidecar serves TLS (the manifest left -secure-proxy at pd-sidecar's default).
    tls: bool,
    /// The start of the startup line's `defaults`.
    defaults: &'static str,
    /// A line the sidecar's log must contain.
    logs: Option<&'static str>,
}

const CHART: &[&str] = &[
    "--port=8000",
    "--vllm-port=8200",
    "--connector=nixlv2",
    "--zap-encoder=json",
    "--zap-log-level=debug",
    "--secure-proxy=false",
];

/// The OTLP/gRPC receiver a case's `OTEL_EXPORTER_OTLP_ENDPOINT` may name.
const COLLECTOR: &str = "http://127.0.0.1:4317";

const CASES: &[Case] = &[
    // llm-d-incubation/llm-d-modelservice 3051935e, charts/llm-d-modelservice/examples/
    // output-{cpu,pd,heterogeneous-pd,pd-mnnvl,pvc,pvc-hf,requester,xpu-pd}.yaml: all eight.
    Case {
        name: "modelservice_chart_examples",
        args: CHART,
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar (because --zap-encoder)",
        logs: None,
    },
    // The same chart with tracing.enabled: templates/_helpers.tpl routingProxy's env, its
    // collector (http://otel-collector:4317) swapped for a gRPC receiver in the namespace.
    Case {
        name: "modelservice_chart_with_tracing",
        args: CHART,
        env: &[
            ("OTEL_SERVICE_NAME", "routing-proxy"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", COLLECTOR),
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
        ],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar",
        logs: Some("tracing on"),
    },
    // llm-d/llm-d 55541149 guides/pd-disaggregation/modelserver/gpu/vllm/base/
    // disaggregatedset.yaml, decode role: no vLLM port flag, vLLM on 8200.
    Case {
        name: "llm_d_pd_guide_decode_pod",
        args: &[
            "--port=8000",
            "--kv-connector=nixlv2",
            "--zap-log-level=1",
            "--secure-proxy=false",
        ],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar (because --kv-connector)",
        logs: None,
    },
    // llm-d/llm-d 9829045e guides/recipes/modelserver/base/single-host/pd/vllm/
    // patch-sidecar.yaml: spells the TLS flag --secure-serving (pd-sidecar rejects it).
    Case {
        name: "llm_d_pd_recipe_sidecar_patch",
        args: &[
            "--port=8000",
            "--kv-connector=nixlv2",
            "--zap-log-level=1",
            "--secure-serving=false",
        ],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar",
        logs: None,
    },
    // llm-d/llm-d guides/pd-disaggregation/modelserver/gpu/vllm/cks-mooncake: the
    // simulators speak Mooncake, the prefiller's bootstrap on the default 8998.
    Case {
        name: "llm_d_pd_guide_mooncake",
        args: &[
            "--port=8000",
            "--vllm-port=8200",
            "--connector=mooncake",
            "--zap-log-level=1",
            "--secure-proxy=false",
        ],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar",
        logs: None,
    },
    // llm-d/llm-d 034b87dc guides/wide-ep-lws/modelserver/gpu/vllm-deepseek-v4/base/decode.yaml.
    Case {
        name: "llm_d_wide_ep_decode",
        args: &[
            "--port=8000",
            "--vllm-port=8200",
            "--connector=nixlv2",
            "--zap-log-level=1",
            "--secure-proxy=false",
            "--enable-prefiller-sampling",
        ],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar",
        logs: None,
    },
    // llm-d/llm-d-router ebab6879 deploy/components/vllm-decode/deployment.yaml, with the
    // kind-dev-env default VLLM_DATA_PARALLEL_SIZE=1.
    Case {
        name: "pd_sidecar_deploy_vllm_decode",
        args: &[
            "--port=8000",
            "--secure-proxy=false",
            "--data-parallel-size=1",
        ],
        env: &[("POD_IP", "127.0.0.1")],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar (because --data-parallel-size)",
        logs: None,
    },
    // The same with VLLM_DATA_PARALLEL_SIZE=2: sidecar ports 8000-8001 before vLLM's 8200-8201.
    Case {
        name: "pd_sidecar_deploy_vllm_decode_dp2",
        args: &[
            "--port=8000",
            "--secure-proxy=false",
            "--data-parallel-size=2",
        ],
        env: &[("POD_IP", "127.0.0.1")],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar (because --data-parallel-size)",
        logs: None,
    },
    // llm-d-router ebab6879 deploy/environments/dev/p-d/patch-decode.yaml (CONNECTOR_TYPE=nixlv2).
    Case {
        name: "pd_sidecar_deploy_dev_p_d",
        args: &[
            "--port=8000",
            "--kv-connector=nixlv2",
            "--mooncake-bootstrap-port=8000",
            "--secure-proxy=false",
            "--data-parallel-size=1",
        ],
        env: &[("POD_IP", "127.0.0.1")],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "pd-sidecar",
        logs: None,
    },
    // llm-d-router ebab6879 test/sidecar/config/base/pod-qwen.yaml: TLS, pd-sidecar's default.
    Case {
        name: "pd_sidecar_test_sidecar_base",
        args: &["--port=8000", "--model-server-port=8001"],
        env: &[],
        listen: 8000,
        vllm: 8001,
        tls: true,
        defaults: "pd-sidecar (because --model-server-port)",
        logs: None,
    },
    // llm-d-router ebab6879 test/sidecar/config/nixl/qwen-decoder-pod.yaml: Go-spelled
    // (pd-sidecar itself rejects it), next to vLLM on 8200 with no port flag.
    Case {
        name: "pd_sidecar_test_sidecar_nixl",
        args: &["-port=8000", "-connector=nixlv2", "-v=6"],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "llm-d-routing-sidecar",
        logs: None,
    },
    // llm-d/llm-d-routing-sidecar 78051b86 test/config/nixl/qwen-decoder-pod.yaml.
    Case {
        name: "go_sidecar_test_config_nixl",
        args: &["-port=8000", "-vllm-port=8200", "-connector=nixlv2", "-v=6"],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "llm-d-routing-sidecar",
        logs: None,
    },
    // llm-d-routing-sidecar 78051b86 test/config/base/pod-qwen.yaml.
    Case {
        name: "go_sidecar_test_config_base",
        args: &["--port=8000", "--vllm-port=8001"],
        env: &[],
        listen: 8000,
        vllm: 8001,
        tls: false,
        defaults: "llm-d-routing-sidecar",
        logs: None,
    },
    // pd-sidecar's own -help example of --configuration (options.go).
    Case {
        name: "inline_configuration",
        args: &["--configuration={port: 8085, model-server-port: 8203}"],
        env: &[],
        listen: 8085,
        vllm: 8203,
        tls: true,
        defaults: "pd-sidecar (because --configuration)",
        logs: None,
    },
    // The default metrics port taken by another container: the sidecar still serves.
    Case {
        name: "metrics_default_port_taken",
        args: &["-port=8000", "-vllm-port=8200"],
        env: &[],
        listen: 8000,
        vllm: 8200,
        tls: false,
        defaults: "llm-d-routing-sidecar",
        logs: Some("serving without /metrics"),
    },
];

/// Runs `case` in a network namespace of its own and checks that it passed there.
fn run(case: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    // Unprivileged with a user namespace (-r); as root, where those are off, without one.
    let mut out = None;
    for flags in ["-rn", "-n"] {
        let attempt = Command::new("unshare")
            .args([flags, "sh", "-c", r#"ip link set lo up && exec "$0" "$@""#])
            .arg(&exe)
            .args([
                "manifests::in_namespace",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MANIFEST_CASE", case)
            .output()
            .expect("unshare (util-linux) runs");
        let refused = String::from_utf8_lossy(&attempt.stderr).starts_with("unshare: ");
        out = Some(attempt);
        if !refused {
            break;
        }
    }
    let out = out.expect("an attempt");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success() && text(&out.stdout).contains("1 passed"),
        "{case} in its namespace:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn modelservice_chart_examples() {
    run("modelservice_chart_examples");
}

#[test]
fn modelservice_chart_with_tracing() {
    run("modelservice_chart_with_tracing");
}

#[test]
fn llm_d_pd_guide_decode_pod() {
    run("llm_d_pd_guide_decode_pod");
}

#[test]
fn llm_d_pd_recipe_sidecar_patch() {
    run("llm_d_pd_recipe_sidecar_patch");
}

#[test]
fn llm_d_pd_guide_mooncake() {
    run("llm_d_pd_guide_mooncake");
}

#[test]
fn llm_d_wide_ep_decode() {
    run("llm_d_wide_ep_decode");
}

#[test]
fn pd_sidecar_deploy_vllm_decode() {
    run("pd_sidecar_deploy_vllm_decode");
}

#[test]
fn pd_sidecar_deploy_vllm_decode_dp2() {
    run("pd_sidecar_deploy_vllm_decode_dp2");
}

#[test]
fn pd_sidecar_deploy_dev_p_d() {
    run("pd_sidecar_deploy_dev_p_d");
}

#[test]
fn pd_sidecar_test_sidecar_base() {
    run("pd_sidecar_test_sidecar_base");
}

#[test]
fn pd_sidecar_test_sidecar_nixl() {
    run("pd_sidecar_test_sidecar_nixl");
}

#[test]
fn go_sidecar_test_config_nixl() {
    run("go_sidecar_test_config_nixl");
}

#[test]
fn go_sidecar_test_config_base() {
    run("go_sidecar_test_config_base");
}

#[test]
fn inline_configuration() {
    run("inline_configuration");
}

#[test]
fn metrics_default_port_taken() {
    run("metrics_default_port_taken");
}

/// The body of every case, run by [`run`] inside the case's namespace.
#[tokio::test]
#[ignore = "run by the manifest tests inside a network namespace"]
async fn in_namespace() {
    let name = std::env::var("MANIFEST_CASE").expect("MANIFEST_CASE");
    let case = CASES.iter().find(|c| c.name == name).expect("a known case");
    let mooncake = case.args.contains(&"--connector=mooncake");
    let protocol = |c: &mut vllm_sim::SimConfig| {
        if mooncake {
            c.protocol = vllm_sim::Protocol::Mooncake;
        }
    };
    let p = sim(|c| {
        protocol(c);
        c.bootstrap_port = if mooncake { 8998 } else { 0 };
    })
    .await;
    let ranks: u16 = case
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--data-parallel-size="))
        .map_or(1, |n| n.parse().expect("a number"));
    let mut base = vllm_sim::SimConfig {
        ttft_ms: 5,
        itl_ms: 1,
        kv_transfer_ms: 1,
        port: case.vllm,
        ..vllm_sim::SimConfig::default()
    };
    protocol(&mut base);
    // vLLM rank i on the manifest's port + i.
    let d = vllm_sim::spawn_ranks(base, ranks)
        .await
        .expect("decoders start");
    // Another container's listener on the sidecar's default metrics port.
    let _squatter = if case.name == "metrics_default_port_taken" {
        Some(std::net::TcpListener::bind("0.0.0.0:9090").expect("bind 9090"))
    } else {
        None
    };
    let traced = case
        .env
        .contains(&("OTEL_EXPORTER_OTLP_ENDPOINT", COLLECTOR));
    let mut collector = match traced {
        true => Some(Receiver::start_on("127.0.0.1:4317".parse().expect("addr"), Wire::Grpc).await),
        false => None,
    };
    let mut child = Command::new(BIN)
        .args(case.args)
        .envs(case.env.iter().copied())
        .env_remove("RUST_LOG")
        .env_remove("INFERENCE_POOL")
        .env_remove("ENABLE_PREFILLER_SAMPLING")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sidecar starts");
    let event = readiness(&mut child).await;
    assert_eq!(event["event"], "listening", "{event}");
    assert_eq!(event["port"], case.listen, "{event}");

    // P/D on every rank's port, each decoded by its own vLLM rank.
    for rank in 0..ranks {
        let (status, body) = pd_request(case, case.listen + rank, &p).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(
            counter(&sim_state(&p).await, "leases_pulled"),
            i64::from(rank) + 1
        );
        assert_eq!(
            counter(&sim_state(&d[usize::from(rank)]).await, "requests_total"),
            1
        );
    }

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("exit");
    let mut logs = String::new();
    let _ = exit.stderr.as_slice().read_to_string(&mut logs);
    assert_eq!(exit.status.code(), Some(0), "{logs}");
    let listening = logs
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no startup line in {logs}"));
    assert!(
        listening.contains(&format!("defaults: {}", case.defaults))
            || listening.contains(&format!("\"defaults\":\"{}", case.defaults))
            || listening.contains(&format!("defaults=\"{}", case.defaults)),
        "{listening}"
    );
    if let Some(wanted) = case.logs {
        assert!(logs.contains(wanted), "no '{wanted}' in {logs}");
    }
    // With no flag, the chart's environment alone traced the request; SIGTERM flushed it.
    if let Some(collector) = &mut collector {
        let spans = collector.received();
        let mut names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "POST /v1/completions",
                "llm_d.pd_proxy.decode",
                "llm_d.pd_proxy.prefill"
            ],
            "{spans:#?}"
        );
        assert!(
            spans.iter().all(|s| s.service == "routing-proxy"),
            "{spans:#?}"
        );
    }
}

/// A P/D completion to the case's sidecar on `port`, over TLS when it serves TLS.
async fn pd_request(case: &Case, port: u16, p: &vllm_sim::SimServer) -> (u16, bytes::Bytes) {
    let scheme = if case.tls { "https" } else { "http" };
    let req = Request::post(format!("{scheme}://127.0.0.1:{port}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-prefiller-host-port", p.api_addr().to_string())
        .body(sidecar::body::full(r#"{"prompt":"a b c","max_tokens":2}"#))
        .expect("request");
    let client = tls_client(insecure_tls());
    let resp = tokio::time::timeout(LIMIT, client.send(Leg::Decode, req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}
