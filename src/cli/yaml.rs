//! `--configuration` (inline YAML) and `--configuration-file`: pd-sidecar's keys, which are
//! its flag names, and ours. Each key becomes the flag it names, so a YAML value is checked
//! by the same parser as the flag and a bad one is reported under the flag's name.
//!
//! Strict, as pd-sidecar's `UnmarshalStrict`: an unknown key, a nested mapping or a list for
//! a single-valued flag is an error naming the key.

use std::ffi::OsString;

use clap::{ArgAction, Command};
use serde_yaml_ng::Value;

/// Keys that configure the configuration itself, or are not settings.
const NOT_KEYS: [&str; 4] = ["configuration", "configuration-file", "help", "version"];

/// Reads a YAML document (`origin` says which flag gave it) and returns each setting as
/// `(key, --key=value)`. As in pd-sidecar, a zero or empty value means "not set".
pub fn to_args(
    command: &Command,
    text: &str,
    origin: &str,
) -> Result<Vec<(String, OsString)>, String> {
    let doc: Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("{origin}: not valid YAML: {e}"))?;
    let map = match doc {
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(map) => map,
        _ => {
            return Err(format!(
                "{origin}: expected a mapping of flag names to values"
            ))
        }
    };
    let mut out = Vec::new();
    for (key, value) in map {
        let Value::String(key) = key else {
            return Err(format!("{origin}: keys must be flag names (strings)"));
        };
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !NOT_KEYS.contains(&key.as_str()))
            .ok_or_else(|| format!("{origin}: unknown key '{key}'"))?;
        let unset = match &value {
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty(),
            Value::Sequence(items) => items.is_empty(),
            _ => false,
        };
        if unset {
            continue;
        }
        let list = matches!(arg.get_action(), ArgAction::Append);
        let text = match value {
            Value::Sequence(items) if list => items
                .iter()
                .map(|v| scalar(&key, v, origin))
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            Value::Sequence(_) => {
                return Err(format!("{origin}: key '{key}' takes one value, not a list"))
            }
            other => scalar(&key, &other, origin)?,
        };
        let arg = format!("--{key}={text}").into();
        out.push((key, arg));
    }
    Ok(out)
}

fn scalar(key: &str, value: &Value, origin: &str) -> Result<String, String> {
    match value {
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => Ok(s.clone()),
        Value::Null => Err(format!("{origin}: key '{key}' has no value")),
        _ => Err(format!("{origin}: key '{key}' must be a plain value")),
    }
}
