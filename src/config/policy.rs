//! The traffic-policy part of the configuration: `[defaults]` and `[services.<name>]`.
//!
//! A service's effective policy is built key by key: its own value, else the one in `[defaults]`, else the
//! built-in default (the `DEFAULT_*` constants below). `fault`, `rate_limit`, `split` and `routes` exist only
//! per service.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{Problems, Seg};
use crate::policy::balance::LoadBalancer;
use crate::policy::breaker::{BreakerConfig, BreakerKind};
use crate::policy::budget::BudgetConfig;
use crate::policy::fault::{AbortFault, DelayFault, FaultConfig};
use crate::policy::ratelimit::RateLimitConfig;
use crate::policy::route::{Route, SplitTarget};
use crate::util::Backoff;
use crate::util::duration::{self, parse as parse_duration};

/// Time allowed to open a connection to an endpoint; past it the attempt is a connect failure (retried on
/// another endpoint, counted by the breaker).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The most of a service's endpoints that breakers may eject at once, in percent. At least one endpoint may
/// always be ejected (unless this is 0); past the limit a failing endpoint stays in rotation, and when every
/// endpoint is ejected requests still go to the one that failed longest ago.
pub const DEFAULT_MAX_EJECTION_PERCENT: f64 = 50.0;
/// Default balancer.
pub const DEFAULT_LOAD_BALANCER: LoadBalancer = LoadBalancer::P2cEwma;
/// Share of requests that may be retried, on top of the reserve.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retries per second always allowed, however little traffic there is.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: f64 = 10.0;
/// Attempts per request, the first one included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// What is retried by default: only failures where the request certainly never reached the application.
pub const DEFAULT_RETRY_ON: &[&str] = &["connect-failure", "refused-stream"];
/// Consecutive failures that open a breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
pub const DEFAULT_BACKOFF_JITTER: f64 = 0.5;
/// Success-rate breaker defaults.
pub const DEFAULT_SR_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_SR_MIN_REQUESTS: u32 = 20;
pub const DEFAULT_SR_THRESHOLD: f64 = 0.8;
/// What counts as an endpoint failure for its breaker.
pub const DEFAULT_FAILURE_ON: &[&str] = &[
    "connect-failure",
    "timeout",
    "5xx",
    "grpc:UNAVAILABLE",
    "grpc:INTERNAL",
    "grpc:UNKNOWN",
];

// ---------------------------------------------------------------------------------------------------------
// Raw (as written).
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawPolicy {
    pub timeout: Option<String>,
    pub per_try_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub load_balancer: Option<String>,
    pub max_ejection_percent: Option<f64>,
    pub retry: Option<RawRetry>,
    pub circuit_breaker: Option<RawBreaker>,
    pub fault: Option<RawFault>,
    pub rate_limit: Option<RawRateLimit>,
    pub split: Option<Vec<RawSplit>>,
    pub routes: Option<Vec<RawRoute>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRetry {
    pub budget_ratio: Option<f64>,
    pub min_per_second: Option<f64>,
    pub max_attempts: Option<i64>,
    pub on: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBreaker {
    pub kind: Option<String>,
    pub failures: Option<i64>,
    pub window: Option<String>,
    pub min_requests: Option<i64>,
    pub threshold: Option<f64>,
    pub backoff: Option<RawBackoff>,
    pub failure_on: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBackoff {
    pub min: Option<String>,
    pub max: Option<String>,
    pub jitter: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawFault {
    pub delay: Option<RawDelay>,
    pub abort: Option<RawAbort>,
    pub allow_header_override: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDelay {
    pub percent: f64,
    pub duration: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAbort {
    pub percent: f64,
    pub status: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    pub burst: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawSplit {
    pub service: String,
    pub weight: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRoute {
    #[serde(rename = "match")]
    pub match_: RawMatch,
    pub service: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawMatch {
    pub header: BTreeMap<String, String>,
    pub path_prefix: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Effective.
// ---------------------------------------------------------------------------------------------------------

/// A service's effective policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePolicy {
    #[serde(serialize_with = "duration::ser")]
    pub timeout: Duration,
    #[serde(serialize_with = "duration::ser_opt")]
    pub per_try_timeout: Option<Duration>,
    #[serde(serialize_with = "duration::ser")]
    pub connect_timeout: Duration,
    pub load_balancer: LoadBalancer,
    pub max_ejection_percent: f64,
    pub retry: RetryPolicy,
    pub circuit_breaker: BreakerPolicy,
    pub fault: Option<FaultConfig>,
    pub rate_limit: Option<RateLimitView>,
    pub split: Vec<SplitTarget>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub budget_ratio: f64,
    pub min_per_second: f64,
    pub max_attempts: u32,
    pub on: Conditions,
}

impl RetryPolicy {
    pub fn budget(&self) -> BudgetConfig {
        BudgetConfig {
            ratio: self.budget_ratio,
            min_per_second: self.min_per_second,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerPolicy {
    #[serde(flatten)]
    pub config: BreakerConfig,
    pub failure_on: Conditions,
}

/// A rate limit, serialisable.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RateLimitView {
    pub requests_per_second: f64,
    pub burst: f64,
}

impl RateLimitView {
    pub fn config(&self) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
        }
    }
}

/// A set of outcome conditions (`connect-failure`, `refused-stream`, `timeout`, `5xx`, `503`, `grpc:CODE`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub timeout: bool,
    pub any_5xx: bool,
    pub statuses: Vec<u16>,
    pub grpc: Vec<u8>,
}

impl Conditions {
    pub fn status(&self, s: StatusCode) -> bool {
        (self.any_5xx && s.is_server_error()) || self.statuses.contains(&s.as_u16())
    }
    pub fn grpc_status(&self, code: u8) -> bool {
        self.grpc.contains(&code)
    }
    /// Whether any response (a status, a gRPC status) is a reason to retry.
    pub fn any_response(&self) -> bool {
        self.any_5xx || !self.statuses.is_empty() || !self.grpc.is_empty()
    }
}

impl Serialize for Conditions {
    /// As the config spells them.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out: Vec<String> = Vec::new();
        for (on, name) in [
            (self.connect_failure, "connect-failure"),
            (self.refused_stream, "refused-stream"),
            (self.timeout, "timeout"),
            (self.any_5xx, "5xx"),
        ] {
            if on {
                out.push(name.to_string());
            }
        }
        out.extend(self.statuses.iter().map(|s| s.to_string()));
        for code in &self.grpc {
            if let Some((name, _)) = GRPC_CODES.iter().find(|(_, n)| n == code) {
                out.push(format!("grpc:{name}"));
            }
        }
        out.serialize(s)
    }
}

const GRPC_CODES: &[(&str, u8)] = &[
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

fn parse_conditions(items: &[String], grpc_allowed: bool) -> Result<Conditions, String> {
    let mut c = Conditions::default();
    for item in items {
        match item.as_str() {
            "connect-failure" => c.connect_failure = true,
            "refused-stream" => c.refused_stream = true,
            "timeout" => c.timeout = true,
            "5xx" => c.any_5xx = true,
            other => {
                if let Some(code) = other.strip_prefix("grpc:") {
                    let found = GRPC_CODES
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(code));
                    match found {
                        Some((_, n)) if grpc_allowed => c.grpc.push(*n),
                        Some(_) => {
                            return Err(format!("{other:?}: gRPC codes are not retry conditions"));
                        }
                        None => {
                            return Err(format!(
                                "{other:?}: unknown gRPC code (e.g. \"grpc:UNAVAILABLE\")"
                            ));
                        }
                    }
                } else {
                    match other.parse::<u16>() {
                        Ok(s) if (100..=599).contains(&s) => c.statuses.push(s),
                        _ => {
                            return Err(format!(
                                "{other:?}: use \"connect-failure\", \"refused-stream\", \"timeout\", \"5xx\", a status like \"503\"{}",
                                if grpc_allowed {
                                    " or \"grpc:UNAVAILABLE\""
                                } else {
                                    ""
                                }
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(c)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------------------
// Validation and resolution.
// ---------------------------------------------------------------------------------------------------------

fn at(base: &[Seg], rest: &[&str]) -> Vec<Seg> {
    let mut v = base.to_vec();
    v.extend(rest.iter().map(|s| Seg::Key(s.to_string())));
    v
}

fn at_i(base: &[Seg], rest: &[&str], i: usize) -> Vec<Seg> {
    let mut v = at(base, rest);
    v.push(Seg::Index(i));
    v
}

fn dur(pr: &mut Problems, path: Vec<Seg>, s: &Option<String>) {
    let _ = super::positive_duration(pr, path, s);
}

fn d(s: &Option<String>) -> Option<Duration> {
    s.as_deref().and_then(|s| parse_duration(s).ok())
}

/// Checks one `[defaults]` or `[services.<name>]` block, pushing every problem under `base`.
pub(super) fn validate(pr: &mut Problems, base: &[Seg], raw: &RawPolicy, is_defaults: bool) {
    dur(pr, at(base, &["timeout"]), &raw.timeout);
    dur(pr, at(base, &["per_try_timeout"]), &raw.per_try_timeout);
    dur(pr, at(base, &["connect_timeout"]), &raw.connect_timeout);
    if let Some(x) = raw.max_ejection_percent
        && !(0.0..=100.0).contains(&x)
    {
        pr.push(
            at(base, &["max_ejection_percent"]),
            format!("{x}: between 0 (never eject) and 100"),
        );
    }
    if let Some(lb) = &raw.load_balancer
        && LoadBalancer::parse(lb).is_none()
    {
        pr.push(
            at(base, &["load_balancer"]),
            format!("{lb:?}: use \"p2c-ewma\", \"round-robin\" or \"least-request\""),
        );
    }
    if let Some(r) = &raw.retry {
        if let Some(x) = r.budget_ratio
            && !(0.0..=1.0).contains(&x)
        {
            pr.push(
                at(base, &["retry", "budget_ratio"]),
                format!("{x}: between 0 and 1"),
            );
        }
        if let Some(x) = r.min_per_second
            && !(0.0..=10_000.0).contains(&x)
        {
            pr.push(
                at(base, &["retry", "min_per_second"]),
                format!("{x}: between 0 and 10000"),
            );
        }
        if let Some(x) = r.max_attempts
            && !(1..=10).contains(&x)
        {
            pr.push(
                at(base, &["retry", "max_attempts"]),
                format!("{x}: between 1 (no retries) and 10"),
            );
        }
        if let Some(on) = &r.on
            && let Err(why) = parse_conditions(on, false)
        {
            pr.push(at(base, &["retry", "on"]), why);
        }
    }
    if let Some(b) = &raw.circuit_breaker {
        let kind = b.kind.as_deref().unwrap_or("consecutive-failures");
        if !matches!(kind, "consecutive-failures" | "success-rate") {
            pr.push(
                at(base, &["circuit_breaker", "kind"]),
                format!("{kind:?}: use \"consecutive-failures\" or \"success-rate\""),
            );
        }
        if let Some(x) = b.failures
            && !(1..=10_000).contains(&x)
        {
            pr.push(
                at(base, &["circuit_breaker", "failures"]),
                format!("{x}: at least 1"),
            );
        }
        dur(pr, at(base, &["circuit_breaker", "window"]), &b.window);
        if let Some(x) = b.min_requests
            && !(1..=1_000_000).contains(&x)
        {
            pr.push(
                at(base, &["circuit_breaker", "min_requests"]),
                format!("{x}: at least 1"),
            );
        }
        if let Some(x) = b.threshold
            && !(x > 0.0 && x <= 1.0)
        {
            pr.push(
                at(base, &["circuit_breaker", "threshold"]),
                format!("{x}: a success rate above 0 and at most 1"),
            );
        }
        if let Some(bo) = &b.backoff {
            dur(
                pr,
                at(base, &["circuit_breaker", "backoff", "min"]),
                &bo.min,
            );
            dur(
                pr,
                at(base, &["circuit_breaker", "backoff", "max"]),
                &bo.max,
            );
            if let (Some(min), Some(max)) = (d(&bo.min), d(&bo.max))
                && max < min
            {
                pr.push(
                    at(base, &["circuit_breaker", "backoff", "max"]),
                    "must not be less than min",
                );
            }
            if let Some(j) = bo.jitter
                && !(0.0..=1.0).contains(&j)
            {
                pr.push(
                    at(base, &["circuit_breaker", "backoff", "jitter"]),
                    format!("{j}: between 0 and 1"),
                );
            }
        }
        if let Some(on) = &b.failure_on
            && let Err(why) = parse_conditions(on, true)
        {
            pr.push(at(base, &["circuit_breaker", "failure_on"]), why);
        }
    }
    let only_per_service = [
        ("fault", raw.fault.is_some()),
        ("rate_limit", raw.rate_limit.is_some()),
        ("split", raw.split.is_some()),
        ("routes", raw.routes.is_some()),
    ];
    if is_defaults {
        for (key, present) in only_per_service {
            if present {
                pr.push(
                    at(base, &[key]),
                    "set this per service, under [services.<name>]",
                );
            }
        }
        return;
    }
    if let Some(f) = &raw.fault {
        if let Some(dl) = &f.delay {
            if !(0.0..=100.0).contains(&dl.percent) {
                pr.push(
                    at(base, &["fault", "delay", "percent"]),
                    format!("{}: between 0 and 100", dl.percent),
                );
            }
            dur(
                pr,
                at(base, &["fault", "delay", "duration"]),
                &Some(dl.duration.clone()),
            );
        }
        if let Some(ab) = &f.abort {
            if !(0.0..=100.0).contains(&ab.percent) {
                pr.push(
                    at(base, &["fault", "abort", "percent"]),
                    format!("{}: between 0 and 100", ab.percent),
                );
            }
            if !(400..=599).contains(&ab.status) {
                pr.push(
                    at(base, &["fault", "abort", "status"]),
                    format!("{}: an error status, 400 to 599", ab.status),
                );
            }
        }
    }
    if let Some(rl) = &raw.rate_limit {
        if rl.requests_per_second.is_nan() || rl.requests_per_second <= 0.0 {
            pr.push(
                at(base, &["rate_limit", "requests_per_second"]),
                "must be greater than zero",
            );
        }
        if let Some(b) = rl.burst
            && (b.is_nan() || b < 1.0)
        {
            pr.push(at(base, &["rate_limit", "burst"]), "at least 1");
        }
    }
    if let Some(split) = &raw.split {
        let mut total = 0;
        for (i, s) in split.iter().enumerate() {
            if let Err(why) = super::check_service_name(&s.service) {
                pr.push(
                    at(&at_i(base, &["split"], i), &["service"]),
                    format!("{:?}: {why}", s.service),
                );
            }
            if !(0..=1_000_000).contains(&s.weight) {
                pr.push(
                    at(&at_i(base, &["split"], i), &["weight"]),
                    format!("{}: 0 or more", s.weight),
                );
            } else {
                total += s.weight;
            }
        }
        if total == 0 {
            pr.push(at(base, &["split"]), "the weights add up to 0");
        }
    }
    if let Some(routes) = &raw.routes {
        for (i, r) in routes.iter().enumerate() {
            let here = at_i(base, &["routes"], i);
            if let Err(why) = super::check_service_name(&r.service) {
                pr.push(at(&here, &["service"]), format!("{:?}: {why}", r.service));
            }
            if r.match_.header.is_empty() && r.match_.path_prefix.is_none() {
                pr.push(
                    at(&here, &["match"]),
                    "needs a header or a path_prefix to match",
                );
            }
            if let Some(p) = &r.match_.path_prefix
                && !p.starts_with('/')
            {
                pr.push(
                    at(&here, &["match", "path_prefix"]),
                    format!("{p:?}: starts with '/'"),
                );
            }
            for (name, value) in &r.match_.header {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(value).is_err()
                {
                    pr.push(
                        at(&here, &["match", "header", name]),
                        "not a valid header name and value",
                    );
                }
            }
        }
    }
}

/// Checks on a merged policy (values that may come from two tables).
pub(super) fn validate_resolved(pr: &mut Problems, base: &[Seg], pol: &ServicePolicy) {
    let b = &pol.circuit_breaker.config.backoff;
    if b.max < b.min {
        pr.push(
            at(base, &["circuit_breaker", "backoff"]),
            format!(
                "max {} is less than min {} (one of them may come from [defaults])",
                duration::format(b.max),
                duration::format(b.min)
            ),
        );
    }
}

/// The effective policy of a service (`svc` = None: the defaults themselves). Call only after `validate`
/// found nothing wrong; unparsable values fall back to the built-in defaults.
pub(super) fn resolve(
    def: &RawPolicy,
    svc: Option<&RawPolicy>,
    default_timeout: Duration,
) -> ServicePolicy {
    let pick = |f: fn(&RawPolicy) -> Option<&String>| svc.and_then(f).or_else(|| f(def)).cloned();
    let timeout = d(&pick(|p| p.timeout.as_ref())).unwrap_or(default_timeout);
    let per_try_timeout = d(&pick(|p| p.per_try_timeout.as_ref()));
    let connect_timeout =
        d(&pick(|p| p.connect_timeout.as_ref())).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let max_ejection_percent = svc
        .and_then(|s| s.max_ejection_percent)
        .or(def.max_ejection_percent)
        .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT);
    let load_balancer = pick(|p| p.load_balancer.as_ref())
        .and_then(|s| LoadBalancer::parse(&s))
        .unwrap_or(DEFAULT_LOAD_BALANCER);

    let r_svc = svc.and_then(|s| s.retry.as_ref());
    let r_def = def.retry.as_ref();
    macro_rules! retry_field {
        ($f:ident) => {
            r_svc
                .and_then(|r| r.$f.clone())
                .or_else(|| r_def.and_then(|r| r.$f.clone()))
        };
    }
    let retry = RetryPolicy {
        budget_ratio: retry_field!(budget_ratio).unwrap_or(DEFAULT_BUDGET_RATIO),
        min_per_second: retry_field!(min_per_second).unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND),
        max_attempts: retry_field!(max_attempts)
            .map(|n| n as u32)
            .unwrap_or(DEFAULT_MAX_ATTEMPTS),
        on: parse_conditions(
            &retry_field!(on).unwrap_or_else(|| strings(DEFAULT_RETRY_ON)),
            false,
        )
        .unwrap_or_default(),
    };

    let b_svc = svc.and_then(|s| s.circuit_breaker.as_ref());
    let b_def = def.circuit_breaker.as_ref();
    macro_rules! breaker_field {
        ($f:ident) => {
            b_svc
                .and_then(|r| r.$f.clone())
                .or_else(|| b_def.and_then(|r| r.$f.clone()))
        };
    }
    let bo_svc = b_svc.and_then(|b| b.backoff.as_ref());
    let bo_def = b_def.and_then(|b| b.backoff.as_ref());
    macro_rules! backoff_field {
        ($f:ident) => {
            bo_svc
                .and_then(|r| r.$f.clone())
                .or_else(|| bo_def.and_then(|r| r.$f.clone()))
        };
    }
    let backoff = Backoff {
        min: d(&backoff_field!(min)).unwrap_or(DEFAULT_BACKOFF_MIN),
        max: d(&backoff_field!(max)).unwrap_or(DEFAULT_BACKOFF_MAX),
        jitter: backoff_field!(jitter).unwrap_or(DEFAULT_BACKOFF_JITTER),
    };
    let kind_name = breaker_field!(kind).unwrap_or_else(|| "consecutive-failures".to_string());
    let kind = if kind_name == "success-rate" {
        BreakerKind::SuccessRate {
            window: d(&breaker_field!(window)).unwrap_or(DEFAULT_SR_WINDOW),
            min_requests: breaker_field!(min_requests)
                .map(|n| n as u32)
                .unwrap_or(DEFAULT_SR_MIN_REQUESTS),
            threshold: breaker_field!(threshold).unwrap_or(DEFAULT_SR_THRESHOLD),
        }
    } else {
        BreakerKind::ConsecutiveFailures {
            failures: breaker_field!(failures)
                .map(|n| n as u32)
                .unwrap_or(DEFAULT_BREAKER_FAILURES),
        }
    };
    let circuit_breaker = BreakerPolicy {
        config: BreakerConfig { kind, backoff },
        failure_on: parse_conditions(
            &breaker_field!(failure_on).unwrap_or_else(|| strings(DEFAULT_FAILURE_ON)),
            true,
        )
        .unwrap_or_default(),
    };

    let fault = svc.and_then(|s| s.fault.as_ref()).map(|f| FaultConfig {
        delay: f.delay.as_ref().map(|dl| DelayFault {
            percent: dl.percent,
            duration: parse_duration(&dl.duration).unwrap_or_default(),
        }),
        abort: f.abort.as_ref().map(|ab| AbortFault {
            percent: ab.percent,
            status: StatusCode::from_u16(ab.status as u16)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        }),
        allow_header_override: f.allow_header_override,
    });
    let rate_limit = svc
        .and_then(|s| s.rate_limit.as_ref())
        .map(|rl| RateLimitView {
            requests_per_second: rl.requests_per_second,
            burst: rl.burst.unwrap_or(rl.requests_per_second.max(1.0)),
        });
    let split = svc
        .and_then(|s| s.split.as_ref())
        .map(|v| {
            v.iter()
                .map(|s| SplitTarget {
                    service: s.service.to_ascii_lowercase(),
                    weight: s.weight.max(0) as u32,
                })
                .collect()
        })
        .unwrap_or_default();
    let routes = svc
        .and_then(|s| s.routes.as_ref())
        .map(|v| {
            v.iter()
                .map(|r| Route {
                    headers: r
                        .match_
                        .header
                        .iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect(),
                    path_prefix: r.match_.path_prefix.clone(),
                    service: r.service.to_ascii_lowercase(),
                })
                .collect()
        })
        .unwrap_or_default();
    ServicePolicy {
        timeout,
        per_try_timeout,
        connect_timeout,
        load_balancer,
        max_ejection_percent,
        retry,
        circuit_breaker,
        fault,
        rate_limit,
        split,
        routes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn builtin_defaults() {
        let cfg = Config::from_toml("").unwrap();
        let p = cfg.policy_for("anything");
        assert_eq!(p.load_balancer, LoadBalancer::P2cEwma);
        assert_eq!(p.connect_timeout, Duration::from_secs(1));
        assert_eq!(p.max_ejection_percent, 50.0);
        assert_eq!(p.retry.max_attempts, 3);
        assert!(p.retry.on.connect_failure && p.retry.on.refused_stream && !p.retry.on.timeout);
        assert!(p.retry.on.statuses.is_empty());
        assert_eq!(
            p.circuit_breaker.config.kind,
            BreakerKind::ConsecutiveFailures { failures: 5 }
        );
        assert_eq!(
            p.circuit_breaker.config.backoff.max,
            Duration::from_secs(60)
        );
        assert!(p.circuit_breaker.failure_on.any_5xx);
        assert_eq!(p.circuit_breaker.failure_on.grpc, vec![14, 13, 2]);
        assert!(p.fault.is_none() && p.rate_limit.is_none() && p.split.is_empty());
    }

    #[test]
    fn services_override_defaults_key_by_key() {
        let cfg = Config::from_toml(
            r#"
[defaults]
timeout = "2s"
connect_timeout = "300ms"
max_ejection_percent = 30
load_balancer = "least-request"
retry = { budget_ratio = 0.1, max_attempts = 2 }
circuit_breaker = { failures = 3, backoff = { min = "500ms" } }

[services.web]
max_ejection_percent = 100
retry = { max_attempts = 4, on = ["connect-failure", "503", "timeout"] }
circuit_breaker = { kind = "success-rate", window = "10s", min_requests = 5, threshold = 0.9 }
fault = { delay = { percent = 5, duration = "100ms" }, abort = { percent = 1.5, status = 503 }, allow_header_override = true }
rate_limit = { requests_per_second = 50, burst = 100 }
split = [{ service = "web-v1", weight = 90 }, { service = "web-v2", weight = 10 }]
routes = [{ match = { header = { "X-Canary" = "1" } }, service = "web-v2" }, { match = { path_prefix = "/api/" }, service = "api" }]
"#,
        )
        .unwrap();
        let web = cfg.policy_for("web");
        assert_eq!(web.timeout, Duration::from_secs(2), "from [defaults]");
        assert_eq!(web.load_balancer, LoadBalancer::LeastRequest);
        assert_eq!(
            web.connect_timeout,
            Duration::from_millis(300),
            "from [defaults]"
        );
        assert_eq!(web.max_ejection_percent, 100.0);
        assert_eq!(cfg.policy_for("other").max_ejection_percent, 30.0);
        assert_eq!(web.retry.max_attempts, 4);
        assert_eq!(web.retry.budget_ratio, 0.1, "kept from [defaults]");
        assert_eq!(web.retry.min_per_second, DEFAULT_MIN_RETRIES_PER_SECOND);
        assert_eq!(web.retry.on.statuses, vec![503]);
        assert!(web.retry.on.timeout);
        assert_eq!(
            web.circuit_breaker.config.kind,
            BreakerKind::SuccessRate {
                window: Duration::from_secs(10),
                min_requests: 5,
                threshold: 0.9
            }
        );
        assert_eq!(
            web.circuit_breaker.config.backoff.min,
            Duration::from_millis(500)
        );
        assert_eq!(
            web.fault.as_ref().unwrap().abort.as_ref().unwrap().percent,
            1.5
        );
        assert_eq!(web.rate_limit.unwrap().burst, 100.0);
        assert_eq!(web.split[1].service, "web-v2");
        assert_eq!(
            web.routes[0].headers,
            vec![("x-canary".to_string(), "1".to_string())]
        );
        let other = cfg.policy_for("other");
        assert_eq!(other.retry.max_attempts, 2);
        assert_eq!(
            other.circuit_breaker.config.kind,
            BreakerKind::ConsecutiveFailures { failures: 3 }
        );
    }

    #[test]
    fn every_policy_problem_named() {
        let e = Config::from_toml(
            r#"
[defaults]
load_balancer = "random"
connect_timeout = "0s"
max_ejection_percent = 120
retry = { max_attempts = 0, on = ["sometimes"] }
fault = { abort = { percent = 10, status = 503 } }

[services.web]
circuit_breaker = { kind = "magic", threshold = 1.5, backoff = { min = "2s", max = "1s", jitter = 2 } }
rate_limit = { requests_per_second = 0 }
split = [{ service = "a", weight = 0 }]
routes = [{ match = {}, service = "b" }, { match = { path_prefix = "api" }, service = "10.0.0.1" }]
fault = { delay = { percent = 120, duration = "soon" }, abort = { percent = 1, status = 200 } }
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "defaults.load_balancer",
            "defaults.connect_timeout",
            "defaults.max_ejection_percent",
            "defaults.retry.max_attempts",
            "defaults.retry.on",
            "defaults.fault",
            "services.web.circuit_breaker.kind",
            "services.web.circuit_breaker.threshold",
            "services.web.circuit_breaker.backoff.max",
            "services.web.circuit_breaker.backoff.jitter",
            "services.web.rate_limit.requests_per_second",
            "services.web.split",
            "services.web.routes[0].match",
            "services.web.routes[1].match.path_prefix",
            "services.web.routes[1].service",
            "services.web.fault.delay.percent",
            "services.web.fault.delay.duration",
            "services.web.fault.abort.status",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:#?}");
        }
        assert!(e.0.iter().all(|p| p.line.is_some()), "{e}");
    }
}
