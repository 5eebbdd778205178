//! Per-endpoint circuit breakers: `consecutive-failures` and `success-rate`.
//!
//! A breaker is closed (traffic flows), open (no traffic until the backoff passes), or half-open (exactly one
//! probe request is in flight). A probe's success closes the breaker and resets the backoff; its failure
//! re-opens it with the next, longer backoff. Time comes in as a parameter; randomness (jitter) too.
//!
//! Every request the breaker lets through carries a [`Permit`] stamped with the breaker's *epoch*, which moves
//! on at every change of state. An outcome counts only when its permit belongs to the current epoch: a late
//! answer to a request sent before the breaker opened changes nothing, and only the half-open probe's own
//! outcome closes or re-opens it. A probe that is cancelled before it reports gives its slot back, so exactly
//! one new probe can start.
//!
//! Opening takes two steps, so the caller can apply the service's `max_ejection_percent`: [`Breaker::record`]
//! reports [`Transition::Tripped`] when the failures are enough, and the breaker opens only when the caller
//! then calls [`Breaker::eject`]. An endpoint the caller does not eject stays in rotation and trips again on
//! its next failure.

use std::time::{Duration, Instant};

use crate::util::Backoff;

/// Which breaker, and its parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BreakerKind {
    /// Open after `failures` failures in a row.
    ConsecutiveFailures { failures: u32 },
    /// Open when, over `window`, at least `min_requests` were seen and the success rate fell below `threshold`.
    SuccessRate {
        #[serde(serialize_with = "crate::util::duration::ser")]
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
    /// Enough failures to open: the caller decides whether to [`Breaker::eject`].
    Tripped,
    /// The probe failed: open again, with a longer backoff.
    Reopened,
    Closed,
}

/// Permission to send one request, returned by [`Breaker::acquire`] and handed back with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    epoch: u64,
    kind: PermitKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PermitKind {
    /// While closed.
    Normal,
    /// The single half-open probe.
    Probe,
    /// Sent while ejected because every endpoint of the service is ejected ([`Breaker::forced`]): its outcome
    /// never changes the state, but a failure moves `last_failure`.
    Forced,
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.kind == PermitKind::Probe
    }
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
    /// Moves on at every change of state; permits from another epoch are ignored.
    epoch: u64,
    /// How many times in a row the breaker has opened without a successful probe.
    openings: u32,
    consecutive_failures: u32,
    window: Window,
    /// When the last counted failure happened (also failures of forced requests).
    last_failure: Option<Instant>,
    start: Instant,
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
            epoch: 0,
            openings: 0,
            consecutive_failures: 0,
            window: Window::new(),
            last_failure: None,
            start: now,
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

    /// Whether the endpoint is out of rotation (open or half-open).
    pub fn is_ejected(&self) -> bool {
        !matches!(self.state, Inner::Closed)
    }

    /// Whether a request may be sent now, without taking the probe slot.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            Inner::Closed => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen => false,
        }
    }

    /// When the endpoint last failed (`None`: never, since it was created).
    pub fn last_failure(&self) -> Option<Instant> {
        self.last_failure
    }

    /// Takes permission to send one request. For an open breaker past its backoff this is the single probe.
    pub fn acquire(&mut self, now: Instant) -> Option<Permit> {
        match self.state {
            Inner::Closed => Some(self.permit(PermitKind::Normal)),
            Inner::Open { until } if now >= until => {
                self.state = Inner::HalfOpen;
                self.epoch += 1;
                Some(self.permit(PermitKind::Probe))
            }
            Inner::Open { .. } | Inner::HalfOpen => None,
        }
    }

    /// Permission to send to this endpoint even though it is ejected: the caller found every endpoint of the
    /// service ejected and still has to send somewhere.
    pub fn forced(&self) -> Permit {
        self.permit(PermitKind::Forced)
    }

    fn permit(&self, kind: PermitKind) -> Permit {
        Permit {
            epoch: self.epoch,
            kind,
        }
    }

    /// Records the outcome of a request sent with `permit`. `r` ∈ [0, 1) picks the backoff jitter.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        now: Instant,
        permit: Permit,
        ok: bool,
        r: f64,
    ) -> Option<Transition> {
        let current = permit.epoch == self.epoch;
        if !ok && (current || permit.kind == PermitKind::Forced) {
            self.last_failure = Some(now);
        }
        if !current {
            // From before the last change of state: a late answer that says nothing about now.
            return None;
        }
        match (self.state, permit.kind) {
            (Inner::HalfOpen, PermitKind::Probe) => {
                if ok {
                    self.close()
                } else {
                    self.open(cfg, now, r);
                    Some(Transition::Reopened)
                }
            }
            (Inner::Closed, PermitKind::Normal) => {
                let trips = match &cfg.kind {
                    BreakerKind::ConsecutiveFailures { failures } => {
                        if ok {
                            self.consecutive_failures = 0;
                            false
                        } else {
                            self.consecutive_failures += 1;
                            self.consecutive_failures >= *failures
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
                        !ok && total >= *min_requests
                            && total > 0
                            && (s as f64 / total as f64) < *threshold
                    }
                };
                trips.then_some(Transition::Tripped)
            }
            // A forced request, or a permit of a kind that does not match the state.
            _ => None,
        }
    }

    /// Opens a breaker that [`Transition::Tripped`] (if it is still closed): the endpoint leaves rotation
    /// until its backoff passes. Returns whether it opened.
    pub fn eject(&mut self, cfg: &BreakerConfig, now: Instant, r: f64) -> bool {
        if !matches!(self.state, Inner::Closed) {
            return false;
        }
        self.open(cfg, now, r);
        true
    }

    /// Gives back a permit whose request was never answered (another endpoint was chosen, the caller went
    /// away). A cancelled probe lets the next request probe instead; other permits need nothing.
    pub fn release(&mut self, now: Instant, permit: Permit) {
        if permit.kind == PermitKind::Probe
            && permit.epoch == self.epoch
            && matches!(self.state, Inner::HalfOpen)
        {
            self.state = Inner::Open { until: now };
            self.epoch += 1;
        }
    }

    fn bucket(&self, now: Instant, window: Duration) -> u64 {
        let width = (window.as_nanos() / BUCKETS as u128).max(1);
        (now.saturating_duration_since(self.start).as_nanos() / width) as u64
    }

    fn open(&mut self, cfg: &BreakerConfig, now: Instant, r: f64) {
        let delay = cfg.backoff.delay(self.openings, r);
        self.openings = self.openings.saturating_add(1);
        self.state = Inner::Open { until: now + delay };
        self.epoch += 1;
        self.consecutive_failures = 0;
        self.window.clear();
    }

    fn close(&mut self) -> Option<Transition> {
        self.state = Inner::Closed;
        self.epoch += 1;
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

    /// acquire + record in one step, ejecting when it trips.
    fn run(b: &mut Breaker, c: &BreakerConfig, now: Instant, ok: bool) -> Option<Transition> {
        let p = b.acquire(now).expect("a permit");
        rec(b, c, now, p, ok)
    }

    /// record, ejecting when it trips.
    fn rec(
        b: &mut Breaker,
        c: &BreakerConfig,
        now: Instant,
        p: Permit,
        ok: bool,
    ) -> Option<Transition> {
        let t = b.record(c, now, p, ok, 0.0);
        if t == Some(Transition::Tripped) {
            assert!(b.eject(c, now, 0.0));
        }
        t
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let t0 = Instant::now();
        let c = cfg(5);
        let mut b = Breaker::new(t0);
        for i in 0..4 {
            assert_eq!(run(&mut b, &c, t0, false), None, "failure {i}");
        }
        // A success resets the count.
        run(&mut b, &c, t0, true);
        for _ in 0..4 {
            run(&mut b, &c, t0, false);
        }
        assert_eq!(b.state(t0), State::Closed);
        assert_eq!(run(&mut b, &c, t0, false), Some(Transition::Tripped));
        assert_eq!(b.state(t0), State::Open);
        assert!(b.acquire(t0 + Duration::from_millis(999)).is_none());
        // After the 1 s backoff: exactly one probe.
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.is_available(t1));
        let probe = b.acquire(t1).unwrap();
        assert!(probe.is_probe());
        assert!(
            b.acquire(t1).is_none(),
            "a second request while the probe is out"
        );
        assert!(!b.is_available(t1));
        // The probe fails: open again for 2 s.
        assert_eq!(
            rec(&mut b, &c, t1, probe, false),
            Some(Transition::Reopened)
        );
        assert!(b.acquire(t1 + Duration::from_millis(1999)).is_none());
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(run(&mut b, &c, t2, true), Some(Transition::Closed));
        assert_eq!(b.state(t2), State::Closed);
        // The backoff was reset by the successful probe.
        for _ in 0..5 {
            run(&mut b, &c, t2, false);
        }
        assert!(b.acquire(t2 + Duration::from_secs(1)).is_some());
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
            assert_eq!(run(&mut b, &c, t0, false), None);
        }
        // Old failures leave the window.
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            assert_eq!(run(&mut b, &c, later, true), None);
        }
        assert_eq!(b.state(later), State::Closed);
        // 9 ok + 3 failures = 75 % < 80 % with 12 ≥ 10 requests.
        run(&mut b, &c, later, false);
        run(&mut b, &c, later, false);
        assert_eq!(run(&mut b, &c, later, false), Some(Transition::Tripped));
        assert_eq!(b.state(later), State::Open);
    }

    #[test]
    fn released_probe_can_be_taken_again_once() {
        let t0 = Instant::now();
        let c = cfg(1);
        let mut b = Breaker::new(t0);
        run(&mut b, &c, t0, false);
        let t1 = t0 + Duration::from_secs(2);
        let probe = b.acquire(t1).unwrap();
        b.release(t1, probe);
        let again = b.acquire(t1).expect("a new probe after a cancelled one");
        assert!(b.acquire(t1).is_none(), "exactly one");
        // The cancelled probe's late answer is ignored; the new probe's decides.
        assert_eq!(rec(&mut b, &c, t1, probe, true), None);
        assert_eq!(b.state(t1), State::HalfOpen);
        assert_eq!(rec(&mut b, &c, t1, again, true), Some(Transition::Closed));
    }

    #[test]
    fn late_answers_from_before_the_opening_change_nothing() {
        let t0 = Instant::now();
        let c = cfg(2);
        let mut b = Breaker::new(t0);
        // Three requests go out while closed; two fail and open the breaker.
        let p: Vec<Permit> = (0..3).map(|_| b.acquire(t0).unwrap()).collect();
        rec(&mut b, &c, t0, p[0], false);
        assert_eq!(rec(&mut b, &c, t0, p[1], false), Some(Transition::Tripped));
        // The third answers late, after the backoff, while a probe is out: it neither closes the breaker...
        let t1 = t0 + Duration::from_secs(1);
        let probe = b.acquire(t1).unwrap();
        assert_eq!(rec(&mut b, &c, t1, p[2], true), None);
        assert_eq!(b.state(t1), State::HalfOpen);
        // ...nor would its failure have re-opened it; only the probe decides.
        assert_eq!(rec(&mut b, &c, t1, probe, true), Some(Transition::Closed));
    }

    #[test]
    fn a_trip_without_ejection_keeps_the_endpoint_in_rotation() {
        let t0 = Instant::now();
        let c = cfg(2);
        let mut b = Breaker::new(t0);
        let p = b.acquire(t0).unwrap();
        assert_eq!(b.record(&c, t0, p, false, 0.0), None);
        let p = b.acquire(t0).unwrap();
        assert_eq!(b.record(&c, t0, p, false, 0.0), Some(Transition::Tripped));
        assert_eq!(b.state(t0), State::Closed, "not ejected by the caller");
        // Every further failure trips again, so it is ejected as soon as the caller allows it.
        let p = b.acquire(t0).unwrap();
        assert_eq!(b.record(&c, t0, p, false, 0.0), Some(Transition::Tripped));
        assert!(b.eject(&c, t0, 0.0));
        assert_eq!(b.state(t0), State::Open);
        assert!(!b.eject(&c, t0, 0.0), "already open");
    }

    #[test]
    fn forced_requests_never_change_the_state_but_move_last_failure() {
        let t0 = Instant::now();
        let c = cfg(1);
        let mut b = Breaker::new(t0);
        run(&mut b, &c, t0, false);
        assert_eq!(b.last_failure(), Some(t0));
        let t1 = t0 + Duration::from_millis(100);
        let f = b.forced();
        assert_eq!(b.record(&c, t1, f, true, 0.0), None);
        assert_eq!(b.state(t1), State::Open);
        let f = b.forced();
        b.record(&c, t1, f, false, 0.0);
        assert_eq!(b.last_failure(), Some(t1));
        assert_eq!(b.state(t1), State::Open);
    }

    /// What a simulated caller does next.
    #[derive(Clone, Debug)]
    enum Step {
        /// Advance the clock, then try to send (keeping the permit in flight).
        Send(u64),
        /// The oldest in-flight request answers.
        Answer(bool),
        /// The oldest in-flight request is cancelled.
        Cancel,
        /// A forced request answers at once.
        Forced(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..2500).prop_map(Step::Send),
            any::<bool>().prop_map(Step::Answer),
            Just(Step::Cancel),
            any::<bool>().prop_map(Step::Forced),
        ]
    }

    proptest! {
        /// Whatever the interleaving of sends, late answers, cancellations and forced requests: at most one
        /// probe is ever out; a half-open breaker changes state only on its own probe's answer (or the probe's
        /// cancellation, which makes room for exactly one new probe); nothing is let through while open.
        #[test]
        fn only_the_probe_decides(steps in proptest::collection::vec(step(), 1..300)) {
            let t0 = Instant::now();
            let c = cfg(3);
            let mut b = Breaker::new(t0);
            let mut now = t0;
            let mut in_flight: std::collections::VecDeque<Permit> = Default::default();
            for s in steps {
                match s {
                    Step::Send(ms) => {
                        now += Duration::from_millis(ms);
                        let before = b.state(now);
                        // A probe of the current epoch is out and has not answered.
                        let probe_out = in_flight.iter().any(|q| q.is_probe() && q.epoch == b.epoch)
                            && matches!(b.state, Inner::HalfOpen);
                        match b.acquire(now) {
                            Some(p) => {
                                prop_assert!(before != State::Open, "let through while open");
                                prop_assert!(!probe_out, "let through while the probe is out");
                                if p.is_probe() {
                                    prop_assert_eq!(before, State::HalfOpen);
                                }
                                in_flight.push_back(p);
                            }
                            None => prop_assert!(before != State::Closed, "refused while closed"),
                        }
                    }
                    Step::Answer(ok) => {
                        if let Some(p) = in_flight.pop_front() {
                            let half_open = matches!(b.state, Inner::HalfOpen);
                            let live_probe = p.is_probe() && p.epoch == b.epoch;
                            let epoch = b.epoch;
                            if b.record(&c, now, p, ok, 0.5) == Some(Transition::Tripped) {
                                b.eject(&c, now, 0.5);
                            }
                            if half_open && !live_probe {
                                prop_assert!(matches!(b.state, Inner::HalfOpen) && b.epoch == epoch, "a late answer moved a half-open breaker");
                            }
                            if live_probe {
                                prop_assert_eq!(b.state(now), if ok { State::Closed } else { State::Open });
                            }
                            if p.epoch != epoch {
                                prop_assert_eq!(b.epoch, epoch, "a stale permit changed the state");
                            }
                        }
                    }
                    Step::Cancel => {
                        if let Some(p) = in_flight.pop_front() {
                            let live_probe = p.is_probe() && p.epoch == b.epoch && matches!(b.state, Inner::HalfOpen);
                            b.release(now, p);
                            if live_probe {
                                // Exactly one new probe can start.
                                let again = b.acquire(now);
                                prop_assert!(again.is_some_and(|q| q.is_probe()));
                                prop_assert!(b.acquire(now).is_none());
                                in_flight.extend(again);
                            }
                        }
                    }
                    Step::Forced(ok) => {
                        let before = (b.state(now), b.epoch);
                        let f = b.forced();
                        prop_assert_eq!(b.record(&c, now, f, ok, 0.5), None);
                        prop_assert_eq!((b.state(now), b.epoch), before);
                    }
                }
            }
        }
    }
}
