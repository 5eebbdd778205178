//! Upstream connections, pooled per endpoint.
//!
//! Each endpoint in the routing table owns one [`Pool`] (inside its [`EndpointState`](crate::routing::EndpointState)),
//! so the pool lives and dies with the endpoint: when discovery withdraws it, the table drops its state and every
//! idle connection closes; connections carrying a request close when that request is done.
//!
//! - HTTP/1.1 ([`h1`]): idle connections are reused last-in first-out, closed after [`H1_IDLE_TIMEOUT`] (below
//!   the 5 s many servers use, e.g. Node), at most [`H1_MAX_IDLE`] kept idle and [`H1_MAX_CONNECTIONS`] open.
//! - HTTP/2 ([`h2`]): several multiplexed connections per endpoint; a new one is opened when every open one has
//!   as many streams in flight as the peer's `MAX_CONCURRENT_STREAMS` allows. GOAWAY retires a connection
//!   (its streams finish, new requests go elsewhere) and keep-alive pings find dead ones.
//!
//! A [`PoolKey`] names what a connection was made for: the address, the protocol, and the identity the peer
//! proved. A connection is only ever reused for the key it was opened with.
//!
//! Reads nothing global; writes only its own connections and the upstream metrics. It is a leaf of the proxy
//! (it imports nothing else from it), so the routing table can hold pools without an import cycle.

pub mod body;
pub mod connect;
pub mod h1;
pub mod h2;
pub mod wire1;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::telemetry::metrics::UpstreamMetrics;

pub use body::{BodyWatch, ClientBody, ClientBodyError};
pub use connect::ConnectError;

/// Idle HTTP/1.1 connections are closed after this long: below the 5 s keep-alive of Node and many others, so
/// meshd usually closes an idle connection before the upstream does.
pub const H1_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle HTTP/1.1 connections kept per endpoint; more are closed when their request ends.
pub const H1_MAX_IDLE: usize = 64;
/// Open HTTP/1.1 connections per endpoint; further requests wait for one to come free.
pub const H1_MAX_CONNECTIONS: usize = 1024;
/// An HTTP/2 connection with no stream for this long is closed.
pub const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 connections per endpoint. Past this many, requests share the least busy one and wait there for a
/// stream.
pub const H2_MAX_CONNECTIONS: usize = 64;
/// How often idle connections are looked over (see [`Pool::sweep`]).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A request body on its way upstream: streamed from the client, or buffered so it can be sent again.
pub type ReqBody = http_body_util::Either<ClientBody, Full<Bytes>>;

/// The protocol spoken on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wire {
    H1,
    H2,
}

impl Wire {
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::H1 => "http1",
            Wire::H2 => "http2",
        }
    }
}

/// What a pooled connection was opened for. Two endpoints that differ in any part never share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Where the connection goes: the endpoint itself, or the owning node's inbound listener.
    pub addr: SocketAddr,
    pub wire: Wire,
    /// The node identity the peer must prove (mutual TLS toward peer agents); `None` for a local endpoint.
    pub identity: Option<Arc<str>>,
}

/// Why an upstream request failed, as far as retries and breakers care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// No connection could be made: the request certainly never reached the application.
    Connect,
    /// The HTTP/2 server refused the stream before processing it (REFUSED_STREAM, or after its GOAWAY).
    RefusedStream,
    /// A reused connection turned out to be closed by the upstream before any response byte arrived: the
    /// usual keep-alive race, not the endpoint failing.
    Stale,
    /// The client's own request body failed (malformed chunking, an aborted upload, a reset stream).
    ClientBody,
    /// The deadline passed while the client was still sending its request body.
    ClientTimeout,
    /// No response headers in time.
    Timeout,
    /// The connection failed after the request was sent: it may have been processed.
    Other,
}

/// A failed upstream request.
#[derive(Debug)]
pub struct SendError {
    pub kind: FailKind,
    pub detail: String,
    /// The request, when it was never written to a connection (it can be sent elsewhere as it is).
    pub unsent: Option<Box<Request<ReqBody>>>,
    /// The request as it was written to a kept-alive connection that turned out stale, given back by meshd's
    /// own HTTP/1.1 client (see [`Pool::keeps_request`]): a resend needs no copy of its own.
    pub written: Option<Box<Request<ReqBody>>>,
}

impl SendError {
    fn new(kind: FailKind, detail: String) -> Self {
        SendError {
            kind,
            detail,
            unsent: None,
            written: None,
        }
    }

    /// The request, when the connection gave it back (written or not).
    pub fn take_request(&mut self) -> Option<Request<ReqBody>> {
        self.unsent
            .take()
            .or_else(|| self.written.take())
            .map(|r| *r)
    }
}

/// What the pools share: metrics. (Mutual TLS configuration joins it.)
#[derive(Clone)]
pub struct Upstreams {
    pub metrics: UpstreamMetrics,
    /// Mutual TLS toward peer agents (`[tls]`); without it, peers are reached over plaintext HTTP/2.
    pub tls: Option<Arc<crate::tls::peers::PeerTls>>,
}

impl Upstreams {
    pub fn new(metrics: UpstreamMetrics, tls: Option<Arc<crate::tls::peers::PeerTls>>) -> Self {
        Upstreams { metrics, tls }
    }
}

/// How one request should be sent.
#[derive(Clone, Copy, Debug)]
pub struct SendOpts {
    pub connect_timeout: Duration,
    /// Skip idle connections and open a new one (the retry after a stale connection).
    pub fresh: bool,
}

/// A connection (or a stream on one) held by a request until its response body ends; dropping it hands the
/// connection back.
pub enum Lease {
    H1(h1::Lease),
    H2(h2::Lease),
    /// The response body holds the connection itself (meshd's own HTTP/1.1 client, [`wire1`]).
    InBody,
}

/// A response body from an upstream: from hyper's client (HTTP/2, and HTTP/1.1 requests that stream their
/// body), or read by meshd's own HTTP/1.1 client.
#[derive(Debug)]
pub enum UpBody {
    Hyper(Incoming),
    H1(wire1::Body),
}

impl hyper::body::Body for UpBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Hyper(b) => b.is_end_stream(),
            UpBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Hyper(b) => b.size_hint(),
            UpBody::H1(b) => b.size_hint(),
        }
    }
}

/// One endpoint's connections.
pub struct Pool {
    key: PoolKey,
    inner: Inner,
}

enum Inner {
    H1(Arc<h1::Shared>),
    H2(Arc<h2::Shared>),
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("key", &self.key).finish()
    }
}

impl Pool {
    pub fn new(key: PoolKey) -> Pool {
        let inner = match key.wire {
            Wire::H1 => Inner::H1(h1::Shared::new(key.addr)),
            Wire::H2 => Inner::H2(h2::Shared::new(key.addr, key.identity.clone())),
        };
        Pool { key, inner }
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Sends `req` (whose URI and version are already set for this hop) and returns the response head with
    /// the lease that keeps its connection until the body is done.
    // Not an `async fn`: that would be one more layer of future holding (and copying) the request on every
    // send; the protocol's own future is returned as it is.
    pub fn send<'a>(
        &'a self,
        up: &'a Upstreams,
        req: Request<ReqBody>,
        opts: SendOpts,
    ) -> impl Future<Output = Result<(Response<UpBody>, Lease), SendError>> + Send + 'a {
        match &self.inner {
            Inner::H1(p) => Either::Left(p.send(up, req, opts)),
            Inner::H2(p) => Either::Right(p.send(up, req, opts)),
        }
    }

    /// Whether a request with this head and a body of `body_len` bytes held in memory, sent here, comes back
    /// in its [`SendError`] when it fails before a response: when it was never written (a failed connect) or
    /// went out on a stale connection. meshd's own HTTP/1.1 client sends such requests ([`wire1`]); hyper's
    /// clients keep what they wrote.
    pub fn keeps_request(&self, head: &http::request::Parts, body_len: usize) -> bool {
        self.key.wire == Wire::H1 && wire1::sendable(head, body_len as u64)
    }

    /// Sends `req`, and when the connection it went out on turns out stale (the upstream had closed it before
    /// sending a byte of response) sends it once more on a fresh connection: as it came back, when it was never
    /// written, or as `again` rebuilds it from the written request (when the connection gave it back) —
    /// `again` returns `None` when the request is not safe to send twice. The first, stale attempt is nobody's
    /// failure: the caller never sees it.
    // An async block, not an `async fn`: the future of an `async fn` holds each argument twice (as argument
    // and as local), and is copied in full at every move.
    #[allow(clippy::manual_async_fn)]
    pub fn send_or_resend_stale(
        &self,
        up: &Upstreams,
        req: Request<ReqBody>,
        opts: SendOpts,
        again: impl FnOnce(Option<Request<ReqBody>>) -> Option<Request<ReqBody>>,
    ) -> impl Future<Output = Result<(Response<UpBody>, Lease), SendError>> {
        async move {
            let mut err = match self.send(up, req, opts).await {
                Err(e) if e.kind == FailKind::Stale => e,
                other => return other,
            };
            let retry = match err.unsent.take() {
                Some(unsent) => Some(*unsent),
                None => again(err.written.take().map(|r| *r)),
            };
            let Some(retry) = retry else {
                return Err(err);
            };
            up.metrics.stale_retries.inc();
            tracing::debug!(upstream = %self.key.addr, detail = %err.detail, "sending again on a fresh connection");
            let fresh = SendOpts {
                fresh: true,
                ..opts
            };
            Box::pin(self.send(up, retry, fresh)).await
        }
    }

    /// Closes connections idle for too long (and forgets closed ones). Called every [`SWEEP_INTERVAL`].
    pub fn sweep(&self, now: Instant) {
        match &self.inner {
            Inner::H1(p) => p.sweep(now),
            Inner::H2(p) => p.sweep(now),
        }
    }

    /// Open connections (idle or busy), for `/v1/services` and tests.
    pub fn open(&self) -> usize {
        match &self.inner {
            Inner::H1(p) => p.open(),
            Inner::H2(p) => p.open(),
        }
    }
}

/// Sorts a hyper client error into a [`FailKind`]. `reused`: the connection had carried a request before.
fn classify(err: &hyper::Error, reused: bool) -> FailKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut io_stale = false;
    while let Some(e) = cur {
        if e.downcast_ref::<ClientBodyError>().is_some() {
            return FailKind::ClientBody;
        }
        if let Some(h2) = e.downcast_ref::<::h2::Error>() {
            // Refused, or above the last stream id of the peer's graceful GOAWAY: not processed either way.
            let refused = h2.reason() == Some(::h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(::h2::Reason::NO_ERROR));
            if refused {
                return FailKind::RefusedStream;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_stale = matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cur = e.source();
    }
    if reused && (err.is_incomplete_message() || io_stale) {
        FailKind::Stale
    } else {
        FailKind::Other
    }
}

/// The innermost cause of an error, for messages.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Turns a failed `try_send_request` into a [`SendError`], keeping the request when it was never written.
fn send_error(
    e: hyper::client::conn::TrySendError<Request<ReqBody>>,
    addr: SocketAddr,
    reused: bool,
) -> SendError {
    let mut e = e;
    let unsent = e.take_message().map(Box::new);
    let err = e.into_error();
    let kind = if unsent.is_some() {
        // Never written: as harmless as a connection that was closed before we picked it.
        FailKind::Stale
    } else {
        classify(&err, reused)
    };
    let detail = match kind {
        FailKind::ClientBody => format!(
            "the request body from the client failed: {}",
            root_cause(&err)
        ),
        FailKind::Stale => format!(
            "{addr} closed a kept-alive connection: {}",
            root_cause(&err)
        ),
        _ => format!("{addr} failed before responding: {}", root_cause(&err)),
    };
    SendError {
        kind,
        detail,
        unsent,
        written: None,
    }
}

fn connect_failed(e: &ConnectError) -> SendError {
    SendError::new(FailKind::Connect, e.to_string())
}
