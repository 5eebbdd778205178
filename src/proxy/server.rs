//! Accepting client connections and serving them with hyper, hardened the same way for both listeners.
//!
//! Limits: a request head must arrive within [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEADER_BYTES`] with at
//! most [`MAX_HEADERS`] fields (hyper answers 431 beyond); HTTP/2 allows [`MAX_CONCURRENT_STREAMS`] streams and
//! a [`MAX_HEADER_LIST`] header list, with hyper's reset-stream limits on. On shutdown the loop stops accepting,
//! asks every connection to finish its in-flight requests, and gives up after the drain deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ProxyBody;
use super::framing::{Guarded, Verdicts};
use crate::telemetry::Direction;
use crate::telemetry::metrics::ProxyMetrics;

/// Time allowed for a whole request head to arrive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/1 request head.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in an HTTP/1 request. This is hyper's own default, left implicit on purpose: setting it
/// explicitly (even to the same value) makes hyper fill a 100-entry array on every request.
pub const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest HTTP/2 header list.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before they are answered (CVE-2023-44487, "Rapid Reset").
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams meshd may reset because of client errors before it closes the connection.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// What a request handler knows about the connection it arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// HTTP/1 framing verdicts, in request order.
    pub verdicts: Arc<Verdicts>,
    /// Requests received on this connection so far.
    pub requests: std::sync::atomic::AtomicU64,
}

/// Handles one request; cloned per connection.
pub trait Handler: Clone + Send + Sync + 'static {
    fn handle(
        self,
        req: http::Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = http::Response<ProxyBody>> + Send + 'static;
}

/// Which HTTP versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.1 and HTTP/2 with prior knowledge, told apart by the first bytes.
    Auto,
    /// HTTP/2 only (agent to agent).
    H2Only,
}

fn builder(versions: Versions) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        // Pings find peers that vanished without closing (a dead host, a dropped NAT entry).
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    match versions {
        Versions::Auto => b,
        Versions::H2Only => b.http2_only(),
    }
}

/// Serves `listener` until `shutdown` fires, then drains for at most `drain`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    direction: Direction,
    versions: Versions,
    handler: H,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let builder = Arc::new(builder(versions));
    let graceful = GracefulShutdown::new();
    // Fired when the drain deadline passes: connections still open are dropped.
    let force = CancellationToken::new();
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let verdicts = Arc::new(Verdicts::default());
        let info = Arc::new(ConnInfo {
            peer,
            verdicts: verdicts.clone(),
            requests: std::sync::atomic::AtomicU64::new(0),
        });
        let handler = handler.clone();
        let conn_info = info.clone();
        let svc = service_fn(move |req| {
            info.requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let fut = handler.clone().handle(req, info.clone());
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        let open = OpenConn::new(&metrics, direction);
        let (builder, watcher, force, shutdown) = (
            builder.clone(),
            graceful.watcher(),
            force.clone(),
            shutdown.clone(),
        );
        tokio::spawn(
            async move {
                // hyper's header timeout starts once it knows the protocol. Until then a client that sends
                // nothing, or a few bytes of the HTTP/2 preface, would hold the connection forever.
                tokio::select! {
                    r = tokio::time::timeout(HEADER_READ_TIMEOUT, protocol_known(&stream)) => match r {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(_) => return open.count_error("header-timeout"),
                    },
                    _ = shutdown.cancelled() => return,
                }
                let io = match versions {
                    Versions::Auto => TokioIo::new(Guarded::new(stream, verdicts)),
                    // No HTTP/1 framing to follow on an h2-only listener.
                    Versions::H2Only => TokioIo::new(Guarded::disabled(stream)),
                };
                let conn = watcher.watch(builder.serve_connection(io, svc));
                tokio::select! {
                    res = conn => open.finish(res, conn_info.requests.load(std::sync::atomic::Ordering::Relaxed)),
                    _ = force.cancelled() => {}
                }
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
    drop(listener);
    tracing::debug!(
        ?local,
        direction = direction.as_str(),
        open = graceful.count(),
        "listener closed, draining"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            direction = direction.as_str(),
            "drain deadline passed with connections still open; closing them"
        );
        force.cancel();
    }
}

/// The HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, without consuming anything, until the first bytes tell HTTP/1 from HTTP/2: false if the client
/// closed first.
async fn protocol_known(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            // Not the preface (HTTP/1), or all of it (HTTP/2).
            Ok(n) if !H2_PREFACE.starts_with(&buf[..n]) || n == H2_PREFACE.len() => return true,
            // A prefix of the preface: peeking again would return at once, so give the rest time to arrive.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// One open client connection: counted in the gauge while it lives.
struct OpenConn {
    gauge: prometheus::IntGauge,
    metrics: ProxyMetrics,
    direction: Direction,
}

impl OpenConn {
    fn new(metrics: &ProxyMetrics, direction: Direction) -> Self {
        let gauge = metrics
            .open_connections
            .with_label_values(&[direction.as_str()]);
        gauge.inc();
        OpenConn {
            gauge,
            metrics: metrics.clone(),
            direction,
        }
    }

    fn finish(self, result: Result<(), Box<dyn std::error::Error + Send + Sync>>, served: u64) {
        if let Err(e) = result {
            let reason = classify(&*e);
            if reason == "header-timeout" && served > 0 {
                // An idle keep-alive connection closed after the header timeout: normal, not an error.
                return;
            }
            tracing::debug!(error = %e, reason, "client connection error");
            self.count_error(reason);
        }
    }

    fn count_error(&self, reason: &str) {
        self.metrics
            .connection_errors
            .with_label_values(&[self.direction.as_str(), reason])
            .inc();
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A bounded label for why a client connection failed.
fn classify(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return "header-timeout";
            }
            if h.is_parse_too_large() {
                return "too-large";
            }
            if h.is_parse() || h.is_parse_status() {
                return "malformed";
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return "closed";
            }
            if h.is_body_write_aborted() {
                return "aborted";
            }
        }
        if err.downcast_ref::<h2::Error>().is_some() {
            return "h2";
        }
        if err.downcast_ref::<std::io::Error>().is_some() {
            return "io";
        }
        cur = err.source();
    }
    // hyper's "user" errors: a response body (the upstream's) failed while it was being sent.
    if e.downcast_ref::<hyper::Error>()
        .is_some_and(|h| h.is_user())
    {
        return "body";
    }
    "other"
}
