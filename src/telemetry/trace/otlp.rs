//! OTLP/HTTP protobuf: the body of `POST /v1/traces` (content type `application/x-protobuf`), built from the
//! official OpenTelemetry protobuf types (`opentelemetry-proto`) and encoded with prost.
//!
//! One `ResourceSpans` per request (resource `service.name = "meshd"`, `host.name` = this agent's node name),
//! one `ScopeSpans` (scope `meshd`). Attributes use the semantic-convention names (`http.request.method`,
//! `http.response.status_code`, `rpc.grpc.status_code`, `server.address`/`server.port`, body sizes) plus
//! `mesh.*` for what the conventions have no name for.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as pb;
use prost::Message;

use super::{Span, SpanKind};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`: the next bit says whether the parent is remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// `SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`.
const FLAG_IS_REMOTE: u32 = 0x200;

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn to_otlp(span: &Span) -> pb::Span {
    let mut attributes = Vec::with_capacity(16);
    if let Some(method) = &span.method {
        attributes.push(string("http.request.method", method.as_str()));
    }
    if let Some(status) = span.status {
        attributes.push(int("http.response.status_code", i64::from(status)));
    }
    if let Some(code) = span.grpc_status {
        attributes.push(int("rpc.grpc.status_code", i64::from(code)));
    }
    if let Some(endpoint) = span.endpoint {
        attributes.push(string("server.address", endpoint.ip().to_string()));
        attributes.push(int("server.port", i64::from(endpoint.port())));
    }
    if let Some(n) = span.request_bytes {
        attributes.push(int("http.request.body.size", saturating_i64(n)));
    }
    if let Some(n) = span.response_bytes {
        attributes.push(int("http.response.body.size", saturating_i64(n)));
    }
    if let Some(service) = &span.service {
        attributes.push(string("mesh.service", &**service));
    }
    if let Some(endpoint) = span.endpoint {
        attributes.push(string("mesh.endpoint", endpoint.to_string()));
    }
    attributes.push(string("mesh.node", &*span.local_node));
    if let Some(peer) = &span.peer_node {
        attributes.push(string("mesh.peer_node", &**peer));
    }
    if let Some(attempt) = span.attempt {
        attributes.push(int("mesh.attempt", i64::from(attempt)));
    }
    if let Some(code) = span.mesh_error {
        attributes.push(string("mesh.error", code));
    }
    if let Some(breaker) = span.breaker {
        attributes.push(string("mesh.breaker", breaker));
    }
    if let Some(fault) = span.fault {
        attributes.push(string("mesh.fault", fault));
    }
    for (key, value) in &span.extra {
        attributes.push(string(key, value.as_str()));
    }

    let status = span.is_error().then(|| pb::Status {
        code: pb::status::StatusCode::Error as i32,
        message: span.mesh_error.unwrap_or_default().to_string(),
    });
    let start = span.start_unix_nanos();
    let duration = u64::try_from(span.duration.as_nanos()).unwrap_or(u64::MAX);
    let flags = match (span.kind, span.parent_id) {
        // A server span's parent is the sender's span; a client span's is this agent's server span.
        (SpanKind::Server, Some(_)) => FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE,
        _ => FLAG_HAS_IS_REMOTE,
    };
    pb::Span {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        parent_span_id: span.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: span.name(),
        kind: match span.kind {
            SpanKind::Server => pb::span::SpanKind::Server as i32,
            SpanKind::Client => pb::span::SpanKind::Client as i32,
        },
        start_time_unix_nano: start,
        end_time_unix_nano: start.saturating_add(duration),
        attributes,
        status,
        ..Default::default()
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The export request for `spans`, all recorded by the agent named `local_node`.
pub fn request<'a>(
    local_node: &str,
    spans: impl IntoIterator<Item = &'a Span>,
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![pb::ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "meshd"),
                    string("host.name", local_node),
                ],
                ..Default::default()
            }),
            scope_spans: vec![pb::ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "meshd".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..Default::default()
                }),
                spans: spans.into_iter().map(to_otlp).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The protobuf body of `POST /v1/traces`.
pub fn encode<'a>(local_node: &str, spans: impl IntoIterator<Item = &'a Span>) -> Vec<u8> {
    request(local_node, spans).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::tests::sample_span;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn attrs(span: &pb::Span) -> HashMap<&str, any_value::Value> {
        span.attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect()
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.to_string())
    }

    #[test]
    fn decodes_with_the_official_types() {
        let body = encode("node-a", [&sample_span()]);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let resource = rs.resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0], string("service.name", "meshd"));
        assert_eq!(resource.attributes[1], string("host.name", "node-a"));
        assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "meshd");
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.trace_id, vec![0x4b; 16]);
        assert_eq!(span.span_id, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(span.parent_span_id, vec![0xaa; 8]);
        assert_eq!(span.name, "GET payments");
        assert_eq!(span.kind, 3);
        assert_eq!(span.start_time_unix_nano, 1_700_000_000_123_456_000);
        assert_eq!(span.end_time_unix_nano, 1_700_000_000_125_956_000);
        assert_eq!(span.flags, 0x100);
        let status = span.status.as_ref().unwrap();
        assert_eq!(status.code, pb::status::StatusCode::Error as i32);
        assert_eq!(status.message, "upstream-failed");
        let a = attrs(span);
        let expected: HashMap<&str, any_value::Value> = [
            ("http.request.method", s("GET")),
            ("http.response.status_code", any_value::Value::IntValue(503)),
            ("rpc.grpc.status_code", any_value::Value::IntValue(14)),
            ("server.address", s("10.0.0.7")),
            ("server.port", any_value::Value::IntValue(8080)),
            ("http.request.body.size", any_value::Value::IntValue(12)),
            ("http.response.body.size", any_value::Value::IntValue(345)),
            ("mesh.service", s("payments")),
            ("mesh.endpoint", s("10.0.0.7:8080")),
            ("mesh.node", s("node-a")),
            ("mesh.peer_node", s("node-b")),
            ("mesh.attempt", any_value::Value::IntValue(2)),
            ("mesh.error", s("upstream-failed")),
            ("mesh.breaker", s("closed")),
            ("mesh.fault", s("delay")),
            ("http.request.header.x-tenant", s("acme")),
        ]
        .into_iter()
        .collect();
        assert_eq!(a, expected);
        assert_eq!(span.attributes.len(), expected.len(), "no duplicates");
    }

    #[test]
    fn status_follows_the_semantic_conventions() {
        let ids = crate::telemetry::trace::SpanIds {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: Some([3; 8]),
        };
        let mut span = Span::new(&ids, SpanKind::Server, Arc::from("node-a"));
        span.method = Some(http::Method::GET);
        span.status = Some(404);
        let req = request("node-a", [&span]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(out.status, None, "4xx on a server span: unset");
        assert_eq!(out.kind, 2);
        assert_eq!(out.flags, 0x300, "a server span's parent is remote");
        span.kind = SpanKind::Client;
        let req = request("node-a", [&span]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            out.status.as_ref().unwrap().code,
            2,
            "4xx on a client span: error"
        );
        span.kind = SpanKind::Server;
        span.status = Some(500);
        span.parent_id = None;
        let req = request("node-a", [&span]);
        let out = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(out.status.as_ref().unwrap().code, 2);
        assert!(out.parent_span_id.is_empty());
    }
}
