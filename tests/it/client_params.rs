//! Transfer parameters a client sends never reach vLLM as sent (`security::client_params`):
//! what each decoder and prefiller received, byte for byte, on every route.
//!
//! Forged addresses are loopback ones where nothing listens: a simulated decoder that got
//! them (the code under test broken) would try to pull from there.

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;
use serde_json::{json, Value};
use sidecar::observe::metrics::Metrics;
use sidecar::{App, Config};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const GENERATE: &str = "/inference/v1/generate";

/// What a client forges to be billed for cached tokens and aim the decoder's KV pull.
const FORGED: &str = r#"{"do_remote_prefill":true,"remote_prefill_cached_tokens":999999,"remote_engine_id":"forged","remote_block_ids":[1,2],"remote_host":"127.0.0.9","remote_port":9}"#;

const OK: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

/// A sidecar for `config`, and its metrics.
async fn start(config: Config) -> (Sidecar, Metrics) {
    let app = App::build(config).await.expect("the sidecar assembles");
    let metrics = app.metrics().clone();
    (Sidecar::serve(app).await, metrics)
}

fn removed(metrics: &Metrics, field: &str) -> u64 {
    metric(
        metrics,
        &format!("llm_d_sidecar_client_params_removed_total{{field=\"{field}\"}}"),
    )
}

/// The next request the recorder got, past the decoder health checks.
async fn next(d: &mut Recorder) -> Recorded {
    loop {
        let got = d.next().await;
        if !got.head.starts_with("GET /health ") {
            return got;
        }
    }
}

fn raw(record: &Value) -> &str {
    record["body"].as_str().expect("body is a string")
}

#[tokio::test]
async fn pass_through_removes_a_forged_kv_transfer_params_and_keeps_every_other_byte() {
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = start(config(d.api_addr())).await;
    // Series exist from the start.
    let text = metrics.render();
    for field in [
        "kv_transfer_params",
        "ec_transfer_params",
        "v1_remote_fields",
        "extra_args",
        "vllm_xargs",
    ] {
        let series = format!("llm_d_sidecar_client_params_removed_total{{field=\"{field}\"}} 0");
        assert!(text.lines().any(|l| l == series), "{series} in\n{text}");
    }
    let chat = format!(
        r#"{{"model":"sim-model","messages":[{{"role":"user","content":"caf\u00e9"}}],"kv_transfer_params":{FORGED},"max_tokens":3}}"#
    );
    let completion = format!(
        "{{ \"prompt\": \"a b c\",\n \"kv_transfer_params\": {FORGED} , \"max_tokens\": 2, \"seed\": 12345678901234567890 }}"
    );
    let cases = [
        (
            CHAT,
            chat.as_str(),
            r#"{"model":"sim-model","messages":[{"role":"user","content":"caf\u00e9"}],"max_tokens":3}"#,
        ),
        (
            COMPLETIONS,
            completion.as_str(),
            "{ \"prompt\": \"a b c\", \"max_tokens\": 2, \"seed\": 12345678901234567890}",
        ),
    ];
    for (i, (path, sent, expected)) in cases.into_iter().enumerate() {
        let (resp, body) = call(sidecar.addr, post(path, None, sent)).await;
        assert_eq!(
            resp.status(),
            200,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        let usage = &json(&body)["usage"];
        assert_ne!(
            usage["prompt_tokens_details"]["cached_tokens"], 999999,
            "{path}: {usage}"
        );
        let got = &sim_requests_to(&d, path).await[0];
        assert_eq!(raw(got), expected, "{path}");
        assert_eq!(
            record_header(got, "content-length"),
            Some(expected.len().to_string().as_str()),
            "{path}"
        );
        assert_eq!(removed(&metrics, "kv_transfer_params"), i as u64 + 1);
    }
    assert_eq!(removed(&metrics, "v1_remote_fields"), 0);
}

#[tokio::test]
async fn pd_legs_carry_the_connectors_params_never_the_clients() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = start(config(d.api_addr())).await;
    let sent = format!(
        r#"{{"model":"sim-model","do_remote_decode":false,"messages":[{{"role":"user","content":"hi"}}],"kv_transfer_params":{FORGED},"remote_host":"127.0.0.9","max_tokens":3}}"#
    );
    let stripped =
        r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let (resp, body) = call(sidecar.addr, post(CHAT, Some(p.api_addr()), &sent)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (p_req, d_req) = (
        record_body(&sim_requests_to(&p, CHAT).await[0]),
        record_body(&sim_requests_to(&d, CHAT).await[0]),
    );
    assert_eq!(
        p_req["kv_transfer_params"],
        json!({"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null})
    );
    let params = &d_req["kv_transfer_params"];
    assert_eq!(
        params["remote_engine_id"],
        sim_state(&p).await["instance"]["engine_id"]
    );
    assert_eq!(params["remote_port"], p.side_channel_addr().port());
    assert_ne!(params["remote_host"], "127.0.0.9");
    assert_ne!(params["remote_prefill_cached_tokens"], 999999);
    for leg in [&p_req, &d_req] {
        for key in ["remote_host", "do_remote_decode"] {
            assert!(leg.get(key).is_none(), "{key} in {leg}");
        }
    }
    assert_eq!(removed(&metrics, "kv_transfer_params"), 1);
    assert_eq!(removed(&metrics, "v1_remote_fields"), 1);

    // A prefiller that returns no parameters: the decoder prefills locally, with the client's
    // body less what it forged, and nothing in its place.
    sim_config(&p, r#"{"faults":{"omit_kv_params":true}}"#).await;
    let (resp, body) = call(sidecar.addr, post(CHAT, Some(p.api_addr()), &sent)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let decodes = sim_requests_to(&d, CHAT).await;
    assert_eq!(decodes.len(), 2);
    assert_eq!(raw(&decodes[1]), stripped);
    assert_eq!(removed(&metrics, "kv_transfer_params"), 2);
}

#[tokio::test]
async fn v1_fields_and_the_generate_apis_extra_args_are_removed() {
    let mut d = Recorder::start(OK).await;
    let (sidecar, metrics) = start(config(d.addr)).await;
    let sent = r#"{"remote_host":"127.0.0.9","token_ids":[1,2,3],"sampling_params":{"max_tokens":2,"extra_args":{"kv_transfer_params":{"do_remote_prefill":true,"remote_prefill_cached_tokens":999999},"other":1}},"do_remote_prefill":true,"remote_port":9}"#;
    let (resp, _) = call(sidecar.addr, post(GENERATE, None, sent)).await;
    assert_eq!(resp.status(), 201);
    let got = next(&mut d).await;
    let expected =
        r#"{"token_ids":[1,2,3],"sampling_params":{"max_tokens":2,"extra_args":{"other":1}}}"#;
    assert_eq!(String::from_utf8_lossy(&got.body), expected);
    assert_eq!(
        got.header("content-length"),
        Some(expected.len().to_string())
    );
    assert_eq!(removed(&metrics, "v1_remote_fields"), 1);
    assert_eq!(removed(&metrics, "extra_args"), 1);

    // vllm_xargs reaches the same extra_args on the OpenAI routes.
    let sent = r#"{"prompt":"x","vllm_xargs":{"kv_transfer_params":"x","session_id":"s"}}"#;
    let (resp, _) = call(sidecar.addr, post(COMPLETIONS, None, sent)).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(
        String::from_utf8_lossy(&next(&mut d).await.body),
        r#"{"prompt":"x","vllm_xargs":{"session_id":"s"}}"#
    );
    assert_eq!(removed(&metrics, "vllm_xargs"), 1);
}

#[tokio::test]
async fn generate_pd_legs_lose_the_clients_extra_args_params() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = start(config(d.api_addr())).await;
    let sent = format!(
        r#"{{"token_ids":[1,2,3],"sampling_params":{{"max_tokens":3,"extra_args":{{"kv_transfer_params":{FORGED}}}}}}}"#
    );
    let (resp, body) = call(sidecar.addr, post(GENERATE, Some(p.api_addr()), &sent)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (p_req, d_req) = (
        record_body(&sim_requests_to(&p, GENERATE).await[0]),
        record_body(&sim_requests_to(&d, GENERATE).await[0]),
    );
    for leg in [&p_req, &d_req] {
        assert_eq!(leg["sampling_params"]["extra_args"], json!({}), "{leg}");
    }
    assert_eq!(p_req["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!(d_req["kv_transfer_params"]["do_remote_prefill"], true);
    assert_ne!(d_req["kv_transfer_params"]["remote_host"], "127.0.0.9");
    assert_eq!(removed(&metrics, "extra_args"), 1);
}

#[tokio::test]
async fn trusting_the_client_forwards_its_body_byte_for_byte() {
    let mut d = Recorder::start(OK).await;
    let mut cfg = config(d.addr);
    cfg.trust_client_kv_params = true;
    // Not read whole either: the limit is for bodies the sidecar buffers.
    cfg.max_body_bytes = 16;
    let (sidecar, metrics) = start(cfg).await;
    let sent = format!(
        r#"{{"model":"m","messages":[],"kv_transfer_params":{FORGED},"remote_host":"127.0.0.9"}}"#
    );
    for path in [CHAT, COMPLETIONS] {
        let (resp, _) = call(sidecar.addr, post(path, None, &sent)).await;
        assert_eq!(resp.status(), 201, "{path}");
        assert_eq!(next(&mut d).await.body, sent.as_bytes(), "{path}");
    }
    assert_eq!(removed(&metrics, "kv_transfer_params"), 0);
}

#[tokio::test]
async fn a_body_without_the_fields_is_forwarded_byte_for_byte() {
    let mut d = Recorder::start(OK).await;
    let (sidecar, metrics) = start(config(d.addr)).await;
    let bodies = [
        "{ \"prompt\": \"snake_case remote extra-args\" ,\"seed\":123456789012345678901234567890, \"b\":1 }",
        // A `\u` escape: parsed, nothing to remove, the bytes kept.
        r#"{ "prompt": "caf\u00e9" , "max_tokens": 1.0e0 }"#,
    ];
    for sent in bodies {
        let (resp, _) = call(sidecar.addr, post(COMPLETIONS, None, sent)).await;
        assert_eq!(resp.status(), 201);
        let got = next(&mut d).await;
        assert_eq!(got.body, sent.as_bytes());
        assert_eq!(got.header("content-length"), Some(sent.len().to_string()));
    }
    // Only the inference routes are read: another path streams, as sent.
    let sent = format!(r#"{{"input":"x","kv_transfer_params":{FORGED}}}"#);
    let (resp, _) = call(sidecar.addr, post("/v1/embeddings", None, &sent)).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(next(&mut d).await.body, sent.as_bytes());
    assert_eq!(removed(&metrics, "kv_transfer_params"), 0);
}

#[tokio::test]
async fn an_inference_body_over_the_limit_is_refused_on_pass_through() {
    let mut d = Recorder::start(OK).await;
    let mut cfg = config(d.addr);
    cfg.max_body_bytes = 64;
    let (sidecar, _) = start(cfg).await;
    let big = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(64));
    let (resp, body) = call(sidecar.addr, post(COMPLETIONS, None, &big)).await;
    assert_eq!(resp.status(), 413, "{}", String::from_utf8_lossy(&body));
    // Other paths still stream, unbounded.
    let (resp, _) = call(sidecar.addr, post("/v1/embeddings", None, &big)).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(next(&mut d).await.body, big.as_bytes());
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_vllms_own_answer() {
    let d = sim(|_| {}).await;
    let (sidecar, _) = start(config(d.api_addr())).await;
    for (path, sent) in [
        (COMPLETIONS, "{\"prompt\": nope"),
        (CHAT, "not json at all"),
        (COMPLETIONS, r#"["kv_transfer_params"]"#),
        (COMPLETIONS, ""),
    ] {
        let direct = call(d.api_addr(), post(path, None, sent)).await;
        let via = call(sidecar.addr, post(path, None, sent)).await;
        assert_eq!(via.0.status(), direct.0.status(), "{sent}");
        assert!(via.0.status().is_client_error(), "{sent}");
        assert_eq!(via.1, direct.1, "{sent}");
        assert_eq!(raw(sim_requests_to(&d, path).await.last().unwrap()), sent);
    }
}

#[tokio::test]
async fn a_body_vllm_would_read_and_we_cannot_is_refused_not_forwarded() {
    let mut d = Recorder::start(OK).await;
    let (sidecar, _) = start(config(d.addr)).await;
    // Python's json.loads accepts NaN; a UTF-16 body hides the names from a byte search.
    let nan = format!(r#"{{"prompt":"x","temperature":NaN,"kv_transfer_params":{FORGED}}}"#);
    let utf16: Vec<u8> = format!(r#"{{"prompt":"x","kv_transfer_params":{FORGED}}}"#)
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    for sent in [nan.into_bytes(), utf16] {
        let req = hyper::Request::post(COMPLETIONS)
            .header("host", "sidecar.test")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(sent)))
            .unwrap();
        let (resp, body) = call(sidecar.addr, req).await;
        assert_eq!(resp.status(), 400, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["error"]["code"], 400);
    }
    // The next request is the first the decoder sees.
    let (resp, _) = call(sidecar.addr, post(COMPLETIONS, None, r#"{"prompt":"y"}"#)).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(next(&mut d).await.body, br#"{"prompt":"y"}"#);
}

#[tokio::test]
async fn spelled_or_dispatched_otherwise_an_inference_route_is_stripped_too() {
    // vLLM routes on the percent-decoded path, dispatches /invocations on the body, and has
    // routes beyond the five P/D ones (batch chat) that read kv_transfer_params as well.
    let mut d = Recorder::start(OK).await;
    let (sidecar, metrics) = start(config(d.addr)).await;
    let body = format!(r#"{{"prompt":"a","kv_transfer_params":{FORGED}}}"#);
    let paths = [
        "/v1/%63ompletions",
        "/v1/chat%2Fcompletions",
        "/invocations",
        "/v1/chat/completions/batch",
    ];
    for path in paths {
        let (resp, _) = call(sidecar.addr, post(path, None, &body)).await;
        assert_eq!(resp.status(), 201, "{path}");
        let got = next(&mut d).await;
        assert!(
            got.head.starts_with(&format!("POST {path} ")),
            "{}",
            got.head
        );
        assert_eq!(got.body, br#"{"prompt":"a"}"#, "{path}");
    }
    assert_eq!(removed(&metrics, "kv_transfer_params"), paths.len() as u64);
    // A form upload keeps streaming, untouched.
    let mut form = post("/invocations", None, &body);
    form.headers_mut().insert(
        "content-type",
        "multipart/form-data; boundary=x".parse().unwrap(),
    );
    let (resp, _) = call(sidecar.addr, form).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(next(&mut d).await.body, body.as_bytes());
}
