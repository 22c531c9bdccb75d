//! Tracing settings, resolved once at startup from the OpenTelemetry environment variables
//! (as the OpenTelemetry specification names them) and the sidecar's flags.
//!
//! The environment is read through a lookup function, not `std::env`, so each in-process test
//! sidecar has settings of its own and every rule here is unit-tested. A value that cannot be
//! used is ignored with a notice (the specification's rule for environment variables); the
//! flags' values are checked by the caller, which refuses to start on a bad one.

use std::time::Duration;

/// Where spans go and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

/// `OTEL_TRACES_SAMPLER` and its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedRatio(f64),
}

/// The batching of spans (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub max_queue: usize,
    pub max_batch: usize,
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
}

/// Everything the exporter and the tracer are built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub protocol: Protocol,
    /// gRPC: `scheme://host:port`; HTTP: the full traces URL.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` but `service.name`.
    pub resource: Vec<(String, String)>,
    pub sampler: SamplerSetting,
    pub batching: Batching,
}

/// What the flags say about tracing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags<'a> {
    /// `--tracing` (pd-sidecar's switch).
    pub tracing: bool,
    /// `-otlp-endpoint` (a base URL, OTLP/HTTP unless the environment names a protocol).
    pub otlp_endpoint: Option<&'a str>,
}

/// The resolved settings (`None`: tracing is off) and what to warn about at startup.
#[derive(Debug, Default)]
pub struct Resolved {
    pub settings: Option<Settings>,
    pub notices: Vec<String>,
}

/// pd-sidecar's service name, so traces land where its users look for them.
pub const DEFAULT_SERVICE_NAME: &str = "llm-d-disagg-sidecar";
/// pd-sidecar's default sampling ratio.
pub const DEFAULT_RATIO: f64 = 0.1;

/// Resolves the settings from `env` (a variable's value, `None` if unset) and `flags`.
pub fn resolve(env: &dyn Fn(&str) -> Option<String>, flags: Flags<'_>) -> Resolved {
    // The specification: an empty value is as if the variable were unset.
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut notices = Vec::new();
    let asked_by_flags = flags.tracing || flags.otlp_endpoint.is_some();
    let off = |why: String, notices: &mut Vec<String>| {
        if asked_by_flags {
            notices.push(format!("tracing is off: {why}"));
        }
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        off("OTEL_SDK_DISABLED=true".into(), &mut notices);
        return Resolved {
            settings: None,
            notices,
        };
    }
    let exporters: Vec<String> = var("OTEL_TRACES_EXPORTER")
        .map(|v| {
            v.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if exporters.iter().any(|e| e == "none") {
        off("OTEL_TRACES_EXPORTER=none".into(), &mut notices);
        return Resolved {
            settings: None,
            notices,
        };
    }
    for other in exporters.iter().filter(|e| *e != "otlp") {
        notices.push(format!(
            "OTEL_TRACES_EXPORTER={other} is not supported (only otlp is built); ignored"
        ));
    }
    let otlp_named = exporters.iter().any(|e| e == "otlp");
    if !exporters.is_empty() && !otlp_named {
        off(
            "no supported exporter in OTEL_TRACES_EXPORTER".into(),
            &mut notices,
        );
        return Resolved {
            settings: None,
            notices,
        };
    }
    let endpoint_env = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if !(asked_by_flags || otlp_named || endpoint_env) {
        return Resolved {
            settings: None,
            notices,
        };
    }

    let protocol = signal_var(&var, "PROTOCOL")
        .and_then(|(name, v)| match v.trim() {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            "http/json" => Some(Protocol::HttpJson),
            other => {
                notices.push(format!(
                    "{name}={other} is not a protocol (grpc, http/protobuf, http/json); ignored"
                ));
                None
            }
        })
        .unwrap_or(if flags.otlp_endpoint.is_some() {
            // The flag has always meant OTLP/HTTP.
            Protocol::HttpProtobuf
        } else {
            // pd-sidecar's, and the llm-d chart's collector port 4317.
            Protocol::Grpc
        });
    let insecure =
        signal_var(&var, "INSECURE").is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("true"));
    let endpoint = endpoint(&var, flags.otlp_endpoint, protocol, insecure);
    let mut headers = Vec::new();
    for name in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Some(v) = var(name) {
            for (k, value) in pairs(&v) {
                headers.retain(|(have, _): &(String, String)| !have.eq_ignore_ascii_case(&k));
                headers.push((k, value));
            }
        }
    }
    let timeout = signal_var(&var, "TIMEOUT")
        .and_then(|(name, v)| millis(&name, &v, &mut notices))
        .unwrap_or(Duration::from_secs(10));
    if let Some((name, v)) = signal_var(&var, "COMPRESSION") {
        if v.trim() != "none" {
            notices.push(format!(
                "{name}={v} is not supported (no compression is built); spans go uncompressed"
            ));
        }
    }
    let mut resource = var("OTEL_RESOURCE_ATTRIBUTES")
        .map(|v| pairs(&v))
        .unwrap_or_default();
    let from_resource = resource
        .iter()
        .position(|(k, _)| k == "service.name")
        .map(|i| resource.remove(i).1);
    let service_name = var("OTEL_SERVICE_NAME")
        .or(from_resource)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    let sampler = sampler(&var, &mut notices);
    let batching = batching(&var, &mut notices);
    Resolved {
        settings: Some(Settings {
            protocol,
            endpoint,
            headers,
            timeout,
            service_name,
            resource,
            sampler,
            batching,
        }),
        notices,
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_<suffix>`, else `OTEL_EXPORTER_OTLP_<suffix>`, with its name.
fn signal_var(var: &dyn Fn(&str) -> Option<String>, suffix: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
        format!("OTEL_EXPORTER_OTLP_{suffix}"),
    ]
    .into_iter()
    .find_map(|name| var(&name).map(|v| (name, v)))
}

fn endpoint(
    var: &dyn Fn(&str) -> Option<String>,
    flag: Option<&str>,
    protocol: Protocol,
    insecure: bool,
) -> String {
    let with_scheme = |e: &str| {
        let e = e.trim();
        if e.contains("://") {
            e.to_string()
        } else if insecure {
            format!("http://{e}")
        } else {
            format!("https://{e}")
        }
    };
    let traces_path = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
    let http = protocol != Protocol::Grpc;
    if let Some(flag) = flag {
        let base = with_scheme(flag);
        return if http { traces_path(&base) } else { base };
    }
    if let Some(e) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        // A signal's own endpoint is used as given.
        return with_scheme(&e);
    }
    if let Some(e) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        let base = with_scheme(&e);
        return if http { traces_path(&base) } else { base };
    }
    if http {
        "http://localhost:4318/v1/traces".into()
    } else {
        "http://localhost:4317".into()
    }
}

/// `k=v,k2=v2` (W3C Baggage's list format), values percent-decoded; malformed pairs skipped.
fn pairs(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
            Some((k.to_string(), v.into_owned()))
        })
        .collect()
}

fn millis(name: &str, value: &str, notices: &mut Vec<String>) -> Option<Duration> {
    // A day at most: a deadline further out would overflow the clock's arithmetic.
    match value.trim().parse::<u64>() {
        Ok(ms) if ms <= 86_400_000 => Some(Duration::from_millis(ms)),
        _ => {
            notices.push(format!(
                "{name}={value} is not milliseconds (up to a day); ignored"
            ));
            None
        }
    }
}

fn sampler(var: &dyn Fn(&str) -> Option<String>, notices: &mut Vec<String>) -> SamplerSetting {
    let ratio = |notices: &mut Vec<String>| match var("OTEL_TRACES_SAMPLER_ARG") {
        None => DEFAULT_RATIO,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                notices.push(format!(
                    "OTEL_TRACES_SAMPLER_ARG={v} is not a ratio in [0, 1]; using {DEFAULT_RATIO}"
                ));
                DEFAULT_RATIO
            }
        },
    };
    let name = var("OTEL_TRACES_SAMPLER").map(|s| s.trim().to_ascii_lowercase());
    match name.as_deref() {
        None | Some("parentbased_traceidratio") => SamplerSetting::ParentBasedRatio(ratio(notices)),
        Some("traceidratio") => SamplerSetting::Ratio(ratio(notices)),
        Some("always_on") => SamplerSetting::AlwaysOn,
        Some("always_off") => SamplerSetting::AlwaysOff,
        Some("parentbased_always_on") => SamplerSetting::ParentBasedAlwaysOn,
        Some("parentbased_always_off") => SamplerSetting::ParentBasedAlwaysOff,
        Some(other) => {
            notices.push(format!(
                "OTEL_TRACES_SAMPLER={other} is not supported; using parentbased_traceidratio"
            ));
            SamplerSetting::ParentBasedRatio(ratio(notices))
        }
    }
}

/// The largest queue or batch taken from the environment: beyond it a typo would allocate
/// (or overflow) instead of tracing.
const MAX_COUNT: usize = 1 << 20;

fn batching(var: &dyn Fn(&str) -> Option<String>, notices: &mut Vec<String>) -> Batching {
    let count = |name: &str, default: usize, notices: &mut Vec<String>| match var(name) {
        None => default,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 && n <= MAX_COUNT => n,
            _ => {
                notices.push(format!(
                    "{name}={v} is not a count from 1 to {MAX_COUNT}; using {default}"
                ));
                default
            }
        },
    };
    let ms = |name: &str, default: u64, notices: &mut Vec<String>| {
        var(name)
            .and_then(|v| millis(name, &v, notices))
            .unwrap_or(Duration::from_millis(default))
    };
    let max_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048, notices);
    // The specification: a batch larger than the queue is cut to the queue's size.
    let max_batch = count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, notices).min(max_queue);
    Batching {
        max_queue,
        max_batch,
        schedule_delay: ms("OTEL_BSP_SCHEDULE_DELAY", 5000, notices),
        export_timeout: ms("OTEL_BSP_EXPORT_TIMEOUT", 30000, notices),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--tracing`, and no `-otlp-endpoint`.
    const TRACING: Flags<'static> = Flags {
        tracing: true,
        otlp_endpoint: None,
    };

    fn with(vars: &[(&str, &str)], flags: Flags<'_>) -> Resolved {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(
            &move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            flags,
        )
    }

    fn on(vars: &[(&str, &str)], flags: Flags<'_>) -> Settings {
        with(vars, flags).settings.expect("tracing is on")
    }

    #[test]
    fn off_unless_the_environment_or_a_flag_asks() {
        assert!(with(&[], Flags::default()).settings.is_none());
        assert!(with(&[("OTEL_SERVICE_NAME", "x")], Flags::default())
            .settings
            .is_none());
        assert!(with(&[("OTEL_TRACES_EXPORTER", "otlp")], Flags::default())
            .settings
            .is_some());
        assert!(with(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
            Flags::default()
        )
        .settings
        .is_some());
        assert!(with(&[], TRACING).settings.is_some());
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_TRACES_EXPORTER", "console"),
        ] {
            let r = with(&[off], TRACING);
            assert!(r.settings.is_none(), "{off:?}");
            assert!(
                r.notices.iter().any(|n| n.contains("tracing is off")),
                "{off:?}: {:?}",
                r.notices
            );
        }
        // An empty value is unset.
        assert!(with(&[("OTEL_TRACES_EXPORTER", "")], Flags::default())
            .settings
            .is_none());
    }

    #[test]
    fn the_llm_d_charts_environment() {
        let s = on(
            &[
                ("OTEL_SERVICE_NAME", "routing-proxy"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            ],
            Flags::default(),
        );
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.endpoint, "http://otel-collector:4317");
        assert_eq!(s.service_name, "routing-proxy");
        assert_eq!(s.sampler, SamplerSetting::ParentBasedRatio(1.0));
    }

    #[test]
    fn protocol_and_endpoint_follow_the_specification() {
        assert_eq!(on(&[], TRACING).endpoint, "http://localhost:4317");
        let http = on(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")], TRACING);
        assert_eq!(http.protocol, Protocol::HttpProtobuf);
        assert_eq!(http.endpoint, "http://localhost:4318/v1/traces");
        let s = on(
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ],
            TRACING,
        );
        assert_eq!(s.protocol, Protocol::HttpJson);
        assert_eq!(s.endpoint, "http://c:4318/v1/traces");
        // A signal's own endpoint is taken as given.
        let s = on(
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
            ],
            TRACING,
        );
        assert_eq!(s.endpoint, "http://t:9/custom");
        // -otlp-endpoint: OTLP/HTTP under /v1/traces, and it beats the environment.
        let s = on(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")],
            Flags {
                otlp_endpoint: Some("http://flag:4318"),
                ..Flags::default()
            },
        );
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.endpoint, "http://flag:4318/v1/traces");
        // No scheme: https unless insecure.
        let s = on(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")], TRACING);
        assert_eq!(s.endpoint, "https://c:4317");
        let s = on(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
            ],
            TRACING,
        );
        assert_eq!(s.endpoint, "http://c:4317");
        let r = with(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")], TRACING);
        assert_eq!(r.settings.expect("on").protocol, Protocol::Grpc);
        assert!(
            r.notices.iter().any(|n| n.contains("thrift")),
            "{:?}",
            r.notices
        );
    }

    #[test]
    fn headers_timeout_and_resource() {
        let s = on(
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,x=1"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X=2"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "service.name=from-resource,k8s.pod.name=decode-0,bad",
                ),
            ],
            TRACING,
        );
        assert_eq!(
            s.headers,
            vec![
                ("api-key".to_string(), "a b".to_string()),
                ("X".to_string(), "2".to_string())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.service_name, "from-resource");
        assert_eq!(
            s.resource,
            vec![("k8s.pod.name".to_string(), "decode-0".to_string())]
        );
        assert_eq!(on(&[], TRACING).service_name, DEFAULT_SERVICE_NAME);
    }

    #[test]
    fn samplers_and_batching() {
        let sampler = |vars: &[(&str, &str)]| on(vars, TRACING).sampler;
        assert_eq!(sampler(&[]), SamplerSetting::ParentBasedRatio(0.1));
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]),
            SamplerSetting::AlwaysOff
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5")
            ]),
            SamplerSetting::Ratio(0.5)
        );
        let r = with(&[("OTEL_TRACES_SAMPLER_ARG", "2")], TRACING);
        assert_eq!(
            r.settings.expect("on").sampler,
            SamplerSetting::ParentBasedRatio(0.1)
        );
        assert!(!r.notices.is_empty());
        let b = on(
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "20"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ],
            TRACING,
        )
        .batching;
        assert_eq!(b.schedule_delay, Duration::from_millis(20));
        assert_eq!((b.max_queue, b.max_batch), (100, 100));
        assert_eq!(b.export_timeout, Duration::from_secs(30));
    }

    #[test]
    fn values_that_would_overflow_or_allocate_without_bound_are_ignored() {
        let r = with(
            &[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "18446744073709551615"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "99999999999"),
                ("OTEL_BSP_SCHEDULE_DELAY", "18446744073709551615"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "18446744073709551615"),
            ],
            TRACING,
        );
        let s = r.settings.expect("on");
        assert_eq!((s.batching.max_queue, s.batching.max_batch), (2048, 512));
        assert_eq!(s.batching.schedule_delay, Duration::from_secs(5));
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(r.notices.len(), 4, "{:?}", r.notices);
        // The specification's booleans ignore case.
        let s = on(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE"),
            ],
            Flags::default(),
        );
        assert_eq!(s.endpoint, "http://collector:4317");
    }
}
