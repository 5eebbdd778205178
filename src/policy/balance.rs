//! Load balancing: power of two choices over peak-EWMA cost (default), round-robin and least-request, all
//! weighted, all skipping endpoints whose circuit breaker is open.
//!
//! The balancer sees endpoints through [`Candidate`], so tests drive it with plain structs and a seeded RNG.

use std::time::{Duration, Instant};

/// Which balancer a service uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

impl LoadBalancer {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "p2c-ewma" => Some(LoadBalancer::P2cEwma),
            "round-robin" => Some(LoadBalancer::RoundRobin),
            "least-request" => Some(LoadBalancer::LeastRequest),
            _ => None,
        }
    }
}

/// How fast old latency observations fade.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint before it has answered anything.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Peak-sensitive exponentially weighted moving average of response latency (Finagle's and Linkerd's "peak
/// EWMA"): a slower observation replaces the average at once, a faster one is blended in, and the estimate
/// decays while the endpoint is idle so that a once-slow endpoint is eventually tried again.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    /// Estimate in nanoseconds.
    rtt: f64,
    stamp: Instant,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        PeakEwma {
            rtt: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    /// How much of the estimate is left after the time since the last sample.
    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.rtt * self.decay(now)
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        // One `exp` for both the decayed estimate and the sample's weight.
        let w = self.decay(now);
        let current = self.rtt * w;
        self.rtt = if rtt > current {
            rtt
        } else {
            current * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }

    /// The current estimate.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.decayed(now) as u64)
    }
}

/// What the balancer needs to know about an endpoint.
pub trait Candidate {
    fn weight(&self) -> u32;
    /// False while the endpoint's breaker is open (or its one probe is out).
    fn available(&self, now: Instant) -> bool;
    /// Requests sent and not yet answered.
    fn pending(&self) -> u32;
    /// The peak-EWMA latency estimate in nanoseconds.
    fn latency(&self, now: Instant) -> f64;
}

/// The endpoints a retry should avoid (bit i = endpoint i was tried). Endpoints past 64 are never avoided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    pub fn add(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1 << i;
        }
    }
    pub fn contains(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
}

/// Picks an endpoint, or `None` when none is available. Endpoints in `tried` are used only when nothing else
/// is available. `rr` is the service's round-robin cursor.
pub fn pick<C: Candidate>(
    lb: LoadBalancer,
    eps: &[C],
    now: Instant,
    rng: &mut fastrand::Rng,
    rr: &std::sync::atomic::AtomicUsize,
    tried: Tried,
) -> Option<usize> {
    let fresh = |i: usize, e: &C| e.available(now) && !tried.contains(i);
    let any = |_: usize, e: &C| e.available(now);
    pick_among(lb, eps, now, rng, rr, &fresh).or_else(|| pick_among(lb, eps, now, rng, rr, &any))
}

fn pick_among<C: Candidate>(
    lb: LoadBalancer,
    eps: &[C],
    now: Instant,
    rng: &mut fastrand::Rng,
    rr: &std::sync::atomic::AtomicUsize,
    ok: &dyn Fn(usize, &C) -> bool,
) -> Option<usize> {
    let total: u64 = eps
        .iter()
        .enumerate()
        .filter(|(i, e)| ok(*i, e))
        .map(|(_, e)| e.weight() as u64)
        .sum();
    if total == 0 {
        // Everything eligible has weight 0 (or nothing is eligible): fall back to the first eligible.
        return eps
            .iter()
            .enumerate()
            .find(|(i, e)| ok(*i, e))
            .map(|(i, _)| i);
    }
    match lb {
        LoadBalancer::RoundRobin => {
            // Multiplying the cursor by a number coprime to the total weight walks a permutation of the
            // positions: every cycle of `total` picks honours the weights exactly, and endpoints interleave
            // instead of taking their whole share in one run.
            let cursor = rr.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u64 % total;
            let n = (cursor as u128 * stride(total) as u128 % total as u128) as u64;
            weighted_at(eps, ok, n)
        }
        LoadBalancer::P2cEwma | LoadBalancer::LeastRequest => {
            // Two distinct candidates, each drawn in proportion to its weight. (Drawing with replacement
            // would compare an endpoint with itself a third of the time among three, handing a slow one
            // a share it never has to compete for.)
            let a = weighted_at(eps, ok, rng.u64(..total))?;
            let rest = total - eps[a].weight() as u64;
            if rest == 0 {
                return Some(a);
            }
            let b = weighted_at(eps, &|i: usize, e: &C| i != a && ok(i, e), rng.u64(..rest))?;
            let cost = |i: usize| {
                let e = &eps[i];
                let load = e.pending() as f64 + 1.0;
                match lb {
                    LoadBalancer::P2cEwma => e.latency(now) * load,
                    _ => load,
                }
            };
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// A step near 0.618 × total that is coprime to total.
fn stride(total: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut m = (total * 618 / 1000).max(1);
    while gcd(m, total) != 1 {
        m += 1;
    }
    m
}

/// The eligible endpoint covering position `n` of the cumulative weights.
fn weighted_at<C: Candidate>(
    eps: &[C],
    ok: &dyn Fn(usize, &C) -> bool,
    mut n: u64,
) -> Option<usize> {
    for (i, e) in eps.iter().enumerate() {
        if !ok(i, e) {
            continue;
        }
        let w = e.weight() as u64;
        if n < w {
            return Some(i);
        }
        n -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Clone, Debug)]
    struct Ep {
        weight: u32,
        up: bool,
        pending: u32,
        ewma: PeakEwma,
    }

    impl Candidate for Ep {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn available(&self, _: Instant) -> bool {
            self.up
        }
        fn pending(&self) -> u32 {
            self.pending
        }
        fn latency(&self, now: Instant) -> f64 {
            self.ewma.decayed(now)
        }
    }

    fn ep(weight: u32, up: bool, now: Instant) -> Ep {
        Ep {
            weight,
            up,
            pending: 0,
            ewma: PeakEwma::new(now),
        }
    }

    const ALL: [LoadBalancer; 3] = [
        LoadBalancer::P2cEwma,
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
    ];

    #[test]
    fn peak_ewma_takes_peaks_and_decays() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.estimate(t0), Duration::from_millis(100));
        // A fast answer right after barely moves it; a long quiet period decays it.
        e.observe(Duration::from_millis(1), t0 + Duration::from_millis(10));
        assert!(e.estimate(t0 + Duration::from_millis(10)) > Duration::from_millis(95));
        assert!(e.estimate(t0 + Duration::from_secs(30)) < Duration::from_millis(10));
    }

    #[test]
    fn retries_prefer_an_untried_endpoint() {
        let now = Instant::now();
        let eps = vec![ep(100, true, now), ep(100, true, now)];
        let mut rng = fastrand::Rng::with_seed(1);
        let rr = AtomicUsize::new(0);
        for lb in ALL {
            for _ in 0..50 {
                let mut tried = Tried::default();
                tried.add(0);
                assert_eq!(pick(lb, &eps, now, &mut rng, &rr, tried), Some(1));
            }
            // With the only other endpoint down, the tried one is used again.
            let eps = vec![ep(100, true, now), ep(100, false, now)];
            let mut tried = Tried::default();
            tried.add(0);
            assert_eq!(pick(lb, &eps, now, &mut rng, &rr, tried), Some(0));
        }
    }

    #[test]
    fn round_robin_interleaves() {
        let now = Instant::now();
        let eps = vec![ep(100, true, now), ep(100, true, now), ep(50, true, now)];
        let mut rng = fastrand::Rng::with_seed(1);
        let rr = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..250)
            .map(|_| {
                pick(
                    LoadBalancer::RoundRobin,
                    &eps,
                    now,
                    &mut rng,
                    &rr,
                    Tried::default(),
                )
                .unwrap()
            })
            .collect();
        // Exact shares over a full cycle…
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 100);
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 50);
        // …and no endpoint takes more than a few picks in a row.
        let longest = picks
            .chunk_by(|a, b| a == b)
            .map(|run| run.len())
            .max()
            .unwrap();
        assert!(longest <= 3, "runs of {longest}: {picks:?}");
    }

    /// A simulated run: a 10× slower endpoint loses its share under p2c-ewma.
    #[test]
    fn slow_endpoint_gets_under_ten_percent() {
        let mut now = Instant::now();
        let latencies = [10u64, 10, 10, 100];
        let mut eps: Vec<Ep> = latencies.iter().map(|_| ep(100, true, now)).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let rr = AtomicUsize::new(0);
        // Requests arrive every 2 ms; each completes after its endpoint's latency.
        let mut in_flight: Vec<(Instant, usize)> = Vec::new();
        let mut counts = [0u32; 4];
        for i in 0..20_000 {
            now += Duration::from_millis(2);
            in_flight.retain(|(done, idx)| {
                if *done <= now {
                    eps[*idx].pending -= 1;
                    let rtt = Duration::from_millis(latencies[*idx]);
                    eps[*idx].ewma.observe(rtt, *done);
                    false
                } else {
                    true
                }
            });
            let idx = pick(
                LoadBalancer::P2cEwma,
                &eps,
                now,
                &mut rng,
                &rr,
                Tried::default(),
            )
            .unwrap();
            eps[idx].pending += 1;
            in_flight.push((now + Duration::from_millis(latencies[idx]), idx));
            if i >= 2_000 {
                counts[idx] += 1;
            }
        }
        let share = counts[3] as f64 / counts.iter().sum::<u32>() as f64;
        assert!(
            share < 0.10,
            "slow endpoint share {share:.3}, counts {counts:?}"
        );
        assert!(counts[..3].iter().all(|&c| c > 4000), "{counts:?}");
    }

    proptest! {
        /// An endpoint that is not available is never picked while another one is.
        #[test]
        fn unavailable_never_picked(ups in proptest::collection::vec(any::<bool>(), 1..20),
                                    weights in proptest::collection::vec(1u32..500, 20),
                                    pend in proptest::collection::vec(0u32..50, 20),
                                    seed in any::<u64>(), lb in 0usize..3) {
            let now = Instant::now();
            let eps: Vec<Ep> = ups.iter().enumerate()
                .map(|(i, up)| Ep { pending: pend[i], ..ep(weights[i], *up, now) })
                .collect();
            let mut rng = fastrand::Rng::with_seed(seed);
            let rr = AtomicUsize::new(seed as usize);
            for _ in 0..20 {
                let got = pick(ALL[lb], &eps, now, &mut rng, &rr, Tried::default());
                match got {
                    Some(i) => prop_assert!(eps[i].up),
                    None => prop_assert!(eps.iter().all(|e| !e.up)),
                }
            }
        }

        /// Weighted picks stay within tolerance of the configured weights (equal load for p2c).
        #[test]
        fn weighted_shares(weights in proptest::collection::vec(1u32..300, 2..6), seed in any::<u64>(), lb in 0usize..3) {
            let now = Instant::now();
            let eps: Vec<Ep> = weights.iter().map(|w| ep(*w, true, now)).collect();
            let mut rng = fastrand::Rng::with_seed(seed);
            let rr = AtomicUsize::new(0);
            let total: u32 = weights.iter().sum();
            let n = 20_000;
            let mut counts = vec![0u32; eps.len()];
            for _ in 0..n {
                counts[pick(ALL[lb], &eps, now, &mut rng, &rr, Tried::default()).unwrap()] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let expected = *w as f64 / total as f64;
                let got = counts[i] as f64 / n as f64;
                prop_assert!((got - expected).abs() < 0.03, "endpoint {} weight {} expected {:.3} got {:.3}", i, w, expected, got);
            }
        }
    }
}
