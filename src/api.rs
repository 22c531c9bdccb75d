//! The inference APIs the sidecar disaggregates, and what a one-token prefill changes in each.
//!
//! Every P/D route's decode leg is the client's request plus the connector's transfer fields,
//! so the fields changed here keep their original presence and value on the decode leg
//! without being restored one by one.

use bytes::Bytes;

use crate::json_edit::{Edit, JsonObject};

/// A P/D route, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/messages` (Anthropic's Messages API, served by vLLM).
    Messages,
    /// `POST /v1/responses` (OpenAI's Responses API).
    Responses,
    /// `POST /inference/v1/generate` (vLLM's tokens-in, tokens-out API).
    Generate,
}

/// Edits for the completion-style APIs: one token, no streaming, no option vLLM rejects with
/// `max_tokens=1` (`min_tokens` above 1, `stream_options` without `stream`), and nothing that
/// makes the reply large (prompt logprobs, echo) or forks the request (`n`, `best_of`: each
/// extra sequence would pin KV blocks no decoder is told about).
const COMPLETIONS: [(&str, Edit<'static>); 12] = [
    ("stream", Edit::Set("false")),
    ("stream_options", Edit::Remove),
    ("max_tokens", Edit::Set("1")),
    ("max_completion_tokens", Edit::Set("1")),
    ("min_tokens", Edit::Remove),
    ("min_completion_tokens", Edit::Remove),
    ("n", Edit::Remove),
    ("best_of", Edit::Remove),
    ("prompt_logprobs", Edit::Remove),
    ("echo", Edit::Remove),
    ("logprobs", Edit::Remove),
    ("top_logprobs", Edit::Remove),
];

/// Anthropic's request has `max_tokens` (required) and no `max_completion_tokens`; vLLM's
/// extensions are capped only where the client set them, so no field appears from nowhere.
const MESSAGES: [(&str, Edit<'static>); 6] = [
    ("stream", Edit::Set("false")),
    ("stream_options", Edit::Remove),
    ("max_tokens", Edit::Set("1")),
    ("max_completion_tokens", Edit::Replace("1")),
    ("min_tokens", Edit::Remove),
    ("top_logprobs", Edit::Remove),
];

/// The Responses API's limit is `max_output_tokens`. A `background` prefill would answer at
/// once with a queued response and no transfer parameters, so the prefill runs in the
/// foreground.
const RESPONSES: [(&str, Edit<'static>); 6] = [
    ("stream", Edit::Set("false")),
    ("stream_options", Edit::Remove),
    ("max_output_tokens", Edit::Set("1")),
    ("background", Edit::Remove),
    ("min_tokens", Edit::Remove),
    ("top_logprobs", Edit::Remove),
];

/// The generate API's top level; its token limits live in `sampling_params`
/// ([`SAMPLING_PARAMS`]).
const GENERATE: [(&str, Edit<'static>); 2] = [
    ("stream", Edit::Set("false")),
    ("stream_options", Edit::Remove),
];

/// The one-token edits inside the generate API's `sampling_params`, as for completions.
const SAMPLING_PARAMS: [(&str, Edit<'static>); 7] = [
    ("max_tokens", Edit::Set("1")),
    ("min_tokens", Edit::Remove),
    ("n", Edit::Remove),
    ("best_of", Edit::Remove),
    ("prompt_logprobs", Edit::Remove),
    ("logprobs", Edit::Remove),
    ("output_kind", Edit::Remove),
];

impl Api {
    pub const ALL: [Api; 5] = [
        Api::Completions,
        Api::ChatCompletions,
        Api::Messages,
        Api::Responses,
        Api::Generate,
    ];

    /// The API served at `path`, if it is a P/D route.
    pub fn for_path(path: &str) -> Option<Api> {
        Some(match path {
            "/v1/completions" => Api::Completions,
            "/v1/chat/completions" => Api::ChatCompletions,
            "/v1/messages" => Api::Messages,
            "/v1/responses" => Api::Responses,
            "/inference/v1/generate" => Api::Generate,
            _ => return None,
        })
    }

    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::ChatCompletions => "/v1/chat/completions",
            Api::Messages => "/v1/messages",
            Api::Responses => "/v1/responses",
            Api::Generate => "/inference/v1/generate",
        }
    }

    /// The top-level edits of a one-token prefill (for the generate API, `sampling_params`
    /// is edited too: see [`Api::prefill_edits`]).
    pub fn one_token_edits(self) -> &'static [(&'static str, Edit<'static>)] {
        match self {
            Api::Completions | Api::ChatCompletions => &COMPLETIONS,
            Api::Messages => &MESSAGES,
            Api::Responses => &RESPONSES,
            Api::Generate => &GENERATE,
        }
    }

    /// Every edit of a one-token prefill of `request`. `scratch` holds the rewritten
    /// `sampling_params` of a generate request, which the edits borrow.
    pub fn prefill_edits<'s>(
        self,
        request: &JsonObject<'_>,
        scratch: &'s mut String,
    ) -> Vec<(&'static str, Edit<'s>)> {
        let mut edits: Vec<(&'static str, Edit<'s>)> = self.one_token_edits().to_vec();
        if self == Api::Generate {
            if let Some(params) = one_token_sampling_params(request) {
                *scratch = params;
                edits.push(("sampling_params", Edit::Set(scratch.as_str())));
            }
        }
        edits
    }
}

/// The generate request's `sampling_params` capped to one token: created when absent. A
/// value that is not an object is left for vLLM to refuse (`None`).
fn one_token_sampling_params(request: &JsonObject<'_>) -> Option<String> {
    let Some(raw) = request.get("sampling_params") else {
        return Some(r#"{"max_tokens":1}"#.to_owned());
    };
    if raw.get() == "null" {
        return Some(r#"{"max_tokens":1}"#.to_owned());
    }
    let source = Bytes::copy_from_slice(raw.get().as_bytes());
    let params = JsonObject::parse(&source).ok()?;
    let edited = params.rewrite(&SAMPLING_PARAMS).to_vec();
    // The rewrite of valid JSON is valid JSON, hence UTF-8.
    String::from_utf8(edited).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill(api: Api, body: &'static str) -> String {
        let source = Bytes::from_static(body.as_bytes());
        let obj = JsonObject::parse(&source).unwrap();
        let mut scratch = String::new();
        let edits = api.prefill_edits(&obj, &mut scratch);
        String::from_utf8(obj.rewrite(&edits).to_vec()).unwrap()
    }

    #[test]
    fn paths_round_trip() {
        for api in Api::ALL {
            assert_eq!(Api::for_path(api.path()), Some(api));
        }
        assert_eq!(Api::for_path("/v1/embeddings"), None);
        assert_eq!(Api::for_path("/v1/completions/"), None);
    }

    #[test]
    fn messages_cap_max_tokens_and_add_nothing_else() {
        assert_eq!(
            prefill(
                Api::Messages,
                r#"{"model":"m","max_tokens":300,"messages":[{"role":"user","content":"hi"}],"stream":true}"#
            ),
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"stream":false}"#
        );
        assert_eq!(
            prefill(
                Api::Messages,
                r#"{"max_tokens":9,"max_completion_tokens":9,"min_tokens":3}"#
            ),
            r#"{"max_tokens":1,"max_completion_tokens":1,"stream":false}"#
        );
    }

    #[test]
    fn responses_cap_max_output_tokens_in_the_foreground() {
        assert_eq!(
            prefill(
                Api::Responses,
                r#"{"model":"m","input":"hi","stream":true,"background":true,"max_output_tokens":64}"#
            ),
            r#"{"model":"m","input":"hi","stream":false,"max_output_tokens":1}"#
        );
        assert_eq!(
            prefill(Api::Responses, r#"{"input":"hi"}"#),
            r#"{"input":"hi","stream":false,"max_output_tokens":1}"#
        );
    }

    #[test]
    fn generate_caps_inside_sampling_params_and_creates_them_if_absent() {
        assert_eq!(
            prefill(
                Api::Generate,
                r#"{"token_ids":[1,2,3],"sampling_params":{"temperature":0,"max_tokens":50,"min_tokens":5,"n":2},"stream":true}"#
            ),
            r#"{"token_ids":[1,2,3],"sampling_params":{"temperature":0,"max_tokens":1},"stream":false}"#
        );
        assert_eq!(
            prefill(Api::Generate, r#"{"token_ids":[1]}"#),
            r#"{"token_ids":[1],"stream":false,"sampling_params":{"max_tokens":1}}"#
        );
        assert_eq!(
            prefill(Api::Generate, r#"{"token_ids":[1],"sampling_params":null}"#),
            r#"{"token_ids":[1],"sampling_params":{"max_tokens":1},"stream":false}"#
        );
        // Not an object: vLLM refuses it, with its own message.
        assert_eq!(
            prefill(Api::Generate, r#"{"token_ids":[1],"sampling_params":"x"}"#),
            r#"{"token_ids":[1],"sampling_params":"x","stream":false}"#
        );
    }
}
