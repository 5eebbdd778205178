//! What happens to each finished request besides its metrics: the windowed per-service figures of `/v1/stats`
//! (`meshd stat`), the live stream of `/v1/tap` (`meshd tap`), and the access log.
//!
//! [`Observers::record`] runs once per request, when the response head goes out. The figures cost one mutex
//! per service and direction and no allocation; a [`Summary`] (method, path, endpoint…) is built only while
//! someone taps or when the access log samples the request. Neither the tap nor the access log ever waits: a
//! slow tap client skips summaries, and a full access-log queue drops lines, counted.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::{AccessTarget, LogConfig};
use crate::telemetry::Direction;

/// One-second slots kept per service: `/v1/stats` windows are 1 to 60 s.
pub const WINDOW_SLOTS: usize = 60;
/// Latency histogram: four buckets per doubling from 50 µs, up to about 2 minutes.
const BUCKETS_PER_DOUBLING: f64 = 4.0;
const FIRST_BUCKET_SECS: f64 = 50e-6;
const BUCKETS: usize = 88;
/// Summaries a tap client may fall behind by before it skips some.
const TAP_BUFFER: usize = 1024;
/// Access-log lines queued for the writer thread before new ones are dropped.
const ACCESS_QUEUE: usize = 8192;

/// One finished request, as the tap and the access log show it. No bodies, no query strings, no header values.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub direction: &'static str,
    pub service: String,
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i32>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Attempts after the first.
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// From `Content-Length`, when the request declared one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// From `Content-Length`, when the response declared one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
}

/// What the proxy knows when the response head goes out.
pub struct Finished<'a> {
    pub direction: Direction,
    pub service: &'a str,
    pub status: http::StatusCode,
    pub grpc_status: Option<i32>,
    pub duration: Duration,
    pub mesh_error: Option<&'static str>,
    pub ctx: &'a crate::proxy::ctx::RequestCtx,
    /// The response's head, when there is one from upstream (its `Content-Length` is read only when a span, the
    /// tap or the access log needs it).
    pub response: Option<&'a http::HeaderMap>,
    /// The service's `/v1/stats` window when the caller holds it (else it is looked up by name).
    pub window: Option<&'a StatsWindow>,
}

impl Finished<'_> {
    fn response_bytes(&self) -> Option<u64> {
        self.response.and_then(crate::proxy::content_length)
    }

    /// A request failed in the caller's eyes: a 5xx, meshd's own error, or a gRPC error status.
    fn failed(&self) -> bool {
        self.status.is_server_error()
            || self.mesh_error.is_some()
            || self.grpc_status.is_some_and(|s| s != 0)
    }

    fn summary(&self) -> Summary {
        let ctx = self.ctx;
        Summary {
            time: now_rfc3339(),
            direction: self.direction.as_str(),
            service: self.service.to_string(),
            method: ctx.method.to_string(),
            path: ctx.path().to_string(),
            status: self.status.as_u16(),
            grpc_status: self.grpc_status,
            duration_ms: (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            endpoint: ctx.endpoint,
            retries: ctx.attempt.saturating_sub(1),
            mesh_error: self.mesh_error,
            request_id: ctx
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            trace_id: ctx.trace_id(),
            request_bytes: ctx.request_bytes,
            response_bytes: self.response_bytes(),
        }
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The tap, the figures and the access log of one agent. Cheap to clone.
#[derive(Clone)]
pub struct Observers {
    pub stats: Arc<Stats>,
    /// Server spans are recorded here; the attempt loop records client spans with it.
    pub tracer: crate::proxy::spans::Tracer,
    tap: broadcast::Sender<Arc<Summary>>,
    access: Option<AccessLog>,
}

impl Observers {
    /// Starts the access log's writer thread when `[log] access` is set.
    pub fn new(
        log: &LogConfig,
        dropped: prometheus::IntCounter,
        tracer: crate::proxy::spans::Tracer,
    ) -> std::io::Result<Observers> {
        let access = match &log.access {
            None => None,
            Some(target) => Some(AccessLog::start(target, log.access_sample, dropped)?),
        };
        Ok(Observers {
            stats: Arc::new(Stats::default()),
            tracer,
            tap: broadcast::channel(TAP_BUFFER).0,
            access,
        })
    }

    /// Observers with no access log (tests, benches).
    pub fn disabled() -> Observers {
        Observers {
            stats: Arc::new(Stats::default()),
            tracer: crate::proxy::spans::Tracer::disabled(),
            tap: broadcast::channel(TAP_BUFFER).0,
            access: None,
        }
    }

    pub fn record(&self, f: Finished<'_>) {
        match f.window {
            Some(w) => w.record(f.duration, f.failed()),
            None => self
                .stats
                .record(f.direction, f.service, f.duration, f.failed()),
        }
        if f.ctx.hop.as_ref().is_some_and(|h| h.sampled) {
            self.tracer.server(
                f.ctx.hop.as_deref(),
                f.direction.as_str(),
                f.duration,
                crate::proxy::spans::Outcome {
                    // The request's own name when it is the same (no allocation), else a copy.
                    service: match &f.ctx.service {
                        _ if f.service.is_empty() => None,
                        Some(name) if **name == *f.service => Some(Arc::clone(name)),
                        _ => Some(Arc::from(f.service)),
                    },
                    // A server span's remote side is its caller; the endpoint is on the client spans.
                    endpoint: None,
                    peer_node: f.ctx.peer_identity.as_deref(),
                    method: Some(&f.ctx.method),
                    status: Some(f.status.as_u16()),
                    grpc_status: f.grpc_status,
                    attempt: None,
                    mesh_error: f.mesh_error,
                    breaker: None,
                    fault: f.ctx.fault,
                    request_bytes: f.ctx.request_bytes,
                    response_bytes: f.response_bytes(),
                },
            );
        }
        let tapped = self.tap.receiver_count() > 0;
        let logged = self.access.as_ref().filter(|a| a.sampled());
        if !tapped && logged.is_none() {
            return;
        }
        let summary = Arc::new(f.summary());
        if let Some(log) = logged {
            log.write(&summary);
        }
        if tapped {
            let _ = self.tap.send(summary);
        }
    }

    /// A live stream of summaries (for `/v1/tap`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Summary>> {
        self.tap.subscribe()
    }
}

/// The access log: JSON lines written by their own thread.
#[derive(Clone)]
struct AccessLog {
    lines: SyncSender<String>,
    sample: f64,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    fn start(
        target: &AccessTarget,
        sample: f64,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<AccessLog> {
        let out: Box<dyn std::io::Write + Send> = match target {
            AccessTarget::Stdout => Box::new(std::io::stdout()),
            AccessTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o640)
                        .open(path)
                        .map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("log.access: cannot open {}: {e}", path.display()),
                            )
                        })?,
                )
            }
        };
        let (lines, rx) = std::sync::mpsc::sync_channel::<String>(ACCESS_QUEUE);
        std::thread::Builder::new()
            .name("meshd-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(out);
                // Blocks for the next line; writes what else is queued; flushes when the queue is empty.
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                    }
                    let _ = out.flush();
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            lines,
            sample,
            dropped,
        })
    }

    fn sampled(&self) -> bool {
        self.sample >= 1.0 || fastrand::f64() < self.sample
    }

    fn write(&self, s: &Summary) {
        let mut line = match serde_json::to_string(s) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Per-second request counts, failures and a latency histogram for each (direction, service).
/// One map per direction (outbound, inbound), looked up by `&str` without allocating.
#[derive(Default)]
pub struct Stats {
    services: [RwLock<HashMap<String, Arc<Mutex<Window>>>>; 2],
}

fn side(d: Direction) -> usize {
    usize::from(d == Direction::Inbound)
}

struct Slot {
    /// The Unix second this slot holds; a slot of an older second is stale and reset on use.
    second: u64,
    requests: u64,
    failures: u64,
    latency: [u32; BUCKETS],
}

struct Window {
    slots: Box<[Slot]>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            slots: (0..WINDOW_SLOTS)
                .map(|_| Slot {
                    second: 0,
                    requests: 0,
                    failures: 0,
                    latency: [0; BUCKETS],
                })
                .collect(),
        }
    }
}

fn bucket(d: Duration) -> usize {
    let secs = d.as_secs_f64().max(FIRST_BUCKET_SECS);
    let i = ((secs / FIRST_BUCKET_SECS).log2() * BUCKETS_PER_DOUBLING).floor();
    (i.max(0.0) as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in seconds.
fn bucket_upper(i: usize) -> f64 {
    FIRST_BUCKET_SECS * 2f64.powf((i + 1) as f64 / BUCKETS_PER_DOUBLING)
}

fn unix_second(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Figures of one (direction, service) over a window.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Figures {
    pub direction: &'static str,
    pub service: String,
    pub requests: u64,
    pub rps: f64,
    /// `None` without requests in the window.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One service's window in one direction, held by the caller so that a request records without looking the
/// service up by name (a lock and a hashed lookup per request).
#[derive(Clone)]
pub struct StatsWindow(Arc<Mutex<Window>>);

impl std::fmt::Debug for StatsWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsWindow")
    }
}

impl StatsWindow {
    pub fn record(&self, latency: Duration, failed: bool) {
        self.record_at(latency, failed, SystemTime::now());
    }

    fn record_at(&self, latency: Duration, failed: bool, now: SystemTime) {
        let second = unix_second(now);
        let Ok(mut w) = self.0.lock() else { return };
        let slot = &mut w.slots[(second % WINDOW_SLOTS as u64) as usize];
        if slot.second != second {
            slot.second = second;
            slot.requests = 0;
            slot.failures = 0;
            slot.latency = [0; BUCKETS];
        }
        slot.requests += 1;
        slot.failures += u64::from(failed);
        slot.latency[bucket(latency)] += 1;
    }
}

impl Stats {
    pub fn record(&self, direction: Direction, service: &str, latency: Duration, failed: bool) {
        self.record_at(direction, service, latency, failed, SystemTime::now());
    }

    /// The window of `service` in `direction`, made on first use; it lives as long as these stats.
    pub fn window(&self, direction: Direction, service: &str) -> Option<StatsWindow> {
        let map = &self.services[side(direction)];
        let found = map.read().ok().and_then(|m| m.get(service).cloned());
        match found {
            Some(w) => Some(StatsWindow(w)),
            None => match map.write() {
                Ok(mut m) => Some(StatsWindow(
                    m.entry(service.to_string()).or_default().clone(),
                )),
                Err(_) => None,
            },
        }
    }

    fn record_at(
        &self,
        direction: Direction,
        service: &str,
        latency: Duration,
        failed: bool,
        now: SystemTime,
    ) {
        if let Some(w) = self.window(direction, service) {
            w.record_at(latency, failed, now);
        }
    }

    /// Every (direction, service) seen, over the last `window` (1 to 60 s; the current second counts as one).
    pub fn figures(&self, window: Duration) -> Vec<Figures> {
        self.figures_at(window, SystemTime::now())
    }

    fn figures_at(&self, window: Duration, now: SystemTime) -> Vec<Figures> {
        let secs = window.as_secs().clamp(1, WINDOW_SLOTS as u64);
        let newest = unix_second(now);
        let oldest = newest + 1 - secs;
        let mut out = Vec::new();
        for direction in [Direction::Outbound, Direction::Inbound] {
            let Ok(map) = self.services[side(direction)].read() else {
                continue;
            };
            out.extend(map.iter().filter_map(|(service, w)| {
                let w = w.lock().ok()?;
                let mut requests = 0;
                let mut failures = 0;
                let mut hist = [0u64; BUCKETS];
                for s in w
                    .slots
                    .iter()
                    .filter(|s| (oldest..=newest).contains(&s.second))
                {
                    requests += s.requests;
                    failures += s.failures;
                    for (h, n) in hist.iter_mut().zip(s.latency.iter()) {
                        *h += u64::from(*n);
                    }
                }
                let quantile = |q: f64| -> Option<f64> {
                    if requests == 0 {
                        return None;
                    }
                    let rank = ((requests as f64) * q).ceil().max(1.0) as u64;
                    let mut seen = 0;
                    hist.iter().enumerate().find_map(|(i, n)| {
                        seen += n;
                        (seen >= rank).then(|| (bucket_upper(i) * 1e5).round() / 1e2)
                    })
                };
                Some(Figures {
                    direction: direction.as_str(),
                    service: service.clone(),
                    requests,
                    rps: requests as f64 / secs as f64,
                    success_rate: (requests > 0)
                        .then(|| (requests - failures) as f64 / requests as f64),
                    p50_ms: quantile(0.50),
                    p95_ms: quantile(0.95),
                    p99_ms: quantile(0.99),
                })
            }));
        }
        out.sort_by(|a, b| (a.direction, &a.service).cmp(&(b.direction, &b.service)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_latencies() {
        for ms in [0.01, 0.05, 0.3, 1.0, 7.0, 120.0, 2_000.0, 500_000.0] {
            let d = Duration::from_secs_f64(ms / 1e3);
            let i = bucket(d);
            assert!(
                bucket_upper(i) >= d.as_secs_f64().min(bucket_upper(BUCKETS - 1)),
                "{ms}"
            );
            if i > 0 && d.as_secs_f64() > FIRST_BUCKET_SECS {
                assert!(bucket_upper(i - 1) <= d.as_secs_f64() * 1.0001, "{ms}");
            }
        }
        assert!(bucket_upper(BUCKETS - 1) > 100.0);
    }

    #[test]
    fn figures_cover_the_window_and_forget_older_seconds() {
        let stats = Stats::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // 90 fast successes and 10 slow failures at t0, one request 30 s earlier.
        for i in 0..100 {
            let (lat, failed) = if i < 90 { (2, false) } else { (300, true) };
            stats.record_at(
                Direction::Outbound,
                "users",
                Duration::from_millis(lat),
                failed,
                t0,
            );
        }
        stats.record_at(
            Direction::Outbound,
            "users",
            Duration::from_millis(1),
            false,
            t0 - Duration::from_secs(30),
        );
        let f = &stats.figures_at(Duration::from_secs(10), t0)[0];
        assert_eq!(
            (f.direction, f.service.as_str(), f.requests),
            ("outbound", "users", 100)
        );
        assert_eq!(f.success_rate, Some(0.9));
        assert!((f.rps - 10.0).abs() < 1e-9);
        let (p50, p99) = (f.p50_ms.unwrap(), f.p99_ms.unwrap());
        assert!((2.0..2.5).contains(&p50), "{p50}");
        assert!((300.0..360.0).contains(&p99), "{p99}");
        let wide = &stats.figures_at(Duration::from_secs(60), t0)[0];
        assert_eq!(wide.requests, 101);
        // A minute later the slot of t0 is reused for the new second: nothing old is counted.
        let later = t0 + Duration::from_secs(60);
        stats.record_at(
            Direction::Outbound,
            "users",
            Duration::from_millis(1),
            false,
            later,
        );
        let f = &stats.figures_at(Duration::from_secs(60), later)[0];
        assert_eq!(f.requests, 1);
        let idle = &stats.figures_at(Duration::from_secs(5), later + Duration::from_secs(30))[0];
        assert_eq!(
            (idle.requests, idle.success_rate, idle.p50_ms),
            (0, None, None)
        );
    }
}
