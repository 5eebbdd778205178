//! Retry budget (Finagle's RetryBudget): every request deposits `ratio` of a retry into a 10 s window, every
//! retry withdraws one; on top, a reserve refills at `min_per_second` so that a service with little traffic
//! can still retry. Over any run, retries ≤ ratio × requests + min_per_second × seconds: a failing backend is
//! never hit by a retry storm.

use std::time::{Duration, Instant};

/// How long a deposit stays usable.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    pub ratio: f64,
    pub min_per_second: f64,
}

#[derive(Clone, Debug)]
pub struct RetryBudget {
    epoch: Instant,
    /// (bucket index, deposits, withdrawals) per 1 s of the window.
    buckets: [(u64, f64, f64); BUCKETS],
    reserve: f64,
    refilled: Instant,
}

impl RetryBudget {
    /// A budget whose reserve starts empty and begins to fill at `now`.
    pub fn new(now: Instant) -> Self {
        RetryBudget {
            epoch: now,
            buckets: [(u64::MAX, 0.0, 0.0); BUCKETS],
            reserve: 0.0,
            refilled: now,
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let width = BUDGET_WINDOW.as_nanos() / BUCKETS as u128;
        (now.saturating_duration_since(self.epoch).as_nanos() / width) as u64
    }

    fn slot(&mut self, now: Instant) -> &mut (u64, f64, f64) {
        let idx = self.index(now);
        let slot = &mut self.buckets[(idx % BUCKETS as u64) as usize];
        if slot.0 != idx {
            *slot = (idx, 0.0, 0.0);
        }
        slot
    }

    fn balance(&self, now: Instant) -> f64 {
        let idx = self.index(now);
        self.buckets
            .iter()
            .filter(|(i, _, _)| *i != u64::MAX && *i + BUCKETS as u64 > idx && *i <= idx)
            .map(|(_, d, w)| d - w)
            .sum()
    }

    /// Called once per original request (not per retry).
    pub fn deposit(&mut self, cfg: &BudgetConfig, now: Instant) {
        self.slot(now).1 += cfg.ratio;
    }

    /// Takes one retry from the budget, or returns false when it is exhausted.
    pub fn try_withdraw(&mut self, cfg: &BudgetConfig, now: Instant) -> bool {
        // Deposits are fractions: allow for their rounding.
        if self.balance(now) >= 1.0 - 1e-9 {
            self.slot(now).2 += 1.0;
            return true;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.reserve =
            (self.reserve + elapsed * cfg.min_per_second).min(cfg.min_per_second.max(1.0));
        self.refilled = now;
        if self.reserve >= 1.0 {
            self.reserve -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ratio_of_requests_plus_reserve() {
        let t0 = Instant::now();
        let cfg = BudgetConfig {
            ratio: 0.2,
            min_per_second: 0.0,
        };
        let mut b = RetryBudget::new(t0);
        for _ in 0..10 {
            b.deposit(&cfg, t0);
        }
        assert!(b.try_withdraw(&cfg, t0));
        assert!(b.try_withdraw(&cfg, t0));
        assert!(!b.try_withdraw(&cfg, t0), "10 requests × 0.2 = 2 retries");
        // Deposits expire with the window.
        for _ in 0..5 {
            b.deposit(&cfg, t0);
        }
        assert!(!b.try_withdraw(&cfg, t0 + Duration::from_secs(11)));

        let cfg = BudgetConfig {
            ratio: 0.0,
            min_per_second: 10.0,
        };
        let mut b = RetryBudget::new(t0);
        assert!(!b.try_withdraw(&cfg, t0), "the reserve starts empty");
        let t1 = t0 + Duration::from_millis(500);
        let granted = (0..20).filter(|_| b.try_withdraw(&cfg, t1)).count();
        assert_eq!(granted, 5, "half a second at 10/s");
    }

    proptest! {
        /// Retries never exceed ratio × requests + min_per_second × elapsed seconds.
        #[test]
        fn never_exceeds_budget(steps in proptest::collection::vec((0u64..400, 0u32..5, 0u32..10), 1..300),
                                ratio in 0.0f64..1.0, min in 0.0f64..20.0) {
            let t0 = Instant::now();
            let cfg = BudgetConfig { ratio, min_per_second: min };
            let mut b = RetryBudget::new(t0);
            let mut now = t0;
            let (mut requests, mut retries) = (0u64, 0u64);
            for (advance_ms, reqs, tries) in steps {
                now += Duration::from_millis(advance_ms);
                for _ in 0..reqs {
                    b.deposit(&cfg, now);
                    requests += 1;
                }
                for _ in 0..tries {
                    if b.try_withdraw(&cfg, now) {
                        retries += 1;
                    }
                }
                let secs = now.duration_since(t0).as_secs_f64();
                prop_assert!(retries as f64 <= ratio * requests as f64 + min * secs + 1e-6,
                    "{} retries for {} requests over {:.1}s", retries, requests, secs);
            }
        }
    }
}
