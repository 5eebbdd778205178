//! The per-request context: what the proxy knows about one request as it moves from target resolution through
//! the attempt loop to the response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Version};

use super::headers::{Present, ensure_request_id};
use crate::telemetry::trace::context::TRACEPARENT;

/// One request's context.
#[derive(Debug)]
pub struct RequestCtx {
    /// When the request head was handed to meshd.
    pub received: Instant,
    /// The client's address (an app, or a peer agent on the inbound side).
    pub peer: SocketAddr,
    /// The node a peer agent proved to be (mutual TLS); `None` for apps and for plaintext peers.
    pub peer_identity: Option<Arc<str>>,
    /// `mesh-request-id`, generated when absent.
    pub request_id: Option<HeaderValue>,
    /// The incoming `traceparent`, if any.
    pub trace: Option<HeaderValue>,
    /// gRPC requests get meshd's errors as `grpc-status`.
    pub grpc: bool,
    /// The HTTP version the client spoke.
    pub version: Version,
    /// The service the request is accounted to, once known.
    pub service: Option<Arc<str>>,
    /// When meshd stops waiting for a response, once known.
    pub deadline: Option<Instant>,
    /// Attempts sent so far.
    pub attempt: u32,
    pub method: http::Method,
    /// The request target's path and query as the client sent it (the tap and the access log drop the query).
    pub target: Option<http::uri::PathAndQuery>,
    /// The request's declared `Content-Length`.
    pub request_bytes: Option<u64>,
    /// The endpoint of the last attempt, once one was sent.
    pub endpoint: Option<SocketAddr>,
    /// This request's trace, while tracing is on.
    pub hop: Option<Box<super::spans::Hop>>,
    /// The fault injected into this request, if any: `delay`, `abort` or `delay+abort` (for its server span).
    pub fault: Option<&'static str>,
    /// Which of the headers meshd reads the client sent.
    pub sent: Present,
}

impl RequestCtx {
    /// The context of a request just received from `peer`; gives it a request id if it has none.
    pub fn new<B>(req: &mut Request<B>, peer: SocketAddr) -> Self {
        let received = Instant::now();
        let sent = Present::scan(req.headers());
        let headers = req.headers_mut();
        RequestCtx {
            received,
            peer,
            peer_identity: None,
            request_id: ensure_request_id(headers, sent.any(Present::REQUEST_ID)),
            trace: sent
                .any(Present::TRACEPARENT)
                .then(|| headers.get(TRACEPARENT).cloned())
                .flatten(),
            grpc: sent.any(Present::CONTENT_TYPE) && super::is_grpc(req),
            version: req.version(),
            service: None,
            deadline: None,
            attempt: 0,
            method: req.method().clone(),
            target: req.uri().path_and_query().cloned(),
            request_bytes: sent
                .any(Present::CONTENT_LENGTH)
                .then(|| super::content_length(req.headers()))
                .flatten(),
            endpoint: None,
            hop: None,
            fault: None,
            sent,
        }
    }

    /// The path without its query string (`/` when the request had none).
    pub fn path(&self) -> &str {
        self.target.as_ref().map_or("/", |t| t.path())
    }

    /// The trace id (32 hex digits): this request's trace while tracing is on, else the incoming
    /// `traceparent`'s when it is well formed.
    pub fn trace_id(&self) -> Option<String> {
        if let Some(hop) = &self.hop {
            return Some(hop.trace_id());
        }
        let v = self.trace.as_ref()?.to_str().ok()?;
        let id = v.get(3..35)?;
        (v.get(2..3) == Some("-") && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_string())
    }
}
