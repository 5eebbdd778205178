//! HTTP/1.1 connections to one endpoint: reused last-in first-out, one request at a time each.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use super::{
    ConnectError, H1_IDLE_TIMEOUT, H1_MAX_CONNECTIONS, H1_MAX_IDLE, ReqBody, SendError, SendOpts,
    Upstreams, Wire, connect, connect_failed, send_error,
};

/// How long a released connection may take to be ready for its next request before it is dropped.
const READY_WAIT: Duration = Duration::from_secs(1);

struct Idle {
    send: SendRequest<ReqBody>,
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

/// A connection being opened: one of `open` until it is handed to its task (or given back here).
struct Opening<'a>(Option<&'a Shared>);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.closed_one();
        }
    }
}

/// The pool's state, shared with the leases and (weakly) with the connection tasks.
pub struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    freed: Notify,
}

/// A connection carrying one request.
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
) -> Result<Response<Incoming>, SendError> {
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

    pub async fn send(
        self: &Arc<Self>,
        up: &Upstreams,
        req: Request<ReqBody>,
        opts: SendOpts,
    ) -> Result<(Response<Incoming>, super::Lease), SendError> {
        let (mut send, reused) = self.checkout(up, opts).await?;
        match send.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                super::Lease::H1(Lease {
                    send: Some(send),
                    pool: self.clone(),
                }),
            )),
            // The connection is unusable after a failure: dropping `send` closes it.
            Err(e) => Err(send_error(e, self.addr, reused)),
        }
    }

    /// An idle connection that is still usable (reused = true), or a new one.
    async fn checkout(
        self: &Arc<Self>,
        up: &Upstreams,
        opts: SendOpts,
    ) -> Result<(SendRequest<ReqBody>, bool), SendError> {
        loop {
            let waiter = {
                let mut st = lock(&self.state);
                if !opts.fresh {
                    let now = Instant::now();
                    while let Some(idle) = st.idle.pop() {
                        if idle.send.is_ready() && now.duration_since(idle.since) < H1_IDLE_TIMEOUT
                        {
                            return Ok((idle.send, true));
                        }
                        // Closed by the upstream, or idle too long: dropping it closes it.
                    }
                }
                if st.open < H1_MAX_CONNECTIONS {
                    st.open += 1;
                    break;
                }
                if opts.fresh && !st.idle.is_empty() {
                    // At the cap, a fresh connection has to replace an idle one.
                    st.idle.remove(0);
                }
                st.waiting += 1;
                Waiter(self)
            };
            // `notify_one` keeps a permit when nobody waits yet, so no release is missed.
            self.freed.notified().await;
            drop(waiter);
        }
        // Counted as open from here: given back if the connect fails or the caller gives up meanwhile.
        let mut slot = Opening(Some(self));
        // Boxed: connecting is the rare path, and its future would make every request's future larger.
        match Box::pin(self.connect(up, opts.connect_timeout)).await {
            Ok(send) => {
                // From now on the connection's own task gives the slot back when it ends.
                slot.0 = None;
                Ok((send, false))
            }
            Err(e) => Err(connect_failed(&e)),
        }
    }

    async fn connect(
        self: &Arc<Self>,
        up: &Upstreams,
        timeout: Duration,
    ) -> Result<SendRequest<ReqBody>, ConnectError> {
        let result = async {
            let stream = connect::tcp(self.addr, timeout).await?;
            Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: self.addr,
                    source,
                })
        }
        .await;
        match result {
            Ok((send, conn)) => {
                up.metrics.connected(Wire::H1.as_str());
                let gauge = up.metrics.open(Wire::H1.as_str());
                let pool: Weak<Shared> = Arc::downgrade(self);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
                    }
                    drop(gauge);
                    if let Some(pool) = pool.upgrade() {
                        pool.closed_one();
                    }
                });
                Ok(send)
            }
            Err(e) => {
                up.metrics.connect_failed(Wire::H1.as_str(), e.label());
                Err(e)
            }
        }
    }

    /// A connection task ended (or a connect failed): one fewer open connection.
    fn closed_one(&self) {
        let mut st = lock(&self.state);
        st.open = st.open.saturating_sub(1);
        if st.waiting > 0 {
            self.freed.notify_one();
        }
    }

    /// A request is done with its connection.
    fn release(self: &Arc<Self>, send: SendRequest<ReqBody>) {
        if send.is_closed() {
            return;
        }
        if send.is_ready() {
            self.park(send);
            return;
        }
        // hyper marks the connection ready once it has finished reading the response; give it a moment.
        let pool = self.clone();
        tokio::spawn(async move {
            let mut send = send;
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, send.ready()).await {
                pool.park(send);
            }
        });
    }

    fn park(&self, send: SendRequest<ReqBody>) {
        let mut st = lock(&self.state);
        if st.idle.len() >= H1_MAX_IDLE {
            // Too many idle already: this one closes.
            return;
        }
        st.idle.push(Idle {
            send,
            since: Instant::now(),
        });
        if st.waiting > 0 {
            self.freed.notify_one();
        }
    }

    pub fn sweep(&self, now: Instant) {
        let mut st = lock(&self.state);
        st.idle
            .retain(|i| !i.send.is_closed() && now.duration_since(i.since) < H1_IDLE_TIMEOUT);
    }
}
