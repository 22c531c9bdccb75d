//! `--protocol mooncake` (§7.20): vLLM's MooncakeConnector; both legs at once, the decode
//! checks the engine id on P's bootstrap `/query` and waits for `transfer_id`.

use crate::support::*;
use crate::{CHAT, COMPLETIONS, GENERATE, MESSAGES, RESPONSES};
use serde_json::{json, Value};
use vllm_sim::{Protocol, SimServer};

async fn moon(tweak: impl FnOnce(&mut vllm_sim::SimConfig)) -> SimServer {
    sim(|c| {
        c.protocol = Protocol::Mooncake;
        tweak(c);
    })
    .await
}

fn prefill_leg(original: &Value, t: &str) -> String {
    let mut b = original.clone();
    b["stream"] = false.into();
    b["kv_transfer_params"] =
        json!({"do_remote_prefill": false, "do_remote_decode": true, "transfer_id": t});
    b.to_string()
}

fn decode_leg(original: &Value, t: &str, p: &SimServer, engine: &str) -> String {
    let mut b = original.clone();
    b["kv_transfer_params"] = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "transfer_id": t, "remote_bootstrap_addr": format!("http://{}", p.bootstrap_addr()),
        "remote_engine_id": engine});
    b.to_string()
}

#[tokio::test]
async fn query_answers_the_engine_id_and_follows_a_restart() {
    bounded(async {
        let p = moon(|c| c.engine_id = Some("eng-1".into())).await;
        let q = get(p.bootstrap_addr(), "/query").await;
        assert_eq!(q.status, 200);
        let worker = format!("127.0.0.1:{}", p.side_channel_addr().port());
        assert_eq!(
            q.text(),
            format!(r#"{{"0":{{"engine_id":"eng-1","worker_addr":{{"0":{{"0":"{worker}"}}}}}}}}"#)
        );
        let r = post(p.api_addr(), "/sim/config", r#"{"engine_id":"eng-2"}"#).await;
        assert_eq!(r.status, 200);
        assert_eq!(p.engine_id(), "eng-2");
        assert_eq!(
            get(p.bootstrap_addr(), "/query").await.json()["0"]["engine_id"],
            "eng-2"
        );
        assert_eq!(state(&p).await["instance"]["engine_id"], "eng-2");
        // null stands for a restart with the default: a fresh uuid4.
        post(p.api_addr(), "/sim/config", r#"{"engine_id":null}"#).await;
        assert_eq!(p.engine_id().len(), 36);
        assert_eq!(counter(&state(&p).await, "side_channel_in.query"), 2);
    })
    .await;
}

#[tokio::test]
async fn every_route_with_concurrent_legs() {
    bounded(async {
        let p = moon(|_| {}).await;
        let d = moon(|_| {}).await;
        let e = p.engine_id();
        let mut n = 0;
        for path in [COMPLETIONS, CHAT, RESPONSES, MESSAGES, GENERATE] {
            for stream in [false, true] {
                n += 1;
                let t = format!("xfer-{n}");
                let original = route_body(path, stream);
                let pb = prefill_leg(&original, &t);
                let db = decode_leg(&original, &t, &p, &e);
                let ((ps, ptext), (ds, dtext)) = tokio::join!(
                    exchange(p.api_addr(), path, &pb, &[("x-data-parallel-rank", "0")]),
                    exchange(d.api_addr(), path, &db, &[])
                );
                assert_eq!(ps, 200, "{path}: {ptext}");
                assert_eq!(ds, 200, "{path}: {dtext}");
                assert!(
                    route_reply_ok(path, stream, &dtext),
                    "{path} {stream}: {dtext}"
                );
            }
        }
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200, "{ps}");
        assert_eq!(counter(&ps, "leases_created"), 10);
        assert_eq!(counter(&ps, "leases_pulled"), 10);
        assert_eq!(counter(&ps, "side_channel_in.query"), 10);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_completed"), 10);
    })
    .await;
}

#[tokio::test]
async fn decode_waits_for_a_slow_prefill() {
    bounded(async {
        let p = moon(|_| {}).await;
        let d = moon(|_| {}).await;
        let original = route_body(COMPLETIONS, false);
        let dec = start(
            d.api_addr(),
            "POST",
            COMPLETIONS,
            &decode_leg(&original, "T", &p, &p.engine_id()),
            &[],
        )
        .await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        let pr = post(p.api_addr(), COMPLETIONS, &prefill_leg(&original, "T")).await;
        assert_eq!(pr.status, 200);
        let (r, _conn) = dec.response().await;
        assert_eq!(r.status(), 200);
        assert_eq!(wait(&p, "idle_and_no_leases", 2000).await.0, 200);
    })
    .await;
}

#[tokio::test]
async fn stale_engine_id_fails_and_leaves_the_lease() {
    bounded(async {
        let p = moon(|c| c.abort_request_timeout_ms = 100).await;
        let d = moon(|_| {}).await;
        let original = route_body(CHAT, false);
        assert_eq!(
            post(p.api_addr(), CHAT, &prefill_leg(&original, "T"))
                .await
                .status,
            200
        );
        let r = post(
            d.api_addr(),
            CHAT,
            &decode_leg(&original, "T", &p, "old-engine"),
        )
        .await;
        assert_eq!(r.status, 500);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "handoff_engine_id_mismatches"), 1);
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 1);
        // Nothing reached P's fetch: the lease ends by expiry.
        let (code, ps) = wait(&p, "idle_and_no_leases", 5000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "side_channel_in.fetch"), 0);
        assert_eq!(counter(&ps, "leases_expired"), 1);
    })
    .await;
}

#[tokio::test]
async fn unknown_transfer_id_times_out_and_cancel_releases_nothing() {
    bounded(async {
        let p = moon(|c| c.abort_request_timeout_ms = 100).await;
        let d = moon(|c| c.bootstrap_timeout_ms = 30).await;
        let original = route_body(GENERATE, true);
        let (status, text) = exchange(
            d.api_addr(),
            GENERATE,
            &decode_leg(&original, "none", &p, &p.engine_id()),
            &[],
        )
        .await;
        assert_eq!(status, 200);
        assert!(text.starts_with("data: {\"error\":"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(counter(&state(&d).await, "handoff_fetch_timeouts"), 1);
        // vllm#50425: a decode cancelled before its transfer tells P nothing.
        let d2 = moon(|_| {}).await;
        let dec = start(
            d2.api_addr(),
            "POST",
            GENERATE,
            &decode_leg(&original, "T", &p, &p.engine_id()),
            &[],
        )
        .await;
        assert_eq!(wait(&d2, "running", 2000).await.0, 200);
        dec.disconnect().await;
        assert_eq!(wait(&d2, "idle", 2000).await.0, 200);
        assert_eq!(counter(&state(&d2).await, "decode_abort_notifies_sent"), 0);
        assert_eq!(
            post(p.api_addr(), GENERATE, &prefill_leg(&original, "T"))
                .await
                .status,
            200
        );
        let (code, ps) = wait(&p, "idle_and_no_leases", 5000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_expired"), 1);
        assert_eq!(counter(&ps, "notify_unknown"), 0);
    })
    .await;
}
