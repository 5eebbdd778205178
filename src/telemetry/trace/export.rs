//! The span exporter: one bounded queue and one task per collector (Zipkin v2 JSON and/or OTLP/HTTP protobuf),
//! batching spans and POSTing them over plain HTTP/1.1.
//!
//! The data path only calls [`TraceSink::record`], which never waits on the exporter or on I/O: a push under a
//! short lock per collector, and a full queue drops the span (`meshd_trace_spans_dropped_total{reason="queue-full"}`). A collector that is down,
//! slow or refusing costs dropped spans, counted by reason, and nothing else: each POST has a deadline, and a
//! failed batch is not retried (a retry would only delay newer spans behind older ones).
//!
//! Each POST uses a fresh connection driven inside the exporter task itself — no pool, no spawned connection
//! task — so a timed-out or cancelled export leaves nothing behind. At most one POST per collector per batch
//! (≤ 512 spans, or every second) makes the handshake cost negligible.
//!
//! On shutdown the task stops taking new spans, sends what is queued until a deadline (2 s by default), and
//! counts the rest as `reason="shutdown"`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{Span, otlp, zipkin};

/// Spans waiting per collector before new ones are dropped.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// Spans per POST at most.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// A partial batch is sent after this long.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Connect + request + response deadline of one POST.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final flush may take on shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The path used when a Zipkin URL has none.
pub const ZIPKIN_DEFAULT_PATH: &str = "/api/v2/spans";
/// The path used when an OTLP URL has none.
pub const OTLP_DEFAULT_PATH: &str = "/v1/traces";
/// A collector's response body is read (for OTLP partial success) up to this size.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Every `reason` of `meshd_trace_spans_dropped_total`.
pub const DROP_REASONS: [&str; 5] = [
    "queue-full",
    "unreachable",
    "timeout",
    "rejected",
    "shutdown",
];

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// This agent's node name (OTLP `host.name`).
    pub local_node: Arc<str>,
    /// Zipkin v2 collector, `http://host:port[/path]` (path defaults to [`ZIPKIN_DEFAULT_PATH`]).
    pub zipkin: Option<String>,
    /// OTLP/HTTP collector, `http://host:port[/path]` (path defaults to [`OTLP_DEFAULT_PATH`]).
    pub otlp: Option<String>,
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl ExportConfig {
    /// No collector, default limits.
    pub fn new(local_node: Arc<str>) -> ExportConfig {
        ExportConfig {
            local_node,
            zipkin: None,
            otlp: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("tracing.{key} {url:?}: {reason} (expected http://host:port/path)")]
    InvalidUrl {
        key: &'static str,
        url: String,
        reason: &'static str,
    },
    #[error("tracing: queue_capacity and batch_size must be at least 1")]
    ZeroSize,
}

/// `meshd_trace_spans_dropped_total{reason}` and `meshd_trace_spans_exported_total{exporter}`.
#[derive(Clone)]
pub struct TraceMetrics {
    pub dropped: IntCounterVec,
    pub exported: IntCounterVec,
}

impl TraceMetrics {
    /// Creates both families and registers them in `reg` (an error if they are registered there already).
    pub fn new(reg: &Registry) -> Result<TraceMetrics, prometheus::Error> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "meshd_trace_spans_dropped_total",
                "Sampled spans not delivered to a collector, by reason: queue-full, unreachable, timeout, \
                 rejected, shutdown",
            ),
            &["reason"],
        )?;
        let exported = IntCounterVec::new(
            Opts::new(
                "meshd_trace_spans_exported_total",
                "Spans a collector accepted, by exporter: zipkin, otlp",
            ),
            &["exporter"],
        )?;
        reg.register(Box::new(dropped.clone()))?;
        reg.register(Box::new(exported.clone()))?;
        for reason in DROP_REASONS {
            dropped.with_label_values(&[reason]);
        }
        Ok(TraceMetrics { dropped, exported })
    }
}

/// The data path's handle: cheap to clone, [`record`](TraceSink::record) never blocks.
#[derive(Clone)]
pub struct TraceSink {
    queues: Arc<[Arc<Queue>]>,
    queue_full: Option<IntCounter>,
    closed: Option<IntCounter>,
}

/// One collector's bounded queue.
///
/// A mutex around a vector rather than a channel: a channel wakes the exporter task for every span (a cross-thread
/// wake-up per request), while this wakes it only when a full batch is waiting; partial batches wait for the
/// flush interval, as they did anyway. The lock is held for a push or a swap, never across an await. Spans are
/// held by value: no allocation per span (a second collector gets a copy).
struct Queue {
    inner: Mutex<QueueInner>,
    /// A full batch is waiting.
    ready: Notify,
    capacity: usize,
    batch_size: usize,
}

struct QueueInner {
    spans: Vec<Span>,
    closed: bool,
}

enum Pushed {
    Queued,
    Full,
    Closed,
}

impl Queue {
    fn new(capacity: usize, batch_size: usize) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                spans: Vec::with_capacity(batch_size.min(capacity)),
                closed: false,
            }),
            ready: Notify::new(),
            capacity,
            batch_size,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        // A panic while holding the lock cannot leave the vector inconsistent (push and swap only).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, span: Span) -> Pushed {
        let len = {
            let mut inner = self.lock();
            if inner.closed {
                return Pushed::Closed;
            }
            if inner.spans.len() >= self.capacity {
                return Pushed::Full;
            }
            inner.spans.push(span);
            inner.spans.len()
        };
        if len == self.batch_size.min(self.capacity) {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Up to one batch, oldest first; a partial one only if `partial`.
    fn take(&self, partial: bool) -> Vec<Span> {
        // Room for the next batch, allocated before the lock is taken: pushes on the data path never
        // reallocate (and copy spans), and never wait for this allocation.
        let fresh = Vec::with_capacity(self.batch_size.min(self.capacity));
        let mut inner = self.lock();
        let len = inner.spans.len();
        if len > self.batch_size {
            inner.spans.drain(..self.batch_size).collect()
        } else if len >= self.batch_size.min(self.capacity) || (partial && len > 0) {
            std::mem::replace(&mut inner.spans, fresh)
        } else {
            Vec::new()
        }
    }

    /// Takes no more spans from now on.
    fn close(&self) {
        self.lock().closed = true;
    }
}

impl TraceSink {
    /// A sink that records nothing (tracing off, or no collector configured).
    pub fn disabled() -> TraceSink {
        TraceSink {
            queues: Arc::from(Vec::new()),
            queue_full: None,
            closed: None,
        }
    }

    /// Whether any collector is configured; when not, the proxy need not build spans at all.
    pub fn is_enabled(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Queues `span` for every collector without waiting; a full queue drops it (counted).
    pub fn record(&self, span: Span) {
        let Some((last, others)) = self.queues.split_last() else {
            return;
        };
        for queue in others {
            self.count(queue.push(span.clone()));
        }
        self.count(last.push(span));
    }

    /// A sink with one queue and no exporter, and a way to read what was recorded (for unit tests).
    #[cfg(test)]
    pub(crate) fn capturing() -> (TraceSink, impl Fn() -> Vec<Span>) {
        let queue = Arc::new(Queue::new(DEFAULT_QUEUE_CAPACITY, DEFAULT_BATCH_SIZE));
        let sink = TraceSink {
            queues: Arc::from(vec![Arc::clone(&queue)]),
            queue_full: None,
            closed: None,
        };
        (sink, move || queue.take(true))
    }

    fn count(&self, pushed: Pushed) {
        let counter = match pushed {
            Pushed::Queued => return,
            Pushed::Full => &self.queue_full,
            Pushed::Closed => &self.closed,
        };
        if let Some(counter) = counter {
            counter.inc();
        }
    }
}

/// Spawns the exporter tasks.
pub struct Exporter;

impl Exporter {
    /// Validates the URLs and spawns one task per configured collector (call inside a Tokio runtime). The
    /// handle ends when every task has finished its final flush after `shutdown` is cancelled.
    pub fn spawn(
        config: ExportConfig,
        metrics: TraceMetrics,
        shutdown: CancellationToken,
    ) -> Result<(TraceSink, JoinHandle<()>), ExportError> {
        if config.queue_capacity == 0 || config.batch_size == 0 {
            return Err(ExportError::ZeroSize);
        }
        let mut collectors = Vec::new();
        if let Some(url) = &config.zipkin {
            collectors.push(Collector {
                kind: Kind::Zipkin,
                target: Target::parse("zipkin", url, ZIPKIN_DEFAULT_PATH)?,
            });
        }
        if let Some(url) = &config.otlp {
            collectors.push(Collector {
                kind: Kind::Otlp,
                target: Target::parse("otlp", url, OTLP_DEFAULT_PATH)?,
            });
        }
        if collectors.is_empty() {
            return Ok((TraceSink::disabled(), tokio::spawn(async {})));
        }
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for collector in collectors {
            let queue = Arc::new(Queue::new(config.queue_capacity, config.batch_size));
            queues.push(Arc::clone(&queue));
            metrics
                .exported
                .with_label_values(&[collector.kind.as_str()]);
            let task = Task {
                collector,
                queue,
                metrics: metrics.clone(),
                config: config.clone(),
            };
            let span = info_span!("trace_export", exporter = task.collector.kind.as_str());
            tasks.push(tokio::spawn(task.run(shutdown.clone()).instrument(span)));
        }
        let handle = tokio::spawn(async move {
            for task in tasks {
                if let Err(e) = task.await {
                    warn!(error = %e, "trace exporter task failed");
                }
            }
        });
        let sink = TraceSink {
            queues: Arc::from(queues),
            queue_full: Some(metrics.dropped.with_label_values(&["queue-full"])),
            closed: Some(metrics.dropped.with_label_values(&["shutdown"])),
        };
        Ok((sink, handle))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zipkin,
    Otlp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Zipkin => "zipkin",
            Kind::Otlp => "otlp",
        }
    }
}

struct Collector {
    kind: Kind,
    target: Target,
}

/// A parsed `http://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    /// The `Host` header.
    authority: String,
    /// For connecting: without IPv6 brackets.
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(key: &'static str, url: &str, default_path: &str) -> Result<Target, ExportError> {
        let invalid = |reason| ExportError::InvalidUrl {
            key,
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(invalid("only http:// is supported")),
            None => return Err(invalid("no scheme")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => default_path.to_string(),
            Some(p) => p.to_string(),
        };
        Ok(Target {
            authority: authority.as_str().to_string(),
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            path,
        })
    }
}

/// Why a batch did not reach the collector: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Unreachable,
    Timeout,
    Rejected,
}

impl Failure {
    fn reason(self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::Timeout => "timeout",
            Failure::Rejected => "rejected",
        }
    }
}

struct Task {
    collector: Collector,
    queue: Arc<Queue>,
    metrics: TraceMetrics,
    config: ExportConfig,
}

impl Task {
    async fn run(self, shutdown: CancellationToken) {
        let batch_size = self.config.batch_size;
        let mut ticker = tokio::time::interval(self.config.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut deadline: Option<Instant> = None;
        'wait: while deadline.is_none() {
            // A full batch is sent as soon as it is there; what is left of one waits for the next tick.
            let ticked = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.queue.ready.notified() => false,
                _ = ticker.tick() => true,
            };
            loop {
                let spans = self.queue.take(ticked);
                if spans.is_empty() {
                    break;
                }
                let partial = spans.len() < batch_size;
                let body = self.encode(&spans);
                let send = self.post(body);
                tokio::pin!(send);
                let result = tokio::select! {
                    biased;
                    r = &mut send => Some(r),
                    _ = shutdown.cancelled() => {
                        // Let the batch in flight finish, but only until the shutdown deadline.
                        let until = Instant::now() + self.config.shutdown_timeout;
                        deadline = Some(until);
                        tokio::time::timeout_at(until, &mut send).await.ok()
                    }
                };
                self.account(spans.len(), result);
                if deadline.is_some() {
                    continue 'wait;
                }
                if partial {
                    break;
                }
            }
            ticker.reset();
        }
        let until = deadline.unwrap_or_else(|| Instant::now() + self.config.shutdown_timeout);
        self.final_flush(until).await;
    }

    /// Stops taking spans, then sends what is queued until `until`; what is left is dropped as `shutdown`.
    async fn final_flush(&self, until: Instant) {
        self.queue.close();
        loop {
            let spans = self.queue.take(true);
            if spans.is_empty() {
                break;
            }
            if Instant::now() >= until {
                self.drop_spans("shutdown", spans.len());
                continue;
            }
            let body = self.encode(&spans);
            let result = tokio::time::timeout_at(until, self.post(body)).await.ok();
            self.account(spans.len(), result);
        }
        debug!("trace exporter stopped");
    }

    fn encode(&self, spans: &[Span]) -> Vec<u8> {
        match self.collector.kind {
            Kind::Zipkin => zipkin::encode(spans),
            Kind::Otlp => otlp::encode(&self.config.local_node, spans),
        }
    }

    /// `None`: cut short by the shutdown deadline.
    fn account(&self, n: usize, result: Option<Result<u64, Failure>>) {
        let n_u64 = u64::try_from(n).unwrap_or(u64::MAX);
        match result {
            Some(Ok(rejected)) => {
                let rejected = rejected.min(n_u64);
                self.metrics
                    .exported
                    .with_label_values(&[self.collector.kind.as_str()])
                    .inc_by(n_u64 - rejected);
                if rejected > 0 {
                    self.metrics
                        .dropped
                        .with_label_values(&["rejected"])
                        .inc_by(rejected);
                }
            }
            Some(Err(failure)) => {
                debug!(reason = failure.reason(), spans = n, "trace export failed");
                self.drop_spans(failure.reason(), n);
            }
            None => self.drop_spans("shutdown", n),
        }
    }

    fn drop_spans(&self, reason: &str, n: usize) {
        self.metrics
            .dropped
            .with_label_values(&[reason])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// One POST within the request timeout. `Ok(n)`: accepted, `n` spans of it rejected (OTLP partial success).
    async fn post(&self, body: Vec<u8>) -> Result<u64, Failure> {
        match tokio::time::timeout(self.config.request_timeout, self.post_inner(body)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn post_inner(&self, body: Vec<u8>) -> Result<u64, Failure> {
        let target = &self.collector.target;
        let content_type = match self.collector.kind {
            Kind::Zipkin => zipkin::CONTENT_TYPE,
            Kind::Otlp => otlp::CONTENT_TYPE,
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(target.path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::CONTENT_TYPE, content_type)
            .header(
                header::USER_AGENT,
                concat!("meshd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure::Rejected)?;

        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|_| Failure::Unreachable)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Unreachable)?;
        tokio::pin!(conn);
        // The connection is driven here, beside the request, until the response body is read.
        let response = tokio::select! {
            biased;
            r = sender.send_request(request) => r.map_err(|_| Failure::Unreachable)?,
            _ = &mut conn => return Err(Failure::Unreachable),
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY).collect();
        let drive = async {
            let _ = (&mut conn).await;
            std::future::pending::<()>().await
        };
        let body = tokio::select! {
            biased;
            b = body => b.ok().map(|b| b.to_bytes()),
            _ = drive => None,
        };
        if !status.is_success() {
            debug!(%status, "collector refused spans");
            return Err(Failure::Rejected);
        }
        Ok(match (self.collector.kind, body) {
            (Kind::Otlp, Some(body)) if status == StatusCode::OK => {
                ExportTraceServiceResponse::decode(body)
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map(|p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .unwrap_or(0)
            }
            _ => 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("zipkin", "http://127.0.0.1:9411", ZIPKIN_DEFAULT_PATH).unwrap();
        assert_eq!(
            t,
            Target {
                authority: "127.0.0.1:9411".into(),
                host: "127.0.0.1".into(),
                port: 9411,
                path: "/api/v2/spans".into(),
            }
        );
        let t = Target::parse(
            "otlp",
            "http://[::1]:4318/custom/v1/traces",
            OTLP_DEFAULT_PATH,
        )
        .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 4318, "/custom/v1/traces")
        );
        let t = Target::parse("otlp", "http://collector/", OTLP_DEFAULT_PATH).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("collector", 80, "/v1/traces")
        );
        for bad in [
            "https://c:4318",
            "c:4318",
            "/v1/traces",
            "http://",
            "http://u:p@c:1/",
            "not a url",
        ] {
            let err = Target::parse("otlp", bad, OTLP_DEFAULT_PATH).unwrap_err();
            assert!(err.to_string().starts_with("tracing.otlp "), "{bad}: {err}");
        }
    }

    #[test]
    fn metrics_register_once_with_every_reason_at_zero() {
        let reg = Registry::new();
        let m = TraceMetrics::new(&reg).unwrap();
        assert_eq!(m.dropped.with_label_values(&["queue-full"]).get(), 0);
        let families = reg.gather();
        let dropped = families
            .iter()
            .find(|f| f.name() == "meshd_trace_spans_dropped_total")
            .unwrap();
        assert_eq!(dropped.get_metric().len(), DROP_REASONS.len());
        assert!(TraceMetrics::new(&reg).is_err());
    }

    #[tokio::test]
    async fn disabled_sink_and_full_queue() {
        let sink = TraceSink::disabled();
        assert!(!sink.is_enabled());
        sink.record(crate::telemetry::trace::tests::sample_span());

        let reg = Registry::new();
        let metrics = TraceMetrics::new(&reg).unwrap();
        let mut config = ExportConfig::new(Arc::from("node-a"));
        // Nothing listens on port 9 of 127.0.0.1 in the test environment; the point is the queue.
        config.zipkin = Some("http://127.0.0.1:9".into());
        config.queue_capacity = 2;
        config.flush_interval = Duration::from_secs(3600);
        let token = CancellationToken::new();
        let (sink, handle) = Exporter::spawn(config, metrics.clone(), token.clone()).unwrap();
        assert!(sink.is_enabled());
        for _ in 0..10 {
            sink.record(crate::telemetry::trace::tests::sample_span());
        }
        assert!(metrics.dropped.with_label_values(&["queue-full"]).get() >= 8);
        token.cancel();
        handle.await.unwrap();
        let after = metrics.dropped.with_label_values(&["shutdown"]).get();
        sink.record(crate::telemetry::trace::tests::sample_span());
        assert_eq!(
            metrics.dropped.with_label_values(&["shutdown"]).get(),
            after + 1
        );
    }

    #[tokio::test]
    async fn no_collector_is_a_disabled_sink() {
        let reg = Registry::new();
        let metrics = TraceMetrics::new(&reg).unwrap();
        let (sink, handle) = Exporter::spawn(
            ExportConfig::new(Arc::from("n")),
            metrics,
            CancellationToken::new(),
        )
        .unwrap();
        assert!(!sink.is_enabled());
        handle.await.unwrap();
        let mut config = ExportConfig::new(Arc::from("n"));
        config.zipkin = Some("https://x:1".into());
        let reg = Registry::new();
        assert!(matches!(
            Exporter::spawn(
                config,
                TraceMetrics::new(&reg).unwrap(),
                CancellationToken::new()
            ),
            Err(ExportError::InvalidUrl { key: "zipkin", .. })
        ));
    }
}
