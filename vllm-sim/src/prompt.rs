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

/// The simulated vocabulary: every token id the sim gives is below this (Qwen2's size).
pub const VOCAB_SIZE: u64 = 151_936;
/// Ids below this are the chat template's special tokens; words hash above it.
const FIRST_WORD_ID: u64 = 256;
/// The fixed chat template (ChatML-like), which is what makes a message cost 4 tokens and
/// the generation prompt 3 (§7.4 step 5): `<|im_start|>` role `\n` content `<|im_end|>`.
const IM_START: u64 = 1;
const IM_END: u64 = 2;
const NEWLINE: u64 = 3;
/// The placeholder each of a media item's [`MM_ITEM_TOKENS`] tokens gets, as vLLM's
/// rendered prompts repeat an image/audio pad token.
const MEDIA_PAD: u64 = 4;

/// A token's id: FNV-1a 64 of its text, mod the vocabulary, above the special ids. Stable
/// across runs, processes and platforms, so P and D agree on every prompt's ids.
pub fn token_id(token: &str) -> u64 {
    let h = token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    FIRST_WORD_ID + h % (VOCAB_SIZE - FIRST_WORD_ID)
}

/// Token ids of a validated completions prompt, one per token of [`prompt_tokens`] and in
/// its order: text tokens hash ([`token_id`]), given ids stay as they are.
pub(super) fn completion_ids(prompt: Option<&Value>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut add = |v: &Value| match v {
        Value::String(s) => out.extend(tokenize(s).iter().map(|w| token_id(w))),
        Value::Number(x) => out.extend(x.as_u64()),
        Value::Array(ids) => out.extend(ids.iter().filter_map(Value::as_u64)),
        _ => {}
    };
    match prompt {
        Some(Value::Array(items)) => items.iter().for_each(&mut add),
        Some(v) => add(v),
        None => {}
    }
    out
}

/// Token ids of validated chat messages as the sim's template renders them: per message
/// `<|im_start|>`, the role, `\n`, the content's tokens (text and media pads in part order),
/// `<|im_end|>`; then the generation prompt `<|im_start|>assistant\n`. As many ids as
/// [`chat_tokens`] counts.
pub(super) fn chat_ids(messages: Option<&Value>) -> Vec<u64> {
    let mut out = Vec::new();
    for m in messages.and_then(Value::as_array).into_iter().flatten() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        out.extend([IM_START, token_id(role), NEWLINE]);
        match m.get("content") {
            Some(Value::String(s)) => out.extend(tokenize(s).iter().map(|w| token_id(w))),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match content_part(p) {
                        Ok(Part::Text(t)) => out.extend(tokenize(t).iter().map(|w| token_id(w))),
                        Ok(Part::Media(_)) => {
                            out.extend(std::iter::repeat_n(MEDIA_PAD, MM_ITEM_TOKENS as usize))
                        }
                        Err(_) => {}
                    }
                }
            }
            _ => {}
        }
        out.push(IM_END);
    }
    out.extend([IM_START, token_id("assistant"), NEWLINE]);
    out
}

/// `kv_transfer_params.prompt_token_ids` as vLLM accepts them (vllm#48145): a non-empty
/// list of non-negative integers (a bool is none), each within the vocabulary.
pub(super) fn forwarded_ids(v: &Value) -> Option<Vec<u64>> {
    let ids = v.as_array().filter(|a| !a.is_empty())?;
    ids.iter()
        .map(|x| x.as_u64().filter(|&id| id < VOCAB_SIZE))
        .collect()
}

/// Whether any message has a media part, which makes vLLM render the messages instead of
/// reusing forwarded ids (its `has_non_text_content`).
pub(super) fn has_media(messages: Option<&Value>) -> bool {
    !mm_sources(messages).is_empty()
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_ids_are_stable_and_in_the_vocabulary() {
        // Pinned: P and D (other processes, other builds) must agree on every id.
        assert_eq!(token_id("hello"), PINNED_HELLO);
        assert_eq!(token_id("hello"), token_id("hello"));
        assert_ne!(token_id("hello"), token_id("world"));
        for w in ["", "a", "t0", "user", "assistant", "é", ","] {
            let id = token_id(w);
            assert!((FIRST_WORD_ID..VOCAB_SIZE).contains(&id), "{w}: {id}");
        }
    }
    /// 256 + FNV-1a-64("hello") (0xa430d84680aabd0b) mod (151936 − 256).
    const PINNED_HELLO: u64 = 52_747;

    #[test]
    fn chat_ids_match_the_token_count() {
        let fmt = ErrorFormat::Current;
        let cases = [
            json!([{"role": "user", "content": "hello there, world!"}]),
            json!([{"role": "system", "content": null}, {"role": "user", "content": "a b"}]),
            json!([{"role": "user", "content": [{"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "http://x/1.png"}},
                {"type": "text", "text": "and this"}]}]),
            json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": " t0 t1"}]),
        ];
        for m in cases {
            let (n, words) = chat_tokens(fmt, Some(&m)).unwrap();
            let ids = chat_ids(Some(&m));
            assert_eq!(ids.len() as u64, n, "{m}");
            assert_eq!(ids, chat_ids(Some(&m)), "deterministic");
            // The words' ids appear in the rendering, in order (template ids are not words).
            let word_ids: Vec<u64> = words.iter().map(|w| token_id(w)).collect();
            let content: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|&i| word_ids.contains(&i))
                .collect();
            assert_eq!(content, word_ids, "{m}");
        }
        let one = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            chat_ids(Some(&one)),
            vec![
                IM_START,
                token_id("user"),
                NEWLINE,
                token_id("hi"),
                IM_END,
                IM_START,
                token_id("assistant"),
                NEWLINE
            ]
        );
    }

    #[test]
    fn completion_ids_match_the_token_count() {
        let fmt = ErrorFormat::Current;
        for p in [
            json!("one two, three"),
            json!(["a b", "c"]),
            json!([5, 6, 7]),
            json!([[1, 2], [3]]),
        ] {
            let (n, words) = prompt_tokens(fmt, Some(&p)).unwrap();
            let ids = completion_ids(Some(&p));
            assert_eq!(ids.len() as u64, n, "{p}");
            assert_eq!(words.len(), ids.len(), "{p}");
        }
        assert_eq!(completion_ids(Some(&json!([5, 6, 7]))), vec![5, 6, 7]);
        assert_eq!(
            completion_ids(Some(&json!("hi there"))),
            vec![token_id("hi"), token_id("there")]
        );
    }

    #[test]
    fn forwarded_ids_must_be_non_negative_ints_in_the_vocabulary() {
        assert_eq!(
            forwarded_ids(&json!([0, 5, 151_935])),
            Some(vec![0, 5, 151_935])
        );
        for bad in [
            json!([]),
            json!([true]),
            json!([1, false]),
            json!([-1]),
            json!([1.5]),
            json!([1.0]),
            json!(["1"]),
            json!([null]),
            json!([[1]]),
            json!([VOCAB_SIZE]),
            json!(7),
            json!("1,2"),
            json!({"0": 1}),
        ] {
            assert_eq!(forwarded_ids(&bad), None, "{bad}");
        }
    }
}
