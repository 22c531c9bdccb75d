//! llm-d's decode-first (`shared-storage` with the client's `cache_hit_threshold`): the
//! decoder gets the client's request as is and answers it unless too little of the prompt is
//! in shared storage, which it says with `finish_reason: "cache_threshold"` and no output.
//! Only then does the request go P/D.
//!
//! Unlike pd-sidecar, which buffers a whole non-streaming reply and looks at the first chunk
//! of a stream only, the look is bounded ([`LOOK_LIMIT`]) and reads a stream's events up to
//! the first that carries output or a finish reason (chat streams open with a role-only
//! event); whatever was read is relayed unchanged.

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use serde_json::Value;

use super::{leg, PdContext};
use crate::body::{self, ProxyBody};
use crate::connector::BELOW_THRESHOLD;
use crate::error::ProxyError;
use crate::upstream::decoder::from_upstream;

/// A refusal is a few hundred bytes: past this much, the decoder is answering.
const LOOK_LIMIT: usize = 64 * 1024;

/// What the decoder did with the request.
pub(super) enum Tried {
    /// Its answer (or its error), for the client.
    Answered(Response<ProxyBody>),
    /// Too little was cached: prefill remotely, then decode.
    BelowThreshold,
}

/// Sends `original` to the decoder at `uri` and reads enough of the reply to tell which.
pub(super) async fn try_decode(
    cx: &PdContext,
    parts: &Parts,
    original: &Bytes,
    uri: http::Uri,
) -> Result<Tried, ProxyError> {
    let resp = cx
        .decoder
        .send(leg(parts, uri, body::full(original.clone())))
        .await?;
    let resp = from_upstream(resp);
    if !resp.status().is_success() {
        return Ok(Tried::Answered(resp));
    }
    let sse = is_event_stream(resp.headers());
    let (head, mut rest) = resp.into_parts();
    let (mut read, mut text) = (Vec::new(), BytesMut::new());
    let refused = loop {
        let ended = match rest.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.extend_from_slice(data);
                }
                read.push(Ok(frame));
                false
            }
            // Relayed as it came: the client sees the decoder's failure, not ours.
            Some(Err(e)) => {
                read.push(Err(e));
                true
            }
            None => true,
        };
        let look = if sse {
            look_at_events(&text)
        } else if ended {
            Some(refuses(
                &serde_json::from_slice(&text).unwrap_or(Value::Null),
            ))
        } else {
            None
        };
        match look {
            Some(refused) => break refused,
            None if ended || text.len() > LOOK_LIMIT => break false,
            None => {}
        }
    };
    if refused {
        // Dropping the reply closes its stream; the refusal generated nothing.
        return Ok(Tried::BelowThreshold);
    }
    Ok(Tried::Answered(Response::from_parts(
        head,
        body::replay(read, rest, ()),
    )))
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Over the complete SSE events in `text`: `Some(true)` at a refusal, `Some(false)` at the
/// first event with output, a finish reason, no choices or not JSON, `None` while only
/// output-less openings (a chat stream's role event) have arrived.
fn look_at_events(text: &[u8]) -> Option<bool> {
    let complete = text.len()
        - text
            .rsplitn(2, |b| *b == b'\n')
            .next()
            .map_or(0, <[u8]>::len);
    for line in text[..complete].split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data.is_empty() {
            continue;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return Some(false);
        };
        if refuses(&event) {
            return Some(true);
        }
        if !is_opening(&event) {
            return Some(false);
        }
    }
    None
}

/// `choices[0].finish_reason` is the refusal.
fn refuses(reply: &Value) -> bool {
    reply["choices"][0]["finish_reason"].as_str() == Some(BELOW_THRESHOLD)
}

/// A first choice with no finish reason and no output yet.
fn is_opening(event: &Value) -> bool {
    let choice = &event["choices"][0];
    let empty = |v: &Value| v.is_null() || v.as_str() == Some("");
    choice.is_object()
        && choice["finish_reason"].is_null()
        && empty(&choice["text"])
        && empty(&choice["delta"]["content"])
        && choice["delta"]["tool_calls"].is_null()
        && empty(&choice["delta"]["reasoning_content"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_seen_after_openings_and_output_ends_the_look() {
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        let refusal = br#"data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"cache_threshold"}]}"#;
        let token = br#"data: {"choices":[{"index":0,"text":"Hi","finish_reason":null}]}"#;
        let join = |events: &[&[u8]]| {
            events
                .iter()
                .flat_map(|e| [*e, b"\n\n".as_slice()])
                .flatten()
                .copied()
                .collect::<Vec<u8>>()
        };
        assert_eq!(look_at_events(&join(&[role])), None);
        assert_eq!(look_at_events(&join(&[role, refusal])), Some(true));
        assert_eq!(look_at_events(&join(&[token, refusal])), Some(false));
        assert_eq!(look_at_events(&join(&[b"data: [DONE]"])), Some(false));
        // An event cut in the middle is not looked at until it is whole.
        assert_eq!(look_at_events(&refusal[..40]), None);
        let mut cut = join(&[role]);
        cut.extend_from_slice(&refusal[..40]);
        assert_eq!(look_at_events(&cut), None);
    }

    #[test]
    fn a_json_reply_refuses_by_its_first_choice() {
        let refusal: Value = serde_json::from_str(
            r#"{"choices":[{"index":0,"text":"","finish_reason":"cache_threshold"}]}"#,
        )
        .unwrap();
        assert!(refuses(&refusal));
        assert!(!refuses(
            &serde_json::json!({"choices":[{"finish_reason":"stop"}]})
        ));
        assert!(!refuses(&Value::Null));
    }
}
