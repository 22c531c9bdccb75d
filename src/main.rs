//! `llm-d-routing-sidecar`: parse flags, set up logs, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use sidecar::{admin, cli, logging, server, Config};

fn main() -> ExitCode {
    let args = match cli::parse_from(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => return cli::report(e),
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("llm-d-routing-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.verbosity, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-d-routing-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        if let Some(addr) = config.metrics_listen {
            let admin = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("-metrics-port: cannot bind {addr}: {e}"))
            })?;
            // Runs until the process exits, so metrics stay scrapeable during the drain.
            tokio::spawn(admin::serve(admin, config.metrics.clone()));
        }
        server::run(config, listener, server::shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-d-routing-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
