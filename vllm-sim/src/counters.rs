//! Counters exposed in `/sim/state` (§7.12) and `/metrics`.

use serde::Serialize;
use std::collections::BTreeMap;

/// Request class after §7.5 classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Prefill,
    Decode,
    Plain,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Prefill => "prefill",
            Class::Decode => "decode",
            Class::Plain => "plain",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ByRole {
    pub prefill: u64,
    pub decode: u64,
    pub plain: u64,
}

impl ByRole {
    pub fn bump(&mut self, c: Class) {
        match c {
            Class::Prefill => self.prefill += 1,
            Class::Decode => self.decode += 1,
            Class::Plain => self.plain += 1,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SideChannelIn {
    pub meta: u64,
    pub read: u64,
    pub notify: u64,
    pub heartbeat: u64,
    /// Keyed-handoff fetches (`POST /kv/fetch`, §7.18–§7.20).
    pub fetch: u64,
    /// Mooncake bootstrap `GET /query` (§7.20).
    pub query: u64,
    /// KV-source lookups answered for pullers (`POST /p2p/source`, §7.22).
    pub p2p_source: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub requests_total: u64,
    pub requests_completed: u64,
    pub requests_rejected: u64,
    pub requests_failed: u64,
    pub requests_aborted: ByRole,
    pub client_disconnects: u64,
    pub prefill_completed: u64,
    pub decode_completed: u64,
    pub plain_completed: u64,
    pub leases_created: u64,
    pub leases_pulled: u64,
    pub leases_released_by_notify: u64,
    pub leases_released_by_reject: u64,
    pub leases_expired: u64,
    pub leases_released_by_reset: u64,
    pub prefill_no_params_stop: u64,
    pub prefill_streamed_params_unreported: u64,
    pub decode_without_kv_params: u64,
    pub decode_invalid_kv_params: u64,
    pub decode_block_ids_flat_in_era_c: u64,
    pub decode_kv_load_failures: u64,
    pub decode_stale_reads: u64,
    pub decode_abort_notifies_sent: u64,
    pub decode_reject_notifies_sent: u64,
    pub heartbeats_sent: u64,
    pub side_channel_in: SideChannelIn,
    pub notify_unknown: u64,
    pub side_channel_errors: u64,
    pub lmcache_hits: u64,
    pub lmcache_misses: u64,
    /// Keyed handoff on D (§7.18–§7.20): the key was not ready within the wait, P's
    /// prefill of it failed, D fell back to a local prefill, the engine id did not match.
    pub handoff_fetch_timeouts: u64,
    pub handoff_prefill_failed: u64,
    pub handoff_recomputes: u64,
    pub handoff_engine_id_mismatches: u64,
    /// lmcache decodes answered `cache_threshold` below their `cache_hit_threshold`
    /// (§7.10.4); they count in neither `lmcache_hits` nor `lmcache_misses`.
    pub cache_threshold_misses: u64,
    /// Pulls from a `remote_kv_source` (§7.22): the source had the prompt, had not, or
    /// the lookup failed (both of the latter prefill in full).
    pub p2p_source_hits: u64,
    pub p2p_source_misses: u64,
    pub p2p_source_errors: u64,
    /// Chat requests whose `kv_transfer_params.prompt_token_ids` were their prompt, and
    /// those whose forwarded ids were ignored for `echo` or media (§7.24).
    pub prompt_token_ids_reused: u64,
    pub prompt_token_ids_ignored: u64,
    /// Prometheus-only totals (`/metrics`).
    #[serde(skip)]
    pub prompt_tokens_total: u64,
    #[serde(skip)]
    pub generation_tokens_total: u64,
    #[serde(skip)]
    pub success_by_reason: BTreeMap<String, u64>,
    #[serde(skip)]
    pub http_client_disconnected: u64,
}

impl Counters {
    pub fn completed(&mut self, c: Class) {
        self.requests_completed += 1;
        match c {
            Class::Prefill => self.prefill_completed += 1,
            Class::Decode => self.decode_completed += 1,
            Class::Plain => self.plain_completed += 1,
        }
    }

    /// Sum of lease outcomes plus held must equal `leases_created` (§7.8).
    pub fn lease_total(&self, held: u64) -> u64 {
        held + self.leases_pulled
            + self.leases_released_by_notify
            + self.leases_released_by_reject
            + self.leases_expired
            + self.leases_released_by_reset
    }
}
