//! HTTP/2 connections to one endpoint: each carries up to the peer's `MAX_CONCURRENT_STREAMS` requests, and a
//! new one is opened when every open one is full, so a few long streams never starve the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use super::{
    ConnectError, H2_IDLE_TIMEOUT, H2_MAX_CONNECTIONS, ReqBody, SendError, SendOpts, Upstreams,
    Wire, connect, send_error,
};

/// Streams assumed per connection until the peer's SETTINGS say otherwise (hyper's own assumption).
const DEFAULT_MAX_STREAMS: usize = 100;
/// How often an idle connection is pinged, and how long the answer may take before it is closed as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One HTTP/2 connection.
struct Conn {
    send: SendRequest<ReqBody>,
    /// Streams this pool has open on it.
    in_flight: AtomicUsize,
    /// The peer's current `MAX_CONCURRENT_STREAMS`, kept up to date by the connection task.
    max_streams: Arc<AtomicUsize>,
    /// When `in_flight` last fell to zero, in nanoseconds since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// Streams promised to the requests that waited for this connection to open and have not taken theirs
    /// yet. Until [`CLAIM_WINDOW`] after opening, newcomers leave room for them.
    claims: AtomicUsize,
}

/// How long the streams promised to waiters stay reserved (they take them within microseconds; a waiter that
/// gave up meanwhile must not hold its stream forever).
const CLAIM_WINDOW: Duration = Duration::from_secs(1);

impl Conn {
    fn has_room(&self) -> bool {
        let claimed = if self.epoch.elapsed() < CLAIM_WINDOW {
            self.claims.load(Ordering::Relaxed)
        } else {
            0
        };
        self.in_flight.load(Ordering::Relaxed) + claimed
            < self.max_streams.load(Ordering::Relaxed).max(1)
    }

    /// A waiter takes the stream it was promised.
    fn claim(&self) {
        let _ = self
            .claims
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.epoch + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed));
        Some(now.saturating_duration_since(since))
    }
}

/// A connection being opened: requests that arrive meanwhile wait for it rather than open their own.
struct Connecting {
    id: u64,
    /// Requests that chose to wait for it.
    reserved: usize,
    expected_streams: usize,
    done: watch::Receiver<Option<Result<Arc<Conn>, String>>>,
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    connecting: Vec<Connecting>,
    /// The last `MAX_CONCURRENT_STREAMS` a connection reported: what a new connection is expected to allow.
    streams_hint: usize,
    next_id: u64,
}

/// The pool's state, shared with the leases and (weakly) with the connection tasks.
pub struct Shared {
    addr: SocketAddr,
    /// The node a peer agent's connection must prove (mutual TLS), when there is one.
    identity: Option<Arc<str>>,
    state: Mutex<State>,
}

/// A stream on a connection, held until the response is done.
pub struct Lease {
    conn: Arc<Conn>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let idle = self.conn.epoch.elapsed().as_nanos() as u64;
            self.conn.idle_since.store(idle, Ordering::Relaxed);
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Pick {
    Ready(Arc<Conn>),
    Wait(watch::Receiver<Option<Result<Arc<Conn>, String>>>),
}

impl Shared {
    pub fn new(addr: SocketAddr, identity: Option<Arc<str>>) -> Arc<Shared> {
        Arc::new(Shared {
            addr,
            state: Mutex::new(State {
                // Unknown until the first connection is made (see `pick`).
                streams_hint: 0,
                ..State::default()
            }),
            identity,
        })
    }

    pub fn open(&self) -> usize {
        let st = lock(&self.state);
        st.conns.iter().filter(|c| !c.send.is_closed()).count()
    }

    pub async fn send(
        self: &Arc<Self>,
        up: &Upstreams,
        req: Request<ReqBody>,
        opts: SendOpts,
    ) -> Result<(Response<super::UpBody>, super::Lease), SendError> {
        let conn = match self.pick(up, opts) {
            Pick::Ready(c) => c,
            Pick::Wait(mut rx) => {
                let outcome = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match outcome {
                    Some(Ok(c)) => {
                        c.claim();
                        c
                    }
                    Some(Err(detail)) => {
                        return Err(SendError::new(super::FailKind::Connect, detail));
                    }
                    None => {
                        return Err(SendError::new(
                            super::FailKind::Connect,
                            format!("connecting to {} was abandoned", self.addr),
                        ));
                    }
                }
            }
        };
        // The lease exists from here on, so the stream count is given back whatever happens.
        let lease = Lease { conn };
        let mut send = lease.conn.send.clone();
        match send.try_send_request(req).await {
            Ok(resp) => Ok((resp.map(super::UpBody::Hyper), super::Lease::H2(lease))),
            // A broken HTTP/2 connection is never "stale": requests it refused say so (REFUSED_STREAM), and
            // one that was never written comes back unsent.
            Err(e) => Err(send_error(e, self.addr, false)),
        }
    }

    /// Takes a stream on a connection with room, or joins (or starts) a connection being opened.
    fn pick(self: &Arc<Self>, up: &Upstreams, opts: SendOpts) -> Pick {
        let mut st = lock(&self.state);
        st.conns.retain(|c| !c.send.is_closed());
        if !opts.fresh
            && let Some(c) = st.conns.iter().find(|c| c.has_room())
        {
            c.in_flight.fetch_add(1, Ordering::Relaxed);
            return Pick::Ready(c.clone());
        }
        if let Some(p) = st
            .connecting
            .iter_mut()
            .find(|p| p.reserved < p.expected_streams)
        {
            p.reserved += 1;
            return Pick::Wait(p.done.clone());
        }
        if st.conns.len() + st.connecting.len() >= H2_MAX_CONNECTIONS
            && let Some(c) = st
                .conns
                .iter()
                .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
        {
            // At the cap: share the least busy connection; hyper queues the stream until one frees up.
            c.in_flight.fetch_add(1, Ordering::Relaxed);
            return Pick::Ready(c.clone());
        }
        let (tx, rx) = watch::channel(None);
        st.next_id += 1;
        let id = st.next_id;
        let expected_streams = match st.streams_hint {
            // A peer agent over mutual TLS allows more (meshd's own setting), so a burst before the first
            // SETTINGS arrive needs one connection, not several. Apps and plaintext peers: the usual default.
            0 if self.identity.is_some() && up.tls.is_some() => {
                crate::proxy::server::PEER_MAX_CONCURRENT_STREAMS as usize
            }
            0 => DEFAULT_MAX_STREAMS,
            known => known,
        };
        st.connecting.push(Connecting {
            id,
            reserved: 1,
            expected_streams,
            done: rx.clone(),
        });
        drop(st);
        // The connection is opened by a task of its own, so a waiter that gives up cannot strand the others.
        let pool = self.clone();
        let up = up.clone();
        tokio::spawn(async move {
            let result = pool
                .connect(&up, opts.connect_timeout, expected_streams)
                .await;
            let mut st = lock(&pool.state);
            let reserved = st
                .connecting
                .iter()
                .find(|p| p.id == id)
                .map_or(0, |p| p.reserved);
            st.connecting.retain(|p| p.id != id);
            let outcome = match result {
                Ok(conn) => {
                    conn.claims.store(reserved, Ordering::Relaxed);
                    st.conns.push(conn.clone());
                    Ok(conn)
                }
                Err(e) => Err(e.to_string()),
            };
            drop(st);
            tx.send_replace(Some(outcome));
        });
        Pick::Wait(rx)
    }

    async fn connect(
        self: &Arc<Self>,
        up: &Upstreams,
        timeout: Duration,
        expected_streams: usize,
    ) -> Result<Arc<Conn>, ConnectError> {
        let result = async {
            let stream = connect::peer(
                self.addr,
                timeout,
                up.tls.as_deref(),
                self.identity.as_ref(),
            )
            .await?;
            let mut b = Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                // Until the peer's SETTINGS arrive, assume what the pool expects (hyper would assume 100 and
                // shrink the hint before the peer has said anything).
                .initial_max_send_streams(expected_streams)
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            b.handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: self.addr,
                    source,
                })
        }
        .await;
        let (send, conn) = match result {
            Ok(ok) => ok,
            Err(e) => {
                up.metrics.connect_failed(Wire::H2.as_str(), e.label());
                return Err(e);
            }
        };
        up.metrics.connected(Wire::H2.as_str());
        let max_streams = Arc::new(AtomicUsize::new(expected_streams));
        let gauge = up.metrics.open(Wire::H2.as_str());
        let task = Driven {
            conn: Box::pin(conn),
            max_streams: max_streams.clone(),
            pool: Arc::downgrade(self),
        };
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
            drop(gauge);
        });
        let epoch = Instant::now();
        Ok(Arc::new(Conn {
            send,
            in_flight: AtomicUsize::new(0),
            max_streams,
            idle_since: AtomicU64::new(0),
            epoch,
            claims: AtomicUsize::new(0),
        }))
    }

    pub fn sweep(&self, now: Instant) {
        let mut st = lock(&self.state);
        // Dropping a connection's last `SendRequest` lets hyper close it once its streams are done.
        st.conns
            .retain(|c| !c.send.is_closed() && c.idle_for(now).is_none_or(|d| d < H2_IDLE_TIMEOUT));
    }
}

type H2Conn = hyper::client::conn::http2::Connection<
    TokioIo<crate::tls::stream::Stream>,
    ReqBody,
    TokioExecutor,
>;

/// Drives a connection and keeps `max_streams` equal to what the peer currently allows.
struct Driven {
    conn: Pin<Box<H2Conn>>,
    max_streams: Arc<AtomicUsize>,
    pool: Weak<Shared>,
}

impl Future for Driven {
    type Output = hyper::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = self.conn.as_mut().poll(cx);
        let max = self.conn.current_max_send_streams();
        if self.max_streams.swap(max, Ordering::Relaxed) != max
            && let Some(pool) = self.pool.upgrade()
        {
            lock(&pool.state).streams_hint = max;
        }
        res
    }
}
