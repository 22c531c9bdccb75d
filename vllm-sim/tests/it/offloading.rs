//! `--protocol offloading` (§7.19): vLLM's OffloadingConnector P2P tier; the decode
//! fetches `kv_request_id` K from the prefiller's P2P port (the side channel).

use crate::support::*;
use crate::{CHAT, COMPLETIONS, GENERATE, MESSAGES, RESPONSES};
use serde_json::{json, Value};
use vllm_sim::{Protocol, SimServer};

async fn offl(tweak: impl FnOnce(&mut vllm_sim::SimConfig)) -> SimServer {
    sim(|c| {
        c.protocol = Protocol::Offloading;
        tweak(c);
    })
    .await
}

fn prefill_leg(original: &Value, k: &str) -> String {
    let mut b = original.clone();
    b["stream"] = false.into();
    b["kv_transfer_params"] = json!({"remote_decoder": {"kv_request_id": k}});
    b.to_string()
}

fn decode_leg(original: &Value, k: &str, p: &SimServer) -> String {
    let mut b = original.clone();
    b["kv_transfer_params"] = json!({"remote_prefiller": {"kv_request_id": k,
        "remote_host": "127.0.0.1", "remote_port": p.p2p_addr().port()}});
    b.to_string()
}

#[tokio::test]
async fn every_route_pulls_its_kv_request_id() {
    bounded(async {
        let p = offl(|_| {}).await;
        let d = offl(|_| {}).await;
        let mut n = 0;
        for path in [COMPLETIONS, CHAT, RESPONSES, MESSAGES, GENERATE] {
            for stream in [false, true] {
                n += 1;
                let k = format!("k-{n}");
                let original = route_body(path, stream);
                // Prefill first (router#2451), then the decode.
                let pr = post(p.api_addr(), path, &prefill_leg(&original, &k)).await;
                assert_eq!(pr.status, 200, "{path}: {}", pr.text());
                if path != MESSAGES {
                    assert_eq!(pr.json()["kv_transfer_params"], Value::Null, "{path}");
                }
                let (ds, text) =
                    exchange(d.api_addr(), path, &decode_leg(&original, &k, &p), &[]).await;
                assert_eq!(ds, 200, "{path}: {text}");
                assert!(
                    route_reply_ok(path, stream, &text),
                    "{path} {stream}: {text}"
                );
            }
        }
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200, "{ps}");
        assert_eq!(counter(&ps, "leases_created"), 10);
        assert_eq!(counter(&ps, "leases_pulled"), 10);
        assert_eq!(ps["kv"]["invariants_ok"], true);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_completed"), 10);
        assert_eq!(counter(&ds, "handoff_recomputes"), 0);
    })
    .await;
}

#[tokio::test]
async fn concurrent_legs_wait_for_the_prefill() {
    bounded(async {
        let p = offl(|_| {}).await;
        let d = offl(|_| {}).await;
        let original = route_body(CHAT, true);
        let dec = start(
            d.api_addr(),
            "POST",
            CHAT,
            &decode_leg(&original, "K", &p),
            &[],
        )
        .await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        assert_eq!(
            post(p.api_addr(), CHAT, &prefill_leg(&original, "K"))
                .await
                .status,
            200
        );
        let (r, _conn) = dec.response().await;
        assert_eq!(r.status(), 200);
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn unknown_kv_request_id_prefills_locally_after_the_load_timeout() {
    bounded(async {
        let p = offl(|_| {}).await;
        let d = offl(|c| c.p2p_load_timeout_ms = 30).await;
        let original = route_body(COMPLETIONS, false);
        let r = post(
            d.api_addr(),
            COMPLETIONS,
            &decode_leg(&original, "nobody", &p),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], " t0 t1");
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "handoff_fetch_timeouts"), 1);
        assert_eq!(counter(&ds, "handoff_recomputes"), 1);
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 0);
        // A failed prefill of K sends the waiting decode to its local prefill at once.
        let d2 = offl(|c| c.p2p_load_timeout_ms = 600_000).await;
        let fault = [("x-sim-fault", "prefill_http_500")];
        let dec = start(
            d2.api_addr(),
            "POST",
            COMPLETIONS,
            &decode_leg(&original, "F", &p),
            &[],
        )
        .await;
        assert_eq!(wait(&d2, "running", 2000).await.0, 200);
        assert_eq!(
            send(
                p.api_addr(),
                "POST",
                COMPLETIONS,
                &prefill_leg(&original, "F"),
                &fault
            )
            .await
            .status,
            500
        );
        let (r, _conn) = dec.response().await;
        assert_eq!(r.status(), 200);
        let ds = state(&d2).await;
        assert_eq!(counter(&ds, "handoff_prefill_failed"), 1);
        assert_eq!(counter(&ds, "handoff_recomputes"), 1);
    })
    .await;
}

#[tokio::test]
async fn decode_cancelled_while_fetching_sends_an_abort() {
    bounded(async {
        let p = offl(|c| c.abort_request_timeout_ms = 100).await;
        let d = offl(|_| {}).await;
        let original = route_body(RESPONSES, true);
        let dec = start(
            d.api_addr(),
            "POST",
            RESPONSES,
            &decode_leg(&original, "K", &p),
            &[],
        )
        .await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        dec.disconnect().await;
        let (code, ds) = wait(&d, "idle", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ds, "requests_aborted.decode"), 1);
        assert_eq!(counter(&ds, "decode_abort_notifies_sent"), 1);
        // The abort came before P stored K: P knew nothing, and K's blocks wait for expiry.
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "notify_unknown"), 1);
        assert_eq!(
            post(p.api_addr(), RESPONSES, &prefill_leg(&original, "K"))
                .await
                .status,
            200
        );
        let (code, ps) = wait(&p, "idle_and_no_leases", 5000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_expired"), 1);
    })
    .await;
}

#[tokio::test]
async fn malformed_params_follow_on_invalid_kv_params() {
    bounded(async {
        let p = offl(|_| {}).await;
        let bad = json!({"prompt": "a", "kv_transfer_params": {"remote_prefiller": {"kv_request_id": "K"}}});
        let r = post(p.api_addr(), COMPLETIONS, &bad.to_string()).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "kv_transfer_params");
        let bad = json!({"prompt": "a", "kv_transfer_params": {"remote_decoder": {}}});
        assert_eq!(post(p.api_addr(), COMPLETIONS, &bad.to_string()).await.status, 400);
        let r = post(
            p.api_addr(),
            "/sim/config",
            r#"{"on_invalid_kv_params":"recompute"}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(post(p.api_addr(), COMPLETIONS, &bad.to_string()).await.status, 200);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "decode_invalid_kv_params"), 3);
        assert_eq!(counter(&ps, "plain_completed"), 1);
        assert_eq!(counter(&ps, "leases_created"), 0);
    })
    .await;
}
