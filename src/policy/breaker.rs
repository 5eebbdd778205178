//! Per-endpoint circuit breakers: `consecutive-failures` and `success-rate`.
//!
//! A breaker is closed (traffic flows), open (no traffic until the backoff passes), or half-open (exactly one
//! probe request is in flight). A probe's success closes the breaker and resets the backoff; its failure
//! re-opens it with the next, longer backoff. Time comes in as a parameter; randomness (jitter) too.

use std::time::{Duration, Instant};

/// Exponential backoff between opening and probing.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Backoff {
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub min: Duration,
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub max: Duration,
    /// Up to this fraction of the backoff is added at random.
    pub jitter: f64,
}

impl Backoff {
    /// The wait after the `n`th consecutive opening (0-based), with `r` ∈ [0, 1) choosing the jitter.
    pub fn delay(&self, n: u32, r: f64) -> Duration {
        let base = self.min.as_secs_f64() * 2f64.powi(n.min(62) as i32);
        let base = base.min(self.max.as_secs_f64());
        let jittered = base * (1.0 + self.jitter * r.clamp(0.0, 1.0));
        Duration::from_secs_f64(
            jittered
                .min(self.max.as_secs_f64())
                .max(self.min.as_secs_f64()),
        )
    }
}

/// Which breaker, and its parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BreakerKind {
    /// Open after `failures` failures in a row.
    ConsecutiveFailures { failures: u32 },
    /// Open when, over `window`, at least `min_requests` were seen and the success rate fell below `threshold`.
    SuccessRate {
        #[serde(serialize_with = "crate::config::ser_duration")]
        window: Duration,
        min_requests: u32,
        threshold: f64,
    },
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BreakerConfig {
    #[serde(flatten)]
    pub kind: BreakerKind,
    pub backoff: Backoff,
}

/// What the breaker looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// A transition the caller may want to report (metrics, logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// Buckets of the success-rate window.
const BUCKETS: usize = 10;

#[derive(Clone, Debug)]
struct Window {
    /// (bucket index since start, successes, failures)
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    fn new() -> Self {
        Window {
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn record(&mut self, idx: u64, ok: bool) {
        let slot = &mut self.buckets[(idx % BUCKETS as u64) as usize];
        if slot.0 != idx {
            *slot = (idx, 0, 0);
        }
        if ok {
            slot.1 += 1;
        } else {
            slot.2 += 1;
        }
    }

    fn totals(&self, idx: u64) -> (u32, u32) {
        self.buckets
            .iter()
            .filter(|(i, _, _)| *i != u64::MAX && *i + (BUCKETS as u64) > idx && *i <= idx)
            .fold((0, 0), |(s, f), (_, bs, bf)| (s + bs, f + bf))
    }

    fn clear(&mut self) {
        *self = Window::new();
    }
}

/// A circuit breaker's state machine.
#[derive(Clone, Debug)]
pub struct Breaker {
    state: Inner,
    /// How many times in a row the breaker has opened without a successful probe.
    openings: u32,
    consecutive_failures: u32,
    window: Window,
    epoch: Instant,
}

#[derive(Clone, Copy, Debug)]
enum Inner {
    Closed,
    Open {
        until: Instant,
    },
    /// A probe was let through and has not reported yet.
    HalfOpen,
}

impl Breaker {
    pub fn new(now: Instant) -> Self {
        Breaker {
            state: Inner::Closed,
            openings: 0,
            consecutive_failures: 0,
            window: Window::new(),
            epoch: now,
        }
    }

    /// The state as of `now` (an open breaker whose backoff has passed is ready for a probe, shown half-open).
    pub fn state(&self, now: Instant) -> State {
        match self.state {
            Inner::Closed => State::Closed,
            Inner::Open { until } if now >= until => State::HalfOpen,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen => State::HalfOpen,
        }
    }

    /// Whether a request may be sent now, without taking the probe slot.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            Inner::Closed => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen => false,
        }
    }

    /// Takes permission to send one request. For an open breaker past its backoff this is the single probe.
    pub fn acquire(&mut self, now: Instant) -> bool {
        match self.state {
            Inner::Closed => true,
            Inner::Open { until } if now >= until => {
                self.state = Inner::HalfOpen;
                true
            }
            Inner::Open { .. } | Inner::HalfOpen => false,
        }
    }

    /// Records the outcome of a request that `acquire` let through. `r` ∈ [0, 1) picks the backoff jitter.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        now: Instant,
        ok: bool,
        r: f64,
    ) -> Option<Transition> {
        match self.state {
            Inner::HalfOpen => {
                if ok {
                    self.close()
                } else {
                    self.open(cfg, now, r)
                }
            }
            // A late answer from before the breaker opened changes nothing.
            Inner::Open { .. } => None,
            Inner::Closed => match &cfg.kind {
                BreakerKind::ConsecutiveFailures { failures } => {
                    if ok {
                        self.consecutive_failures = 0;
                        None
                    } else {
                        self.consecutive_failures += 1;
                        if self.consecutive_failures >= *failures {
                            self.open(cfg, now, r)
                        } else {
                            None
                        }
                    }
                }
                BreakerKind::SuccessRate {
                    window,
                    min_requests,
                    threshold,
                } => {
                    let idx = self.bucket(now, *window);
                    self.window.record(idx, ok);
                    let (s, f) = self.window.totals(idx);
                    let total = s + f;
                    if total >= *min_requests && total > 0 && (s as f64 / total as f64) < *threshold
                    {
                        self.open(cfg, now, r)
                    } else {
                        None
                    }
                }
            },
        }
    }

    /// Drops a probe that was let through but never sent (another endpoint was chosen, the request was
    /// cancelled): the next request may probe instead.
    pub fn release_probe(&mut self, now: Instant) {
        if let Inner::HalfOpen = self.state {
            self.state = Inner::Open { until: now };
        }
    }

    fn bucket(&self, now: Instant, window: Duration) -> u64 {
        let width = (window.as_nanos() / BUCKETS as u128).max(1);
        (now.saturating_duration_since(self.epoch).as_nanos() / width) as u64
    }

    fn open(&mut self, cfg: &BreakerConfig, now: Instant, r: f64) -> Option<Transition> {
        let was_closed = matches!(self.state, Inner::Closed);
        let delay = cfg.backoff.delay(self.openings, r);
        self.openings = self.openings.saturating_add(1);
        self.state = Inner::Open { until: now + delay };
        self.consecutive_failures = 0;
        self.window.clear();
        was_closed.then_some(Transition::Opened)
    }

    fn close(&mut self) -> Option<Transition> {
        self.state = Inner::Closed;
        self.openings = 0;
        self.consecutive_failures = 0;
        self.window.clear();
        Some(Transition::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(failures: u32) -> BreakerConfig {
        BreakerConfig {
            kind: BreakerKind::ConsecutiveFailures { failures },
            backoff: Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
                jitter: 0.5,
            },
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let t0 = Instant::now();
        let c = cfg(5);
        let mut b = Breaker::new(t0);
        for i in 0..4 {
            assert!(b.acquire(t0));
            assert_eq!(b.record(&c, t0, false, 0.0), None, "failure {i}");
        }
        // A success resets the count.
        assert!(b.acquire(t0));
        b.record(&c, t0, true, 0.0);
        for _ in 0..4 {
            b.acquire(t0);
            b.record(&c, t0, false, 0.0);
        }
        assert_eq!(b.state(t0), State::Closed);
        b.acquire(t0);
        assert_eq!(b.record(&c, t0, false, 0.0), Some(Transition::Opened));
        assert_eq!(b.state(t0), State::Open);
        assert!(!b.acquire(t0 + Duration::from_millis(999)));
        // After the 1 s backoff: exactly one probe.
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.is_available(t1));
        assert!(b.acquire(t1));
        assert!(!b.acquire(t1), "a second request while the probe is out");
        assert!(!b.is_available(t1));
        // The probe fails: open again for 2 s.
        assert_eq!(b.record(&c, t1, false, 0.0), None);
        assert!(!b.acquire(t1 + Duration::from_millis(1999)));
        let t2 = t1 + Duration::from_secs(2);
        assert!(b.acquire(t2));
        assert_eq!(b.record(&c, t2, true, 0.0), Some(Transition::Closed));
        assert_eq!(b.state(t2), State::Closed);
        // The backoff was reset by the successful probe.
        for _ in 0..5 {
            b.acquire(t2);
            b.record(&c, t2, false, 0.0);
        }
        assert!(b.acquire(t2 + Duration::from_secs(1)));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let bo = cfg(1).backoff;
        assert_eq!(bo.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(bo.delay(3, 0.0), Duration::from_secs(8));
        assert_eq!(bo.delay(10, 0.0), Duration::from_secs(60));
        assert_eq!(bo.delay(0, 0.99).as_millis(), 1495);
        assert_eq!(bo.delay(40, 0.99), Duration::from_secs(60));
    }

    #[test]
    fn success_rate_breaker() {
        let t0 = Instant::now();
        let c = BreakerConfig {
            kind: BreakerKind::SuccessRate {
                window: Duration::from_secs(10),
                min_requests: 10,
                threshold: 0.8,
            },
            backoff: cfg(1).backoff,
        };
        let mut b = Breaker::new(t0);
        // 9 failures: below min_requests, stays closed.
        for _ in 0..9 {
            b.acquire(t0);
            assert_eq!(b.record(&c, t0, false, 0.0), None);
        }
        // Old failures leave the window.
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            b.acquire(later);
            assert_eq!(b.record(&c, later, true, 0.0), None);
        }
        assert_eq!(b.state(later), State::Closed);
        // 9 ok + 3 failures = 75 % < 80 % with 12 ≥ 10 requests.
        b.acquire(later);
        b.record(&c, later, false, 0.0);
        b.acquire(later);
        b.record(&c, later, false, 0.0);
        b.acquire(later);
        assert_eq!(b.record(&c, later, false, 0.0), Some(Transition::Opened));
    }

    #[test]
    fn released_probe_can_be_taken_again() {
        let t0 = Instant::now();
        let c = cfg(1);
        let mut b = Breaker::new(t0);
        b.acquire(t0);
        b.record(&c, t0, false, 0.0);
        let t1 = t0 + Duration::from_secs(2);
        assert!(b.acquire(t1));
        b.release_probe(t1);
        assert!(b.acquire(t1));
    }

    proptest! {
        /// Whatever the sequence of outcomes and times, an open breaker never lets a request through before
        /// its backoff, and a half-open one lets exactly one through.
        #[test]
        fn never_more_than_one_probe(events in proptest::collection::vec((0u64..3000, any::<bool>(), any::<bool>()), 1..200)) {
            let t0 = Instant::now();
            let c = cfg(3);
            let mut b = Breaker::new(t0);
            let mut now = t0;
            for (advance_ms, ok, try_second) in events {
                now += Duration::from_millis(advance_ms);
                let before = b.state(now);
                if b.acquire(now) {
                    if before == State::HalfOpen {
                        if try_second {
                            prop_assert!(!b.acquire(now), "second request during a probe");
                        }
                    } else {
                        prop_assert_eq!(before, State::Closed);
                    }
                    b.record(&c, now, ok, 0.5);
                } else {
                    prop_assert!(before == State::Open, "refused while {:?}", before);
                }
            }
        }
    }
}
