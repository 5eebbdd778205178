//! Request bodies from clients, marked so that their failures are blamed on the client.
//!
//! When an app sends a malformed chunked body, aborts its upload or resets its HTTP/2 stream, the upstream
//! request fails too. Without a mark that would look like the endpoint failing (a 502 that feeds the circuit
//! breaker). [`ClientBody`] wraps the body hyper gives the handler; its errors are [`ClientBodyError`]s, which the
//! pool recognises anywhere in an error's chain.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// A request body from a client (an app, or a peer agent on the inbound side).
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
}

impl ClientBody {
    pub fn new(inner: Incoming) -> Self {
        ClientBody { inner }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(ClientBodyError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
