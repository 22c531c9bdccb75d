//! P-side KV block pool and lease state machine (§7.8).

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Terminal and live states of a lease; only `Held` owns blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Held,
    Pulled,
    ReleasedByNotify,
    ReleasedByReject,
    Expired,
    ReleasedByReset,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Held => "held",
            LeaseState::Pulled => "pulled",
            LeaseState::ReleasedByNotify => "released_by_notify",
            LeaseState::ReleasedByReject => "released_by_reject",
            LeaseState::Expired => "expired",
            LeaseState::ReleasedByReset => "released_by_reset",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Lease {
    pub remote_request_id: String,
    pub engine_id: String,
    pub block_ids: Vec<u32>,
    pub prompt_tokens: u64,
    pub prompt_hash: String,
    pub created_at: Instant,
    pub expires_at: Instant,
    pub heartbeats: u64,
    pub state: LeaseState,
}

impl Lease {
    pub fn to_json(&self, now: Instant) -> Value {
        json!({
            "remote_request_id": self.remote_request_id,
            "engine_id": self.engine_id,
            "block_ids": self.block_ids,
            "prompt_tokens": self.prompt_tokens,
            "age_ms": now.saturating_duration_since(self.created_at).as_millis() as u64,
            "expires_in_ms": self.expires_at.saturating_duration_since(now).as_millis() as u64,
            "heartbeats": self.heartbeats,
            "state": self.state.as_str(),
        })
    }
}

/// Why a `/nixl/read` was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    UnknownLease,
    BlockMismatch,
    PromptMismatch,
}

/// Terminal leases kept for debugging (§7.8).
const HISTORY: usize = 1000;

pub struct KvPool {
    total: u32,
    free: BTreeSet<u32>,
    running: u64,
    held: HashMap<String, Lease>,
    history: VecDeque<Lease>,
}

impl KvPool {
    /// Block ids are 1..=total; 0 is vLLM's reserved null block.
    pub fn new(total: u32) -> Self {
        KvPool {
            total,
            free: (1..=total).collect(),
            running: 0,
            held: HashMap::new(),
            history: VecDeque::new(),
        }
    }

    pub fn total(&self) -> u32 {
        self.total
    }
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64
    }
    pub fn running_blocks(&self) -> u64 {
        self.running
    }
    pub fn leased_blocks(&self) -> u64 {
        self.held.values().map(|l| l.block_ids.len() as u64).sum()
    }
    pub fn leases_held(&self) -> usize {
        self.held.len()
    }

    /// Allocates the `n` lowest free ids (deterministic) for a running request.
    pub fn alloc(&mut self, n: u64) -> Option<Vec<u32>> {
        if (self.free.len() as u64) < n {
            return None;
        }
        let ids: Vec<u32> = self.free.iter().take(n as usize).copied().collect();
        for id in &ids {
            self.free.remove(id);
        }
        self.running += n;
        Some(ids)
    }

    /// Returns a running request's blocks to the pool.
    pub fn free_running(&mut self, ids: &[u32]) {
        self.running = self.running.saturating_sub(ids.len() as u64);
        self.free.extend(ids.iter().copied());
    }

    /// Moves a running request's blocks into a new held lease.
    pub fn create_lease(&mut self, lease: Lease) {
        self.running = self.running.saturating_sub(lease.block_ids.len() as u64);
        self.held.insert(lease.remote_request_id.clone(), lease);
    }

    /// Ends a held lease in `state`, freeing its blocks. Returns false if it was not held.
    pub fn release(&mut self, id: &str, state: LeaseState) -> bool {
        match self.held.remove(id) {
            Some(mut l) => {
                self.free.extend(l.block_ids.iter().copied());
                l.state = state;
                self.history.push_back(l);
                while self.history.len() > HISTORY {
                    self.history.pop_front();
                }
                true
            }
            None => false,
        }
    }

    /// Handles a decoder's read: matching lease → pulled and freed.
    pub fn read(
        &mut self,
        id: &str,
        block_ids: &[u32],
        prompt_hash: &str,
    ) -> Result<(), ReadError> {
        let lease = self.held.get(id).ok_or(ReadError::UnknownLease)?;
        if lease.block_ids != block_ids {
            return Err(ReadError::BlockMismatch);
        }
        if lease.prompt_hash != prompt_hash {
            return Err(ReadError::PromptMismatch);
        }
        self.release(id, LeaseState::Pulled);
        Ok(())
    }

    /// Heartbeat mode: `expires_at = max(expires_at, now + extension)`. Returns how many matched.
    pub fn heartbeat(&mut self, ids: &[String], now: Instant, extension: Duration) -> u64 {
        let mut n = 0;
        for id in ids {
            if let Some(l) = self.held.get_mut(id) {
                l.expires_at = l.expires_at.max(now + extension);
                l.heartbeats += 1;
                n += 1;
            }
        }
        n
    }

    /// Sweeps every held lease (no early exit, as vLLM does) and expires the overdue ones.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .held
            .values()
            .filter(|l| l.expires_at <= now)
            .map(|l| l.remote_request_id.clone())
            .collect();
        for id in &due {
            self.release(id, LeaseState::Expired);
        }
        due
    }

    pub fn is_held(&self, id: &str) -> bool {
        self.held.contains_key(id)
    }

    /// The prompt hash of a held lease.
    pub fn held_hash(&self, id: &str) -> Option<&str> {
        self.held.get(id).map(|l| l.prompt_hash.as_str())
    }

    pub fn held_ids(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }

    /// Held leases (oldest first), then the most recent terminal ones.
    pub fn leases_json(&self, now: Instant, history: usize) -> Vec<Value> {
        let mut held: Vec<&Lease> = self.held.values().collect();
        held.sort_by_key(|l| l.created_at);
        let mut out: Vec<Value> = held.iter().map(|l| l.to_json(now)).collect();
        let skip = self.history.len().saturating_sub(history);
        out.extend(self.history.iter().skip(skip).map(|l| l.to_json(now)));
        out
    }

    /// Pool-level invariants of §7.8 (the lease-counter one is checked by the caller).
    pub fn invariants_ok(&self) -> bool {
        let leased = self.leased_blocks();
        self.free_blocks() + self.running + leased == self.total as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, blocks: Vec<u32>, now: Instant) -> Lease {
        Lease {
            remote_request_id: id.into(),
            engine_id: "e".into(),
            block_ids: blocks,
            prompt_tokens: 3,
            prompt_hash: "h".into(),
            created_at: now,
            expires_at: now + Duration::from_millis(10),
            heartbeats: 0,
            state: LeaseState::Held,
        }
    }

    #[test]
    fn alloc_lease_read_cycle() {
        let now = Instant::now();
        let mut p = KvPool::new(4);
        let ids = p.alloc(2).expect("blocks");
        assert_eq!(ids, vec![1, 2]);
        p.create_lease(lease("r", ids.clone(), now));
        assert!(p.invariants_ok());
        assert_eq!(p.read("r", &[1], "h"), Err(ReadError::BlockMismatch));
        assert_eq!(p.read("r", &ids, "x"), Err(ReadError::PromptMismatch));
        assert_eq!(p.read("r", &ids, "h"), Ok(()));
        assert_eq!(p.read("r", &ids, "h"), Err(ReadError::UnknownLease));
        assert_eq!(p.free_blocks(), 4);
        assert!(p.invariants_ok());
    }

    #[test]
    fn sweep_expires_and_heartbeat_extends() {
        let now = Instant::now();
        let mut p = KvPool::new(4);
        let a = p.alloc(1).expect("a");
        let b = p.alloc(1).expect("b");
        p.create_lease(lease("a", a, now));
        p.create_lease(lease("b", b, now));
        p.heartbeat(&["a".into()], now, Duration::from_secs(1));
        let gone = p.sweep(now + Duration::from_millis(20));
        assert_eq!(gone, vec!["b".to_string()]);
        assert_eq!(p.leases_held(), 1);
        assert!(p.invariants_ok());
    }
}
