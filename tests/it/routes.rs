//! The P/D routes beyond completions (`/v1/messages`, `/v1/responses`,
//! `/inference/v1/generate`): the exact bytes each connector sends on both legs, and the
//! routing headers no upstream sees.

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;
use http::Request;
use http_body_util::Full;
use sidecar::Connector;

/// A prefiller reply every connector can use: NIXL v2's `kv_transfer_params` and the legacy
/// fork's top-level fields.
const PREFILL_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 159\r\n\r\n{\"id\":\"p\",\"kv_transfer_params\":{\"remote_block_ids\":[7],\"remote_engine_id\":\"e\"},\"remote_block_ids\":[7],\"remote_engine_id\":\"e\",\"remote_host\":\"h\",\"remote_port\":5}";
const DECODE_REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\":\"d\"}";

const NIXLV2_ASK: &str = r#""kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;
const NIXL_ASK: &str = r#""do_remote_decode":true"#;

/// The headers that route a request and must reach no upstream.
const ROUTING_HEADERS: [&str; 4] = [
    "x-prefiller-host-port",
    "x-prefiller-url",
    "x-encoder-hosts-ports",
    "x-kv-cache-source-host-port",
];

/// Sends `body` to `path` through a sidecar whose prefiller and decoder are recorders;
/// returns what each leg received.
async fn both_legs(connector: Connector, path: &str, body: &str) -> (Recorded, Recorded) {
    let mut p = Recorder::start(PREFILL_REPLY).await;
    let mut d = Recorder::start(DECODE_REPLY).await;
    let sidecar = Sidecar::for_decoder(d.addr, connector).await;
    let req = Request::post(path)
        .header("host", "sidecar")
        .header("content-type", "application/json")
        .header("x-prefiller-host-port", p.addr.to_string())
        .header("x-encoder-hosts-ports", "127.0.0.1:1,127.0.0.1:2")
        .header("x-kv-cache-source-host-port", "127.0.0.1:3")
        .body(Full::new(body.to_owned().into()))
        .unwrap();
    let (resp, reply) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&reply));
    assert_eq!(&reply[..], b"{\"id\":\"d\"}");
    let (prefill, decode) = (p.next().await, d.next().await);
    for (leg, rec) in [("prefill", &prefill), ("decode", &decode)] {
        assert!(
            rec.head.starts_with(&format!("POST {path} HTTP/1.1\r\n")),
            "{leg}: {}",
            rec.head
        );
        for h in ROUTING_HEADERS {
            assert_eq!(rec.header(h), None, "{leg} leg got {h}");
        }
    }
    assert_eq!(
        prefill.header("x-request-id"),
        decode.header("x-request-id")
    );
    (prefill, decode)
}

fn text(rec: &Recorded) -> &str {
    std::str::from_utf8(&rec.body).unwrap()
}

#[tokio::test]
async fn messages_prefill_one_token_and_decode_the_original() {
    let body = r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"stream":true,"system":"be brief"}"#;
    let one_token = r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"stream":false,"system":"be brief""#;
    let (p, d) = both_legs(Connector::NixlV2, "/v1/messages", body).await;
    assert_eq!(text(&p), format!("{one_token},{NIXLV2_ASK}}}"));
    assert_eq!(
        text(&d),
        r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"stream":true,"system":"be brief","kv_transfer_params":{"remote_block_ids":[7],"remote_engine_id":"e"}}"#
    );
    let (p, d) = both_legs(Connector::Nixl, "/v1/messages", body).await;
    assert_eq!(text(&p), format!("{one_token},{NIXL_ASK}}}"));
    assert_eq!(
        text(&d),
        r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"hi"}],"stream":true,"system":"be brief","do_remote_prefill":true,"remote_block_ids":[7],"remote_engine_id":"e","remote_host":"h","remote_port":5}"#
    );
    let (p, d) = both_legs(Connector::LmCache, "/v1/messages", body).await;
    assert_eq!(text(&p), format!("{one_token}}}"));
    assert_eq!(text(&d), body);
}

#[tokio::test]
async fn responses_prefill_one_output_token_in_the_foreground() {
    let body = r#"{"model":"m","input":"hi","instructions":"be brief","max_output_tokens":64,"background":true,"stream":true}"#;
    let one_token = r#"{"model":"m","input":"hi","instructions":"be brief","max_output_tokens":1,"stream":false"#;
    let (p, d) = both_legs(Connector::NixlV2, "/v1/responses", body).await;
    assert_eq!(text(&p), format!("{one_token},{NIXLV2_ASK}}}"));
    assert_eq!(
        text(&d),
        r#"{"model":"m","input":"hi","instructions":"be brief","max_output_tokens":64,"background":true,"stream":true,"kv_transfer_params":{"remote_block_ids":[7],"remote_engine_id":"e"}}"#
    );
    // Absent limits are set for the prefill only.
    let (p, d) = both_legs(Connector::LmCache, "/v1/responses", r#"{"input":"hi"}"#).await;
    assert_eq!(
        text(&p),
        r#"{"input":"hi","stream":false,"max_output_tokens":1}"#
    );
    assert_eq!(text(&d), r#"{"input":"hi"}"#);
}

#[tokio::test]
async fn generate_caps_sampling_params_and_puts_the_transfer_at_the_top() {
    let body = r#"{"token_ids":[1,2,3],"sampling_params":{"temperature":0,"max_tokens":64,"min_tokens":8},"stream":true}"#;
    let (p, d) = both_legs(Connector::NixlV2, "/inference/v1/generate", body).await;
    assert_eq!(
        text(&p),
        format!(
            r#"{{"token_ids":[1,2,3],"sampling_params":{{"temperature":0,"max_tokens":1}},"stream":false,{NIXLV2_ASK}}}"#
        )
    );
    assert_eq!(
        text(&d),
        r#"{"token_ids":[1,2,3],"sampling_params":{"temperature":0,"max_tokens":64,"min_tokens":8},"stream":true,"kv_transfer_params":{"remote_block_ids":[7],"remote_engine_id":"e"}}"#
    );
    // Without sampling_params the prefill gets them and the decode does not.
    let (p, d) = both_legs(
        Connector::Nixl,
        "/inference/v1/generate",
        r#"{"token_ids":[4]}"#,
    )
    .await;
    assert_eq!(
        text(&p),
        format!(
            r#"{{"token_ids":[4],"stream":false,"sampling_params":{{"max_tokens":1}},{NIXL_ASK}}}"#
        )
    );
    assert_eq!(
        text(&d),
        r#"{"token_ids":[4],"do_remote_prefill":true,"remote_block_ids":[7],"remote_engine_id":"e","remote_host":"h","remote_port":5}"#
    );
}

#[tokio::test]
async fn pass_through_strips_every_routing_header() {
    let mut d = Recorder::start(DECODE_REPLY).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::NixlV2).await;
    let mut req = get("/v1/models");
    for h in ROUTING_HEADERS {
        req.headers_mut()
            .insert(h, http::HeaderValue::from_static("127.0.0.1:9"));
    }
    // A POST to a route that is not P/D passes through too, headers stripped.
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    let mut post = post("/v1/embeddings", None, r#"{"input":"x"}"#);
    for h in ROUTING_HEADERS {
        post.headers_mut()
            .insert(h, http::HeaderValue::from_static("127.0.0.1:9"));
    }
    let (resp, _) = call(sidecar.addr, post).await;
    assert_eq!(resp.status(), 200);
    for _ in 0..2 {
        let rec = d.next().await;
        for h in ROUTING_HEADERS {
            assert_eq!(rec.header(h), None, "{h} reached the decoder: {}", rec.head);
        }
    }
}
