//! vLLM-shaped response bodies and SSE chunks, with key order preserved (serde_json's map
//! sorts keys, so bodies are assembled with an ordered writer instead).

use super::config::Era;
use super::validate::Endpoint;
use bytes::Bytes;
use serde::Serialize;

/// Writes a JSON object whose keys keep insertion order.
pub struct Obj(String);

impl Obj {
    pub fn new() -> Self {
        Obj(String::from("{"))
    }
    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&serde_json::Value::from(k).to_string());
        self.0.push(':');
    }
    pub fn field<T: Serialize + ?Sized>(mut self, k: &str, v: &T) -> Self {
        self.key(k);
        self.0
            .push_str(&serde_json::to_string(v).unwrap_or_else(|_| "null".into()));
        self
    }
    pub fn raw(mut self, k: &str, json: &str) -> Self {
        self.key(k);
        self.0.push_str(json);
        self
    }
    pub fn null(self, k: &str) -> Self {
        self.raw(k, "null")
    }
    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

impl Default for Obj {
    fn default() -> Self {
        Self::new()
    }
}

/// What P tells D about its KV blocks (§7.7 step 4).
#[derive(Clone, Debug)]
pub struct PrefillParams {
    pub era: Era,
    pub block_ids: Vec<u32>,
    pub engine_id: String,
    pub remote_request_id: String,
    pub host: String,
    pub port: u16,
    pub prompt_tokens: u64,
}

impl PrefillParams {
    /// Era A/B/C `kv_transfer_params`, keys in vLLM's order.
    pub fn to_json(&self) -> String {
        let mut o = Obj::new()
            .field("do_remote_prefill", &true)
            .field("do_remote_decode", &false);
        o = match self.era {
            Era::C => o.field("remote_block_ids", &[&self.block_ids]),
            _ => o.field("remote_block_ids", &self.block_ids),
        };
        o = o.field("remote_engine_id", &self.engine_id);
        if self.era != Era::A {
            o = o.field("remote_request_id", &self.remote_request_id);
        }
        o = o
            .field("remote_host", &self.host)
            .field("remote_port", &self.port)
            .field("tp_size", &1);
        if self.era == Era::C {
            o = o
                .field("dcp_size", &1)
                .field("pp_size", &1)
                .field("remote_num_tokens", &self.prompt_tokens)
                .null("remote_blocks_expiry_time")
                .field("transfer_mode", "pull");
        }
        o.finish()
    }
}

/// How `kv_transfer_params` appears in a non-streaming response.
#[derive(Clone, Debug)]
pub enum KvOut {
    /// Key absent (fault `omit_kv_params`).
    Omit,
    Null,
    Params(PrefillParams),
    /// NIXL v1: top-level `remote_*` keys and `kv_transfer_params: null`.
    V1(PrefillParams),
}

/// Common fields of one response or chunk.
pub struct Head<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

impl Head<'_> {
    fn start(&self, chunk: bool) -> Obj {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            // Only completions and chat bodies are built on this head.
            (_, false) => "chat.completion",
            (_, true) => "chat.completion.chunk",
        };
        Obj::new()
            .field("id", self.id)
            .field("object", object)
            .field("created", &self.created)
            .field("model", self.model)
    }
}

pub fn usage(prompt: u64, completion: u64, details: bool) -> String {
    let o = Obj::new()
        .field("prompt_tokens", &prompt)
        .field("total_tokens", &(prompt + completion))
        .field("completion_tokens", &completion);
    if details {
        o.null("prompt_tokens_details")
    } else {
        o
    }
    .finish()
}

/// What a request with `return_token_ids: true` gets back (§7.24): the prompt's ids and the
/// output's (a chunk's own tokens when streaming).
#[derive(Clone, Copy)]
pub struct Ids<'a> {
    /// `None` on the chunks after the first.
    pub prompt: Option<&'a [u64]>,
    pub output: &'a [u64],
}

/// Appends `key` when there are ids to report.
fn opt_ids(o: Obj, key: &str, ids: Option<&[u64]>) -> Obj {
    match ids {
        Some(ids) => o.field(key, ids),
        None => o,
    }
}

/// The full non-streaming body (§1.3 example shape); an encoder's `ec_transfer_params`
/// (JSON, §7.23) comes last when given. `ids` adds vLLM's `token_ids` to the choice and
/// `prompt_token_ids` (chat: top level; completions: the choice).
#[allow(clippy::too_many_arguments)]
pub fn full_response(
    h: &Head,
    text: &str,
    finish: &str,
    prompt: u64,
    completion: u64,
    kv: &KvOut,
    ec: Option<&str>,
    ids: Option<Ids>,
) -> String {
    let output = ids.map(|i| i.output);
    let prompt_ids = ids.and_then(|i| i.prompt);
    let choice = match h.endpoint {
        Endpoint::Completions => {
            let c = Obj::new()
                .field("index", &0)
                .field("text", text)
                .null("logprobs")
                .field("finish_reason", finish)
                .null("stop_reason");
            let c = opt_ids(c, "token_ids", output).null("prompt_logprobs");
            opt_ids(c, "prompt_token_ids", prompt_ids).finish()
        }
        _ => {
            let msg = Obj::new()
                .field("role", "assistant")
                .field("content", text)
                .null("refusal")
                .null("annotations")
                .null("audio")
                .null("function_call")
                .raw("tool_calls", "[]")
                .null("reasoning_content")
                .finish();
            let c = Obj::new()
                .field("index", &0)
                .raw("message", &msg)
                .null("logprobs")
                .field("finish_reason", finish)
                .null("stop_reason");
            opt_ids(c, "token_ids", output).finish()
        }
    };
    let mut o = h
        .start(false)
        .raw("choices", &format!("[{choice}]"))
        .null("service_tier")
        .null("system_fingerprint")
        .raw("usage", &usage(prompt, completion, true));
    if h.endpoint == Endpoint::Chat {
        o = opt_ids(o.null("prompt_logprobs"), "prompt_token_ids", prompt_ids);
    }
    o = kv_fields(o, kv, true);
    if let Some(ec) = ec {
        o = o.raw("ec_transfer_params", ec);
    }
    o.finish()
}

/// Appends `kv_transfer_params` (§7.7 step 4) as the last keys of a body. `keep_null`
/// false drops a null value, for bodies serialized with exclude_none (Messages).
pub fn kv_fields(o: Obj, kv: &KvOut, keep_null: bool) -> Obj {
    match kv {
        KvOut::Omit => o,
        KvOut::Null if keep_null => o.null("kv_transfer_params"),
        KvOut::Null => o,
        KvOut::Params(p) => o.raw("kv_transfer_params", &p.to_json()),
        KvOut::V1(p) => {
            let o = o
                .field("remote_block_ids", &p.block_ids)
                .field("remote_engine_id", &p.engine_id)
                .field("remote_host", &p.host)
                .field("remote_port", &p.port);
            if keep_null {
                o.null("kv_transfer_params")
            } else {
                o
            }
        }
    }
}

pub fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// A named SSE event (`event:` line), as the Responses and Messages APIs send.
pub fn named_sse(event: &str, json: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

/// Chat's first chunk: the assistant role with empty content, and the prompt's ids when
/// asked for (top level, first chunk only, as vLLM sends them).
pub fn role_chunk(h: &Head, prompt_ids: Option<&[u64]>) -> Bytes {
    let choice = Obj::new()
        .field("index", &0)
        .raw("delta", r#"{"role":"assistant","content":""}"#)
        .null("logprobs")
        .null("finish_reason")
        .finish();
    let o = h.start(true).raw("choices", &format!("[{choice}]"));
    sse(&opt_ids(o, "prompt_token_ids", prompt_ids).finish())
}

/// A completions or chat chunk after `text` or `delta`: `finish_reason`, then with `ids`
/// the chunk's `token_ids` and, on the first chunk, `prompt_token_ids` (completions: in the
/// choice, before `token_ids`; chat: top level).
fn chunk(h: &Head, c: Obj, finish: Option<&str>, ids: Option<Ids>) -> Bytes {
    let c = c
        .null("logprobs")
        .field("finish_reason", &finish)
        .null("stop_reason");
    let prompt_ids = ids.and_then(|i| i.prompt);
    let (in_choice, top) = match h.endpoint {
        Endpoint::Completions => (prompt_ids, None),
        _ => (None, prompt_ids),
    };
    let c = opt_ids(
        opt_ids(c, "prompt_token_ids", in_choice),
        "token_ids",
        ids.map(|i| i.output),
    );
    let o = h.start(true).raw("choices", &format!("[{}]", c.finish()));
    sse(&opt_ids(o, "prompt_token_ids", top).finish())
}

/// One token chunk; the last carries `finish_reason`.
pub fn token_chunk(h: &Head, text: &str, finish: Option<&str>, ids: Option<Ids>) -> Bytes {
    let c = Obj::new().field("index", &0);
    let c = match h.endpoint {
        Endpoint::Completions => c.field("text", text),
        _ => c.raw("delta", &Obj::new().field("content", text).finish()),
    };
    chunk(h, c, finish, ids)
}

/// A chunk with no output that only carries `finish_reason` (llm-d's `cache_threshold`):
/// empty `text`, or an empty chat `delta` (and no `token_ids`).
pub fn finish_chunk(h: &Head, finish: &str, ids: Option<Ids>) -> Bytes {
    let c = Obj::new().field("index", &0);
    let c = match h.endpoint {
        Endpoint::Completions => c.field("text", ""),
        _ => c.raw("delta", "{}"),
    };
    chunk(h, c, Some(finish), ids)
}

/// The usage chunk (`choices: []`), serialized with exclude_none as vLLM does.
pub fn usage_chunk(h: &Head, prompt: u64, completion: u64) -> Bytes {
    sse(&h
        .start(true)
        .raw("choices", "[]")
        .raw("usage", &usage(prompt, completion, false))
        .finish())
}

pub fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(era: Era) -> PrefillParams {
        PrefillParams {
            era,
            block_ids: vec![1, 2],
            engine_id: "E".into(),
            remote_request_id: "R".into(),
            host: "h".into(),
            port: 5,
            prompt_tokens: 20,
        }
    }

    #[test]
    fn era_key_order() {
        assert_eq!(
            params(Era::A).to_json(),
            r#"{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[1,2],"remote_engine_id":"E","remote_host":"h","remote_port":5,"tp_size":1}"#
        );
        assert_eq!(
            params(Era::C).to_json(),
            r#"{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[[1,2]],"remote_engine_id":"E","remote_request_id":"R","remote_host":"h","remote_port":5,"tp_size":1,"dcp_size":1,"pp_size":1,"remote_num_tokens":20,"remote_blocks_expiry_time":null,"transfer_mode":"pull"}"#
        );
    }
}
