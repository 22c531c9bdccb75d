//! `POST /v1/responses`, OpenAI's Responses API as vLLM serves it (§7.15): `input` (plus
//! `instructions`) is the prompt, `max_output_tokens` the limit; the stream is named events.

use super::config::ErrorFormat;
use super::http_util::ApiError;
use super::prompt::{bad, prompt_hash, tokenize};
use super::responses::{kv_fields, named_sse, KvOut, Obj};
use super::validate::{opt_pos_int, Endpoint, PromptSpec};
use bytes::Bytes;
use serde_json::{json, Map, Value};

/// ResponsesRequest's fields.
pub const FIELDS: &[&str] = &[
    "background",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "logit_bias",
    "parallel_tool_calls",
    "previous_response_id",
    "prompt",
    "reasoning",
    "include_reasoning",
    "service_tier",
    "store",
    "stream",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "top_k",
    "truncation",
    "user",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "presence_penalty",
    "frequency_penalty",
    "prompt_cache_key",
    "request_id",
    "session_id",
    "mm_processor_kwargs",
    "priority",
    "cache_salt",
    "enable_response_messages",
    "previous_input_messages",
    "structured_outputs",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "vllm_xargs",
    "kv_transfer_params",
    "ec_transfer_params",
    "chat_template_kwargs",
];

/// The text of one input item: a message's content (string or parts with `text`), or a
/// tool item's `arguments`/`output`.
fn item_text(fmt: ErrorFormat, item: &Value) -> Result<String, ApiError> {
    let err = |m: &str| bad(fmt, "input", m);
    let Some(obj) = item.as_object() else {
        return Err(err("Each input item must be an object"));
    };
    let mut text = String::new();
    match obj.get("content") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                if !p.is_object() {
                    return Err(err("Content parts must be objects"));
                }
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                    text.push('\n');
                }
            }
        }
        None | Some(Value::Null) if !obj.contains_key("role") => {
            for k in ["arguments", "output"] {
                if let Some(t) = obj.get(k).and_then(Value::as_str) {
                    text.push_str(t);
                    text.push('\n');
                }
            }
        }
        _ => {
            return Err(err(
                "A message item needs content: a string or a list of parts",
            ))
        }
    }
    Ok(text)
}

/// Prompt: chat accounting (§7.4 step 5) over `instructions` (a system message) and the
/// input, a string being one user message.
pub fn parse(fmt: ErrorFormat, body: &Map<String, Value>) -> Result<PromptSpec, ApiError> {
    let mut texts = Vec::new();
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(_) => return Err(bad(fmt, "instructions", "Input should be a valid string")),
    }
    match body.get("input") {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(items)) => {
            for it in items {
                texts.push(item_text(fmt, it)?);
            }
        }
        None | Some(Value::Null) => return Err(bad(fmt, "input", "Field required")),
        Some(_) => {
            return Err(bad(
                fmt,
                "input",
                "Input should be a string or a list of input items",
            ))
        }
    }
    let (mut tokens, mut words) = (3u64, Vec::new());
    for t in &texts {
        let w = tokenize(t);
        tokens += 4 + w.len() as u64;
        words.extend(w);
    }
    let key = json!({"input": body.get("input"), "instructions": body.get("instructions")});
    Ok(PromptSpec {
        tokens,
        words,
        hash: prompt_hash(Endpoint::Responses, &key),
        max_tokens: opt_pos_int(fmt, body, "max_output_tokens")?,
        ignored: vec![],
    })
}

/// What every response object and event of one request shares.
pub struct View<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub body: &'a Map<String, Value>,
    /// The effective output limit (`max_output_tokens` in the response).
    pub limit: u64,
    pub prompt: u64,
}

impl View<'_> {
    /// The output message's id, derived from the response id so events agree on it.
    fn item_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    fn number_or(&self, key: &str, default: f64) -> Value {
        self.body
            .get(key)
            .filter(|v| v.is_number())
            .cloned()
            .unwrap_or(json!(default))
    }

    fn usage(&self, output: u64) -> String {
        let input = Obj::new()
            .field("cached_tokens", &0)
            .field("input_tokens_per_turn", &[self.prompt])
            .field("cached_tokens_per_turn", &[0])
            .finish();
        let out = Obj::new()
            .field("reasoning_tokens", &0)
            .field("tool_output_tokens", &0)
            .field("output_tokens_per_turn", &[output])
            .field("tool_output_tokens_per_turn", &[0])
            .finish();
        Obj::new()
            .field("input_tokens", &self.prompt)
            .raw("input_tokens_details", &input)
            .field("output_tokens", &output)
            .raw("output_tokens_details", &out)
            .field("total_tokens", &(self.prompt + output))
            .finish()
    }

    /// ResponsesResponse (model_dump: null fields present). `done` = (output tokens,
    /// finish reason) once generation ended; `None` for the in-progress object.
    pub fn response(&self, text: &str, done: Option<(u64, &str)>, kv: &KvOut) -> String {
        let (status, output, usage) = match done {
            Some((k, finish)) => {
                let status = if finish == "length" {
                    "incomplete"
                } else {
                    "completed"
                };
                (
                    status,
                    format!("[{}]", self.item(text, true)),
                    self.usage(k),
                )
            }
            None => ("in_progress", "[]".to_string(), "null".to_string()),
        };
        let incomplete = if status == "incomplete" {
            r#"{"reason":"max_output_tokens"}"#
        } else {
            "null"
        };
        let o = Obj::new()
            .field("id", self.id)
            .field("created_at", &self.created)
            .raw("incomplete_details", incomplete)
            .field("instructions", &self.body.get("instructions"))
            .null("metadata")
            .field("model", self.model)
            .field("object", "response")
            .raw("output", &output)
            .field("parallel_tool_calls", &true)
            .field("temperature", &self.number_or("temperature", 1.0))
            .field("tool_choice", "none")
            .raw("tools", "[]")
            .field("top_p", &self.number_or("top_p", 1.0))
            .field("background", &false)
            .field("max_output_tokens", &self.limit)
            .null("max_tool_calls")
            .null("previous_response_id")
            .null("prompt")
            .null("reasoning")
            .field("service_tier", "auto")
            .field("status", status)
            .null("text")
            .null("top_logprobs")
            .field("truncation", "disabled")
            .raw("usage", &usage)
            .null("user")
            .null("input_messages")
            .null("output_messages");
        kv_fields(o, kv, true).finish()
    }

    fn part(text: &str, logprobs: &str) -> String {
        Obj::new()
            .raw("annotations", "[]")
            .field("text", text)
            .field("type", "output_text")
            .raw("logprobs", logprobs)
            .finish()
    }

    /// The assistant message item; `done` false is the empty in-progress one.
    fn item(&self, text: &str, done: bool) -> String {
        let (content, status) = if done {
            (format!("[{}]", Self::part(text, "null")), "completed")
        } else {
            ("[]".to_string(), "in_progress")
        };
        Obj::new()
            .field("id", &self.item_id())
            .raw("content", &content)
            .field("role", "assistant")
            .field("status", status)
            .field("type", "message")
            .finish()
    }

    fn event(kind: &str, o: Obj, seq: u64) -> Bytes {
        named_sse(
            kind,
            &o.field("sequence_number", &seq)
                .field("type", kind)
                .finish(),
        )
    }

    /// The events before token 0, numbered from `seq`.
    pub fn stream_start(&self, seq: u64) -> Vec<Bytes> {
        let r = self.response("", None, &KvOut::Null);
        vec![
            Self::event("response.created", Obj::new().raw("response", &r), seq),
            Self::event(
                "response.in_progress",
                Obj::new().raw("response", &r),
                seq + 1,
            ),
            Self::event(
                "response.output_item.added",
                Obj::new()
                    .raw("item", &self.item("", false))
                    .field("output_index", &0),
                seq + 2,
            ),
            Self::event(
                "response.content_part.added",
                Obj::new()
                    .field("content_index", &0)
                    .field("item_id", &self.item_id())
                    .field("output_index", &0)
                    .raw("part", &Self::part("", "[]")),
                seq + 3,
            ),
        ]
    }

    pub fn token_event(&self, text: &str, seq: u64) -> Bytes {
        Self::event(
            "response.output_text.delta",
            Obj::new()
                .field("content_index", &0)
                .field("delta", text)
                .field("item_id", &self.item_id())
                .raw("logprobs", "[]")
                .field("output_index", &0),
            seq,
        )
    }

    /// The closing events, numbered from `seq`; `response.completed` ends the stream.
    pub fn stream_end(&self, text: &str, k: u64, finish: &str, seq: u64) -> Vec<Bytes> {
        let id = self.item_id();
        vec![
            Self::event(
                "response.output_text.done",
                Obj::new()
                    .field("content_index", &0)
                    .field("item_id", &id)
                    .raw("logprobs", "[]")
                    .field("output_index", &0)
                    .field("text", text),
                seq,
            ),
            Self::event(
                "response.content_part.done",
                Obj::new()
                    .field("content_index", &0)
                    .field("item_id", &id)
                    .field("output_index", &0)
                    .raw("part", &Self::part(text, "null")),
                seq + 1,
            ),
            Self::event(
                "response.output_item.done",
                Obj::new()
                    .raw("item", &self.item(text, true))
                    .field("output_index", &0),
                seq + 2,
            ),
            Self::event(
                "response.completed",
                Obj::new().raw(
                    "response",
                    &self.response(text, Some((k, finish)), &KvOut::Null),
                ),
                seq + 3,
            ),
        ]
    }
}

/// An error inside the stream, after OpenAI's ResponseErrorEvent.
pub fn stream_error(e: &ApiError, seq: u64) -> Bytes {
    named_sse(
        "error",
        &Obj::new()
            .field("code", &e.kind)
            .field("message", &e.message)
            .null("param")
            .field("sequence_number", &seq)
            .field("type", "error")
            .finish(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(b: &str) -> Result<PromptSpec, ApiError> {
        let v: Value = serde_json::from_str(b).unwrap();
        parse(ErrorFormat::Current, v.as_object().unwrap())
    }

    #[test]
    fn input_and_instructions_count_like_chat() {
        // "be brief" (2) as system, "hi there" (2) as user: 3 + 6 + 6.
        let s =
            p(r#"{"instructions":"be brief","input":"hi there","max_output_tokens":4}"#).unwrap();
        assert_eq!((s.tokens, s.max_tokens), (15, Some(4)));
        let items =
            p(r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"hi there"}]}]}"#)
                .unwrap();
        assert_eq!((items.tokens, items.max_tokens), (9, None));
        assert_ne!(items.hash, s.hash);
    }

    #[test]
    fn limit_and_input_are_checked() {
        for b in [
            r#"{"input":"x","max_output_tokens":0}"#,
            r#"{"input":"x","max_output_tokens":"2"}"#,
            r#"{"max_output_tokens":2}"#,
            r#"{"input":[1]}"#,
            r#"{"input":"x","instructions":3}"#,
        ] {
            let e = p(b).err().unwrap();
            assert_eq!((e.status, e.schema), (400, true), "{b}");
        }
    }

    #[test]
    fn stream_events_are_numbered_and_named() {
        let body = Map::new();
        let v = View {
            id: "resp_r",
            created: 1,
            model: "m",
            body: &body,
            limit: 2,
            prompt: 9,
        };
        let start = v.stream_start(0);
        assert_eq!(start.len(), 4);
        assert!(start[0]
            .starts_with(b"event: response.created\ndata: {\"response\":{\"id\":\"resp_r\""));
        assert_eq!(
            &v.token_event(" t0", 4)[..],
            &b"event: response.output_text.delta\ndata: {\"content_index\":0,\"delta\":\" t0\",\"item_id\":\"msg_r\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":4,\"type\":\"response.output_text.delta\"}\n\n"[..]
        );
        let end = v.stream_end(" t0 t1", 2, "length", 6);
        let last = String::from_utf8_lossy(&end[3]).into_owned();
        assert!(last.starts_with("event: response.completed\n"), "{last}");
        assert!(last.contains("\"status\":\"incomplete\""), "{last}");
        assert!(last.ends_with("\"sequence_number\":9,\"type\":\"response.completed\"}\n\n"));
    }
}
