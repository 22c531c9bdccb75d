//! The P/D flow against simulated vLLM workers: what each leg received, byte for byte, and
//! that the prefiller's KV blocks were handed over and freed.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};
use sidecar::Connector;

/// Asserts every lease the prefiller created was pulled by the decoder.
async fn assert_no_leak(prefiller: &vllm_sim::SimServer, expected: i64) {
    assert!(sim_wait(prefiller, "idle_and_no_leases", Duration::from_secs(5)).await);
    let state = sim_state(prefiller).await;
    assert_eq!(counter(&state, "leases_created"), expected, "{state}");
    assert_eq!(counter(&state, "leases_pulled"), expected, "{state}");
    assert_eq!(state["kv"]["invariants_ok"], true);
}

#[tokio::test]
async fn nixlv2_prefills_then_decodes_with_the_prefillers_params_verbatim() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    // Big integers, odd key order, escapes and a client-injected kv_transfer_params.
    let original = r#"{"seed":12345678901234567890,"prompt":"Tell me a story \u00e9 <&>","model":"sim-model","max_tokens":5,"min_tokens":2,"kv_transfer_params":{"remote_host":"evil"},"zz":[1.0e2]}"#;
    let (resp, body) = call_pd(sidecar.addr, &p, original).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let reply = json(&body);
    assert_eq!(reply["choices"][0]["text"], " t0 t1 t2 t3 t4");

    let p_req = &sim_requests(&p).await[0];
    let d_req = &sim_requests(&d).await[0];
    let p_body = record_body(p_req);
    assert_eq!(
        p_body["kv_transfer_params"],
        json!({"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null})
    );
    assert_eq!(p_body["stream"], false);
    assert_eq!(p_body["max_tokens"], 1);
    assert_eq!(p_body["max_completion_tokens"], 1);
    assert!(p_body.get("min_tokens").is_none());
    assert!(p_body.get("stream_options").is_none());
    let p_raw = p_req["body"].as_str().unwrap();
    // The injected params were removed first (`security::client_params`): the connector's
    // come last.
    assert!(p_raw.starts_with(r#"{"seed":12345678901234567890,"prompt":"Tell me a story \u00e9 <&>","model":"sim-model","max_tokens":1,"zz":[1.0e2],"stream":false,"max_completion_tokens":1,"kv_transfer_params":"#), "{p_raw}");

    // The decoder got the original bytes, the injected params replaced by the prefiller's.
    let d_raw = d_req["body"].as_str().unwrap();
    let prefix = r#"{"seed":12345678901234567890,"prompt":"Tell me a story \u00e9 <&>","model":"sim-model","max_tokens":5,"min_tokens":2,"zz":[1.0e2],"kv_transfer_params":{"do_remote_prefill":true"#;
    assert!(d_raw.starts_with(prefix), "{d_raw}");
    assert!(!d_raw.contains("evil"), "{d_raw}");
    let d_body = record_body(d_req);
    let params = &d_body["kv_transfer_params"];
    let p_state = sim_state(&p).await;
    assert_eq!(params["remote_engine_id"], p_state["instance"]["engine_id"]);
    assert_eq!(params["remote_port"], p.side_channel_addr().port());
    // Era C fields pass through although the sidecar knows nothing of them.
    assert_eq!(params["transfer_mode"], "pull");
    assert!(params["remote_block_ids"][0].is_array());

    let p_id = record_header(p_req, "x-request-id").unwrap();
    assert_eq!(record_header(d_req, "x-request-id"), Some(p_id));
    assert_eq!(resp.headers()["x-request-id"], p_id);
    assert_no_leak(&p, 1).await;
}

#[tokio::test]
async fn nixlv2_chat_streams_with_the_original_stream_options_restored() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let original = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":3}"#;
    let mut req = post("/v1/chat/completions", None, original);
    req.headers_mut().insert(
        "x-prefiller-url",
        format!("http://{}", p.api_addr()).parse().unwrap(),
    );
    req.headers_mut()
        .insert("x-request-id", "client-chosen-id".parse().unwrap());
    let (resp, body) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let usage = json(
        events[events.len() - 2]
            .trim_start_matches("data: ")
            .as_bytes(),
    );
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    let p_req = &sim_requests(&p).await[0];
    let d_req = &sim_requests(&d).await[0];
    let p_body = record_body(p_req);
    assert_eq!(p_body["stream"], false);
    assert!(p_body.get("stream_options").is_none());
    assert_eq!(p_body["max_tokens"], 1);
    assert_eq!(p_body["max_completion_tokens"], 1);
    let d_body = record_body(d_req);
    assert_eq!(d_body["stream"], true);
    assert_eq!(d_body["stream_options"], json!({"include_usage":true}));
    assert_eq!(d_body["max_completion_tokens"], 3);
    assert!(d_body.get("max_tokens").is_none(), "absent stays absent");
    for r in [p_req, d_req] {
        assert_eq!(
            r["headers"]["x-request-id"],
            json!(["client-chosen-id"]),
            "set once, not appended"
        );
        assert!(r["headers"].get("x-prefiller-url").is_none());
    }
    assert_no_leak(&p, 1).await;
}

#[tokio::test]
async fn every_era_of_kv_params_is_relayed_and_pulled() {
    for era in ["A", "B", "C"] {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        for s in [&p, &d] {
            sim_config(s, &format!(r#"{{"kv_params_era":"{era}"}}"#)).await;
        }
        let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
        let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"x y z","max_tokens":2}"#).await;
        assert_eq!(
            resp.status(),
            200,
            "era {era}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_no_leak(&p, 1).await;
    }
}

#[tokio::test]
async fn legacy_nixl_uses_top_level_fields_and_one_request_id() {
    let p = sim(|c| c.protocol = "nixl-v1".parse().unwrap()).await;
    let d = sim(|c| c.protocol = "nixl-v1".parse().unwrap()).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::Nixl).await;
    let original = r#"{"prompt":"hello there","max_tokens":4,"stream":true}"#;
    let (resp, body) = call_pd(sidecar.addr, &p, original).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    let p_body = record_body(&sim_requests(&p).await[0]);
    assert_eq!(p_body["do_remote_decode"], true);
    assert_eq!(p_body["stream"], false);
    assert!(p_body.get("kv_transfer_params").is_none());
    let d_body = record_body(&sim_requests(&d).await[0]);
    assert_eq!(d_body["do_remote_prefill"], true);
    for k in [
        "remote_block_ids",
        "remote_engine_id",
        "remote_host",
        "remote_port",
    ] {
        assert!(!d_body[k].is_null(), "{k} missing in {d_body}");
    }
    assert_eq!(d_body["stream"], true);
    assert_eq!(d_body["max_tokens"], 4);
    // The v1 decoder notifies the prefiller with its own id: it only matches if both legs
    // carried the same x-request-id to the same endpoint.
    assert_no_leak(&p, 1).await;
}

#[tokio::test]
async fn lmcache_prefills_one_token_then_sends_the_untouched_request() {
    let p = sim(|c| c.protocol = "lmcache".parse().unwrap()).await;
    let peer = format!("http://{}", p.side_channel_addr());
    let d = sim(move |c| {
        c.protocol = "lmcache".parse().unwrap();
        c.lmcache_peer = Some(peer);
    })
    .await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::SharedStorage).await;
    let original = r#"{"prompt": "shared prefix", "max_tokens": 3, "stream": false}"#;
    let (resp, body) = call_pd(sidecar.addr, &p, original).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let p_req = &sim_requests(&p).await[0];
    assert_eq!(record_body(p_req)["max_tokens"], 1);
    let d_req = &sim_requests(&d).await[0];
    assert_eq!(
        d_req["body"].as_str().unwrap(),
        original,
        "the decoder gets the client's bytes"
    );
    assert_eq!(
        record_header(p_req, "x-request-id"),
        record_header(d_req, "x-request-id")
    );
    assert_eq!(counter(&sim_state(&d).await, "lmcache_hits"), 1);
}

#[tokio::test]
async fn concurrent_requests_leave_no_leases_behind() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (addr, pa) = (sidecar.addr, p.api_addr());
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"prompt":"request number {i}","max_tokens":3,"stream":{}}}"#,
                i % 2 == 0
            );
            call(addr, post("/v1/completions", Some(pa), &body))
                .await
                .0
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_no_leak(&p, 16).await;
    let d_state = sim_state(&d).await;
    assert_eq!(counter(&d_state, "decode_completed"), 16);
    let ids: std::collections::HashSet<Value> = sim_requests(&d)
        .await
        .iter()
        .map(|r| r["headers"]["x-request-id"].clone())
        .collect();
    assert_eq!(ids.len(), 16, "each request gets its own id");
}

/// A prompt large enough to be sent from the client's buffer rather than copied: both legs
/// get its exact bytes, the decode leg the whole original body plus the prefiller's params.
#[tokio::test]
async fn a_large_prompt_reaches_both_legs_byte_for_byte() {
    let p = sim(|c| c.max_model_len = 1 << 20).await;
    let d = sim(|c| c.max_model_len = 1 << 20).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let words = "lorem ipsum \\u00e9 \\\"q\\\" ".repeat(4096);
    let original =
        format!("{{\"model\":\"sim-model\", \"prompt\": \"{words}\" ,\n \"max_tokens\":3}}");
    let (resp, body) = call(
        sidecar.addr,
        post("/v1/completions", Some(p.api_addr()), &original),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));

    let p_body = sim_requests(&p).await[0]["body"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(p_body.contains(&format!("\"prompt\": \"{words}\"")));
    let p_json = json(p_body.as_bytes());
    assert_eq!(p_json["max_tokens"], 1);
    assert_eq!(p_json["stream"], false);

    let d_body = sim_requests(&d).await[0]["body"]
        .as_str()
        .unwrap()
        .to_string();
    let head = &original[..original.len() - 1];
    assert!(
        d_body.starts_with(head),
        "decode body does not start with the original"
    );
    let rest = &d_body[head.len()..];
    assert!(rest.starts_with(",\"kv_transfer_params\":{"), "{rest}");
    assert!(rest.ends_with('}'));
    assert_no_leak(&p, 1).await;
}

/// `-busy-poll` changes how the sidecar waits, not what it does.
#[tokio::test]
async fn a_busy_polling_sidecar_serves_pd_requests() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let mut config = config(d.api_addr());
    config.busy_poll = Duration::from_millis(1);
    let sidecar = Sidecar::start(config).await;
    for _ in 0..3 {
        let (resp, body) = call_pd(sidecar.addr, &p, r#"{"prompt":"a b","max_tokens":2}"#).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(json(&body)["choices"][0]["text"], " t0 t1");
    }
    assert_no_leak(&p, 3).await;
}
