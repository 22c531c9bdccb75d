//! Client disconnects abort requests like vLLM (§4.4, §7.7 step 5, §7.10.2).

use crate::support::*;
use crate::COMPLETIONS;
use serde_json::json;

#[tokio::test]
async fn disconnect_during_prefill_leaves_no_lease() {
    bounded(async {
        let p = sim(|_| {}).await;
        let body = prefill_body(&json!({"prompt": "a b c d e", "max_tokens": 4}));
        let pending = start(
            p.api_addr(),
            "POST",
            COMPLETIONS,
            &body,
            &[("x-sim-ttft-ms", "5000")],
        )
        .await;
        assert_eq!(wait(&p, "running", 2000).await.0, 200);
        assert_eq!(state(&p).await["kv"]["running_blocks"], 1);
        pending.disconnect().await;
        let (code, ps) = wait(&p, "idle", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "requests_aborted.prefill"), 1);
        assert_eq!(counter(&ps, "leases_created"), 0);
        assert_eq!(counter(&ps, "client_disconnects"), 1);
        assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
        assert_eq!(ps["kv"]["invariants_ok"], true);
        let recs = get(p.api_addr(), "/sim/requests").await.json();
        assert_eq!(recs[0]["outcome"], "aborted");
        // Detected promptly, long before the 5 s TTFT would have elapsed.
        assert!(recs[0]["disconnect_at_ms"].as_u64().expect("ms") < 4000);
    })
    .await;
}

#[tokio::test]
async fn disconnect_while_prefill_is_queued() {
    bounded(async {
        let p = sim(|c| c.max_num_seqs = 0).await;
        let body = prefill_body(&json!({"prompt": "a b"}));
        let pending = start(p.api_addr(), "POST", COMPLETIONS, &body, &[]).await;
        assert_eq!(wait(&p, "queued", 2000).await.0, 200);
        pending.disconnect().await;
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "requests_aborted.prefill"), 1);
        assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
    })
    .await;
}

#[tokio::test]
async fn decode_aborted_while_queued_notifies_prefiller() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|c| c.max_num_seqs = 0).await;
        let original = json!({"prompt": "a b c", "max_tokens": 3});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        let pending = start_decode(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(wait(&d, "queued", 2000).await.0, 200);
        pending.disconnect().await;
        let (code, ds) = wait(&d, "idle", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ds, "requests_aborted.decode"), 1);
        assert_eq!(counter(&ds, "decode_abort_notifies_sent"), 1);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_released_by_notify"), 1);
        assert_eq!(counter(&ps, "side_channel_in.notify"), 1);
        assert_eq!(ps["kv"]["leases_held"], 0);
        assert_eq!(ps["kv"]["invariants_ok"], true);
    })
    .await;
}

#[tokio::test]
async fn decode_aborted_during_transfer_still_pulls() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"prompt": "a b c", "max_tokens": 3});
        let prj = prefilled(&p, COMPLETIONS, &original).await;
        // x-sim-ttft-ms on a decode sets the transfer time.
        let hdr = [("x-sim-ttft-ms", "400")];
        let pending = start(
            d.api_addr(),
            "POST",
            COMPLETIONS,
            &decode_body(&original, &prj),
            &hdr,
        )
        .await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        pending.disconnect().await;
        let (code, ds) = wait(&d, "idle", 3000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ds, "requests_aborted.decode"), 1);
        assert_eq!(counter(&ds, "decode_abort_notifies_sent"), 0);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_pulled"), 1);
        assert_eq!(ps["kv"]["leases_held"], 0);
    })
    .await;
}

#[tokio::test]
async fn disconnect_between_stream_tokens() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = json!({"prompt": "a", "max_tokens": 50, "stream": true}).to_string();
        let pending = start(
            s.api_addr(),
            "POST",
            COMPLETIONS,
            &body,
            &[("x-sim-itl-ms", "10000"), ("x-sim-ttft-ms", "0")],
        )
        .await;
        let (resp, conn) = pending.response().await;
        assert_eq!(resp.status(), 200);
        let mut b = resp.into_body();
        use http_body_util::BodyExt;
        let first = b.frame().await.expect("frame").expect("ok");
        assert!(first.into_data().is_ok());
        let t0 = std::time::Instant::now();
        drop(b);
        conn.abort();
        let (code, st) = wait(&s, "idle", 2000).await;
        assert_eq!(code, 200);
        assert!(t0.elapsed().as_millis() < 1000);
        assert_eq!(counter(&st, "requests_aborted.plain"), 1);
        let recs = get(s.api_addr(), "/sim/requests").await.json();
        assert_eq!(recs[0]["events_sent"], 1);
    })
    .await;
}

#[tokio::test]
async fn disconnect_while_non_streaming_response_pending() {
    bounded(async {
        let s = sim(|_| {}).await;
        let body = json!({"prompt": "a", "max_tokens": 20}).to_string();
        let pending = start(
            s.api_addr(),
            "POST",
            COMPLETIONS,
            &body,
            &[("x-sim-itl-ms", "1000"), ("x-sim-ttft-ms", "0")],
        )
        .await;
        assert_eq!(wait(&s, "running", 2000).await.0, 200);
        pending.disconnect().await;
        let (code, st) = wait(&s, "idle", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&st, "requests_aborted.plain"), 1);
    })
    .await;
}
