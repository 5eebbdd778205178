//! Fault injection: delays and aborts for a configured share of requests, or, when allowed, for the single
//! request that asks for one with `mesh-fault-delay` / `mesh-fault-abort`.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

pub const MESH_FAULT_DELAY: http::HeaderName = http::HeaderName::from_static("mesh-fault-delay");
pub const MESH_FAULT_ABORT: http::HeaderName = http::HeaderName::from_static("mesh-fault-abort");

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FaultConfig {
    pub delay: Option<DelayFault>,
    pub abort: Option<AbortFault>,
    pub allow_header_override: bool,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DelayFault {
    /// 0 to 100.
    pub percent: f64,
    #[serde(serialize_with = "crate::util::duration::ser")]
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AbortFault {
    pub percent: f64,
    #[serde(serialize_with = "ser_status")]
    pub status: StatusCode,
}

fn ser_status<S: serde::Serializer>(s: &StatusCode, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

/// Decides the faults for one request. `r_delay` and `r_abort` ∈ [0, 1) are independent random draws.
pub fn decide(cfg: &FaultConfig, headers: &HeaderMap, r_delay: f64, r_abort: f64) -> Decision {
    let mut d = Decision::default();
    if let Some(delay) = &cfg.delay
        && r_delay * 100.0 < delay.percent
    {
        d.delay = Some(delay.duration);
    }
    if let Some(abort) = &cfg.abort
        && r_abort * 100.0 < abort.percent
    {
        d.abort = Some(abort.status);
    }
    if cfg.allow_header_override {
        if let Some(delay) = headers
            .get(MESH_FAULT_DELAY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::util::duration::parse(v).ok())
        {
            d.delay = Some(delay.min(Duration::from_secs(60)));
        }
        if let Some(status) = headers
            .get(MESH_FAULT_ABORT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u16>().ok())
            .filter(|s| (400..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            d.abort = Some(status);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allow: bool) -> FaultConfig {
        FaultConfig {
            delay: Some(DelayFault {
                percent: 10.0,
                duration: Duration::from_millis(50),
            }),
            abort: Some(AbortFault {
                percent: 25.0,
                status: StatusCode::SERVICE_UNAVAILABLE,
            }),
            allow_header_override: allow,
        }
    }

    #[test]
    fn percentages() {
        let h = HeaderMap::new();
        assert_eq!(
            decide(&cfg(false), &h, 0.099, 0.5).delay,
            Some(Duration::from_millis(50))
        );
        assert_eq!(decide(&cfg(false), &h, 0.10, 0.5).delay, None);
        assert_eq!(
            decide(&cfg(false), &h, 0.5, 0.249).abort,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(decide(&cfg(false), &h, 0.5, 0.25).abort, None);
    }

    #[test]
    fn header_override_only_when_allowed() {
        let mut h = HeaderMap::new();
        h.insert(MESH_FAULT_DELAY, "200ms".parse().unwrap());
        h.insert(MESH_FAULT_ABORT, "504".parse().unwrap());
        let d = decide(&cfg(true), &h, 0.99, 0.99);
        assert_eq!(d.delay, Some(Duration::from_millis(200)));
        assert_eq!(d.abort, Some(StatusCode::GATEWAY_TIMEOUT));
        assert_eq!(decide(&cfg(false), &h, 0.99, 0.99), Decision::default());
        h.insert(MESH_FAULT_ABORT, "200".parse().unwrap());
        assert_eq!(
            decide(&cfg(true), &h, 0.99, 0.99).abort,
            None,
            "only error statuses"
        );
    }
}
