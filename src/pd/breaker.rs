//! A circuit breaker per prefiller: after `failures` consecutive failures a prefiller is
//! skipped for a backoff (open), then one request may try it (half-open): success closes the
//! breaker, failure opens it again for twice as long (up to [`MAX_BACKOFF`]).
//!
//! Only prefillers that failed are remembered, in an LRU of at most `capacity` entries, so a
//! scheduler naming ever new addresses cannot grow memory. States are logged with the address
//! and counted in a gauge without it (addresses are not bounded, label values must be).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// A probe that never reported frees the half-open slot after this long (a safety net:
    /// a dropped [`Admission`] frees it at once).
    probe_timeout: Duration,
    states: Mutex<LruCache<String, State>>,
    /// How many prefillers `states` holds: 0 (a healthy fleet) skips the lock.
    tracked: AtomicUsize,
    metrics: Metrics,
}

/// A request let through to a prefiller. Report its outcome with [`Admission::succeeded`] or
/// [`Admission::failed`]; dropped without one (the client left, the attempt was cancelled), a
/// half-open probe hands its slot to the next request.
pub struct Admission<'a> {
    breakers: &'a Breakers,
    prefiller: &'a Target,
    /// This request is the half-open breaker's one trial.
    probe: bool,
    settled: bool,
}

impl Admission<'_> {
    /// The prefiller answered (2xx, or a 4xx that judged the client's request).
    pub fn succeeded(mut self) {
        self.settled = true;
        self.breakers.success(self.prefiller);
    }

    /// The prefiller failed: no connection, a 5xx, or an unreadable reply.
    pub fn failed(mut self) {
        self.settled = true;
        self.breakers
            .failure_at(self.prefiller, self.probe, Instant::now());
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.breakers.release_probe(self.prefiller, Instant::now());
        }
    }
}

impl Breakers {
    /// `probe_timeout`: the prefill deadline, which bounds any attempt (0: no deadline, then
    /// two minutes).
    pub fn new(policy: BreakerPolicy, probe_timeout: Duration, metrics: Metrics) -> Self {
        let capacity = NonZeroUsize::new(policy.capacity).unwrap_or(NonZeroUsize::MIN);
        let probe_timeout = match probe_timeout {
            Duration::ZERO => Duration::from_secs(120),
            t => t,
        };
        Self {
            policy: BreakerPolicy {
                backoff: policy.backoff.min(MAX_BACKOFF),
                ..policy
            },
            probe_timeout,
            states: Mutex::new(LruCache::new(capacity)),
            tracked: AtomicUsize::new(0),
            metrics,
        }
    }

    /// May a request be sent to `prefiller` now? An expired open breaker turns half-open and
    /// this caller is its probe.
    pub fn admit<'a>(&'a self, prefiller: &'a Target) -> Option<Admission<'a>> {
        self.admit_at(prefiller, Instant::now())
            .map(|probe| Admission {
                breakers: self,
                prefiller,
                probe,
                settled: false,
            })
    }

    /// `Some(probe)` if admitted.
    fn admit_at(&self, prefiller: &Target, now: Instant) -> Option<bool> {
        if self.policy.failures == 0 || self.tracked.load(Ordering::Relaxed) == 0 {
            return Some(false);
        }
        let mut states = self.lock();
        // `peek`: asking does not make a prefiller recent, failing does.
        let Some(state) = states.peek(prefiller.authority()).copied() else {
            return Some(false);
        };
        let next = match state {
            State::Closed { .. } => return Some(false),
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
            State::Open { .. } | State::HalfOpen { .. } => return None,
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
        Some(true)
    }

    /// Would [`Breakers::admit`] let a request through now? (It changes nothing: for picking
    /// the prefiller a connector names before its prefill is sent.)
    pub fn usable(&self, prefiller: &Target) -> bool {
        self.usable_at(prefiller, Instant::now())
    }

    fn usable_at(&self, prefiller: &Target, now: Instant) -> bool {
        if self.policy.failures == 0 || self.tracked.load(Ordering::Relaxed) == 0 {
            return true;
        }
        match self.lock().peek(prefiller.authority()) {
            None | Some(State::Closed { .. }) => true,
            Some(State::Open { until, .. }) => now >= *until,
            Some(State::HalfOpen { since, .. }) => now - *since >= self.probe_timeout,
        }
    }

    /// The prefiller answered: whatever its state, it is closed again.
    fn success(&self, prefiller: &Target) {
        if self.policy.failures == 0 || self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut states = self.lock();
        let popped = states.pop(prefiller.authority());
        self.tracked.store(states.len(), Ordering::Relaxed);
        drop(states);
        let Some(state) = popped else {
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

    /// A failed request. Failures of requests sent before the breaker opened (they arrive
    /// while it is open or probing) change nothing: only the probe's failure doubles the
    /// backoff.
    fn failure_at(&self, prefiller: &Target, probe: bool, now: Instant) {
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
            State::HalfOpen { backoff, .. } | State::Open { backoff, .. } if probe => {
                let backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                State::Open {
                    until: now + backoff,
                    backoff,
                }
            }
            State::HalfOpen { .. } | State::Open { .. } => return,
        };
        let evicted = states.push(prefiller.authority().to_string(), next);
        self.tracked.store(states.len(), Ordering::Relaxed);
        drop(states);
        if let Some((key, old)) = evicted.filter(|(key, _)| key != prefiller.authority()) {
            // The least recently failed prefiller is forgotten: it starts closed again.
            self.moved(old, State::Closed { failures: 0 });
            tracing::debug!(prefiller = key, "prefiller breaker forgotten (LRU full)");
        }
        self.moved(state, next);
        if let State::Open { backoff, .. } = next {
            warn!(
                prefiller = prefiller.authority(),
                backoff_ms = backoff.as_millis() as u64,
                "prefiller circuit open: skipped until the backoff ends"
            );
        }
    }

    /// An attempt on `prefiller` ran past `-prefill-timeout` (the sidecar closes it, so its
    /// [`Admission`] reports nothing): a failure, and if the breaker was trying the prefiller
    /// (half-open, or its probe just released), the probe's.
    pub fn timed_out(&self, prefiller: &Target) {
        if self.policy.failures == 0 {
            return;
        }
        let now = Instant::now();
        let probing = match self.lock().peek(prefiller.authority()) {
            Some(State::HalfOpen { .. }) => true,
            Some(State::Open { until, .. }) => now >= *until,
            _ => false,
        };
        self.failure_at(prefiller, probing, now);
    }

    /// A probe ended without an answer: the next request may try at once.
    fn release_probe(&self, prefiller: &Target, now: Instant) {
        let mut states = self.lock();
        let Some(slot) = states.peek_mut(prefiller.authority()) else {
            return;
        };
        let State::HalfOpen { backoff, .. } = *slot else {
            return;
        };
        let (from, to) = (
            *slot,
            State::Open {
                until: now,
                backoff,
            },
        );
        *slot = to;
        drop(states);
        self.moved(from, to);
    }

    /// How long `prefiller`'s breaker stays open, if it is.
    pub fn open_for(&self, prefiller: &Target) -> Option<Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
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

    /// `admit_at` as a boolean, and whether it was the probe.
    fn admit(b: &Breakers, p: &Target, at: Instant) -> Option<bool> {
        b.admit_at(p, at)
    }

    #[test]
    fn opens_after_consecutive_failures_then_half_opens_and_closes() {
        let (b, m) = breakers(3, 16);
        let p = target("10.0.0.1:8000");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        b.failure_at(&p, false, t0);
        b.failure_at(&p, false, t0);
        b.success(&p); // the streak is broken
        b.failure_at(&p, false, t0);
        b.failure_at(&p, false, t0);
        assert_eq!(admit(&b, &p, t0), Some(false));
        b.failure_at(&p, false, t0);
        assert_eq!(admit(&b, &p, at(9)), None, "three in a row open it");
        assert_eq!(gauge(&m, "open"), "1");
        assert!(
            b.usable_at(&p, at(10)) && b.usable_at(&p, at(10)),
            "asking takes no probe"
        );
        assert_eq!(
            admit(&b, &p, at(10)),
            Some(true),
            "the backoff is over: one probe"
        );
        assert!(!b.usable_at(&p, at(10)));
        assert_eq!(admit(&b, &p, at(11)), None, "only one probe at a time");
        assert_eq!(
            (gauge(&m, "open"), gauge(&m, "half_open")),
            ("0".into(), "1".into())
        );
        b.failure_at(&p, true, at(11));
        assert_eq!(
            b.open_for_at(&p, at(11)),
            Some(Duration::from_secs(20)),
            "doubled"
        );
        assert_eq!(admit(&b, &p, at(30)), None);
        assert_eq!(admit(&b, &p, at(31)), Some(true));
        b.success(&p);
        assert_eq!(admit(&b, &p, at(31)), Some(false));
        assert_eq!(
            (gauge(&m, "open"), gauge(&m, "half_open")),
            ("0".into(), "0".into())
        );
        assert_eq!(b.tracked.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn failures_of_requests_sent_before_it_opened_do_not_lengthen_the_backoff() {
        let (b, _) = breakers(5, 16);
        let p = target("10.0.0.1:8000");
        let t0 = Instant::now();
        // A prefiller dies under load: 20 requests in flight fail at once.
        for _ in 0..20 {
            b.failure_at(&p, false, t0);
        }
        assert_eq!(b.open_for_at(&p, t0), Some(Duration::from_secs(10)));
        // Stale failures while the probe runs change nothing either; the probe's own does.
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(10)), Some(true));
        b.failure_at(&p, false, t0 + Duration::from_secs(10));
        assert_eq!(
            admit(&b, &p, t0 + Duration::from_secs(11)),
            None,
            "still probing"
        );
        b.failure_at(&p, true, t0 + Duration::from_secs(11));
        assert_eq!(
            b.open_for_at(&p, t0 + Duration::from_secs(11)),
            Some(Duration::from_secs(20))
        );
    }

    #[test]
    fn a_probe_dropped_without_an_answer_lets_the_next_request_try() {
        let (b, m) = breakers(1, 16);
        let p = target("10.0.0.1:8000");
        b.failure_at(&p, false, Instant::now() - Duration::from_secs(10));
        let probe = b.admit(&p).expect("the backoff is over");
        assert!(b.admit(&p).is_none(), "one probe at a time");
        drop(probe); // its client left
        assert_eq!(gauge(&m, "half_open"), "0");
        let next = b.admit(&p).expect("the slot is free again");
        next.succeeded();
        assert_eq!(
            (gauge(&m, "open"), gauge(&m, "half_open")),
            ("0".into(), "0".into())
        );
    }

    #[test]
    fn a_timeout_counts_and_a_probe_that_timed_out_reopens_the_breaker() {
        let (b, _) = breakers(2, 16);
        let p = target("10.0.0.1:8000");
        b.timed_out(&p);
        b.timed_out(&p);
        assert_eq!(
            b.open_for(&p).map(|d| d > Duration::from_secs(9)),
            Some(true)
        );
        // The probe hangs: its admission is dropped (released), then the timeout is reported.
        b.failure_at(&p, false, Instant::now()); // open: unchanged
        let t0 = Instant::now() - Duration::from_secs(10);
        b.lock().put(
            p.authority().to_string(),
            State::Open {
                until: t0,
                backoff: Duration::from_secs(10),
            },
        );
        drop(b.admit(&p).expect("probe"));
        b.timed_out(&p);
        assert_eq!(
            b.open_for(&p).map(|d| d > Duration::from_secs(19)),
            Some(true),
            "doubled"
        );
    }

    #[test]
    fn a_probe_that_never_reports_frees_its_slot_after_the_prefill_deadline() {
        let (b, _) = breakers(1, 16);
        let p = target("10.0.0.1:8000");
        let t0 = Instant::now();
        b.failure_at(&p, false, t0);
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(10)), Some(true));
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(39)), None);
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(40)), Some(true));
        // Without a prefill deadline the safety net is two minutes, not zero.
        let b = Breakers::new(
            BreakerPolicy {
                failures: 1,
                ..BreakerPolicy::default()
            },
            Duration::ZERO,
            Metrics::new(),
        );
        b.failure_at(&p, false, t0);
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(5)), Some(true));
        assert_eq!(admit(&b, &p, t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn memory_is_bounded_and_the_gauge_forgets_evicted_breakers() {
        let (b, m) = breakers(1, 4);
        let t0 = Instant::now();
        for i in 0..100 {
            b.failure_at(&target(&format!("10.0.0.{i}:8000")), false, t0);
        }
        assert_eq!(b.lock().len(), 4);
        assert_eq!(gauge(&m, "open"), "4");
        assert_eq!(
            admit(&b, &target("10.0.0.0:8000"), t0),
            Some(false),
            "forgotten: closed"
        );
        assert_eq!(admit(&b, &target("10.0.0.99:8000"), t0), None);
    }

    #[test]
    fn zero_failures_turns_breakers_off() {
        let (b, m) = breakers(0, 4);
        let p = target("10.0.0.1:8000");
        for _ in 0..10 {
            b.failure_at(&p, false, Instant::now());
        }
        assert!(b.admit(&p).is_some());
        assert_eq!(gauge(&m, "open"), "0");
    }
}
