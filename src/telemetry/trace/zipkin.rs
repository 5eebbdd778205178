//! Zipkin v2 JSON: the body of `POST /api/v2/spans`, a JSON array of spans
//! (<https://zipkin.io/zipkin-api/#/default/post_spans>). Our own serde encoder: the `opentelemetry-zipkin`
//! crate is deprecated, and the format is small.
//!
//! `localEndpoint.serviceName` is this agent's node name: Zipkin has one name per span and builds its dependency
//! graph from it, so naming each agent shows which hop a span belongs to (the logical service is the
//! `mesh.service` tag). `remoteEndpoint` is the peer agent (by node name) and the endpoint's address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::context::hex;
use super::{Span, SpanKind};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/json";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    kind: &'static str,
    /// Microseconds since the epoch.
    timestamp: u64,
    /// Microseconds, at least 1 (Zipkin reads 0 as "unknown").
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<Ipv6Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

fn to_zipkin(span: &Span) -> ZipkinSpan<'_> {
    let mut tags = BTreeMap::new();
    if let Some(method) = &span.method {
        tags.insert("http.method", method.clone());
    }
    if let Some(status) = span.status {
        tags.insert("http.status_code", status.to_string());
    }
    if let Some(code) = span.grpc_status {
        tags.insert("rpc.grpc.status_code", code.to_string());
    }
    if let Some(service) = &span.service {
        tags.insert("mesh.service", service.to_string());
    }
    if let Some(endpoint) = span.endpoint {
        tags.insert("mesh.endpoint", endpoint.to_string());
    }
    tags.insert("mesh.node", span.local_node.to_string());
    if let Some(peer) = &span.peer_node {
        tags.insert("mesh.peer_node", peer.to_string());
    }
    if let Some(attempt) = span.attempt {
        tags.insert("mesh.attempt", attempt.to_string());
    }
    if let Some(code) = span.mesh_error {
        tags.insert("mesh.error", code.to_string());
    }
    if let Some(breaker) = span.breaker {
        tags.insert("mesh.breaker", breaker.to_string());
    }
    if let Some(fault) = span.fault {
        tags.insert("mesh.fault", fault.to_string());
    }
    if let Some(n) = span.request_bytes {
        tags.insert("http.request.body.size", n.to_string());
    }
    if let Some(n) = span.response_bytes {
        tags.insert("http.response.body.size", n.to_string());
    }
    for (key, value) in &span.extra {
        tags.entry(key.as_str()).or_insert_with(|| value.clone());
    }
    if span.is_error() {
        let message = match (span.mesh_error, span.status) {
            (Some(code), _) => code.to_string(),
            (None, Some(status)) if status >= 400 => status.to_string(),
            _ => "true".to_string(),
        };
        tags.insert("error", message);
    }

    let remote_name = match span.kind {
        SpanKind::Server => span.peer_node.as_deref(),
        SpanKind::Client => span.peer_node.as_deref().or(span.service.as_deref()),
    };
    let (ipv4, ipv6) = match span.endpoint.map(|e| e.ip()) {
        Some(IpAddr::V4(ip)) => (Some(ip), None),
        Some(IpAddr::V6(ip)) => (None, Some(ip)),
        None => (None, None),
    };
    let remote_endpoint = (remote_name.is_some() || span.endpoint.is_some()).then_some(Endpoint {
        service_name: remote_name,
        ipv4,
        ipv6,
        port: span.endpoint.map(|e| e.port()),
    });

    ZipkinSpan {
        trace_id: hex(&span.trace_id),
        id: hex(&span.span_id),
        parent_id: span.parent_id.as_ref().map(|p| hex(p)),
        name: &span.name,
        kind: match span.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        },
        timestamp: span.start_unix_nanos() / 1_000,
        duration: u64::try_from(span.duration.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
        local_endpoint: Endpoint {
            service_name: Some(&*span.local_node),
            ipv4: None,
            ipv6: None,
            port: None,
        },
        remote_endpoint,
        tags,
    }
}

/// The JSON array of `spans` for `POST /api/v2/spans`.
pub fn encode<'a>(spans: impl IntoIterator<Item = &'a Span>) -> Vec<u8> {
    let spans: Vec<ZipkinSpan<'_>> = spans.into_iter().map(to_zipkin).collect();
    // Serializing strings, integers and maps of strings cannot fail.
    serde_json::to_vec(&spans).unwrap_or_else(|e| unreachable!("zipkin span serialization: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::tests::sample_span;
    use serde_json::{Value, json};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn client_span_field_by_field() {
        let body = encode([&sample_span()]);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let spans = v.as_array().unwrap();
        assert_eq!(spans.len(), 1);
        let s = spans[0].as_object().unwrap();
        assert_eq!(s["traceId"], "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b");
        assert_eq!(s["id"], "0102030405060708");
        assert_eq!(s["parentId"], "aaaaaaaaaaaaaaaa");
        assert_eq!(s["name"], "GET payments");
        assert_eq!(s["kind"], "CLIENT");
        assert_eq!(s["timestamp"], 1_700_000_000_123_456u64);
        assert_eq!(s["duration"], 2_500);
        assert_eq!(s["localEndpoint"], json!({"serviceName": "node-a"}));
        assert_eq!(
            s["remoteEndpoint"],
            json!({"serviceName": "node-b", "ipv4": "10.0.0.7", "port": 8080})
        );
        assert_eq!(
            s["tags"],
            json!({
                "http.method": "GET",
                "http.status_code": "503",
                "rpc.grpc.status_code": "14",
                "mesh.service": "payments",
                "mesh.endpoint": "10.0.0.7:8080",
                "mesh.node": "node-a",
                "mesh.peer_node": "node-b",
                "mesh.attempt": "2",
                "mesh.error": "upstream-failed",
                "mesh.breaker": "closed",
                "mesh.fault": "delay",
                "http.request.body.size": "12",
                "http.response.body.size": "345",
                "http.request.header.x-tenant": "acme",
                "error": "upstream-failed",
            })
        );
        assert_eq!(s.len(), 10, "no other fields: {s:?}");
    }

    #[test]
    fn minimal_server_root_span() {
        let ids = crate::telemetry::trace::SpanIds {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: None,
        };
        let mut span = Span::new(&ids, "POST", SpanKind::Server, Arc::from("node-a"));
        span.duration = Duration::from_nanos(10); // rounds to 0 µs → 1
        span.status = Some(404);
        span.endpoint = Some("[fd00::1]:4143".parse().unwrap());
        let v: Value = serde_json::from_slice(&encode([&span])).unwrap();
        let s = &v[0];
        assert!(s.get("parentId").is_none());
        assert_eq!(s["kind"], "SERVER");
        assert_eq!(s["duration"], 1);
        assert_eq!(
            s["remoteEndpoint"],
            json!({"ipv6": "fd00::1", "port": 4143})
        );
        assert_eq!(
            s["tags"],
            json!({"http.status_code": "404", "mesh.node": "node-a", "mesh.endpoint": "[fd00::1]:4143"}),
            "a 4xx is not an error on a server span"
        );
    }

    #[test]
    fn error_tag_without_a_mesh_error() {
        let mut span = sample_span();
        span.mesh_error = None;
        span.status = Some(200);
        span.grpc_status = None;
        span.error = true;
        let v: Value = serde_json::from_slice(&encode([&span])).unwrap();
        assert_eq!(v[0]["tags"]["error"], "true");
        assert!(v[0]["tags"].get("mesh.error").is_none());
        assert_eq!(encode(std::iter::empty::<&Span>()), b"[]");
    }
}
