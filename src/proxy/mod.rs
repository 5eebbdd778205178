//! The data path: the outbound listener for local apps, the inbound listener for peer agents, upstream
//! connection pools, upgraded connections and meshd's own error responses.
//!
//! Reads the routing table (`watch` snapshots) and the config; never writes the table.

pub mod ctx;
pub mod errors;
pub mod framing;
pub mod headers;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod pool;
pub mod server;
pub mod spans;
pub mod tunnel;

use bytes::Bytes;
use http::{Request, Version, header};
use http_body_util::{Either, Full};

/// Body of every response the proxy sends: a forwarded upstream body, or meshd's own short one.
pub type ProxyBody = Either<observe::Observed, Full<Bytes>>;

/// Whether a request is gRPC (its errors then travel as `grpc-status`).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The `mesh-orig-proto` spelling of an HTTP version.
pub fn proto_name(v: Version) -> &'static str {
    if v == Version::HTTP_2 {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    }
}

/// The `grpc-status` of a trailers-only gRPC response head (meshd's own errors, or an app's that answered at
/// once); a status sent in trailers after a body is not seen here.
pub fn grpc_status_of(headers: &http::HeaderMap) -> Option<i32> {
    // A constant name: looking up a string parses and validates it on every call.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// A message's declared `Content-Length`.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
