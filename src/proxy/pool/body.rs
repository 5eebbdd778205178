//! Request bodies from clients, marked so that their failures are blamed on the client.
//!
//! When an app sends a malformed chunked body, aborts its upload or resets its HTTP/2 stream, the upstream
//! request fails too. Without a mark that would look like the endpoint failing (a 502 that feeds the circuit
//! breaker). [`ClientBody`] wraps the body hyper gives the handler. Its errors are [`ClientBodyError`]s, which
//! the pool recognises in an HTTP/1.1 error's chain; an HTTP/2 upstream only says its stream was reset, so a
//! streamed body also reports through a [`BodyWatch`] whether it failed, or is still being sent.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

// 0: still being sent.
const FINISHED: u8 = 1;
const FAILED: u8 = 2;

/// How a streamed request body is doing, seen from the side that waits for the upstream's answer.
#[derive(Clone, Debug, Default)]
pub struct BodyWatch(Arc<AtomicU8>);

impl BodyWatch {
    /// The client's body broke off.
    pub fn failed(&self) -> bool {
        self.0.load(Ordering::Acquire) == FAILED
    }

    /// The client has sent all of it.
    pub fn finished(&self) -> bool {
        self.0.load(Ordering::Acquire) == FINISHED
    }
}

/// A request body from a client (an app, or a peer agent on the inbound side).
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    watch: Option<BodyWatch>,
}

impl ClientBody {
    pub fn new(inner: Incoming) -> Self {
        ClientBody { inner, watch: None }
    }

    /// A body that reports through the returned watch.
    pub fn watched(inner: Incoming) -> (Self, BodyWatch) {
        let watch = BodyWatch::default();
        if inner.is_end_stream() {
            watch.0.store(FINISHED, Ordering::Release);
        }
        (
            ClientBody {
                inner,
                watch: Some(watch.clone()),
            },
            watch,
        )
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(w) = &self.watch {
            match &res {
                Poll::Ready(None) => w.0.store(FINISHED, Ordering::Release),
                Poll::Ready(Some(Err(_))) => w.0.store(FAILED, Ordering::Release),
                Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                    w.0.store(FINISHED, Ordering::Release)
                }
                _ => {}
            }
        }
        res.map_err(ClientBodyError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
