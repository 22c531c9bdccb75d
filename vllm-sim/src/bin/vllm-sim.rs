//! `vllm-sim`: a simulated vLLM instance for P/D tests (see `vllm_sim`).

use clap::Parser;
use std::io::Write;
use vllm_sim::{spawn, SimArgs};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Plain text when stderr is captured to a file (test harnesses read these logs).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = SimArgs::parse().into_config();
    let server = match spawn(cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "failed to bind");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Machine-readable readiness line for harnesses using ephemeral ports (spec §7.2).
    let line = serde_json::json!({
        "event": "listening",
        "port": server.api_addr().port(),
        "side_channel_port": server.side_channel_addr().port(),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    std::process::ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
