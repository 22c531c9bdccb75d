//! Encoder-only instance (`--mm-encoder-only`, the E of vLLM's E/PD, §7.23): a chat request
//! is answered with one token after `--encode-delay-ms`, and the reply's
//! `ec_transfer_params` names each multimodal item's encoder cache on this instance.

use super::engine::{Head, Job, Outcome};
use super::prompt::{mm_hash, mm_sources};
use super::responses::Obj;
use super::validate::Endpoint;
use std::collections::HashSet;

impl Job {
    /// Whether this request is an encoder's: chat on an encoder-only instance (the other
    /// routes generate as usual there).
    pub(super) fn encoding(&self) -> bool {
        self.cfg.mm_encoder_only && self.parsed.endpoint == Endpoint::Chat
    }

    /// Runs in place of the prefill wait and the token loop: the encode time, then one token.
    pub(super) async fn encode(&mut self) -> Outcome {
        let max = self
            .parsed
            .max_tokens
            .unwrap_or(self.parsed.endpoint.default_max_tokens(&self.cfg));
        self.limit = max;
        let d = self.jittered(self.cfg.encode_delay_ms as f64);
        if self.abortable(tokio::time::sleep(d)).await.is_none() {
            return self.on_abort().await;
        }
        if self.faults.drop_after_tokens.is_some() {
            self.send_head(Head::Drop, None);
            return Outcome::Failed;
        }
        self.tokens = 1;
        self.finish_reason = if max == 1 { "length" } else { "stop" };
        self.complete().await
    }

    /// The reply's `ec_transfer_params` (JSON): one entry per distinct item, keyed by its mm
    /// hash and naming this instance as the peer that holds it; `null` without items.
    pub(super) fn ec_transfer_params(&self) -> String {
        let sources = mm_sources(self.parsed.body.get("messages"));
        if sources.is_empty() {
            return "null".into();
        }
        // The side channel is where a NIXL peer would pull from, as in `kv_transfer_params`.
        let peer = Obj::new()
            .field("peer_host", &self.shared.advertised_host)
            .field("peer_port", &self.shared.side_addr.port())
            .field("engine_id", &self.shared.engine_id())
            .finish();
        let mut seen = HashSet::new();
        sources
            .into_iter()
            .map(mm_hash)
            .filter(|h| seen.insert(h.clone()))
            .fold(Obj::new(), |o, h| o.raw(&h, &peer))
            .finish()
    }
}
