//! `-rewrite-cached-tokens`: the prefiller's prefix-cache hits written into the decoder's
//! usage, for vLLM decoders older than 0.31 (newer ones report them from
//! `remote_prefill_cached_tokens` themselves), as pd-sidecar and vllm-router do. Only the
//! `usage` member of each JSON reply or SSE event changes; the other bytes pass as they came,
//! and a stream's events go out as soon as each is complete.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};

use super::{BoxError, ProxyBody};
use crate::json_edit::{Edit, JsonObject};

/// The largest event (or whole JSON reply) held back to be rewritten; a longer one passes
/// unchanged.
const HOLD_LIMIT: usize = 4 << 20;

/// `usage.prompt_tokens_details.cached_tokens` of a prefill reply (absent: 0).
pub fn cached_tokens(prefill_reply: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(prefill_reply)
        .ok()
        .and_then(|v| {
            v.pointer("/usage/prompt_tokens_details/cached_tokens")?
                .as_u64()
        })
        .unwrap_or(0)
}

/// `json` with `usage.prompt_tokens_details.cached_tokens` set to `cached` (the details
/// object created if missing); `None` if `json` is not an object with an object `usage`.
pub fn with_cached_tokens(json: &[u8], cached: u64) -> Option<Vec<u8>> {
    let source = Bytes::copy_from_slice(json);
    let top = JsonObject::parse(&source).ok()?;
    let usage_raw = Bytes::copy_from_slice(top.get("usage")?.get().as_bytes());
    let usage = JsonObject::parse(&usage_raw).ok()?;
    let count = cached.to_string();
    let details = match usage.get("prompt_tokens_details").map(|d| d.get()) {
        Some(d) if d.trim_start().starts_with('{') => {
            let raw = Bytes::copy_from_slice(d.as_bytes());
            let obj = JsonObject::parse(&raw).ok()?;
            String::from_utf8(
                obj.rewrite(&[("cached_tokens", Edit::Set(&count))])
                    .to_vec(),
            )
            .ok()?
        }
        _ => format!(r#"{{"cached_tokens":{count}}}"#),
    };
    let usage = String::from_utf8(
        usage
            .rewrite(&[("prompt_tokens_details", Edit::Set(&details))])
            .to_vec(),
    )
    .ok()?;
    Some(top.rewrite(&[("usage", Edit::Set(&usage))]).to_vec())
}

/// Whether `bytes` may hold a usage object to rewrite.
fn has_usage(bytes: &[u8]) -> bool {
    bytes.windows(8).any(|w| w == b"\"usage\":")
}

/// One SSE event (its bytes up to and including the blank line) with every `data:` line that
/// carries a usage object rewritten.
fn rewrite_event(event: &[u8], cached: u64) -> Bytes {
    if !has_usage(event) {
        return Bytes::copy_from_slice(event);
    }
    let mut out = Vec::with_capacity(event.len() + 32);
    for line in event.split_inclusive(|&b| b == b'\n') {
        let rewritten = line
            .strip_prefix(b"data:")
            .map(|rest| {
                let end = rest.len()
                    - rest
                        .iter()
                        .rev()
                        .take_while(|b| b.is_ascii_whitespace())
                        .count();
                (rest, end)
            })
            .and_then(|(rest, end)| {
                let json = rest[..end].trim_ascii_start();
                with_cached_tokens(json, cached).map(|j| (j, &rest[end..]))
            });
        match rewritten {
            Some((json, tail)) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&json);
                out.extend_from_slice(tail);
            }
            None => out.extend_from_slice(line),
        }
    }
    Bytes::from(out)
}

/// A decoder's reply body with its usage rewritten ([`with_cached_tokens`]).
pub struct CachedTokens {
    inner: ProxyBody,
    cached: u64,
    /// SSE: events are rewritten one by one; else the whole reply at its end.
    sse: bool,
    held: BytesMut,
    /// Held bytes went over [`HOLD_LIMIT`]: the rest passes unchanged.
    passing: bool,
}

impl CachedTokens {
    pub fn new(inner: ProxyBody, cached: u64, sse: bool) -> Self {
        Self {
            inner,
            cached,
            sse,
            held: BytesMut::new(),
            passing: false,
        }
    }

    /// The complete events held, rewritten, if any.
    fn complete_events(&mut self) -> Option<Bytes> {
        let end = self
            .held
            .windows(2)
            .rposition(|w| w == b"\n\n")
            .map(|i| i + 2)?;
        let events = self.held.split_to(end);
        if !has_usage(&events) {
            // Events without a usage member are relayed without a copy.
            return Some(events.freeze());
        }
        let mut out = BytesMut::with_capacity(events.len() + 32);
        let mut rest: &[u8] = &events;
        while let Some(i) = rest.windows(2).position(|w| w == b"\n\n") {
            out.extend_from_slice(&rewrite_event(&rest[..i + 2], self.cached));
            rest = &rest[i + 2..];
        }
        Some(out.freeze())
    }
}

impl Body for CachedTokens {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if this.passing {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    this.held.extend_from_slice(&data);
                    if this.held.len() > HOLD_LIMIT {
                        this.passing = true;
                        let held = this.held.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                    if this.sse {
                        if let Some(events) = this.complete_events() {
                            return Poll::Ready(Some(Ok(Frame::data(events))));
                        }
                    }
                }
                Poll::Ready(None) => {
                    if this.held.is_empty() {
                        return Poll::Ready(None);
                    }
                    let held = this.held.split().freeze();
                    let out = if this.sse {
                        rewrite_event(&held, this.cached)
                    } else {
                        with_cached_tokens(&held, this.cached).map_or(held, Bytes::from)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[test]
    fn usage_gets_the_prefillers_cached_tokens_and_nothing_else_changes() {
        let reply = br#"{"id":"x","usage":{"prompt_tokens":9,"total_tokens":12},"n":1e400}"#;
        assert_eq!(
            with_cached_tokens(reply, 7).unwrap(),
            br#"{"id":"x","usage":{"prompt_tokens":9,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":7}},"n":1e400}"#
        );
        let reply = br#"{"usage":{"prompt_tokens_details":{"cached_tokens":0,"x":1}}}"#;
        assert_eq!(
            with_cached_tokens(reply, 3).unwrap(),
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":3,"x":1}}}"#
        );
        assert!(with_cached_tokens(br#"{"usage":null}"#, 3).is_none());
        assert_eq!(
            cached_tokens(br#"{"usage":{"prompt_tokens_details":{"cached_tokens":5}}}"#),
            5
        );
        assert_eq!(cached_tokens(b"{}"), 0);
    }

    #[tokio::test]
    async fn a_stream_split_anywhere_has_only_its_usage_event_rewritten() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4}}\n\ndata: [DONE]\n\n";
        let want = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let chunks: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::copy_from_slice(&stream[..split]))),
                Ok(Frame::data(Bytes::copy_from_slice(&stream[split..]))),
            ];
            let inner = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
            let out = CachedTokens::new(inner, 2, true)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&out[..], &want[..], "split at {split}");
        }
    }
}
