//! `--configuration` (inline YAML) and `--configuration-file`: pd-sidecar's keys, which are
//! its flag names, and ours. Each key becomes the flag it names, so a YAML value is checked
//! by the same parser as the flag and a bad one is reported under the flag's name.
//!
//! Strict, as pd-sidecar's `UnmarshalStrict`: an unknown key, a nested mapping or a list for
//! a single-valued flag is an error naming the key.

use std::collections::HashSet;
use std::ffi::OsString;

use clap::{ArgAction, Command};
use serde_yaml_ng::Value;

/// Keys that configure the configuration itself, or are not settings.
const NOT_KEYS: [&str; 4] = ["configuration", "configuration-file", "help", "version"];

/// Reads the YAML document `source` names (`--configuration` text or `--configuration-file`
/// path) and returns it as `--key=value` arguments, leaving out keys in `on_command_line`
/// (flags win over YAML).
pub fn to_args(
    command: &Command,
    text: &str,
    origin: &str,
    on_command_line: &HashSet<String>,
) -> Result<Vec<OsString>, String> {
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
        if on_command_line.contains(&key) {
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
        out.push(format!("--{key}={text}").into());
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
