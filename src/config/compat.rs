//! The rules that make both sidecars' command lines mean what they meant: which of a renamed
//! pair wins, the defaults the [`Profile`] chooses, flags that ask for a feature this sidecar
//! does not have, and klog flags that have no effect here.
//!
//! Precedence is pd-sidecar's: command line > `--configuration` > environment > default. Of
//! a renamed pair, the rule is pd-sidecar's for that pair (see each function).

use crate::cli::{Parsed, Profile, Source, TlsStage};
use crate::connector::Connector;
use crate::encode::EcConnector;
use crate::observe::logging::{LogFormat, LogLevel, LogSettings, LogTime};

use super::ConfigError;

/// vLLM's port when no flag names it: pd-sidecar's default since llm-d-router#1723, which
/// today's llm-d guides rely on. The Go sidecar's was 8001, but every Go-era manifest found
/// sets it, and pd-sidecar's own Go-spelled test pod runs vLLM on 8200 without it.
pub const DEFAULT_MODEL_SERVER_PORT: u16 = 8200;

/// The admin listener's port when no flag names it (pd-sidecar has no default listener).
pub const DEFAULT_METRICS_PORT: u16 = 9090;

/// The defaults that differ between the profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileDefaults {
    /// `-secure-proxy`: both Go sidecars serve TLS by default; this sidecar, spelled as the
    /// Go sidecar is in its README (`-port=8000 -vllm-port=8001`, then curl), plain HTTP.
    pub secure_proxy: bool,
    /// pd-sidecar always writes JSON lines; the Go sidecar wrote klog text.
    pub log_format: LogFormat,
}

pub fn defaults(profile: &Profile) -> ProfileDefaults {
    match profile {
        Profile::GoSidecar => ProfileDefaults {
            secure_proxy: false,
            log_format: LogFormat::Text,
        },
        Profile::PdSidecar { .. } => ProfileDefaults {
            secure_proxy: true,
            log_format: LogFormat::Json,
        },
    }
}

/// The startup log's account of the defaults in force.
pub fn describe(profile: &Profile) -> String {
    match profile {
        Profile::GoSidecar => "llm-d-routing-sidecar (Go sidecar flags only)".to_string(),
        Profile::PdSidecar { because } => format!("pd-sidecar (because {because})"),
    }
}

/// The set candidate of highest precedence, with the flag that gave it.
fn pick<T: Clone>(
    parsed: &Parsed,
    candidates: &[(&'static str, Option<T>)],
) -> Option<(&'static str, T)> {
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, (flag, value))| {
            let value = value.as_ref()?;
            Some(((parsed.source(flag), i), (*flag, value.clone())))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, picked)| picked)
}

/// `--model-server-port` > `--vllm-port` (each from the command line, then YAML) > default.
pub fn model_server_port(parsed: &Parsed) -> (&'static str, u16) {
    let a = &parsed.args;
    pick(
        parsed,
        &[
            ("model-server-port", a.model_server_port),
            ("vllm-port", a.vllm_port),
        ],
    )
    .unwrap_or(("model-server-port", DEFAULT_MODEL_SERVER_PORT))
}

/// `--kv-connector` (from anywhere) > `--connector` > `nixlv2`, as pd-sidecar's migration
/// did.
pub fn connector(parsed: &Parsed) -> Result<Connector, ConfigError> {
    let a = &parsed.args;
    let picked = match (&a.kv_connector, &a.connector) {
        (Some(name), _) => Some(("kv-connector", name)),
        (None, Some(name)) => Some(("connector", name)),
        (None, None) => None,
    };
    let Some((flag, name)) = picked else {
        return Ok(Connector::NixlV2);
    };
    name.parse()
        .map_err(|e: String| ConfigError::Invalid { flag, reason: e })
}

/// TLS per leg: `--enable-tls` stages together with the old per-leg booleans.
pub struct LegTls {
    pub prefiller: bool,
    pub decoder: bool,
    /// Encoders named without a scheme (`-enable-tls=encoder`).
    pub encoder: bool,
    pub prefiller_skip_verify: bool,
    pub decoder_skip_verify: bool,
}

pub fn leg_tls(parsed: &Parsed) -> LegTls {
    let a = &parsed.args;
    // An old boolean from YAML counts only if the command line set neither it nor the list
    // (pd-sidecar's rule); from the command line it always counts.
    let old = |flag: &str, value: bool, list: &str| match parsed.source(flag) {
        Source::Configuration => value && parsed.source(list) != Source::CommandLine,
        _ => value,
    };
    LegTls {
        prefiller: old("prefiller-use-tls", a.prefiller_use_tls, "enable-tls")
            || a.enable_tls.contains(&TlsStage::Prefiller),
        decoder: old("decoder-use-tls", a.decoder_use_tls, "enable-tls")
            || a.enable_tls.contains(&TlsStage::Decoder),
        encoder: a.enable_tls.contains(&TlsStage::Encoder),
        prefiller_skip_verify: old(
            "prefiller-tls-insecure-skip-verify",
            a.prefiller_tls_insecure_skip_verify,
            "tls-insecure-skip-verify",
        ) || a.tls_insecure_skip_verify.contains(&TlsStage::Prefiller),
        decoder_skip_verify: old(
            "decoder-tls-insecure-skip-verify",
            a.decoder_tls_insecure_skip_verify,
            "tls-insecure-skip-verify",
        ) || a.tls_insecure_skip_verify.contains(&TlsStage::Decoder),
    }
}

/// The InferencePool `(namespace, name)`: `--inference-pool` (`INFERENCE_POOL`) from
/// anywhere, else the old `-inference-pool-namespace` + `-inference-pool-name` pair, as
/// pd-sidecar's migration did.
pub fn inference_pool(parsed: &Parsed) -> Result<Option<(String, String)>, ConfigError> {
    let a = &parsed.args;
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    let Some(value) = nonempty(&a.inference_pool) else {
        return Ok(
            match (
                nonempty(&a.inference_pool_namespace),
                nonempty(&a.inference_pool_name),
            ) {
                (Some(ns), Some(name)) => Some((ns, name)),
                _ => None,
            },
        );
    };
    let parts: Vec<&str> = value.split('/').collect();
    let invalid = |reason: &str| ConfigError::Invalid {
        flag: "inference-pool",
        reason: format!("'{value}' {reason}"),
    };
    match parts.as_slice() {
        [name] if !name.is_empty() => Ok(Some(("default".into(), (*name).into()))),
        [ns, name] if !ns.is_empty() && !name.is_empty() => {
            Ok(Some(((*ns).into(), (*name).into())))
        }
        [_, _] => Err(invalid("has an empty namespace or name")),
        _ => Err(invalid("must be namespace/name or name")),
    }
}

/// Logging: `-v` or `--zap-log-level` (the command line's wins), `-log-format` or
/// `--zap-encoder`, zap's development mode, then the profile's default.
pub fn log_settings(parsed: &Parsed, defaults: ProfileDefaults) -> LogSettings {
    let a = &parsed.args;
    let level = match (
        a.zap_log_level,
        parsed.source("v") < parsed.source("zap-log-level"),
    ) {
        (Some(level), false) => level,
        _ if parsed.is_set("v") => LogLevel::Verbosity(a.verbosity),
        // zap's development mode logs at its debug level: logr V(1).
        _ if a.zap_devel => LogLevel::Verbosity(1),
        _ => LogLevel::Verbosity(a.verbosity),
    };
    let format = pick(
        parsed,
        &[("log-format", a.log_format), ("zap-encoder", a.zap_encoder)],
    )
    .map_or(
        if a.zap_devel {
            LogFormat::Text
        } else {
            defaults.log_format
        },
        |(_, f)| f,
    );
    LogSettings {
        level,
        format,
        time: a.zap_time_encoding.unwrap_or(LogTime::Rfc3339),
    }
}

/// `-ec-connector` and `-decode-chunk-size`, checked.
pub fn encode_and_chunking(parsed: &Parsed) -> Result<(Option<EcConnector>, u32), ConfigError> {
    let a = &parsed.args;
    let ec = match a.ec_connector.as_str() {
        "" => None,
        "ec-example" => Some(EcConnector::Example),
        "ec-nixl" => Some(EcConnector::Nixl),
        other => {
            return Err(ConfigError::Invalid {
                flag: "ec-connector",
                reason: format!(
                    "'{other}' is not an encoder connector (use ec-example or ec-nixl)"
                ),
            })
        }
    };
    let chunk = u32::try_from(a.decode_chunk_size).map_err(|_| ConfigError::Invalid {
        flag: "decode-chunk-size",
        reason: format!(
            "{} is out of range (0 turns chunked decode off)",
            a.decode_chunk_size
        ),
    })?;
    // Encoder legs share the prefill legs' client, so they verify certificates as it does.
    if a.tls_insecure_skip_verify.contains(&TlsStage::Encoder)
        && !a.tls_insecure_skip_verify.contains(&TlsStage::Prefiller)
    {
        return Err(ConfigError::Invalid {
            flag: "tls-insecure-skip-verify",
            reason: "encoder legs share the prefiller legs' TLS client: use prefiller,encoder"
                .into(),
        });
    }
    Ok((ec, chunk))
}

/// Flags asking for a pd-sidecar feature this sidecar does not have yet: each refused with
/// one line naming it, so a manifest never runs without what it asked for.
pub fn refuse_unbuilt(parsed: &Parsed) -> Result<(), ConfigError> {
    let a = &parsed.args;
    let not_built = |flag: String, what: &'static str| Err(ConfigError::NotBuilt { flag, what });
    let m = &a.moriio;
    let moriio_set = m.write_mode
        || m.parallel_dispatch
        || m.dp_size > 1
        || m.dp_size_local > 0
        || !m.remote_hosts.is_empty()
        || !m.decode_hosts.is_empty();
    if moriio_set {
        return not_built("-moriio-*".into(), "AMD MoRI-IO WRITE mode and Wide-EP");
    }
    Ok(())
}

/// Flags accepted for compatibility that change nothing here, named at startup (a flag that
/// seems to work but does not is worse than none).
pub fn notices(parsed: &Parsed) -> Vec<String> {
    let k = &parsed.args.klog;
    let mut out = Vec::new();
    let mut no_effect = |flag: &str, why: &str| out.push(format!("{flag} has no effect: {why}"));
    for (flag, set) in [
        ("-log_dir", k.log_dir.is_some()),
        ("-log_file", k.log_file.is_some()),
        ("-log_file_max_size", k.log_file_max_size.is_some()),
        ("-logtostderr=false", !k.logtostderr),
        ("-alsologtostderr", k.alsologtostderr),
        ("-one_output", k.one_output),
        ("-stderrthreshold", k.stderrthreshold.is_some()),
    ] {
        if set {
            no_effect(flag, "logs always go to stderr");
        }
    }
    for (flag, set) in [
        ("-vmodule", k.vmodule.is_some()),
        ("-skip_headers", k.skip_headers),
        ("-skip_log_headers", k.skip_log_headers),
        ("-add_dir_header", k.add_dir_header),
        ("-log_backtrace_at", k.log_backtrace_at.is_some()),
    ] {
        if set {
            no_effect(flag, "use RUST_LOG for per-module levels");
        }
    }
    if parsed.args.zap_stacktrace_level.is_some() {
        no_effect("-zap-stacktrace-level", "the sidecar logs no stack traces");
    }
    if parsed.args.moriio.local_pod_ip.is_some() {
        no_effect("-moriio-local-pod-ip", "MoRI-IO is not built");
    }
    out
}
