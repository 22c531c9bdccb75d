//! Encoder-only instances (`--mm-encoder-only`, §7.23): one-token chat replies whose
//! `ec_transfer_params` name each multimodal item by its mm hash, the runtime encode delay
//! and failure, the request log of encoder calls, and the readiness line.

use crate::multimodal::media_parts;
use crate::support::*;
use crate::{CHAT, COMPLETIONS};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::time::{Duration, Instant};
use vllm_sim::{SimServer, MM_ITEM_TOKENS};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn encoder() -> SimServer {
    sim(|c| {
        c.mm_encoder_only = true;
        c.engine_id = Some("enc-0".into());
    })
    .await
}

/// The body the sidecar's E/PD fan-out sends an encoder: the client's body with one item.
fn encoder_body(item: &Value) -> String {
    json!({"model": "sim-model", "messages": [{"role": "user", "content": [item]}],
        "max_tokens": 1, "stream": false})
    .to_string()
}

#[tokio::test]
async fn encoder_reply_names_the_item_by_its_mm_hash() {
    bounded(async {
        let s = encoder().await;
        let url = "https://example.com/cat.png";
        let item = json!({"type": "image_url", "image_url": {"url": url}});
        let body = encoder_body(&item);
        let r = send(
            s.api_addr(),
            "POST",
            CHAT,
            &body,
            &[("x-request-id", "req-1-enc-0")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["content-type"], "application/json");
        let text = r.text();
        let peer = format!(
            r#"{{"peer_host":"127.0.0.1","peer_port":{},"engine_id":"enc-0"}}"#,
            s.side_channel_addr().port()
        );
        // The encoder's params are the last key, after the null `kv_transfer_params`.
        let tail = format!(
            r#""kv_transfer_params":null,"ec_transfer_params":{{"{}":{peer}}}}}"#,
            sha256_hex(url)
        );
        assert!(text.ends_with(&tail), "{text}");
        let v = r.json();
        assert_eq!(v["id"], "chatcmpl-req-1-enc-0");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], " t0");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 1);
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 4 + MM_ITEM_TOKENS);
        // Logged like any request: the call's body and its id header as received.
        let rec = last_logged(&s).await;
        assert_eq!(rec["path"], CHAT);
        assert_eq!(rec["body"], body);
        assert_eq!(rec["headers"]["x-request-id"], json!(["req-1-enc-0"]));
        assert_eq!(rec["class"], "plain");
        assert_eq!(rec["status"], 200);
        assert_eq!(rec["outcome"], "completed");
    })
    .await;
}

#[tokio::test]
async fn every_item_type_gets_one_entry_and_repeats_share_it() {
    bounded(async {
        let s = encoder().await;
        let mut content = vec![json!({"type": "text", "text": "compare these"})];
        content.extend(media_parts());
        content.push(media_parts()[0].clone());
        let body = json!({"messages": [{"role": "user", "content": content}],
            "max_completion_tokens": 1});
        let r = post(s.api_addr(), CHAT, &body.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let ec = v["ec_transfer_params"].as_object().expect("an object");
        let expected: Vec<String> = [
            "https://example.com/cat.png",
            "https://example.com/meow.wav",
            "https://example.com/cat.mp4",
            "UklGRiQAAABXQVZF",
        ]
        .iter()
        .map(|s| sha256_hex(s))
        .collect();
        let mut got: Vec<&String> = ec.keys().collect();
        got.sort();
        let mut want: Vec<&String> = expected.iter().collect();
        want.sort();
        assert_eq!(got, want);
        let engine = s.engine_id();
        for p in ec.values() {
            assert_eq!(
                *p,
                json!({"peer_host": "127.0.0.1", "peer_port": s.side_channel_addr().port(),
                    "engine_id": engine})
            );
        }
        // Five items counted (the repeat too), though four entries.
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 4 + 2 + 5 * MM_ITEM_TOKENS);
    })
    .await;
}

#[tokio::test]
async fn no_items_is_a_null_entry_and_other_modes_are_unchanged() {
    bounded(async {
        let s = encoder().await;
        let a = s.api_addr();
        // Text only: the same one-token reply, with the key present and null.
        let text_only = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        let r = post(a, CHAT, &text_only.to_string()).await;
        assert_eq!(r.status, 200);
        assert!(
            r.text().ends_with(r#""ec_transfer_params":null}"#),
            "{}",
            r.text()
        );
        // A streamed request is still answered in one body, one token.
        let body = json!({"messages": [{"role": "user", "content": [media_parts()[1]]}],
            "max_tokens": 5, "stream": true});
        let r = post(a, CHAT, &body.to_string()).await;
        assert_eq!(r.headers["content-type"], "application/json");
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 1);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["ec_transfer_params"].is_object(), "{v}");
        // The other routes generate as usual on an encoder.
        let r = post(a, COMPLETIONS, r#"{"prompt":"a","max_tokens":3}"#).await;
        let v = r.json();
        assert_eq!(v["choices"][0]["text"], " t0 t1 t2");
        assert!(v.get("ec_transfer_params").is_none(), "{v}");
        // A P/D instance answers the same multimodal request normally, without the key.
        let pd = sim(|_| {}).await;
        let r = post(pd.api_addr(), CHAT, &body.to_string()).await;
        assert_eq!(
            r.headers["content-type"],
            "text/event-stream; charset=utf-8"
        );
        assert!(!r.text().contains("ec_transfer_params"), "{}", r.text());
        let r = post(pd.api_addr(), CHAT, &encoder_body(&media_parts()[0])).await;
        let v = r.json();
        assert_eq!(v["choices"][0]["message"]["content"], " t0");
        assert!(v.get("ec_transfer_params").is_none(), "{v}");
        assert_eq!(state(&s).await["instance"]["mm_encoder_only"], true);
        assert_eq!(state(&pd).await["instance"]["mm_encoder_only"], false);
    })
    .await;
}

#[tokio::test]
async fn encode_delay_is_a_runtime_setting() {
    bounded(async {
        let s = encoder().await;
        let a = s.api_addr();
        let r = post(a, "/sim/config", r#"{"encode_delay_ms": 150}"#).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["config"]["encode_delay_ms"], 150);
        let body = encoder_body(&media_parts()[2]);
        let t0 = Instant::now();
        let r = post(a, CHAT, &body).await;
        assert_eq!(r.status, 200);
        // A sleep never ends early, so these lower bounds hold on any machine.
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert!(last_logged(&s).await["first_byte_ms"].as_u64() >= Some(150));
        // A long delay keeps the request in flight until the client leaves: an abort.
        post(a, "/sim/config", r#"{"encode_delay_ms": 600000}"#).await;
        let p = start(a, "POST", CHAT, &body, &[]).await;
        assert_eq!(wait(&s, "running", 5000).await.0, 200);
        p.disconnect().await;
        let (code, st) = wait(&s, "idle", 5000).await;
        assert_eq!(code, 200);
        assert_eq!(counter(&st, "requests_aborted.plain"), 1);
    })
    .await;
}

#[tokio::test]
async fn encoder_failure_is_injected_through_sim_config() {
    bounded(async {
        let s = encoder().await;
        let a = s.api_addr();
        let body = encoder_body(&media_parts()[3]);
        let r = post(a, "/sim/config", r#"{"faults": {"encode_http_503": true}}"#).await;
        assert_eq!(r.json()["faults"], json!({"encode_http_503": true}));
        let r = post(a, CHAT, &body).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["type"], "ServiceUnavailableError");
        assert_eq!(last_logged(&s).await["outcome"], "failed");
        post(
            a,
            "/sim/config",
            r#"{"faults": {"encode_http_503": false, "dead": true}}"#,
        )
        .await;
        let r = post(a, CHAT, &body).await;
        assert_eq!(r.status, 500);
        post(a, "/sim/config", r#"{"faults": null}"#).await;
        assert_eq!(post(a, CHAT, &body).await.status, 200);
        // It names the encoder's calls only: a P/D instance's plain chat is not hit.
        let pd = sim(|_| {}).await;
        post(
            pd.api_addr(),
            "/sim/config",
            r#"{"faults": {"encode_http_503": true}}"#,
        )
        .await;
        assert_eq!(post(pd.api_addr(), CHAT, &body).await.status, 200);
    })
    .await;
}

/// The binary's first stdout line, started with `args` and killed once it is read.
fn readiness_line(args: &[&str]) -> Value {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vllm-sim starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // The read blocks; on its own thread the wait for it can be bounded.
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a readiness line within the bound");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn readiness_line_says_when_it_is_an_encoder() {
    let v = readiness_line(&["--mm-encoder-only", "--encode-delay-ms", "5"]);
    assert_eq!(v["event"], "listening");
    assert_eq!(v["mm_encoder_only"], true);
    assert!(v["port"].as_u64().is_some_and(|p| p > 0), "{v}");
    let v = readiness_line(&[]);
    assert_eq!(v["event"], "listening");
    assert!(v.get("mm_encoder_only").is_none(), "{v}");
}
