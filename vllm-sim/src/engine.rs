//! The per-request engine task: faults, FCFS admission, prefill/decode/plain work, token
//! emission (see `engine_work`), and abort handling when the client goes away (§7.7, §7.10).

use super::config::SimConfig;
use super::counters::Class;
use super::decode::{self, DecodeTarget};
use super::faults::Faults;
use super::http_util::{ApiError, Resp, StreamItem};
use super::responses as r;
use super::state::Shared;
use super::validate::Parsed;
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the HTTP handler should answer with.
pub enum Head {
    Full(Resp),
    /// 200 SSE headers; the body is the job's channel.
    Stream,
    /// Close the connection without a response.
    Drop,
}

/// Per-request latency overrides from `x-sim-*` headers.
pub struct Overrides {
    pub ttft_ms: Option<u64>,
    pub itl_ms: Option<u64>,
    pub tokens: Option<u64>,
}

pub(super) enum Outcome {
    Completed,
    Failed,
    Aborted,
    Rejected,
}

pub struct Job {
    pub shared: Arc<Shared>,
    pub seq: u64,
    pub received: Instant,
    pub parsed: Parsed,
    pub class: Class,
    pub target: Option<DecodeTarget>,
    /// Keyed-handoff decode: what it fetches (§7.18–§7.20).
    pub handoff: Option<super::handoff::Target>,
    /// Keyed-handoff prefill: its lease key.
    pub handoff_key: Option<String>,
    /// `remote_kv_source` to pull the prefix from before prefilling (§7.22).
    pub source: Option<super::p2p_source::Source>,
    pub public_id: String,
    pub internal_id: String,
    pub faults: Faults,
    pub overrides: Overrides,
    pub cfg: SimConfig,
    pub head: Option<oneshot::Sender<Head>>,
    pub tx: mpsc::Sender<StreamItem>,
    pub blocks: Vec<u32>,
    pub admitted: bool,
    pub status: Option<u16>,
    pub events_sent: u64,
    pub first_byte_ms: Option<u64>,
    pub disconnect_at_ms: Option<u64>,
    pub tokens: u64,
    pub finish_reason: &'static str,
    /// The effective output limit, known once generation starts.
    pub limit: u64,
}

impl Job {
    pub async fn run(mut self) {
        let outcome = self.drive().await;
        self.finish(outcome);
    }

    pub(super) fn ms_since_received(&self) -> u64 {
        self.received.elapsed().as_millis() as u64
    }

    /// Runs `f` unless the client disconnects first (receiver dropped by hyper).
    pub(super) async fn abortable<F: Future>(&self, f: F) -> Option<F::Output> {
        let tx = self.tx.clone();
        tokio::select! {
            biased;
            _ = tx.closed() => None,
            v = f => Some(v),
        }
    }

    pub(super) fn client_gone(&self) -> bool {
        self.tx.is_closed()
    }

    pub(super) fn send_head(&mut self, h: Head, status: Option<u16>) {
        self.status = status;
        if status.is_some() {
            self.first_byte_ms = Some(self.ms_since_received());
        }
        if let Some(tx) = self.head.take() {
            let _ = tx.send(h);
        }
    }

    pub(super) fn error_head(&mut self, e: &ApiError) {
        let resp = super::wire::error_response(self.parsed.endpoint, e, self.cfg.error_format);
        self.send_head(Head::Full(resp), Some(e.status));
    }

    /// Sends one SSE event as its own frame; false if the client is gone.
    pub(super) async fn event(&mut self, b: Bytes) -> bool {
        if self.tx.send(StreamItem::Event(b)).await.is_err() {
            return false;
        }
        self.events_sent += 1;
        true
    }

    pub(super) fn head_view(&self) -> r::Head<'_> {
        r::Head {
            endpoint: self.parsed.endpoint,
            id: &self.public_id,
            created: self.shared.created_unix
                + self.received.duration_since(self.shared.started).as_secs(),
            model: &self.parsed.model,
        }
    }

    async fn drive(&mut self) -> Outcome {
        if let Some(ms) = self.faults.stall_ms {
            if self
                .abortable(tokio::time::sleep(Duration::from_millis(ms)))
                .await
                .is_none()
            {
                return self.on_abort().await;
            }
        }
        if self.faults.drop_before_headers {
            self.send_head(Head::Drop, None);
            return Outcome::Failed;
        }
        if self.faults.dead {
            self.error_head(&ApiError::internal());
            return Outcome::Failed;
        }
        let injected = match self.class {
            Class::Prefill => self.faults.prefill_http,
            Class::Decode => self.faults.decode_http,
            Class::Plain if self.encoding() => self.faults.encode_http,
            Class::Plain => None,
        };
        if let Some(code) = injected {
            self.error_head(&ApiError::for_status(code));
            return if code < 500 {
                Outcome::Rejected
            } else {
                Outcome::Failed
            };
        }
        if self.parsed.stream {
            self.send_head(Head::Stream, Some(200));
        }
        match self.abortable(self.admit()).await {
            Some(blocks) => self.set_admitted(blocks),
            None => return self.on_abort().await,
        }
        if self.encoding() {
            return self.encode().await;
        }
        if let Some(o) = self.first_token_wait().await {
            return o;
        }
        self.generate().await
    }

    /// FCFS admission: wait at the head of the queue until a seq slot and enough free
    /// blocks exist, then take both atomically (§7.7 step 1).
    async fn admit(&self) -> Vec<u32> {
        let need = self
            .parsed
            .prompt_tokens
            .div_ceil(self.cfg.block_size.max(1));
        let mut rx = self.shared.subscribe();
        loop {
            let got = self.shared.update_if(|i| {
                if i.queue.front() != Some(&self.seq) || i.running >= i.cfg.max_num_seqs {
                    return (None, false);
                }
                let Some(ids) = i.kv.alloc(need) else {
                    return (None, false);
                };
                i.queue.pop_front();
                i.running += 1;
                if let Some(f) = i.in_flight.get_mut(&self.seq) {
                    f.queued = false;
                }
                (Some(ids), true)
            });
            if let Some(ids) = got {
                return ids;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(super) fn jittered(&self, ms: f64) -> Duration {
        self.shared.update_if(|i| (i.jitter(ms), false))
    }

    /// Client went away. A decode still queued tells its prefiller to free (vllm #19223).
    pub(super) async fn on_abort(&mut self) -> Outcome {
        let at = self.ms_since_received();
        self.disconnect_at_ms = Some(at);
        tracing::info!(seq = self.seq, class = self.class.as_str(), id = %self.internal_id, disconnect_at_ms = at, "client disconnected; request aborted");
        if self.class == Class::Decode && !self.admitted {
            if let Some(t) = self.target.clone() {
                if decode::notify(
                    &self.shared,
                    &t.endpoint,
                    &t.remote_request_id,
                    "decode_aborted",
                )
                .await
                {
                    self.shared
                        .update(|i| i.counters.decode_abort_notifies_sent += 1);
                }
            }
        }
        Outcome::Aborted
    }

    /// Frees what the request still holds, leaves the in-flight table, and counts the outcome.
    fn finish(&mut self, o: Outcome) {
        let seq = self.seq;
        let class = self.class;
        let (status, events, fb, dc) = (
            self.status,
            self.events_sent,
            self.first_byte_ms,
            self.disconnect_at_ms,
        );
        let (prompt, tokens, reason) = (self.parsed.prompt_tokens, self.tokens, self.finish_reason);
        // A `cache_threshold` answer computed nothing, and an encoder no KV, so neither can
        // serve as a KV source.
        let computed = matches!(o, Outcome::Completed)
            && reason != super::engine_work::CACHE_THRESHOLD
            && !self.encoding();
        let hash = &self.parsed.prompt_hash;
        let blocks = std::mem::take(&mut self.blocks);
        let failed_key = match o {
            Outcome::Completed => None,
            _ => self.handoff_key.clone(),
        };
        self.shared.update(|i| {
            i.kv.free_running(&blocks);
            if computed {
                i.computed.insert(hash, prompt);
            }
            if let Some(k) = &failed_key {
                // No lease for this key (or one made just before a late abort): the decoder
                // waiting on it fails now rather than at its timeout.
                i.mark_handoff_failed(k);
            }
            let was_running = i.in_flight.get(&seq).is_some_and(|f| !f.queued);
            if was_running {
                i.running = i.running.saturating_sub(1);
            }
            i.queue.retain(|s| *s != seq);
            i.in_flight.remove(&seq);
            let c = &mut i.counters;
            let outcome = match o {
                Outcome::Completed => {
                    c.completed(class);
                    c.prompt_tokens_total += prompt;
                    c.generation_tokens_total += tokens;
                    *c.success_by_reason.entry(reason.to_string()).or_default() += 1;
                    "completed"
                }
                Outcome::Failed => {
                    c.requests_failed += 1;
                    "failed"
                }
                Outcome::Rejected => {
                    c.requests_rejected += 1;
                    "rejected"
                }
                Outcome::Aborted => {
                    c.requests_aborted.bump(class);
                    c.client_disconnects += 1;
                    c.http_client_disconnected += 1;
                    "aborted"
                }
            };
            if let Some(r) = i.log.get_mut(seq) {
                r.status = status;
                r.outcome = Some(outcome);
                r.events_sent = events;
                r.first_byte_ms = fb;
                r.disconnect_at_ms = dc;
            }
        });
    }
}

impl Job {
    /// Called by admission to remember the blocks it took.
    fn set_admitted(&mut self, blocks: Vec<u32>) {
        self.blocks = blocks;
        self.admitted = true;
    }
}
