//! `vllm-sim`: a simulated vLLM instance for P/D tests (see `vllm_sim`).

use clap::Parser;
use std::io::Write;
use vllm_sim::{spawn_ranks, SimArgs};

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
    let args = SimArgs::parse();
    let ranks = args.data_parallel_size;
    let encoder = args.mm_encoder_only;
    let servers = match spawn_ranks(args.into_config(), ranks).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "failed to bind");
            return std::process::ExitCode::FAILURE;
        }
    };
    let Some(first) = servers.first() else {
        return std::process::ExitCode::FAILURE;
    };
    // Machine-readable readiness line for harnesses using ephemeral ports (spec §7.2); rank 0's
    // ports at the top level, every rank's under `ranks` when there are several, and
    // `mm_encoder_only` on an encoder (§7.23) so a harness can tell E from P/D instances.
    let mut line = serde_json::json!({
        "event": "listening",
        "port": first.api_addr().port(),
        "side_channel_port": first.side_channel_addr().port(),
    });
    if encoder {
        line["mm_encoder_only"] = true.into();
    }
    if servers.len() > 1 {
        line["ranks"] = servers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "port": s.api_addr().port(),
                    "side_channel_port": s.side_channel_addr().port(),
                })
            })
            .collect();
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    wait_for_signal().await;
    tracing::info!("shutting down");
    for server in servers {
        server.shutdown().await;
    }
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
