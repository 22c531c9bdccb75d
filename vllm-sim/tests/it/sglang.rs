//! `--protocol sglang` (§7.18): one body to both legs, the room exchanged through the
//! prefiller's bootstrap listener.

use crate::support::*;
use crate::{CHAT, COMPLETIONS, GENERATE, MESSAGES, RESPONSES};
use serde_json::{json, Value};
use vllm_sim::{Protocol, Role, SimServer};

async fn pair(tweak: impl Fn(&mut vllm_sim::SimConfig) + Copy) -> (SimServer, SimServer) {
    let p = sim(|c| {
        c.protocol = Protocol::Sglang;
        c.role = Role::Prefill;
        tweak(c);
    })
    .await;
    let d = sim(|c| {
        c.protocol = Protocol::Sglang;
        c.role = Role::Decode;
        tweak(c);
    })
    .await;
    (p, d)
}

fn with_room(mut b: Value, p: &SimServer, room: u64) -> String {
    b["bootstrap_host"] = "127.0.0.1".into();
    b["bootstrap_port"] = p.bootstrap_addr().port().into();
    b["bootstrap_room"] = room.into();
    b.to_string()
}

#[tokio::test]
async fn every_route_streaming_and_not_hands_over_by_room() {
    bounded(async {
        let (p, d) = pair(|_| {}).await;
        let mut room = 1000;
        for path in [COMPLETIONS, CHAT, RESPONSES, MESSAGES, GENERATE] {
            for stream in [false, true] {
                room += 1;
                let body = with_room(route_body(path, stream), &p, room);
                // Both legs at once, as the sidecar sends them.
                let ((ps, ptext), (ds, dtext)) = tokio::join!(
                    exchange(p.api_addr(), path, &body, &[]),
                    exchange(d.api_addr(), path, &body, &[])
                );
                assert_eq!(ps, 200, "{path} {stream}: {ptext}");
                assert_eq!(ds, 200, "{path} {stream}: {dtext}");
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
        assert_eq!(counter(&ps, "prefill_completed"), 10);
        assert_eq!(counter(&ps, "side_channel_in.fetch"), 10);
        assert_eq!(ps["kv"]["invariants_ok"], true);
        assert_eq!(ps["instance"]["role"], "prefill");
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_completed"), 10);
        assert_eq!(counter(&ds, "leases_created"), 0);
        // The ended leases are keyed by room.
        let leases = ps["leases"].as_array().unwrap();
        assert!(leases
            .iter()
            .any(|l| l["remote_request_id"] == "1001" && l["state"] == "pulled"));
        // The bootstrap fields are known fields, not ignored ones.
        let recs = get(p.api_addr(), "/sim/requests").await.json();
        assert_eq!(recs[0]["ignored_fields"], json!([]));
        assert_eq!(recs[0]["class"], "prefill");
    })
    .await;
}

#[tokio::test]
async fn decode_first_waits_for_the_room() {
    bounded(async {
        let (p, d) = pair(|_| {}).await;
        let body = with_room(route_body(COMPLETIONS, false), &p, 7);
        let dec = start(d.api_addr(), "POST", COMPLETIONS, &body, &[]).await;
        // The decode is admitted and waiting on the bootstrap before the prefill starts.
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        let pr = post(p.api_addr(), COMPLETIONS, &body).await;
        assert_eq!(pr.status, 200, "{}", pr.text());
        assert_eq!(pr.json()["kv_transfer_params"], Value::Null);
        let (r, _conn) = dec.response().await;
        assert_eq!(r.status(), 200);
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_pulled"), 1);
    })
    .await;
}

#[tokio::test]
async fn room_never_ready_times_out_as_a_kv_load_failure() {
    bounded(async {
        let (p, d) = pair(|c| c.bootstrap_timeout_ms = 30).await;
        let body = with_room(route_body(CHAT, false), &p, 1);
        let r = post(d.api_addr(), CHAT, &body).await;
        assert_eq!(r.status, 500);
        assert_eq!(
            r.text(),
            r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#
        );
        let body = with_room(route_body(CHAT, true), &p, 2);
        let (status, text) = exchange(d.api_addr(), CHAT, &body, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(
            text,
            "data: {\"error\":{\"message\":\"Internal server error\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}}\n\ndata: [DONE]\n\n"
        );
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "handoff_fetch_timeouts"), 2);
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 2);
        assert_eq!(counter(&ds, "requests_failed"), 2);
    })
    .await;
}

#[tokio::test]
async fn failed_prefill_fails_the_waiting_decode_at_once() {
    bounded(async {
        // A timeout far beyond the test bound: only the failure mark can end the wait.
        let (p, d) = pair(|c| c.bootstrap_timeout_ms = 600_000).await;
        let body = with_room(route_body(MESSAGES, false), &p, 9);
        let fault = [("x-sim-fault", "prefill_http_503")];
        let dec = start(d.api_addr(), "POST", MESSAGES, &body, &fault).await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        let pr = send(p.api_addr(), "POST", MESSAGES, &body, &fault).await;
        assert_eq!(pr.status, 503);
        let (r, _conn) = dec.response().await;
        assert_eq!(r.status(), 500);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "handoff_prefill_failed"), 1);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_created"), 0);
        // A rejected prefill (unknown model) marks its room too.
        let mut b: Value =
            serde_json::from_str(&with_room(route_body(COMPLETIONS, false), &p, 10)).unwrap();
        let dr = start(d.api_addr(), "POST", COMPLETIONS, &b.to_string(), &[]).await;
        b["model"] = "nope".into();
        assert_eq!(
            post(p.api_addr(), COMPLETIONS, &b.to_string()).await.status,
            404
        );
        let (r, _conn) = dr.response().await;
        assert_eq!(r.status(), 500);
    })
    .await;
}

#[tokio::test]
async fn cancelled_decode_leaves_the_room_to_expire() {
    bounded(async {
        let (p, d) = pair(|c| c.abort_request_timeout_ms = 100).await;
        let body = with_room(route_body(COMPLETIONS, true), &p, 77);
        let dec = start(d.api_addr(), "POST", COMPLETIONS, &body, &[]).await;
        assert_eq!(wait(&d, "running", 2000).await.0, 200);
        dec.disconnect().await;
        let (code, ds) = wait(&d, "idle", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ds, "requests_aborted.decode"), 1);
        // The prefill still runs (the sidecar detaches it) and its KV waits for nobody.
        assert_eq!(post(p.api_addr(), COMPLETIONS, &body).await.status, 200);
        assert_eq!(state(&p).await["kv"]["leases_held"], 1);
        let (code, ps) = wait(&p, "idle_and_no_leases", 5000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ps, "leases_expired"), 1);
        assert_eq!(counter(&ps, "leases_pulled"), 0);
        assert_eq!(ps["kv"]["free_blocks"], ps["kv"]["total_blocks"]);
    })
    .await;
}

#[tokio::test]
async fn bootstrap_fields_are_required_by_role_and_ignored_without_one() {
    bounded(async {
        let (p, d) = pair(|_| {}).await;
        let plain = route_body(COMPLETIONS, false).to_string();
        for s in [&p, &d] {
            let r = post(s.api_addr(), COMPLETIONS, &plain).await;
            assert_eq!(r.status, 400, "{}", r.text());
            assert_eq!(r.json()["error"]["param"], "bootstrap_host");
        }
        let mut b: Value =
            serde_json::from_str(&with_room(route_body(GENERATE, false), &p, 1)).unwrap();
        b.as_object_mut().unwrap().remove("bootstrap_room");
        let r = post(d.api_addr(), GENERATE, &b.to_string()).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "bootstrap_room");
        assert!(r.text().contains("without bootstrap room id"));
        b["bootstrap_room"] = "x".into();
        assert_eq!(
            post(p.api_addr(), GENERATE, &b.to_string()).await.status,
            400
        );
        assert_eq!(counter(&state(&p).await, "requests_rejected"), 2);
        // Without a role the instance serves everything plain.
        let auto = sim(|c| c.protocol = Protocol::Sglang).await;
        let body = with_room(route_body(COMPLETIONS, false), &p, 5);
        assert_eq!(post(auto.api_addr(), COMPLETIONS, &body).await.status, 200);
        assert_eq!(counter(&state(&auto).await, "plain_completed"), 1);
        // A room already held on P is refused.
        assert_eq!(post(p.api_addr(), COMPLETIONS, &body).await.status, 200);
        let again = post(p.api_addr(), COMPLETIONS, &body).await;
        assert_eq!(again.status, 400);
        assert!(again.text().contains("already in use"), "{}", again.text());
        assert_eq!(state(&p).await["kv"]["leases_held"], 1);
    })
    .await;
}
