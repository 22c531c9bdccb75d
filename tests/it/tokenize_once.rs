//! `-tokenize-once`: the nixlv2 chat prefill asks for the prompt's token ids, and the decode
//! leg hands them to the decoder in `kv_transfer_params.prompt_token_ids` (vllm#48145).

use std::net::SocketAddr;

use crate::support::*;
use serde_json::{json as j, Value};
use vllm_sim::SimServer;

const CHAT: &str = r#"{"model":"sim-model","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Tell me about the fog over the bay"}],"max_tokens":4}"#;

async fn sidecar(decoder: SocketAddr, tokenize_once: bool) -> Sidecar {
    let mut cfg = config(decoder);
    cfg.tokenize_once = tokenize_once;
    Sidecar::start(cfg).await
}

async fn chat(sidecar: SocketAddr, p: &SimServer, body: &str) -> Value {
    let (resp, body) = call(
        sidecar,
        post("/v1/chat/completions", Some(p.api_addr()), body),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

/// The only request `sim` received on `path`, as the bytes it got.
async fn only_body(sim: &SimServer, path: &str) -> String {
    let records = sim_requests_to(sim, path).await;
    assert_eq!(records.len(), 1, "{records:?}");
    records[0]["body"].as_str().unwrap().to_string()
}

/// The prompt's token ids as the prefiller computes them: asked of a simulator directly.
async fn prompt_ids(body: &str) -> String {
    let sim = sim(|_| {}).await;
    let mut req: Value = serde_json::from_str(body).unwrap();
    req["return_token_ids"] = j!(true);
    let (_, reply) = call(
        sim.api_addr(),
        post("/v1/chat/completions", None, &req.to_string()),
    )
    .await;
    json(&reply)["prompt_token_ids"].to_string()
}

#[tokio::test]
async fn the_decoder_gets_the_prefills_token_ids_and_the_answer_is_unchanged() {
    let (p, d) = (sim(|_| {}).await, sim(|_| {}).await);
    let once = sidecar(d.api_addr(), true).await;
    let reply = chat(once.addr, &p, CHAT).await;

    // The prefill leg asks for the ids (its other edits as without the flag).
    let prefill = only_body(&p, "/v1/chat/completions").await;
    let asked: Value = serde_json::from_str(&prefill).unwrap();
    assert_eq!(asked["return_token_ids"], true, "{prefill}");
    assert!(
        prefill.ends_with(r#","return_token_ids":true}"#),
        "{prefill}"
    );
    // The decode leg: the client's body, with the prefiller's params behind the ids.
    let decode = only_body(&d, "/v1/chat/completions").await;
    let ids = prompt_ids(CHAT).await;
    let prefix = format!(
        r#"{},"kv_transfer_params":{{"prompt_token_ids":{ids},"do_remote_prefill":true"#,
        CHAT.strip_suffix('}').unwrap()
    );
    assert!(decode.starts_with(&prefix), "{decode}\n!=\n{prefix}");
    assert!(!decode.contains("return_token_ids"), "{decode}");
    let state = sim_state(&d).await;
    assert_eq!(counter(&state, "prompt_token_ids_reused"), 1);
    // The decoder pulled the KV blocks of that same prompt.
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);

    // The client sees what it would without the flag: no token ids, the same text and usage.
    assert_eq!(reply.get("prompt_token_ids"), None, "{reply}");
    assert_eq!(reply["choices"][0].get("token_ids"), None, "{reply}");
    let (p2, d2) = (sim(|_| {}).await, sim(|_| {}).await);
    let plain = sidecar(d2.api_addr(), false).await;
    let without = chat(plain.addr, &p2, CHAT).await;
    assert_eq!(reply["choices"], without["choices"]);
    assert_eq!(reply["usage"], without["usage"]);
    // And without the flag nothing is asked or carried.
    assert!(!only_body(&p2, "/v1/chat/completions")
        .await
        .contains("return_token_ids"));
    assert!(!only_body(&d2, "/v1/chat/completions")
        .await
        .contains("prompt_token_ids"));
    assert_eq!(counter(&sim_state(&d2).await, "prompt_token_ids_reused"), 0);
}

#[tokio::test]
async fn a_client_asking_for_token_ids_still_gets_them() {
    let (p, d) = (sim(|_| {}).await, sim(|_| {}).await);
    let once = sidecar(d.api_addr(), true).await;
    let body = CHAT.replace(
        r#""max_tokens":4"#,
        r#""max_tokens":4,"return_token_ids":true"#,
    );
    let reply = chat(once.addr, &p, &body).await;
    assert_eq!(
        reply["prompt_token_ids"].to_string(),
        prompt_ids(CHAT).await
    );
    assert!(reply["choices"][0]["token_ids"].is_array(), "{reply}");
    let decode = only_body(&d, "/v1/chat/completions").await;
    assert!(decode.contains(r#""return_token_ids":true"#), "{decode}");
    assert_eq!(counter(&sim_state(&d).await, "prompt_token_ids_reused"), 1);
}

#[tokio::test]
async fn echo_and_completions_are_decoded_as_before() {
    let (p, d) = (sim(|_| {}).await, sim(|_| {}).await);
    let once = sidecar(d.api_addr(), true).await;
    // echo: vLLM renders the messages anyway, so the ids are not asked for.
    let echo = CHAT.replace(r#""max_tokens":4"#, r#""max_tokens":4,"echo":true"#);
    chat(once.addr, &p, &echo).await;
    assert!(!only_body(&p, "/v1/chat/completions")
        .await
        .contains("return_token_ids"));
    assert!(!only_body(&d, "/v1/chat/completions")
        .await
        .contains("prompt_token_ids"));
    // Completions: vLLM has no reuse path for them.
    let (resp, body) = call(
        once.addr,
        post(
            "/v1/completions",
            Some(p.api_addr()),
            r#"{"model":"sim-model","prompt":"a b c","max_tokens":2}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(!only_body(&p, "/v1/completions")
        .await
        .contains("return_token_ids"));
    assert!(!only_body(&d, "/v1/completions")
        .await
        .contains("prompt_token_ids"));
    assert_eq!(counter(&sim_state(&d).await, "prompt_token_ids_reused"), 0);
}
