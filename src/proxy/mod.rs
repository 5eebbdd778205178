//! The data path: the outbound listener for local apps, the inbound listener for peer agents, upstream
//! connection pools and meshd's own error responses.
//!
//! Reads the routing table (`watch` snapshots) and the config; never writes the table.

pub mod client;
pub mod errors;
pub mod framing;
pub mod headers;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod server;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Uri, Version, header};
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

/// `http://<next hop><original path and query>`, without formatting or re-parsing.
pub fn upstream_uri(next_hop: Authority, original: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(next_hop);
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts)
        .unwrap_or_else(|_| unreachable!("scheme, authority and path are all set"))
}
