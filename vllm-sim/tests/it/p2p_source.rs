//! P2P prefix pull from a KV source (§7.22): a request whose `kv_transfer_params` name a
//! `remote_kv_source` asks that instance's side channel (`POST /p2p/source`) before its
//! prefill; a hit waits the transfer time instead. No lease on either side.

use crate::support::*;
use crate::{CHAT, COMPLETIONS};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use vllm_sim::{Protocol, SimConfig, SimServer};

fn source_block(addr: SocketAddr, k: &str) -> Value {
    json!({"kv_request_id": k, "remote_host": addr.ip().to_string(), "remote_port": addr.port()})
}

/// `body` with `kv_transfer_params.remote_kv_source` naming `addr` (llm-d's decoder-only
/// path with a source header: the block alone).
fn pulling(body: &Value, addr: SocketAddr, k: &str) -> String {
    let mut b = body.clone();
    if !b["kv_transfer_params"].is_object() {
        b["kv_transfer_params"] = json!({});
    }
    b["kv_transfer_params"]["remote_kv_source"] = source_block(addr, k);
    b.to_string()
}

async fn offl(tweak: impl FnOnce(&mut SimConfig)) -> SimServer {
    sim(|c| {
        c.protocol = Protocol::Offloading;
        tweak(c);
    })
    .await
}

fn prompt(text: &str) -> Value {
    json!({"prompt": text, "max_tokens": 2})
}

fn pulls(s: &Value) -> [u64; 3] {
    [
        counter(s, "p2p_source_hits"),
        counter(s, "p2p_source_misses"),
        counter(s, "p2p_source_errors"),
    ]
}

/// A peer that answers every request with status 200 and `body`.
async fn fixed_answer(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(body.as_bytes()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A peer that accepts one connection and never answers: reports the accept, then the
/// connection's end (the puller dropping its lookup).
async fn black_hole() -> (SocketAddr, oneshot::Receiver<()>, oneshot::Receiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (acc_tx, acc) = oneshot::channel();
    let (eof_tx, eof) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = acc_tx.send(());
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    (addr, acc, eof)
}

#[tokio::test]
async fn hit_waits_the_transfer_instead_of_the_prefill() {
    bounded(async {
        let source = offl(|_| {}).await;
        // A prefill this long would outlast the assertions: a hit must not wait for it.
        let d = offl(|c| {
            c.ttft_ms = 10_000;
            c.kv_transfer_ms = 1;
        })
        .await;
        let src = source.p2p_addr();
        // The source computes the prompts first (plain requests, completed).
        let completion = prompt("shared prefix words");
        let mut chat = json!({"messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 2});
        for (path, b) in [(COMPLETIONS, &completion), (CHAT, &chat)] {
            assert_eq!(
                post(source.api_addr(), path, &b.to_string()).await.status,
                200
            );
        }
        let r = post(d.api_addr(), COMPLETIONS, &pulling(&completion, src, "k1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], " t0 t1");
        // Cached tokens are not reported: the sim reports none anywhere (§7.22).
        assert_eq!(r.json()["usage"]["prompt_tokens_details"], Value::Null);
        let logged = last_logged(&d).await;
        assert_eq!(logged["p2p_source"], "hit");
        assert_eq!(logged["class"], "plain");
        assert!(
            logged["first_byte_ms"].as_u64().unwrap() < 10_000,
            "{logged}"
        );

        chat["stream"] = true.into();
        let (status, text) = exchange(d.api_addr(), CHAT, &pulling(&chat, src, "k2"), &[]).await;
        assert_eq!(status, 200);
        assert!(route_reply_ok(CHAT, true, &text), "{text}");
        assert_eq!(last_logged(&d).await["p2p_source"], "hit");

        let ds = state(&d).await;
        assert_eq!(pulls(&ds), [2, 0, 0]);
        assert_eq!(counter(&ds, "side_channel_errors"), 0);
        let (code, ss) = wait(&source, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&ss, "side_channel_in.p2p_source"), 2);
        assert_eq!(counter(&ss, "leases_created"), 0);
        assert_eq!(wait(&d, "idle_and_no_leases", 2000).await.0, 200);
    })
    .await;
}

#[tokio::test]
async fn miss_prefills_in_full_and_the_puller_becomes_a_source() {
    bounded(async {
        let source = offl(|_| {}).await;
        let d = offl(|c| {
            c.ttft_ms = 200;
            c.kv_transfer_ms = 1;
        })
        .await;
        // The source has computed another prompt only.
        let other = prompt("something else");
        assert_eq!(
            post(source.api_addr(), COMPLETIONS, &other.to_string())
                .await
                .status,
            200
        );
        let wanted = prompt("the wanted prompt");
        let r = post(
            d.api_addr(),
            COMPLETIONS,
            &pulling(&wanted, source.p2p_addr(), "k"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], " t0 t1");
        let logged = last_logged(&d).await;
        assert_eq!(logged["p2p_source"], "miss");
        assert!(logged["first_byte_ms"].as_u64().unwrap() >= 200, "{logged}");
        assert_eq!(pulls(&state(&d).await), [0, 1, 0]);
        assert_eq!(
            counter(&state(&source).await, "side_channel_in.p2p_source"),
            1
        );
        // `d` computed it in full, so now it is the source a third instance hits.
        let e = offl(|_| {}).await;
        let r = post(
            e.api_addr(),
            COMPLETIONS,
            &pulling(&wanted, d.p2p_addr(), "k"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(last_logged(&e).await["p2p_source"], "hit");
        assert_eq!(counter(&state(&d).await, "side_channel_in.p2p_source"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_failed_lookup_prefills_in_full() {
    bounded(async {
        let d = offl(|c| {
            c.ttft_ms = 100;
            c.kv_transfer_ms = 1;
        })
        .await;
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let other = sim(|_| {}).await;
        let malformed = fixed_answer(r#"{"hit":"yes","tokens":3}"#).await;
        let body = prompt("a b c");
        // A closed port, a path the peer does not serve (its API port: 404), a bad answer.
        for addr in [closed, other.api_addr(), malformed] {
            let r = post(d.api_addr(), COMPLETIONS, &pulling(&body, addr, "k")).await;
            assert_eq!(r.status, 200, "{addr}: {}", r.text());
            assert_eq!(r.json()["choices"][0]["text"], " t0 t1");
            let logged = last_logged(&d).await;
            assert_eq!(logged["p2p_source"], "error", "{addr}");
            assert!(logged["first_byte_ms"].as_u64().unwrap() >= 100, "{logged}");
        }
        let ds = state(&d).await;
        assert_eq!(pulls(&ds), [0, 0, 3]);
        // Only the transport failure is a side-channel error.
        assert_eq!(counter(&ds, "side_channel_errors"), 1);
        assert_eq!(counter(&ds, "plain_completed"), 3);
    })
    .await;
}

#[tokio::test]
async fn a_malformed_block_follows_on_invalid_kv_params() {
    bounded(async {
        let d = offl(|_| {}).await;
        let n = sim(|_| {}).await;
        let good = source_block("127.0.0.1:9".parse().unwrap(), "k");
        let mut no_port = good.clone();
        no_port.as_object_mut().unwrap().remove("remote_port");
        let mut port_str = good.clone();
        port_str["remote_port"] = "9".into();
        let mut no_id = good.clone();
        no_id["kv_request_id"] = "".into();
        let blocks = [no_port, port_str, no_id, json!("127.0.0.1:9"), json!({})];
        let with = |kv: Value| {
            let mut b = prompt("a b");
            b["kv_transfer_params"] = kv;
            b.to_string()
        };
        for blk in &blocks {
            let r = post(
                d.api_addr(),
                COMPLETIONS,
                &with(json!({"remote_kv_source": blk})),
            )
            .await;
            assert_eq!(r.status, 400, "{blk}: {}", r.text());
            let e = &r.json()["error"];
            assert_eq!(e["type"], "BadRequestError");
            assert_eq!(e["param"], "kv_transfer_params");
            assert!(
                e["message"].as_str().unwrap().contains("remote_kv_source"),
                "{e}"
            );
        }
        // nixlv2: beside a prefill's do_remote_decode too.
        let mut pre: Value = serde_json::from_str(&prefill_body(&prompt("a b"))).unwrap();
        pre["kv_transfer_params"]["remote_kv_source"] = blocks[0].clone();
        let r = post(n.api_addr(), COMPLETIONS, &pre.to_string()).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(
            counter(&state(&d).await, "decode_invalid_kv_params"),
            blocks.len() as u64
        );
        let ns = state(&n).await;
        assert_eq!(counter(&ns, "decode_invalid_kv_params"), 1);
        assert_eq!(counter(&ns, "leases_created"), 0);

        // recompute: served without the pull, the prefill's lease as usual.
        for s in [&d, &n] {
            let r = post(
                s.api_addr(),
                "/sim/config",
                r#"{"on_invalid_kv_params":"recompute"}"#,
            )
            .await;
            assert_eq!(r.status, 200);
        }
        let r = post(
            d.api_addr(),
            COMPLETIONS,
            &with(json!({"remote_kv_source": blocks[1]})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(last_logged(&d).await["p2p_source"], Value::Null);
        let r = post(n.api_addr(), COMPLETIONS, &pre.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["kv_transfer_params"]["do_remote_prefill"], true);
        assert_eq!(last_logged(&n).await["p2p_source"], Value::Null);
        let (ds, ns) = (state(&d).await, state(&n).await);
        assert_eq!(pulls(&ds), [0, 0, 0]);
        assert_eq!(pulls(&ns), [0, 0, 0]);
        assert_eq!(
            counter(&ds, "decode_invalid_kv_params"),
            blocks.len() as u64 + 1
        );
        assert_eq!(counter(&ns, "leases_created"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_during_the_pull_leaves_nothing_held() {
    bounded(async {
        let n = sim(|_| {}).await;
        let o = offl(|_| {}).await;
        let pre: Value = serde_json::from_str(&prefill_body(&prompt("a b c"))).unwrap();
        let mut chat = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
        chat["max_tokens"] = 3.into();
        for (s, path, body, class) in [
            (&n, COMPLETIONS, &pre, "prefill"),
            (&o, CHAT, &chat, "plain"),
        ] {
            let (src, accepted, eof) = black_hole().await;
            let pending = start(s.api_addr(), "POST", path, &pulling(body, src, "k"), &[]).await;
            accepted.await.unwrap();
            pending.disconnect().await;
            // The puller drops its lookup: the source sees the connection end.
            eof.await.unwrap();
            let (code, st) = wait(s, "idle_and_no_leases", 2000).await;
            assert_eq!(code, 200, "{st}");
            assert_eq!(counter(&st, &format!("requests_aborted.{class}")), 1);
            assert_eq!(counter(&st, "leases_created"), 0);
            assert_eq!(st["kv"]["free_blocks"], st["kv"]["total_blocks"]);
            assert_eq!(st["kv"]["invariants_ok"], true);
            assert_eq!(pulls(&st), [0, 0, 0]);
            let logged = last_logged(s).await;
            assert_eq!(logged["outcome"], "aborted");
            assert_eq!(logged["p2p_source"], Value::Null);
        }
    })
    .await;
}

#[tokio::test]
async fn a_nixlv2_prefill_with_a_source_keeps_its_params_and_lease() {
    bounded(async {
        let source = sim(|_| {}).await;
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = prompt("one two three four");
        assert_eq!(
            post(source.api_addr(), COMPLETIONS, &original.to_string())
                .await
                .status,
            200
        );
        // A plain prefill on `p` first, as the reference for the params' shape.
        let plain = prefilled(&p, COMPLETIONS, &original).await;
        let mut pre: Value = serde_json::from_str(&prefill_body(&original)).unwrap();
        pre["kv_transfer_params"]["remote_kv_source"] = source_block(source.p2p_addr(), "k");
        let pr = post(p.api_addr(), COMPLETIONS, &pre.to_string()).await;
        assert_eq!(pr.status, 200, "{}", pr.text());
        let prj = pr.json();
        assert_eq!(last_logged(&p).await["p2p_source"], "hit");
        let (a, b) = (&plain["kv_transfer_params"], &prj["kv_transfer_params"]);
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(a), keys(b));
        for k in keys(a) {
            if !matches!(k.as_str(), "remote_request_id" | "remote_block_ids") {
                assert_eq!(a[&k], b[&k], "{k}");
            }
        }
        assert_eq!(b["remote_port"], p.side_channel_addr().port());
        assert_eq!(b["remote_num_tokens"], 4);
        assert_eq!(prj["choices"][0]["finish_reason"], "length");
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_created"), 2);
        assert_eq!(pulls(&ps), [1, 0, 0]);
        // The decoder pulls those params as usual.
        let dr = decoded(&d, COMPLETIONS, &original, &prj).await;
        assert_eq!(dr.status, 200, "{}", dr.text());
        assert_eq!(dr.json()["choices"][0]["text"], " t0 t1");
        assert_eq!(last_logged(&d).await["p2p_source"], Value::Null);
        let ps = state(&p).await;
        assert_eq!(counter(&ps, "leases_pulled"), 1);
        assert_eq!(ps["kv"]["leases_held"], 1);
        assert_eq!(
            counter(&state(&source).await, "side_channel_in.p2p_source"),
            1
        );
    })
    .await;
}
