//! P/D handoff through two in-process simulators, driven directly by the test (no proxy).

use crate::support::*;
use crate::{CHAT, COMPLETIONS};
use serde_json::{json, Value};
use vllm_sim::{Era, LeaseMode, Protocol};

#[tokio::test]
async fn era_c_handoff_pulls_lease_and_frees_blocks() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"model": "sim-model", "prompt": "one two three four five", "max_tokens": 3});
        let hdr = [("x-request-id", "req-1")];
        let pr = send(p.api_addr(), "POST", COMPLETIONS, &prefill_body(&original), &hdr).await;
        assert_eq!(pr.status, 200, "{}", pr.text());
        // Key order is part of the contract (§7.7).
        let text = pr.text();
        let kv_start = text.find("\"kv_transfer_params\":").expect("params key");
        assert!(text[kv_start..].starts_with(
            "\"kv_transfer_params\":{\"do_remote_prefill\":true,\"do_remote_decode\":false,\"remote_block_ids\":[[1]],\"remote_engine_id\":"
        ));
        let prj = pr.json();
        let kv = &prj["kv_transfer_params"];
        assert_eq!(kv["remote_port"], p.side_channel_addr().port());
        assert_eq!(kv["remote_num_tokens"], 5);
        assert_eq!(kv["transfer_mode"], "pull");
        let rid = kv["remote_request_id"].as_str().expect("id");
        assert!(rid.starts_with("cmpl-req-1-0-"), "{rid}");
        assert_eq!(state(&p).await["kv"]["leases_held"], 1);

        let dr = send(d.api_addr(), "POST", COMPLETIONS, &decode_body(&original, &prj), &hdr).await;
        assert_eq!(dr.status, 200, "{}", dr.text());
        let drj = dr.json();
        assert_eq!(drj["choices"][0]["text"], " t0 t1 t2");
        assert_eq!(drj["kv_transfer_params"], Value::Null);
        assert_eq!(drj["usage"]["prompt_tokens"], 5);

        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_created"), 1);
        assert_eq!(counter(&ps, "leases_pulled"), 1);
        assert_eq!(counter(&ps, "side_channel_in.read"), 1);
        assert_eq!(ps["kv"]["invariants_ok"], true);
        assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_completed"), 1);

        // The request log shows exactly what each leg received.
        let recs = get(p.api_addr(), "/sim/requests").await.json();
        let rec = &recs[0];
        assert_eq!(rec["class"], "prefill");
        assert_eq!(rec["headers"]["x-request-id"][0], "req-1");
        assert_eq!(rec["body"], prefill_body(&original));
        assert_eq!(rec["outcome"], "completed");
        assert_eq!(rec["status"], 200);
    })
    .await;
}

#[tokio::test]
async fn era_b_chat_streaming_decode() {
    bounded(async {
        let p = sim(|c| c.kv_params_era = Era::B).await;
        let d = sim(|c| c.kv_params_era = Era::B).await;
        let original = json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2,
            "stream": true, "stream_options": {"include_usage": true}});
        let pr = post(p.api_addr(), CHAT, &prefill_body(&original)).await;
        assert_eq!(pr.status, 200, "{}", pr.text());
        let prj = pr.json();
        let kv = &prj["kv_transfer_params"];
        assert!(kv["remote_block_ids"][0].is_u64(), "era B ids are flat: {kv}");
        assert!(kv.get("transfer_mode").is_none());
        assert!(kv["remote_request_id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
        let (status, evs) = frames(d.api_addr(), CHAT, &decode_body(&original, &prj), &[]).await;
        assert_eq!(status, 200);
        // role chunk, 2 tokens, usage, [DONE]
        assert_eq!(evs.len(), 5, "{evs:?}");
        assert!(String::from_utf8_lossy(&evs[0]).contains("\"role\":\"assistant\""));
        assert!(String::from_utf8_lossy(&evs[2]).contains("\"finish_reason\":\"length\""));
        assert!(String::from_utf8_lossy(&evs[3]).contains("\"choices\":[]"));
        assert_eq!(&evs[4][..], b"data: [DONE]\n\n");
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn expired_lease_fails_decode_like_vllm() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"prompt": "a b c", "max_tokens": 2});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let e = post(p.api_addr(), "/sim/expire_leases", "{}").await.json();
        assert_eq!(e["expired"], 1);
        // Non-streaming: 500 InternalServerError.
        let dr = decoded(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(dr.status, 500);
        assert_eq!(
            dr.text(),
            r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#
        );
        // Streaming: 200, an error event, then [DONE].
        let mut streamed = original.clone();
        streamed["stream"] = true.into();
        let (status, evs) = frames(d.api_addr(), COMPLETIONS, &decode_body(&streamed, &prj), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 2, "{evs:?}");
        assert!(String::from_utf8_lossy(&evs[0]).starts_with("data: {\"error\":{"));
        assert_eq!(&evs[1][..], b"data: [DONE]\n\n");
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 2);
        assert_eq!(counter(&ds, "requests_failed"), 2);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_expired"), 1);
        assert_eq!(ps["kv"]["invariants_ok"], true);
    })
    .await;
}

#[tokio::test]
async fn unknown_lease_with_stale_policy_succeeds() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|c| c.on_unknown_lease = vllm_sim::OnUnknownLease::Stale).await;
        let original = json!({"prompt": "x y", "max_tokens": 1});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        post(p.api_addr(), "/sim/expire_leases", "{}").await;
        let dr = decoded(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(dr.status, 200);
        assert_eq!(counter(&state(&d).await, "decode_stale_reads"), 1);
    })
    .await;
}

#[tokio::test]
async fn invalid_params_rejected_and_prefiller_notified() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"prompt": "a b c", "max_tokens": 2});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let mut body: Value = serde_json::from_str(&decode_body(&original, &prj)).expect("json");
        body["kv_transfer_params"]
            .as_object_mut()
            .expect("obj")
            .remove("remote_block_ids");
        let dr = post(d.api_addr(), COMPLETIONS, &body.to_string()).await;
        assert_eq!(dr.status, 400, "{}", dr.text());
        assert!(dr.text().contains("invalid kv_transfer_params"));
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_invalid_kv_params"), 1);
        assert_eq!(counter(&ds, "decode_reject_notifies_sent"), 1);
        assert_eq!(counter(&ds, "requests_rejected"), 1);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_released_by_reject"), 1);
        assert_eq!(ps["kv"]["leases_held"], 0);

        // A §7.4 failure (unknown model) on a remote-prefill request also notifies P.
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let mut body: Value = serde_json::from_str(&decode_body(&original, &prj)).expect("json");
        body["model"] = "nope".into();
        let dr = post(d.api_addr(), COMPLETIONS, &body.to_string()).await;
        assert_eq!(dr.status, 404);
        assert_eq!(counter(&state(&p).await, "leases_released_by_reject"), 2);
    })
    .await;
}

#[tokio::test]
async fn era_a_requires_matching_request_ids() {
    bounded(async {
        let p = sim(|c| c.kv_params_era = Era::A).await;
        let d = sim(|c| c.kv_params_era = Era::A).await;
        let original = json!({"prompt": "a b c", "max_tokens": 2});
        let prj = send(
            p.api_addr(),
            "POST",
            COMPLETIONS,
            &prefill_body(&original),
            &[("x-request-id", "same")],
        )
        .await
        .json();
        assert!(prj["kv_transfer_params"].get("remote_request_id").is_none());
        let other = send(
            d.api_addr(),
            "POST",
            COMPLETIONS,
            &decode_body(&original, &prj),
            &[("x-request-id", "other")],
        )
        .await;
        assert_eq!(other.status, 500, "mismatched ids cannot find the lease");
        let same = send(
            d.api_addr(),
            "POST",
            COMPLETIONS,
            &decode_body(&original, &prj),
            &[("x-request-id", "same")],
        )
        .await;
        assert_eq!(same.status, 200, "{}", same.text());
        assert_eq!(counter(&state(&p).await, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn prompt_change_between_legs_is_detected() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"prompt": "a b c", "max_tokens": 2});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let changed = json!({"prompt": "a b d", "max_tokens": 2});
        let dr = decoded(&d, COMPLETIONS, &changed, &prj).await;
        assert_eq!(dr.status, 500);
        assert_eq!(
            state(&p).await["kv"]["leases_held"],
            1,
            "prompt_mismatch keeps the lease"
        );
    })
    .await;
}

#[tokio::test]
async fn fixed_lease_expires_by_timeout() {
    bounded(async {
        let p = sim(|c| {
            c.lease_mode = Some(LeaseMode::Fixed);
            c.abort_request_timeout_ms = 50;
        })
        .await;
        post(
            p.api_addr(),
            COMPLETIONS,
            &prefill_body(&json!({"prompt": "a"})),
        )
        .await;
        let (code, ps) = wait(&p, "no_leases", 3000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_expired"), 1);
        assert_eq!(ps["kv"]["invariants_ok"], true);
    })
    .await;
}

#[tokio::test]
async fn heartbeats_keep_a_queued_decode_lease_alive() {
    bounded(async {
        let p = sim(|c| c.kv_lease_duration_ms = 300).await;
        let d = sim(|c| {
            c.kv_lease_duration_ms = 300;
            c.max_num_seqs = 0; // hold the decode in the queue
        })
        .await;
        let original = json!({"prompt": "a b", "max_tokens": 1});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let pending = start_decode(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(wait(&d, "queued", 2000).await.0, 200);
        // Without heartbeats the 300 ms lease would be gone well within 900 ms.
        let (code, ps) = wait(&p, "no_leases", 900).await;
        assert_eq!(code, 408, "lease expired despite heartbeats: {ps}");
        assert!(counter(&ps, "side_channel_in.heartbeat") >= 1);
        post(d.api_addr(), "/sim/config", r#"{"max_num_seqs": 4}"#).await;
        let (resp, conn) = pending.response().await;
        assert_eq!(resp.status(), 200);
        conn.abort();
        let (code, ps) = wait(&p, "no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn nixl_v1_top_level_fields() {
    bounded(async {
        let p = sim(|c| c.protocol = Protocol::NixlV1).await;
        let d = sim(|c| c.protocol = Protocol::NixlV1).await;
        let hdr = [("x-request-id", "v1")];
        let pre = json!({"prompt": "a b c", "do_remote_decode": true, "stream": false});
        let pr = send(p.api_addr(), "POST", COMPLETIONS, &pre.to_string(), &hdr).await;
        let prj = pr.json();
        assert_eq!(prj["kv_transfer_params"], Value::Null);
        assert_eq!(prj["remote_block_ids"], json!([1]));
        let mut dec = json!({"prompt": "a b c", "max_tokens": 2, "do_remote_prefill": true});
        for k in [
            "remote_block_ids",
            "remote_engine_id",
            "remote_host",
            "remote_port",
        ] {
            dec[k] = prj[k].clone();
        }
        let dr = send(d.api_addr(), "POST", COMPLETIONS, &dec.to_string(), &hdr).await;
        assert_eq!(dr.status, 200, "{}", dr.text());
        assert_eq!(counter(&state(&p).await, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn lmcache_store_then_hit_via_peer() {
    bounded(async {
        let p = sim(|c| c.protocol = Protocol::Lmcache).await;
        let peer = format!("http://{}", p.side_channel_addr());
        let d = sim(|c| {
            c.protocol = Protocol::Lmcache;
            c.lmcache_peer = Some(peer);
        })
        .await;
        let body = json!({"prompt": "shared prefix here", "max_tokens": 1});
        assert_eq!(
            post(p.api_addr(), COMPLETIONS, &body.to_string())
                .await
                .status,
            200
        );
        let full = json!({"prompt": "shared prefix here", "max_tokens": 4});
        assert_eq!(
            post(d.api_addr(), COMPLETIONS, &full.to_string())
                .await
                .status,
            200
        );
        let other = json!({"prompt": "something else", "max_tokens": 4});
        assert_eq!(
            post(d.api_addr(), COMPLETIONS, &other.to_string())
                .await
                .status,
            200
        );
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "lmcache_hits"), 1);
        assert_eq!(counter(&ds, "lmcache_misses"), 1);
        assert_eq!(state(&p).await["kv"]["leases_held"], 0);
    })
    .await;
}

#[tokio::test]
async fn era_b_stop_finish_returns_null_params_without_lease() {
    bounded(async {
        let p = sim(|c| {
            c.kv_params_era = Era::B;
            c.eos_after = Some(1);
        })
        .await;
        let mut body: Value =
            serde_json::from_str(&prefill_body(&json!({"prompt": "a b"}))).expect("json");
        body["max_tokens"] = 2.into(); // EOS after 1 token → finish_reason "stop"
        let r = post(p.api_addr(), COMPLETIONS, &body.to_string())
            .await
            .json();
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["kv_transfer_params"], Value::Null);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "prefill_no_params_stop"), 1);
        assert_eq!(counter(&ps, "leases_created"), 0);
        assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
    })
    .await;
}

#[tokio::test]
async fn streamed_prefill_leases_but_does_not_report_params() {
    bounded(async {
        let p = sim(|_| {}).await;
        let mut body: Value =
            serde_json::from_str(&prefill_body(&json!({"prompt": "a b"}))).expect("json");
        body["stream"] = true.into();
        let (status, evs) = frames(p.api_addr(), COMPLETIONS, &body.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert!(evs
            .iter()
            .all(|e| !String::from_utf8_lossy(e).contains("kv_transfer_params")));
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "prefill_streamed_params_unreported"), 1);
        assert_eq!(ps["kv"]["leases_held"], 1);
    })
    .await;
}

#[tokio::test]
async fn leaked_leases_starve_later_prefills() {
    bounded(async {
        // 2 blocks of 16 tokens: one leaked lease of 2 blocks blocks the next prefill.
        let p = sim(|c| c.num_gpu_blocks = 2).await;
        let prompt: String = (0..20).map(|i| format!("w{i} ")).collect();
        let body = prefill_body(&json!({ "prompt": prompt }));
        assert_eq!(post(p.api_addr(), COMPLETIONS, &body).await.status, 200);
        let pending = start(p.api_addr(), "POST", COMPLETIONS, &body, &[]).await;
        assert_eq!(wait(&p, "queued", 2000).await.0, 200);
        post(p.api_addr(), "/sim/expire_leases", "{}").await;
        let (resp, conn) = pending.response().await;
        assert_eq!(resp.status(), 200);
        conn.abort();
        assert_eq!(state(&p).await["kv"]["leases_held"], 1);
    })
    .await;
}

#[tokio::test]
async fn side_channel_down_is_a_kv_load_failure() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"prompt": "a b", "max_tokens": 2});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let r = post(
            p.api_addr(),
            "/sim/config",
            r#"{"faults": {"side_channel_down": true}}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        let dr = decoded(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(dr.status, 500);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 1);
        assert!(counter(&ds, "side_channel_errors") >= 1);
        assert_eq!(state(&p).await["kv"]["leases_held"], 1);
    })
    .await;
}
