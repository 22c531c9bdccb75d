//! llm-d's decode-first `cache_hit_threshold` under `--protocol lmcache` (§7.10.4): a decode
//! whose prompt is not in the shared store answers `cache_threshold` at once when its
//! threshold asks for more than it has.

use crate::support::*;
use crate::{CHAT, COMPLETIONS, GENERATE, MESSAGES, RESPONSES};
use serde_json::{json, Value};
use vllm_sim::{Protocol, SimConfig, SimServer};

/// A shared store (the peer) and a decoder that asks it, with `tweak` on the decoder.
async fn pair(tweak: impl FnOnce(&mut SimConfig)) -> (SimServer, SimServer) {
    let store = sim(|c| c.protocol = Protocol::Lmcache).await;
    let peer = format!("http://{}", store.side_channel_addr());
    let d = sim(|c| {
        c.protocol = Protocol::Lmcache;
        c.lmcache_peer = Some(peer);
        tweak(c);
    })
    .await;
    (store, d)
}

fn completion(threshold: Value) -> Value {
    json!({"prompt": "alpha beta gamma", "max_tokens": 4, "cache_hit_threshold": threshold})
}

fn chat(threshold: Value) -> Value {
    json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4,
        "cache_hit_threshold": threshold})
}

/// Chat's prompt tokens for "hi there": 4 + 2 + 3.
const CHAT_TOKENS: u64 = 9;

#[tokio::test]
async fn below_the_threshold_answers_at_once_without_tokens() {
    bounded(async {
        // A prefill this long would outlast the assertion below: the answer must not wait.
        let (_store, d) = pair(|c| c.ttft_ms = 10_000).await;
        let r = post(
            d.api_addr(),
            COMPLETIONS,
            &completion(json!(0.5)).to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let b = r.json();
        assert_eq!(b["object"], "text_completion");
        assert_eq!(b["choices"][0]["finish_reason"], "cache_threshold");
        assert_eq!(b["choices"][0]["text"], "");
        assert_eq!(
            b["usage"],
            json!({"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0,
                "prompt_tokens_details": null})
        );
        assert_eq!(b["kv_transfer_params"], Value::Null);
        assert!(last_logged(&d).await["first_byte_ms"].as_u64().unwrap() < 10_000);

        let r = post(d.api_addr(), CHAT, &chat(json!(1)).to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let b = r.json();
        assert_eq!(b["object"], "chat.completion");
        assert_eq!(b["choices"][0]["finish_reason"], "cache_threshold");
        assert_eq!(b["choices"][0]["message"]["content"], "");
        assert_eq!(b["usage"]["prompt_tokens"], CHAT_TOKENS);
        assert_eq!(b["usage"]["completion_tokens"], 0);
        assert!(last_logged(&d).await["first_byte_ms"].as_u64().unwrap() < 10_000);

        let ds = state(&d).await;
        assert_eq!(counter(&ds, "cache_threshold_misses"), 2);
        assert_eq!(counter(&ds, "lmcache_hits"), 0);
        assert_eq!(counter(&ds, "lmcache_misses"), 0);
        assert_eq!(counter(&ds, "decode_completed"), 2);
        assert_eq!(ds["kv"]["free_blocks"], ds["kv"]["total_blocks"]);
    })
    .await;
}

#[tokio::test]
async fn below_the_threshold_streams_one_finish_chunk() {
    bounded(async {
        let (_store, d) = pair(|_| {}).await;
        let mut body = chat(json!(0.9));
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
        let (status, evs) = frames(d.api_addr(), CHAT, &body.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 3, "{evs:?}");
        let c = sse_json(&evs[0]);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"][0]["finish_reason"], "cache_threshold");
        assert_eq!(c["choices"][0]["delta"], json!({}));
        let u = sse_json(&evs[1]);
        assert_eq!(u["choices"], json!([]));
        assert_eq!(
            u["usage"],
            json!({"prompt_tokens": CHAT_TOKENS, "total_tokens": CHAT_TOKENS,
                "completion_tokens": 0})
        );
        assert_eq!(&evs[2][..], b"data: [DONE]\n\n");

        let mut body = completion(json!(0.5));
        body["stream"] = true.into();
        let (status, evs) = frames(d.api_addr(), COMPLETIONS, &body.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 2, "{evs:?}");
        let c = sse_json(&evs[0]);
        assert_eq!(c["choices"][0]["finish_reason"], "cache_threshold");
        assert_eq!(c["choices"][0]["text"], "");
        assert_eq!(&evs[1][..], b"data: [DONE]\n\n");
        assert_eq!(counter(&state(&d).await, "cache_threshold_misses"), 2);
    })
    .await;
}

#[tokio::test]
async fn met_once_the_store_has_the_prompt() {
    bounded(async {
        let (store, d) = pair(|_| {}).await;
        let r = post(d.api_addr(), COMPLETIONS, &completion(json!(1)).to_string()).await;
        assert_eq!(r.json()["choices"][0]["finish_reason"], "cache_threshold");
        // The one-token prefill puts the prompt in the peer's store.
        let pre = json!({"prompt": "alpha beta gamma", "max_tokens": 1});
        assert_eq!(
            post(store.api_addr(), COMPLETIONS, &pre.to_string())
                .await
                .status,
            200
        );
        let r = post(d.api_addr(), COMPLETIONS, &completion(json!(1)).to_string()).await;
        assert_eq!(r.status, 200);
        let b = r.json();
        assert_eq!(b["choices"][0]["finish_reason"], "length");
        assert_eq!(b["choices"][0]["text"], " t0 t1 t2 t3");
        assert_eq!(b["usage"]["completion_tokens"], 4);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "lmcache_hits"), 1);
        assert_eq!(counter(&ds, "cache_threshold_misses"), 1);
    })
    .await;
}

#[tokio::test]
async fn threshold_zero_and_other_requests_decode() {
    bounded(async {
        let (_store, d) = pair(|_| {}).await;
        for t in [json!(0), json!(0.0), Value::Null] {
            let r = post(d.api_addr(), COMPLETIONS, &completion(t).to_string()).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["choices"][0]["text"], " t0 t1 t2 t3");
        }
        // The one-token prefill of §7.5 is no decode: it runs whatever the threshold.
        let pre = json!({"prompt": "x y", "max_tokens": 1, "cache_hit_threshold": 1});
        let r = post(d.api_addr(), COMPLETIONS, &pre.to_string()).await;
        assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
        // The other routes have no such field: a miss decodes, and the key is ignored.
        for path in [RESPONSES, MESSAGES, GENERATE] {
            let mut b = route_body(path, false);
            b["cache_hit_threshold"] = 1.into();
            let (status, text) = exchange(d.api_addr(), path, &b.to_string(), &[]).await;
            assert_eq!(status, 200, "{path}: {text}");
            assert!(route_reply_ok(path, false, &text), "{path}: {text}");
            let logged = last_logged(&d).await;
            assert_eq!(
                logged["ignored_fields"],
                json!(["cache_hit_threshold"]),
                "{path}"
            );
        }
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "cache_threshold_misses"), 0);
        assert_eq!(counter(&ds, "lmcache_misses"), 6);
        // Other protocols validate the field but have no store to measure it against.
        let n = sim(|_| {}).await;
        let r = post(n.api_addr(), CHAT, &chat(json!(1)).to_string()).await;
        assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
        assert_eq!(last_logged(&n).await["ignored_fields"], json!([]));
    })
    .await;
}

#[tokio::test]
async fn an_invalid_threshold_is_a_validation_400() {
    bounded(async {
        let (_store, d) = pair(|_| {}).await;
        let bad = [
            json!(true),
            json!("0.5"),
            json!(-0.1),
            json!(1.5),
            json!([0.5]),
            json!({"t": 1}),
        ];
        for t in &bad {
            for (path, body) in [
                (COMPLETIONS, completion(t.clone())),
                (CHAT, chat(t.clone())),
            ] {
                let r = post(d.api_addr(), path, &body.to_string()).await;
                assert_eq!(r.status, 400, "{path} {t}: {}", r.text());
                let e = &r.json()["error"];
                assert_eq!(e["type"], "Bad Request", "{e}");
                assert_eq!(e["param"], "cache_hit_threshold", "{e}");
                assert_eq!(e["code"], 400);
            }
        }
        // Ignored where the request model has no such field, so not validated either.
        let mut b = route_body(RESPONSES, false);
        b["cache_hit_threshold"] = "junk".into();
        assert_eq!(
            post(d.api_addr(), RESPONSES, &b.to_string()).await.status,
            200
        );
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "requests_rejected"), 2 * bad.len() as u64);
        assert_eq!(counter(&ds, "cache_threshold_misses"), 0);
    })
    .await;
}
