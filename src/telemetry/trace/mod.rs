//! Distributed tracing: trace context on the wire ([`context`]), the span this agent records per hop
//! ([`Span`]), its Zipkin v2 JSON ([`zipkin`]) and OTLP protobuf ([`otlp`]) encodings, and the batching
//! exporter ([`export`]) that ships spans to collectors without ever blocking the data path.
//!
//! This module owns no proxy state: the proxy extracts a [`context::TraceContext`], makes [`context::SpanIds`],
//! fills a [`Span`] when the hop ends and hands it to [`export::TraceSink::record`].
//!
//! # What a span records — and what it does not
//! Traces leave the host and are kept by a collector, often for weeks and often in another jurisdiction, so a
//! span holds only routing facts:
//! - recorded: trace/span/parent ids, a name (`{direction} {method} {service}` on server spans,
//!   `{method} {service}` on client spans — never a path), kind, start and duration, this agent's node name, the logical service, the endpoint's IP:port, the
//!   peer agent's node name, the HTTP method, the HTTP status, the gRPC status, the retry attempt, the breaker
//!   and fault decisions, meshd's own error code (`mesh-error`), and body sizes in bytes;
//! - never recorded: request or response bodies, paths, query strings, client addresses of local apps, cookies,
//!   authorization or any other header value;
//! - header values only when the operator lists the header names in `tracing.record_headers`: the caller puts
//!   those in [`Span::extra`] (as `http.request.header.<name>`), and nothing else goes there.

pub mod context;
pub mod export;
pub mod otlp;
pub mod zipkin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use context::{Format, SpanIds, TraceContext, decide, extract, inject};
pub use export::{ExportConfig, ExportError, Exporter, TraceMetrics, TraceSink};

/// Which side of a hop a span describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// A request this agent received (from a local app or a peer agent).
    Server,
    /// One attempt to send it on (retries are separate client spans).
    Client,
}

/// One span, as the proxy fills it when a hop or attempt ends. Every field is a routing fact; see the module
/// documentation for what is deliberately left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    /// The first word of the name: the direction (`outbound`, `inbound`) on server spans, empty on client
    /// spans. The name is `{prefix} {method} {service}` (see [`Span::name`]): low-cardinality, never a path.
    pub name_prefix: &'static str,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub duration: Duration,
    /// This agent's node name.
    pub local_node: Arc<str>,
    /// The logical service the request was routed to.
    pub service: Option<Arc<str>>,
    /// The endpoint (client spans) or the peer's address (server spans from a peer agent).
    pub endpoint: Option<SocketAddr>,
    /// The node name of the agent on the other side, when there is one.
    pub peer_node: Option<Arc<str>>,
    pub method: Option<http::Method>,
    pub status: Option<u16>,
    pub grpc_status: Option<i32>,
    /// The attempt number of a client span: 1 for the first try.
    pub attempt: Option<u32>,
    /// meshd's own error code (`mesh-error`), e.g. `timeout`, `connect-failed`.
    pub mesh_error: Option<&'static str>,
    /// The circuit breaker's state or decision for the endpoint, e.g. `closed`, `half-open`, `open`.
    pub breaker: Option<&'static str>,
    /// A fault injected into this request, e.g. `delay`, `abort`.
    pub fault: Option<&'static str>,
    pub request_bytes: Option<u64>,
    pub response_bytes: Option<u64>,
    /// The caller's verdict; [`Span::is_error`] adds the status-based rules.
    pub error: bool,
    /// Header values recorded only because `tracing.record_headers` names them, as
    /// (`http.request.header.<name>`, value). Empty otherwise.
    pub extra: Vec<(String, String)>,
}

impl Span {
    /// A span starting now with every optional fact unset.
    pub fn new(ids: &SpanIds, kind: SpanKind, local_node: Arc<str>) -> Span {
        Span::starting_at(ids, kind, local_node, SystemTime::now())
    }

    /// A span starting at `start` with every optional fact unset.
    pub fn starting_at(
        ids: &SpanIds,
        kind: SpanKind,
        local_node: Arc<str>,
        start: SystemTime,
    ) -> Span {
        Span {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent_id: ids.parent_id,
            name_prefix: "",
            kind,
            start,
            duration: Duration::ZERO,
            local_node,
            service: None,
            endpoint: None,
            peer_node: None,
            method: None,
            status: None,
            grpc_status: None,
            attempt: None,
            mesh_error: None,
            breaker: None,
            fault: None,
            request_bytes: None,
            response_bytes: None,
            error: false,
            extra: Vec::new(),
        }
    }

    /// The parts of the name, in order, empty ones left out: the prefix, the method, the service.
    pub fn name_parts(&self) -> impl Iterator<Item = &str> {
        [
            self.name_prefix,
            self.method.as_ref().map_or("", |m| m.as_str()),
            self.service.as_deref().unwrap_or(""),
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
    }

    /// The span's name: `{prefix} {method} {service}` with empty parts left out, e.g. `outbound GET payments`
    /// for a server span and `GET payments` for a client span.
    pub fn name(&self) -> String {
        let mut name = String::new();
        for part in self.name_parts() {
            if !name.is_empty() {
                name.push(' ');
            }
            name.push_str(part);
        }
        name
    }

    /// Whether the span failed, by the OpenTelemetry HTTP and gRPC conventions: the caller's flag, any meshd
    /// error, a 5xx, a 4xx on a client span only (a 4xx is the client's fault, not the server's), and for gRPC
    /// any non-OK status on a client span but only server-side faults on a server span.
    pub fn is_error(&self) -> bool {
        if self.error || self.mesh_error.is_some() {
            return true;
        }
        if let Some(status) = self.status
            && (status >= 500 || (self.kind == SpanKind::Client && status >= 400))
        {
            return true;
        }
        match (self.grpc_status, self.kind) {
            (Some(code), SpanKind::Client) => code != 0,
            // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
            (Some(code), SpanKind::Server) => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            (None, _) => false,
        }
    }

    /// Start since the Unix epoch in nanoseconds (0 for a clock before 1970).
    pub(crate) fn start_unix_nanos(&self) -> u64 {
        self.start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fully populated client span for the encoders' tests.
    pub(crate) fn sample_span() -> Span {
        let ids = SpanIds {
            trace_id: [0x4b; 16],
            span_id: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
            parent_id: Some([0xaa; 8]),
        };
        let mut span = Span::new(&ids, SpanKind::Client, Arc::from("node-a"));
        span.start = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        span.duration = Duration::from_micros(2_500);
        span.service = Some(Arc::from("payments"));
        span.endpoint = Some("10.0.0.7:8080".parse().unwrap());
        span.peer_node = Some(Arc::from("node-b"));
        span.method = Some(http::Method::GET);
        span.status = Some(503);
        span.grpc_status = Some(14);
        span.attempt = Some(2);
        span.mesh_error = Some("upstream-failed");
        span.breaker = Some("closed");
        span.fault = Some("delay");
        span.request_bytes = Some(12);
        span.response_bytes = Some(345);
        span.extra = vec![("http.request.header.x-tenant".into(), "acme".into())];
        span
    }

    #[test]
    fn error_rules_follow_the_http_semantic_conventions() {
        let ids = SpanIds::root();
        let mut s = Span::new(&ids, SpanKind::Server, Arc::from("n"));
        assert!(!s.is_error());
        s.status = Some(404);
        assert!(!s.is_error(), "4xx is not a server-side error");
        s.kind = SpanKind::Client;
        assert!(s.is_error(), "4xx is an error on a client span");
        s.kind = SpanKind::Server;
        s.status = Some(502);
        assert!(s.is_error());
        s.status = Some(200);
        s.grpc_status = Some(5); // NOT_FOUND
        assert!(!s.is_error());
        s.kind = SpanKind::Client;
        assert!(s.is_error());
        s.kind = SpanKind::Server;
        s.grpc_status = Some(14); // UNAVAILABLE
        assert!(s.is_error());
        s.grpc_status = Some(0);
        s.mesh_error = Some("timeout");
        assert!(s.is_error());
        s.mesh_error = None;
        s.error = true;
        assert!(s.is_error());
    }

    #[test]
    fn names_leave_out_empty_parts() {
        let mut s = sample_span();
        assert_eq!(s.name(), "GET payments");
        s.name_prefix = "outbound";
        assert_eq!(s.name(), "outbound GET payments");
        s.service = None;
        assert_eq!(s.name(), "outbound GET");
        s.method = None;
        assert_eq!(s.name(), "outbound");
        s.name_prefix = "";
        assert_eq!(s.name(), "");
    }

    #[test]
    fn start_before_the_epoch_is_zero_not_a_panic() {
        let mut s = sample_span();
        s.start = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(s.start_unix_nanos(), 0);
        assert_eq!(sample_span().start_unix_nanos(), 1_700_000_000_123_456_000);
    }
}
