//! The P/D routes beyond completions (`/v1/messages`, `/v1/responses`,
//! `/inference/v1/generate`): the exact bytes each connector sends on both legs, and the
//! routing headers no upstream sees.

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;
use http::Request;
use http_body_util::Full;
use sidecar::api::Api;
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
    let (p, d) = both_legs(Connector::SharedStorage, "/v1/messages", body).await;
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
    let (p, d) = both_legs(
        Connector::SharedStorage,
        "/v1/responses",
        r#"{"input":"hi"}"#,
    )
    .await;
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

/// A request for `api` of at most `max` tokens, long enough to span several KV blocks.
pub fn request(api: Api, max: u32, stream: bool) -> String {
    const TEXT: &str = "hello there, a prompt long enough to span several KV blocks";
    let chat = format!(r#""messages":[{{"role":"user","content":"{TEXT}"}}]"#);
    match api {
        Api::Completions => format!(
            r#"{{"model":"sim-model","prompt":"{TEXT}","max_tokens":{max},"stream":{stream}}}"#
        ),
        Api::ChatCompletions => {
            format!(r#"{{"model":"sim-model",{chat},"max_tokens":{max},"stream":{stream}}}"#)
        }
        Api::Messages => {
            format!(r#"{{"model":"sim-model","max_tokens":{max},"stream":{stream},{chat}}}"#)
        }
        Api::Responses => format!(
            r#"{{"model":"sim-model","input":"{TEXT}","max_output_tokens":{max},"stream":{stream}}}"#
        ),
        Api::Generate => {
            let ids: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
            format!(
                r#"{{"model":"sim-model","token_ids":[{}],"sampling_params":{{"max_tokens":{max},"temperature":0}},"stream":{stream}}}"#,
                ids.join(",")
            )
        }
    }
}

/// Whether `body` is a complete reply of `api`, whole or streamed.
pub fn complete(api: Api, stream: bool, body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    match (api, stream) {
        (Api::Messages, false) => json(body)["type"] == "message",
        (Api::Messages, true) => text.contains("event: message_stop"),
        (Api::Responses, false) => json(body)["object"] == "response",
        (Api::Responses, true) => text.contains("event: response.completed"),
        (Api::Generate, false) => json(body)["choices"][0]["token_ids"].is_array(),
        (_, false) => json(body)["choices"][0]["finish_reason"].is_string(),
        (_, true) => text.ends_with("data: [DONE]\n\n"),
    }
}

/// The prefiller ends idle with no KV lease held, and the decoder idle.
pub async fn nothing_held(what: &str, p: &vllm_sim::SimServer, d: &vllm_sim::SimServer) {
    assert!(
        sim_wait(p, "idle_and_no_leases", LIMIT).await,
        "{what}: the prefiller holds KV blocks: {}",
        sim_state(p).await["kv"]
    );
    assert!(sim_wait(d, "idle", LIMIT).await, "{what}: decoder busy");
}

/// A client sends an `api` request through `sidecar` and leaves while the prefiller `p`
/// (whose prefill must outlast the wait for it) is busy; nothing stays held.
pub async fn leave_in_the_prefill(
    what: &str,
    (p, d, sidecar): (vllm_sim::SimServer, vllm_sim::SimServer, Sidecar),
    api: Api,
) {
    let client = send(
        sidecar.addr,
        post(api.path(), Some(p.api_addr()), &request(api, 6, false)),
    )
    .await;
    assert!(sim_wait(&p, "busy", LIMIT).await, "{what}: no prefill");
    leave_and_wait_idle(client, &p).await;
    nothing_held(&format!("{what} left in the prefill"), &p, &d).await;
}

/// A client streams a long `api` decode through `sidecar` and leaves after its first event;
/// nothing stays held. Returns the decoder, for what it counted.
pub async fn leave_in_the_decode(
    what: &str,
    (p, d, sidecar): (vllm_sim::SimServer, vllm_sim::SimServer, Sidecar),
    api: Api,
) -> vllm_sim::SimServer {
    let mut client = send(
        sidecar.addr,
        post(api.path(), Some(p.api_addr()), &request(api, 400, true)),
    )
    .await;
    assert_eq!(client.head().await.status(), 200, "{what}");
    assert!(client.next_data().await.is_some(), "{what}: no first event");
    leave_and_wait_idle(client, &d).await;
    nothing_held(&format!("{what} left in the decode"), &p, &d).await;
    d
}

/// An `api` request whose prefill fails (`prefill_http_500`) gets a 502 with a JSON error,
/// and nothing stays held.
pub async fn failing_prefill(
    what: &str,
    (p, d, sidecar): (&vllm_sim::SimServer, &vllm_sim::SimServer, &Sidecar),
    api: Api,
    stream: bool,
) {
    let mut req = post(api.path(), Some(p.api_addr()), &request(api, 6, stream));
    req.headers_mut().insert(
        "x-sim-fault",
        http::HeaderValue::from_static("prefill_http_500"),
    );
    let (resp, reply) = call(sidecar.addr, req).await;
    assert_eq!(
        resp.status(),
        502,
        "{what}: {}",
        String::from_utf8_lossy(&reply)
    );
    let error = json(&reply);
    assert_eq!(error["error"]["code"], 502, "{what}: {error}");
    nothing_held(what, p, d).await;
}

/// The three routes against simulated vLLM workers, with every connector the simulator
/// speaks: replies whole and streamed, clients leaving during each leg, a failing prefill,
/// and no KV block left held.
mod against_the_simulator {
    use super::*;
    use serde_json::Value;
    use vllm_sim::SimServer;

    const APIS: [Api; 3] = [Api::Messages, Api::Responses, Api::Generate];
    const CONNECTORS: [Connector; 3] =
        [Connector::NixlV2, Connector::Nixl, Connector::SharedStorage];

    /// A prefiller and a decoder speaking `connector`'s protocol (prefills taking
    /// `prefill_ms`), and a sidecar in front of the decoder.
    async fn cast(connector: Connector, prefill_ms: u64) -> (SimServer, SimServer, Sidecar) {
        let protocol = match connector {
            Connector::Nixl => "nixl-v1",
            Connector::SharedStorage => "lmcache",
            _ => "nixlv2",
        };
        let p = sim(|c| {
            c.protocol = protocol.parse().unwrap();
            c.ttft_ms = prefill_ms;
        })
        .await;
        let peer = format!("http://{}", p.side_channel_addr());
        let d = sim(|c| {
            c.protocol = protocol.parse().unwrap();
            c.itl_ms = 5;
            if connector == Connector::SharedStorage {
                c.lmcache_peer = Some(peer);
            }
        })
        .await;
        let sidecar = Sidecar::for_decoder(d.api_addr(), connector).await;
        (p, d, sidecar)
    }

    #[tokio::test]
    async fn every_route_and_connector_hands_off_whole_and_streamed() {
        for connector in CONNECTORS {
            let (p, d, sidecar) = cast(connector, 5).await;
            for api in APIS {
                for stream in [false, true] {
                    let what = format!("{} {} stream={stream}", connector.name(), api.path());
                    let body = request(api, 6, stream);
                    let (resp, reply) =
                        call(sidecar.addr, post(api.path(), Some(p.api_addr()), &body)).await;
                    assert_eq!(
                        resp.status(),
                        200,
                        "{what}: {}",
                        String::from_utf8_lossy(&reply)
                    );
                    assert!(
                        complete(api, stream, &reply),
                        "{what}: {}",
                        String::from_utf8_lossy(&reply)
                    );
                    let prefill = sim_requests(&p).await.pop().unwrap();
                    let decode = sim_requests(&d).await.pop().unwrap();
                    assert_eq!(prefill["path"], api.path(), "{what}");
                    let (pb, db) = (record_body(&prefill), record_body(&decode));
                    assert_eq!(pb["stream"], false, "{what}");
                    let limit = match api {
                        Api::Responses => &pb["max_output_tokens"],
                        Api::Generate => &pb["sampling_params"]["max_tokens"],
                        _ => &pb["max_tokens"],
                    };
                    assert_eq!(limit, 1, "{what}: {pb}");
                    // The decode is the client's request, every field as sent.
                    let mut sent: Value = serde_json::from_str(&body).unwrap();
                    let mut got = db.clone();
                    for o in [&mut sent, &mut got] {
                        let o = o.as_object_mut().unwrap();
                        for k in ["kv_transfer_params", "do_remote_prefill"] {
                            o.remove(k);
                        }
                        o.retain(|k, _| !k.starts_with("remote_"));
                    }
                    assert_eq!(got, sent, "{what}");
                    if connector == Connector::NixlV2 {
                        assert!(db["kv_transfer_params"].is_object(), "{what}: {db}");
                    }
                    nothing_held(&what, &p, &d).await;
                }
            }
            let state = sim_state(&p).await;
            if connector != Connector::SharedStorage {
                assert_eq!(counter(&state, "leases_created"), 6, "{}", connector.name());
                assert_eq!(counter(&state, "leases_pulled"), 6, "{}", connector.name());
            }
        }
    }

    #[tokio::test]
    async fn a_client_leaving_during_either_leg_leaves_nothing_held() {
        for connector in CONNECTORS {
            for api in APIS {
                let what = format!("{} {}", connector.name(), api.path());
                leave_in_the_prefill(&what, cast(connector, 300).await, api).await;
                let d = leave_in_the_decode(&what, cast(connector, 5).await, api).await;
                let aborted = counter(&sim_state(&d).await, "requests_aborted/decode")
                    + counter(&sim_state(&d).await, "requests_aborted/plain");
                assert_eq!(aborted, 1, "{what}: the decode was not aborted");
            }
        }
    }

    #[tokio::test]
    async fn a_failing_prefill_is_a_json_error_and_no_decode() {
        for connector in CONNECTORS {
            let (p, d, sidecar) = cast(connector, 5).await;
            for api in APIS {
                let what = format!("{} {}", connector.name(), api.path());
                failing_prefill(&what, (&p, &d, &sidecar), api, false).await;
            }
            assert_eq!(
                counter(&sim_state(&d).await, "requests_total"),
                0,
                "{}: a decode was sent",
                connector.name()
            );
        }
    }
}
