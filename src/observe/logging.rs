//! Log setup: a verbosity (klog's `-v`, zap's `--zap-log-level`), overridden by `RUST_LOG` when
//! set; text or JSON lines; the timestamp format zap's `--zap-time-encoding` names.

use std::str::FromStr;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written (`-log-format`, `--zap-encoder`).
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

/// Which events are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// klog/logr verbosity: 0-3 info, 4 debug (routing decisions), 5 and more trace (bodies).
    Verbosity(u8),
    /// Errors only (zap's `error`).
    Errors,
    /// Nothing (zap's `panic`: the sidecar does not panic). Startup failures still print.
    Off,
}

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel::Verbosity(0)
    }
}

impl LogLevel {
    /// The `EnvFilter` directive for this level.
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Verbosity(0..=3) => "warn,sidecar=info",
            LogLevel::Verbosity(4) => "warn,sidecar=debug",
            LogLevel::Verbosity(_) => "warn,sidecar=trace",
            LogLevel::Errors => "error",
            LogLevel::Off => "off",
        }
    }
}

/// The timestamp on each line (`--zap-time-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogTime {
    /// RFC 3339 in UTC with microseconds (zap's `iso8601`, `rfc3339`, `rfc3339nano`).
    #[default]
    Rfc3339,
    /// Seconds since the Unix epoch, fractional (zap's `epoch`).
    Epoch,
    /// Milliseconds since the epoch, fractional (zap's `millis`).
    Millis,
    /// Nanoseconds since the epoch, an integer (zap's `nano`).
    Nanos,
}

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        match self {
            LogTime::Rfc3339 => SystemTime.format_time(w),
            LogTime::Epoch => write!(w, "{:.6}", since.as_secs_f64()),
            LogTime::Millis => write!(w, "{:.3}", since.as_secs_f64() * 1e3),
            LogTime::Nanos => write!(w, "{}", since.as_nanos()),
        }
    }
}

/// Everything about logging the flags decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogSettings {
    pub level: LogLevel,
    pub format: LogFormat,
    pub time: LogTime,
}

/// Installs the global subscriber, writing to stderr. Safe to call more than once.
pub fn init(settings: LogSettings) {
    // Colour codes would garble logs collected by Kubernetes or parsed by scripts.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing::subscriber::set_global_default(subscriber(settings, ansi, std::io::stderr));
}

/// The subscriber [`init`] installs, writing to `writer`; tests capture logs with it.
pub fn subscriber<W>(
    settings: LogSettings,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.level.directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_timer(settings.time)
        .with_target(false);
    match settings.format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).fmt_fields(text_fields()).finish()),
        // The span list carries the request span's ids on lines logged inside a leg's span.
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// `name=value` fields, the event's message first without its name, as the default formatter
/// writes them but without its styling pass per field: every request's span is formatted
/// whether or not a line is logged, so this is on every request's path.
fn text_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| match field.name() {
        "message" => write!(w, "{value:?}"),
        name => write!(w, "{name}={value:?}"),
    })
    .delimited(" ")
}
