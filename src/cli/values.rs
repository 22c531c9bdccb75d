//! Flag value syntaxes: Go's booleans and durations, byte sizes, TLS stages and zap's logging
//! values, each rejecting what its Go original rejects.

use std::time::Duration;

use crate::observe::logging::{LogFormat, LogLevel, LogTime};

/// Go's `strconv.ParseBool` spellings.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("'{other}' is not a boolean (use true or false)")),
    }
}

/// `30s`, `500ms`, `1m30s`, `1.5h`, or a bare number of seconds: Go's `time.ParseDuration`
/// syntax (pd-sidecar's `--prefill-retry-backoff`), plus bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("'' is not a duration (e.g. 30s, 500ms)".into());
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{s}' is out of range"));
    }
    let mut rest = text;
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 500ms)"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => {
                return Err(format!(
                    "'{s}' has an unknown unit (use ns, us, ms, s, m or h)"
                ))
            }
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("'{s}' is out of range"))
}

/// A byte count with an optional binary or decimal suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 32MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "KiB" | "Ki" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" | "Mi" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" | "Gi" => 1 << 30,
        _ => return Err(format!("'{s}' has an unknown unit (use KiB, MiB or GiB)")),
    };
    value
        .checked_mul(scale)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

/// A leg TLS applies to (`--enable-tls`, `--tls-insecure-skip-verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStage {
    Prefiller,
    Decoder,
    /// Encoder calls (E/PD); accepted for pd-sidecar's manifests.
    Encoder,
}

pub fn parse_tls_stage(s: &str) -> Result<TlsStage, String> {
    match s.trim() {
        "prefiller" => Ok(TlsStage::Prefiller),
        "decoder" => Ok(TlsStage::Decoder),
        "encoder" => Ok(TlsStage::Encoder),
        other => Err(format!(
            "'{other}' is not a stage (use prefiller, decoder or encoder)"
        )),
    }
}

/// `--zap-log-level`: zap's names, or N > 0 for logr verbosity N (as `-v=N`). zap's `debug`
/// is logr's V(1), so it shows what pd-sidecar shows with it: info lines.
pub fn parse_zap_level(s: &str) -> Result<LogLevel, String> {
    match s.to_ascii_lowercase().as_str() {
        "info" => Ok(LogLevel::Verbosity(0)),
        "debug" => Ok(LogLevel::Verbosity(1)),
        "error" => Ok(LogLevel::Errors),
        "panic" => Ok(LogLevel::Off),
        _ => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(LogLevel::Verbosity(u8::try_from(n).unwrap_or(u8::MAX))),
            _ => Err(format!(
                "invalid log level \"{s}\" (use debug, info, error, panic or an integer > 0)"
            )),
        },
    }
}

/// `--zap-encoder`: `json`, or `console` for text lines.
pub fn parse_zap_encoder(s: &str) -> Result<LogFormat, String> {
    match s.to_ascii_lowercase().as_str() {
        "json" => Ok(LogFormat::Json),
        "console" => Ok(LogFormat::Text),
        _ => Err(format!(
            "invalid encoder value \"{s}\" (use json or console)"
        )),
    }
}

/// `--zap-stacktrace-level`: validated as zap does; the sidecar logs no stack traces.
pub fn parse_zap_stacktrace(s: &str) -> Result<String, String> {
    match s.to_ascii_lowercase().as_str() {
        level @ ("info" | "error" | "panic") => Ok(level.to_string()),
        _ => Err(format!(
            "invalid stacktrace level \"{s}\" (use info, error or panic)"
        )),
    }
}

/// `--zap-time-encoding`.
pub fn parse_zap_time(s: &str) -> Result<LogTime, String> {
    match s.to_ascii_lowercase().as_str() {
        "epoch" => Ok(LogTime::Epoch),
        "millis" => Ok(LogTime::Millis),
        // zap's own name is `nanos`; controller-runtime's help says `nano`.
        "nano" | "nanos" => Ok(LogTime::Nanos),
        "iso8601" | "rfc3339" | "rfc3339nano" => Ok(LogTime::Rfc3339),
        _ => Err(format!(
            "invalid time-encoding \"{s}\" (use epoch, millis, nanos, iso8601, rfc3339 or rfc3339nano)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_go_syntax_and_bare_seconds() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("1.5µs").unwrap(), Duration::from_nanos(1500));
        for bad in ["3 days", "", "ms", "5x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("5").unwrap(), 5);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn zap_values_are_zaps() {
        assert_eq!(parse_zap_level("debug"), Ok(LogLevel::Verbosity(1)));
        assert_eq!(parse_zap_level("INFO"), Ok(LogLevel::Verbosity(0)));
        assert_eq!(parse_zap_level("4"), Ok(LogLevel::Verbosity(4)));
        assert_eq!(parse_zap_level("1000"), Ok(LogLevel::Verbosity(255)));
        assert_eq!(parse_zap_level("error"), Ok(LogLevel::Errors));
        assert_eq!(parse_zap_level("panic"), Ok(LogLevel::Off));
        for bad in ["0", "-1", "warn", "verbose", ""] {
            assert!(parse_zap_level(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_zap_encoder("console"), Ok(LogFormat::Text));
        assert!(parse_zap_encoder("text").is_err());
        assert!(parse_zap_stacktrace("warn").is_err());
        assert_eq!(parse_zap_time("nano"), Ok(LogTime::Nanos));
        assert_eq!(parse_zap_time("nanos"), Ok(LogTime::Nanos));
        assert!(parse_zap_time("unix").is_err());
    }
}
