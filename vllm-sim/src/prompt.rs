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

/// Prompt tokens of one multimodal item (image, audio or video), whatever its size: the
/// sim decodes no media, and a fixed count keeps P, D and the encoder agreeing (§7.4 step 5).
pub const MM_ITEM_TOKENS: u64 = 16;

/// One chat content part: text, or a multimodal item's source (§7.4 step 3).
enum Part<'a> {
    Text(&'a str),
    /// The item's url, or `input_audio`'s inline data: what its mm hash is taken over.
    Media(&'a str),
}

/// Reads one content part. Only borrows, so a data URL of many MiB costs one pass of the
/// JSON parser and nothing here.
fn content_part(p: &Value) -> Result<Part<'_>, String> {
    fn nonempty(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    match p.get("type").and_then(Value::as_str) {
        Some("text") => p
            .get("text")
            .and_then(Value::as_str)
            .map(Part::Text)
            .ok_or_else(|| "Text parts must be {type: text, text: <string>}".into()),
        Some(t @ ("image_url" | "audio_url" | "video_url")) => {
            nonempty(p.get(t).and_then(|o| o.get("url")))
                .map(Part::Media)
                .ok_or_else(|| format!("Parts of type {t} need {t}.url, a non-empty string"))
        }
        Some("input_audio") => {
            let audio = p.get("input_audio");
            let format_ok = match audio.and_then(|a| a.get("format")) {
                None | Some(Value::Null) | Some(Value::String(_)) => true,
                Some(_) => false,
            };
            match nonempty(audio.and_then(|a| a.get("data"))) {
                Some(d) if format_ok => Ok(Part::Media(d)),
                _ => Err(
                    "Parts of type input_audio need input_audio.data, a non-empty \
                    base64 string (and input_audio.format, if given, a string)"
                        .into(),
                ),
            }
        }
        _ => Err(
            "Content parts must be of type text, image_url, audio_url, video_url or input_audio"
                .into(),
        ),
    }
}

/// Tokens of one message's content (without the per-message 4) and its echo words: text
/// tokens, plus [`MM_ITEM_TOKENS`] per multimodal item, which gives no words.
pub(super) fn message_tokens(fmt: ErrorFormat, m: &Value) -> Result<(u64, Vec<String>), ApiError> {
    let err = |m: &str| bad(fmt, "messages", m);
    let Some(obj) = m.as_object() else {
        return Err(err("Each message must be an object"));
    };
    if !obj.get("role").is_some_and(Value::is_string) {
        return Err(err("Each message needs a string role"));
    }
    let mut text = String::new();
    let mut media = 0u64;
    match obj.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match content_part(p).map_err(|m| err(&m))? {
                    Part::Text(t) => {
                        text.push_str(t);
                        text.push('\n');
                    }
                    Part::Media(_) => media += 1,
                }
            }
        }
        Some(_) => return Err(err("Content must be a string or a list of parts")),
    }
    let w = tokenize(&text);
    Ok((w.len() as u64 + media * MM_ITEM_TOKENS, w))
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
        let (t, w) = message_tokens(fmt, m)?;
        n += 4 + t;
        words.extend(w);
    }
    Ok((n, words))
}

/// The multimodal items' sources (url or inline audio data) of validated chat messages, in
/// order, as the sidecar's E/PD fan-out finds them.
pub(super) fn mm_sources(messages: Option<&Value>) -> Vec<&str> {
    let parts = messages
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content")?.as_array())
        .flatten();
    parts
        .filter_map(|p| match content_part(p) {
            Ok(Part::Media(src)) => Some(src),
            _ => None,
        })
        .collect()
}

/// An item's mm hash as the encoder reports it: hex SHA-256 of its url or inline data.
pub fn mm_hash(src: &str) -> String {
    hex(&Sha256::digest(src.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Hex SHA-256 over the endpoint name and the canonical JSON (sorted keys, compact) of the
/// prompt, so a proxy that alters the prompt or endpoint between legs is caught.
pub fn prompt_hash(endpoint: Endpoint, v: &Value) -> String {
    // serde_json's Map is a BTreeMap here, so to_string is already canonical.
    let mut h = Sha256::new();
    h.update(endpoint.name().as_bytes());
    h.update(b":");
    h.update(v.to_string().as_bytes());
    hex(&h.finalize())
}
