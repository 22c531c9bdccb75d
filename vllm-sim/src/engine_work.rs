//! Running phase of an engine task: the KV pull or prefill wait before the first token,
//! token emission, and the prefill lease with its `kv_transfer_params` (§7.7, §7.10, §7.11).

use super::config::{Era, LeaseMode, OutputMode, Protocol};
use super::counters::Class;
use super::decode;
use super::engine::{Head, Job, Outcome};
use super::handoff;
use super::http_util::{bytes_response, call, ApiError, StreamItem};
use super::kv::{Lease, LeaseState};
use super::p2p_source::{self, Pulled};
use super::responses::{finish_chunk, KvOut, PrefillParams};
use bytes::Bytes;
use http::StatusCode;
use std::time::{Duration, Instant};

/// llm-d's finish reason for a decode refused below its `cache_hit_threshold`.
pub(super) const CACHE_THRESHOLD: &str = "cache_threshold";

impl Job {
    /// Prefill (TTFT), KV pull (decode) or LMCache lookup; `Some` ends the request early.
    pub(super) async fn first_token_wait(&mut self) -> Option<Outcome> {
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
        if let Some(t) = self.handoff.clone() {
            return self.handoff_wait(&t, transfer, full_prefill).await;
        }
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
            let hit = self.lmcache_hit().await;
            // llm-d's decode-first protocol: the hit rate is all (1.0) or nothing (0.0),
            // the store being keyed on the whole prompt.
            let rate = if hit { 1.0 } else { 0.0 };
            if self.parsed.cache_hit_threshold.is_some_and(|t| rate < t) {
                return Some(self.cache_threshold_reply().await);
            }
            self.shared.update(|i| {
                if hit {
                    i.counters.lmcache_hits += 1
                } else {
                    i.counters.lmcache_misses += 1
                }
            });
            if hit {
                transfer
            } else {
                full_prefill
            }
        } else if let Some(s) = self.source.clone() {
            let asked = p2p_source::ask(
                &self.shared,
                &s,
                &self.parsed.prompt_hash,
                self.faults.side_channel_down,
            );
            // Cancellable: dropping the lookup closes its connection; nothing is held on
            // either side.
            let Some(pulled) = self.abortable(asked).await else {
                return Some(self.on_abort().await);
            };
            tracing::info!(id = %self.internal_id, source = %s.endpoint, kv_request_id = %s.kv_request_id, result = pulled.as_str(), "P2P source pull");
            let seq = self.seq;
            self.shared.update(|i| {
                let c = &mut i.counters;
                match pulled {
                    Pulled::Hit => c.p2p_source_hits += 1,
                    Pulled::Miss => c.p2p_source_misses += 1,
                    Pulled::Error => c.p2p_source_errors += 1,
                }
                if let Some(r) = i.log.get_mut(seq) {
                    r.p2p_source = Some(pulled.as_str());
                }
            });
            if pulled == Pulled::Hit {
                transfer
            } else {
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

    /// Keyed handoff on D (§7.18–§7.20): long-poll P for the key (abortable: the client
    /// leaving ends the wait), then the transfer time; a timeout fails or prefills locally.
    async fn handoff_wait(
        &mut self,
        t: &handoff::Target,
        transfer: f64,
        full_prefill: f64,
    ) -> Option<Outcome> {
        let fetched = handoff::fetch(
            &self.shared,
            t,
            &self.parsed.prompt_hash,
            self.faults.side_channel_down,
        );
        let Some(res) = self.abortable(fetched).await else {
            if t.abort_notify
                && decode::notify(&self.shared, &t.endpoint, &t.key, "decode_aborted").await
            {
                self.shared
                    .update(|i| i.counters.decode_abort_notifies_sent += 1);
            }
            return Some(self.on_abort().await);
        };
        let wait = match res {
            Ok(()) => transfer,
            Err(e) => {
                // A P2P decoder never learns that P failed; it waits out its load timeout
                // and prefills locally. The sim skips that wait when P knows (§7.19).
                let recompute = matches!(
                    e,
                    handoff::FetchError::Timeout | handoff::FetchError::PrefillFailed
                ) && t.on_timeout == handoff::OnTimeout::Prefill;
                tracing::warn!(id = %self.internal_id, key = %t.key, error = %e, recompute, "KV handoff failed");
                self.shared.update(|i| {
                    let c = &mut i.counters;
                    match e {
                        handoff::FetchError::Timeout => c.handoff_fetch_timeouts += 1,
                        handoff::FetchError::PrefillFailed => c.handoff_prefill_failed += 1,
                        _ => {}
                    }
                    if recompute {
                        c.handoff_recomputes += 1;
                    } else {
                        c.decode_kv_load_failures += 1;
                    }
                });
                if !recompute {
                    return Some(self.fail_generation().await);
                }
                full_prefill
            }
        };
        let d = self.jittered(wait);
        if self.abortable(tokio::time::sleep(d)).await.is_none() {
            return Some(self.on_abort().await);
        }
        None
    }

    /// Below `cache_hit_threshold` (§7.10.4): answered at once, no prefill, no tokens.
    async fn cache_threshold_reply(&mut self) -> Outcome {
        self.shared
            .update(|i| i.counters.cache_threshold_misses += 1);
        self.tokens = 0;
        self.finish_reason = CACHE_THRESHOLD;
        if self.parsed.stream {
            let c = finish_chunk(&self.head_view(), CACHE_THRESHOLD, self.chunk_ids(&[]));
            if !self.event(c).await {
                return self.on_abort().await;
            }
        }
        self.complete().await
    }

    pub(super) async fn lmcache_hit(&self) -> bool {
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
    pub(super) async fn fail_generation(&mut self) -> Outcome {
        let e = ApiError::internal();
        if self.parsed.stream {
            for ev in self.stream_error(&e) {
                if !self.event(ev).await {
                    break;
                }
            }
        } else {
            self.error_head(&e);
        }
        Outcome::Failed
    }

    /// Output token i's text; a continuation resumes the sequence where the final assistant
    /// message ends, so chunks of a reply add up to the uncut one.
    pub(super) fn token_text(&self, i: u64) -> String {
        let i = i + self.parsed.continue_from.unwrap_or(0);
        match self.cfg.mode {
            OutputMode::Echo if !self.parsed.words.is_empty() => {
                let w = &self.parsed.words[(i as usize) % self.parsed.words.len()];
                format!(" {w}")
            }
            _ => format!(" t{i}"),
        }
    }

    pub(super) async fn generate(&mut self) -> Outcome {
        let max = self
            .parsed
            .max_tokens
            .unwrap_or(self.parsed.endpoint.default_max_tokens(&self.cfg));
        self.limit = max;
        let start = self.parsed.continue_from;
        // `--eos-after` counts the whole assistant message, so a continued one stops where
        // the uncut reply would.
        let natural = self
            .cfg
            .eos_after
            .map_or(max, |e| e.saturating_sub(start.unwrap_or(0)).min(max));
        let k = match self.overrides.tokens {
            Some(t) => t.max(1),
            // The message already reaches the stop (a chunk ended right on it): stopping
            // with no token keeps the chunks' sum equal to the uncut reply.
            None if start.is_some() && natural == 0 => 0,
            None => natural.max(1),
        };
        self.tokens = k;
        self.finish_reason = if k == max { "length" } else { "stop" };
        let itl = self.overrides.itl_ms.unwrap_or(self.cfg.itl_ms) as f64;
        if self.parsed.stream {
            if self.faults.drop_after_tokens == Some(0) {
                let _ = self.tx.send(StreamItem::Abort).await;
                return Outcome::Failed;
            }
            if k == 0 {
                for c in self.stream_start() {
                    if !self.event(c).await {
                        return self.on_abort().await;
                    }
                }
                // Made after the start events: on completions it is the first chunk.
                let end = finish_chunk(&self.head_view(), self.finish_reason, self.chunk_ids(&[]));
                if !self.event(end).await {
                    return self.on_abort().await;
                }
            }
            for i in 0..k {
                if i > 0 {
                    let d = self.jittered(itl);
                    if self.abortable(tokio::time::sleep(d)).await.is_none() {
                        return self.on_abort().await;
                    }
                }
                if i == 0 {
                    for c in self.stream_start() {
                        if !self.event(c).await {
                            return self.on_abort().await;
                        }
                    }
                }
                let finish = (i + 1 == k).then_some(self.finish_reason);
                let c = self.token_event(i, finish);
                if !self.event(c).await {
                    return self.on_abort().await;
                }
                if self.faults.drop_after_tokens == Some(i + 1) {
                    let _ = self.tx.send(StreamItem::Abort).await;
                    return Outcome::Failed;
                }
            }
        } else {
            let d = self.jittered(itl * k.saturating_sub(1) as f64);
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
    pub(super) async fn complete(&mut self) -> Outcome {
        let is_pd_prefill = self.class == Class::Prefill
            && matches!(self.cfg.protocol, Protocol::Nixlv2 | Protocol::NixlV1);
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
        } else if let Some(key) = self.handoff_key.clone() {
            // Keyed handoff (§7.18–§7.20): a fixed lease under the proxy's key, whatever
            // the finish reason or stream flag; the reply carries no params.
            let ttl = Duration::from_millis(self.cfg.abort_request_timeout_ms);
            self.lease_blocks(key, ttl);
        } else if self.cfg.protocol == Protocol::Lmcache && self.class == Class::Prefill {
            let h = self.parsed.prompt_hash.clone();
            self.shared.update(|i| i.lmcache.insert(h));
        }
        if self.parsed.stream {
            for c in self.stream_end() {
                if !self.event(c).await {
                    return self.on_abort().await;
                }
            }
        } else {
            let body = self.full_body(&kv);
            let resp = bytes_response(StatusCode::OK, "application/json", Bytes::from(body));
            self.send_head(Head::Full(resp), Some(200));
        }
        Outcome::Completed
    }

    /// Moves this request's running blocks into a held lease and returns the params.
    pub(super) fn make_lease(&mut self) -> PrefillParams {
        let lease = self.shared.read(|i| match i.cfg.effective_lease_mode() {
            LeaseMode::Fixed => Duration::from_millis(i.cfg.abort_request_timeout_ms),
            LeaseMode::Heartbeat => Duration::from_millis(i.cfg.kv_lease_duration_ms),
        });
        let blocks = self.lease_blocks(self.internal_id.clone(), lease);
        PrefillParams {
            era: self.cfg.kv_params_era,
            block_ids: blocks,
            engine_id: self.shared.engine_id(),
            remote_request_id: self.internal_id.clone(),
            host: self.shared.advertised_host.clone(),
            port: self.shared.side_addr.port(),
            prompt_tokens: self.parsed.prompt_tokens,
        }
    }

    /// Moves the running blocks into a held lease keyed `key`; returns the block ids.
    fn lease_blocks(&mut self, key: String, ttl: Duration) -> Vec<u32> {
        let now = Instant::now();
        let blocks = std::mem::take(&mut self.blocks);
        let l = Lease {
            remote_request_id: key,
            engine_id: self.shared.engine_id(),
            block_ids: blocks.clone(),
            prompt_tokens: self.parsed.prompt_tokens,
            prompt_hash: self.parsed.prompt_hash.clone(),
            created_at: now,
            expires_at: now + ttl,
            heartbeats: 0,
            state: LeaseState::Held,
        };
        self.shared.update(|i| i.create_lease(l));
        blocks
    }
}
