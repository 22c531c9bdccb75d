//! OpenAI/vLLM wire behaviour of the simulator: SSE framing, validation errors, auxiliary
//! endpoints, fault injection and the control API.

use crate::support::*;
use crate::{CHAT, COMPLETIONS};
use serde_json::{json, Value};

#[tokio::test]
async fn each_sse_event_is_its_own_frame() {
    bounded(async {
        let s = sim(|c| c.itl_ms = 5).await;
        let body = json!({"prompt": "hi", "max_tokens": 4, "stream": true,
            "stream_options": {"include_usage": true}})
        .to_string();
        let (status, evs) =
            frames(s.api_addr(), COMPLETIONS, &body, &[("x-request-id", "abc")]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 6, "4 tokens + usage + [DONE]: {evs:?}");
        for (i, e) in evs.iter().enumerate() {
            let t = String::from_utf8_lossy(e);
            assert!(t.starts_with("data: ") && t.ends_with("\n\n"), "{t}");
            assert_eq!(t.matches("data: ").count(), 1, "coalesced events: {t}");
            if i < 4 {
                let v: Value = serde_json::from_str(&t[6..]).expect("json");
                assert_eq!(v["id"], "cmpl-abc");
                assert_eq!(v["choices"][0]["text"], format!(" t{i}"));
            }
        }
        assert!(String::from_utf8_lossy(&evs[3]).contains("\"finish_reason\":\"length\""));
        let recs = get(s.api_addr(), "/sim/requests").await.json();
        assert_eq!(recs[0]["events_sent"], 6);
    })
    .await;
}

#[tokio::test]
async fn sse_content_type_and_request_id_header() {
    bounded(async {
        let s = sim(|c| c.enable_request_id_headers = true).await;
        let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": true}).to_string();
        let r = send(s.api_addr(), "POST", CHAT, &body, &[("x-request-id", "rid-9")]).await;
        assert_eq!(r.headers["content-type"], "text/event-stream; charset=utf-8");
        assert_eq!(r.headers["x-request-id"], "rid-9");
        assert!(r.text().ends_with("data: [DONE]\n\n"));
    })
    .await;
}

#[tokio::test]
async fn validation_errors_follow_vllm() {
    bounded(async {
        let s = sim(|c| c.max_model_len = 10).await;
        let a = s.api_addr();
        let r = send(
            a,
            "POST",
            COMPLETIONS,
            r#"{"prompt":"x"}"#,
            &[("content-type", "text/plain")],
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["type"], "Bad Request");
        let r = post(a, COMPLETIONS, "{not json").await;
        assert_eq!(r.status, 400);
        assert!(r.text().contains("json_invalid"));
        let r = post(a, COMPLETIONS, r#"{"prompt":"x","model":"other"}"#).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.json()["error"]["type"], "NotFoundError");
        assert_eq!(r.json()["error"]["param"], "model");
        let r = post(
            a,
            COMPLETIONS,
            r#"{"prompt":"x","stream_options":{"include_usage":true}}"#,
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(r
            .text()
            .contains("Stream options can only be defined when `stream=True`."));
        let r = post(a, COMPLETIONS, r#"{"prompt":"a b c","max_tokens":9}"#).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "max_tokens");
        let r = post(a, COMPLETIONS, r#"{"prompt":"a b c d e f g h i j k l"}"#).await;
        assert_eq!(r.status, 400);
        assert!(r.text().contains("maximum context length is 10 tokens"));
        let r = post(a, COMPLETIONS, r#"{"prompt":"x","n":2}"#).await;
        assert_eq!(r.status, 400);
        let r = post(a, CHAT, r#"{"messages":[]}"#).await;
        assert_eq!(r.status, 400);
        let r = post(a, COMPLETIONS, r#"{"prompt":"x","kv_transfer_params":5}"#).await;
        assert_eq!(r.status, 400);
        // Still serving, and every rejection was counted.
        let r = post(a, COMPLETIONS, r#"{"prompt":"x","max_tokens":1}"#).await;
        assert_eq!(r.status, 200);
        let st = state(&s).await;
        assert_eq!(counter(&st, "requests_rejected"), 9);
        assert_eq!(counter(&st, "requests_completed"), 1);
    })
    .await;
}

#[tokio::test]
async fn legacy_error_format() {
    bounded(async {
        let s = sim(|c| c.error_format = vllm_sim::ErrorFormat::Legacy).await;
        let r = post(s.api_addr(), COMPLETIONS, r#"{"prompt":"x","model":"zzz"}"#).await;
        assert_eq!(r.status, 404);
        assert!(
            r.text().starts_with(r#"{"object":"error","message":"#),
            "{}",
            r.text()
        );
    })
    .await;
}

#[tokio::test]
async fn auxiliary_endpoints() {
    bounded(async {
        let s = sim(|c| c.model = "m1,m2".into()).await;
        let a = s.api_addr();
        let h = get(a, "/health").await;
        assert_eq!((h.status.as_u16(), h.body.len()), (200, 0));
        let m = get(a, "/v1/models").await.json();
        assert_eq!(m["data"][1]["id"], "m2");
        assert_eq!(m["data"][0]["max_model_len"], 4096);
        assert!(get(a, "/version").await.json()["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("sim-")));
        let nf = get(a, "/nope").await;
        assert_eq!(nf.status, 404);
        assert_eq!(nf.text(), r#"{"detail":"Not Found"}"#);
        post(a, COMPLETIONS, r#"{"prompt":"x","max_tokens":2}"#).await;
        let metrics = get(a, "/metrics").await.text();
        for name in [
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm_sim:kv_leases_active",
            "vllm:generation_tokens_total{model_name=\"m1\"} 2",
        ] {
            assert!(metrics.contains(name), "{name} missing in {metrics}");
        }
    })
    .await;
}

#[tokio::test]
async fn header_faults_apply_per_class() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = s.api_addr();
        let f = [("x-sim-fault", "prefill_http_503")];
        let pre = prefill_body(&json!({"prompt": "a"}));
        let r = send(a, "POST", COMPLETIONS, &pre, &f).await;
        assert_eq!(r.status, 503);
        // The proxy forwards the header to D too; a plain/decode request ignores prefill faults.
        let r = send(
            a,
            "POST",
            COMPLETIONS,
            r#"{"prompt":"a","max_tokens":1}"#,
            &f,
        )
        .await;
        assert_eq!(r.status, 200);
        // omit / null params: null still creates the lease.
        let r = send(
            a,
            "POST",
            COMPLETIONS,
            &pre,
            &[("x-sim-fault", "omit_kv_params")],
        )
        .await;
        assert!(r.json().get("kv_transfer_params").is_none());
        let r = send(
            a,
            "POST",
            COMPLETIONS,
            &pre,
            &[("x-sim-fault", "null_kv_params")],
        )
        .await;
        assert_eq!(r.json()["kv_transfer_params"], Value::Null);
        assert_eq!(state(&s).await["kv"]["leases_held"], 2);
        // drop_before_headers closes the connection without a response.
        let p = start(
            a,
            "POST",
            COMPLETIONS,
            r#"{"prompt":"a"}"#,
            &[("x-sim-fault", "drop_before_headers")],
        )
        .await;
        let (resp, conn) = (p.resp.await.expect("join"), p.conn);
        assert!(resp.is_err(), "expected a closed connection");
        conn.abort();
        // drop_after_tokens:2 ends the stream abruptly after two events.
        let body = json!({"prompt": "a", "max_tokens": 5, "stream": true}).to_string();
        let (status, evs) = frames(
            a,
            COMPLETIONS,
            &body,
            &[("x-sim-fault", "drop_after_tokens:2")],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 2);
        // Unknown fault names are a client error.
        let r = send(
            a,
            "POST",
            COMPLETIONS,
            r#"{"prompt":"a"}"#,
            &[("x-sim-fault", "bogus")],
        )
        .await;
        assert_eq!(r.status, 400);
    })
    .await;
}

#[tokio::test]
async fn config_faults_dead_and_reset() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = s.api_addr();
        let r = post(a, "/sim/config", r#"{"dead": true}"#).await;
        assert_eq!(r.status, 200);
        assert_eq!(get(a, "/health").await.status, 503);
        let r = post(a, COMPLETIONS, r#"{"prompt":"a"}"#).await;
        assert_eq!(r.status, 500);
        assert_eq!(r.json()["error"]["type"], "InternalServerError");
        post(
            a,
            "/sim/config",
            r#"{"dead": false, "ttft_ms": 1, "faults": {"decode_http_429": true}}"#,
        )
        .await;
        assert_eq!(get(a, "/health").await.status, 200);
        let cfg = get(a, "/sim/config").await.json();
        assert_eq!(cfg["config"]["ttft_ms"], 1);
        assert_eq!(cfg["faults"]["decode_http_429"], true);
        assert_eq!(
            post(a, "/sim/config", r#"{"no_such_setting": 1}"#)
                .await
                .status,
            400
        );
        // A lease, then reset with release_leases.
        post(a, COMPLETIONS, &prefill_body(&json!({"prompt": "a"}))).await;
        let st = post(a, "/sim/reset", r#"{"release_leases": true}"#)
            .await
            .json();
        assert_eq!(st["kv"]["leases_held"], 0);
        assert_eq!(st["kv"]["invariants_ok"], true);
        assert_eq!(counter(&st, "requests_total"), 0);
        assert_eq!(get(a, "/sim/requests").await.json(), json!([]));
        let (code, _) = wait(&s, "idle_and_no_leases", 100).await;
        assert_eq!(code, 200);
        assert_eq!(get(a, "/sim/wait?until=bogus").await.status, 400);
    })
    .await;
}

#[tokio::test]
async fn wait_times_out_with_408() {
    bounded(async {
        let s = sim(|_| {}).await;
        post(
            s.api_addr(),
            COMPLETIONS,
            &prefill_body(&json!({"prompt": "a"})),
        )
        .await;
        let (code, st) = wait(&s, "no_leases", 50).await;
        assert_eq!(code, 408);
        assert_eq!(st["kv"]["leases_held"], 1);
    })
    .await;
}

#[tokio::test]
async fn request_log_records_what_was_received() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = r#"{"prompt":"a",  "max_tokens":1, "weird_field":true}"#;
        send(
            s.api_addr(),
            "POST",
            COMPLETIONS,
            body,
            &[("X-Custom", "1"), ("x-custom", "2")],
        )
        .await;
        let recs = get(s.api_addr(), "/sim/requests?since=1").await.json();
        let r = &recs[0];
        assert_eq!(r["seq"], 1);
        assert_eq!(r["method"], "POST");
        assert_eq!(r["path"], COMPLETIONS);
        assert_eq!(r["body"], body);
        assert_eq!(r["headers"]["x-custom"], json!(["1", "2"]));
        assert_eq!(r["ignored_fields"], json!(["weird_field"]));
        assert_eq!(r["class"], "plain");
        assert_eq!(r["status"], 200);
        assert!(r["public_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("cmpl-")));
        assert_eq!(
            get(s.api_addr(), "/sim/requests?since=2").await.json(),
            json!([])
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_listeners() {
    bounded(async {
        let s = sim(|_| {}).await;
        let a = s.api_addr();
        s.shutdown().await;
        assert!(tokio::net::TcpStream::connect(a).await.is_err());
    })
    .await;
}
