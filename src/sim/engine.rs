//! The per-request engine task: faults, FCFS admission, prefill/decode/plain work, token
//! emission, lease creation, and abort handling when the client goes away (§7.7, §7.10, §7.11).

use super::config::{Era, LeaseMode, OutputMode, Protocol, SimConfig};
use super::counters::Class;
use super::decode::{self, DecodeTarget};
use super::faults::Faults;
use super::http_util::{call, ApiError, Resp, StreamItem};
use super::kv::{Lease, LeaseState};
use super::responses::{self as r, KvOut, PrefillParams};
use super::state::Shared;
use super::validate::{Endpoint, Parsed};
use bytes::Bytes;
use http::StatusCode;
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

enum Outcome {
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
}

impl Job {
    pub async fn run(mut self) {
        let outcome = self.drive().await;
        self.finish(outcome);
    }

    fn ms_since_received(&self) -> u64 {
        self.received.elapsed().as_millis() as u64
    }

    /// Runs `f` unless the client disconnects first (receiver dropped by hyper).
    async fn abortable<F: Future>(&self, f: F) -> Option<F::Output> {
        let tx = self.tx.clone();
        tokio::select! {
            biased;
            _ = tx.closed() => None,
            v = f => Some(v),
        }
    }

    fn client_gone(&self) -> bool {
        self.tx.is_closed()
    }

    fn send_head(&mut self, h: Head, status: Option<u16>) {
        self.status = status;
        if status.is_some() {
            self.first_byte_ms = Some(self.ms_since_received());
        }
        if let Some(tx) = self.head.take() {
            let _ = tx.send(h);
        }
    }

    fn error_head(&mut self, e: &ApiError) {
        let resp = e.response(self.cfg.error_format);
        self.send_head(Head::Full(resp), Some(e.status));
    }

    /// Sends one SSE event as its own frame; false if the client is gone.
    async fn event(&mut self, b: Bytes) -> bool {
        if self.tx.send(StreamItem::Event(b)).await.is_err() {
            return false;
        }
        self.events_sent += 1;
        true
    }

    fn head_view(&self) -> r::Head<'_> {
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

    fn jittered(&self, ms: f64) -> Duration {
        self.shared.update_if(|i| (i.jitter(ms), false))
    }

    /// Prefill (TTFT), KV pull (decode) or LMCache lookup; `Some` ends the request early.
    async fn first_token_wait(&mut self) -> Option<Outcome> {
        let prompt = self.parsed.prompt_tokens as f64;
        let full_prefill = self
            .overrides
            .ttft_ms
            .map(|t| t as f64)
            .unwrap_or(self.cfg.ttft_ms as f64 + self.cfg.prefill_ms_per_token * prompt);
        let transfer =
            self.overrides.ttft_ms.map(|t| t as f64).unwrap_or(
                self.cfg.kv_transfer_ms as f64 + self.cfg.kv_transfer_ms_per_token * prompt,
            );
        if let Some(t) = self.target.clone() {
            // Not abortable: vLLM lets an in-flight transfer finish so P frees on completion.
            let d = self.jittered(transfer);
            let res = decode::pull(
                &self.shared,
                &t,
                d,
                self.parsed.prompt_tokens,
                &self.parsed.prompt_hash,
                self.faults.side_channel_down,
            )
            .await;
            let seq = self.seq;
            self.shared.update(|i| {
                if let Some(f) = i.in_flight.get_mut(&seq) {
                    f.pull = None;
                }
            });
            if let Err(e) = res {
                tracing::warn!(id = %self.internal_id, error = %e.0, "KV load failure");
                self.shared
                    .update(|i| i.counters.decode_kv_load_failures += 1);
                return Some(self.fail_generation().await);
            }
            if self.client_gone() {
                return Some(self.on_abort().await);
            }
            return None;
        }
        let wait = if self.cfg.protocol == Protocol::Lmcache && self.class == Class::Decode {
            if self.lmcache_hit().await {
                self.shared.update(|i| i.counters.lmcache_hits += 1);
                transfer
            } else {
                self.shared.update(|i| i.counters.lmcache_misses += 1);
                full_prefill
            }
        } else {
            full_prefill
        };
        let d = self.jittered(wait);
        if self.abortable(tokio::time::sleep(d)).await.is_none() {
            return Some(self.on_abort().await);
        }
        None
    }

    async fn lmcache_hit(&self) -> bool {
        let hash = &self.parsed.prompt_hash;
        if let Some(peer) = &self.cfg.lmcache_peer {
            let addr = peer.trim_start_matches("http://").trim_end_matches('/');
            let path = format!("/lmcache/has?hash={hash}");
            if let Ok((200, b)) = call(addr, "GET", &path, None, Duration::from_secs(5)).await {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if v.get("has").and_then(|h| h.as_bool()) == Some(true) {
                    return true;
                }
            } else {
                self.shared.update(|i| i.counters.side_channel_errors += 1);
            }
        }
        self.shared.read(|i| i.lmcache.contains(hash))
    }

    /// KV load failure: 500 non-streaming; error event + [DONE] when streaming (§7.10.1).
    async fn fail_generation(&mut self) -> Outcome {
        let e = ApiError::internal();
        if self.parsed.stream {
            let _ = self.event(e.sse_event()).await;
            let _ = self.event(r::done_event()).await;
        } else {
            self.error_head(&e);
        }
        Outcome::Failed
    }

    fn token_text(&self, i: u64) -> String {
        match self.cfg.mode {
            OutputMode::Echo if !self.parsed.words.is_empty() => {
                let w = &self.parsed.words[(i as usize) % self.parsed.words.len()];
                format!(" {w}")
            }
            _ => format!(" t{i}"),
        }
    }

    async fn generate(&mut self) -> Outcome {
        let max = self
            .parsed
            .max_tokens
            .unwrap_or(match self.parsed.endpoint {
                Endpoint::Completions => 16,
                Endpoint::Chat => self.cfg.default_max_tokens_chat,
            });
        let natural = self.cfg.eos_after.map_or(max, |e| e.min(max));
        let k = self.overrides.tokens.unwrap_or(natural).max(1);
        self.tokens = k;
        self.finish_reason = if k == max { "length" } else { "stop" };
        let itl = self.overrides.itl_ms.unwrap_or(self.cfg.itl_ms) as f64;
        if self.parsed.stream {
            if self.faults.drop_after_tokens == Some(0) {
                let _ = self.tx.send(StreamItem::Abort).await;
                return Outcome::Failed;
            }
            for i in 0..k {
                if i > 0 {
                    let d = self.jittered(itl);
                    if self.abortable(tokio::time::sleep(d)).await.is_none() {
                        return self.on_abort().await;
                    }
                }
                if i == 0 && self.parsed.endpoint == Endpoint::Chat {
                    let c = r::role_chunk(&self.head_view());
                    if !self.event(c).await {
                        return self.on_abort().await;
                    }
                }
                let finish = (i + 1 == k).then_some(self.finish_reason);
                let c = r::token_chunk(&self.head_view(), &self.token_text(i), finish);
                if !self.event(c).await {
                    return self.on_abort().await;
                }
                if self.faults.drop_after_tokens == Some(i + 1) {
                    let _ = self.tx.send(StreamItem::Abort).await;
                    return Outcome::Failed;
                }
            }
        } else {
            let d = self.jittered(itl * (k - 1) as f64);
            if self.abortable(tokio::time::sleep(d)).await.is_none() {
                return self.on_abort().await;
            }
            if self.faults.drop_after_tokens.is_some() {
                self.send_head(Head::Drop, None);
                return Outcome::Failed;
            }
        }
        self.complete().await
    }

    /// Creates the prefill lease (or not, §7.7 step 3) and writes the final response.
    async fn complete(&mut self) -> Outcome {
        let is_pd_prefill = self.class == Class::Prefill && self.cfg.protocol != Protocol::Lmcache;
        if !self.parsed.stream && self.client_gone() {
            // Not written yet: this is an abort, not a completion (post-#29987 semantics).
            return self.on_abort().await;
        }
        let mut kv = KvOut::Null;
        if is_pd_prefill {
            let capped_ok = self.finish_reason == "length" || self.cfg.kv_params_era == Era::C;
            if capped_ok {
                let p = self.make_lease();
                kv = if self.faults.omit_kv_params {
                    KvOut::Omit
                } else if self.faults.null_kv_params {
                    KvOut::Null
                } else if self.cfg.protocol == Protocol::NixlV1 {
                    KvOut::V1(p)
                } else {
                    KvOut::Params(p)
                };
                if self.parsed.stream {
                    self.shared
                        .update(|i| i.counters.prefill_streamed_params_unreported += 1);
                }
            } else {
                self.shared
                    .update(|i| i.counters.prefill_no_params_stop += 1);
            }
        } else if self.cfg.protocol == Protocol::Lmcache && self.class == Class::Prefill {
            let h = self.parsed.prompt_hash.clone();
            self.shared.update(|i| i.lmcache.insert(h));
        }
        let prompt = self.parsed.prompt_tokens;
        if self.parsed.stream {
            if self.parsed.include_usage {
                let c = r::usage_chunk(&self.head_view(), prompt, self.tokens);
                if !self.event(c).await {
                    return self.on_abort().await;
                }
            }
            if !self.event(r::done_event()).await {
                return self.on_abort().await;
            }
        } else {
            let text: String = (0..self.tokens).map(|i| self.token_text(i)).collect();
            let body = r::full_response(
                &self.head_view(),
                &text,
                self.finish_reason,
                prompt,
                self.tokens,
                &kv,
            );
            let resp = super::http_util::bytes_response(
                StatusCode::OK,
                "application/json",
                Bytes::from(body),
            );
            self.send_head(Head::Full(resp), Some(200));
        }
        Outcome::Completed
    }

    /// Moves this request's running blocks into a held lease and returns the params.
    fn make_lease(&mut self) -> PrefillParams {
        let now = Instant::now();
        let blocks = std::mem::take(&mut self.blocks);
        let lease = self.shared.read(|i| match i.cfg.effective_lease_mode() {
            LeaseMode::Fixed => Duration::from_millis(i.cfg.abort_request_timeout_ms),
            LeaseMode::Heartbeat => Duration::from_millis(i.cfg.kv_lease_duration_ms),
        });
        let l = Lease {
            remote_request_id: self.internal_id.clone(),
            engine_id: self.shared.engine_id.clone(),
            block_ids: blocks.clone(),
            prompt_tokens: self.parsed.prompt_tokens,
            prompt_hash: self.parsed.prompt_hash.clone(),
            created_at: now,
            expires_at: now + lease,
            heartbeats: 0,
            state: LeaseState::Held,
        };
        self.shared.update(|i| i.create_lease(l));
        PrefillParams {
            era: self.cfg.kv_params_era,
            block_ids: blocks,
            engine_id: self.shared.engine_id.clone(),
            remote_request_id: self.internal_id.clone(),
            host: self.shared.advertised_host.clone(),
            port: self.shared.side_addr.port(),
            prompt_tokens: self.parsed.prompt_tokens,
        }
    }

    /// Client went away. A decode still queued tells its prefiller to free (vllm #19223).
    async fn on_abort(&mut self) -> Outcome {
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
        let blocks = std::mem::take(&mut self.blocks);
        self.shared.update(|i| {
            i.kv.free_running(&blocks);
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
