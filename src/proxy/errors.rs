//! Responses meshd generates itself. Every one carries `mesh-error`, a status and a one-line body; a gRPC
//! request gets a trailers-only response with the matching `grpc-status` instead.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};

use super::ProxyBody;
use super::pool::FailKind;

/// Header naming the meshd error on a generated response.
pub const MESH_ERROR: &str = "mesh-error";

/// Why meshd answered a request itself instead of forwarding a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshError {
    /// The request is malformed (no host, conflicting framing headers).
    BadRequest,
    /// The Host/:authority names no known service.
    NoRoute,
    /// The service is known but has no routable endpoint.
    NoEndpoints,
    /// No connection could be made to the chosen endpoint.
    ConnectFailed,
    /// The connection to the endpoint failed after the request was sent (reset, closed, malformed response).
    UpstreamFailed,
    /// No response headers within the service's timeout.
    Timeout,
    /// The client did not send its request (body) before the request's deadline: 408.
    RequestTimeout,
    /// Refused by policy: CONNECT, an address instead of a service name, or (inbound) a request that is not
    /// from a peer agent for one of this host's own endpoints.
    Forbidden,
    /// The service's rate limit on this agent is exhausted.
    RateLimited,
    /// A configured (or requested) fault, answered with this status.
    FaultInjected(StatusCode),
}

impl MeshError {
    pub fn code(self) -> &'static str {
        match self {
            MeshError::BadRequest => "bad-request",
            MeshError::NoRoute => "no-route",
            MeshError::NoEndpoints => "no-endpoints",
            MeshError::ConnectFailed => "connect-failed",
            MeshError::UpstreamFailed => "upstream-failed",
            MeshError::Timeout | MeshError::RequestTimeout => "timeout",
            MeshError::Forbidden => "forbidden",
            MeshError::RateLimited => "rate-limited",
            MeshError::FaultInjected(_) => "fault-injected",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            MeshError::BadRequest => StatusCode::BAD_REQUEST,
            MeshError::NoRoute => StatusCode::NOT_FOUND,
            MeshError::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::ConnectFailed | MeshError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            MeshError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            MeshError::Forbidden => StatusCode::FORBIDDEN,
            MeshError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            MeshError::FaultInjected(s) => s,
        }
    }

    /// What meshd answers when an upstream request failed this way.
    pub fn for_failure(kind: FailKind) -> MeshError {
        match kind {
            FailKind::Connect => MeshError::ConnectFailed,
            FailKind::Timeout => MeshError::Timeout,
            FailKind::ClientBody => MeshError::BadRequest,
            FailKind::ClientTimeout => MeshError::RequestTimeout,
            FailKind::RefusedStream | FailKind::Stale | FailKind::Other => {
                MeshError::UpstreamFailed
            }
        }
    }

    /// The gRPC status code for the same condition.
    pub fn grpc_status(self) -> u8 {
        match self {
            MeshError::BadRequest => 3, // INVALID_ARGUMENT
            MeshError::NoRoute => 12,   // UNIMPLEMENTED
            MeshError::NoEndpoints | MeshError::ConnectFailed | MeshError::UpstreamFailed => 14, // UNAVAILABLE
            MeshError::Timeout | MeshError::RequestTimeout => 4, // DEADLINE_EXCEEDED
            MeshError::Forbidden => 7,                           // PERMISSION_DENIED
            MeshError::RateLimited => 8,                         // RESOURCE_EXHAUSTED
            MeshError::FaultInjected(s) => grpc_for_http(s),
        }
    }
}

/// The gRPC code an HTTP status maps to (as the gRPC spec's HTTP-to-gRPC table).
fn grpc_for_http(s: StatusCode) -> u8 {
    match s.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// Builds meshd's own response for `err`. `detail` is a short human sentence (no trailing newline).
pub fn error_response(err: MeshError, grpc: bool, detail: &str) -> Response<ProxyBody> {
    let mut resp = if grpc {
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(err.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&grpc_message_encode(detail)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "meshd: {detail}\n"
        )))));
        *r.status_mut() = err.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(MESH_ERROR, HeaderValue::from_static(err.code()));
    resp
}

/// Percent-encodes a `grpc-message` value as the gRPC spec asks (printable ASCII except '%' kept as is).
fn grpc_message_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_grpc_forms() {
        let r = error_response(MeshError::NoRoute, false, "no route to \"x\"");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[MESH_ERROR], "no-route");
        let r = error_response(MeshError::Timeout, true, "timed out after 1s: 100%");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "timed out after 1s: 100%25");
        assert_eq!(r.headers()[MESH_ERROR], "timeout");
    }
}
