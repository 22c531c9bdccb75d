//! Prompt accounting shared by P and D (§7.4 step 5): the regex-like token count, chat
//! message overhead, and the prompt hash that `/nixl/read` compares.

use super::config::ErrorFormat;
use super::http_util::ApiError;
use super::validate::Endpoint;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Counts "tokens" as matches of `\w+|[^\w\s]`, returning them too (for echo mode).
pub fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

pub(super) fn bad(fmt: ErrorFormat, field: &str, msg: &str) -> ApiError {
    ApiError::validation(
        fmt,
        format!("[{{'type': 'value_error', 'loc': ('body', '{field}'), 'msg': '{msg}'}}]"),
    )
    .param(field)
}

/// Tokens of a completions prompt; token-id arrays count their length.
pub(super) fn prompt_tokens(
    fmt: ErrorFormat,
    prompt: Option<&Value>,
) -> Result<(u64, Vec<String>), ApiError> {
    let err = || {
        bad(
            fmt,
            "prompt",
            "Input should be a non-empty string, list of strings or list of token ids",
        )
    };
    match prompt {
        Some(Value::String(s)) if !s.is_empty() => {
            let w = tokenize(s);
            Ok((w.len() as u64, w))
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let (mut n, mut words) = (0u64, Vec::new());
            for it in items {
                match it {
                    Value::String(s) => {
                        let w = tokenize(s);
                        n += w.len() as u64;
                        words.extend(w);
                    }
                    Value::Number(x) if x.is_u64() => {
                        n += 1;
                        words.push(x.to_string());
                    }
                    Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => {
                        n += ids.len() as u64;
                        words.extend(ids.iter().map(|x| x.to_string()));
                    }
                    _ => return Err(err()),
                }
            }
            Ok((n, words))
        }
        _ => Err(err()),
    }
}

/// Chat tokens: Σ(4 + tokens(content)) + 3 (§7.4 step 5).
pub(super) fn chat_tokens(
    fmt: ErrorFormat,
    messages: Option<&Value>,
) -> Result<(u64, Vec<String>), ApiError> {
    let err = |m: &str| bad(fmt, "messages", m);
    let Some(Value::Array(msgs)) = messages else {
        return Err(err("Field required: a non-empty list of messages"));
    };
    if msgs.is_empty() {
        return Err(err("List should have at least 1 item"));
    }
    let (mut n, mut words) = (3u64, Vec::new());
    for m in msgs {
        let Some(obj) = m.as_object() else {
            return Err(err("Each message must be an object"));
        };
        if !obj.get("role").is_some_and(Value::is_string) {
            return Err(err("Each message needs a string role"));
        }
        let mut text = String::new();
        match obj.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => {
                            text.push_str(t);
                            text.push('\n');
                        }
                        _ => return Err(err("Content parts must be {type: text, text}")),
                    }
                }
            }
            Some(_) => return Err(err("Content must be a string or a list of parts")),
        }
        let w = tokenize(&text);
        n += 4 + w.len() as u64;
        words.extend(w);
    }
    Ok((n, words))
}

/// Hex SHA-256 over the endpoint name and the canonical JSON (sorted keys, compact) of the
/// prompt, so a proxy that alters the prompt or endpoint between legs is caught.
pub fn prompt_hash(endpoint: Endpoint, v: &Value) -> String {
    // serde_json's Map is a BTreeMap here, so to_string is already canonical.
    let mut h = Sha256::new();
    h.update(endpoint.name().as_bytes());
    h.update(b":");
    h.update(v.to_string().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
