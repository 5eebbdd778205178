//! A token bucket per service per agent: `requests_per_second` refill, `burst` capacity.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: f64,
}

#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    stamp: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(cfg: &RateLimitConfig, now: Instant) -> Self {
        TokenBucket {
            tokens: cfg.burst,
            stamp: now,
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_acquire(&mut self, cfg: &RateLimitConfig, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cfg.requests_per_second).min(cfg.burst);
        self.stamp = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if cfg.requests_per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / cfg.requests_per_second,
            ))
        } else {
            Err(Duration::from_secs(60))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let cfg = RateLimitConfig {
            requests_per_second: 10.0,
            burst: 5.0,
        };
        let mut b = TokenBucket::new(&cfg, t0);
        for _ in 0..5 {
            assert!(b.try_acquire(&cfg, t0).is_ok());
        }
        let wait = b.try_acquire(&cfg, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_acquire(&cfg, t0 + Duration::from_millis(100)).is_ok());
        assert!(
            b.try_acquire(&cfg, t0 + Duration::from_millis(100))
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn admits_at_most_burst_plus_rate(steps in proptest::collection::vec((0u64..200, 1u32..20), 1..100),
                                          rate in 0.5f64..100.0, burst in 1.0f64..50.0) {
            let t0 = Instant::now();
            let cfg = RateLimitConfig { requests_per_second: rate, burst };
            let mut b = TokenBucket::new(&cfg, t0);
            let mut now = t0;
            let mut admitted = 0u64;
            for (ms, n) in steps {
                now += Duration::from_millis(ms);
                admitted += (0..n).filter(|_| b.try_acquire(&cfg, now).is_ok()).count() as u64;
                let secs = now.duration_since(t0).as_secs_f64();
                prop_assert!(admitted as f64 <= burst + rate * secs + 1e-6);
            }
        }
    }
}
