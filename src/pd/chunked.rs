//! Chunked decode (`-decode-chunk-size`, pd-sidecar's `decode.go`): a chat decode runs as
//! successive requests of at most N tokens, each continuing the text so far as the final
//! assistant message (`continue_final_message`), until a stop, the budget, or a chunk that
//! adds nothing. The client sees one response, streamed or not, with cumulative usage.
//!
//! Unlike pd-sidecar, the text so far is one assistant message that grows (vLLM continues only
//! the final message: one message per chunk would template differently), a client's own final
//! assistant message is extended rather than followed, and requests whose answer cannot be cut
//! into text pieces (several choices, logprobs, tools, echo) are decoded whole.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::{Response, StatusCode, Uri};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tracing::debug;

use super::{handoff, leg, leg_parts, PdContext};
use crate::body::{self, BoxError, CollectError, ProxyBody};
use crate::error::{describe, ProxyError};
use crate::json_edit::{Edit, JsonObject, Spliced};
use crate::upstream::decoder::from_upstream;
use crate::upstream::Decoder;

/// A chunk's reply is at most N tokens of JSON.
const REPLY_LIMIT: usize = 16 << 20;

/// How a request's decode is cut, when it is: `budget` tokens (`None`: until a stop) in
/// requests of at most `size`.
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    size: u64,
    budget: Option<u64>,
}

/// Whether `request` is decoded in chunks: chunking is on, the budget exceeds one chunk, and
/// the answer is one choice of plain text.
pub fn applies(size: u32, request: &JsonObject<'_>) -> Option<Chunking> {
    if size == 0 {
        return None;
    }
    let number = |key: &str| {
        request
            .get(key)
            .and_then(|v| v.get().parse::<u64>().ok())
            .filter(|&n| n > 0)
    };
    let set = |key: &str| {
        request
            .get(key)
            .is_some_and(|v| !matches!(v.get(), "false" | "null" | "[]" | "0"))
    };
    if number("n").is_some_and(|n| n > 1) || set("logprobs") || set("tools") || set("echo") {
        return None;
    }
    let budget = number("max_completion_tokens").or_else(|| number("max_tokens"));
    let size = u64::from(size);
    match budget {
        Some(budget) if budget <= size => None,
        budget => Some(Chunking { size, budget }),
    }
}

/// The first chunk's leg: sent with the KV hand-off's care when it carries pinned blocks.
pub struct FirstChunk {
    pub body: Spliced,
    pub pinned: bool,
}

/// Runs the chunked decode of the client's `original` request; `first` is its decode leg as
/// the connector built it (the prefiller's transfer parameters in it).
pub async fn decode(
    cx: &PdContext,
    head: Arc<Parts>,
    uri: Uri,
    original: Bytes,
    first: FirstChunk,
    chunking: Chunking,
) -> Result<Response<ProxyBody>, ProxyError> {
    let request = super::parse(&original)?;
    let streaming = request.get("stream").is_some_and(|v| v.get() == "true");
    let include_usage = request
        .get("stream_options")
        .and_then(|v| serde_json::from_str::<StreamOptions>(v.get()).ok())
        .is_some_and(|o| o.include_usage);
    let extends = request
        .get("continue_final_message")
        .is_some_and(|v| v.get() == "true");
    let min_tokens = request
        .get("min_tokens")
        .and_then(|v| v.get().parse::<u64>().ok());
    drop(request);

    let mut run = Run {
        decoder: Arc::clone(&cx.decoder),
        head,
        uri,
        original,
        extends,
        min_tokens,
        chunking,
        text: String::new(),
        generated: 0,
        first: None,
        ended: (Value::Null, Value::Null),
        done: false,
    };
    let n = run.next_size();
    let body = limited(&first.body.to_bytes(), n, run.min_left())?;
    let reply = match run.send_first(cx, body, first.pinned).await? {
        Sent::Reply(reply) => reply,
        Sent::Relayed(resp) => return Ok(resp),
    };
    let piece = run.take(reply)?;
    if !streaming {
        while !run.done {
            match run.next().await? {
                Sent::Reply(reply) => {
                    run.take(reply)?;
                }
                Sent::Relayed(resp) => return Ok(resp),
            }
        }
        return Ok(json_response(run.whole()));
    }
    let first_event = run.event(&piece, true);
    let events = stream::unfold(Some(run), move |state| async move {
        let mut run = state?;
        if run.done {
            let mut tail = String::new();
            if include_usage {
                tail.push_str(&sse(&run.usage_event()));
            }
            tail.push_str("data: [DONE]\n\n");
            return Some((Bytes::from(tail), None));
        }
        let event = match run.next().await.and_then(|sent| match sent {
            Sent::Reply(reply) => run.take(reply),
            Sent::Relayed(resp) => Err(ProxyError::Internal(format!(
                "a later decode chunk was answered with HTTP {}",
                resp.status().as_u16()
            ))),
        }) {
            Ok(piece) => run.event(&piece, false),
            // The client has a 200 and part of the text: the failure goes in the stream, as
            // vLLM reports its own mid-stream errors.
            Err(e) => {
                debug!(error = %e, "a decode chunk failed mid-stream");
                let status = e.status();
                let error = json!({"error": {
                    "message": e.to_string(),
                    "type": crate::error::error_type(status),
                    "param": null,
                    "code": status.as_u16(),
                }});
                return Some((Bytes::from(sse(&error) + "data: [DONE]\n\n"), None));
            }
        };
        Some((Bytes::from(sse(&event)), Some(run)))
    });
    let frames = stream::once(async move { Bytes::from(sse(&first_event)) })
        .chain(events)
        .map(|bytes| Ok::<_, BoxError>(Frame::data(bytes)));
    let mut resp = Response::new(body::boxed(StreamBody::new(frames)));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What a chunk's decoder said: a 2xx body, or another answer relayed to the client as is.
enum Sent {
    Reply(Bytes),
    Relayed(Response<ProxyBody>),
}

/// One chunk's contribution.
struct Piece {
    text: String,
    finish: Option<String>,
}

/// A chunked decode in progress; owned, so a stream can carry it.
struct Run {
    decoder: Arc<Decoder>,
    head: Arc<Parts>,
    uri: Uri,
    original: Bytes,
    /// The client ended with an assistant message to continue: extend it, not follow it.
    extends: bool,
    min_tokens: Option<u64>,
    chunking: Chunking,
    /// The text so far, and its tokens.
    text: String,
    generated: u64,
    /// The first chunk's reply, the template of what the client gets.
    first: Option<Value>,
    /// The latest chunk's `finish_reason` and `stop_reason`: the last one's end the answer.
    ended: (Value, Value),
    done: bool,
}

impl Run {
    /// The next chunk's token limit.
    fn next_size(&self) -> u64 {
        match self.chunking.budget {
            Some(budget) => self
                .chunking
                .size
                .min(budget.saturating_sub(self.generated)),
            None => self.chunking.size,
        }
    }

    async fn send_first(
        &self,
        cx: &PdContext,
        body: Spliced,
        pinned: bool,
    ) -> Result<Sent, ProxyError> {
        let resp = if pinned {
            // As the uncut decode: once sent, the decoder sees it through, so the blocks the
            // prefiller pinned for it are freed even if the client leaves.
            let sent = handoff::deliver_then_close(
                cx.decoder.upstream(),
                leg_parts(&self.head, self.uri.clone()),
                body,
                cx.decode_admission_grace,
            );
            cx.decoder.within_deadline(sent.response()).await?
        } else {
            self.decoder
                .send(leg(&self.head, self.uri.clone(), body::spliced(body)))
                .await?
        };
        read(resp).await
    }

    /// Sends the next chunk: the client's request continuing the text so far.
    async fn next(&self) -> Result<Sent, ProxyError> {
        let body = self.continuation()?;
        let resp = self
            .decoder
            .send(leg(&self.head, self.uri.clone(), body::spliced(body)))
            .await?;
        read(resp).await
    }

    fn continuation(&self) -> Result<Spliced, ProxyError> {
        let request = super::parse(&self.original)?;
        let messages = request
            .get("messages")
            .and_then(|m| serde_json::from_str::<Vec<&RawValue>>(m.get()).ok())
            .unwrap_or_default();
        let mut out: Vec<String> = Vec::with_capacity(messages.len() + 1);
        let (keep, own) = match messages.split_last() {
            Some((last, rest)) if self.extends => (rest, Some(*last)),
            _ => (messages.as_slice(), None),
        };
        out.extend(keep.iter().map(|m| m.get().to_owned()));
        out.push(assistant(own, &self.text));
        let messages = format!("[{}]", out.join(","));
        Ok(with_limits(
            &request,
            self.next_size(),
            self.min_left(),
            Some(&messages),
        ))
    }

    fn min_left(&self) -> Option<u64> {
        self.min_tokens
            .map(|min| min.saturating_sub(self.generated).min(self.next_size()))
    }

    /// Adds a chunk's reply to the run, and says whether it ends it.
    fn take(&mut self, reply: Bytes) -> Result<Piece, ProxyError> {
        let bad = |detail: String| ProxyError::DecoderBadFraming {
            decoder: self.decoder.target().authority().to_string(),
            detail,
        };
        let value: Value = serde_json::from_slice(&reply)
            .map_err(|e| bad(format!("a decode chunk's reply is not JSON: {e}")))?;
        let choice = &value["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let finish = choice["finish_reason"].as_str().map(str::to_owned);
        self.ended = (
            choice["finish_reason"].clone(),
            choice["stop_reason"].clone(),
        );
        let tokens = value["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(if text.is_empty() { 0 } else { self.next_size() });
        self.generated += tokens;
        self.text.push_str(&text);
        let budget_used = self
            .chunking
            .budget
            .is_some_and(|budget| self.generated >= budget);
        self.done = finish.as_deref() != Some("length") || budget_used || tokens == 0;
        if self.first.is_none() {
            self.first = Some(value);
        }
        Ok(Piece {
            text,
            finish: if self.done { finish } else { None },
        })
    }

    /// The non-streaming answer: the first chunk's reply with the whole text, the last
    /// chunk's finish reason and the usage of all of them.
    fn whole(&self) -> Value {
        let mut out = self.first.clone().unwrap_or_default();
        let usage = self.usage();
        if let Some(choice) = out["choices"].get_mut(0) {
            choice["message"]["content"] = Value::String(self.text.clone());
            choice["finish_reason"] = self.ended.0.clone();
            if !choice["stop_reason"].is_null() || !self.ended.1.is_null() {
                choice["stop_reason"] = self.ended.1.clone();
            }
        }
        out["usage"] = usage;
        out
    }

    /// Usage as one decode would report it: the prompt once, every chunk's tokens.
    fn usage(&self) -> Value {
        let first = self.first.as_ref();
        let prompt = first
            .and_then(|f| f["usage"]["prompt_tokens"].as_u64())
            .unwrap_or(0);
        let mut usage = Map::new();
        usage.insert("prompt_tokens".into(), prompt.into());
        usage.insert("total_tokens".into(), (prompt + self.generated).into());
        usage.insert("completion_tokens".into(), self.generated.into());
        if let Some(details) = first.map(|f| &f["usage"]["prompt_tokens_details"]) {
            if !details.is_null() {
                usage.insert("prompt_tokens_details".into(), details.clone());
            }
        }
        Value::Object(usage)
    }

    /// One stream event for a chunk's text.
    fn event(&self, piece: &Piece, first: bool) -> Value {
        let mut delta = Map::new();
        if first {
            delta.insert("role".into(), "assistant".into());
        }
        delta.insert("content".into(), piece.text.clone().into());
        let mut event = self.event_head();
        event["choices"] = json!([{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": piece.finish,
        }]);
        event
    }

    fn usage_event(&self) -> Value {
        let mut event = self.event_head();
        event["choices"] = json!([]);
        event["usage"] = self.usage();
        event
    }

    /// The fields every event of the stream shares, from the first chunk's reply.
    fn event_head(&self) -> Value {
        let first = self.first.as_ref();
        let field = |key: &str| first.map_or(Value::Null, |f| f[key].clone());
        json!({
            "id": field("id"),
            "object": "chat.completion.chunk",
            "created": field("created"),
            "model": field("model"),
        })
    }
}

/// `messages`' final assistant message holding `text`: the client's own one extended, or a
/// new one.
fn assistant(own: Option<&RawValue>, text: &str) -> String {
    if let Some(mut message) =
        own.and_then(|m| serde_json::from_str::<Map<String, Value>>(m.get()).ok())
    {
        match message.get_mut("content") {
            Some(Value::String(content)) => content.push_str(text),
            Some(Value::Array(parts)) => parts.push(json!({"type": "text", "text": text})),
            _ => {
                message.insert("content".into(), text.into());
            }
        }
        return Value::Object(message).to_string();
    }
    json!({"role": "assistant", "content": text}).to_string()
}

/// The first chunk's body: the connector's decode leg, limited to one chunk and not streamed.
fn limited(decode_body: &Bytes, n: u64, min: Option<u64>) -> Result<Spliced, ProxyError> {
    let request = super::parse(decode_body)?;
    Ok(with_limits(&request, n, min, None))
}

/// `request` cut to `n` tokens (`min` the client's `min_tokens` still owed) and not streamed;
/// a later chunk also continues `messages` and carries no transfer parameters (the KV cache
/// they named was consumed by the first chunk).
fn with_limits(
    request: &JsonObject<'_>,
    n: u64,
    min: Option<u64>,
    messages: Option<&str>,
) -> Spliced {
    let (n, min) = (n.to_string(), min.map(|m| m.to_string()));
    let mut edits = vec![
        ("max_tokens", Edit::Set(&n)),
        ("max_completion_tokens", Edit::Set(&n)),
        ("stream", Edit::Set("false")),
        ("stream_options", Edit::Remove),
    ];
    if let Some(min) = &min {
        edits.push(("min_tokens", Edit::Replace(min)));
    }
    if let Some(messages) = messages {
        edits.extend([
            ("messages", Edit::Set(messages)),
            ("kv_transfer_params", Edit::Remove),
            ("continue_final_message", Edit::Set("true")),
            ("add_generation_prompt", Edit::Set("false")),
        ]);
    }
    request.rewrite(&edits)
}

/// A chunk's answer: a 2xx body read whole, or anything else for the client as is.
async fn read(resp: Response<hyper::body::Incoming>) -> Result<Sent, ProxyError> {
    if resp.status() != StatusCode::OK {
        return Ok(Sent::Relayed(from_upstream(resp)));
    }
    body::collect_limited(resp.into_body(), REPLY_LIMIT)
        .await
        .map(Sent::Reply)
        .map_err(|e| match e {
            CollectError::TooLarge => {
                ProxyError::Internal("a decode chunk's reply is too large".into())
            }
            CollectError::Read(e) => {
                ProxyError::Internal(format!("a decode chunk's reply broke: {}", describe(&*e)))
            }
        })
}

fn sse(event: &Value) -> String {
    format!("data: {event}\n\n")
}

fn json_response(value: Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(value.to_string()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
