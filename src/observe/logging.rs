//! Log setup: klog-style `-v` levels, overridden by `RUST_LOG` when set; text or JSON lines.

use std::str::FromStr;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::EnvFilter;

use crate::observe::otlp::OtlpLayer;

/// How log lines are written (`-log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; a request's span fields (request id, trace id) prefix each line.
    #[default]
    Text,
    /// One JSON object per line, with the request's span fields under `spans`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("'{other}' is not a log format (use text or json)")),
        }
    }
}

/// Installs the global subscriber, writing to stderr. Safe to call more than once.
pub fn init(verbosity: u8, format: LogFormat, otlp: Option<OtlpLayer>) {
    // Colour codes would garble logs collected by Kubernetes or parsed by scripts.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing::subscriber::set_global_default(subscriber(
        verbosity,
        format,
        ansi,
        std::io::stderr,
        otlp,
    ));
}

/// The subscriber [`init`] installs, writing to `writer`; tests capture logs with it.
pub fn subscriber<W>(
    verbosity: u8,
    format: LogFormat,
    ansi: bool,
    writer: W,
    otlp: Option<OtlpLayer>,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let level = match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,sidecar={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish().with(otlp)),
        // The span list carries the request span's ids on lines logged inside a leg's span.
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .finish()
                .with(otlp),
        ),
    }
}
