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
