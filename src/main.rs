//! `llm-d-routing-sidecar`: parse flags, set up logs, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use std::time::Duration;

use sidecar::{admin, cli, logging, otlp, server, Config};

/// Keeps large request bodies' memory in the process. glibc's defaults hand a freed block at
/// the top of the heap back to the kernel once it exceeds twice the largest body seen, then
/// fault it back in, page by page, for the next one: a 400 KB prompt cost ~100 page faults
/// per request. Freed memory up to the trim threshold stays mapped for reuse instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
    let (otlp, exporter) = match config
        .otlp_endpoint
        .as_deref()
        .map(|e| otlp::pipeline(e, Duration::from_secs(2)))
    {
        Some(Ok((layer, exporter))) => (Some(layer), Some(exporter)),
        Some(Err(e)) => {
            eprintln!("llm-d-routing-sidecar: {e}");
            return ExitCode::from(2);
        }
        None => (None, None),
    };
    logging::init(config.verbosity, config.log_format, otlp);
    let runtime = match build_runtime(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-d-routing-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        if let Some(exporter) = exporter {
            tokio::spawn(exporter.run());
        }
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

/// One thread (`-worker-threads=1`, or one available core): a current-thread runtime, which
/// skips the multi-thread scheduler's cross-thread queues and wake-ups. Otherwise a
/// multi-thread runtime with one worker per thread asked for (default: per available core).
fn build_runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
