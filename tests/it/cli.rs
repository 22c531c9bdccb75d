//! The binary as users run it: Go-style flags, help, errors, and SIGTERM.

use std::io::{BufRead, BufReader};
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
        &["-connector=sglang"][..],
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
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let _ = tx.send(event);
    });
    let event = tokio::time::timeout(LIMIT, rx).await.unwrap().unwrap();
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
