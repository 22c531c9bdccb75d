//! Invariants shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the corpus test
//! (`tests/fuzz_corpus.rs`), which both include this file with `#[path]`. It only uses the
//! `sidecar` library and crates the main crate already depends on, so the corpus test needs
//! nothing beyond the main build.
//!
//! Each check panics (with a message) when an invariant fails; "never panics" invariants are
//! checked by simply calling the code under test.

#![allow(dead_code)]

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use sidecar::api::Api;
use sidecar::connector::{Connector, Handoff, Pairing};
use sidecar::json_edit::{Edit, JsonObject};
use sidecar::security::allowlist::{Allowlist, Rule};

/// Separates the client's request from the prefiller's reply in a `json_edit` input. 0xFF
/// never occurs in UTF-8, so it cannot be part of a valid JSON request.
pub const REPLY_SEPARATOR: u8 = 0xFF;

/// Replies tried for every request besides the one in the input, if any: a NIXL v2 reply, a
/// NIXL v1 reply, and replies that make each connector fall back to a local prefill.
const CANNED_REPLIES: [&[u8]; 4] = [
    br#"{"id":"cmpl-1","kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[1,2,3],"remote_engine_id":"e","remote_host":"127.0.0.1","remote_port":5600,"tp_size":1}}"#,
    br#"{"id":"cmpl-1","remote_block_ids":[[1,2]],"remote_engine_id":"e","remote_host":"::1","remote_port":5600}"#,
    br#"{"id":"cmpl-1","kv_transfer_params":null}"#,
    br#"{}"#,
];

/// The sequential connectors (SGLang's body is the client's plus three fields, tested in its
/// own module).
const CONNECTORS: [Connector; 4] = [
    Connector::NixlV2,
    Connector::Nixl,
    Connector::SharedStorage,
    Connector::Offloading,
];

const NIXL_FIELDS: [&str; 7] = [
    "kv_transfer_params",
    "do_remote_decode",
    "do_remote_prefill",
    "remote_block_ids",
    "remote_engine_id",
    "remote_host",
    "remote_port",
];

/// Top-level keys a prefill rewrite may change (the API's one-token edits plus the
/// connector's own); every other key must come out with its exact raw value.
fn prefill_touched(api: Api, c: Connector) -> Vec<&'static str> {
    let nested: &[&str] = if api == Api::Generate {
        &["sampling_params"]
    } else {
        &[]
    };
    let pairing: &[&str] = if c == Connector::Offloading {
        &["kv_transfer_params"]
    } else {
        &[]
    };
    api.one_token_edits()
        .iter()
        .chain(c.prefill_edits())
        .map(|(k, _)| *k)
        .chain(nested.iter().chain(pairing).copied())
        .collect()
}

/// Each edit of `edits` holds in `out` (`input`: the client's members).
fn check_edits(
    what: &str,
    edits: &[(&str, Edit<'_>)],
    input: &HashMap<String, &RawValue>,
    out: &HashMap<String, &RawValue>,
) {
    for (key, edit) in edits {
        match edit {
            Edit::Remove => assert!(!out.contains_key(*key), "{what}: {key} left in"),
            Edit::Set(v) => assert_eq!(raw_of(out, key), Some(*v), "{what}: {key}"),
            Edit::Replace(v) if input.contains_key(*key) => {
                assert_eq!(raw_of(out, key), Some(*v), "{what}: {key}")
            }
            Edit::Replace(_) => assert!(!out.contains_key(*key), "{what}: {key} appeared"),
        }
    }
}

/// A shared-storage decode is the client's bytes, but for a `cache_hit_threshold` it set,
/// which becomes 0.
fn check_shared_storage_decode(
    what: &str,
    input: &HashMap<String, &RawValue>,
    body: &[u8],
    original: &[u8],
    strict: bool,
) {
    if !input.contains_key("cache_hit_threshold") {
        assert_eq!(body, original, "{what}: must be the client's bytes");
        return;
    }
    check_rewrite(what, input, body, &["cache_hit_threshold"], strict);
    let out = members(body).expect("checked above");
    assert_eq!(raw_of(&out, "cache_hit_threshold"), Some("0"), "{what}");
}

fn decode_touched(c: Connector) -> &'static [&'static str] {
    match c {
        Connector::NixlV2 => &["kv_transfer_params"],
        Connector::Nixl => &NIXL_FIELDS,
        Connector::SharedStorage => &["cache_hit_threshold"],
        Connector::Offloading => &["kv_transfer_params"],
        Connector::SgLang => &["bootstrap_host", "bootstrap_port", "bootstrap_room"],
        Connector::Mooncake => &["kv_transfer_params"],
    }
}

/// The top-level members of a JSON object as serde_json sees them: decoded key to the raw
/// text of its last occurrence (vLLM's json.loads keeps the last duplicate too). This is an
/// independent parse, not `JsonObject`'s.
fn members(doc: &[u8]) -> Result<HashMap<String, &RawValue>, serde_json::Error> {
    let doc = doc.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(doc);
    // serde's HashMap visitor overwrites on duplicates, so the last occurrence wins.
    serde_json::from_slice(doc)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned()
}

/// Whether serde_json can build a `Value` from `doc`: it cannot for numbers out of f64's range
/// (`1e400`), lone surrogate escapes or nesting deeper than 128, all of which the sidecar
/// passes through verbatim (vLLM's Python `json.loads` accepts them).
fn strict_json(doc: &[u8]) -> bool {
    let doc = doc.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(doc);
    serde_json::from_slice::<serde_json::Value>(doc).is_ok()
}

/// `out` is one syntactically valid JSON object (and a valid `serde_json::Value` when `strict`,
/// i.e. when its inputs were), every key of `input` not in `touched` has exactly its raw
/// value from `input`, and no key appears in `out` that was neither in `input` nor touched.
fn check_rewrite(
    what: &str,
    input: &HashMap<String, &RawValue>,
    out: &[u8],
    touched: &[&str],
    strict: bool,
) {
    if let Err(e) = serde_json::from_slice::<&RawValue>(out) {
        panic!("{what}: output is not valid JSON ({e}): {}", show(out));
    }
    if strict {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(out) {
            panic!(
                "{what}: output is not a valid serde_json Value ({e}): {}",
                show(out)
            );
        }
    }
    let out_members =
        members(out).unwrap_or_else(|e| panic!("{what}: output is not an object ({e})"));
    for (key, raw) in input {
        if touched.contains(&key.as_str()) {
            continue;
        }
        match out_members.get(key) {
            Some(v) if v.get() == raw.get() => {}
            Some(v) => panic!(
                "{what}: key {key:?} changed from {} to {}",
                raw.get(),
                v.get()
            ),
            None => panic!("{what}: key {key:?} was dropped"),
        }
    }
    for key in out_members.keys() {
        assert!(
            input.contains_key(key) || touched.contains(&key.as_str()),
            "{what}: key {key:?} appeared from nowhere"
        );
    }
}

fn raw_of<'a>(m: &'a HashMap<String, &RawValue>, key: &str) -> Option<&'a str> {
    m.get(key).map(|v| v.get())
}

/// The `json_edit` target: `input` is a request body, optionally followed by
/// [`REPLY_SEPARATOR`] and a prefiller reply.
pub fn check_json_edit(input: &[u8]) {
    let (request, reply) = match input.iter().position(|&b| b == REPLY_SEPARATOR) {
        Some(i) => (&input[..i], Some(&input[i + 1..])),
        None => (input, None),
    };
    let original = Bytes::copy_from_slice(request);
    let Ok(obj) = JsonObject::parse(&original) else {
        // A body the sidecar rejects (400) must be one vLLM would reject too: not an object.
        if let Ok(m) = members(request) {
            panic!(
                "JsonObject::parse rejected an object serde_json accepts ({} keys): {}",
                m.len(),
                show(request)
            );
        }
        return;
    };
    let input_members = members(&original).unwrap_or_else(|e| {
        panic!(
            "JsonObject::parse accepted what serde_json rejects as an object ({e}): {}",
            show(request)
        )
    });
    for (key, raw) in &input_members {
        assert_eq!(
            obj.get(key).map(|v| v.get()),
            Some(raw.get()),
            "JsonObject::get({key:?}) disagrees with serde_json"
        );
    }

    // Borrowing members from the client's buffer must not change a byte of the result.
    let edits = [
        ("stream", Edit::Set("false")),
        ("stream_options", Edit::Remove),
        ("max_tokens", Edit::Set("1")),
        ("n", Edit::Remove),
        ("kv_transfer_params", Edit::Set("{}")),
    ];
    assert_eq!(
        obj.rewrite_borrowing(&edits, 0).to_vec(),
        obj.rewrite_borrowing(&edits, usize::MAX).to_vec(),
        "borrowed and copied rewrites differ: {}",
        show(request)
    );

    let strict = strict_json(request);
    for c in CONNECTORS {
        let name = c.name();
        for api in Api::ALL {
            let prefill = c
                .prefill_body(api, &obj, &Pairing::default(), "127.0.0.1")
                .to_bytes();
            let what = format!("{name} {} prefill_body", api.path());
            check_rewrite(
                &what,
                &input_members,
                &prefill,
                &prefill_touched(api, c),
                strict,
            );
            let p = members(&prefill).expect("checked above");
            check_edits(&what, api.one_token_edits(), &input_members, &p);
            check_edits(&what, c.prefill_edits(), &input_members, &p);
            if api == Api::Generate {
                check_sampling_params(&what, &input_members, &p);
            }
        }

        let local = c.local_decode_body(&obj, &original).to_bytes();
        let what = format!("{name} local_decode_body");
        if c == Connector::SharedStorage {
            check_shared_storage_decode(&what, &input_members, &local, &original, strict);
        } else {
            check_rewrite(&what, &input_members, &local, decode_touched(c), strict);
            let l = members(&local).expect("checked above");
            for gone in decode_touched(c) {
                assert!(!l.contains_key(*gone), "{what}: {gone} left in");
            }
        }

        for r in CANNED_REPLIES.iter().copied().chain(reply) {
            check_decode(c, &obj, &original, &input_members, r, strict);
        }
    }
}

fn check_decode(
    c: Connector,
    obj: &JsonObject<'_>,
    original: &Bytes,
    input: &HashMap<String, &RawValue>,
    reply: &[u8],
    strict: bool,
) {
    let what = format!("{} decode_plan", c.name());
    let reply = Bytes::copy_from_slice(reply);
    let Ok(plan) = c.decode_plan(obj, original, &reply, &Pairing::default(), "127.0.0.1") else {
        assert!(
            c != Connector::SharedStorage,
            "{what}: lmcache never reads the reply"
        );
        return;
    };
    if c == Connector::SharedStorage {
        let body = plan.body.to_bytes();
        check_shared_storage_decode(&what, input, &body, original, strict);
        assert_eq!(plan.handoff, Handoff::SharedStorage);
        return;
    }
    let body = plan.body.to_bytes();
    check_rewrite(
        &what,
        input,
        &body,
        decode_touched(c),
        strict && strict_json(&reply),
    );
    let d = members(&body).expect("checked above");
    if c == Connector::Offloading {
        // The pull's address is the sidecar's, never the client's or the reply's.
        let params = raw_of(&d, "kv_transfer_params");
        assert!(
            params.is_some_and(|v| v.starts_with(r#"{"remote_prefiller":"#)),
            "{what}: kv_transfer_params {params:?}"
        );
        return;
    }
    // Only the prefiller's reply may set the transfer fields.
    let r = JsonObject::parse(&reply).expect("decode_plan accepted the reply");
    match c {
        Connector::NixlV2 => {
            let from_reply = r.get("kv_transfer_params").map(|v| v.get());
            match plan.handoff {
                Handoff::Remote => assert_eq!(
                    raw_of(&d, "kv_transfer_params"),
                    from_reply,
                    "{what}: kv_transfer_params not the reply's"
                ),
                _ => assert!(
                    matches!(raw_of(&d, "kv_transfer_params"), None | Some("null")),
                    "{what}: client's kv_transfer_params forwarded"
                ),
            }
        }
        Connector::Nixl => {
            for key in &NIXL_FIELDS[3..] {
                let got = raw_of(&d, key);
                if plan.handoff == Handoff::Remote {
                    assert_eq!(got, r.get(key).map(|v| v.get()), "{what}: {key}");
                } else {
                    assert_eq!(got, None, "{what}: {key} without a complete reply");
                }
            }
            assert!(
                !d.contains_key("kv_transfer_params"),
                "{what}: kv_transfer_params"
            );
        }
        Connector::SharedStorage
        | Connector::SgLang
        | Connector::Offloading
        | Connector::Mooncake => {
            unreachable!()
        }
    }
}

/// The `headers` target: the input's lines are, in order, an `x-prefiller-host-port` value, an
/// `x-prefiller-url` value, an `-allowed-prefillers` rule, a duration and a size (missing lines
/// are absent headers / empty strings). The first byte's low bit picks `-prefiller-use-tls`.
pub fn check_headers(input: &[u8]) {
    let tls = input.first().is_some_and(|b| b & 1 == 1);
    let mut lines = input.split(|&b| b == b'\n');
    let host_port = lines.next().unwrap_or_default();
    let url = lines.next();
    let rule = lines.next().unwrap_or_default();
    let duration = lines.next().unwrap_or_default();
    let size = lines.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-prefiller-host-port", Some(host_port)),
        ("x-prefiller-url", url),
    ] {
        let Some(value) = value else { continue };
        // Invalid header bytes never reach the sidecar: hyper rejects them first.
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }

    let mut targets = Vec::new();
    for tls in [tls, !tls] {
        let first = sidecar::upstream::prefillers_from(&headers, tls)
            .ok()
            .and_then(|l| l.into_iter().next());
        if let Some(Ok(target)) = first {
            assert!(!target.host().is_empty(), "empty host from {headers:?}");
            let uri = target.uri(None);
            assert_eq!(
                uri.authority().map(|a| a.as_str()),
                Some(target.authority()),
                "uri lost the authority: {headers:?}"
            );
            let _ = target.port();
            targets.push(target);
        }
    }

    let rule_text = String::from_utf8_lossy(rule);
    let rules: Vec<Rule> = rule_text
        .split(',')
        .filter_map(|r| r.parse::<Rule>().ok())
        .collect();
    let allowlist = Allowlist::new(rules, None);
    for target in &targets {
        let _ = allowlist.allows(target);
        assert!(Allowlist::disabled().allows(target));
    }

    let _ = sidecar::cli::parse_duration(&String::from_utf8_lossy(duration));
    let _ = sidecar::cli::parse_size(&String::from_utf8_lossy(size));
    // Each text alone too, so a one-line input exercises every parser.
    let whole = String::from_utf8_lossy(input);
    let _ = whole.parse::<Rule>();
    let _ = sidecar::cli::parse_duration(&whole);
    let _ = sidecar::cli::parse_size(&whole);
}

/// The generate API's prefill caps `sampling_params` to one token, creating it if absent or
/// null, and leaves a value that is not an object for vLLM to refuse.
fn check_sampling_params(
    what: &str,
    input: &HashMap<String, &RawValue>,
    out: &HashMap<String, &RawValue>,
) {
    let before = raw_of(input, "sampling_params").map(str::trim);
    let after = raw_of(out, "sampling_params").expect("sampling_params is always there");
    match before {
        Some(v) if !v.starts_with('{') && v != "null" => {
            assert_eq!(after, v, "{what}: a non-object sampling_params changed")
        }
        _ => {
            let params = members(after.as_bytes()).expect("an object");
            assert_eq!(
                raw_of(&params, "max_tokens"),
                Some("1"),
                "{what}: sampling_params.max_tokens"
            );
            for gone in ["min_tokens", "n", "best_of"] {
                assert!(!params.contains_key(gone), "{what}: sampling_params.{gone}");
            }
        }
    }
}
