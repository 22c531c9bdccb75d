//! `shared-storage` (alias `lmcache`) and llm-d's decode-first: with `cache_hit_threshold` in
//! the client's body the decoder is asked first, and only its `cache_threshold` refusal sends
//! the request P/D, with the threshold zeroed on both legs that follow.

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;
use sidecar::Connector;

/// A complete HTTP/1.1 200 with `body`, for a recorder to serve.
fn reply(content_type: &str, body: &str) -> &'static [u8] {
    let raw = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    Box::leak(raw.into_bytes().into_boxed_slice())
}

const JSON: &str = "application/json";
const SSE: &str = "text/event-stream; charset=utf-8";
const REFUSAL: &str = r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"","finish_reason":"cache_threshold"}],"usage":{"prompt_tokens":3,"completion_tokens":0,"total_tokens":3}}"#;
const ANSWER: &str =
    r#"{"id":"cmpl-2","choices":[{"index":0,"text":"Hello","finish_reason":"length"}]}"#;
const ROLE: &str = r#"data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const REFUSAL_EVENT: &str = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":"cache_threshold"}]}"#;
const TOKEN_EVENT: &str =
    r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;

fn sse(events: &[&str]) -> String {
    let mut out: String = events.iter().map(|e| format!("{e}\n\n")).collect();
    out.push_str("data: [DONE]\n\n");
    out
}

fn text(rec: &Recorded) -> &str {
    std::str::from_utf8(&rec.body).unwrap()
}

/// Sends `body` through a shared-storage sidecar whose decoder answers `decoder` in turn;
/// returns the client's reply and the prefill and decode legs recorded.
async fn run(
    path: &str,
    body: &str,
    decoder: &[&'static [u8]],
) -> (u16, String, Vec<Recorded>, Vec<Recorded>) {
    let mut p = Recorder::start(reply(JSON, r#"{"id":"p"}"#)).await;
    let mut d = Recorder::start_sequence(decoder).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::SharedStorage).await;
    let (resp, got) = call(sidecar.addr, post(path, Some(p.addr), body)).await;
    let got = String::from_utf8(got.to_vec()).unwrap();
    let mut decodes = vec![];
    while decodes.len() < d.count() {
        decodes.push(d.next().await);
    }
    let mut prefills = vec![];
    while prefills.len() < p.count() {
        prefills.push(p.next().await);
    }
    (resp.status().as_u16(), got, prefills, decodes)
}

#[tokio::test]
async fn a_refusal_sends_the_request_pd_with_the_threshold_zeroed() {
    let body = r#"{"model":"m","prompt":"hi","cache_hit_threshold":0.8,"max_tokens":5}"#;
    let (status, got, p, d) = run(
        "/v1/completions",
        body,
        &[reply(JSON, REFUSAL), reply(JSON, ANSWER)],
    )
    .await;
    assert_eq!((status, got.as_str()), (200, ANSWER));
    assert_eq!(d.len(), 2, "the decoder first, then after the prefill");
    assert_eq!(text(&d[0]), body, "first: the client's bytes");
    assert_eq!(p.len(), 1);
    assert_eq!(
        text(&p[0]),
        r#"{"model":"m","prompt":"hi","cache_hit_threshold":0,"max_tokens":1,"stream":false,"max_completion_tokens":1}"#
    );
    assert_eq!(
        text(&d[1]),
        r#"{"model":"m","prompt":"hi","cache_hit_threshold":0,"max_tokens":5}"#
    );
    for leg in d.iter().chain(&p) {
        assert_eq!(leg.header("x-prefiller-host-port"), None);
        assert_eq!(leg.header("x-request-id"), d[0].header("x-request-id"));
    }
}

#[tokio::test]
async fn a_streamed_refusal_after_the_role_event_is_seen_and_not_relayed() {
    let body =
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"cache_hit_threshold":1}"#;
    let answer = sse(&[ROLE, TOKEN_EVENT]);
    let (status, got, p, d) = run(
        "/v1/chat/completions",
        body,
        &[
            reply(SSE, &sse(&[ROLE, REFUSAL_EVENT])),
            reply(SSE, &answer),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        got, answer,
        "only the decode after the prefill reaches the client"
    );
    assert_eq!((p.len(), d.len()), (1, 2));
    assert_eq!(
        text(&p[0]),
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":false,"cache_hit_threshold":0,"max_tokens":1,"max_completion_tokens":1}"#
    );
    assert_eq!(
        text(&d[1]),
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"cache_hit_threshold":0}"#
    );
}

#[tokio::test]
async fn a_decoder_that_answers_is_relayed_byte_for_byte_and_nothing_is_prefilled() {
    let stream = sse(&[ROLE, TOKEN_EVENT]);
    let error = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"error\":\"nope\"}\n";
    for (decoder, want_status, want) in [
        (reply(JSON, ANSWER), 200, ANSWER.to_owned()),
        (reply(SSE, &stream), 200, stream.clone()),
        (error.as_bytes(), 400, "{\"error\":\"nope\"}\n".to_owned()),
    ] {
        let body = r#"{"prompt":"hi","cache_hit_threshold":0.5,"stream":true}"#;
        let (status, got, p, d) = run("/v1/completions", body, &[decoder]).await;
        assert_eq!((status, &got), (want_status, &want));
        assert_eq!((p.len(), d.len()), (0, 1), "{want}");
        assert_eq!(text(&d[0]), body);
    }
}

#[tokio::test]
async fn without_a_threshold_the_decoder_gets_the_clients_bytes_after_the_prefill() {
    let body = r#"{"prompt":"hi", "max_tokens":5}"#;
    let (status, got, p, d) = run("/v1/completions", body, &[reply(JSON, REFUSAL)]).await;
    assert_eq!(
        (status, got.as_str()),
        (200, REFUSAL),
        "relayed, not looked at"
    );
    assert_eq!((p.len(), d.len()), (1, 1));
    assert_eq!(text(&d[0]), body);
}

/// Against simulated workers sharing a store (the decoder looks up the prefiller's): the
/// decoder refuses a prompt it has not got, the sidecar prefills it, and the decode that
/// follows finds it; the same prompt again is answered by the decoder alone.
mod against_the_simulator {
    use super::*;
    use crate::routes::{complete, nothing_held, request};
    use sidecar::api::Api;
    use vllm_sim::SimServer;

    async fn cast(prefill_ms: u64) -> (SimServer, SimServer, Sidecar) {
        let p = sim(|c| {
            c.protocol = "lmcache".parse().unwrap();
            c.ttft_ms = prefill_ms;
        })
        .await;
        let peer = format!("http://{}", p.side_channel_addr());
        let d = sim(|c| {
            c.protocol = "lmcache".parse().unwrap();
            c.itl_ms = 5;
            c.lmcache_peer = Some(peer);
        })
        .await;
        let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::SharedStorage).await;
        (p, d, sidecar)
    }

    /// `request(api, max, stream)` asking for a cache hit rate of at least one half.
    fn with_threshold(api: Api, max: u32, stream: bool) -> String {
        request(api, max, stream).replacen('{', r#"{"cache_hit_threshold":0.5,"#, 1)
    }

    fn requests_seen(state: &serde_json::Value) -> i64 {
        counter(state, "requests_total")
    }

    #[tokio::test]
    async fn a_refused_prompt_goes_pd_and_is_then_served_by_the_decoder_alone() {
        for api in [Api::Completions, Api::ChatCompletions] {
            for stream in [false, true] {
                let what = format!("{} stream={stream}", api.path());
                let (p, d, sidecar) = cast(5).await;
                let body = with_threshold(api, 6, stream);
                for round in 1..=2 {
                    let (resp, reply) =
                        call(sidecar.addr, post(api.path(), Some(p.api_addr()), &body)).await;
                    let shown = String::from_utf8_lossy(&reply);
                    assert_eq!(resp.status(), 200, "{what} round {round}: {shown}");
                    assert!(complete(api, stream, &reply), "{what}: {shown}");
                    assert!(!shown.contains("cache_threshold"), "{what}: {shown}");
                }
                nothing_held(&what, &p, &d).await;
                let (ps, ds) = (sim_state(&p).await, sim_state(&d).await);
                assert_eq!(requests_seen(&ps), 1, "{what}: one prefill, in round 1");
                assert_eq!(requests_seen(&ds), 3, "{what}: refused, decoded, decoded");
                assert_eq!(counter(&ds, "cache_threshold_misses"), 1, "{what}");
                assert_eq!(counter(&ds, "lmcache_hits"), 2, "{what}");
                let decodes = sim_requests(&d).await;
                let thresholds: Vec<_> = decodes
                    .iter()
                    .map(|r| record_body(r)["cache_hit_threshold"].clone())
                    .collect();
                assert_eq!(
                    thresholds,
                    [
                        serde_json::json!(0.5),
                        serde_json::json!(0),
                        serde_json::json!(0.5)
                    ],
                    "{what}: the client's, zeroed after the prefill, the client's"
                );
                let prefill = record_body(&sim_requests(&p).await[0]);
                assert_eq!(prefill["cache_hit_threshold"], 0, "{what}: {prefill}");
                assert_eq!(prefill["max_tokens"], 1, "{what}: {prefill}");
            }
        }
    }

    #[tokio::test]
    async fn a_client_leaving_in_either_leg_after_a_refusal_leaves_nothing_running() {
        let api = Api::ChatCompletions;
        // In the prefill that follows the refusal.
        let (p, d, sidecar) = cast(300).await;
        let client = send(
            sidecar.addr,
            post(
                api.path(),
                Some(p.api_addr()),
                &with_threshold(api, 6, false),
            ),
        )
        .await;
        assert!(sim_wait(&p, "busy", LIMIT).await, "no prefill");
        leave_and_wait_idle(client, &p).await;
        nothing_held("left in the prefill", &p, &d).await;
        assert_eq!(counter(&sim_state(&d).await, "cache_threshold_misses"), 1);
        assert_eq!(counter(&sim_state(&d).await, "requests_total"), 1);
        // In the decode that follows it.
        let (p, d, sidecar) = cast(5).await;
        let mut client = send(
            sidecar.addr,
            post(
                api.path(),
                Some(p.api_addr()),
                &with_threshold(api, 400, true),
            ),
        )
        .await;
        assert_eq!(client.head().await.status(), 200);
        assert!(client.next_data().await.is_some(), "no first event");
        leave_and_wait_idle(client, &d).await;
        nothing_held("left in the decode", &p, &d).await;
        let state = sim_state(&d).await;
        assert_eq!(counter(&state, "requests_aborted/decode"), 1, "{state}");
    }

    #[tokio::test]
    async fn a_failing_prefill_after_a_refusal_is_the_clients_error() {
        let (p, d, sidecar) = cast(5).await;
        let api = Api::Completions;
        let mut req = post(
            api.path(),
            Some(p.api_addr()),
            &with_threshold(api, 6, true),
        );
        req.headers_mut().insert(
            "x-sim-fault",
            http::HeaderValue::from_static("prefill_http_500"),
        );
        let (resp, reply) = call(sidecar.addr, req).await;
        assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&reply));
        assert_eq!(json(&reply)["error"]["code"], 502);
        nothing_held("failing prefill", &p, &d).await;
        let state = sim_state(&d).await;
        assert_eq!(counter(&state, "cache_threshold_misses"), 1, "{state}");
        assert_eq!(
            requests_seen(&state),
            1,
            "no decode after the failed prefill"
        );
    }
}
