//! Multimodal content parts in chat prompts (§7.4 steps 3 and 5): the four media types vLLM
//! takes count a fixed number of tokens each and give no echo words; a malformed or unknown
//! part is a 400.

use crate::support::*;
use crate::CHAT;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vllm_sim::{OutputMode, MM_ITEM_TOKENS};

/// One part of each media type vLLM accepts in `messages[*].content[*]`.
pub fn media_parts() -> Vec<Value> {
    vec![
        json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
        json!({"type": "audio_url", "audio_url": {"url": "https://example.com/meow.wav"}}),
        json!({"type": "video_url", "video_url": {"url": "https://example.com/cat.mp4"}}),
        json!({"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}),
    ]
}

#[tokio::test]
async fn media_parts_count_fixed_tokens_and_give_no_echo_words() {
    bounded(async {
        let s = sim(|c| c.mode = OutputMode::Echo).await;
        let mut content = vec![json!({"type": "text", "text": "hello world"})];
        content.extend(media_parts());
        let body = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4});
        let r = post(s.api_addr(), CHAT, &body.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        // 3 + (4 + 2 text tokens + 4 items).
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 4 + 2 + 4 * MM_ITEM_TOKENS);
        // Echo cycles over the text alone: the items add no words.
        assert_eq!(
            v["choices"][0]["message"]["content"],
            " hello world hello world"
        );
        assert!(v.get("ec_transfer_params").is_none(), "not an encoder: {v}");
    })
    .await;
}

#[tokio::test]
async fn malformed_or_unknown_parts_are_400() {
    bounded(async {
        let s = sim(|_| {}).await;
        let bad_parts = [
            (json!({"type": "image_url"}), "image_url.url"),
            (
                json!({"type": "image_url", "image_url": {"url": 5}}),
                "image_url.url",
            ),
            (
                json!({"type": "image_url", "image_url": "https://x/y.png"}),
                "image_url.url",
            ),
            (
                json!({"type": "audio_url", "audio_url": {}}),
                "audio_url.url",
            ),
            (
                json!({"type": "video_url", "video_url": {"url": ""}}),
                "video_url.url",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"format": "wav"}}),
                "input_audio.data",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"data": 1}}),
                "input_audio.data",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"data": "AA", "format": 3}}),
                "input_audio.data",
            ),
            (json!({"type": "text"}), "Text parts"),
            (
                json!({"type": "file", "file": {"file_id": "f"}}),
                "Content parts must be of type",
            ),
        ];
        for (part, says) in &bad_parts {
            let body = json!({"messages": [{"role": "user", "content": [part]}], "max_tokens": 1});
            let r = post(s.api_addr(), CHAT, &body.to_string()).await;
            assert_eq!(r.status, 400, "{part}: {}", r.text());
            let e = &r.json()["error"];
            assert_eq!(e["type"], "Bad Request", "{part}: {e}");
            assert_eq!(e["param"], "messages", "{part}: {e}");
            let msg = e["message"].as_str().unwrap();
            assert!(msg.contains(says), "{part}: {msg}");
        }
        let st = state(&s).await;
        assert_eq!(counter(&st, "requests_rejected"), bad_parts.len() as u64);
    })
    .await;
}

#[tokio::test]
async fn a_many_mib_inline_data_url_is_accepted() {
    bounded(async {
        let s = sim(|_| {}).await;
        // 32 MiB of base64: any per-byte rescan or per-part copy loop would blow the bound.
        let url = format!("data:image/png;base64,{}", "iVBORw0K".repeat(4 << 20));
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}], "max_tokens": 2})
        .to_string();
        assert!(body.len() > 32 << 20);
        let r = post(s.api_addr(), CHAT, &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 4 + 1 + MM_ITEM_TOKENS);
        assert_eq!(v["choices"][0]["message"]["content"], " t0 t1");
        // The request log kept the whole body as received.
        let rec = last_logged(&s).await;
        assert_eq!(rec["body"].as_str().map(str::len), Some(body.len()));
        // An encoder hashes the whole URL once.
        let e = sim(|c| c.mm_encoder_only = true).await;
        let r = post(e.api_addr(), CHAT, &body).await;
        assert_eq!(r.status, 200);
        let hash: String = Sha256::digest(url.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ec = &r.json()["ec_transfer_params"];
        assert_eq!(ec.as_object().map(|o| o.len()), Some(1), "{ec}");
        assert!(ec[&hash].is_object(), "{ec}");
    })
    .await;
}
