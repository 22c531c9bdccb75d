//! The Responses, Messages and generate routes (§7.15–§7.17) in every role: plain (whole and
//! streamed), prefill (lease and top-level `kv_transfer_params`), decode (pull, and a client
//! that leaves while queued), and their validation 400s.

use crate::support::*;
use crate::{GENERATE, MESSAGES, RESPONSES};
use serde_json::{json, Value};
use vllm_sim::{Protocol, SimServer};

/// One of the three APIs: its path, a client body and that body's one-token prefill.
struct Api {
    path: &'static str,
    original: Value,
}

fn responses() -> Api {
    Api {
        path: RESPONSES,
        original: json!({"model": "sim-model", "input": "hello there", "max_output_tokens": 3}),
    }
}

fn messages() -> Api {
    Api {
        path: MESSAGES,
        original: json!({"model": "sim-model", "system": "be brief",
            "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}),
    }
}

fn generate() -> Api {
    Api {
        path: GENERATE,
        original: json!({"token_ids": [11, 12, 13, 14, 15],
            "sampling_params": {"max_tokens": 3, "min_tokens": 2, "temperature": 0}}),
    }
}

fn remote_decode() -> Value {
    json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null})
}

impl Api {
    /// The prefill leg as the sidecar sends it: no stream, an output limit of 1.
    fn prefill(&self) -> Value {
        let mut b = self.original.clone();
        b["stream"] = false.into();
        match self.path {
            RESPONSES => b["max_output_tokens"] = 1.into(),
            MESSAGES => b["max_tokens"] = 1.into(),
            _ => {
                let sp = b["sampling_params"].as_object_mut().unwrap();
                sp.insert("max_tokens".into(), 1.into());
                sp.remove("min_tokens");
            }
        }
        b["kv_transfer_params"] = remote_decode();
        b
    }

    fn streamed(&self) -> Value {
        let mut b = self.original.clone();
        b["stream"] = true.into();
        b
    }

    /// The prompt tokens the sim counts for `original` (§7.15–§7.17).
    fn prompt_tokens(&self) -> u64 {
        match self.path {
            RESPONSES => 9, // 3 + (4 + 2)
            MESSAGES => 15, // 3 + (4 + 2) system + (4 + 2) user
            _ => 5,         // token_ids
        }
    }
}

/// Replaces the wall-clock `created`/`created_at` values with 0 so bodies compare as bytes.
fn zero_created(s: &str) -> String {
    let mut out = s.to_string();
    for key in ["\"created_at\":", "\"created\":"] {
        let mut from = 0;
        while let Some(at) = out[from..].find(key) {
            let start = from + at + key.len();
            let end = start
                + out[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(out.len() - start);
            out.replace_range(start..end, "0");
            from = start;
        }
    }
    out
}

async fn prefill_leg(p: &SimServer, api: &Api, id: &str) -> Reply {
    let body = api.prefill().to_string();
    send(
        p.api_addr(),
        "POST",
        api.path,
        &body,
        &[("x-request-id", id)],
    )
    .await
}

fn decode_leg(api: &Api, original: &Value, prj: &Value) -> String {
    let mut b = original.clone();
    b["kv_transfer_params"] = prj["kv_transfer_params"].clone();
    let _ = api;
    b.to_string()
}

#[tokio::test]
async fn responses_plain_body_bytes() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = json!({"input": "hello there", "max_output_tokens": 2}).to_string();
        let r = send(s.api_addr(), "POST", RESPONSES, &body, &[("x-request-id", "r1")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            zero_created(&r.text()),
            r#"{"id":"resp_r1","created_at":0,"incomplete_details":{"reason":"max_output_tokens"},"instructions":null,"metadata":null,"model":"sim-model","object":"response","output":[{"id":"msg_r1","content":[{"annotations":[],"text":" t0 t1","type":"output_text","logprobs":null}],"role":"assistant","status":"completed","type":"message"}],"parallel_tool_calls":true,"temperature":1.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":false,"max_output_tokens":2,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"incomplete","text":null,"top_logprobs":null,"truncation":"disabled","usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0,"input_tokens_per_turn":[9],"cached_tokens_per_turn":[0]},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0,"tool_output_tokens":0,"output_tokens_per_turn":[2],"tool_output_tokens_per_turn":[0]},"total_tokens":11},"user":null,"input_messages":null,"output_messages":null,"kv_transfer_params":null}"#
        );
        assert_eq!(counter(&state(&s).await, "plain_completed"), 1);
    })
    .await;
}

#[tokio::test]
async fn responses_plain_stream_events() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = json!({"input": "hi", "max_output_tokens": 2, "stream": true}).to_string();
        let (status, evs) = frames(s.api_addr(), RESPONSES, &body, &[("x-request-id", "r2")]).await;
        assert_eq!(status, 200);
        let names: Vec<String> = evs
            .iter()
            .map(|e| {
                let t = String::from_utf8_lossy(e);
                assert!(t.ends_with("\n\n") && t.matches("event: ").count() == 1, "{t}");
                t.lines().next().unwrap().trim_start_matches("event: ").to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(
            String::from_utf8_lossy(&evs[5]),
            "event: response.output_text.delta\ndata: {\"content_index\":0,\"delta\":\" t1\",\"item_id\":\"msg_r2\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":5,\"type\":\"response.output_text.delta\"}\n\n"
        );
        let done = String::from_utf8_lossy(&evs[9]).into_owned();
        let v: Value = serde_json::from_str(done.split_once("data: ").unwrap().1).unwrap();
        assert_eq!(v["sequence_number"], 9);
        assert_eq!(v["response"]["output"][0]["content"][0]["text"], " t0 t1");
        assert_eq!(v["response"]["usage"]["output_tokens"], 2);
        let recs = get(s.api_addr(), "/sim/requests").await.json();
        assert_eq!(recs[0]["events_sent"], 10);
    })
    .await;
}

#[tokio::test]
async fn messages_plain_body_and_stream_bytes() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = messages();
        let hdr = [("x-request-id", "m1")];
        let r = send(s.api_addr(), "POST", MESSAGES, &a.original.to_string(), &hdr).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            r#"{"id":"chatcmpl-m1","type":"message","role":"assistant","content":[{"type":"text","text":" t0 t1 t2"}],"model":"sim-model","stop_reason":"max_tokens","usage":{"input_tokens":15,"output_tokens":3}}"#
        );
        let (status, evs) = frames(s.api_addr(), MESSAGES, &a.streamed().to_string(), &hdr).await;
        assert_eq!(status, 200);
        let got: Vec<String> = evs.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
        assert_eq!(
            got,
            [
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"chatcmpl-m1\",\"content\":[],\"model\":\"sim-model\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":15,\"output_tokens\":0}}}\n\n",
                "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"content_block\":{\"type\":\"text\",\"text\":\"\"},\"index\":0}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\" t0\"},\"index\":0}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\" t1\"},\"index\":0}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\" t2\"},\"index\":0}\n\n",
                "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"input_tokens\":15,\"output_tokens\":3}}\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn generate_plain_body_and_stream_bytes() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = generate();
        let hdr = [("x-request-id", "g1")];
        let r = send(s.api_addr(), "POST", GENERATE, &a.original.to_string(), &hdr).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            zero_created(&r.text()),
            r#"{"request_id":"generate-tokens-g1","model":"sim-model","created":0,"choices":[{"index":0,"logprobs":null,"finish_reason":"length","token_ids":[0,1,2],"routed_experts":null}],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}"#
        );
        let mut streamed = a.streamed();
        streamed["stream_options"] = json!({"include_usage": true});
        streamed["sampling_params"]["max_tokens"] = 2.into();
        let (status, evs) = frames(s.api_addr(), GENERATE, &streamed.to_string(), &hdr).await;
        assert_eq!(status, 200);
        let got: Vec<String> = evs.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
        assert_eq!(
            got,
            [
                "data: {\"request_id\":\"generate-tokens-g1\",\"choices\":[{\"index\":0,\"logprobs\":null,\"finish_reason\":null,\"token_ids\":[0],\"routed_experts\":null}],\"usage\":null}\n\n",
                "data: {\"request_id\":\"generate-tokens-g1\",\"choices\":[{\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\",\"token_ids\":[1],\"routed_experts\":null}],\"usage\":null}\n\n",
                "data: {\"request_id\":\"generate-tokens-g1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2}}\n\n",
                "data: [DONE]\n\n",
            ]
        );
    })
    .await;
}

/// Prefill then decode on two sims: P answers with top-level params and holds a lease; D
/// pulls it; P ends idle with none held.
async fn handoff(api: Api) {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let pr = prefill_leg(&p, &api, "h1").await;
    assert_eq!(pr.status, 200, "{}", pr.text());
    let text = pr.text();
    // Top level, last key, in the era C shape of §7.7 step 4.
    let at = text.find(",\"kv_transfer_params\":{\"do_remote_prefill\":true,\"do_remote_decode\":false,\"remote_block_ids\":[[1]],\"remote_engine_id\":");
    assert!(
        at.is_some_and(|i| text.ends_with("\"transfer_mode\":\"pull\"}}") && i > 0),
        "{text}"
    );
    let prj = pr.json();
    let kv = &prj["kv_transfer_params"];
    assert_eq!(kv["remote_port"], p.side_channel_addr().port());
    assert_eq!(kv["remote_num_tokens"], api.prompt_tokens());
    let rid = kv["remote_request_id"].as_str().unwrap();
    let ps = state(&p).await;
    assert_eq!(ps["kv"]["leases_held"], 1);
    assert_eq!(ps["leases"][0]["remote_request_id"], rid);
    assert_eq!(counter(&ps, "prefill_completed"), 1);

    let dr = send(
        d.api_addr(),
        "POST",
        api.path,
        &decode_leg(&api, &api.original, &prj),
        &[("x-request-id", "h1")],
    )
    .await;
    assert_eq!(dr.status, 200, "{}", dr.text());
    let drj = dr.json();
    match api.path {
        // Messages is dumped with exclude_none: no null params key.
        MESSAGES => assert!(drj.get("kv_transfer_params").is_none(), "{drj}"),
        _ => assert_eq!(drj["kv_transfer_params"], Value::Null),
    }
    let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
    assert_eq!(code, 200, "{ps}");
    assert_eq!(counter(&ps, "leases_created"), 1);
    assert_eq!(counter(&ps, "leases_pulled"), 1);
    assert_eq!(ps["kv"]["leases_held"], 0);
    assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
    assert_eq!(ps["leases"][0]["state"], "pulled");
    let ds = state(&d).await;
    assert_eq!(counter(&ds, "decode_completed"), 1);
    let recs = get(d.api_addr(), "/sim/requests").await.json();
    assert_eq!(recs[0]["class"], "decode");
    assert_eq!(recs[0]["path"], api.path);

    // A streamed decode of a second prefill pulls too, and ends with the API's last event.
    let pr = prefill_leg(&p, &api, "h2").await.json();
    let body = decode_leg(&api, &api.streamed(), &pr);
    let (status, evs) = frames(d.api_addr(), api.path, &body, &[("x-request-id", "h2")]).await;
    assert_eq!(status, 200);
    let last = String::from_utf8_lossy(evs.last().unwrap()).into_owned();
    let want = match api.path {
        RESPONSES => "event: response.completed\n",
        MESSAGES => "event: message_stop\n",
        _ => "data: [DONE]\n\n",
    };
    assert!(last.starts_with(want), "{last}");
    let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
    assert_eq!(code, 200);
    assert_eq!(counter(&ps, "leases_pulled"), 2);
}

#[tokio::test]
async fn responses_handoff() {
    bounded(handoff(responses())).await;
}

#[tokio::test]
async fn messages_handoff() {
    bounded(handoff(messages())).await;
}

#[tokio::test]
async fn generate_handoff() {
    bounded(handoff(generate())).await;
}

/// The client leaves while the decode is queued: D notifies P, which releases the lease.
async fn decode_cancelled(api: Api) {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.max_num_seqs = 0).await;
    let prj = prefill_leg(&p, &api, "c1").await.json();
    let body = decode_leg(&api, &api.original, &prj);
    let pending = start(d.api_addr(), "POST", api.path, &body, &[]).await;
    assert_eq!(wait(&d, "queued", 2000).await.0, 200);
    pending.disconnect().await;
    let (code, ds) = wait(&d, "idle", 2000).await;
    assert_eq!(code, 200);
    assert_eq!(counter(&ds, "requests_aborted.decode"), 1);
    assert_eq!(counter(&ds, "decode_abort_notifies_sent"), 1);
    let (code, ps) = wait(&p, "no_leases", 2000).await;
    assert_eq!(code, 200);
    assert_eq!(counter(&ps, "leases_released_by_notify"), 1);
    assert_eq!(ps["leases"][0]["state"], "released_by_notify");
    assert_eq!(ps["kv"]["invariants_ok"], true);
    let recs = get(d.api_addr(), "/sim/requests").await.json();
    assert_eq!(recs[0]["outcome"], "aborted");
}

#[tokio::test]
async fn responses_decode_cancelled() {
    bounded(decode_cancelled(responses())).await;
}

#[tokio::test]
async fn messages_decode_cancelled() {
    bounded(decode_cancelled(messages())).await;
}

#[tokio::test]
async fn generate_decode_cancelled() {
    bounded(decode_cancelled(generate())).await;
}

/// An expired lease fails the decode: 500 whole, the API's error event when streamed.
async fn kv_load_failure(api: Api) {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let prj = prefill_leg(&p, &api, "f1").await.json();
    post(p.api_addr(), "/sim/expire_leases", "{}").await;
    let dr = post(
        d.api_addr(),
        api.path,
        &decode_leg(&api, &api.original, &prj),
    )
    .await;
    assert_eq!(dr.status, 500);
    let body = decode_leg(&api, &api.streamed(), &prj);
    let (status, evs) = frames(d.api_addr(), api.path, &body, &[]).await;
    assert_eq!(status, 200);
    let got: Vec<String> = evs
        .iter()
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    let (err, done) = match api.path {
        RESPONSES => (
            r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#,
            vec!["event: error\ndata: {\"code\":\"InternalServerError\",\"message\":\"Internal server error\",\"param\":null,\"sequence_number\":0,\"type\":\"error\"}\n\n".to_string()],
        ),
        MESSAGES => (
            r#"{"type":"error","error":{"type":"InternalServerError","message":"Internal server error"}}"#,
            vec!["event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"internal_error\",\"message\":\"Internal server error\"}}\n\n".to_string()],
        ),
        _ => (
            r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#,
            vec![
                "data: {\"error\":{\"message\":\"Internal server error\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}}\n\n".to_string(),
                "data: [DONE]\n\n".to_string(),
            ],
        ),
    };
    assert_eq!(dr.text(), err);
    assert_eq!(got, done);
    assert_eq!(counter(&state(&d).await, "decode_kv_load_failures"), 2);
}

#[tokio::test]
async fn responses_kv_load_failure() {
    bounded(kv_load_failure(responses())).await;
}

#[tokio::test]
async fn messages_kv_load_failure() {
    bounded(kv_load_failure(messages())).await;
}

#[tokio::test]
async fn generate_kv_load_failure() {
    bounded(kv_load_failure(generate())).await;
}

#[tokio::test]
async fn validation_400s() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = s.api_addr();
        let bad_request = |r: &Reply, param: &str| {
            assert_eq!(r.status, 400, "{}", r.text());
            let v = r.json();
            assert_eq!(v["error"]["param"], param, "{v}");
        };
        // A prefill whose limit vLLM cannot honour with one token.
        let mut b = generate().prefill();
        b["sampling_params"]["min_tokens"] = 2.into();
        let r = post(a, GENERATE, &b.to_string()).await;
        bad_request(&r, "min_tokens");
        assert_eq!(r.json()["error"]["type"], "BadRequestError");
        assert_eq!(
            r.json()["error"]["message"],
            "min_tokens must be less than or equal to max_tokens=1, got 2."
        );
        let mut b = generate().prefill();
        b["sampling_params"]["max_tokens"] = 0.into();
        bad_request(&post(a, GENERATE, &b.to_string()).await, "sampling_params");
        let r = post(a, GENERATE, r#"{"token_ids":[1,2]}"#).await;
        bad_request(&r, "sampling_params");
        assert_eq!(r.json()["error"]["type"], "Bad Request");

        let mut b = responses().prefill();
        b["max_output_tokens"] = 0.into();
        bad_request(&post(a, RESPONSES, &b.to_string()).await, "max_output_tokens");
        let r = post(a, RESPONSES, r#"{"input":"x","max_output_tokens":5000}"#).await;
        bad_request(&r, "max_output_tokens");
        assert_eq!(r.json()["error"]["type"], "BadRequestError");

        let mut b = messages().prefill();
        b.as_object_mut().unwrap().remove("max_tokens");
        bad_request(&post(a, MESSAGES, &b.to_string()).await, "max_tokens");
        // Past schema validation, Messages errors take Anthropic's shape.
        let mut b = messages().original;
        b["model"] = "nope".into();
        let r = post(a, MESSAGES, &b.to_string()).await;
        assert_eq!(r.status, 404);
        assert_eq!(
            r.text(),
            r#"{"type":"error","error":{"type":"NotFoundError","message":"The model `nope` does not exist."}}"#
        );
        // The same check on completions (vLLM's SamplingParams rule, §7.4 step 3).
        let r = post(a, crate::COMPLETIONS, r#"{"prompt":"x","max_tokens":1,"min_tokens":2}"#).await;
        bad_request(&r, "min_tokens");
        let st = state(&s).await;
        assert_eq!(counter(&st, "requests_rejected"), 8);
        let (code, st) = wait(&s, "idle_and_no_leases", 1000).await;
        assert_eq!((code, counter(&st, "leases_created")), (200, 0));
    })
    .await;
}

#[tokio::test]
async fn faults_and_ids_apply_to_new_routes() {
    bounded(async {
        let s = sim(|c| c.enable_request_id_headers = true).await;
        for api in [responses(), messages(), generate()] {
            let body = api.prefill().to_string();
            let hdr = [("x-sim-fault", "prefill_http_503"), ("x-request-id", "q")];
            let r = send(s.api_addr(), "POST", api.path, &body, &hdr).await;
            assert_eq!(r.status, 503, "{}", api.path);
            assert_eq!(r.headers["x-request-id"], "q");
        }
        let r = send(s.api_addr(), "GET", GENERATE, "", &[]).await;
        assert_eq!(r.status, 405);
        let st = state(&s).await;
        assert_eq!(counter(&st, "requests_failed"), 3);
        assert_eq!(st["kv"]["leases_held"], 0);
    })
    .await;
}

#[tokio::test]
async fn nixl_v1_and_lmcache_on_new_routes() {
    bounded(async {
        // NIXL v1: flat top-level keys on the prefill reply, read back from the top level.
        let p = sim(|c| c.protocol = Protocol::NixlV1).await;
        let d = sim(|c| c.protocol = Protocol::NixlV1).await;
        let hdr = [("x-request-id", "v1")];
        let pre = json!({"input": "a b c", "max_output_tokens": 1, "do_remote_decode": true});
        let prj = send(p.api_addr(), "POST", RESPONSES, &pre.to_string(), &hdr)
            .await
            .json();
        assert_eq!(prj["remote_block_ids"], json!([1]));
        assert_eq!(prj["kv_transfer_params"], Value::Null);
        let mut dec = json!({"input": "a b c", "max_output_tokens": 2, "do_remote_prefill": true});
        for k in [
            "remote_block_ids",
            "remote_engine_id",
            "remote_host",
            "remote_port",
        ] {
            dec[k] = prj[k].clone();
        }
        let dr = send(d.api_addr(), "POST", RESPONSES, &dec.to_string(), &hdr).await;
        assert_eq!(dr.status, 200, "{}", dr.text());
        assert_eq!(counter(&state(&p).await, "leases_pulled"), 1);

        // LMCache: a one-token generate stores the prompt; the full request hits it.
        let p = sim(|c| c.protocol = Protocol::Lmcache).await;
        let peer = format!("http://{}", p.side_channel_addr());
        let d = sim(|c| {
            c.protocol = Protocol::Lmcache;
            c.lmcache_peer = Some(peer);
        })
        .await;
        let one = json!({"token_ids": [7, 8], "sampling_params": {"max_tokens": 1}});
        assert_eq!(
            post(p.api_addr(), GENERATE, &one.to_string()).await.status,
            200
        );
        let full = json!({"token_ids": [7, 8], "sampling_params": {"max_tokens": 4}});
        assert_eq!(
            post(d.api_addr(), GENERATE, &full.to_string()).await.status,
            200
        );
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "lmcache_hits"), 1);
        assert_eq!(counter(&ds, "decode_completed"), 1);
        assert_eq!(counter(&state(&p).await, "prefill_completed"), 1);
    })
    .await;
}
