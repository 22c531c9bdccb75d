//! Transfer parameters a client sent, removed before its request reaches vLLM.
//!
//! vLLM trusts what it finds in a request's `kv_transfer_params`: with `do_remote_prefill`
//! set it reports `remote_prefill_cached_tokens` as the request's cached tokens (billing,
//! unclamped), and its NIXL connector pulls KV blocks from the `remote_host`/`remote_port`
//! named there. Only the sidecar (or a gateway in front of it, `-trust-client-kv-params`)
//! may set them, so on every inference route the client's are removed:
//!
//! - top-level `kv_transfer_params` and `ec_transfer_params`;
//! - top-level fields named `remote_*` or `do_remote_*` (llm-d's NIXL v1 protocol);
//! - `vllm_xargs.kv_transfer_params` and `vllm_xargs.ec_transfer_params`: vLLM copies
//!   `vllm_xargs` into `SamplingParams.extra_args`, where the engine reads both. Its schema
//!   keeps their values from being objects, but a string or list there still reaches the
//!   connectors (with no top-level parameters to override it), which call `.get` on it;
//! - on `/inference/v1/generate`, `sampling_params.extra_args.kv_transfer_params` and
//!   `sampling_params.extra_args.ec_transfer_params` (the same place, written directly).
//!
//! Most bodies hold none of the names: [`strip`] looks for them in the raw bytes first
//! ([`may_carry`]) and leaves such a body untouched, unparsed. A key may be spelled with `\u`
//! escapes, so a body with any `\u` is parsed too. The rewrite keeps every other byte as it
//! came ([`JsonObject::rewrite`]).
//!
//! A body that may hold the names but that our parser cannot read is refused rather than
//! forwarded: Python's `json.loads`, which vLLM uses, reads more than JSON (`NaN`,
//! `Infinity`, UTF-16 and UTF-32 bodies), so forwarding it would forward the parameters too.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use memchr::memmem;
use serde_json::value::RawValue;
use tracing::warn;

use crate::api::Api;
use crate::error::ProxyError;
use crate::json_edit::{Edit, JsonObject, ParseError, Spliced};
use crate::observe::metrics::Metrics;

/// What was removed, as `client_params_removed_total`'s `field` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Top-level `kv_transfer_params`.
    KvTransferParams,
    /// Top-level `ec_transfer_params`.
    EcTransferParams,
    /// Top-level `remote_*` and `do_remote_*` fields (NIXL v1).
    V1RemoteFields,
    /// Transfer parameters in the generate API's `sampling_params.extra_args`.
    ExtraArgs,
    /// Transfer parameters in `vllm_xargs`.
    VllmXargs,
}

impl Field {
    /// Every field, in label order.
    pub const ALL: [Field; 5] = [
        Field::KvTransferParams,
        Field::EcTransferParams,
        Field::V1RemoteFields,
        Field::ExtraArgs,
        Field::VllmXargs,
    ];

    /// The metric's label value.
    pub fn label(self) -> &'static str {
        match self {
            Field::KvTransferParams => "kv_transfer_params",
            Field::EcTransferParams => "ec_transfer_params",
            Field::V1RemoteFields => "v1_remote_fields",
            Field::ExtraArgs => "extra_args",
            Field::VllmXargs => "vllm_xargs",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The fields removed from one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed(u8);

impl Removed {
    fn insert(&mut self, field: Field) {
        self.0 |= field.bit();
    }

    pub fn contains(self, field: Field) -> bool {
        self.0 & field.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The fields removed, in label order.
    pub fn iter(self) -> impl Iterator<Item = Field> {
        Field::ALL.into_iter().filter(move |f| self.contains(*f))
    }

    /// Counts each field removed, and logs the request's removals in one line (the fields'
    /// names only: their values are the client's).
    pub fn report(self, metrics: &Metrics) {
        for field in self.iter() {
            metrics.client_param_removed(field.label());
        }
        warn!(
            fields = %self,
            "removed client-supplied transfer parameters (-trust-client-kv-params=false)"
        );
    }
}

/// Comma-separated labels, e.g. `kv_transfer_params,v1_remote_fields`.
impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(field.label())?;
        }
        Ok(())
    }
}

/// What [`strip`] made of a body.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to remove: send the body as it came.
    Untouched,
    /// The body without the client's parameters.
    Stripped { body: Spliced, removed: Removed },
    /// The body may hold parameters, and cannot be read as JSON here: refuse it (the text
    /// says why).
    Unreadable(String),
}

/// The request body of inference route `api` without the client's transfer parameters.
pub fn strip(api: Api, body: &Bytes) -> Outcome {
    if !may_carry(body) {
        return Outcome::Untouched;
    }
    if foreign_encoding(body) {
        return Outcome::Unreadable("the request body is not UTF-8".to_owned());
    }
    parsed(api, body)
}

/// The rules a pass-through POST to `path` is stripped by, if any: the inference routes,
/// found as vLLM's server finds them, on the percent-decoded path (`/v1/%63ompletions` is
/// completions there), plus the two other routes that hand a body with `kv_transfer_params`
/// to the engine: batch chat, and `/invocations` (dispatched on the body). Form uploads keep
/// streaming.
pub fn pass_through_rules(path: &str, content_type: Option<&http::HeaderValue>) -> Option<Api> {
    let decoded;
    let path = if path.contains('%') {
        decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        decoded.as_ref()
    } else {
        path
    };
    if let Some(api) = Api::for_path(path) {
        return Some(api);
    }
    let form = content_type.is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.len() >= 10 && ct[..10].eq_ignore_ascii_case(b"multipart/")
    });
    match path {
        "/v1/chat/completions/batch" | "/invocations" if !form => Some(Api::ChatCompletions),
        _ => None,
    }
}

/// [`strip`] past its byte checks: the body parsed, its fields looked up by name.
fn parsed(api: Api, body: &Bytes) -> Outcome {
    let object = match JsonObject::parse(body) {
        Ok(object) => object,
        // Valid JSON but no object: no field to remove, and vLLM refuses it as it is.
        Err(ParseError::NotObject) => return Outcome::Untouched,
        Err(ParseError::Invalid(e)) => return Outcome::Unreadable(e),
    };
    let mut removed = Removed::default();
    let mut edits: Vec<(&str, Edit<'_>)> = Vec::new();
    for key in object.keys() {
        let field = match key {
            "kv_transfer_params" => Field::KvTransferParams,
            "ec_transfer_params" => Field::EcTransferParams,
            k if k.starts_with("remote_") || k.starts_with("do_remote_") => Field::V1RemoteFields,
            _ => continue,
        };
        removed.insert(field);
        // A duplicate's one Remove drops every occurrence.
        if !edits.iter().any(|(k, _)| *k == key) {
            edits.push((key, Edit::Remove));
        }
    }
    let xargs = object.get("vllm_xargs").and_then(without_params);
    let sampling = match api {
        Api::Generate => object
            .get("sampling_params")
            .and_then(sampling_without_params),
        _ => None,
    };
    if let Some(xargs) = &xargs {
        removed.insert(Field::VllmXargs);
        edits.push(("vllm_xargs", Edit::Set(xargs)));
    }
    if let Some(sampling) = &sampling {
        removed.insert(Field::ExtraArgs);
        edits.push(("sampling_params", Edit::Set(sampling)));
    }
    if removed.is_empty() {
        return Outcome::Untouched;
    }
    Outcome::Stripped {
        body: object.rewrite(&edits),
        removed,
    }
}

/// [`strip`] for a body read whole, as one buffer: what it removed is reported, and a body
/// it cannot read is refused as invalid JSON (400).
pub fn scrub(api: Api, body: Bytes, metrics: &Metrics) -> Result<Bytes, ProxyError> {
    match strip(api, &body) {
        Outcome::Untouched => Ok(body),
        Outcome::Stripped { body, removed } => {
            removed.report(metrics);
            Ok(body.to_bytes())
        }
        Outcome::Unreadable(e) => Err(ProxyError::InvalidJson(e)),
    }
}

/// The generate API's `sampling_params` with its `extra_args` rid of transfer parameters,
/// if it had any.
fn sampling_without_params(raw: &RawValue) -> Option<String> {
    let source = Bytes::copy_from_slice(raw.get().as_bytes());
    let params = JsonObject::parse(&source).ok()?;
    let extra_args = without_params(params.get("extra_args")?)?;
    let edited = params.rewrite(&[("extra_args", Edit::Set(&extra_args))]);
    // The rewrite of valid JSON is valid JSON, hence UTF-8.
    String::from_utf8(edited.to_vec()).ok()
}

/// Object `raw` without `kv_transfer_params` and `ec_transfer_params`, if it had either.
/// Anything but an object is left for vLLM to judge.
fn without_params(raw: &RawValue) -> Option<String> {
    const PARAMS: [(&str, Edit<'static>); 2] = [
        ("kv_transfer_params", Edit::Remove),
        ("ec_transfer_params", Edit::Remove),
    ];
    let source = Bytes::copy_from_slice(raw.get().as_bytes());
    let object = JsonObject::parse(&source).ok()?;
    if !object.keys().any(|k| PARAMS.iter().any(|(p, _)| *p == k)) {
        return None;
    }
    String::from_utf8(object.rewrite(&PARAMS).to_vec()).ok()
}

/// Whether `body` may hold a field [`strip`] removes: a name it looks for, a `\u` escape
/// (which may spell one), or an encoding other than UTF-8 (where the bytes spell nothing).
pub fn may_carry(body: &[u8]) -> bool {
    foreign_encoding(body) || finders().iter().any(|f| f.find(body).is_some())
}

/// What the byte search looks for. `transfer_params` covers `kv_` and `ec_transfer_params`
/// wherever they are, so inside `vllm_xargs` and `extra_args` too (those names alone are
/// nothing to remove); `remote_` covers `do_remote_*`. One memmem pass each, whatever the
/// body holds: about 0.1 ns a byte (a scan for `_` and `\` instead is faster on prose and
/// several times slower on code, where every line has them).
const NAMES: [&[u8]; 3] = [b"transfer_params", b"remote_", b"\\u"];

fn finders() -> &'static [memmem::Finder<'static>; 3] {
    static FINDERS: OnceLock<[memmem::Finder<'static>; 3]> = OnceLock::new();
    FINDERS.get_or_init(|| NAMES.map(memmem::Finder::new))
}

/// A body Python's `json.loads` would decode as UTF-16 or UTF-32 (its `detect_encoding`):
/// a UTF-16/32 byte order mark, or a NUL in the first two bytes (never valid UTF-8 JSON).
fn foreign_encoding(body: &[u8]) -> bool {
    body.starts_with(&[0xFE, 0xFF])
        || body.starts_with(&[0xFF, 0xFE])
        || body.first() == Some(&0)
        || body.get(1) == Some(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_rules_follow_vllms_routing() {
        let json = http::HeaderValue::from_static("application/json; charset=utf-8");
        let form = http::HeaderValue::from_static("multipart/form-data; boundary=x");
        let rules = |path, ct| pass_through_rules(path, ct);
        assert_eq!(rules("/v1/completions", None), Some(Api::Completions));
        assert_eq!(
            rules("/v1/%63ompletions", Some(&json)),
            Some(Api::Completions)
        );
        assert_eq!(rules("/inference/v1/%67enerate", None), Some(Api::Generate));
        assert_eq!(rules("/invocations", None), Some(Api::ChatCompletions));
        assert_eq!(
            rules("/v1/chat/completions/batch", Some(&json)),
            Some(Api::ChatCompletions)
        );
        assert_eq!(rules("/invocations", Some(&form)), None);
        assert_eq!(rules("/v1/audio/transcriptions", Some(&form)), None);
        assert_eq!(rules("/v1/embeddings", Some(&json)), None);
        assert_eq!(rules("/metrics", None), None);
        assert_eq!(rules("/tokenize", Some(&json)), None);
    }

    fn stripped(api: Api, body: &str) -> (String, Removed) {
        match strip(api, &Bytes::copy_from_slice(body.as_bytes())) {
            Outcome::Stripped { body, removed } => {
                (String::from_utf8(body.to_vec()).unwrap(), removed)
            }
            other => panic!("{body}: {other:?}"),
        }
    }

    fn untouched(api: Api, body: &[u8]) -> bool {
        matches!(
            strip(api, &Bytes::copy_from_slice(body)),
            Outcome::Untouched
        )
    }

    #[test]
    fn the_fast_path_finds_each_name_anywhere() {
        let names = [
            "kv_transfer_params",
            "ec_transfer_params",
            "remote_host",
            "do_remote_decode",
            "\\u0041",
        ];
        for name in names {
            for body in [
                name.to_owned(),
                format!("{{\"{name}\":1}}"),
                format!("{{\"vllm_xargs\":{{\"{name}\":1}}}}"),
                format!("x{name}"),
            ] {
                assert!(may_carry(body.as_bytes()), "{body}");
            }
        }
        for body in [
            "",
            "_",
            "\\",
            "{}",
            "transfer-params",
            "_remote",
            r#"{"vllm_xargs":{"session_id":"s"}}"#,
            r#"{"sampling_params":{"extra_args":{"x":1}}}"#,
        ] {
            assert!(!may_carry(body.as_bytes()), "{body}");
        }
    }

    /// What the fast path lets through untouched, the parsing path would have left too.
    #[test]
    fn the_fast_path_changes_no_outcome() {
        for body in [
            &br#"{"model":"m","max_tokens":5,"prompt":"snake_case \n \"q\" _transfer remote"}"#[..],
            br#"{"vllm_xargs":{"session_id":"s"},"xkv_transfer":1}"#,
            br#"{"token_ids":[1],"sampling_params":{"extra_args":{"x":1}}}"#,
            br#"{"remote":1,"do_remote":2,"transfer_param":3}"#,
        ] {
            assert!(!may_carry(body));
            let body = Bytes::copy_from_slice(body);
            for api in Api::ALL {
                assert!(matches!(parsed(api, &body), Outcome::Untouched));
            }
        }
    }

    #[test]
    fn a_body_without_the_names_is_untouched_unparsed() {
        // Not even JSON: nothing is parsed, so nothing is refused.
        assert!(untouched(Api::Completions, b"{not json"));
        assert!(untouched(
            Api::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#
        ));
        // Parsed (a `\u` escape), and nothing to remove.
        assert!(untouched(Api::Completions, br#"{"prompt":"caf\u00e9"}"#));
        // JSON, not an object: vLLM refuses it.
        assert!(untouched(Api::Completions, br#"["kv_transfer_params"]"#));
    }

    #[test]
    fn top_level_params_are_removed_and_every_other_byte_kept() {
        let (body, removed) = stripped(
            Api::ChatCompletions,
            r#"{ "model": "m", "kv_transfer_params": {"do_remote_prefill":true,"remote_prefill_cached_tokens":999999,"remote_host":"10.9.9.9"} , "seed": 18446744073709551615,"ec_transfer_params":{},"n":1 }"#,
        );
        assert_eq!(
            body,
            // Whitespace before the closing brace is the one thing a rewrite drops.
            r#"{ "model": "m", "seed": 18446744073709551615,"n":1}"#
        );
        assert!(removed.contains(Field::KvTransferParams));
        assert!(removed.contains(Field::EcTransferParams));
        assert_eq!(removed.to_string(), "kv_transfer_params,ec_transfer_params");
    }

    #[test]
    fn an_escaped_key_is_removed_as_the_key_it_spells() {
        let (body, removed) = stripped(
            Api::Completions,
            r#"{"prompt":"x","kv_transfer\u005fparams":{"cached":9},"\u0072emote_host":"h"}"#,
        );
        assert_eq!(body, r#"{"prompt":"x"}"#);
        assert_eq!(removed.to_string(), "kv_transfer_params,v1_remote_fields");
    }

    #[test]
    fn v1_fields_and_duplicates_are_removed() {
        let (body, removed) = stripped(
            Api::Completions,
            r#"{"do_remote_decode":true,"prompt":"x","remote_block_ids":[1],"remote_engine_id":"e","kv_transfer_params":null,"remote_port":5,"kv_transfer_params":{}}"#,
        );
        assert_eq!(body, r#"{"prompt":"x"}"#);
        assert_eq!(removed.to_string(), "kv_transfer_params,v1_remote_fields");
        // Prefixes only: a field that merely contains the words stays.
        assert!(untouched(
            Api::Completions,
            br#"{"prompt":"x","not_remote_host":1,"xkv_transfer_params":2}"#
        ));
    }

    #[test]
    fn nested_params_are_removed_where_vllm_reads_them() {
        let (body, removed) = stripped(
            Api::Generate,
            r#"{"token_ids":[1],"sampling_params":{"max_tokens":4,"extra_args":{"kv_transfer_params":{"do_remote_prefill":true},"ec_transfer_params":{},"kv_cache_report_mode":"x"},"seed":1},"stream":true}"#,
        );
        assert_eq!(
            body,
            r#"{"token_ids":[1],"sampling_params":{"max_tokens":4,"extra_args":{"kv_cache_report_mode":"x"},"seed":1},"stream":true}"#
        );
        assert_eq!(removed.to_string(), "extra_args");
        // Only the generate API has sampling_params.
        assert!(untouched(
            Api::Completions,
            br#"{"sampling_params":{"extra_args":{"kv_transfer_params":{}}}}"#
        ));
        let (body, removed) = stripped(
            Api::ChatCompletions,
            r#"{"messages":[],"vllm_xargs":{"session_id":"s","kv_transfer_params":"x"}}"#,
        );
        assert_eq!(body, r#"{"messages":[],"vllm_xargs":{"session_id":"s"}}"#);
        assert_eq!(removed.to_string(), "vllm_xargs");
        // Other values are vLLM's to judge.
        for body in [
            &br#"{"vllm_xargs":"kv_transfer_params"}"#[..],
            br#"{"vllm_xargs":{"session_id":"s"}}"#,
            br#"{"token_ids":[1],"sampling_params":{"extra_args":null}}"#,
        ] {
            assert!(untouched(Api::Generate, body));
        }
    }

    #[test]
    fn the_last_of_duplicate_nested_objects_is_the_one_kept() {
        // vLLM keeps the last duplicate; so does the rewrite, in the first one's place.
        let (body, _) = stripped(
            Api::Generate,
            r#"{"sampling_params":{"seed":1},"x":0,"sampling_params":{"extra_args":{"kv_transfer_params":{}}}}"#,
        );
        assert_eq!(body, r#"{"sampling_params":{"extra_args":{}},"x":0}"#);
    }

    #[test]
    fn what_python_reads_but_we_cannot_is_refused() {
        // NaN is not JSON, but json.loads accepts it.
        let nan = br#"{"temperature":NaN,"kv_transfer_params":{"do_remote_prefill":true}}"#;
        assert!(matches!(
            strip(Api::Completions, &Bytes::from_static(nan)),
            Outcome::Unreadable(_)
        ));
        // UTF-16: json.loads decodes it; no name is visible in its bytes.
        let utf16: Vec<u8> = "\u{feff}{\"kv_transfer_params\":{}}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert!(may_carry(&utf16));
        assert!(matches!(
            strip(Api::Completions, &Bytes::from(utf16)),
            Outcome::Unreadable(_)
        ));
        let utf16_no_bom: Vec<u8> = "{\"a\":1}"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert!(may_carry(&utf16_no_bom));
        // A UTF-8 byte order mark is read (and dropped from a rewrite).
        let (body, _) = stripped(
            Api::Completions,
            "\u{feff}{\"prompt\":\"x\",\"kv_transfer_params\":{}}",
        );
        assert_eq!(body, r#"{"prompt":"x"}"#);
    }
}
