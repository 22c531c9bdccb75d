//! `continue_final_message` (§7.11): a decode driven in chunks by a proxy, each chunk
//! continuing the final assistant message, adds up to the uncut decode exactly; and the
//! flag's validation.

use crate::support::*;
use crate::CHAT;
use serde_json::{json, Value};
use std::net::SocketAddr;
use vllm_sim::{OutputMode, SimConfig};

/// What a decode gave the client: text, completion tokens, last finish reason.
#[derive(Debug, PartialEq)]
struct Decoded {
    text: String,
    tokens: u64,
    finish: String,
}

async fn chat(addr: SocketAddr, body: &Value) -> Value {
    let r = post(addr, CHAT, &body.to_string()).await;
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

fn decoded(v: &Value) -> (String, u64, String) {
    let c = &v["choices"][0];
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// The whole decode in one request of `budget` tokens.
async fn uncut(addr: SocketAddr, original: &Value, budget: u64) -> Decoded {
    let mut b = original.clone();
    b["max_tokens"] = budget.into();
    let (text, tokens, finish) = decoded(&chat(addr, &b).await);
    Decoded {
        text,
        tokens,
        finish,
    }
}

/// The decode as the sidecar's chunked decode drives it: requests of at most `chunk`
/// tokens, each after the first continuing one final assistant message (the client's own,
/// extended, or a new one) until a finish other than "length" or the budget is spent.
async fn chunked(addr: SocketAddr, original: &Value, budget: u64, chunk: u64) -> Decoded {
    let own_prefix = original["continue_final_message"] == true;
    let (mut text, mut tokens, mut finish) = (String::new(), 0u64, String::new());
    let mut first = true;
    while tokens < budget {
        let n = chunk.min(budget - tokens);
        let mut b = original.clone();
        b["max_tokens"] = n.into();
        b["max_completion_tokens"] = n.into();
        b["stream"] = false.into();
        if !first {
            b["continue_final_message"] = true.into();
            b["add_generation_prompt"] = false.into();
            let msgs = b["messages"].as_array_mut().unwrap();
            if own_prefix {
                let last = msgs.last_mut().unwrap();
                let prefix = last["content"].as_str().unwrap().to_string();
                last["content"] = format!("{prefix}{text}").into();
            } else {
                msgs.push(json!({"role": "assistant", "content": text}));
            }
        }
        first = false;
        let (t, k, f) = decoded(&chat(addr, &b).await);
        text.push_str(&t);
        tokens += k;
        finish = f;
        if finish != "length" || k == 0 {
            break;
        }
    }
    Decoded {
        text,
        tokens,
        finish,
    }
}

fn user(text: &str) -> Value {
    json!({"messages": [{"role": "user", "content": text}]})
}

/// Runs `original` uncut and in chunks of 3 on a sim set up by `tweak`; returns both.
async fn both(tweak: impl FnOnce(&mut SimConfig), original: &Value, budget: u64) -> Decoded {
    let s = sim(tweak).await;
    let whole = uncut(s.api_addr(), original, budget).await;
    let parts = chunked(s.api_addr(), original, budget, 3).await;
    assert_eq!(parts, whole, "chunked vs uncut of {original}");
    whole
}

#[tokio::test]
async fn token_mode_chunks_add_up_to_the_uncut_decode() {
    bounded(async {
        let d = both(|_| {}, &user("tell me a story"), 10).await;
        let want: String = (0..10).map(|i| format!(" t{i}")).collect();
        assert_eq!(
            (d.text.as_str(), d.tokens, d.finish.as_str()),
            (want.as_str(), 10, "length")
        );
    })
    .await;
}

#[tokio::test]
async fn eos_mid_chunk_stops_where_the_uncut_decode_does() {
    bounded(async {
        // Chunks cover 0-2, 3-5, 6-8: the stop after 7 tokens is inside the third.
        let d = both(|c| c.eos_after = Some(7), &user("tell me a story"), 12).await;
        assert_eq!((d.tokens, d.finish.as_str()), (7, "stop"));
        assert!(d.text.ends_with(" t5 t6"), "{}", d.text);
    })
    .await;
}

#[tokio::test]
async fn eos_on_a_chunk_boundary_adds_no_token() {
    bounded(async {
        // The second chunk ends on the stop with "length"; the third has nothing to add.
        let d = both(|c| c.eos_after = Some(6), &user("go on"), 10).await;
        assert_eq!((d.tokens, d.finish.as_str()), (6, "stop"));
        // Streamed, that empty continuation is the role chunk, the finish and [DONE].
        let s = sim(|c| c.eos_after = Some(6)).await;
        let body = json!({"messages": [
            {"role": "user", "content": "go on"},
            {"role": "assistant", "content": " t0 t1 t2 t3 t4 t5"},
        ], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true},
            "continue_final_message": true, "add_generation_prompt": false});
        let (status, evs) = frames(s.api_addr(), CHAT, &body.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 4, "{evs:?}");
        assert_eq!(
            sse_json(&evs[0])["choices"][0]["delta"]["role"],
            "assistant"
        );
        let end = sse_json(&evs[1]);
        assert_eq!(end["choices"][0]["delta"], json!({}));
        assert_eq!(end["choices"][0]["finish_reason"], "stop");
        assert_eq!(sse_json(&evs[2])["usage"]["completion_tokens"], 0);
        assert_eq!(&evs[3][..], b"data: [DONE]\n\n");
    })
    .await;
}

#[tokio::test]
async fn echo_mode_chunks_add_up_and_skip_the_assistant_words() {
    bounded(async {
        let echo = |c: &mut SimConfig| c.mode = OutputMode::Echo;
        // Punctuation tokens survive the round trip through the assistant message.
        let prompt = user("Hello, world! How are you?");
        let d = both(echo, &prompt, 11).await;
        assert_eq!(d.text, " Hello , world ! How are you ? Hello , world");
        let d = both(
            |c| {
                c.mode = OutputMode::Echo;
                c.eos_after = Some(8);
            },
            &prompt,
            20,
        )
        .await;
        assert_eq!((d.tokens, d.finish.as_str()), (8, "stop"));
        assert_eq!(d.text, " Hello , world ! How are you ?");
    })
    .await;
}

#[tokio::test]
async fn a_clients_own_assistant_prefix_is_continued_and_counted() {
    bounded(async {
        let mut original = json!({"messages": [
            {"role": "user", "content": "list numbers"},
            {"role": "assistant", "content": "Sure:"},
        ], "continue_final_message": true, "add_generation_prompt": false});
        // "Sure" and ":" are already 2 tokens of the 6 before the stop.
        let d = both(|c| c.eos_after = Some(6), &original, 10).await;
        assert_eq!(
            (d.text.as_str(), d.tokens, d.finish.as_str()),
            (" t2 t3 t4 t5", 4, "stop")
        );
        // Echo mode cycles over the user's words only, from the prefix's 3 tokens on.
        original["messages"][1]["content"] = "Numbers one two".into();
        let d = both(|c| c.mode = OutputMode::Echo, &original, 4).await;
        assert_eq!(d.text, " numbers list numbers list");
    })
    .await;
}

#[tokio::test]
async fn a_continuation_resumes_the_sequence_and_counts_its_prefix() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = json!({"messages": [
            {"role": "user", "content": "a b"},
            {"role": "assistant", "content": " t0 t1 t2"},
        ], "max_tokens": 2, "continue_final_message": true, "add_generation_prompt": false});
        let v = chat(s.api_addr(), &body).await;
        assert_eq!(v["choices"][0]["message"]["content"], " t3 t4");
        // 3 + (4 + 2) + (4 + 3): the assistant message is prompt.
        assert_eq!(v["usage"]["prompt_tokens"], 16);
        // Streaming resumes at the same index.
        let mut b = body.clone();
        b["stream"] = true.into();
        let (status, evs) = frames(s.api_addr(), CHAT, &b.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(sse_json(&evs[1])["choices"][0]["delta"]["content"], " t3");
        // Without the flag the same messages start over at t0.
        let mut b = body.clone();
        b.as_object_mut().unwrap().remove("continue_final_message");
        let v = chat(s.api_addr(), &b).await;
        assert_eq!(v["choices"][0]["message"]["content"], " t0 t1");
    })
    .await;
}

#[tokio::test]
async fn continuation_flags_are_validated() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = s.api_addr();
        let msgs =
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]);
        let r = post(
            a,
            CHAT,
            &json!({"messages": msgs, "continue_final_message": true,
                "add_generation_prompt": true})
            .to_string(),
        )
        .await;
        assert_eq!(r.status, 400);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "Bad Request");
        assert!(e["message"].as_str().unwrap().contains(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        ));
        // The last message must be the assistant's.
        let r = post(
            a,
            CHAT,
            &json!({"messages": [{"role": "user", "content": "hi"}],
                "continue_final_message": true, "add_generation_prompt": false})
            .to_string(),
        )
        .await;
        assert_eq!(r.status, 400);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "BadRequestError");
        assert_eq!(e["param"], "continue_final_message");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("not from the assistant"),
            "{e}"
        );
        let r = post(
            a,
            CHAT,
            &json!({"messages": msgs, "continue_final_message": "yes"}).to_string(),
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "continue_final_message");
        // vLLM's check is on explicit values: the flag alone, with the default generation
        // prompt, is accepted.
        let r = post(
            a,
            CHAT,
            &json!({"messages": msgs, "continue_final_message": true, "max_tokens": 1}).to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["message"]["content"], " t1");
    })
    .await;
}
