//! The sglang and offloading connectors: the exact bytes of both legs, and sglang's
//! concurrent legs, where a failed prefill ends the decode instead of leaving it waiting.

use std::net::SocketAddr;

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;
use sidecar::{Config, Connector};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const OK_REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\":\"d\"}";

async fn sidecar(decoder: SocketAddr, connector: Connector) -> Sidecar {
    let mut config = Config::new(&decoder.to_string(), connector).unwrap();
    config.pairing_ports.sglang_bootstrap = 8998;
    config.pairing_ports.p2p = 7777;
    Sidecar::start(config).await
}

fn member(rec: &Recorded, key: &str) -> serde_json::Value {
    json(&rec.body)[key].clone()
}

#[tokio::test]
async fn sglang_sends_the_same_request_with_one_room_to_both_servers() {
    let mut p = Recorder::start(OK_REPLY).await;
    let mut d = Recorder::start(OK_REPLY).await;
    let sidecar = sidecar(d.addr, Connector::SgLang).await;
    let body = r#"{"model":"m","prompt":"hi","max_tokens":7,"stream":false,"bootstrap_room":1}"#;
    let (resp, reply) = call(sidecar.addr, post("/v1/completions", Some(p.addr), body)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&reply));
    let (prefill, decode) = (p.next().await, d.next().await);
    // Token limits and streaming as the client sent them: SGLang's prefill server stops
    // after the prefill by itself.
    assert_eq!(prefill.body, decode.body, "both legs carry the same bytes");
    let room = member(&prefill, "bootstrap_room");
    assert!(
        room.as_u64().is_some_and(|r| r != 1 && r < 1 << 63),
        "{room}"
    );
    let text = std::str::from_utf8(&prefill.body).unwrap();
    assert_eq!(
        text,
        format!(
            r#"{{"model":"m","prompt":"hi","max_tokens":7,"stream":false,"bootstrap_room":{room},"bootstrap_host":"127.0.0.1","bootstrap_port":8998}}"#
        )
    );
    assert_eq!(
        prefill.header("x-request-id"),
        decode.header("x-request-id")
    );
}

#[tokio::test]
async fn sglang_answers_a_failed_prefill_and_cancels_the_waiting_decode() {
    // The prefill server fails; the decode server (SGLang waiting on the room) never answers.
    let p = Recorder::start(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 38\r\n\r\n{\"error\":{\"message\":\"bootstrap down\"}}",
    )
    .await;
    let decoder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar = sidecar(decoder.local_addr().unwrap(), Connector::SgLang).await;
    let client = tokio::spawn(call(
        sidecar.addr,
        post("/v1/completions", Some(p.addr), r#"{"prompt":"hi"}"#),
    ));
    // The sidecar's readiness checks of vLLM (GET /health) come on connections of their own.
    let mut decode = loop {
        let (conn, _) = decoder.accept().await.unwrap();
        let mut start = [0u8; 4];
        let peeked = async {
            loop {
                match conn.peek(&mut start).await {
                    Ok(n) if n >= 4 => break true,
                    Ok(0) | Err(_) => break false,
                    Ok(_) => tokio::task::yield_now().await,
                }
            }
        };
        if tokio::time::timeout(LIMIT, peeked).await.unwrap_or(false) && &start != b"GET " {
            break conn;
        }
    };
    let (resp, reply) = client.await.unwrap();
    assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&reply));
    let error = json(&reply);
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("bootstrap down") && message.contains(&p.addr.to_string()),
        "{message}"
    );
    // The decode leg was closed rather than left waiting for a room nobody fills.
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, decode.read_to_end(&mut rest))
        .await
        .expect("the decode connection closes")
        .unwrap();
    assert!(String::from_utf8_lossy(&rest).starts_with("POST /v1/completions"));
}

#[tokio::test]
async fn offloading_names_the_id_the_prefill_used_and_the_prefillers_p2p_port() {
    let mut p = Recorder::start(OK_REPLY).await;
    let mut d = Recorder::start(OK_REPLY).await;
    let sidecar = sidecar(d.addr, Connector::Offloading).await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9,"kv_transfer_params":{"evil":1}}"#;
    let (resp, reply) = call(
        sidecar.addr,
        post("/v1/chat/completions", Some(p.addr), body),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&reply));
    let (prefill, decode) = (p.next().await, d.next().await);
    let id = member(&prefill, "kv_transfer_params")["remote_decoder"]["kv_request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        std::str::from_utf8(&prefill.body).unwrap(),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":1,"stream":false,"max_completion_tokens":1,"kv_transfer_params":{{"remote_decoder":{{"kv_request_id":"{id}"}}}}}}"#
        )
    );
    assert_eq!(
        std::str::from_utf8(&decode.body).unwrap(),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":9,"kv_transfer_params":{{"remote_prefiller":{{"kv_request_id":"{id}","remote_host":"127.0.0.1","remote_port":7777}}}}}}"#
        )
    );
}

/// sglang and offloading against simulated workers speaking them, on every P/D route:
/// replies whole and streamed, a client leaving during each leg, a failing prefill, and the
/// prefiller's KV accounting back to nothing held.
mod against_the_simulator {
    use super::*;
    use crate::routes::{
        complete, failing_prefill, leave_in_the_decode, leave_in_the_prefill, nothing_held, request,
    };
    use sidecar::api::Api;
    use vllm_sim::{Protocol, Role, SimServer};

    const CONNECTORS: [Connector; 3] = [
        Connector::SgLang,
        Connector::Offloading,
        Connector::Mooncake,
    ];

    async fn cast(connector: Connector, prefill_ms: u64) -> (SimServer, SimServer, Sidecar) {
        let (protocol, roles) = match connector {
            Connector::SgLang => (Protocol::Sglang, [Role::Prefill, Role::Decode]),
            Connector::Mooncake => (Protocol::Mooncake, [Role::Auto, Role::Auto]),
            _ => (Protocol::Offloading, [Role::Auto, Role::Auto]),
        };
        let tweak = |c: &mut vllm_sim::SimConfig, role| {
            c.protocol = protocol;
            c.role = role;
            c.bootstrap_timeout_ms = 2_000;
            c.p2p_load_timeout_ms = 2_000;
            // Long, so a lease left behind is seen rather than expired.
            c.abort_request_timeout_ms = 600_000;
        };
        let p = sim(|c| {
            tweak(c, roles[0]);
            c.ttft_ms = prefill_ms;
        })
        .await;
        let d = sim(|c| {
            tweak(c, roles[1]);
            c.itl_ms = 5;
        })
        .await;
        let mut config = Config::new(&d.api_addr().to_string(), connector).unwrap();
        config.pairing_ports.sglang_bootstrap = p.bootstrap_addr().port();
        config.pairing_ports.p2p = p.p2p_addr().port();
        config.pairing_ports.mooncake_bootstrap = p.bootstrap_addr().port();
        (p, d, Sidecar::start(config).await)
    }

    #[tokio::test]
    async fn every_route_hands_off_whole_and_streamed() {
        for connector in CONNECTORS {
            let (p, d, sidecar) = cast(connector, 5).await;
            for api in Api::ALL {
                for stream in [false, true] {
                    let what = format!("{} {} stream={stream}", connector.name(), api.path());
                    let req = post(api.path(), Some(p.api_addr()), &request(api, 6, stream));
                    let (resp, reply) = call(sidecar.addr, req).await;
                    let text = String::from_utf8_lossy(&reply);
                    assert_eq!(resp.status(), 200, "{what}: {text}");
                    assert!(complete(api, stream, &reply), "{what}: {text}");
                    nothing_held(&what, &p, &d).await;
                }
            }
            let state = sim_state(&p).await;
            assert_eq!(
                counter(&state, "leases_created"),
                10,
                "{}",
                connector.name()
            );
            assert_eq!(counter(&state, "leases_pulled"), 10, "{}", connector.name());
        }
    }

    #[tokio::test]
    async fn a_client_leaving_during_either_leg_leaves_nothing_held() {
        for connector in CONNECTORS {
            for api in Api::ALL {
                let what = format!("{} {}", connector.name(), api.path());
                leave_in_the_prefill(&what, cast(connector, 300).await, api).await;
                leave_in_the_decode(&what, cast(connector, 5).await, api).await;
            }
        }
    }

    #[tokio::test]
    async fn a_failing_prefill_is_the_answer() {
        for connector in CONNECTORS {
            let (p, d, sidecar) = cast(connector, 5).await;
            for api in Api::ALL {
                let what = format!("{} {}", connector.name(), api.path());
                failing_prefill(&what, (&p, &d, &sidecar), api, true).await;
            }
        }
    }

    #[tokio::test]
    async fn mooncake_names_one_transfer_and_finds_a_restarted_prefillers_engine() {
        let (p, d, sidecar) = cast(Connector::Mooncake, 5).await;
        let body = request(Api::Completions, 4, false);
        let (resp, _) = call(
            sidecar.addr,
            post(Api::Completions.path(), Some(p.api_addr()), &body),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let prefill = sim_requests(&p).await.pop().unwrap();
        let decode = sim_requests(&d).await.pop().unwrap();
        let (pb, db) = (record_body(&prefill), record_body(&decode));
        let transfer = pb["kv_transfer_params"]["transfer_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(transfer.starts_with("xfer-"), "{pb}");
        assert_eq!(
            pb["kv_transfer_params"],
            serde_json::json!({"do_remote_prefill": false, "do_remote_decode": true, "transfer_id": transfer})
        );
        assert_eq!(record_header(&prefill, "x-data-parallel-rank"), Some("0"));
        let engine = p.engine_id();
        assert_eq!(
            db["kv_transfer_params"],
            serde_json::json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "transfer_id": transfer,
                "remote_bootstrap_addr": format!("http://127.0.0.1:{}", p.bootstrap_addr().port()),
                "remote_engine_id": engine,
            })
        );
        assert_eq!(db["max_tokens"], 4, "the decode is the client's request");

        // The prefiller restarts with a new engine: the cached one fails a decode at most
        // once, then the bootstrap is asked again.
        sim_config(&p, r#"{"engine_id":"engine-after-restart"}"#).await;
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let (resp, _) = call(
                sidecar.addr,
                post(Api::Completions.path(), Some(p.api_addr()), &body),
            )
            .await;
            statuses.push(resp.status().as_u16());
        }
        assert_eq!(statuses, [500, 200], "the stale engine fails one decode");
        let db = record_body(&sim_requests(&d).await.pop().unwrap());
        assert_eq!(
            db["kv_transfer_params"]["remote_engine_id"],
            "engine-after-restart"
        );
    }
}

/// `-enable-p2p-pull` on nixlv2: the prefill names the scheduler's KV cache source, unless it
/// is the prefiller itself or SSRF protection refuses it; no upstream sees the header.
#[tokio::test]
async fn a_nixlv2_prefill_pulls_from_the_kv_cache_source_it_may_use() {
    const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 53\r\n\r\n{\"kv_transfer_params\":{\"remote_block_ids\":[1]},\"a\":1}";
    let mut p = Recorder::start(REPLY).await;
    let mut d = Recorder::start(OK_REPLY).await;
    // SSRF protection allows the prefiller and 10.1.2.3, not 10.9.9.9.
    let parsed = sidecar::cli::parse_from([
        "sidecar",
        "-connector=nixlv2",
        "-enable-p2p-pull",
        "-p2p-connector-port=7100",
        "-allowed-prefillers=127.0.0.1,10.1.2.3",
        // A pd-sidecar flag selects its profile, which serves TLS.
        "-secure-proxy=false",
    ])
    .unwrap();
    let mut config = Config::try_from(parsed).unwrap();
    config.decoder = sidecar::upstream::Target::http(d.addr.to_string().parse().unwrap());
    let sidecar = Sidecar::start(config).await;
    let prefiller = p.addr.to_string();
    for (source, pulled_from) in [
        ("10.1.2.3:8000", Some("10.1.2.3")),
        ("10.9.9.9:8000", None),
        (prefiller.as_str(), None),
        ("not a host", None),
    ] {
        let mut req = post("/v1/completions", Some(p.addr), r#"{"prompt":"hi"}"#);
        req.headers_mut()
            .insert("x-kv-cache-source-host-port", source.parse().unwrap());
        let (resp, reply) = call(sidecar.addr, req).await;
        assert_eq!(
            resp.status(),
            200,
            "{source}: {}",
            String::from_utf8_lossy(&reply)
        );
        let (prefill, decode) = (p.next().await, d.next().await);
        let params = member(&prefill, "kv_transfer_params");
        match pulled_from {
            Some(host) => {
                let src = &params["remote_kv_source"];
                assert_eq!(src["remote_host"], host, "{source}: {params}");
                assert_eq!(src["remote_port"], 7100, "{source}: {params}");
                assert_eq!(src["kv_request_id"].as_str().map(str::len), Some(36));
                assert_eq!(params["do_remote_decode"], true);
            }
            None => assert!(
                params.get("remote_kv_source").is_none(),
                "{source}: {params}"
            ),
        }
        for rec in [&prefill, &decode] {
            assert_eq!(rec.header("x-kv-cache-source-host-port"), None);
        }
    }
}

/// `-rewrite-cached-tokens`: a decoder older than vLLM 0.31 reports no prefix hits of the
/// prefiller; the sidecar writes them into the usage it relays, and changes nothing else.
#[tokio::test]
async fn the_prefillers_cached_tokens_reach_the_clients_usage_when_asked() {
    const PREFILL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 101\r\n\r\n{\"kv_transfer_params\":{\"remote_block_ids\":[1]},\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":7}}}";
    const DECODE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 48\r\n\r\n{\"id\":\"d\",\"usage\":{\"prompt_tokens\":9},\"x\":1e400}";
    for rewrite in [false, true] {
        let p = Recorder::start(PREFILL).await;
        let d = Recorder::start(DECODE).await;
        let mut config = Config::new(&d.addr.to_string(), Connector::NixlV2).unwrap();
        config.rewrite_cached_tokens = rewrite;
        let sidecar = Sidecar::start(config).await;
        let (resp, reply) = call(
            sidecar.addr,
            post("/v1/completions", Some(p.addr), r#"{"prompt":"hi"}"#),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let want: &[u8] = if rewrite {
            br#"{"id":"d","usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":7}},"x":1e400}"#
        } else {
            br#"{"id":"d","usage":{"prompt_tokens":9},"x":1e400}"#
        };
        assert_eq!(&reply[..], want, "rewrite={rewrite}");
    }
}

/// A sidecar from `flags` whose decoder is `decoder`.
async fn sidecar_with(decoder: SocketAddr, flags: &[&str]) -> Sidecar {
    let argv = ["sidecar", "-secure-proxy=false"].iter().chain(flags);
    let parsed = sidecar::cli::parse_with_env(argv, |_| None).unwrap();
    let mut config = Config::try_from(parsed).unwrap();
    config.decoder = sidecar::upstream::Target::http(decoder.to_string().parse().unwrap());
    Sidecar::start(config).await
}

/// No prefiller but a KV cache source: the decoder pulls the cached prefix itself, with
/// `kv_transfer_params` naming the source alone (the client's keys dropped), unless the
/// source is this pod's own endpoint, SSRF protection refuses it, or the connector has no
/// P2P tier.
#[tokio::test]
async fn a_decoder_only_request_pulls_from_the_kv_cache_source() {
    let mut d = Recorder::start(OK_REPLY).await;
    let pulling = [
        "-kv-connector=offloading",
        "-p2p-connector-port=7100",
        "-allowed-prefillers=10.1.2.3,10.0.0.5",
        "-pod-ip=10.0.0.5",
        "-port=8000",
    ];
    let offloading = sidecar_with(d.addr, &pulling).await;
    let nixlv2 = sidecar_with(d.addr, &["-kv-connector=nixlv2"]).await;
    let nixlv2_pull = sidecar_with(d.addr, &["-kv-connector=nixlv2", "-enable-p2p-pull"]).await;
    let body = r#"{"prompt":"hi","kv_transfer_params":{"remote_host":"evil"}}"#;
    for (sidecar, source, pulled_from) in [
        (&offloading, "10.1.2.3:8000", Some("10.1.2.3")),
        (&offloading, "10.0.0.5:8000", None),
        (&offloading, "10.0.0.5:8001", Some("10.0.0.5")),
        (&offloading, "10.9.9.9:8000", None),
        (&nixlv2, "10.1.2.3:8000", None),
        (&nixlv2_pull, "10.1.2.3:8000", Some("10.1.2.3")),
    ] {
        let mut req = post("/v1/completions", None, body);
        req.headers_mut()
            .insert("x-kv-cache-source-host-port", source.parse().unwrap());
        let (resp, reply) = call(sidecar.addr, req).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&reply));
        let decode = d.next().await;
        assert_eq!(decode.header("x-kv-cache-source-host-port"), None);
        let Some(host) = pulled_from else {
            // Passed through: only the client's own params are removed.
            assert_eq!(
                decode.body, br#"{"prompt":"hi"}"#,
                "{source}: passed through"
            );
            continue;
        };
        let params = member(&decode, "kv_transfer_params");
        let src = &params["remote_kv_source"];
        assert_eq!(src["remote_host"], host, "{source}: {params}");
        let port = if sidecar.addr == offloading.addr {
            7100
        } else {
            7777
        };
        assert_eq!(src["remote_port"], port, "{source}: {params}");
        let id = src["kv_request_id"].as_str().unwrap();
        assert_eq!(
            String::from_utf8(decode.body.clone()).unwrap(),
            format!(
                r#"{{"prompt":"hi","kv_transfer_params":{{"remote_kv_source":{{"kv_request_id":"{id}","remote_host":"{host}","remote_port":{port}}}}}}}"#
            )
        );
    }
}

/// An offloading prefill pulls from the KV cache source first, under its own id, and still
/// stores under the id the decoder is told.
#[tokio::test]
async fn an_offloading_prefill_pulls_from_the_kv_cache_source_under_its_own_id() {
    let mut p = Recorder::start(OK_REPLY).await;
    let mut d = Recorder::start(OK_REPLY).await;
    let sidecar = sidecar_with(
        d.addr,
        &[
            "-kv-connector=offloading",
            "-allowed-prefillers=127.0.0.1,10.1.2.3",
        ],
    )
    .await;
    let mut req = post("/v1/completions", Some(p.addr), r#"{"prompt":"hi"}"#);
    req.headers_mut().insert(
        "x-kv-cache-source-host-port",
        "10.1.2.3:8000".parse().unwrap(),
    );
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    let (prefill, decode) = (p.next().await, d.next().await);
    let sent = member(&prefill, "kv_transfer_params");
    let stored = sent["remote_decoder"]["kv_request_id"].as_str().unwrap();
    let pulled = &sent["remote_kv_source"];
    assert_eq!(pulled["remote_host"], "10.1.2.3", "{sent}");
    assert_eq!(pulled["remote_port"], 7777);
    assert_ne!(pulled["kv_request_id"], stored);
    let told = member(&decode, "kv_transfer_params");
    assert_eq!(told["remote_prefiller"]["kv_request_id"], stored);
    assert!(told.get("remote_kv_source").is_none(), "{told}");
}

/// Against simulated workers: a source that computed the prompt before saves the pulling
/// server its prefill, a fresh prompt is a miss, and nothing stays held. Decoder-only with
/// offloading, and a nixlv2 prefill under `-enable-p2p-pull`.
#[tokio::test]
async fn a_kv_cache_source_is_pulled_from_against_the_simulator() {
    const SEEN: &str = r#"{"model":"sim-model","prompt":"a prefix the source computed before, long enough for blocks","max_tokens":4}"#;
    const FRESH: &str = r#"{"model":"sim-model","prompt":"a prompt nobody has seen before, long enough for blocks","max_tokens":4}"#;
    for connector in [Connector::Offloading, Connector::NixlV2] {
        let protocol = connector.name().parse::<vllm_sim::Protocol>().unwrap();
        let source = sim(|c| c.protocol = protocol).await;
        let (resp, _) = call(source.api_addr(), post("/v1/completions", None, SEEN)).await;
        assert_eq!(resp.status(), 200);
        let p = sim(|c| c.protocol = protocol).await;
        let d = sim(|c| c.protocol = protocol).await;
        let mut config = Config::new(&d.api_addr().to_string(), connector).unwrap();
        config.p2p_pull = true;
        config.pairing_ports.p2p = source.p2p_addr().port();
        let sidecar = Sidecar::start(config).await;
        // Offloading pulls on the decoder alone; nixlv2 on its prefiller.
        let (prefiller, puller) = match connector {
            Connector::Offloading => (None, &d),
            _ => (Some(p.api_addr()), &p),
        };
        for (body, want) in [(SEEN, "hit"), (FRESH, "miss")] {
            let what = format!("{} {want}", connector.name());
            let mut req = post("/v1/completions", prefiller, body);
            req.headers_mut().insert(
                "x-kv-cache-source-host-port",
                source.api_addr().to_string().parse().unwrap(),
            );
            let (resp, reply) = call(sidecar.addr, req).await;
            let shown = String::from_utf8_lossy(&reply);
            assert_eq!(resp.status(), 200, "{what}: {shown}");
            assert_eq!(
                json(&reply)["choices"][0]["finish_reason"],
                "length",
                "{what}"
            );
            let pulled = sim_requests(puller).await.pop().unwrap();
            assert_eq!(pulled["p2p_source"], want, "{what}: {pulled}");
            crate::routes::nothing_held(&what, &p, &d).await;
            crate::routes::nothing_held(&what, &source, puller).await;
        }
        let state = sim_state(puller).await;
        assert_eq!(counter(&state, "p2p_source_hits"), 1, "{state}");
        assert_eq!(counter(&state, "p2p_source_misses"), 1, "{state}");
        let served = sim_state(&source).await;
        assert_eq!(
            counter(&served, "side_channel_in/p2p_source"),
            2,
            "{served}"
        );
        if connector == Connector::NixlV2 {
            assert_eq!(
                counter(&sim_state(&p).await, "leases_pulled"),
                2,
                "handed off"
            );
        }
    }
}
