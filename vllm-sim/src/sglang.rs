//! `--protocol sglang` (§7.18): SGLang's PD protocol as the sidecar drives it. Both legs
//! get the same body with top-level `bootstrap_host`, `bootstrap_port`, `bootstrap_room`;
//! the instance's `--role` says which leg it serves. The room is the lease key.

use super::config::{Role, SimConfig};
use super::handoff::{join_host_port, non_empty, port, Invalid, Leg, OnTimeout, Target};
use serde_json::{Map, Value};
use std::time::Duration;

/// Top-level fields known under this protocol (not listed in `ignored_fields`).
pub const FIELDS: &[&str] = &["bootstrap_host", "bootstrap_port", "bootstrap_room"];

fn field(param: &'static str, message: &str) -> Invalid {
    Invalid::Field {
        param,
        message: message.into(),
    }
}

/// The room as a decimal string: any JSON integer (SGLang's is a 64-bit int).
fn room(v: Option<&Value>) -> Result<String, Invalid> {
    match v {
        None | Some(Value::Null) => Err(field(
            "bootstrap_room",
            "Disaggregated request received without bootstrap room id",
        )),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(_) => Err(field("bootstrap_room", "Input should be a valid integer")),
    }
}

pub fn classify(cfg: &SimConfig, body: &Map<String, Value>) -> Result<Leg, Invalid> {
    if cfg.role == Role::Auto {
        // SGLang without --disaggregation-mode serves the request and ignores the fields.
        return Ok(Leg::Plain);
    }
    let host = non_empty(body.get("bootstrap_host")).ok_or_else(|| {
        field(
            "bootstrap_host",
            "bootstrap_host should be a non-empty string",
        )
    })?;
    let p = port(body.get("bootstrap_port")).ok_or_else(|| {
        field(
            "bootstrap_port",
            "bootstrap_port should be an integer between 1 and 65535",
        )
    })?;
    let key = room(body.get("bootstrap_room"))?;
    Ok(match cfg.role {
        Role::Prefill | Role::Auto => Leg::Prefill { key },
        Role::Decode => Leg::Decode(Target {
            endpoint: join_host_port(host, p),
            key,
            engine_check: None,
            wait: Duration::from_millis(cfg.bootstrap_timeout_ms),
            on_timeout: OnTimeout::Fail,
            abort_notify: false,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(role: Role) -> SimConfig {
        SimConfig {
            protocol: super::super::config::Protocol::Sglang,
            role,
            ..SimConfig::default()
        }
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn roles_and_fields() {
        let b =
            body(json!({"bootstrap_host": "::1", "bootstrap_port": 8998, "bootstrap_room": 42}));
        assert!(matches!(classify(&cfg(Role::Auto), &b), Ok(Leg::Plain)));
        match classify(&cfg(Role::Prefill), &b) {
            Ok(Leg::Prefill { key }) => assert_eq!(key, "42"),
            _ => panic!("prefill expected"),
        }
        match classify(&cfg(Role::Decode), &b) {
            Ok(Leg::Decode(t)) => {
                assert_eq!(t.endpoint, "[::1]:8998");
                assert_eq!(t.key, "42");
                assert_eq!(t.on_timeout, OnTimeout::Fail);
            }
            _ => panic!("decode expected"),
        }
        let bad = |v: Value| match classify(&cfg(Role::Decode), &body(v)) {
            Err(Invalid::Field { param, .. }) => param,
            _ => "ok",
        };
        assert_eq!(
            bad(json!({"bootstrap_port": 1, "bootstrap_room": 1})),
            "bootstrap_host"
        );
        assert_eq!(
            bad(json!({"bootstrap_host": "h", "bootstrap_port": 0, "bootstrap_room": 1})),
            "bootstrap_port"
        );
        assert_eq!(
            bad(json!({"bootstrap_host": "h", "bootstrap_port": 1})),
            "bootstrap_room"
        );
        assert_eq!(
            bad(json!({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 1.5})),
            "bootstrap_room"
        );
        assert_eq!(
            bad(json!({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": -7})),
            "ok"
        );
    }
}
