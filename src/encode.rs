//! Encoder disaggregation (E/PD, pd-sidecar's `ec-example` and `ec-nixl`): before the prefill,
//! each multimodal item of a chat request is encoded on one of the encoders the scheduler
//! named in `x-encoder-hosts-ports`.
//!
//! One call per item (URL items once per URL), all at once, round-robin over the encoders;
//! the first failure drops the others (closing their connections, so vLLM aborts them) and is
//! answered as a 502 naming the encoder. `ec-nixl` gathers each reply's `ec_transfer_params`
//! into the request both legs carry; `ec-example`'s encoders share a cache, so the replies
//! are only waited for.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Version};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tracing::{debug, debug_span, Instrument};

use crate::body::{self, CollectError};
use crate::error::{describe, ProxyError};
use crate::headers::REQUEST_ID;
use crate::json_edit::{Edit, JsonObject};
use crate::observe::metrics::Metrics;
use crate::observe::otel::spans::TraceParent;
use crate::upstream::{Leg, Target, Upstream};

/// An encoder reply is one token plus its transfer parameters: a few KiB.
const REPLY_LIMIT: usize = 4 << 20;
/// How much of a failed encoder's body the client's error message quotes.
const QUOTED_BODY: usize = 512;

/// What the encoders' replies are for (`-ec-connector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcConnector {
    /// `ec-example`: encoders write to a cache the prefiller reads; replies are discarded.
    Example,
    /// `ec-nixl`: each reply's `ec_transfer_params` tells the prefiller where to pull from.
    Nixl,
}

impl EcConnector {
    pub fn name(self) -> &'static str {
        match self {
            EcConnector::Example => "ec-example",
            EcConnector::Nixl => "ec-nixl",
        }
    }
}

/// What the encode stage needs.
pub struct Encode<'a> {
    pub connector: EcConnector,
    pub upstream: &'a Upstream,
    /// The allowed encoders, in the header's order.
    pub encoders: &'a [Target],
    /// The request's id: encoder call `i` carries `<id>-enc-<i>`.
    pub request_id: &'a HeaderValue,
    /// The client's (cleaned) head, for its trace parent.
    pub head: &'a Parts,
    /// The whole stage's bound.
    pub timeout: Duration,
    pub metrics: &'a Metrics,
}

/// Runs the encode stage for `request`. With `ec-nixl` and parameters gathered, the body both
/// legs then carry (the client's, with `ec_transfer_params` replaced); `None` leaves it as is.
pub async fn run(cx: Encode<'_>, request: &JsonObject<'_>) -> Result<Option<Bytes>, ProxyError> {
    let items = items(request);
    if items.is_empty() || cx.encoders.is_empty() {
        return Ok(None);
    }
    let started = Instant::now();
    let calls = items.iter().enumerate().map(|(i, item)| {
        let encoder = &cx.encoders[i % cx.encoders.len()];
        call(&cx, request, encoder, i, item).instrument(debug_span!("encode", item = i))
    });
    let all = futures_util::future::try_join_all(calls);
    let replies = match crate::runtime::within(cx.timeout, all).await {
        Ok(replies) => replies,
        Err(_) => Err(ProxyError::Timeout {
            leg: Leg::Encode,
            target: cx
                .encoders
                .iter()
                .map(Target::authority)
                .collect::<Vec<_>>()
                .join(","),
            after: cx.timeout,
        }),
    };
    cx.metrics
        .encode_stage(started.elapsed().as_secs_f64(), replies.is_ok());
    let replies = replies?;
    debug!(
        items = items.len(),
        encoders = cx.encoders.len(),
        ms = started.elapsed().as_millis() as u64,
        "encoded"
    );
    if cx.connector == EcConnector::Example {
        return Ok(None);
    }
    let merged = merge(&replies);
    if merged.is_empty() {
        debug!("no encoder returned ec_transfer_params; the prefiller encodes itself");
        return Ok(None);
    }
    let merged = Value::Object(merged).to_string();
    Ok(Some(
        request
            .rewrite(&[("ec_transfer_params", Edit::Set(&merged))])
            .to_bytes(),
    ))
}

/// The multimodal content parts of `messages[*].content[*]`, in order, a URL's item once.
/// A body whose messages do not have the chat shape has none: vLLM answers it.
fn items<'a>(request: &JsonObject<'a>) -> Vec<&'a RawValue> {
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        content: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Part<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        image_url: Option<&'a RawValue>,
        #[serde(borrow, default)]
        audio_url: Option<&'a RawValue>,
        #[serde(borrow, default)]
        video_url: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Url<'a> {
        #[serde(borrow)]
        url: Cow<'a, str>,
    }
    let Some(messages) = request
        .get("messages")
        .and_then(|m| serde_json::from_str::<Vec<Message<'a>>>(m.get()).ok())
    else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let parts = messages
        .iter()
        .filter_map(|m| m.content)
        .filter_map(|c| serde_json::from_str::<Vec<&'a RawValue>>(c.get()).ok())
        .flatten();
    for raw in parts {
        let Ok(part) = serde_json::from_str::<Part<'a>>(raw.get()) else {
            continue;
        };
        let url_field = match part.kind.as_deref() {
            Some("image_url") => part.image_url,
            Some("audio_url") => part.audio_url,
            Some("video_url") => part.video_url,
            // Inline audio has no URL to tell two items apart by: each is encoded.
            Some("input_audio") => {
                out.push(raw);
                continue;
            }
            _ => continue,
        };
        let url = url_field.and_then(|f| serde_json::from_str::<Url<'a>>(f.get()).ok());
        // An item whose URL does not parse is sent as is: vLLM answers for it.
        if url.is_none_or(|url| seen.insert(url.url)) {
            out.push(raw);
        }
    }
    out
}

/// Encoder call `i`: the client's request with `item` as its only message, for one token.
async fn call(
    cx: &Encode<'_>,
    request: &JsonObject<'_>,
    encoder: &Target,
    i: usize,
    item: &RawValue,
) -> Result<Bytes, ProxyError> {
    let messages = format!(r#"[{{"role":"user","content":[{}]}}]"#, item.get());
    let body = request.rewrite(&[
        ("messages", Edit::Set(&messages)),
        ("max_tokens", Edit::Set("1")),
        ("max_completion_tokens", Edit::Replace("1")),
        ("stream", Edit::Set("false")),
        ("stream_options", Edit::Remove),
        // Transfer parameters are for the prefill and decode legs, not for an encoder.
        ("kv_transfer_params", Edit::Remove),
        ("ec_transfer_params", Edit::Remove),
    ]);
    let mut req = Request::new(body::spliced(body));
    *req.method_mut() = Method::POST;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = encoder.uri(Some(&PathAndQuery::from_static("/v1/chat/completions")));
    let headers = req.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let id = format!(
        "{}-enc-{i}",
        String::from_utf8_lossy(cx.request_id.as_bytes())
    );
    if let Ok(id) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, id);
    }
    if let Some(parent) = cx.head.extensions.get::<TraceParent>() {
        req.extensions_mut().insert(parent.clone());
    }
    let failed = |status, detail| ProxyError::EncoderFailed {
        encoder: encoder.authority().to_string(),
        item: i,
        status,
        detail,
    };
    let resp = cx
        .upstream
        .send(Leg::Encode, req)
        .await
        .map_err(|e| failed(None, describe(&e)))?;
    let status = resp.status();
    let reply = body::collect_limited(resp.into_body(), REPLY_LIMIT)
        .await
        .map_err(|e| match e {
            CollectError::TooLarge => failed(Some(status), "reply too large".into()),
            CollectError::Read(e) => failed(Some(status), describe(&*e)),
        })?;
    if !status.is_success() {
        let quoted = String::from_utf8_lossy(&reply[..reply.len().min(QUOTED_BODY)]).into_owned();
        return Err(failed(Some(status), quoted));
    }
    Ok(reply)
}

/// Every reply's `ec_transfer_params` object, key by key (a later item's wins).
fn merge(replies: &[Bytes]) -> Map<String, Value> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        ec_transfer_params: Option<Map<String, Value>>,
    }
    let mut merged = Map::new();
    for reply in replies {
        match serde_json::from_slice::<Reply>(reply) {
            Ok(Reply {
                ec_transfer_params: Some(params),
            }) => merged.extend(params),
            Ok(_) => debug!("an encoder reply has no ec_transfer_params"),
            Err(e) => debug!(error = %e, "an encoder reply is not the JSON expected"),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items_of(body: &str) -> Vec<String> {
        let bytes = Bytes::from(body.to_owned());
        let request = JsonObject::parse(&bytes).unwrap();
        items(&request)
            .into_iter()
            .map(|raw| raw.get().to_owned())
            .collect()
    }

    #[test]
    fn multimodal_parts_are_found_and_urls_counted_once() {
        let body = r#"{"messages":[
            {"role":"system","content":"plain text"},
            {"role":"user","content":[
                {"type":"text","text":"look"},
                {"type":"image_url","image_url":{"url":"http://a/1.png"}},
                {"type":"image_url","image_url":{"url":"http://a/1.png"}},
                {"type":"video_url","video_url":{"url":"http://a/v.mp4"}},
                {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}},
                {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}}
            ]},
            {"role":"user","content":[{"type":"audio_url","audio_url":{"url":"http://a/1.png"}}]}
        ]}"#;
        let found = items_of(body);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].contains("image_url"));
        assert!(found[1].contains("video_url"));
        assert!(found[2].contains("input_audio") && found[3].contains("input_audio"));
    }

    #[test]
    fn bodies_without_the_chat_shape_have_no_items() {
        for body in [
            r#"{"prompt":"p"}"#,
            r#"{"messages":"not a list"}"#,
            r#"{"messages":[{"role":"user","content":{"type":"image_url"}}]}"#,
        ] {
            assert!(items_of(body).is_empty(), "{body}");
        }
    }

    #[test]
    fn later_replies_win_a_shared_key_and_nulls_add_nothing() {
        let replies = [
            Bytes::from_static(br#"{"ec_transfer_params":{"a":1,"b":1}}"#),
            Bytes::from_static(br#"{"ec_transfer_params":null}"#),
            Bytes::from_static(br#"{"ec_transfer_params":{"b":2}}"#),
        ];
        assert_eq!(
            Value::Object(merge(&replies)).to_string(),
            r#"{"a":1,"b":2}"#
        );
    }
}
