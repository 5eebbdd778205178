//! One jittered exponential backoff, shared by circuit breakers (how long an endpoint stays ejected) and the
//! Docker reconnect loop. Pure: the attempt number and the random draw come in as parameters.

use std::time::Duration;

/// `min × 2^n`, capped at `max`, plus up to `jitter` of itself at random (still capped at `max`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Backoff {
    #[serde(serialize_with = "crate::util::duration::ser")]
    pub min: Duration,
    #[serde(serialize_with = "crate::util::duration::ser")]
    pub max: Duration,
    /// Up to this fraction of the delay is added at random, so that many waiters do not wake together.
    pub jitter: f64,
}

impl Backoff {
    /// The wait before attempt `n + 1` after `n` consecutive failures (0-based), with `r` ∈ [0, 1) choosing
    /// the jitter.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let bo = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.5,
        };
        assert_eq!(bo.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(bo.delay(3, 0.0), Duration::from_secs(8));
        assert_eq!(bo.delay(10, 0.0), Duration::from_secs(60));
        assert_eq!(bo.delay(0, 0.99).as_millis(), 1495);
        assert_eq!(bo.delay(40, 0.99), Duration::from_secs(60));
        assert_eq!(bo.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }
}
