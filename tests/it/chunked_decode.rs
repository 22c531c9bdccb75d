//! `-decode-chunk-size`: a chat decode runs as successive decoder requests of at most N tokens,
//! each continuing the text so far as the final assistant message, and the client gets one
//! answer with the same text and usage as the uncut decode (checked against the simulator,
//! whose continuations resume the token sequence where the assistant message ends).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};
use vllm_sim::SimServer;

const CHAT: &str = "/v1/chat/completions";

/// The client's messages in the tests below.
fn messages() -> Value {
    json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "count for me"}
    ])
}

/// A sidecar in front of `decoder` with chunked decode of `chunk` tokens (0: off).
async fn start(decoder: &SimServer, chunk: u32) -> Sidecar {
    let mut cfg = config(decoder.api_addr());
    cfg.decode_chunk_size = chunk;
    Sidecar::start(cfg).await
}

/// `text` is the sim's token sequence `" t<from>" .. " t<to - 1>"`.
fn tokens(from: u64, to: u64) -> String {
    (from..to).map(|i| format!(" t{i}")).collect()
}

/// The JSON payloads of an SSE body's `data:` events, `[DONE]` as a string.
fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("UTF-8 stream");
    text.split_terminator("\n\n")
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?} in {text}"));
            if data == "[DONE]" {
                Value::String(data.into())
            } else {
                json(data.as_bytes())
            }
        })
        .collect()
}

/// The text of a chat stream's deltas, concatenated.
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The one event carrying usage.
fn streamed_usage(events: &[Value]) -> Value {
    let with: Vec<&Value> = events.iter().filter(|e| !e["usage"].is_null()).collect();
    assert_eq!(with.len(), 1, "one usage event in {events:?}");
    with[0]["usage"].clone()
}

/// The usage numbers a client compares (the uncut reply also has `prompt_tokens_details`).
fn counts(usage: &Value) -> [Value; 3] {
    ["prompt_tokens", "completion_tokens", "total_tokens"].map(|k| usage[k].clone())
}

/// Asserts a later chunk's body: the client's request continuing `so_far`, for `n` tokens.
fn assert_continuation(body: &Value, so_far: &str, n: u64) {
    let mut want = messages().as_array().unwrap().clone();
    want.push(json!({"role": "assistant", "content": so_far}));
    assert_eq!(body["messages"], Value::Array(want), "{body}");
    assert_eq!(body["continue_final_message"], true, "{body}");
    assert_eq!(body["add_generation_prompt"], false, "{body}");
    assert!(body.get("kv_transfer_params").is_none(), "{body}");
    assert_limits(body, n);
}

/// Every chunk is a JSON request for at most `n` tokens.
fn assert_limits(body: &Value, n: u64) {
    assert_eq!(body["max_tokens"], n, "{body}");
    assert_eq!(body["max_completion_tokens"], n, "{body}");
    assert_eq!(body["stream"], false, "{body}");
    assert!(body.get("stream_options").is_none(), "{body}");
}

/// A P/D chat request naming `prefiller`.
fn pd_chat(
    prefiller: SocketAddr,
    body: &str,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    post(CHAT, Some(prefiller), body)
}

/// The answer the same request gets without chunking, from a sidecar with chunking off in
/// front of fresh simulators (P/D when `pd`).
async fn uncut(body: &str, pd: bool) -> (hyper::Response<()>, bytes::Bytes) {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let plain = start(&d, 0).await;
    let prefiller = pd.then(|| p.api_addr());
    let (resp, bytes) = call(plain.addr, post(CHAT, prefiller, body)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(
        sim_requests_to(&d, CHAT).await.len(),
        1,
        "the uncut decode is one request"
    );
    (resp, bytes)
}

#[tokio::test]
async fn a_pd_chat_decode_runs_in_chunks_and_answers_as_the_uncut_decode() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = start(&d, 3).await;
    let original =
        json!({"model": "sim-model", "messages": messages(), "max_tokens": 10}).to_string();
    let (resp, body) = call(sidecar.addr, pd_chat(p.api_addr(), &original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let reply = json(&body);

    // What the client got is what one decode of 10 tokens gives.
    let (_, whole) = uncut(&original, true).await;
    let whole = json(&whole);
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], tokens(0, 10));
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        whole["choices"][0]["message"]["content"]
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(
        reply["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(counts(&reply["usage"]), counts(&whole["usage"]), "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 10);

    // One prefill, then four decoder requests: 3 + 3 + 3 + 1 tokens.
    assert_eq!(sim_requests_to(&p, CHAT).await.len(), 1);
    let legs: Vec<Value> = sim_requests_to(&d, CHAT)
        .await
        .iter()
        .map(record_body)
        .collect();
    assert_eq!(legs.len(), 4, "{legs:#?}");
    // The first is the P/D decode leg: the prefiller's transfer parameters, the client's
    // messages, no continuation.
    assert_eq!(
        legs[0]["kv_transfer_params"]["do_remote_prefill"], true,
        "{}",
        legs[0]
    );
    assert_eq!(legs[0]["messages"], messages());
    assert!(
        legs[0].get("continue_final_message").is_none(),
        "{}",
        legs[0]
    );
    assert_limits(&legs[0], 3);
    // The others continue one assistant message that grows by each chunk's text.
    assert_continuation(&legs[1], &tokens(0, 3), 3);
    assert_continuation(&legs[2], &tokens(0, 6), 3);
    assert_continuation(&legs[3], &tokens(0, 9), 1);
    // The prefiller's blocks were pulled by the first chunk.
    assert!(sim_wait(&p, "idle_and_no_leases", LIMIT).await);
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);
}

#[tokio::test]
async fn a_chunked_stream_has_one_event_per_chunk_then_usage_then_done() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = start(&d, 3).await;
    let original = json!({
        "model": "sim-model", "messages": messages(), "max_completion_tokens": 7,
        "stream": true, "stream_options": {"include_usage": true}
    })
    .to_string();
    let (resp, body) = call(sidecar.addr, pd_chat(p.api_addr(), &original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&body);

    let (_, whole) = uncut(&original, true).await;
    let whole = sse_events(&whole);
    assert_eq!(streamed_text(&events), tokens(0, 7));
    assert_eq!(streamed_text(&events), streamed_text(&whole));
    assert_eq!(
        counts(&streamed_usage(&events)),
        counts(&streamed_usage(&whole))
    );

    // 3 + 3 + 1 tokens: three text events, the usage event, [DONE].
    assert_eq!(events.len(), 5, "{events:#?}");
    assert_eq!(events[4], "[DONE]");
    assert_eq!(events[3]["choices"], json!([]), "{}", events[3]);
    assert_eq!(events[3]["usage"]["completion_tokens"], 7);
    let texts = [tokens(0, 3), tokens(3, 6), tokens(6, 7)];
    for (i, event) in events[..3].iter().enumerate() {
        assert_eq!(event["object"], "chat.completion.chunk", "{event}");
        let choice = &event["choices"][0];
        assert_eq!(choice["index"], 0, "{event}");
        assert_eq!(choice["delta"]["content"], texts[i], "{event}");
        let finish = if i == 2 { json!("length") } else { Value::Null };
        assert_eq!(choice["finish_reason"], finish, "{event}");
    }
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");

    // The decoder was asked for JSON chunks, never a stream.
    let legs: Vec<Value> = sim_requests_to(&d, CHAT)
        .await
        .iter()
        .map(record_body)
        .collect();
    assert_eq!(legs.len(), 3, "{legs:#?}");
    assert_limits(&legs[0], 3);
    assert_continuation(&legs[1], &tokens(0, 3), 3);
    assert_continuation(&legs[2], &tokens(0, 6), 1);
}

#[tokio::test]
async fn a_decoder_only_chat_is_chunked_too() {
    let d = sim(|_| {}).await;
    let direct = sim(|_| {}).await;
    let sidecar = start(&d, 2).await;
    let original =
        json!({"model": "sim-model", "messages": messages(), "max_tokens": 5}).to_string();
    let (resp, body) = call(sidecar.addr, post(CHAT, None, &original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let reply = json(&body);

    // The simulator's own answer to the uncut request.
    let (_, whole) = call(direct.api_addr(), post(CHAT, None, &original)).await;
    let whole = json(&whole);
    assert_eq!(reply["choices"][0]["message"]["content"], tokens(0, 5));
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        whole["choices"][0]["message"]["content"]
    );
    assert_eq!(
        reply["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(counts(&reply["usage"]), counts(&whole["usage"]), "{reply}");

    // 2 + 2 + 1 tokens; the first chunk is the client's request, cut to one chunk.
    let legs: Vec<Value> = sim_requests_to(&d, CHAT)
        .await
        .iter()
        .map(record_body)
        .collect();
    assert_eq!(legs.len(), 3, "{legs:#?}");
    assert_eq!(legs[0]["messages"], messages());
    assert!(legs[0].get("kv_transfer_params").is_none());
    assert!(legs[0].get("continue_final_message").is_none());
    assert_limits(&legs[0], 2);
    assert_continuation(&legs[1], &tokens(0, 2), 2);
    assert_continuation(&legs[2], &tokens(0, 4), 1);
}

/// A chunk that stops (here the model's end of sequence, `--eos-after`) ends the decode
/// before the budget is spent.
#[tokio::test]
async fn a_stop_ends_the_chunks_early() {
    let d = sim(|c| c.eos_after = Some(4)).await;
    let direct = sim(|c| c.eos_after = Some(4)).await;
    let sidecar = start(&d, 3).await;
    let original =
        json!({"model": "sim-model", "messages": messages(), "max_tokens": 9}).to_string();
    let (resp, body) = call(sidecar.addr, post(CHAT, None, &original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let reply = json(&body);
    // 3 tokens ("length"), then 1 ("stop"): no third chunk.
    let legs: Vec<Value> = sim_requests_to(&d, CHAT)
        .await
        .iter()
        .map(record_body)
        .collect();
    assert_eq!(legs.len(), 2, "{legs:#?}");
    assert_continuation(&legs[1], &tokens(0, 3), 3);

    // The answer is the uncut one's: its text, the stop that ended it, its usage.
    let (_, whole) = call(direct.api_addr(), post(CHAT, None, &original)).await;
    let whole = json(&whole);
    assert_eq!(reply["choices"][0]["message"]["content"], tokens(0, 4));
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        whole["choices"][0]["message"]["content"]
    );
    assert_eq!(counts(&reply["usage"]), counts(&whole["usage"]), "{reply}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        reply["choices"][0]["finish_reason"], "stop",
        "the last chunk's finish reason: {reply}"
    );
}

#[tokio::test]
async fn a_budget_within_one_chunk_is_one_ordinary_decode() {
    // Decoder-only: the decoder gets the client's bytes, streamed as the client asked.
    let d = sim(|_| {}).await;
    let sidecar = start(&d, 4).await;
    let original = r#"{"model":"sim-model", "messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (resp, body) = call(sidecar.addr, post(CHAT, None, original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&events), tokens(0, 4));
    let legs = sim_requests_to(&d, CHAT).await;
    assert_eq!(legs.len(), 1, "{legs:#?}");
    assert_eq!(legs[0]["body"], original, "forwarded unchanged");

    // P/D: the one decode leg is the usual one, the client's limits and stream kept.
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let sidecar = start(&d, 4).await;
    let original = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":3,"stream":true}"#;
    let (resp, body) = call(sidecar.addr, pd_chat(p.api_addr(), original)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(streamed_text(&sse_events(&body)), tokens(0, 3));
    let legs: Vec<Value> = sim_requests_to(&d, CHAT)
        .await
        .iter()
        .map(record_body)
        .collect();
    assert_eq!(legs.len(), 1, "{legs:#?}");
    assert_eq!(legs[0]["stream"], true);
    assert_eq!(legs[0]["max_completion_tokens"], 3);
    assert!(legs[0].get("max_tokens").is_none(), "{}", legs[0]);
    assert!(legs[0].get("continue_final_message").is_none());
    assert_eq!(legs[0]["kv_transfer_params"]["do_remote_prefill"], true);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_chunk_in_flight_and_no_more_are_sent() {
    let p = sim(|_| {}).await;
    // The first chunk is a P/D decode (KV pulled, no prefill wait); every later chunk is a
    // plain request that waits a minute for its "prefill": it is in flight until cancelled.
    let d = sim(|c| c.ttft_ms = 60_000).await;
    let sidecar = start(&d, 2).await;
    let original = json!({
        "model": "sim-model", "messages": messages(), "max_tokens": 6, "stream": true
    })
    .to_string();
    let mut client = send(sidecar.addr, pd_chat(p.api_addr(), &original)).await;
    assert_eq!(client.head().await.status(), 200);
    let first = client.next_data().await.expect("the first chunk's event");
    let first = sse_events(&first);
    assert_eq!(streamed_text(&first), tokens(0, 2), "{first:?}");

    // The second chunk reaching the decoder has no signal but its record: bounded polling.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while sim_requests_to(&d, CHAT).await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second chunk: {:#?}",
            sim_requests_to(&d, CHAT).await
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leave_and_wait_idle(client, &d).await;
    let legs = sim_requests_to(&d, CHAT).await;
    assert_eq!(legs.len(), 2, "{legs:#?}");
    assert_eq!(legs[1]["outcome"], "aborted", "{}", legs[1]);
    assert_continuation(&record_body(&legs[1]), &tokens(0, 2), 2);
    let state = sim_state(&d).await;
    assert_eq!(counter(&state, "requests_aborted/plain"), 1, "{state}");
    assert_eq!(counter(&state, "decode_completed"), 1, "{state}");

    // A later request (one ordinary decode) is the next the decoder sees: no third chunk of
    // the one that left came before or after it.
    let (resp, body) = call(
        sidecar.addr,
        pd_chat(
            p.api_addr(),
            r#"{"model":"sim-model","messages":[{"role":"user","content":"again"}],"max_tokens":2}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(sim_wait(&d, "idle", LIMIT).await);
    let legs = sim_requests_to(&d, CHAT).await;
    assert_eq!(legs.len(), 3, "{legs:#?}");
    assert_eq!(record_body(&legs[2])["messages"][0]["content"], "again");
}
