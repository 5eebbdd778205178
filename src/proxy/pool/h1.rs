//! HTTP/1.1 connections to one endpoint: reused last-in first-out, one request at a time each.
//!
//! A request whose body is in memory (no body, or one buffered for retries) is sent by meshd's own client
//! ([`wire1`](super::wire1)) in the request's task. A request that streams its body goes through hyper's client,
//! which runs the connection as a task of its own; an idle connection of meshd's own turns into a hyper
//! connection for it (and stays one).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use super::wire1;
use super::{
    ConnectError, H1_IDLE_TIMEOUT, H1_MAX_CONNECTIONS, H1_MAX_IDLE, ReqBody, SendError, SendOpts,
    UpBody, Upstreams, Wire, connect, connect_failed, send_error,
};
use crate::telemetry::metrics::OpenGauge;

/// How long a released connection may take to be ready for its next request before it is dropped.
const READY_WAIT: Duration = Duration::from_secs(1);

/// A connection of either client.
enum Conn {
    Own(wire1::Conn),
    Hyper(SendRequest<ReqBody>),
}

impl Conn {
    fn usable(&self) -> bool {
        match self {
            Conn::Own(c) => c.usable(),
            Conn::Hyper(s) => s.is_ready(),
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct State {
    /// Most recently used last.
    idle: Vec<Idle>,
    /// Connections open or being opened, idle or busy.
    open: usize,
    /// Requests waiting for a connection because `open` reached the cap.
    waiting: usize,
}

/// A request waiting for a connection at the cap; counted in `waiting` while it lives.
struct Waiter<'a>(&'a Shared);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.waiting = st.waiting.saturating_sub(1);
    }
}

/// A connection being opened: one of `open` until its [`Slot`] exists (or given back here).
struct Opening<'a>(Option<&'a Shared>);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.closed_one();
        }
    }
}

/// An open connection's place in its pool (and in `meshd_upstream_connections`): given back when it drops.
/// Never drop one while holding the pool's lock.
pub struct Slot {
    pool: Weak<Shared>,
    _gauge: OpenGauge,
}

impl Slot {
    /// The pool, while it exists (its endpoint may have left the table).
    pub fn pool(&self) -> Option<Arc<Shared>> {
        self.pool.upgrade()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.closed_one();
        }
    }
}

/// The pool's state, shared with the leases, the response bodies and (weakly) the connections.
pub struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    freed: Notify,
}

/// A hyper connection carrying one request.
pub struct Lease {
    send: Option<SendRequest<ReqBody>>,
    pool: Arc<Shared>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            self.pool.release(send);
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends an upgrade request (`Connection: Upgrade`) on a connection of its own, never pooled: after a 101 it
/// carries another protocol. The response's upgrade (`hyper::upgrade::on`) yields that connection.
pub async fn send_upgrade(
    up: &Upstreams,
    addr: SocketAddr,
    req: Request<ReqBody>,
    connect_timeout: Duration,
) -> Result<Response<UpBody>, SendError> {
    let result = async {
        let stream = connect::tcp(addr, connect_timeout).await?;
        Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })
    }
    .await;
    let (mut send, conn) = match result {
        Ok(ok) => ok,
        Err(e) => {
            up.metrics.connect_failed(Wire::H1.as_str(), e.label());
            return Err(connect_failed(&e));
        }
    };
    up.metrics.connected(Wire::H1.as_str());
    let gauge = up.metrics.open(Wire::H1.as_str());
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
        }
        drop(gauge);
    });
    send.try_send_request(req)
        .await
        .map(|resp| resp.map(UpBody::Hyper))
        .map_err(|e| send_error(e, addr, false))
}

impl Shared {
    pub fn new(addr: SocketAddr) -> Arc<Shared> {
        Arc::new(Shared {
            addr,
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    pub fn open(&self) -> usize {
        lock(&self.state).open
    }

    // An async block, not an `async fn`: the future of an `async fn` holds each argument twice (as argument
    // and as local), and is copied in full at every move.
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: &Arc<Self>,
        up: &Upstreams,
        mut req: Request<ReqBody>,
        opts: SendOpts,
    ) -> impl Future<Output = Result<(Response<UpBody>, super::Lease), SendError>> {
        async move {
            let own = wire1::eligible(&mut req);
            let (conn, reused) = match self.checkout(up, opts, own.is_some()).await {
                Ok(ok) => ok,
                Err(mut e) => {
                    // Never written: the caller may send it elsewhere (see `Pool::keeps_request`).
                    if let Some(body) = own {
                        *req.body_mut() = Either::Right(Full::new(body));
                        e.unsent = Some(Box::new(req));
                    }
                    return Err(e);
                }
            };
            let send = match (conn, own) {
                (Conn::Own(conn), Some(body)) => {
                    let (head, _) = req.into_parts();
                    let resp = wire1::send(conn, head, body, reused, self.addr).await?;
                    return Ok((resp.map(UpBody::H1), super::Lease::InBody));
                }
                (Conn::Own(conn), None) => match self.hand_to_hyper(up, conn).await {
                    Ok(send) => send,
                    Err(e) => return Err(connect_failed(&e)),
                },
                (Conn::Hyper(send), own) => {
                    // Not picked for a request of meshd's own client; should it happen, hyper sends it.
                    if let Some(body) = own {
                        *req.body_mut() = Either::Right(Full::new(body));
                    }
                    send
                }
            };
            let mut send = send;
            match send.try_send_request(req).await {
                Ok(resp) => Ok((
                    resp.map(UpBody::Hyper),
                    super::Lease::H1(Lease {
                        send: Some(send),
                        pool: self.clone(),
                    }),
                )),
                // The connection is unusable after a failure: dropping `send` closes it.
                Err(e) => Err(send_error(e, self.addr, reused)),
            }
        }
    }

    /// An idle connection that is still usable (reused = true), or a new one. `own`: one of meshd's own
    /// client's (idle hyper connections are left for requests that stream their body).
    async fn checkout(
        self: &Arc<Self>,
        up: &Upstreams,
        opts: SendOpts,
        own: bool,
    ) -> Result<(Conn, bool), SendError> {
        // Connections to close: dropped after the lock (a connection's slot takes the lock as it drops).
        let mut closing = Vec::new();
        loop {
            let waiter = {
                let mut st = lock(&self.state);
                if !opts.fresh {
                    let now = Instant::now();
                    let mut passed = Vec::new();
                    let mut found = None;
                    while let Some(idle) = st.idle.pop() {
                        if own && matches!(idle.conn, Conn::Hyper(_)) {
                            passed.push(idle);
                            continue;
                        }
                        if idle.conn.usable() && now.duration_since(idle.since) < H1_IDLE_TIMEOUT {
                            found = Some(idle.conn);
                            break;
                        }
                        // Closed by the upstream, or idle too long.
                        closing.push(idle.conn);
                    }
                    // The ones passed over stay idle, in their order.
                    st.idle.extend(passed.into_iter().rev());
                    if let Some(conn) = found {
                        drop(st);
                        return Ok((conn, true));
                    }
                }
                if st.open < H1_MAX_CONNECTIONS {
                    st.open += 1;
                    break;
                }
                if opts.fresh && !st.idle.is_empty() {
                    // At the cap, a fresh connection has to replace an idle one.
                    closing.push(st.idle.remove(0).conn);
                } else if own
                    && let Some(i) = st
                        .idle
                        .iter()
                        .position(|i| matches!(i.conn, Conn::Hyper(_)))
                {
                    // At the cap, an idle hyper connection is of no use to this request: it closes, and its
                    // task's end makes room (and wakes a waiter).
                    closing.push(st.idle.remove(i).conn);
                }
                st.waiting += 1;
                Waiter(self)
            };
            closing.clear();
            // `notify_one` keeps a permit when nobody waits yet, so no release is missed.
            self.freed.notified().await;
            drop(waiter);
        }
        drop(closing);
        // Counted as open from here: given back if the connect fails or the caller gives up meanwhile.
        let mut opening = Opening(Some(self));
        // Boxed: connecting is the rare path, and its future would make every request's future larger.
        match Box::pin(self.connect(up, opts.connect_timeout)).await {
            Ok(conn) => {
                // From now on the connection's slot gives the place back when it closes.
                opening.0 = None;
                Ok((Conn::Own(conn), false))
            }
            Err(e) => Err(connect_failed(&e)),
        }
    }

    async fn connect(
        self: &Arc<Self>,
        up: &Upstreams,
        timeout: Duration,
    ) -> Result<wire1::Conn, ConnectError> {
        match connect::tcp(self.addr, timeout).await {
            Ok(stream) => {
                up.metrics.connected(Wire::H1.as_str());
                let slot = Slot {
                    pool: Arc::downgrade(self),
                    _gauge: up.metrics.open(Wire::H1.as_str()),
                };
                Ok(wire1::Conn::new(stream, slot))
            }
            Err(e) => {
                up.metrics.connect_failed(Wire::H1.as_str(), e.label());
                Err(e)
            }
        }
    }

    /// Turns a connection of meshd's own into a hyper connection, for a request only hyper sends.
    async fn hand_to_hyper(
        &self,
        up: &Upstreams,
        conn: wire1::Conn,
    ) -> Result<SendRequest<ReqBody>, ConnectError> {
        let (io, slot) = conn.into_parts();
        let (send, conn) = match Builder::new().handshake(TokioIo::new(io)).await {
            Ok(ok) => ok,
            Err(source) => {
                up.metrics.connect_failed(Wire::H1.as_str(), "handshake");
                return Err(ConnectError::Handshake {
                    addr: self.addr,
                    source,
                });
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
            drop(slot);
        });
        Ok(send)
    }

    /// A connection closed (or a connect failed): one fewer open connection.
    fn closed_one(&self) {
        let mut st = lock(&self.state);
        st.open = st.open.saturating_sub(1);
        if st.waiting > 0 {
            self.freed.notify_one();
        }
    }

    /// A request is done with its hyper connection.
    fn release(self: &Arc<Self>, send: SendRequest<ReqBody>) {
        if send.is_closed() {
            return;
        }
        if send.is_ready() {
            self.park(Conn::Hyper(send));
            return;
        }
        // hyper marks the connection ready once it has finished reading the response; give it a moment.
        let pool = self.clone();
        tokio::spawn(async move {
            let mut send = send;
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, send.ready()).await {
                pool.park(Conn::Hyper(send));
            }
        });
    }

    /// A response body of meshd's own client has ended, leaving its connection ready for another request.
    pub fn park_own(&self, conn: wire1::Conn) {
        self.park(Conn::Own(conn));
    }

    fn park(&self, conn: Conn) {
        let mut st = lock(&self.state);
        if st.idle.len() >= H1_MAX_IDLE {
            // Too many idle already: this one closes (after the lock).
            drop(st);
            drop(conn);
            return;
        }
        st.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        if st.waiting > 0 {
            self.freed.notify_one();
        }
    }

    pub fn sweep(&self, now: Instant) {
        let closing: Vec<Conn> = {
            let mut st = lock(&self.state);
            let (keep, close): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|i| i.conn.usable() && now.duration_since(i.since) < H1_IDLE_TIMEOUT);
            st.idle = keep;
            close.into_iter().map(|i| i.conn).collect()
        };
        drop(closing);
    }
}
