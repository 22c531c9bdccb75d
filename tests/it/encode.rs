//! Encoder disaggregation (E/PD, `-ec-connector`): a chat request's multimodal items are
//! encoded on the encoders `x-encoder-hosts-ports` names (vllm-sim's `mm_encoder_only`)
//! before the prefill, and with `ec-nixl` both legs carry what the encoders answered.

use std::net::SocketAddr;

use crate::support::*;
use serde_json::{json, Map, Value};
use sidecar::config::SsrfConfig;
use sidecar::encode::EcConnector;
use sidecar::observe::metrics::Metrics;
use vllm_sim::SimServer;

const CHAT: &str = "/v1/chat/completions";
const CAT: &str = "https://images.test/cat.png";
const DOG: &str = "https://images.test/dog.png";
/// Inline audio (base64): its mm hash is over this data.
const AUDIO: &str = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=";

fn image(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn audio() -> Value {
    json!({"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}})
}

/// A user message of `parts` after a text part.
fn messages(parts: &[Value]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "what is this"})];
    content.extend_from_slice(parts);
    json!([{"role": "user", "content": content}])
}

/// vllm-sim's mm hash: hex SHA-256 of an item's URL or inline data (SHA-256 from rustls'
/// ring provider, the crypto the sidecar already links).
fn mm_hash(src: &str) -> String {
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider;
    sha256
        .hash(src.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What encoder `e` puts under each item's hash in its `ec_transfer_params`: itself, as the
/// peer holding the item's encoder cache.
async fn peer(e: &SimServer) -> Value {
    let state = sim_state(e).await;
    let side = state["instance"]["side_channel"].as_str().unwrap();
    let (host, port) = side.rsplit_once(':').unwrap();
    json!({
        "peer_host": host,
        "peer_port": port.parse::<u16>().unwrap(),
        "engine_id": state["instance"]["engine_id"],
    })
}

async fn encoder() -> SimServer {
    sim(|c| c.mm_encoder_only = true).await
}

/// A prefiller, a decoder, and a sidecar in front of the decoder with `ec` on; with `allow`
/// non-empty, SSRF protection allows the prefiller and `allow` only.
struct Epd {
    p: SimServer,
    d: SimServer,
    metrics: Metrics,
    sidecar: Sidecar,
}

impl Epd {
    async fn start(ec: EcConnector, allow: &[SocketAddr]) -> Epd {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let mut cfg = config(d.api_addr());
        cfg.ec_connector = Some(ec);
        if !allow.is_empty() {
            let rules = std::iter::once(p.api_addr())
                .chain(allow.iter().copied())
                .map(|a| a.to_string().parse().unwrap())
                .collect();
            cfg.ssrf = Some(SsrfConfig {
                rules,
                inference_pool: None,
                pool_api: sidecar::security::inference_pool::PoolApi::V1,
            });
        }
        let app = sidecar::App::build(cfg)
            .await
            .expect("the sidecar assembles");
        let metrics = app.metrics().clone();
        let sidecar = Sidecar::serve(app).await;
        Epd {
            p,
            d,
            metrics,
            sidecar,
        }
    }

    /// Sends `body` with request id `id`, naming `encoders` and, when `pd`, the prefiller.
    async fn call(
        &self,
        pd: bool,
        encoders: &[SocketAddr],
        id: &str,
        body: &Value,
    ) -> (hyper::Response<()>, bytes::Bytes) {
        let prefiller = pd.then(|| self.p.api_addr());
        let mut req = post(CHAT, prefiller, &body.to_string());
        let names: Vec<String> = encoders.iter().map(SocketAddr::to_string).collect();
        if !names.is_empty() {
            req.headers_mut()
                .insert("x-encoder-hosts-ports", names.join(",").parse().unwrap());
        }
        req.headers_mut()
            .insert("x-request-id", id.parse().unwrap());
        call(self.sidecar.addr, req).await
    }

    fn disagg(&self, kind: &str) -> u64 {
        metric(
            &self.metrics,
            &format!("llm_d_disagg_sidecar_disagg_requests_total{{disagg_type=\"{kind}\"}}"),
        )
    }

    fn encode_stages(&self) -> u64 {
        metric(
            &self.metrics,
            "llm_d_disagg_sidecar_encode_duration_seconds_count",
        )
    }
}

/// Asserts encoder call `rec` is the client's `client` request for `item` alone, one token.
fn assert_encoder_call(rec: &Value, client: &Value, item: &Value, id: &str) {
    let body = record_body(rec);
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [item]}]),
        "{body}"
    );
    assert_eq!(body["max_tokens"], 1, "{body}");
    assert_eq!(body["stream"], false, "{body}");
    assert!(body.get("stream_options").is_none(), "{body}");
    match client.get("max_completion_tokens") {
        Some(_) => assert_eq!(body["max_completion_tokens"], 1, "{body}"),
        None => assert!(body.get("max_completion_tokens").is_none(), "{body}"),
    }
    // The rest of the client's request goes as it was.
    for key in ["model", "temperature"] {
        assert_eq!(body[key], client[key], "{key} in {body}");
    }
    assert_eq!(record_header(rec, "content-type"), Some("application/json"));
    assert_eq!(rec["headers"]["x-request-id"], json!([id]), "{rec}");
    assert!(
        rec["headers"].get("x-encoder-hosts-ports").is_none(),
        "{rec}"
    );
}

/// The legs' request records (prefill, then decode), each checked for the stripped header.
async fn legs(epd: &Epd) -> (Vec<Value>, Vec<Value>) {
    let (p, d) = (
        sim_requests_to(&epd.p, CHAT).await,
        sim_requests_to(&epd.d, CHAT).await,
    );
    for rec in p.iter().chain(&d) {
        assert!(
            rec["headers"].get("x-encoder-hosts-ports").is_none(),
            "{rec}"
        );
    }
    (
        p.iter().map(record_body).collect(),
        d.iter().map(record_body).collect(),
    )
}

#[tokio::test]
async fn ec_nixl_encodes_each_url_once_round_robin_and_both_legs_carry_the_params() {
    // The hash helper is SHA-256 (the FIPS 180-2 "abc" vector).
    assert_eq!(
        mm_hash("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let (e0, e1) = (encoder().await, encoder().await);
    let epd = Epd::start(EcConnector::Nixl, &[]).await;
    // Three images, two of them the same URL; a stream with usage; and parameters the client
    // made up, which the encoders' replace.
    let client = json!({
        "model": "sim-model", "temperature": 0.5,
        "messages": messages(&[image(CAT), image(DOG), image(CAT)]),
        "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true},
        "ec_transfer_params": {"forged": true}
    });
    let (resp, body) = epd
        .call(true, &[e0.api_addr(), e1.api_addr()], "epd-1", &client)
        .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));

    // One call per distinct URL, in item order over the encoders.
    let (c0, c1) = (
        sim_requests_to(&e0, CHAT).await,
        sim_requests_to(&e1, CHAT).await,
    );
    assert_eq!((c0.len(), c1.len()), (1, 1), "{c0:#?} {c1:#?}");
    assert_encoder_call(&c0[0], &client, &image(CAT), "epd-1-enc-0");
    assert_encoder_call(&c1[0], &client, &image(DOG), "epd-1-enc-1");

    // Both legs carry the union of the replies, in place of the client's.
    let mut want = Map::new();
    want.insert(mm_hash(CAT), peer(&e0).await);
    want.insert(mm_hash(DOG), peer(&e1).await);
    let want = Value::Object(want);
    let (p, d) = legs(&epd).await;
    assert_eq!((p.len(), d.len()), (1, 1));
    for leg in [&p[0], &d[0]] {
        assert_eq!(leg["ec_transfer_params"], want, "{leg}");
        assert_eq!(
            leg["messages"], client["messages"],
            "the items stay in the prompt"
        );
    }
    assert_eq!(p[0]["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!(d[0]["kv_transfer_params"]["do_remote_prefill"], true);
    assert_eq!(d[0]["stream"], true);

    assert_eq!(epd.disagg("e/p/d"), 1);
    assert_eq!(epd.disagg("p/d"), 0);
    assert_eq!(epd.encode_stages(), 1);
}

#[tokio::test]
async fn ec_example_waits_for_the_encoders_and_the_legs_carry_no_params() {
    let (e0, e1) = (encoder().await, encoder().await);
    let epd = Epd::start(EcConnector::Example, &[]).await;
    // Inline audio has no URL: the same clip twice is two items. Three items over two
    // encoders: the first gets items 0 and 2.
    let client = json!({
        "model": "sim-model", "temperature": 0.0,
        "messages": messages(&[image(CAT), audio(), audio()]),
        "max_completion_tokens": 4
    });
    let (resp, body) = epd
        .call(true, &[e0.api_addr(), e1.api_addr()], "ex-1", &client)
        .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        json(&body)["choices"][0]["message"]["content"],
        " t0 t1 t2 t3"
    );

    let (c0, c1) = (
        sim_requests_to(&e0, CHAT).await,
        sim_requests_to(&e1, CHAT).await,
    );
    assert_eq!((c0.len(), c1.len()), (2, 1), "{c0:#?} {c1:#?}");
    // The calls run at once: the first encoder's two may arrive in either order.
    for rec in &c0 {
        match record_header(rec, "x-request-id") {
            Some("ex-1-enc-0") => assert_encoder_call(rec, &client, &image(CAT), "ex-1-enc-0"),
            Some("ex-1-enc-2") => assert_encoder_call(rec, &client, &audio(), "ex-1-enc-2"),
            other => panic!("unexpected encoder call {other:?}: {rec}"),
        }
    }
    assert_encoder_call(&c1[0], &client, &audio(), "ex-1-enc-1");

    let (p, d) = legs(&epd).await;
    assert_eq!((p.len(), d.len()), (1, 1));
    for leg in [&p[0], &d[0]] {
        assert!(leg.get("ec_transfer_params").is_none(), "{leg}");
    }
    assert_eq!(epd.disagg("e/p/d"), 1);
    assert_eq!(epd.encode_stages(), 1);
}

#[tokio::test]
async fn a_failing_encoder_is_a_502_naming_it_and_nothing_is_prefilled() {
    let (e0, e1) = (encoder().await, encoder().await);
    sim_config(&e1, r#"{"faults":{"encode_http_503":true}}"#).await;
    let gone = dead_addr().await;
    let epd = Epd::start(EcConnector::Nixl, &[]).await;
    let client = json!({
        "model": "sim-model", "temperature": 0.5,
        "messages": messages(&[image(CAT), image(DOG)]), "max_tokens": 2
    });
    // An encoder answering 503, then one that refuses connections: the second item's.
    for (i, failing) in [e1.api_addr(), gone].into_iter().enumerate() {
        let (resp, body) = epd
            .call(
                true,
                &[e0.api_addr(), failing],
                &format!("bad-{i}"),
                &client,
            )
            .await;
        assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&body));
        assert_eq!(resp.headers()["content-type"], "application/json");
        let err = json(&body);
        assert_eq!(err["error"]["code"], 502, "{err}");
        assert_eq!(err["error"]["type"], "BadGatewayError", "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(&failing.to_string()), "{err}");
    }
    assert_eq!(
        sim_requests_to(&e1, CHAT).await.len(),
        1,
        "the 503 encoder was asked once"
    );
    let (p, d) = legs(&epd).await;
    assert!(p.is_empty() && d.is_empty(), "{p:?} {d:?}");

    // It keeps serving: with the encoder back, the same request goes through.
    sim_config(&e1, r#"{"faults":{"encode_http_503":false}}"#).await;
    let (resp, body) = epd
        .call(true, &[e0.api_addr(), e1.api_addr()], "good", &client)
        .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (p, d) = legs(&epd).await;
    assert_eq!((p.len(), d.len()), (1, 1));
    assert_eq!(
        d[0]["ec_transfer_params"].as_object().map(Map::len),
        Some(2),
        "{}",
        d[0]
    );
    assert_eq!(epd.encode_stages(), 3, "two failed stages and one that ran");
}

#[tokio::test]
async fn encoders_ssrf_protection_refuses_are_dropped_and_counted() {
    let (allowed, denied) = (encoder().await, encoder().await);
    let epd = Epd::start(EcConnector::Nixl, &[allowed.api_addr()]).await;
    let denied_total = || metric(&epd.metrics, "llm_d_sidecar_encoders_denied_total");
    let client = json!({
        "model": "sim-model", "temperature": 0.5,
        "messages": messages(&[image(CAT), image(DOG)]), "max_tokens": 2
    });
    // The refused one is dropped from the list: every item goes to the allowed one.
    let (resp, body) = epd
        .call(
            true,
            &[denied.api_addr(), allowed.api_addr()],
            "ssrf-1",
            &client,
        )
        .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sim_requests_to(&allowed, CHAT).await.len(), 2);
    assert_eq!(denied_total(), 1);
    let peer = peer(&allowed).await;
    let (p, d) = legs(&epd).await;
    for leg in [&p[0], &d[0]] {
        assert_eq!(
            leg["ec_transfer_params"],
            json!({mm_hash(CAT): peer, mm_hash(DOG): peer}),
            "{leg}"
        );
    }

    // All refused: plain P/D, no encoder called.
    let (resp, body) = epd
        .call(true, &[denied.api_addr()], "ssrf-2", &client)
        .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sim_requests_to(&allowed, CHAT).await.len(), 2);
    assert_eq!(denied_total(), 2);
    let (p, d) = legs(&epd).await;
    assert_eq!((p.len(), d.len()), (2, 2));
    for leg in [&p[1], &d[1]] {
        assert!(leg.get("ec_transfer_params").is_none(), "{leg}");
    }
    assert!(
        sim_requests_to(&denied, CHAT).await.is_empty(),
        "nothing is sent to a refused encoder"
    );
    assert_eq!((epd.disagg("e/p/d"), epd.disagg("p/d")), (1, 1));
    assert_eq!(epd.encode_stages(), 1);
}

#[tokio::test]
async fn a_decoder_only_chat_is_encoded_then_decoded_with_the_params() {
    let e = encoder().await;
    let epd = Epd::start(EcConnector::Nixl, &[]).await;
    let client = json!({
        "model": "sim-model", "temperature": 0.5,
        "messages": messages(&[image(CAT), audio()]), "max_tokens": 2
    });
    let (resp, body) = epd.call(false, &[e.api_addr()], "ed-1", &client).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["choices"][0]["message"]["content"], " t0 t1");

    // One encoder: both items on it, at once (either may arrive first).
    let calls = sim_requests_to(&e, CHAT).await;
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for rec in &calls {
        match record_header(rec, "x-request-id") {
            Some("ed-1-enc-0") => assert_encoder_call(rec, &client, &image(CAT), "ed-1-enc-0"),
            Some("ed-1-enc-1") => assert_encoder_call(rec, &client, &audio(), "ed-1-enc-1"),
            other => panic!("unexpected encoder call {other:?}: {rec}"),
        }
    }
    let peer = peer(&e).await;
    let (p, d) = legs(&epd).await;
    assert!(p.is_empty(), "no prefill without a prefiller: {p:?}");
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0]["ec_transfer_params"],
        json!({mm_hash(CAT): peer, mm_hash(AUDIO): peer}),
        "{}",
        d[0]
    );
    assert!(d[0].get("kv_transfer_params").is_none(), "{}", d[0]);
    assert_eq!(d[0]["messages"], client["messages"]);
    assert_eq!((epd.disagg("e/d"), epd.disagg("e/p/d")), (1, 0));
    assert_eq!(epd.encode_stages(), 1);
}
