//! Request parsing and validation in vLLM's order (§7.4), token accounting and prompt hash.

use super::config::{ErrorFormat, Protocol, SimConfig};
use super::decode::truthy;
use super::http_util::ApiError;
use super::prompt::{
    bad, chat_ids, chat_tokens, completion_ids, forwarded_ids, has_media, message_tokens,
    prompt_hash, prompt_tokens, token_id,
};
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
    /// `POST /v1/responses` (§7.15).
    Responses,
    /// `POST /v1/messages` (§7.16).
    Messages,
    /// `POST /inference/v1/generate` (§7.17).
    Generate,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::Generate => "generate",
        }
    }

    /// The request path, for routing and the 405 list.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Generate => "/inference/v1/generate",
        }
    }

    pub const ALL: [Endpoint; 5] = [
        Endpoint::Completions,
        Endpoint::Chat,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::Generate,
    ];

    pub fn for_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }

    /// The body `id` for base id `base` (§7.6). Messages runs as a chat completion in vLLM,
    /// so it keeps chat's id.
    pub fn public_id(self, base: &str) -> String {
        match self {
            Endpoint::Completions => format!("cmpl-{base}"),
            Endpoint::Chat | Endpoint::Messages => format!("chatcmpl-{base}"),
            Endpoint::Responses => format!("resp_{base}"),
            Endpoint::Generate => format!("generate-tokens-{base}"),
        }
    }

    /// The internal id before any random suffix (§7.6).
    pub fn unsuffixed_id(self, base: &str) -> String {
        match self {
            Endpoint::Completions => format!("cmpl-{base}-0"),
            e => e.public_id(base),
        }
    }

    /// The output limit when the body sets none: vLLM's 16 for completions, else the rest
    /// of the context, which the simulator stands in for with `--default-max-tokens-chat`.
    pub fn default_max_tokens(self, cfg: &SimConfig) -> u64 {
        match self {
            Endpoint::Completions => 16,
            _ => cfg.default_max_tokens_chat,
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
    /// Prompt "tokens" as text, for `--mode echo` (a continued final message's excluded).
    pub words: Vec<String>,
    /// Chat's `continue_final_message`: the tokens already in the final assistant message,
    /// where generation resumes (§7.11).
    pub continue_from: Option<u64>,
    /// Explicit output limit from the body, if any.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// llm-d's `cache_hit_threshold` in [0, 1] (completions and chat only, §7.10.4).
    pub cache_hit_threshold: Option<f64>,
    pub ignored_fields: Vec<String>,
    /// `return_token_ids: true` on completions or chat: the ids the reply reports.
    pub token_ids: Option<TokenIds>,
    /// What became of chat's `kv_transfer_params.prompt_token_ids` (vllm#48145).
    pub forwarded: Option<Forwarded>,
}

/// The token ids of a request that asked for them (`return_token_ids`).
#[derive(Clone, Debug)]
pub struct TokenIds {
    /// The prompt's ids: the forwarded ones when reused, else the rendered prompt's.
    pub prompt: Vec<u64>,
    /// The id of each of `Parsed::words` (what `--mode echo` outputs), in the same order.
    pub words: Vec<u64>,
}

/// Chat's forwarded `kv_transfer_params.prompt_token_ids`: the prompt, or ignored (`echo`,
/// or media in the messages) and the messages rendered instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    Reused,
    Ignored,
}

impl Forwarded {
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarded::Reused => "reused",
            Forwarded::Ignored => "ignored",
        }
    }
}

/// vLLM's answer to malformed forwarded ids (vllm#48145).
const BAD_FORWARDED_IDS: &str =
    "`kv_transfer_params['prompt_token_ids']` must be a non-empty list of non-negative integers.";

/// What a chat request's forwarded ids come to.
enum ForwardedPrompt {
    Ignored,
    /// The ids, and whether they are the messages' own rendering.
    Reused(Vec<u64>, bool),
}

/// Chat's forwarded prompt ids (§7.24), read where vLLM's renderer reads them: after the
/// request's validation and the model check, before the context check. `None`: no ids, or
/// `null`.
fn forwarded_prompt(body: &Map<String, Value>) -> Result<Option<ForwardedPrompt>, ApiError> {
    let Some(v) = body
        .get("kv_transfer_params")
        .and_then(|kv| kv.get("prompt_token_ids"))
        .filter(|v| !v.is_null())
    else {
        return Ok(None);
    };
    let messages = body.get("messages");
    if truthy(body.get("echo")) || has_media(messages) {
        return Ok(Some(ForwardedPrompt::Ignored));
    }
    let ids = forwarded_ids(v).ok_or_else(|| {
        ApiError::new(400, "BadRequestError", BAD_FORWARDED_IDS)
            .param("kv_transfer_params.prompt_token_ids")
    })?;
    let own = ids == chat_ids(messages);
    Ok(Some(ForwardedPrompt::Reused(ids, own)))
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
    // llm-d's decode-first field (vllm RFC #24256); the sim gives it meaning (§7.10.4).
    "cache_hit_threshold",
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

pub(super) fn opt_pos_int(
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
    let mut body: Map<String, Value> = match serde_json::from_slice::<Value>(raw) {
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
    let (spec, continue_from) = match endpoint {
        Endpoint::Completions | Endpoint::Chat => openai_prompt(endpoint, fmt, &body),
        Endpoint::Responses => super::api_responses::parse(fmt, &body).map(|s| (s, None)),
        Endpoint::Messages => super::api_messages::parse(fmt, &body).map(|s| (s, None)),
        Endpoint::Generate => super::api_generate::parse(fmt, &body).map(|s| (s, None)),
    }
    .map_err(|e| reject(e, b))?;
    let (mut prompt_tokens, max_tokens) = (spec.tokens, spec.max_tokens);
    let (mut hash, mut words) = (spec.hash, spec.words);
    let classic = matches!(endpoint, Endpoint::Completions | Endpoint::Chat);
    if classic {
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
    // Responses and Messages have no `stream_options` (an unknown key there); generate
    // has one without the stream-only check of the OpenAI request models.
    let mut include_usage = false;
    if classic || endpoint == Endpoint::Generate {
        match body.get("stream_options") {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                if !stream && classic {
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
    let cache_hit_threshold = if classic {
        cache_hit_threshold(fmt, &body).map_err(|e| reject(e, b))?
    } else {
        // The other request models have no such field: an ignored key there.
        None
    };
    let served = cfg.model_names();
    let model = match body.get("model") {
        // Anthropic's request model has `model` required.
        None | Some(Value::Null) if endpoint == Endpoint::Messages => {
            return Err(reject(bad(fmt, "model", "Field required"), b))
        }
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
    // Forwarded ids replace the rendered prompt (§7.24). The messages' own ids are the same
    // prompt (same hash, same echo words); other ids are another prompt, which the sim
    // cannot detokenize: hashed over the ids, echoed as their numbers.
    let fwd = if endpoint == Endpoint::Chat {
        forwarded_prompt(&body).map_err(|e| reject(e, b))?
    } else {
        None
    };
    let (forwarded, reused) = match fwd {
        None => (None, None),
        Some(ForwardedPrompt::Ignored) => (Some(Forwarded::Ignored), None),
        Some(ForwardedPrompt::Reused(ids, own)) => {
            prompt_tokens = ids.len() as u64;
            if !own {
                hash = prompt_hash(endpoint, &Value::from(ids.clone()));
                words = ids.iter().map(u64::to_string).collect();
            }
            (Some(Forwarded::Reused), Some((ids, own)))
        }
    };
    let n = cfg.max_model_len;
    if prompt_tokens > n {
        let e = ApiError::new(400, "BadRequestError", format!(
            "This model's maximum context length is {n} tokens. However, your request has {prompt_tokens} input tokens. Please reduce the length of the input messages."));
        return Err(reject(e, b));
    }
    // The generate API checks the prompt only (vLLM's token-in route passes no output
    // limit to its length check).
    if let Some(x) = max_tokens.filter(|_| endpoint != Endpoint::Generate) {
        if prompt_tokens + x > n {
            let (what, param) = match endpoint {
                Endpoint::Responses => ("'max_output_tokens'", "max_output_tokens"),
                _ => ("'max_tokens' or 'max_completion_tokens'", "max_tokens"),
            };
            let e = ApiError::new(400, "BadRequestError", format!(
                "{what} is too large: {x}. This model's maximum context length is {n} tokens and your request has {prompt_tokens} input tokens ({x} > {n} - {prompt_tokens})."))
                .param(param);
            return Err(reject(e, b));
        }
    }
    let specific = match endpoint {
        Endpoint::Completions => COMPLETION_FIELDS,
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Responses => super::api_responses::FIELDS,
        Endpoint::Messages => super::api_messages::FIELDS,
        Endpoint::Generate => super::api_generate::FIELDS,
    };
    let common: &[&str] = if classic { COMMON_FIELDS } else { &[] };
    let mut ignored_fields: Vec<String> = body
        .keys()
        .filter(|k| !common.contains(&k.as_str()) && !specific.contains(&k.as_str()))
        .filter(|k| !(cfg.protocol == Protocol::NixlV1 && NIXL_V1_FIELDS.contains(&k.as_str())))
        .filter(|k| {
            !(cfg.protocol == Protocol::Sglang && super::sglang::FIELDS.contains(&k.as_str()))
        })
        .cloned()
        .collect();
    ignored_fields.extend(spec.ignored);
    let token_ids =
        (classic && body.get("return_token_ids") == Some(&Value::Bool(true))).then(|| {
            match (endpoint, reused) {
                (Endpoint::Chat, Some((ids, false))) => TokenIds {
                    words: ids.clone(),
                    prompt: ids,
                },
                (Endpoint::Chat, reused) => TokenIds {
                    prompt: reused.map_or_else(|| chat_ids(body.get("messages")), |(ids, _)| ids),
                    words: words.iter().map(|w| token_id(w)).collect(),
                },
                // A completions prompt's words are its tokens, text or given ids, one to one.
                _ => {
                    let ids = completion_ids(body.get("prompt"));
                    TokenIds {
                        words: ids.clone(),
                        prompt: ids,
                    }
                }
            }
        });
    // vLLM pops the ids, so the KV connector sees the params without them.
    if endpoint == Endpoint::Chat {
        if let Some(Value::Object(kv)) = body.get_mut("kv_transfer_params") {
            kv.remove("prompt_token_ids");
        }
    }
    let include_usage = match endpoint {
        // vLLM's generate route does not apply --enable-force-include-usage.
        Endpoint::Generate => include_usage,
        _ => include_usage || cfg.enable_force_include_usage,
    };
    Ok(Parsed {
        endpoint,
        body,
        model,
        prompt_tokens,
        prompt_hash: hash,
        words,
        continue_from,
        max_tokens,
        stream,
        include_usage,
        cache_hit_threshold,
        ignored_fields,
        token_ids,
        forwarded,
    })
}

/// `cache_hit_threshold`: a number in [0, 1] if not null (pydantic's `ge=0, le=1` texts).
fn cache_hit_threshold(
    fmt: ErrorFormat,
    body: &Map<String, Value>,
) -> Result<Option<f64>, ApiError> {
    const K: &str = "cache_hit_threshold";
    match body.get(K) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t < 0.0 => Err(bad(fmt, K, "Input should be greater than or equal to 0")),
            Some(t) if t > 1.0 => Err(bad(fmt, K, "Input should be less than or equal to 1")),
            Some(t) => Ok(Some(t)),
            None => Err(bad(fmt, K, "Input should be a valid number")),
        },
        // Strict: a bool or a numeric string is refused too (pydantic's lax mode would
        // coerce "0.5"), so a proxy that stringifies the field is caught.
        Some(_) => Err(bad(fmt, K, "Input should be a valid number")),
    }
}

/// What an endpoint's own fields give: prompt accounting and the explicit output limit.
pub struct PromptSpec {
    pub tokens: u64,
    pub words: Vec<String>,
    pub hash: String,
    pub max_tokens: Option<u64>,
    /// Unknown keys below the top level (generate's `sampling_params.<key>`).
    pub ignored: Vec<String>,
}

/// vLLM's SamplingParams check: `min_tokens` is a non-negative integer no larger than the
/// output limit (`limit`, when one is known).
pub fn check_min_tokens(
    fmt: ErrorFormat,
    body: &Map<String, Value>,
    limit: Option<u64>,
) -> Result<(), ApiError> {
    let Some(v) = body.get("min_tokens").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Some(min) = v.as_u64() else {
        return Err(bad(
            fmt,
            "min_tokens",
            "Input should be an integer greater than or equal to 0",
        ));
    };
    match limit {
        Some(max) if min > max => Err(ApiError::new(
            400,
            "BadRequestError",
            format!("min_tokens must be less than or equal to max_tokens={max}, got {min}."),
        )
        .param("min_tokens")),
        _ => Ok(()),
    }
}

/// vLLM's message for both generation-prompt flags set.
const BOTH_PROMPT_FLAGS: &str =
    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.";

/// Chat's `continue_final_message` and `add_generation_prompt`: whether the final message is
/// continued. The conflict check is vLLM's before-validator, so it runs on the raw values
/// (Python truthiness) ahead of every field check.
fn continues_final_message(fmt: ErrorFormat, body: &Map<String, Value>) -> Result<bool, ApiError> {
    const CONTINUE: &str = "continue_final_message";
    const GENERATION: &str = "add_generation_prompt";
    if truthy(body.get(CONTINUE)) && truthy(body.get(GENERATION)) {
        let msg = format!(
            "[{{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, {BOTH_PROMPT_FLAGS}'}}]"
        );
        return Err(ApiError::validation(fmt, msg));
    }
    for key in [CONTINUE, GENERATION] {
        if !matches!(body.get(key), None | Some(Value::Null | Value::Bool(_))) {
            return Err(bad(fmt, key, "Input should be a valid boolean"));
        }
    }
    Ok(body.get(CONTINUE) == Some(&Value::Bool(true)))
}

/// Where a continued final message resumes: its tokens, after dropping its echo words from
/// `words`, so the output cycles over the same words as the uncut reply would.
fn continuation(
    fmt: ErrorFormat,
    body: &Map<String, Value>,
    words: &mut Vec<String>,
) -> Result<u64, ApiError> {
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    let Some(last) = last.filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    else {
        return Err(ApiError::new(
            400,
            "BadRequestError",
            "Cannot set `continue_final_message` to True when the last message is not from the assistant.",
        )
        .param("continue_final_message"));
    };
    let (tokens, own) = message_tokens(fmt, last)?;
    words.truncate(words.len().saturating_sub(own.len()));
    Ok(tokens)
}

/// Completions' `prompt` or chat's `messages` (§7.4 steps 3 and 5), and chat's continuation.
fn openai_prompt(
    endpoint: Endpoint,
    fmt: ErrorFormat,
    body: &Map<String, Value>,
) -> Result<(PromptSpec, Option<u64>), ApiError> {
    let chat = endpoint == Endpoint::Chat;
    let continues = chat && continues_final_message(fmt, body)?;
    let (key, (tokens, mut words)) = if chat {
        ("messages", chat_tokens(fmt, body.get("messages"))?)
    } else {
        ("prompt", prompt_tokens(fmt, body.get("prompt"))?)
    };
    let hash = prompt_hash(endpoint, body.get(key).unwrap_or(&Value::Null));
    let mut max_tokens = opt_pos_int(fmt, body, "max_tokens")?;
    if endpoint == Endpoint::Chat {
        // vLLM: `max_completion_tokens or max_tokens`.
        max_tokens = opt_pos_int(fmt, body, "max_completion_tokens")?.or(max_tokens);
    }
    // Completions' limit defaults to 16 before SamplingParams checks `min_tokens`; chat's
    // default is the rest of the context, so only an explicit limit is compared.
    let limit = match endpoint {
        Endpoint::Completions => Some(max_tokens.unwrap_or(16)),
        _ => max_tokens,
    };
    check_min_tokens(fmt, body, limit)?;
    // Not a schema check: a final message that is not the assistant's is refused after them.
    let continue_from = if continues {
        Some(continuation(fmt, body, &mut words)?)
    } else {
        None
    };
    let spec = PromptSpec {
        tokens,
        words,
        hash,
        max_tokens,
        ignored: vec![],
    };
    Ok((spec, continue_from))
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

    fn chat(body: serde_json::Value) -> Result<Parsed, Rejected> {
        let raw = body.to_string();
        parse(
            Endpoint::Chat,
            Some("application/json"),
            raw.as_bytes(),
            &SimConfig::default(),
        )
    }

    #[test]
    fn forwarded_prompt_token_ids_replace_the_rendering() {
        use serde_json::json;
        let messages = json!([{"role": "user", "content": "hello there, world"}]);
        let own = crate::prompt::chat_ids(Some(&messages));
        let plain = chat(json!({"messages": messages, "return_token_ids": true}))
            .ok()
            .unwrap();
        assert_eq!(plain.forwarded, None);
        let t = plain.token_ids.as_ref().unwrap();
        assert_eq!(t.prompt, own);
        assert_eq!(t.prompt.len() as u64, plain.prompt_tokens);

        // The messages' own ids: the same prompt in every respect; the key is popped.
        let kv = json!({"prompt_token_ids": own, "do_remote_prefill": true});
        let reused = chat(json!({"messages": messages, "kv_transfer_params": kv}))
            .ok()
            .unwrap();
        assert_eq!(reused.forwarded, Some(Forwarded::Reused));
        assert_eq!(reused.prompt_tokens, plain.prompt_tokens);
        assert_eq!(reused.prompt_hash, plain.prompt_hash);
        assert_eq!(reused.words, plain.words);
        assert_eq!(
            reused.body["kv_transfer_params"],
            json!({"do_remote_prefill": true})
        );
        assert!(reused.token_ids.is_none(), "not asked for");

        // Other ids are another prompt: their count, a hash over them, echoed as numbers.
        let other = chat(json!({"messages": messages, "return_token_ids": true,
            "kv_transfer_params": {"prompt_token_ids": [7, 8, 9]}}))
        .ok()
        .unwrap();
        assert_eq!(other.forwarded, Some(Forwarded::Reused));
        assert_eq!(other.prompt_tokens, 3);
        assert_ne!(other.prompt_hash, plain.prompt_hash);
        assert_eq!(other.words, vec!["7", "8", "9"]);
        let t = other.token_ids.as_ref().unwrap();
        assert_eq!(
            (t.prompt.clone(), t.words.clone()),
            (vec![7, 8, 9], vec![7, 8, 9])
        );

        // null is no ids; completions does not read them (nor pop them).
        let null =
            chat(json!({"messages": messages, "kv_transfer_params": {"prompt_token_ids": null}}))
                .ok()
                .unwrap();
        assert_eq!(null.forwarded, None);
        assert_eq!(null.prompt_tokens, plain.prompt_tokens);
        let raw =
            json!({"prompt": "a b", "kv_transfer_params": {"prompt_token_ids": [1]}}).to_string();
        let cmpl = parse(
            Endpoint::Completions,
            Some("application/json"),
            raw.as_bytes(),
            &SimConfig::default(),
        )
        .ok()
        .unwrap();
        assert_eq!((cmpl.forwarded, cmpl.prompt_tokens), (None, 2));
        assert_eq!(
            cmpl.body["kv_transfer_params"]["prompt_token_ids"],
            json!([1])
        );
    }

    #[test]
    fn malformed_forwarded_ids_are_a_400_unless_ignored() {
        use serde_json::json;
        let messages = json!([{"role": "user", "content": "hi"}]);
        for bad in [
            json!([]),
            json!([1, true]),
            json!([-1]),
            json!("1"),
            json!([1u64 << 40]),
        ] {
            let body =
                json!({"messages": messages, "kv_transfer_params": {"prompt_token_ids": bad}});
            let e = chat(body).err().unwrap().error;
            assert_eq!(
                (e.status, e.kind.as_str()),
                (400, "BadRequestError"),
                "{bad}"
            );
            assert_eq!(e.message, BAD_FORWARDED_IDS);
            assert_eq!(
                e.param.as_deref(),
                Some("kv_transfer_params.prompt_token_ids")
            );
        }
        // `echo` or media: ignored (malformed or not), the messages rendered, the key popped.
        let image = json!([{"role": "user", "content": [{"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]);
        for body in [
            json!({"messages": messages, "echo": true, "kv_transfer_params": {"prompt_token_ids": []}}),
            json!({"messages": messages, "echo": true, "kv_transfer_params": {"prompt_token_ids": [1, 2]}}),
            json!({"messages": image, "kv_transfer_params": {"prompt_token_ids": [1, 2]}}),
        ] {
            let p = chat(body.clone()).ok().unwrap();
            assert_eq!(p.forwarded, Some(Forwarded::Ignored), "{body}");
            let rendered = crate::prompt::chat_ids(body.get("messages"));
            assert_eq!(p.prompt_tokens, rendered.len() as u64, "{body}");
            assert_eq!(p.body["kv_transfer_params"], json!({}), "{body}");
        }
        // The model check comes first, as in vLLM.
        let body = json!({"messages": messages, "model": "nope",
            "kv_transfer_params": {"prompt_token_ids": []}});
        assert_eq!(chat(body).err().unwrap().error.status, 404);
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
