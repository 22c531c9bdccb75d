//! `POST /v1/messages`, Anthropic's Messages API as vLLM serves it (§7.16): the request is
//! converted to a chat completion (top-level `system` first), and the reply and stream are
//! Anthropic-shaped.

use super::config::ErrorFormat;
use super::http_util::{bytes_response, ApiError, Resp};
use super::prompt::{bad, prompt_hash, tokenize};
use super::responses::{kv_fields, named_sse, KvOut, Obj};
use super::validate::{Endpoint, PromptSpec};
use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Map, Value};

/// AnthropicMessagesRequest's fields.
pub const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "metadata",
    "stop_sequences",
    "stream",
    "system",
    "temperature",
    "thinking",
    "tool_choice",
    "tools",
    "top_k",
    "top_p",
    "output_config",
    "kv_transfer_params",
    "chat_template_kwargs",
];

const BLOCK_TYPES: &[&str] = &[
    "text",
    "image",
    "tool_use",
    "tool_result",
    "tool_reference",
    "thinking",
    "redacted_thinking",
];

/// The text of a content value: a string, or the `text` of its text blocks.
fn content_text(fmt: ErrorFormat, field: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for b in blocks {
                let kind = b.get("type").and_then(Value::as_str);
                if !kind.is_some_and(|k| BLOCK_TYPES.contains(&k)) {
                    return Err(bad(fmt, field, "Each content block needs a known type"));
                }
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                    text.push('\n');
                }
            }
            Ok(text)
        }
        _ => Err(bad(
            fmt,
            field,
            "Content must be a string or a list of blocks",
        )),
    }
}

/// Prompt: chat accounting (§7.4 step 5) over vLLM's conversion, one system message
/// (top-level `system` plus system-role messages) and then the others.
pub fn parse(fmt: ErrorFormat, body: &Map<String, Value>) -> Result<PromptSpec, ApiError> {
    let Some(Value::Array(msgs)) = body.get("messages") else {
        return Err(bad(fmt, "messages", "Field required: a list of messages"));
    };
    if msgs.is_empty() {
        return Err(bad(
            fmt,
            "messages",
            "messages must contain at least one item",
        ));
    }
    let mut system = match body.get("system") {
        None | Some(Value::Null) => String::new(),
        Some(v) => content_text(fmt, "system", v)?,
    };
    let mut others = Vec::new();
    for m in msgs {
        let role = m.get("role").and_then(Value::as_str);
        if !role.is_some_and(|r| matches!(r, "user" | "assistant" | "system")) {
            return Err(bad(
                fmt,
                "messages",
                "Each message needs role user, assistant or system",
            ));
        }
        let content = m.get("content").unwrap_or(&Value::Null);
        if content.as_array().is_some_and(Vec::is_empty) {
            return Err(bad(fmt, "messages", "message content must not be empty"));
        }
        let text = content_text(fmt, "messages", content)?;
        if role == Some("system") {
            system.push_str(&text);
        } else {
            others.push(text);
        }
    }
    let (mut tokens, mut words) = (3u64, Vec::new());
    let system = (!system.is_empty()).then_some(system);
    for text in system.iter().chain(others.iter()) {
        let w = tokenize(text);
        tokens += 4 + w.len() as u64;
        words.extend(w);
    }
    let max_tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => return Err(bad(fmt, "max_tokens", "Field required")),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => n as u64,
            Some(_) => {
                return Err(bad(
                    fmt,
                    "max_tokens",
                    "Value error, max_tokens must be positive",
                ))
            }
            None => return Err(bad(fmt, "max_tokens", "Input should be a valid integer")),
        },
    };
    let key = json!({
        "messages": body.get("messages"),
        "system": body.get("system"),
    });
    Ok(PromptSpec {
        tokens,
        words,
        hash: prompt_hash(Endpoint::Messages, &key),
        max_tokens: Some(max_tokens),
        ignored: vec![],
    })
}

/// vLLM's finish reason to Anthropic's stop reason.
pub fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        _ => "end_turn",
    }
}

fn usage(input: u64, output: u64) -> String {
    Obj::new()
        .field("input_tokens", &input)
        .field("output_tokens", &output)
        .finish()
}

/// AnthropicMessagesResponse, dumped with exclude_none: no `stop_sequence`, and no
/// `kv_transfer_params` unless there are some.
pub fn full_response(
    id: &str,
    model: &str,
    text: &str,
    finish: &str,
    prompt: u64,
    completion: u64,
    kv: &KvOut,
) -> String {
    let block = Obj::new()
        .field("type", "text")
        .field("text", text)
        .finish();
    let o = Obj::new()
        .field("id", id)
        .field("type", "message")
        .field("role", "assistant")
        .raw("content", &format!("[{block}]"))
        .field("model", model)
        .field("stop_reason", stop_reason(finish))
        .raw("usage", &usage(prompt, completion));
    kv_fields(o, kv, false).finish()
}

/// `message_start` and the text block's `content_block_start`, right before token 0.
pub fn stream_start(id: &str, model: &str, prompt: u64) -> Vec<Bytes> {
    let message = Obj::new()
        .field("id", id)
        .raw("content", "[]")
        .field("model", model)
        .null("stop_reason")
        .null("stop_sequence")
        .raw("usage", &usage(prompt, 0))
        .finish();
    vec![
        named_sse(
            "message_start",
            &Obj::new()
                .field("type", "message_start")
                .raw("message", &message)
                .finish(),
        ),
        named_sse(
            "content_block_start",
            r#"{"type":"content_block_start","content_block":{"type":"text","text":""},"index":0}"#,
        ),
    ]
}

pub fn token_event(text: &str) -> Bytes {
    let delta = Obj::new()
        .field("type", "text_delta")
        .field("text", text)
        .finish();
    named_sse(
        "content_block_delta",
        &Obj::new()
            .field("type", "content_block_delta")
            .raw("delta", &delta)
            .field("index", &0)
            .finish(),
    )
}

/// `content_block_stop`, `message_delta` (stop reason, usage) and `message_stop`.
pub fn stream_end(finish: &str, prompt: u64, completion: u64) -> Vec<Bytes> {
    let delta = Obj::new()
        .field("type", "message_delta")
        .raw(
            "delta",
            &Obj::new()
                .field("stop_reason", stop_reason(finish))
                .finish(),
        )
        .raw("usage", &usage(prompt, completion))
        .finish();
    vec![
        named_sse(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        named_sse("message_delta", &delta),
        named_sse("message_stop", r#"{"type":"message_stop"}"#),
    ]
}

/// An error inside the stream: vLLM's converter emits one `error` event and ends.
pub fn stream_error(e: &ApiError) -> Bytes {
    let err = Obj::new()
        .field("type", "internal_error")
        .field("message", &e.message)
        .finish();
    named_sse(
        "error",
        &Obj::new()
            .field("type", "error")
            .raw("error", &err)
            .finish(),
    )
}

/// vLLM translates its errors to Anthropic's shape, except request-schema failures, which
/// its validation handler answers before the route (OpenAI shape, `--error-format`).
pub fn error_response(e: &ApiError, fmt: ErrorFormat) -> Resp {
    if e.schema {
        return e.response(fmt);
    }
    let err = Obj::new()
        .field("type", &e.kind)
        .field("message", &e.message)
        .finish();
    let body = Obj::new()
        .field("type", "error")
        .raw("error", &err)
        .finish();
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    bytes_response(status, "application/json", Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(b: &str) -> Result<PromptSpec, ApiError> {
        let v: Value = serde_json::from_str(b).unwrap();
        parse(ErrorFormat::Current, v.as_object().unwrap())
    }

    #[test]
    fn system_and_blocks_count_like_chat() {
        // system "be brief" (2) + user "hi there" (2): 3 + (4+2) + (4+2).
        let s = p(r#"{"system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hi there"}]}],"max_tokens":3}"#).unwrap();
        assert_eq!((s.tokens, s.max_tokens), (15, Some(3)));
        assert_eq!(s.words, vec!["be", "brief", "hi", "there"]);
        let other =
            p(r#"{"messages":[{"role":"user","content":"hi there"}],"max_tokens":3}"#).unwrap();
        assert_eq!(other.tokens, 9);
        assert_ne!(other.hash, s.hash);
    }

    #[test]
    fn max_tokens_is_required_and_positive() {
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        for b in [
            format!("{{{m}}}"),
            format!(r#"{{{m},"max_tokens":0}}"#),
            r#"{"messages":[],"max_tokens":1}"#.to_string(),
            r#"{"messages":[{"role":"tool","content":"x"}],"max_tokens":1}"#.to_string(),
        ] {
            let e = p(&b).err().unwrap();
            assert_eq!((e.status, e.schema), (400, true), "{b}");
        }
    }

    #[test]
    fn body_shapes() {
        assert_eq!(
            full_response("chatcmpl-x", "m", " t0", "length", 9, 1, &KvOut::Null),
            r#"{"id":"chatcmpl-x","type":"message","role":"assistant","content":[{"type":"text","text":" t0"}],"model":"m","stop_reason":"max_tokens","usage":{"input_tokens":9,"output_tokens":1}}"#
        );
        let e = error_response(
            &ApiError::new(404, "NotFoundError", "nope"),
            ErrorFormat::Current,
        );
        assert_eq!(e.status(), 404);
    }
}
