//! Fault injection (§7.11): parsed from the `x-sim-fault` header or `POST /sim/config`.

use serde_json::{json, Map, Value};

/// The set of active faults for one request (instance faults merged with header faults).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    pub prefill_http: Option<u16>,
    pub decode_http: Option<u16>,
    /// An encoder-only instance's answer to its chat requests (§7.23), which are plain
    /// requests with no `x-sim-*` header, so this is mostly set through `/sim/config`.
    pub encode_http: Option<u16>,
    pub omit_kv_params: bool,
    pub null_kv_params: bool,
    pub drop_before_headers: bool,
    pub drop_after_tokens: Option<u64>,
    pub stall_ms: Option<u64>,
    pub side_channel_down: bool,
    pub dead: bool,
}

impl Faults {
    /// Applies one fault by name; `on == false` clears it. Unknown names are errors.
    fn set(&mut self, name: &str, arg: Option<u64>, on: bool) -> Result<(), String> {
        let code = |prefix: &str| -> Option<u16> {
            name.strip_prefix(prefix)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (100..=599).contains(c))
        };
        if let Some(c) = code("prefill_http_") {
            self.prefill_http = on.then_some(c);
            return Ok(());
        }
        if let Some(c) = code("decode_http_") {
            self.decode_http = on.then_some(c);
            return Ok(());
        }
        if let Some(c) = code("encode_http_") {
            self.encode_http = on.then_some(c);
            return Ok(());
        }
        let need_arg = || arg.ok_or_else(|| format!("fault {name} needs a numeric argument"));
        match name {
            "omit_kv_params" => self.omit_kv_params = on,
            "null_kv_params" => self.null_kv_params = on,
            "drop_before_headers" => self.drop_before_headers = on,
            "side_channel_down" => self.side_channel_down = on,
            "dead" => self.dead = on,
            "drop_after_tokens" => {
                self.drop_after_tokens = if on { Some(need_arg()?) } else { None }
            }
            "stall_ms" => self.stall_ms = if on { Some(need_arg()?) } else { None },
            _ => return Err(format!("unknown fault {name:?}")),
        }
        Ok(())
    }

    /// Parses `name[:n][,name[:n]...]` as sent in `x-sim-fault`.
    pub fn parse_list(&mut self, s: &str) -> Result<(), String> {
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, arg) = match item.split_once(':') {
                Some((n, a)) => {
                    let a = a
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| format!("bad fault argument in {item:?}"))?;
                    (n.trim(), Some(a))
                }
                None => (item, None),
            };
            self.set(name, arg, true)?;
        }
        Ok(())
    }

    /// Merge-patches from `{"name": true|false|null|<n>, ...}` or replaces from a list of
    /// `"name[:n]"` strings.
    pub fn patch(&mut self, v: &Value) -> Result<(), String> {
        match v {
            Value::Null => *self = Faults::default(),
            Value::Array(items) => {
                let mut f = Faults::default();
                for it in items {
                    let s = it.as_str().ok_or("fault list entries must be strings")?;
                    f.parse_list(s)?;
                }
                *self = f;
            }
            Value::Object(map) => {
                for (name, val) in map {
                    match val {
                        Value::Bool(b) => self.set(name, None, *b)?,
                        Value::Null => self.set(name, None, false)?,
                        Value::Number(n) => {
                            let n = n.as_u64().ok_or("fault argument must be >= 0")?;
                            self.set(name, Some(n), true)?
                        }
                        _ => return Err(format!("bad value for fault {name}")),
                    }
                }
            }
            _ => return Err("faults must be an object, a list or null".into()),
        }
        Ok(())
    }

    /// Header faults add to the instance faults.
    pub fn merged(&self, other: &Faults) -> Faults {
        Faults {
            prefill_http: other.prefill_http.or(self.prefill_http),
            decode_http: other.decode_http.or(self.decode_http),
            encode_http: other.encode_http.or(self.encode_http),
            omit_kv_params: self.omit_kv_params || other.omit_kv_params,
            null_kv_params: self.null_kv_params || other.null_kv_params,
            drop_before_headers: self.drop_before_headers || other.drop_before_headers,
            drop_after_tokens: other.drop_after_tokens.or(self.drop_after_tokens),
            stall_ms: other.stall_ms.or(self.stall_ms),
            side_channel_down: self.side_channel_down || other.side_channel_down,
            dead: self.dead || other.dead,
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(c) = self.prefill_http {
            m.insert(format!("prefill_http_{c}"), json!(true));
        }
        if let Some(c) = self.decode_http {
            m.insert(format!("decode_http_{c}"), json!(true));
        }
        if let Some(c) = self.encode_http {
            m.insert(format!("encode_http_{c}"), json!(true));
        }
        for (name, on) in [
            ("omit_kv_params", self.omit_kv_params),
            ("null_kv_params", self.null_kv_params),
            ("drop_before_headers", self.drop_before_headers),
            ("side_channel_down", self.side_channel_down),
            ("dead", self.dead),
        ] {
            if on {
                m.insert(name.into(), json!(true));
            }
        }
        if let Some(n) = self.drop_after_tokens {
            m.insert("drop_after_tokens".into(), json!(n));
        }
        if let Some(n) = self.stall_ms {
            m.insert("stall_ms".into(), json!(n));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_list_parses() {
        let mut f = Faults::default();
        f.parse_list("prefill_http_503, drop_after_tokens:2,stall_ms:10")
            .expect("valid list");
        assert_eq!(f.prefill_http, Some(503));
        assert_eq!(f.drop_after_tokens, Some(2));
        assert_eq!(f.stall_ms, Some(10));
        f.parse_list("encode_http_503").expect("valid list");
        assert_eq!(f.encode_http, Some(503));
        assert_eq!(f.to_json()["encode_http_503"], true);
        assert!(Faults::default().parse_list("bogus").is_err());
        assert!(Faults::default().parse_list("stall_ms").is_err());
    }

    #[test]
    fn object_patch_sets_and_clears() {
        let mut f = Faults::default();
        f.patch(&json!({"omit_kv_params": true, "stall_ms": 5}))
            .expect("valid patch");
        assert!(f.omit_kv_params);
        f.patch(&json!({"omit_kv_params": false})).expect("valid");
        assert!(!f.omit_kv_params);
        assert_eq!(f.stall_ms, Some(5));
    }
}
