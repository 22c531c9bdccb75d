//! Tokenize once (vllm#48145, SPEC.md §7.24): `return_token_ids` reports the prompt's and the
//! output's token ids, and a chat request given `kv_transfer_params.prompt_token_ids` takes
//! them as its prompt instead of rendering its messages.

use crate::support::*;
use crate::{CHAT, COMPLETIONS};
use serde_json::{json, Value};
use vllm_sim::{token_id, OutputMode, VOCAB_SIZE};

/// The decode leg as the sidecar's `-tokenize-once` builds it: P's params with P's
/// `prompt_token_ids` in front.
fn decode_with_ids(original: &Value, prj: &Value) -> String {
    let mut b = original.clone();
    let mut kv = serde_json::Map::new();
    kv.insert("prompt_token_ids".into(), prj["prompt_token_ids"].clone());
    kv.extend(prj["kv_transfer_params"].as_object().unwrap().clone());
    b["kv_transfer_params"] = Value::Object(kv);
    b.to_string()
}

fn prefill_asking_ids(original: &Value) -> String {
    let mut b: Value = serde_json::from_str(&prefill_body(original)).unwrap();
    b["return_token_ids"] = true.into();
    b.to_string()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_decode_given_the_prefills_ids_is_the_same_request() {
    bounded(async {
        // Echo mode, so the text depends on the prompt the decode ends up with.
        let p = sim(|c| c.mode = OutputMode::Echo).await;
        let d = sim(|c| c.mode = OutputMode::Echo).await;
        let original = json!({"messages": [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there, how are you?"}], "max_tokens": 4});

        let pr = post(p.api_addr(), CHAT, &prefill_asking_ids(&original)).await;
        assert_eq!(pr.status, 200, "{}", pr.text());
        let prj = pr.json();
        let prompt_ids = ids(&prj["prompt_token_ids"]);
        assert_eq!(
            prompt_ids.len() as u64,
            prj["usage"]["prompt_tokens"],
            "{prj}"
        );
        assert!(prompt_ids.iter().all(|&i| i < VOCAB_SIZE));
        // Echo mode's first output word is the first content token, "be".
        assert_eq!(prj["choices"][0]["message"]["content"], " be");
        assert_eq!(ids(&prj["choices"][0]["token_ids"]), vec![token_id("be")]);
        // vLLM's key order: the prompt's ids after prompt_logprobs, before the params.
        let text = pr.text();
        assert!(
            text.contains(r#""stop_reason":null,"token_ids":["#),
            "{text}"
        );
        assert!(
            text.contains(r#""prompt_logprobs":null,"prompt_token_ids":["#),
            "{text}"
        );
        assert!(text.contains(r#"],"kv_transfer_params":{"#), "{text}");

        // One decode reuses the ids, a second (of a second prefill) renders the messages.
        let with_ids = decode_with_ids(&original, &prj);
        let reused = post(d.api_addr(), CHAT, &with_ids).await;
        assert_eq!(reused.status, 200, "{}", reused.text());
        let logged = last_logged(&d).await;
        assert_eq!(
            logged["body"],
            with_ids.as_str(),
            "the body is logged as received"
        );
        assert_eq!(logged["prompt_token_ids"], "reused");
        let prj2 = prefilled(&p, CHAT, &original).await;
        let rendered = decoded(&d, CHAT, &original, &prj2).await;
        assert_eq!(rendered.status, 200, "{}", rendered.text());
        assert_eq!(last_logged(&d).await["prompt_token_ids"], Value::Null);

        let (a, b) = (reused.json(), rendered.json());
        assert_eq!(a["usage"], b["usage"]);
        assert_eq!(a["usage"]["prompt_tokens"], prj["usage"]["prompt_tokens"]);
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
        assert_eq!(
            a["choices"][0]["message"]["content"],
            " be brief hello there"
        );
        assert_eq!(a["choices"][0]["finish_reason"], "length");
        // Not asked for on the decode: the reply is the usual one (but for its random id).
        let id = |t: String, v: &Value| t.replace(v["id"].as_str().unwrap(), "ID");
        assert_eq!(id(reused.text(), &a), id(rendered.text(), &b));
        assert!(!reused.text().contains("token_ids"), "{}", reused.text());

        // Both pulls passed P's block and prompt checks.
        let (code, ps) = wait(&p, "idle_and_no_leases", 2000).await;
        assert_eq!(code, 200, "{ps}");
        assert_eq!(counter(&ps, "leases_pulled"), 2);
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "decode_completed"), 2);
        assert_eq!(counter(&ds, "prompt_token_ids_reused"), 1);
        assert_eq!(counter(&ds, "prompt_token_ids_ignored"), 0);
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 0);
    })
    .await;
}

#[tokio::test]
async fn return_token_ids_streams_the_prompt_on_the_first_chunk() {
    bounded(async {
        let s = sim(|_| {}).await;
        let chat = json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3,
            "return_token_ids": true});
        let whole = post(s.api_addr(), CHAT, &chat.to_string()).await.json();
        let prompt = ids(&whole["prompt_token_ids"]);
        let output = ids(&whole["choices"][0]["token_ids"]);
        assert_eq!(output, ["t0", "t1", "t2"].map(token_id).to_vec());

        let mut streamed = chat.clone();
        streamed["stream"] = true.into();
        let (status, evs) = frames(s.api_addr(), CHAT, &streamed.to_string(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(evs.len(), 5, "role, 3 tokens, [DONE]: {evs:?}");
        let first = sse_json(&evs[0]);
        assert_eq!(ids(&first["prompt_token_ids"]), prompt, "{first}");
        assert!(first["choices"][0].get("token_ids").is_none(), "{first}");
        let mut got = Vec::new();
        for ev in &evs[1..4] {
            let c = sse_json(ev);
            assert!(c.get("prompt_token_ids").is_none(), "{c}");
            got.extend(ids(&c["choices"][0]["token_ids"]));
        }
        assert_eq!(got, output);

        // Completions: the prompt's ids are in the choice.
        let cmpl = json!({"prompt": "one two three", "max_tokens": 2, "return_token_ids": true});
        let whole = post(s.api_addr(), COMPLETIONS, &cmpl.to_string()).await;
        let t = whole.text();
        assert!(
            t.contains(r#""stop_reason":null,"token_ids":["#)
                && t.contains(r#""prompt_logprobs":null,"prompt_token_ids":["#),
            "{t}"
        );
        let whole = whole.json();
        let prompt = ids(&whole["choices"][0]["prompt_token_ids"]);
        assert_eq!(prompt, ["one", "two", "three"].map(token_id).to_vec());
        let mut streamed = cmpl.clone();
        streamed["stream"] = true.into();
        let (_, evs) = frames(s.api_addr(), COMPLETIONS, &streamed.to_string(), &[]).await;
        let (c0, c1) = (sse_json(&evs[0]), sse_json(&evs[1]));
        assert_eq!(ids(&c0["choices"][0]["prompt_token_ids"]), prompt, "{c0}");
        assert!(c1["choices"][0].get("prompt_token_ids").is_none(), "{c1}");
        assert_eq!(ids(&c1["choices"][0]["token_ids"]), vec![token_id("t1")]);

        // A completions prompt given as ids reports them as they are.
        let given = json!({"prompt": [5, 6, 7], "max_tokens": 1, "return_token_ids": true});
        let r = post(s.api_addr(), COMPLETIONS, &given.to_string())
            .await
            .json();
        assert_eq!(ids(&r["choices"][0]["prompt_token_ids"]), vec![5, 6, 7]);

        // Without the flag nothing changes, streamed or not.
        let mut plain = chat.clone();
        plain.as_object_mut().unwrap().remove("return_token_ids");
        let r = post(s.api_addr(), CHAT, &plain.to_string()).await.text();
        assert!(!r.contains("token_ids"), "{r}");
        plain["stream"] = true.into();
        let (_, evs) = exchange(s.api_addr(), CHAT, &plain.to_string(), &[]).await;
        assert!(!evs.contains("token_ids"), "{evs}");
    })
    .await;
}

#[tokio::test]
async fn malformed_ids_are_rejected_and_p_is_told() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original = json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2});
        for bad in [json!([]), json!([1, true]), json!([-3]), json!([VOCAB_SIZE])] {
            let mut prj = prefilled(&p, CHAT, &original).await;
            prj["prompt_token_ids"] = bad.clone();
            let r = post(d.api_addr(), CHAT, &decode_with_ids(&original, &prj)).await;
            assert_eq!(r.status, 400, "{bad}");
            assert_eq!(
                r.text(),
                r#"{"error":{"message":"`kv_transfer_params['prompt_token_ids']` must be a non-empty list of non-negative integers.","type":"BadRequestError","param":"kv_transfer_params.prompt_token_ids","code":400}}"#
            );
        }
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "requests_rejected"), 4);
        assert_eq!(counter(&ds, "decode_reject_notifies_sent"), 4);
        assert_eq!(counter(&ds, "prompt_token_ids_reused"), 0);
        let (code, ps) = wait(&p, "no_leases", 2000).await;
        assert_eq!(code, 200, "{ps}");
        assert_eq!(counter(&ps, "leases_released_by_reject"), 4);
    })
    .await;
}

#[tokio::test]
async fn ids_are_ignored_with_echo_or_media() {
    bounded(async {
        let s = sim(|_| {}).await;
        let text = json!([{"role": "user", "content": "hi there"}]);
        let image = json!([{"role": "user", "content": [{"type": "text", "text": "hi there"},
            {"type": "image_url", "image_url": {"url": "http://img/1.png"}}]}]);
        let rendered = |m: &Value| {
            let b = json!({"messages": m, "max_tokens": 1});
            let s = &s;
            async move { post(s.api_addr(), CHAT, &b.to_string()).await.json()["usage"].clone() }
        };
        let (text_usage, image_usage) = (rendered(&text).await, rendered(&image).await);
        for (m, echo, usage) in [(&text, true, &text_usage), (&image, false, &image_usage)] {
            // Malformed too: ignored ids are not checked.
            for fwd in [json!([1, 2]), json!([])] {
                let b = json!({"messages": m, "echo": echo, "max_tokens": 1,
                    "kv_transfer_params": {"prompt_token_ids": fwd}});
                let r = post(s.api_addr(), CHAT, &b.to_string()).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(&r.json()["usage"], usage, "{b}");
                let logged = last_logged(&s).await;
                assert_eq!(logged["prompt_token_ids"], "ignored");
                assert_eq!(logged["body"], b.to_string());
            }
        }
        let st = state(&s).await;
        assert_eq!(counter(&st, "prompt_token_ids_ignored"), 4);
        assert_eq!(counter(&st, "prompt_token_ids_reused"), 0);
    })
    .await;
}

#[tokio::test]
async fn another_prompts_ids_fail_the_handoff() {
    bounded(async {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let original =
            json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2});
        let mut prj: Value = post(p.api_addr(), CHAT, &prefill_asking_ids(&original))
            .await
            .json();
        let mut wrong = ids(&prj["prompt_token_ids"]);
        wrong[3] = token_id("bye");
        prj["prompt_token_ids"] = json!(wrong);
        let r = post(d.api_addr(), CHAT, &decode_with_ids(&original, &prj)).await;
        // P's prompt check sees another prompt: a KV load failure, P's lease kept.
        assert_eq!(r.status, 500, "{}", r.text());
        let ds = state(&d).await;
        assert_eq!(counter(&ds, "prompt_token_ids_reused"), 1);
        assert_eq!(counter(&ds, "decode_kv_load_failures"), 1);
        let ps = state(&p).await;
        assert_eq!(ps["kv"]["leases_held"], 1, "{ps}");
    })
    .await;
}
