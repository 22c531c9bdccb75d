//! How often a prefill that failed before pinning KV blocks is sent again, and how long to
//! wait before each attempt: exponential from `-prefill-retry-backoff`, with jitter so the
//! decoders behind one failed prefiller do not retry in step.

use std::time::Duration;

/// `-prefill-max-retries` and `-prefill-retry-backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// The mean delay before the first retry; each further one doubles it.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 0,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Doubling stops here: the prefill deadline bounds the whole series anyway.
const MAX_DOUBLINGS: u32 = 10;

/// No single wait is longer than this, whatever `-prefill-retry-backoff` says.
const MAX_DELAY: Duration = Duration::from_secs(600);

impl RetryPolicy {
    /// The delay before retry `n` (1 for the first): `backoff * 2^(n-1)`, times a uniform
    /// factor in [0.5, 1.5).
    pub fn delay(&self, n: u32) -> Duration {
        let base = self
            .backoff
            .checked_mul(2u32.pow(n.saturating_sub(1).min(MAX_DOUBLINGS)))
            .unwrap_or(MAX_DELAY)
            .min(MAX_DELAY);
        base.mul_f64(0.5 + fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_around_the_backoff() {
        let p = RetryPolicy {
            max_retries: 3,
            backoff: Duration::from_millis(100),
        };
        for _ in 0..200 {
            let first = p.delay(1);
            assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(150));
            let third = p.delay(3);
            assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(600));
        }
        // Bounded however many retries are allowed, and however long the backoff.
        assert!(p.delay(1000) < Duration::from_millis(100 * 1024 * 3 / 2));
        let huge = RetryPolicy {
            max_retries: 1,
            backoff: Duration::from_secs(u64::MAX / 2),
        };
        assert!(huge.delay(5) < MAX_DELAY * 2);
    }
}
