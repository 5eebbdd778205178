//! Accepting client connections and serving them with hyper, hardened the same way on every listener —
//! outbound, inbound and admin.
//!
//! Limits (per listener, from its [`ListenerLimits`]):
//! - at most `max_connections` at once, so one listener can never take the file descriptors another needs: at
//!   the cap, each new connection evicts the one that has been idle longest (no request in flight), and when
//!   every connection is busy, new ones wait in the kernel's queue until one goes idle (and is evicted) or
//!   closes. An upgraded connection (WebSocket) keeps its slot, busy, until the tunnel closes;
//! - a request head must arrive within `header_timeout` of its first byte (HTTP/1), and a connection that
//!   stays silent that long after connecting is closed;
//! - a connection with no request in flight is closed after `idle_timeout` — its own setting, longer than
//!   common client pools keep idle connections, so meshd is not the one closing a connection a client is about
//!   to reuse;
//! - heads fit in [`MAX_HEADER_BYTES`] with at most [`MAX_HEADERS`] fields (hyper answers 431 beyond); HTTP/2
//!   allows [`MAX_CONCURRENT_STREAMS`] streams ([`PEER_MAX_CONCURRENT_STREAMS`] on a mutual-TLS listener, whose
//!   every client is an authenticated agent) and a [`MAX_HEADER_LIST`] header list, with hyper's reset-stream
//!   limits on.
//!
//! hyper's own header timeout is not used: it also runs while a keep-alive connection waits for its next
//! request, which would make the idle timeout and the header timeout one setting.
//!
//! On shutdown the loop stops accepting, asks every connection to finish its in-flight requests (HTTP/2:
//! GOAWAY), and drops what is left at the drain deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::ProxyBody;
use super::framing::{Follower, Framings};
use crate::config::ListenerLimits;
use crate::telemetry::Direction;
use crate::telemetry::metrics::ProxyMetrics;

/// Largest HTTP/1 request head.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in an HTTP/1 request. This is hyper's own default, left implicit on purpose: setting it
/// explicitly (even to the same value) makes hyper fill a 100-entry array on every request.
pub const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams per connection from a client meshd knows nothing about (apps, plaintext peers).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Concurrent HTTP/2 streams per connection from a peer agent that proved its node identity: an agent
/// multiplexes every request its host sends to this one over few connections, so it gets more room.
pub const PEER_MAX_CONCURRENT_STREAMS: u32 = 1000;
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
    /// The peer's address as a header value: what `X-Forwarded-For` gets, made once per connection.
    peer_value: http::HeaderValue,
    /// HTTP/1 framing verdicts, in request order.
    pub framing: Arc<Framings>,
    id: u64,
    activity: Activity,
    /// The peer agent's node name, proved by its certificate (TLS listeners only).
    pub peer_node: std::sync::OnceLock<String>,
    /// Upgraded connections (WebSocket) that came from this one and are still open.
    tunnels: AtomicUsize,
    tunnel_ended: Notify,
}

impl ConnInfo {
    /// The peer's address as a header value (for `X-Forwarded-For`).
    pub fn peer_value(&self) -> &http::HeaderValue {
        &self.peer_value
    }

    /// Keeps the connection's listener slot (and its place in `meshd_open_connections`) while an upgraded
    /// connection that came from it is open.
    /// The connection counts as busy meanwhile: never evicted at the cap.
    pub fn hold(self: &Arc<Self>) -> TunnelHold {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        self.activity.request_started();
        TunnelHold(self.clone())
    }

    async fn tunnels_closed(&self) {
        loop {
            let ended = self.tunnel_ended.notified();
            if self.tunnels.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// See [`ConnInfo::hold`].
pub struct TunnelHold(Arc<ConnInfo>);

impl TunnelHold {
    /// The connection held.
    pub fn conn(&self) -> &ConnInfo {
        &self.0
    }
}

impl Drop for TunnelHold {
    fn drop(&mut self) {
        self.0.activity.request_done();
        self.0.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.0.tunnel_ended.notify_waiters();
    }
}

/// The open connections of one listener, for eviction at the cap.
#[derive(Default)]
struct Live {
    conns: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnInfo>>>,
    cap: Arc<CapWatch>,
}

/// Shared by a listener and its connections: while the listener waits at its cap with every connection busy,
/// a connection that goes idle says so, and can then be evicted.
#[derive(Debug, Default)]
struct CapWatch {
    waiting: AtomicBool,
    idle: Notify,
}

impl Live {
    /// Tells every open connection to drain ([`Signal::SHUTDOWN`]) or to close now ([`Signal::FORCE`]).
    fn raise_all(&self, bit: u8) {
        for c in self.lock().values() {
            c.activity.signal.raise(bit);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<ConnInfo>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the connection idle longest to close; false when every connection has a request in flight.
    fn evict_idlest(&self) -> bool {
        let conns = self.lock();
        let victim = conns
            .values()
            .filter(|c| !c.activity.evicted.load(Ordering::Acquire))
            .filter_map(|c| c.activity.idle_for_ordering().map(|at| (at, c)))
            .min_by_key(|(at, _)| *at);
        match victim {
            Some((_, c)) => {
                c.activity.evicted.store(true, Ordering::Release);
                c.activity.signal.raise(Signal::CHANGED);
                true
            }
            None => false,
        }
    }
}

/// Handles one request; cloned per connection.
pub trait Handler: Clone + Send + Sync + 'static {
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static;
}

/// Which HTTP versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.1 and HTTP/2 with prior knowledge, told apart by the first bytes.
    Auto,
    /// HTTP/2 only (agent to agent).
    H2Only,
}

/// How a listener serves.
#[derive(Clone, Debug)]
pub struct Options {
    pub direction: Direction,
    pub versions: Versions,
    pub limits: ListenerLimits,
    /// How long in-flight requests may finish after shutdown begins.
    pub drain: Duration,
    /// Follow HTTP/1 request framing for the smuggling check ([`super::framing`]).
    pub follow_framing: bool,
    /// Mutual TLS (the inbound listener, with `[tls]`): every connection starts with a handshake, and the
    /// peer's node name is known before any request.
    pub tls: Option<Arc<crate::tls::peers::PeerTls>>,
}

fn builder(versions: Versions, streams: u32) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        // Extended CONNECT (RFC 8441): how peer agents carry upgraded connections.
        .enable_connect_protocol()
        // Pings find peers that vanished without closing (a dead host, a dropped NAT entry).
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    match versions {
        Versions::Auto => b,
        Versions::H2Only => b.http2_only(),
    }
}

/// Serves `listener` with `handler` until `shutdown` fires, then drains for at most `opts.drain`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    opts: Options,
    handler: H,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
) {
    serve_with(
        listener,
        opts,
        metrics,
        shutdown,
        move |info: Arc<ConnInfo>| {
            let handler = handler.clone();
            hyper::service::service_fn(move |req| {
                let fut = handler.clone().handle(req, info.clone());
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            })
        },
    )
    .await
}

/// Serves `listener` with the service `make` builds for each connection (the admin API passes its router).
pub async fn serve_with<M, S, B>(
    listener: TcpListener,
    opts: Options,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
    make: M,
) where
    M: Fn(Arc<ConnInfo>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let streams = match opts.tls {
        Some(_) => PEER_MAX_CONCURRENT_STREAMS,
        None => MAX_CONCURRENT_STREAMS,
    };
    let builder = Arc::new(builder(opts.versions, streams));
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(opts.limits.max_connections));
    let live = Arc::new(Live::default());
    let epoch = Instant::now();
    let mut next_id = 0u64;
    // Fired when the drain deadline passes: connections still open are dropped.
    let force = CancellationToken::new();
    let local = listener.local_addr().ok();
    let direction = opts.direction.as_str();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(direction, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                // At the cap: make room by closing the connection idle longest; with every one busy, wait (and
                // accept nothing more meanwhile: the rest wait in the kernel's queue).
                // When none is idle, the first that goes idle is evicted; one eviction makes the room needed.
                let mut evicted = false;
                let slot = loop {
                    // Created before the scan, so a connection going idle during it is not missed.
                    let idle = live.cap.idle.notified();
                    live.cap.waiting.store(true, Ordering::SeqCst);
                    if !evicted && live.evict_idlest() {
                        evicted = true;
                        metrics.evicted.with_label_values(&[direction]).inc();
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        s = slots.clone().acquire_owned() => break s.ok(),
                        _ = idle, if !evicted => continue,
                    }
                };
                live.cap.waiting.store(false, Ordering::SeqCst);
                match slot {
                    Some(s) => s,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let info = Arc::new(ConnInfo {
            peer,
            peer_value: super::headers::address_value(peer.ip()),
            framing: Arc::default(),
            id: next_id,
            activity: Activity::new(epoch, live.cap.clone()),
            peer_node: std::sync::OnceLock::new(),
            tunnels: AtomicUsize::new(0),
            tunnel_ended: Notify::new(),
        });
        live.lock().insert(info.id, info.clone());
        let svc = Tracking {
            inner: make(info.clone()),
            info: info.clone(),
        };
        let open = OpenConn::new(&metrics, opts.direction);
        let (builder, force, shutdown, live, opts) = (
            builder.clone(),
            force.clone(),
            shutdown.clone(),
            live.clone(),
            opts.clone(),
        );
        connections.spawn(
            async move {
                let _slot = slot;
                let id = info.id;
                serve_connection(stream, info, svc, &builder, opts, open, shutdown, force).await;
                live.lock().remove(&id);
            }
            .instrument(tracing::debug_span!("conn", direction, %peer)),
        );
    }
    drop(listener);
    live.raise_all(Signal::SHUTDOWN);
    connections.close();
    tracing::debug!(
        ?local,
        direction,
        open = connections.len(),
        "listener closed, draining"
    );
    if tokio::time::timeout(opts.drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            direction,
            "drain deadline passed with connections still open; closing them"
        );
        force.cancel();
        live.raise_all(Signal::FORCE);
        connections.wait().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S, B>(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    svc: Tracking<S>,
    builder: &auto::Builder<TokioExecutor>,
    opts: Options,
    open: OpenConn,
    shutdown: CancellationToken,
    force: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = opts.limits;
    let (stream, h2) = match &opts.tls {
        // TLS first, within the header timeout (a peer that stalls in the handshake is cut off and counted).
        // ALPN offers only h2.
        Some(tls) => {
            let done = tokio::select! {
                r = tokio::time::timeout(limits.header_timeout, tls.accept(stream, info.peer)) => r,
                _ = info.activity.wait_evicted() => return,
                _ = shutdown.cancelled() => return,
            };
            match done {
                Ok(Some((tls_stream, node))) => {
                    let _ = info.peer_node.set(node);
                    (
                        crate::tls::stream::Stream::Tls(Box::new(tls_stream.into())),
                        true,
                    )
                }
                Ok(None) => return open.count_error("tls-handshake"),
                Err(_) => {
                    tls.timed_out(opts.direction.as_str(), info.peer);
                    return open.count_error("tls-handshake");
                }
            }
        }
        None => {
            // hyper needs the first bytes to tell HTTP/1 from HTTP/2. Until then a client that sends nothing,
            // or a few bytes of the HTTP/2 preface, is held to the header timeout.
            let h2 = tokio::select! {
                r = tokio::time::timeout(limits.header_timeout, protocol(&stream)) => match r {
                    Ok(Some(h2)) => h2,
                    Ok(None) => return,
                    Err(_) => return open.count_error("header-timeout"),
                },
                _ = info.activity.wait_evicted() => return,
                _ = shutdown.cancelled() => return,
            };
            (crate::tls::stream::Stream::Plain(stream), h2)
        }
    };
    let follower = (opts.follow_framing && !h2).then(|| Follower::new(info.framing.clone()));
    let io = TokioIo::new(ClientIo {
        inner: stream,
        follower,
        info: info.clone(),
        heads: !h2,
    });
    // `serve_connection_with_upgrades` reads the protocol from the first bytes whatever the builder says, so
    // an HTTP/2-only listener uses the plain connection (HTTP/2 upgrades, extended CONNECT, need nothing more).
    match opts.versions {
        Versions::Auto => {
            let conn = builder.serve_connection_with_upgrades(io, svc);
            drive(conn, &info, &limits, &open, &shutdown, &force).await
        }
        Versions::H2Only => {
            let conn = builder.serve_connection(io, svc);
            drive(conn, &info, &limits, &open, &shutdown, &force).await
        }
    }
    // Closing: no longer a candidate for eviction.
    info.activity.evicted.store(true, Ordering::Release);
    // An upgraded connection carries on after hyper is done with it: it keeps the slot until it closes.
    tokio::select! {
        _ = info.tunnels_closed() => {}
        _ = force.cancelled() => {}
    }
    drop(open);
}

/// Runs a connection until it ends, the drain deadline passes, or a timeout closes it.
async fn drive<C>(
    conn: C,
    info: &ConnInfo,
    limits: &ListenerLimits,
    open: &OpenConn,
    shutdown: &CancellationToken,
    force: &CancellationToken,
) where
    C: GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>>,
{
    // Each wake-up polls the connection, then its signal and its timer. What the connection does to its own
    // activity while it is polled (the first bytes of a head, the end of a response: twice per HTTP/1 request)
    // raises the signal without a wake-up, because it is read right after: a wake-up would poll the whole
    // connection again for nothing.
    let mut conn = std::pin::pin!(conn);
    let mut timer = std::pin::pin!(tokio::time::sleep(limits.idle_timeout));
    let activity = &info.activity;
    // Shutdown may have begun while the protocol was being detected (the signal is raised once).
    if force.is_cancelled() {
        return;
    }
    let mut draining = shutdown.is_cancelled();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    // What `timer` is set to. It is moved only to an earlier deadline: a later one is found when the armed one
    // fires. A keep-alive connection's deadlines move later with every request, and moving the timer updates
    // the runtime's timer wheel; this way a busy connection's timer fires about once per header timeout instead
    // of being moved twice per request.
    let mut armed: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        loop {
            let res = {
                let _polling = Polling::enter(&activity.signal);
                conn.as_mut().poll(cx)
            };
            if let Poll::Ready(res) = res {
                open.finish(res);
                return Poll::Ready(());
            }
            // Set when the connection must be polled again now: it was just told to shut down gracefully.
            let mut again = false;
            while let Poll::Ready(bits) = activity.signal.poll_take(cx) {
                if bits & Signal::FORCE != 0 {
                    return Poll::Ready(());
                }
                let evicted =
                    bits & Signal::CHANGED != 0 && activity.evicted.load(Ordering::Acquire);
                if (evicted || bits & Signal::SHUTDOWN != 0) && !draining {
                    draining = true;
                    // Inside the mark too: shutting down may drop a response body, which raises the signal.
                    let _polling = Polling::enter(&activity.signal);
                    conn.as_mut().graceful_shutdown();
                    again = true;
                }
            }
            // The timer is polled at every wake-up while the connection has a deadline (a request in flight has
            // none), and always right after a reset: a timer that fires hands its waker over, and a reset does
            // not register a new one, so a timer reset and not polled again would fire unheard.
            let mut fired = 0;
            loop {
                // Once draining, an idle connection closes by itself: only a request head still needs its
                // deadline (a passed idle deadline would fire again and again).
                let next = activity
                    .deadline(limits)
                    .filter(|(_, why)| !draining || *why == Why::Head);
                let Some((at, _)) = next else { break };
                if armed.is_none_or(|a| at < a) {
                    timer.as_mut().reset(at);
                    armed = Some(at);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                armed = None;
                match activity.deadline(limits) {
                    Some((at, Why::Head)) if Instant::now() >= at => {
                        // A request head that did not arrive in time: drop the connection.
                        open.count_error("header-timeout");
                        return Poll::Ready(());
                    }
                    Some((at, Why::Idle)) if Instant::now() >= at && !draining => {
                        draining = true;
                        let _polling = Polling::enter(&activity.signal);
                        conn.as_mut().graceful_shutdown();
                        again = true;
                        break;
                    }
                    // Not due yet (the deadline moved or went): set the timer again. tokio fires no earlier than
                    // the deadline, so it should not fire again at once; should it, come back on the next turn
                    // rather than spin.
                    _ => {
                        fired += 1;
                        if fired > 1 {
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                }
            }
            if !again {
                return Poll::Pending;
            }
        }
    })
    .await
}

thread_local! {
    /// The signal of the connection this thread is polling right now, if any.
    static POLLING: std::cell::Cell<*const Signal> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Marks a connection's signal as being polled on this thread: raising it then needs no wake-up, because
/// [`drive`] reads it right after the poll. The pointer is only compared, never followed.
struct Polling<'a>(*const Signal, std::marker::PhantomData<&'a Signal>);

impl<'a> Polling<'a> {
    fn enter(signal: &'a Signal) -> Polling<'a> {
        Polling(POLLING.replace(signal), std::marker::PhantomData)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        POLLING.set(self.0);
    }
}

/// Tells HTTP/1 from HTTP/2 by the first bytes, without consuming them: `Some(true)` for the HTTP/2 preface,
/// `None` if the client closed first.
async fn protocol(stream: &TcpStream) -> Option<bool> {
    /// The HTTP/2 client preface (RFC 9113 §3.4).
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if !H2_PREFACE.starts_with(&buf[..n]) => return Some(false),
            Ok(n) if n == H2_PREFACE.len() => return Some(true),
            // A prefix of the preface: peeking again would return at once, so give the rest time to arrive.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Events for a connection's task: set bits, then a wake-up. Cheap to poll, which the task does at every wake-up.
#[derive(Debug, Default)]
struct Signal {
    bits: std::sync::atomic::AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

impl Signal {
    /// A deadline appeared (idle begins, a head starts) or the connection was evicted.
    const CHANGED: u8 = 1;
    /// The listener is shutting down: finish in-flight requests, then close.
    const SHUTDOWN: u8 = 2;
    /// The drain deadline passed: close now.
    const FORCE: u8 = 4;

    /// Sets `bit` and wakes the connection's task, unless that task raised it while polling the connection
    /// (see [`Polling`]). That rests on two rules: only the task that drives the connection waits on the
    /// signal (before [`drive`], `wait_evicted`; then `drive`), and `drive` follows every marked poll with a
    /// look at the bits and the deadlines. A second waiter would miss wake-ups.
    fn raise(&self, bit: u8) {
        self.bits.fetch_or(bit, Ordering::AcqRel);
        // Raised by the connection itself while its task polls it: the task reads the bits after that poll.
        if !std::ptr::eq(POLLING.get(), self) {
            self.waker.wake();
        }
    }

    /// The bits raised since the last call, once there are any.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<u8> {
        if self.bits.load(Ordering::Acquire) == 0 {
            self.waker.register(cx.waker());
            // Raised between the check and the registration: its wake-up may have gone to the old waker.
            if self.bits.load(Ordering::Acquire) == 0 {
                return Poll::Pending;
            }
        }
        Poll::Ready(self.bits.swap(0, Ordering::AcqRel))
    }
}

/// What a connection is doing, for the header and idle timeouts and for eviction.
#[derive(Debug)]
struct Activity {
    /// The listener's start: times below are nanoseconds since it, comparable across connections.
    start: Instant,
    /// Requests whose response is not finished.
    in_flight: AtomicUsize,
    /// When `in_flight` last fell to zero (ns since `start`).
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (ns since `start`, plus one; 0: none yet).
    head_since: AtomicU64,
    /// Wakes the connection task when a deadline appears (idle begins, a head starts) or it is evicted.
    signal: Signal,
    /// Chosen to make room at the listener's connection cap.
    evicted: AtomicBool,
    cap: Arc<CapWatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Head,
    Idle,
}

impl Activity {
    fn new(start: Instant, cap: Arc<CapWatch>) -> Self {
        let a = Activity {
            start,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            signal: Signal::default(),
            evicted: AtomicBool::new(false),
            cap,
        };
        a.idle_since.store(a.now_ns(), Ordering::Release);
        a
    }

    /// When it last did anything, for choosing whom to evict; `None` while a request is in flight.
    fn idle_for_ordering(&self) -> Option<u64> {
        // SeqCst: see `request_done`.
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        let head = self.head_since.load(Ordering::Acquire);
        Some(idle.max(head.saturating_sub(1)))
    }

    async fn wait_evicted(&self) {
        while !self.evicted.load(Ordering::Acquire) {
            std::future::poll_fn(|cx| self.signal.poll_take(cx)).await;
        }
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    /// The next deadline: none while a request is in flight.
    fn deadline(&self, limits: &ListenerLimits) -> Option<(Instant, Why)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.head_since.load(Ordering::Acquire) {
            0 => Some((
                self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout,
                Why::Idle,
            )),
            h => Some((self.at(h - 1) + limits.header_timeout, Why::Head)),
        }
    }

    /// Bytes arrived (HTTP/1): with nothing in flight, they start the next request head.
    fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == 0
        {
            self.head_since.store(self.now_ns() + 1, Ordering::Release);
            self.signal.raise(Signal::CHANGED);
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    fn request_done(&self) {
        // SeqCst, paired with the listener's store of `waiting` before it scans `in_flight`: one of the two
        // sees the other's write.
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_since.store(self.now_ns(), Ordering::Release);
            self.signal.raise(Signal::CHANGED);
            // Only a listener waiting right now hears it (no permit is left for a later wait).
            if self.cap.waiting.load(Ordering::SeqCst) && !self.evicted.load(Ordering::Acquire) {
                self.cap.idle.notify_waiters();
            }
        }
    }
}

/// Counts a request in flight from its head to the end of its response.
struct InFlight(Arc<ConnInfo>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.request_done();
    }
}

/// The per-connection service: marks each request in flight until its response body is done.
struct Tracking<S> {
    inner: S,
    info: Arc<ConnInfo>,
}

impl<S, B> Service<Request<Incoming>> for Tracking<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    type Response = Response<Tracked<B>>;
    type Error = S::Error;
    type Future = Track<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.info.activity.request_started();
        Track {
            inner: self.inner.call(req),
            guard: Some(InFlight(self.info.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Tracking`]: hands the in-flight mark on to the response body.
    pub struct Track<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for Track<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        // Taken once: a future is not polled again after it is ready.
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|body| Tracked {
            inner: body,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is done.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A client connection: what it reads feeds the framing follower and the header timeout.
    struct ClientIo {
        #[pin]
        inner: crate::tls::stream::Stream,
        follower: Option<Follower>,
        info: Arc<ConnInfo>,
        // HTTP/1: bytes between requests start a head.
        heads: bool,
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                if *this.heads {
                    this.info.activity.read();
                }
                if let Some(f) = this.follower.as_mut() {
                    f.feed(new);
                    if !f.is_on() {
                        *this.follower = None;
                    }
                }
            }
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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

    fn finish(&self, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
        if let Err(e) = result {
            let reason = classify(&*e);
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
