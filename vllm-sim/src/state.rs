//! Shared instance state: config, KV pool, counters, in-flight table, scheduler queue, request
//! log, plus a change signal that waiters (`/sim/wait`, admission) subscribe to.

use super::config::SimConfig;
use super::counters::{Class, Counters};
use super::faults::Faults;
use super::kv::{KvPool, Lease, LeaseState};
use super::reqlog::RequestLog;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One request currently being processed.
pub struct Flight {
    pub class: Class,
    pub queued: bool,
    pub internal_id: String,
    /// `(host:port, id)` the decoder heartbeats for until its pull completes (§7.10.1).
    pub pull: Option<(String, String)>,
    /// A keyed-handoff prefill's lease key (sglang room, offloading `kv_request_id`,
    /// mooncake `transfer_id`; §7.18–§7.20) while it runs.
    pub handoff_key: Option<String>,
}

/// Keyed-handoff keys whose prefill ended without a lease, kept so a waiting decode fails
/// at once instead of at its timeout (bounded, oldest dropped first).
const FAILED_KEYS: usize = 1000;

pub struct Inner {
    pub cfg: SimConfig,
    pub faults: Faults,
    pub kv: KvPool,
    pub counters: Counters,
    pub in_flight: HashMap<u64, Flight>,
    /// FCFS admission queue of request seqs (vLLM's scheduler is FCFS).
    pub queue: VecDeque<u64>,
    pub running: u64,
    pub log: RequestLog,
    pub next_seq: u64,
    rng: u64,
    /// Side-channel handshake cache: `host:port` -> engine id (§7.9 `/nixl/meta`).
    pub handshakes: HashMap<String, String>,
    /// Process-local LMCache store of prompt hashes (§7.10.4).
    pub lmcache: HashSet<String>,
    /// Prompts completed here, which this instance serves as a KV source (§7.22).
    pub computed: super::p2p_source::Computed,
    /// This instance's engine id (`--engine-id`, changeable by `POST /sim/config`).
    pub engine_id: String,
    handoff_failed: HashSet<String>,
    handoff_failed_order: VecDeque<String>,
}

impl Inner {
    /// Deterministic splitmix64 stream seeded by `--seed` (id suffixes, jitter).
    pub fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Applies `--jitter-pct` uniformly around `ms`.
    pub fn jitter(&mut self, ms: f64) -> Duration {
        let pct = self.cfg.jitter_pct.clamp(0.0, 100.0);
        let ms = if pct > 0.0 {
            let u = (self.next_rand() >> 11) as f64 / (1u64 << 53) as f64; // [0,1)
            ms * (1.0 + pct / 100.0 * (2.0 * u - 1.0))
        } else {
            ms
        };
        Duration::from_micros((ms.max(0.0) * 1000.0) as u64)
    }

    pub fn create_lease(&mut self, lease: Lease) {
        self.counters.leases_created += 1;
        self.kv.create_lease(lease);
    }

    /// Ends a held lease and counts the outcome. Returns false if it was not held.
    pub fn release_lease(&mut self, id: &str, state: LeaseState) -> bool {
        if !self.kv.release(id, state) {
            return false;
        }
        let c = &mut self.counters;
        match state {
            LeaseState::Pulled => c.leases_pulled += 1,
            LeaseState::ReleasedByNotify => c.leases_released_by_notify += 1,
            LeaseState::ReleasedByReject => c.leases_released_by_reject += 1,
            LeaseState::Expired => c.leases_expired += 1,
            LeaseState::ReleasedByReset => c.leases_released_by_reset += 1,
            LeaseState::Held => {}
        }
        true
    }

    /// Records that the prefill of handoff key `key` ended without a lease (§7.18).
    pub fn mark_handoff_failed(&mut self, key: &str) {
        if self.kv.is_held(key) || !self.handoff_failed.insert(key.to_string()) {
            return;
        }
        self.handoff_failed_order.push_back(key.to_string());
        while self.handoff_failed_order.len() > FAILED_KEYS {
            if let Some(k) = self.handoff_failed_order.pop_front() {
                self.handoff_failed.remove(&k);
            }
        }
    }

    pub fn handoff_failed(&self, key: &str) -> bool {
        self.handoff_failed.contains(key)
    }

    /// A new prefill for `key` started: forget an earlier failure of the same key.
    pub fn clear_handoff_failed(&mut self, key: &str) {
        if self.handoff_failed.remove(key) {
            self.handoff_failed_order.retain(|k| k != key);
        }
    }

    pub fn invariants_ok(&self) -> bool {
        self.kv.invariants_ok()
            && self.counters.leases_created
                == self.counters.lease_total(self.kv.leases_held() as u64)
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// Shared by every task of one instance.
pub struct Shared {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    tasks: Mutex<JoinSet<()>>,
    pub api_addr: SocketAddr,
    pub side_addr: SocketAddr,
    /// The bootstrap listener (sglang rooms, mooncake `/query`; §7.18, §7.20).
    pub bootstrap_addr: SocketAddr,
    /// `remote_host` advertised to decoders.
    pub advertised_host: String,
    pub started: Instant,
    pub created_unix: u64,
}

impl Shared {
    pub fn new(
        cfg: SimConfig,
        api_addr: SocketAddr,
        side_addr: SocketAddr,
        bootstrap_addr: SocketAddr,
    ) -> Self {
        let engine_id = cfg
            .engine_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let advertised_host = cfg
            .side_channel_host
            .clone()
            .unwrap_or_else(|| cfg.host.clone());
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let inner = Inner {
            kv: KvPool::new(cfg.num_gpu_blocks),
            log: RequestLog::new(cfg.request_log_size),
            rng: cfg.seed,
            cfg,
            faults: Faults::default(),
            counters: Counters::default(),
            in_flight: HashMap::new(),
            queue: VecDeque::new(),
            running: 0,
            next_seq: 0,
            handshakes: HashMap::new(),
            lmcache: HashSet::new(),
            computed: Default::default(),
            engine_id,
            handoff_failed: HashSet::new(),
            handoff_failed_order: VecDeque::new(),
        };
        Shared {
            inner: Mutex::new(inner),
            changed: watch::channel(0).0,
            tasks: Mutex::new(JoinSet::new()),
            api_addr,
            side_addr,
            bootstrap_addr,
            advertised_host,
            started: Instant::now(),
            created_unix,
        }
    }

    /// The current engine id (it changes when `POST /sim/config` sets `engine_id`).
    pub fn engine_id(&self) -> String {
        self.read(|i| i.engine_id.clone())
    }

    /// Locks the state; a poisoned lock is recovered because every mutation keeps it valid.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read-only access (no change notification).
    pub fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.lock())
    }

    /// Mutating access; wakes every waiter afterwards.
    pub fn update<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    /// Mutating access that wakes waiters only when `f` reports a change (used by the
    /// 10 ms lease sweeper, so idle sweeps do not wake every waiter).
    pub fn update_if<R>(&self, f: impl FnOnce(&mut Inner) -> (R, bool)) -> R {
        let (r, changed) = f(&mut self.lock());
        if changed {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        r
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `pred` holds, re-checking on every state change (no polling).
    pub async fn wait_until(&self, mut pred: impl FnMut(&Inner) -> bool) {
        let mut rx = self.subscribe();
        loop {
            if self.read(&mut pred) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Spawns a task owned by this instance, aborted on shutdown/drop.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {} // reap finished tasks
        set.spawn(fut);
    }

    pub fn abort_all(&self) {
        let mut set = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        set.abort_all();
    }

    pub fn t_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// `GET /sim/state` body (§7.12).
    pub fn state_json(&self) -> Value {
        let now = Instant::now();
        self.read(|i| {
            let cfg = &i.cfg;
            let (mut q, mut by) = (0u64, [0u64; 3]);
            for f in i.in_flight.values() {
                if f.queued {
                    q += 1;
                }
                by[f.class as usize] += 1;
            }
            let total = i.in_flight.len() as u64;
            json!({
                "instance": {
                    "engine_id": i.engine_id,
                    "api_port": self.api_addr.port(),
                    "side_channel": format!("{}:{}", self.advertised_host, self.side_addr.port()),
                    "bootstrap": format!("{}:{}", self.advertised_host, self.bootstrap_addr.port()),
                    "role": cfg.role.as_str(),
                    "mm_encoder_only": cfg.mm_encoder_only,
                    "era": cfg.kv_params_era.as_str(),
                    "protocol": cfg.protocol.as_str(),
                    "lease_mode": cfg.effective_lease_mode().as_str(),
                    "model": cfg.model_names(),
                    "faults": i.faults.to_json(),
                },
                "kv": {
                    "block_size": cfg.block_size,
                    "total_blocks": i.kv.total(),
                    "free_blocks": i.kv.free_blocks(),
                    "running_blocks": i.kv.running_blocks(),
                    "leased_blocks": i.kv.leased_blocks(),
                    "leases_held": i.kv.leases_held(),
                    "invariants_ok": i.invariants_ok(),
                },
                "leases": i.kv.leases_json(now, 50),
                "in_flight": {
                    "total": total, "queued": q, "running": total - q,
                    "by_role": {"prefill": by[0], "decode": by[1], "plain": by[2]},
                },
                "counters": i.counters,
            })
        })
    }
}
