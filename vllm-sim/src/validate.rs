//! Request parsing and validation in vLLM's order (§7.4), token accounting and prompt hash.

use super::config::{ErrorFormat, Protocol, SimConfig};
use super::http_util::ApiError;
use super::prompt::{bad, chat_tokens, prompt_hash, prompt_tokens};
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

/// A validated generation request.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub endpoint: Endpoint,
    pub body: Map<String, Value>,
    /// Model name echoed in responses: the requested one or the default.
    pub model: String,
    pub prompt_tokens: u64,
    pub prompt_hash: String,
    /// Prompt "tokens" as text, for `--mode echo`.
    pub words: Vec<String>,
    /// Explicit output limit from the body, if any.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignored_fields: Vec<String>,
}

/// A validation failure, with the parsed body when there was one (for the reject notify).
pub struct Rejected {
    pub error: ApiError,
    pub body: Option<Map<String, Value>>,
}

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "n",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "ignore_eos",
    "min_tokens",
    "priority",
    "request_id",
    "kv_transfer_params",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "length_penalty",
    "use_beam_search",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    "add_special_tokens",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "vllm_xargs",
    "logits_processors",
    "echo",
    "best_of",
    "ec_transfer_params",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "suffix", "prompt_embeds"];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "mm_processor_kwargs",
    "include_reasoning",
    "metadata",
    "store",
    "modalities",
    "audio",
    "prediction",
    "service_tier",
    "web_search_options",
    "function_call",
    "functions",
];
/// Top-level NIXL v1 fields (§2.1): understood only with `--protocol nixl-v1`.
pub const NIXL_V1_FIELDS: &[&str] = &[
    "do_remote_decode",
    "do_remote_prefill",
    "remote_block_ids",
    "remote_engine_id",
    "remote_host",
    "remote_port",
];

fn opt_pos_int(
    fmt: ErrorFormat,
    body: &Map<String, Value>,
    key: &str,
) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(bad(
                fmt,
                key,
                "Input should be an integer greater than or equal to 1",
            )),
        },
    }
}

/// Runs the §7.4 checks in order; the first failure wins.
pub fn parse(
    endpoint: Endpoint,
    content_type: Option<&str>,
    raw: &[u8],
    cfg: &SimConfig,
) -> Result<Parsed, Rejected> {
    let fmt = cfg.error_format;
    let reject = |error: ApiError, body: Option<&Map<String, Value>>| Rejected {
        error,
        body: body.cloned(),
    };
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/json") {
        let e = ApiError::validation(
            fmt,
            "Unsupported Media Type: Only 'application/json' is allowed",
        );
        return Err(reject(e, None));
    }
    let body: Map<String, Value> = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            let msg = "[{'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error', 'ctx': {'error': 'expected a JSON object'}}]";
            return Err(reject(ApiError::validation(fmt, msg), None));
        }
        Err(e) => {
            let msg = format!(
                "[{{'type': 'json_invalid', 'loc': ('body', {}), 'msg': 'JSON decode error', 'ctx': {{'error': '{e}'}}}}]",
                e.column()
            );
            return Err(reject(ApiError::validation(fmt, msg), None));
        }
    };
    let b = Some(&body);
    let (prompt_tokens, words, hash) = match endpoint {
        Endpoint::Completions => {
            let (n, w) = prompt_tokens(fmt, body.get("prompt")).map_err(|e| reject(e, b))?;
            let h = prompt_hash(endpoint, body.get("prompt").unwrap_or(&Value::Null));
            (n, w, h)
        }
        Endpoint::Chat => {
            let (n, w) = chat_tokens(fmt, body.get("messages")).map_err(|e| reject(e, b))?;
            let h = prompt_hash(endpoint, body.get("messages").unwrap_or(&Value::Null));
            (n, w, h)
        }
    };
    let mut max_tokens = opt_pos_int(fmt, &body, "max_tokens").map_err(|e| reject(e, b))?;
    if endpoint == Endpoint::Chat {
        // vLLM: `max_completion_tokens or max_tokens`.
        let mct = opt_pos_int(fmt, &body, "max_completion_tokens").map_err(|e| reject(e, b))?;
        max_tokens = mct.or(max_tokens);
    }
    match body.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(reject(
                bad(fmt, "n", "Only n=1 is supported by the simulator"),
                b,
            ))
        }
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(s)) => *s,
        Some(_) => {
            return Err(reject(
                bad(fmt, "stream", "Input should be a valid boolean"),
                b,
            ))
        }
    };
    let mut include_usage = false;
    match body.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if !stream {
                let e = ApiError::validation(
                    fmt,
                    "Stream options can only be defined when `stream=True`.",
                )
                .param("stream_options");
                return Err(reject(e, b));
            }
            include_usage = o
                .get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        Some(_) => {
            return Err(reject(
                bad(fmt, "stream_options", "Input should be an object"),
                b,
            ))
        }
    }
    match body.get("kv_transfer_params") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(reject(
                bad(
                    fmt,
                    "kv_transfer_params",
                    "Input should be a valid dictionary",
                ),
                b,
            ))
        }
    }
    let served = cfg.model_names();
    let model = match body.get("model") {
        None | Some(Value::Null) => served.first().cloned().unwrap_or_default(),
        Some(Value::String(m)) if served.iter().any(|s| s == m) => m.clone(),
        Some(Value::String(m)) => {
            let e = ApiError::new(
                404,
                "NotFoundError",
                format!("The model `{m}` does not exist."),
            )
            .param("model");
            return Err(reject(e, b));
        }
        Some(_) => {
            return Err(reject(
                bad(fmt, "model", "Input should be a valid string"),
                b,
            ))
        }
    };
    let n = cfg.max_model_len;
    if prompt_tokens > n {
        let e = ApiError::new(400, "BadRequestError", format!(
            "This model's maximum context length is {n} tokens. However, your request has {prompt_tokens} input tokens. Please reduce the length of the input messages."));
        return Err(reject(e, b));
    }
    if let Some(x) = max_tokens {
        if prompt_tokens + x > n {
            let e = ApiError::new(400, "BadRequestError", format!(
                "'max_tokens' or 'max_completion_tokens' is too large: {x}. This model's maximum context length is {n} tokens and your request has {prompt_tokens} input tokens ({x} > {n} - {prompt_tokens})."))
                .param("max_tokens");
            return Err(reject(e, b));
        }
    }
    let specific = match endpoint {
        Endpoint::Completions => COMPLETION_FIELDS,
        Endpoint::Chat => CHAT_FIELDS,
    };
    let ignored_fields = body
        .keys()
        .filter(|k| !COMMON_FIELDS.contains(&k.as_str()) && !specific.contains(&k.as_str()))
        .filter(|k| !(cfg.protocol == Protocol::NixlV1 && NIXL_V1_FIELDS.contains(&k.as_str())))
        .cloned()
        .collect();
    Ok(Parsed {
        endpoint,
        body,
        model,
        prompt_tokens,
        prompt_hash: hash,
        words,
        max_tokens,
        stream,
        include_usage: include_usage || cfg.enable_force_include_usage,
        ignored_fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::tokenize;

    #[test]
    fn tokenizer_matches_regex_semantics() {
        assert_eq!(tokenize("Hello, world!"), vec!["Hello", ",", "world", "!"]);
        assert_eq!(tokenize("  a_b  c"), vec!["a_b", "c"]);
    }

    #[test]
    fn validation_order() {
        let cfg = SimConfig::default();
        let p = |ct: Option<&str>, b: &str| parse(Endpoint::Completions, ct, b.as_bytes(), &cfg);
        let status = |r: Result<Parsed, Rejected>| r.err().map(|e| e.error.status);
        assert_eq!(status(p(Some("text/plain"), "{}")), Some(400));
        assert_eq!(status(p(Some("application/json"), "{")), Some(400));
        assert_eq!(
            status(p(Some("application/json"), r#"{"prompt":"a","model":"x"}"#)),
            Some(404)
        );
        assert_eq!(
            status(p(
                Some("application/json"),
                r#"{"prompt":"a","stream_options":{}}"#
            )),
            Some(400)
        );
        let ok = p(
            Some("application/json; charset=utf-8"),
            r#"{"prompt":"a b","max_tokens":2,"foo":1}"#,
        )
        .ok()
        .expect("valid");
        assert_eq!(ok.prompt_tokens, 2);
        assert_eq!(ok.ignored_fields, vec!["foo".to_string()]);
    }
}
