//! The binary as users run it: Go-style flags, help, errors, and SIGTERM.

use std::process::{Command, Stdio};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-d-routing-sidecar");

#[test]
fn help_names_every_flag_and_exits_zero() {
    for flag in ["-help", "--help", "-h"] {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
        let text = String::from_utf8(out.stdout).unwrap();
        for name in [
            "--port",
            "--vllm-port",
            "--connector",
            "--max-request-body-size",
            "--drain-timeout",
            "--connect-timeout",
            "--v ",
            "--secure-proxy",
            "--cert-path",
            "--prefiller-use-tls",
            "--decoder-use-tls",
            "--enable-ssrf-protection",
            "--inference-pool-name",
        ] {
            assert!(text.contains(name), "{name} missing from help:\n{text}");
        }
    }
}

#[test]
fn bad_values_exit_non_zero_with_one_line() {
    for args in [
        &["-connector=vllm"][..],
        &["-port=http"],
        &["-no-such-flag"],
        &["-secure-proxy=perhaps"],
        &["-secure-proxy", "-cert-path=/nonexistent"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("llm-d-routing-sidecar: "), "{err}");
    }
}

#[tokio::test]
async fn runs_with_go_style_flags_and_exits_zero_on_sigterm() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let mut child = Command::new(BIN)
        .args([
            "-port=0",
            "-bind-address=127.0.0.1",
            "-vllm-host",
            "127.0.0.1",
            &format!("-vllm-port={}", d.api_addr().port()),
            "-connector=nixlv2",
            "-secure-proxy=false",
            "-v=4",
            // Port 9090 may be taken on a shared machine; tests/metrics.rs covers the admin port.
            "-metrics-port=0",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The readiness line: `{"event":"listening","port":N,...}`, once the port accepts.
    let event = readiness(&mut child).await;
    assert_eq!(event["event"], "listening", "{event}");
    let port = u16::try_from(event["port"].as_u64().unwrap()).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (resp, body) = call_pd(addr, &p, r#"{"prompt":"hi","max_tokens":2}"#).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn manifests_that_ask_for_unbuilt_features_exit_2_naming_the_flag() {
    for (args, wanted) in [
        // llm-d/llm-d guides/pd-disaggregation/modelserver/amd/vllm/moriio.
        (
            &[
                "--port=8000",
                "--vllm-port=8200",
                "--kv-connector=nixlv2",
                "--zap-log-level=1",
                "--secure-proxy=false",
                "--moriio-write-mode",
                "--moriio-tp-size=2",
                "--moriio-parallel-dispatch",
                "--moriio-local-pod-ip=10.0.0.1",
            ][..],
            "-moriio-*: AMD MoRI-IO",
        ),
        (&["--zap-log-level=verbose"], "--zap-log-level"),
        (&["--configuration={prot: 8000}"], "unknown key 'prot'"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
}

#[test]
fn a_port_that_cannot_be_bound_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for args in [
        vec![format!("-port={port}"), "-metrics-port=0".into()],
        // An explicit metrics port is the operator's wish: failing it fails the start.
        vec!["-port=0".into(), format!("-metrics-port={port}")],
    ] {
        let out = Command::new(BIN)
            .args(["-bind-address=127.0.0.1"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        let last = err
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(last.starts_with("llm-d-routing-sidecar: -"), "{err}");
        assert!(
            last.contains(&format!("cannot bind 127.0.0.1:{port}")),
            "{err}"
        );
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_is_ignored_and_streams_go_on() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 20).await;
    let (mut child, addr) = spawn_binary(&[
        "-vllm-host=127.0.0.1".into(),
        format!("-vllm-port={}", d.api_addr().port()),
    ])
    .await;
    let mut stream = send_pd(addr, &p, r#"{"prompt":"x","max_tokens":20,"stream":true}"#).await;
    assert!(stream.next_data().await.is_some(), "the stream started");
    signal(&child, "HUP");
    let mut events = 1;
    while let Some(chunk) = stream.next_data().await {
        events += 1;
        if chunk.ends_with(b"[DONE]\n\n") {
            break;
        }
    }
    assert!(events > 10, "the stream was cut after {events} events");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the sidecar"
    );
    // Still serving new requests.
    let (resp, _) = call_pd(addr, &p, r#"{"prompt":"x","max_tokens":1}"#).await;
    assert_eq!(resp.status(), 200);
    signal(&child, "TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
