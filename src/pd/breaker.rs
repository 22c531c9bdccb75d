//! A circuit breaker per prefiller: after `failures` consecutive failures a prefiller is
//! skipped for a backoff (open), then one request may try it (half-open): success closes the
//! breaker, failure opens it again for twice as long (up to [`MAX_BACKOFF`]).
//!
//! Only prefillers that failed are remembered, in an LRU of at most `capacity` entries, so a
//! scheduler naming ever new addresses cannot grow memory. States are logged with the address
//! and counted in a gauge without it (addresses are not bounded, label values must be).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::observe::metrics::Metrics;
use crate::upstream::Target;

/// An open breaker's backoff doubles up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// `-prefiller-breaker-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open a prefiller's breaker; 0 turns breakers off.
    pub failures: u32,
    /// How long a breaker stays open the first time.
    pub backoff: Duration,
    /// Prefillers remembered at most (the least recently failed are forgotten first).
    pub capacity: usize,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            backoff: Duration::from_secs(5),
            capacity: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Failing, but fewer than `failures` times in a row.
    Closed { failures: u32 },
    /// Skipped until `until`; `backoff` is how long this opening lasts.
    Open { until: Instant, backoff: Duration },
    /// One request is trying it since `since`; others skip it meanwhile.
    HalfOpen { since: Instant, backoff: Duration },
}

impl State {
    fn gauge(self) -> Option<&'static str> {
        match self {
            State::Closed { .. } => None,
            State::Open { .. } => Some("open"),
            State::HalfOpen { .. } => Some("half_open"),
        }
    }
}

/// The breakers of every prefiller that failed recently.
pub struct Breakers {
    policy: BreakerPolicy,
    /// A probe that never reported (its client left mid-attempt) frees the half-open slot
    /// after this long: the prefill deadline, which bounds any attempt.
    probe_timeout: Duration,
    states: Mutex<LruCache<String, State>>,
    metrics: Metrics,
}

impl Breakers {
    pub fn new(policy: BreakerPolicy, probe_timeout: Duration, metrics: Metrics) -> Self {
        let capacity = NonZeroUsize::new(policy.capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            policy,
            probe_timeout,
            states: Mutex::new(LruCache::new(capacity)),
            metrics,
        }
    }

    /// May a request be sent to `prefiller` now? An expired open breaker turns half-open and
    /// this caller is its probe.
    pub fn admit(&self, prefiller: &Target) -> bool {
        self.admit_at(prefiller, Instant::now())
    }

    fn admit_at(&self, prefiller: &Target, now: Instant) -> bool {
        if self.policy.failures == 0 {
            return true;
        }
        let mut states = self.lock();
        // `peek`: asking does not make a prefiller recent, failing does.
        let Some(state) = states.peek(prefiller.authority()).copied() else {
            return true;
        };
        let next = match state {
            State::Closed { .. } => return true,
            State::Open { until, backoff } if now >= until => State::HalfOpen {
                since: now,
                backoff,
            },
            State::HalfOpen { since, backoff } if now - since >= self.probe_timeout => {
                State::HalfOpen {
                    since: now,
                    backoff,
                }
            }
            State::Open { .. } | State::HalfOpen { .. } => return false,
        };
        if let Some(slot) = states.peek_mut(prefiller.authority()) {
            *slot = next;
        }
        drop(states);
        self.moved(state, next);
        info!(
            prefiller = prefiller.authority(),
            "prefiller circuit half-open: one request tries it"
        );
        true
    }

    /// Would [`Breakers::admit`] let a request through now? (It changes nothing: for picking
    /// the prefiller a connector names before its prefill is sent.)
    pub fn usable(&self, prefiller: &Target) -> bool {
        self.usable_at(prefiller, Instant::now())
    }

    fn usable_at(&self, prefiller: &Target, now: Instant) -> bool {
        match self.lock().peek(prefiller.authority()) {
            None | Some(State::Closed { .. }) => true,
            Some(State::Open { until, .. }) => now >= *until,
            Some(State::HalfOpen { since, .. }) => now - *since >= self.probe_timeout,
        }
    }

    /// The prefiller answered (2xx, or a 4xx that judged the client's request).
    pub fn success(&self, prefiller: &Target) {
        if self.policy.failures == 0 {
            return;
        }
        let Some(state) = self.lock().pop(prefiller.authority()) else {
            return;
        };
        self.moved(state, State::Closed { failures: 0 });
        if !matches!(state, State::Closed { .. }) {
            info!(
                prefiller = prefiller.authority(),
                "prefiller circuit closed: it answers again"
            );
        }
    }

    /// The prefiller failed: no connection, a 5xx, or an unreadable reply.
    pub fn failure(&self, prefiller: &Target) {
        self.failure_at(prefiller, Instant::now())
    }

    fn failure_at(&self, prefiller: &Target, now: Instant) {
        if self.policy.failures == 0 {
            return;
        }
        let mut states = self.lock();
        let state = states
            .get(prefiller.authority())
            .copied()
            .unwrap_or(State::Closed { failures: 0 });
        let next = match state {
            State::Closed { failures } if failures + 1 < self.policy.failures => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } => State::Open {
                until: now + self.policy.backoff,
                backoff: self.policy.backoff,
            },
            State::HalfOpen { backoff, .. } | State::Open { backoff, .. } => {
                let backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                State::Open {
                    until: now + backoff,
                    backoff,
                }
            }
        };
        let evicted = states.push(prefiller.authority().to_string(), next);
        drop(states);
        if let Some((key, old)) = evicted.filter(|(key, _)| key != prefiller.authority()) {
            // The least recently failed prefiller is forgotten: it starts closed again.
            self.moved(old, State::Closed { failures: 0 });
            tracing::debug!(prefiller = key, "prefiller breaker forgotten (LRU full)");
        }
        self.moved(state, next);
        if let State::Open { backoff, .. } = next {
            if !matches!(state, State::Open { .. }) {
                warn!(
                    prefiller = prefiller.authority(),
                    backoff_ms = backoff.as_millis() as u64,
                    "prefiller circuit open: skipped until the backoff ends"
                );
            }
        }
    }

    /// How long `prefiller`'s breaker stays open, if it is.
    pub fn open_for(&self, prefiller: &Target) -> Option<Duration> {
        self.open_for_at(prefiller, Instant::now())
    }

    fn open_for_at(&self, prefiller: &Target, now: Instant) -> Option<Duration> {
        match self.lock().peek(prefiller.authority()) {
            Some(State::Open { until, .. }) => Some(until.saturating_duration_since(now)),
            Some(State::HalfOpen { .. }) => Some(Duration::ZERO),
            _ => None,
        }
    }

    fn moved(&self, from: State, to: State) {
        if from.gauge() != to.gauge() {
            self.metrics.prefiller_breaker(from.gauge(), to.gauge());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, State>> {
        // A panic while holding this lock leaves only counters behind: keep using them.
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::http(s.parse().unwrap())
    }

    fn breakers(failures: u32, capacity: usize) -> (Breakers, Metrics) {
        let metrics = Metrics::new();
        let policy = BreakerPolicy {
            failures,
            backoff: Duration::from_secs(10),
            capacity,
        };
        let b = Breakers::new(policy, Duration::from_secs(30), metrics.clone());
        (b, metrics)
    }

    fn gauge(metrics: &Metrics, state: &str) -> String {
        let text = metrics.render();
        let prefix = format!("llm_d_sidecar_prefiller_breakers{{state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("missing")
            .to_string()
    }

    #[test]
    fn opens_after_consecutive_failures_then_half_opens_and_closes() {
        let (b, m) = breakers(3, 16);
        let p = target("10.0.0.1:8000");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        b.failure_at(&p, t0);
        b.failure_at(&p, t0);
        b.success(&p); // the streak is broken
        b.failure_at(&p, t0);
        b.failure_at(&p, t0);
        assert!(b.admit_at(&p, t0));
        b.failure_at(&p, t0);
        assert!(!b.admit_at(&p, at(9)), "three in a row open it");
        assert_eq!(gauge(&m, "open"), "1");
        assert!(
            b.usable_at(&p, at(10)) && b.usable_at(&p, at(10)),
            "asking takes no probe"
        );
        assert!(b.admit_at(&p, at(10)), "the backoff is over: one probe");
        assert!(!b.usable_at(&p, at(10)));
        assert!(!b.admit_at(&p, at(11)), "only one probe at a time");
        assert_eq!(
            (gauge(&m, "open"), gauge(&m, "half_open")),
            ("0".into(), "1".into())
        );
        b.failure_at(&p, at(11));
        assert_eq!(
            b.open_for_at(&p, at(11)),
            Some(Duration::from_secs(20)),
            "doubled"
        );
        assert!(!b.admit_at(&p, at(30)));
        assert!(b.admit_at(&p, at(31)));
        b.success(&p);
        assert!(b.admit_at(&p, at(31)) && b.admit_at(&p, at(31)));
        assert_eq!(
            (gauge(&m, "open"), gauge(&m, "half_open")),
            ("0".into(), "0".into())
        );
    }

    #[test]
    fn a_probe_that_never_reports_frees_its_slot_after_the_prefill_deadline() {
        let (b, _) = breakers(1, 16);
        let p = target("10.0.0.1:8000");
        let t0 = Instant::now();
        b.failure_at(&p, t0);
        assert!(b.admit_at(&p, t0 + Duration::from_secs(10)));
        assert!(!b.admit_at(&p, t0 + Duration::from_secs(39)));
        assert!(b.admit_at(&p, t0 + Duration::from_secs(40)));
    }

    #[test]
    fn memory_is_bounded_and_the_gauge_forgets_evicted_breakers() {
        let (b, m) = breakers(1, 4);
        for i in 0..100 {
            b.failure(&target(&format!("10.0.0.{i}:8000")));
        }
        assert_eq!(b.lock().len(), 4);
        assert_eq!(gauge(&m, "open"), "4");
        assert!(b.admit(&target("10.0.0.0:8000")), "forgotten: closed");
        assert!(!b.admit(&target("10.0.0.99:8000")));
    }

    #[test]
    fn zero_failures_turns_breakers_off() {
        let (b, m) = breakers(0, 4);
        let p = target("10.0.0.1:8000");
        for _ in 0..10 {
            b.failure(&p);
        }
        assert!(b.admit(&p));
        assert_eq!(gauge(&m, "open"), "0");
    }
}
