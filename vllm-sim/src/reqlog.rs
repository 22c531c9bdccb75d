//! Ring buffer of received API requests, served by `GET /sim/requests` (§7.12).

use super::counters::Class;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    pub seq: u64,
    pub t_ms: u64,
    pub method: String,
    pub path: String,
    /// Lowercase header name -> values in arrival order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The body exactly as received (lossy UTF-8).
    pub body: String,
    pub ignored_fields: Vec<String>,
    pub class: Option<Class>,
    pub public_id: Option<String>,
    pub internal_id: Option<String>,
    pub status: Option<u16>,
    pub outcome: Option<&'static str>,
    pub disconnect_at_ms: Option<u64>,
    pub first_byte_ms: Option<u64>,
    pub events_sent: u64,
    /// `"hit"`, `"miss"` or `"error"` once a `remote_kv_source` pull ended (§7.22).
    pub p2p_source: Option<&'static str>,
    /// `"reused"` or `"ignored"`: what became of chat's forwarded
    /// `kv_transfer_params.prompt_token_ids` (§7.24); null without them.
    pub prompt_token_ids: Option<&'static str>,
}

pub struct RequestLog {
    cap: usize,
    records: VecDeque<RequestRecord>,
}

impl RequestLog {
    pub fn new(cap: usize) -> Self {
        RequestLog {
            cap: cap.max(1),
            records: VecDeque::new(),
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.trim();
    }

    fn trim(&mut self) {
        while self.records.len() > self.cap {
            self.records.pop_front();
        }
    }

    pub fn push(&mut self, r: RequestRecord) {
        self.records.push_back(r);
        self.trim();
    }

    /// Records are appended in seq order, so search from the back (recent ones are hot).
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut RequestRecord> {
        self.records.iter_mut().rev().find(|r| r.seq == seq)
    }

    pub fn since(&self, seq: u64) -> Vec<RequestRecord> {
        self.records
            .iter()
            .filter(|r| r.seq >= seq)
            .cloned()
            .collect()
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }
}
