//! `llm-d-routing-sidecar`: flags → config → logs → runtime → assembly → bind → serve until
//! SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use sidecar::observe::{admin, logging};
use sidecar::runtime::alloc;
use sidecar::{cli, server, App, Config};

fn main() -> ExitCode {
    alloc::tune_allocator();
    let parsed = match cli::parse_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => return cli::report(e),
    };
    let config = match Config::try_from(parsed) {
        Ok(config) => config,
        Err(e) => return fail(2, &e.to_string()),
    };
    logging::init(config.log);
    for notice in &config.notices {
        tracing::warn!("{notice}");
    }
    let runtime = match server::build_runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        let (listen, metrics_listen) = (config.listen, config.metrics_listen);
        let metrics_defaulted = config.metrics_port_defaulted;
        let app = App::build(config).await.map_err(|e| e.to_string())?;
        // Data-parallel rank i on -port + i (the range was checked with the flags).
        let mut listeners = Vec::with_capacity(app.ranks());
        for rank in 0..app.ranks() {
            let addr = SocketAddr::new(listen.ip(), listen.port() + rank as u16);
            listeners.push(bind("-port", addr).await?);
        }
        let admin = match metrics_listen {
            None => None,
            // The default port may be another container's in the pod: serving matters more.
            Some(addr) if metrics_defaulted => bind("-metrics-port", addr)
                .await
                .inspect_err(|e| tracing::warn!("{e}; serving without /metrics"))
                .ok(),
            Some(addr) => Some(bind("-metrics-port", addr).await?),
        };
        let admin_port = admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port());
        if let Some(admin) = admin {
            // Runs until the process exits, so metrics stay scrapeable during the drain.
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(admin::serve_with_readiness(
                admin,
                app.metrics().clone(),
                app.readiness().clone(),
            ));
        }
        // The first SIGTERM/SIGINT turns /readyz to 503 (and drains after -drain-delay); a
        // second one cuts the delay short. Handled from before the readiness line.
        let (shutdown, again) = server::shutdown_signals();
        announce(&listeners, admin_port);
        app.serve_ranks_with(listeners, shutdown, again)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e),
    }
}

async fn bind(flag: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{flag}: cannot bind {addr}: {e}"))
}

/// The machine-readable readiness line on stdout, as `vllm-sim` prints: scripts and tests
/// wait for it (and read the ports from it) instead of parsing log text. `ports` lists every
/// data-parallel rank's (`port` is rank 0's).
fn announce(listeners: &[tokio::net::TcpListener], metrics_port: Option<u16>) {
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or_default())
        .collect();
    let line = serde_json::json!({
        "event": "listening",
        "port": ports.first(),
        "ports": ports,
        "metrics_port": metrics_port,
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("llm-d-routing-sidecar: {message}");
    ExitCode::from(code)
}
