//! Per-endpoint wire format of a running request: the stream's opening, token and closing
//! events, the non-streaming body and the error shapes, dispatched on the endpoint so the
//! engine's timing and accounting stay the same for every route.

use super::api_generate as generate;
use super::api_messages as messages;
use super::api_responses as responses;
use super::config::{ErrorFormat, OutputMode};
use super::engine::Job;
use super::http_util::{ApiError, Resp};
use super::prompt::token_id;
use super::responses::{self as r, KvOut};
use super::validate::Endpoint;
use bytes::Bytes;

/// A non-streaming error response in the endpoint's shape.
pub fn error_response(endpoint: Endpoint, e: &ApiError, fmt: ErrorFormat) -> Resp {
    match endpoint {
        Endpoint::Messages => messages::error_response(e, fmt),
        _ => e.response(fmt),
    }
}

impl Job {
    fn responses_view(&self) -> responses::View<'_> {
        let h = self.head_view();
        responses::View {
            id: h.id,
            created: h.created,
            model: h.model,
            body: &self.parsed.body,
            limit: self.limit,
            prompt: self.parsed.prompt_tokens,
        }
    }

    /// Output token i as an id (generate API): its index, or with `--mode echo` the
    /// prompt's ids in a cycle, as `token_text` does for text.
    pub(super) fn token_id(&self, i: u64) -> u64 {
        let words = &self.parsed.words;
        match self.cfg.mode {
            OutputMode::Echo if !words.is_empty() => {
                words[(i as usize) % words.len()].parse().unwrap_or(i)
            }
            _ => i,
        }
    }

    /// Output token i's id for `return_token_ids` (completions and chat): the id of the
    /// word `token_text` gives, `t<n>` or the echoed prompt token.
    pub(super) fn output_id(&self, i: u64) -> u64 {
        let n = i + self.parsed.continue_from.unwrap_or(0);
        match (self.cfg.mode, &self.parsed.token_ids) {
            (OutputMode::Echo, Some(t)) if !t.words.is_empty() => {
                t.words[(n as usize) % t.words.len()]
            }
            _ => token_id(&format!("t{n}")),
        }
    }

    /// `return_token_ids` for the next completions or chat chunk, whose own tokens are
    /// `output`: the prompt's ids ride on the first chunk only.
    pub(super) fn chunk_ids<'a>(&'a self, output: &'a [u64]) -> Option<r::Ids<'a>> {
        let t = self.parsed.token_ids.as_ref()?;
        Some(r::Ids {
            prompt: (self.events_sent == 0).then_some(&t.prompt[..]),
            output,
        })
    }

    fn full_text(&self) -> String {
        (0..self.tokens).map(|i| self.token_text(i)).collect()
    }

    /// Events sent right before token 0.
    pub(super) fn stream_start(&self) -> Vec<Bytes> {
        match self.parsed.endpoint {
            Endpoint::Chat => {
                let ids = self.chunk_ids(&[]).and_then(|i| i.prompt);
                vec![r::role_chunk(&self.head_view(), ids)]
            }
            Endpoint::Responses => self.responses_view().stream_start(self.events_sent),
            Endpoint::Messages => messages::stream_start(
                &self.public_id,
                &self.parsed.model,
                self.parsed.prompt_tokens,
            ),
            Endpoint::Completions | Endpoint::Generate => vec![],
        }
    }

    /// Token i's event; `finish` on the last.
    pub(super) fn token_event(&self, i: u64, finish: Option<&str>) -> Bytes {
        let text = self.token_text(i);
        match self.parsed.endpoint {
            Endpoint::Completions | Endpoint::Chat => {
                let id = [self.output_id(i)];
                r::token_chunk(&self.head_view(), &text, finish, self.chunk_ids(&id))
            }
            Endpoint::Responses => self.responses_view().token_event(&text, self.events_sent),
            Endpoint::Messages => messages::token_event(&text),
            Endpoint::Generate => generate::token_chunk(&self.public_id, self.token_id(i), finish),
        }
    }

    /// Events after the last token: usage and `[DONE]`, or the API's closing events.
    pub(super) fn stream_end(&self) -> Vec<Bytes> {
        let (prompt, k) = (self.parsed.prompt_tokens, self.tokens);
        let mut out = Vec::new();
        match self.parsed.endpoint {
            Endpoint::Completions | Endpoint::Chat | Endpoint::Generate => {
                if self.parsed.include_usage {
                    out.push(if self.parsed.endpoint == Endpoint::Generate {
                        generate::usage_chunk(&self.public_id, prompt, k)
                    } else {
                        r::usage_chunk(&self.head_view(), prompt, k)
                    });
                }
                out.push(r::done_event());
            }
            Endpoint::Responses => {
                out = self.responses_view().stream_end(
                    &self.full_text(),
                    k,
                    self.finish_reason,
                    self.events_sent,
                )
            }
            Endpoint::Messages => out = messages::stream_end(self.finish_reason, prompt, k),
        }
        out
    }

    /// The non-streaming 200 body.
    pub(super) fn full_body(&self, kv: &KvOut) -> String {
        let (prompt, k, finish) = (self.parsed.prompt_tokens, self.tokens, self.finish_reason);
        let h = self.head_view();
        match self.parsed.endpoint {
            Endpoint::Completions | Endpoint::Chat => {
                let ec = self.encoding().then(|| self.ec_transfer_params());
                let out: Vec<u64> = (0..k).map(|i| self.output_id(i)).collect();
                let ids = self.parsed.token_ids.as_ref().map(|t| r::Ids {
                    prompt: Some(&t.prompt),
                    output: &out,
                });
                let text = self.full_text();
                r::full_response(&h, &text, finish, prompt, k, kv, ec.as_deref(), ids)
            }
            Endpoint::Responses => {
                self.responses_view()
                    .response(&self.full_text(), Some((k, finish)), kv)
            }
            Endpoint::Messages => {
                messages::full_response(h.id, h.model, &self.full_text(), finish, prompt, k, kv)
            }
            Endpoint::Generate => {
                let ids: Vec<u64> = (0..k).map(|i| self.token_id(i)).collect();
                generate::full_response(h.id, h.model, h.created, &ids, finish, prompt, kv)
            }
        }
    }

    /// A failure after the SSE headers: vLLM's error event (and `[DONE]` where the API
    /// ends streams with it).
    pub(super) fn stream_error(&self, e: &ApiError) -> Vec<Bytes> {
        match self.parsed.endpoint {
            Endpoint::Completions | Endpoint::Chat | Endpoint::Generate => {
                vec![e.sse_event(), r::done_event()]
            }
            Endpoint::Responses => vec![responses::stream_error(e, self.events_sent)],
            Endpoint::Messages => vec![messages::stream_error(e)],
        }
    }
}
