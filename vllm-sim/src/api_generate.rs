//! `POST /inference/v1/generate`, vLLM's tokens-in/tokens-out API (§7.17): `token_ids` is
//! the prompt, the output limits live in `sampling_params`, the output is token ids.

use super::config::ErrorFormat;
use super::http_util::ApiError;
use super::prompt::{bad, prompt_hash};
use super::responses::{kv_fields, sse, usage, KvOut, Obj};
use super::validate::{check_min_tokens, Endpoint, PromptSpec};
use bytes::Bytes;
use serde_json::{Map, Value};

/// GenerateRequest's top-level fields.
pub const FIELDS: &[&str] = &[
    "request_id",
    "token_ids",
    "assistant_tokens_mask",
    "token_offsets",
    "features",
    "sampling_params",
    "model",
    "stream",
    "stream_options",
    "cache_salt",
    "priority",
    "kv_transfer_params",
];

/// SamplingParams' fields; others are listed in the log as `sampling_params.<key>`.
const SAMPLING_FIELDS: &[&str] = &[
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "flat_logprobs",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "output_kind",
    "structured_outputs",
    "logit_bias",
    "allowed_token_ids",
    "extra_args",
    "bad_words",
    "skip_reading_prefix_cache",
    "logits_processors",
    "truncate_prompt_tokens",
];

/// SamplingParams' own default, which `min_tokens` is checked against before the server
/// replaces an absent `max_tokens` with the rest of the context.
const DATACLASS_MAX_TOKENS: u64 = 16;

pub fn parse(fmt: ErrorFormat, body: &Map<String, Value>) -> Result<PromptSpec, ApiError> {
    let ids = match body.get("token_ids") {
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a,
        None => return Err(bad(fmt, "token_ids", "Field required")),
        Some(_) => {
            return Err(bad(
                fmt,
                "token_ids",
                "Input should be a non-empty list of non-negative integers",
            ))
        }
    };
    let sp = match body.get("sampling_params") {
        Some(Value::Object(o)) => o,
        None | Some(Value::Null) => return Err(bad(fmt, "sampling_params", "Field required")),
        Some(_) => {
            return Err(bad(
                fmt,
                "sampling_params",
                "Input should be a valid dictionary",
            ))
        }
    };
    let max_tokens = match sp.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => {
                let e = ApiError::new(
                    400,
                    "BadRequestError",
                    format!("max_tokens must be at least 1, got {v}."),
                );
                return Err(e.param("sampling_params"));
            }
        },
    };
    check_min_tokens(fmt, sp, Some(max_tokens.unwrap_or(DATACLASS_MAX_TOKENS)))?;
    match sp.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(bad(
                fmt,
                "sampling_params",
                "Only n=1 is supported by the simulator",
            ))
        }
    }
    let ignored = sp
        .keys()
        .filter(|k| !SAMPLING_FIELDS.contains(&k.as_str()))
        .map(|k| format!("sampling_params.{k}"))
        .collect();
    Ok(PromptSpec {
        tokens: ids.len() as u64,
        words: ids.iter().map(Value::to_string).collect(),
        hash: prompt_hash(Endpoint::Generate, &Value::Array(ids.clone())),
        max_tokens,
        ignored,
    })
}

fn choice(token_ids: &[u64], finish: Option<&str>) -> String {
    Obj::new()
        .field("index", &0)
        .null("logprobs")
        .field("finish_reason", &finish)
        .field("token_ids", token_ids)
        .null("routed_experts")
        .finish()
}

/// GenerateResponse (model_dump: null fields present).
pub fn full_response(
    id: &str,
    model: &str,
    created: u64,
    token_ids: &[u64],
    finish: &str,
    prompt: u64,
    kv: &KvOut,
) -> String {
    let o = Obj::new()
        .field("request_id", id)
        .field("model", model)
        .field("created", &created)
        .raw("choices", &format!("[{}]", choice(token_ids, Some(finish))))
        .raw("usage", &usage(prompt, token_ids.len() as u64, true))
        .null("prompt_logprobs");
    kv_fields(o, kv, true).finish()
}

/// One GenerateStreamResponse chunk per token; the last carries `finish_reason`.
pub fn token_chunk(id: &str, token_id: u64, finish: Option<&str>) -> Bytes {
    sse(&Obj::new()
        .field("request_id", id)
        .raw("choices", &format!("[{}]", choice(&[token_id], finish)))
        .null("usage")
        .finish())
}

/// The final usage chunk (exclude_none), with `stream_options.include_usage`.
pub fn usage_chunk(id: &str, prompt: u64, completion: u64) -> Bytes {
    sse(&Obj::new()
        .field("request_id", id)
        .raw("choices", "[]")
        .raw("usage", &usage(prompt, completion, false))
        .finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(b: &str) -> Result<PromptSpec, ApiError> {
        let v: Value = serde_json::from_str(b).unwrap();
        parse(ErrorFormat::Current, v.as_object().unwrap())
    }

    #[test]
    fn token_ids_are_the_prompt_and_limits_come_from_sampling_params() {
        let s = p(r#"{"token_ids":[5,6,7],"sampling_params":{"max_tokens":2,"foo":1}}"#).unwrap();
        assert_eq!((s.tokens, s.max_tokens), (3, Some(2)));
        assert_eq!(s.words, vec!["5", "6", "7"]);
        assert_eq!(s.ignored, vec!["sampling_params.foo".to_string()]);
        let same = p(r#"{"token_ids":[5,6,7],"sampling_params":{}}"#).unwrap();
        assert_eq!(same.hash, s.hash, "the hash covers token_ids only");
        assert_ne!(
            p(r#"{"token_ids":[5,6],"sampling_params":{}}"#)
                .unwrap()
                .hash,
            s.hash
        );
    }

    #[test]
    fn one_token_limit_rejects_larger_min_tokens() {
        let e = p(r#"{"token_ids":[1],"sampling_params":{"max_tokens":1,"min_tokens":2}}"#)
            .err()
            .unwrap();
        assert_eq!((e.status, e.kind.as_str()), (400, "BadRequestError"));
        assert_eq!(
            e.message,
            "min_tokens must be less than or equal to max_tokens=1, got 2."
        );
        // Without max_tokens the dataclass default (16) bounds min_tokens.
        assert!(p(r#"{"token_ids":[1],"sampling_params":{"min_tokens":17}}"#).is_err());
        assert!(p(r#"{"token_ids":[1],"sampling_params":{"min_tokens":16}}"#).is_ok());
        assert!(p(r#"{"token_ids":[1],"sampling_params":{"max_tokens":0}}"#).is_err());
        assert!(p(r#"{"token_ids":[],"sampling_params":{}}"#).is_err());
        assert!(p(r#"{"token_ids":[1]}"#).is_err());
    }

    #[test]
    fn body_shapes() {
        assert_eq!(
            full_response("g", "m", 7, &[0, 1], "length", 3, &KvOut::Null),
            r#"{"request_id":"g","model":"m","created":7,"choices":[{"index":0,"logprobs":null,"finish_reason":"length","token_ids":[0,1],"routed_experts":null}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}"#
        );
        assert_eq!(
            &token_chunk("g", 4, None)[..],
            &b"data: {\"request_id\":\"g\",\"choices\":[{\"index\":0,\"logprobs\":null,\"finish_reason\":null,\"token_ids\":[4],\"routed_experts\":null}],\"usage\":null}\n\n"[..]
        );
        assert_eq!(
            &usage_chunk("g", 3, 2)[..],
            &b"data: {\"request_id\":\"g\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\":5,\"completion_tokens\":2}}\n\n"[..]
        );
    }
}
