//! Zipkin v2 JSON: the body of `POST /api/v2/spans`, a JSON array of spans
//! (<https://zipkin.io/zipkin-api/#/default/post_spans>). Our own serde encoder: the `opentelemetry-zipkin`
//! crate is deprecated, and the format is small.
//!
//! `localEndpoint.serviceName` is this agent's node name: Zipkin has one name per span and builds its dependency
//! graph from it, so naming each agent shows which hop a span belongs to (the logical service is the
//! `mesh.service` tag). `remoteEndpoint` is the peer agent (by node name) and the endpoint's address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::context::hex_into;
use super::{Span, SpanKind};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/json";

/// The JSON array of `spans` for `POST /api/v2/spans`.
pub fn encode<'a>(spans: impl IntoIterator<Item = &'a Span>) -> Vec<u8> {
    let spans = spans.into_iter();
    // A typical span takes 500–700 bytes: one allocation for most batches.
    let mut out = Vec::with_capacity(2 + spans.size_hint().0 * 768);
    encode_into(&mut out, spans);
    out
}

/// Appends the JSON array of `spans` to `out`.
///
/// Written by hand rather than through serde: the exporter encodes every sampled span, and a direct writer with
/// no intermediate maps or strings costs a fraction of the serde version (see docs/benchmarks.md, "Tracing
/// cost"). The shape is checked field by field by the tests below and decoded by a real Zipkin-format receiver
/// in tests/trace_export.rs.
pub fn encode_into<'a>(out: &mut Vec<u8>, spans: impl IntoIterator<Item = &'a Span>) {
    let mut names = Names::default();
    out.push(b'[');
    for (i, span) in spans.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_span(out, &mut names, span);
    }
    out.push(b']');
}

fn write_span(out: &mut Vec<u8>, names: &mut Names, span: &Span) {
    out.extend_from_slice(b"{\"traceId\":\"");
    hex_into(out, &span.trace_id);
    out.extend_from_slice(b"\",\"id\":\"");
    hex_into(out, &span.span_id);
    if let Some(parent) = &span.parent_id {
        out.extend_from_slice(b"\",\"parentId\":\"");
        hex_into(out, parent);
    }
    // The name: `{prefix} {method} {service}`, empty parts left out (see Span::name).
    out.extend_from_slice(b"\",\"name\":\"");
    let mut sep = false;
    // A method is an HTTP token: nothing to escape. The prefix is one of ours, but a `pub` field: checked.
    if !span.name_prefix.is_empty() {
        escape_into(out, span.name_prefix);
        sep = true;
    }
    if let Some(method) = &span.method {
        if sep {
            out.push(b' ');
        }
        out.extend_from_slice(method.as_str().as_bytes());
        sep = true;
    }
    if let Some(service) = span.service.as_ref().filter(|s| !s.is_empty()) {
        if sep {
            out.push(b' ');
        }
        cached_into(out, &mut names.service, service);
    }
    out.extend_from_slice(match span.kind {
        SpanKind::Server => b"\",\"kind\":\"SERVER\",\"timestamp\":",
        SpanKind::Client => b"\",\"kind\":\"CLIENT\",\"timestamp\":",
    });
    // Microseconds since the epoch; a duration of at least 1 µs (Zipkin reads 0 as "unknown").
    number(out, span.start_unix_nanos() / 1_000);
    out.extend_from_slice(b",\"duration\":");
    number(
        out,
        u64::try_from(span.duration.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
    );
    out.extend_from_slice(names.node(&span.local_node).0);
    // An IPv4 endpoint is written twice (remoteEndpoint and the mesh.endpoint tag): format it once.
    let ipv4 = match span.endpoint {
        Some(SocketAddr::V4(a)) => Some(Ipv4Text::new(*a.ip())),
        _ => None,
    };
    write_remote_endpoint(out, names, span, ipv4.as_ref());
    // Tags: a flat object of string values. `mesh.node` is always there, so every other tag starts with a comma.
    out.extend_from_slice(names.node(&span.local_node).1);
    write_tags(out, names, span, ipv4.as_ref());
    out.extend_from_slice(b"}}");
}

/// `remoteEndpoint`: the peer agent (by node name) or, on a client span without one, the service; and the
/// endpoint's address. Left out when there is neither.
fn write_remote_endpoint(
    out: &mut Vec<u8>,
    names: &mut Names,
    span: &Span,
    ipv4: Option<&Ipv4Text>,
) {
    let (name, slot) = match (span.kind, &span.peer_node, &span.service) {
        (_, Some(peer), _) => (Some(peer), None),
        (SpanKind::Client, None, Some(service)) => (Some(service), Some(&mut names.service)),
        _ => (None, None),
    };
    if name.is_none() && span.endpoint.is_none() {
        return;
    }
    out.extend_from_slice(b",\"remoteEndpoint\":{");
    if let Some(name) = name {
        out.extend_from_slice(b"\"serviceName\":\"");
        match slot {
            Some(slot) => cached_into(out, slot, name),
            None => escape_into(out, name),
        }
        out.push(b'"');
        if span.endpoint.is_some() {
            out.push(b',');
        }
    }
    if let Some(endpoint) = span.endpoint {
        match (endpoint.ip(), ipv4) {
            (IpAddr::V4(_), Some(text)) => {
                out.extend_from_slice(b"\"ipv4\":\"");
                out.extend_from_slice(text.as_bytes());
            }
            (ip, _) => {
                use std::io::Write;
                out.extend_from_slice(if ip.is_ipv4() {
                    b"\"ipv4\":\""
                } else {
                    b"\"ipv6\":\""
                });
                let _ = write!(out, "{ip}");
            }
        }
        out.extend_from_slice(b"\",\"port\":");
        number(out, u64::from(endpoint.port()));
    }
    out.push(b'}');
}

/// A tag whose key (`,"key":"`, quotes and all) is one of ours and whose value needs escaping.
#[inline(always)]
fn str_tag(out: &mut Vec<u8>, key: &'static [u8], value: &str) {
    out.extend_from_slice(key);
    escape_into(out, value);
    out.push(b'"');
}

/// A tag whose value is one of meshd's own codes (`timeout`, `half-open`, …): plain ASCII, nothing to escape.
#[inline(always)]
fn code_tag(out: &mut Vec<u8>, key: &'static [u8], code: &'static str) {
    out.extend_from_slice(key);
    if code.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(code.as_bytes());
    } else {
        escape_into(out, code);
    }
    out.push(b'"');
}

/// A tag whose value is a number (Zipkin tags are strings: `"503"`).
#[inline(always)]
fn num_tag(out: &mut Vec<u8>, key: &'static [u8], value: u64) {
    out.extend_from_slice(key);
    number(out, value);
    out.push(b'"');
}

fn write_tags(out: &mut Vec<u8>, names: &mut Names, span: &Span, ipv4: Option<&Ipv4Text>) {
    if let Some(method) = &span.method {
        // A method is an HTTP token: nothing to escape.
        out.extend_from_slice(b",\"http.method\":\"");
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b'"');
    }
    if let Some(status) = span.status {
        out.extend_from_slice(b",\"http.status_code\":\"");
        if (100..1000).contains(&status) {
            // Every real status: three digits, no formatter.
            out.extend_from_slice(&[
                b'0' + (status / 100) as u8,
                b'0' + (status / 10 % 10) as u8,
                b'0' + (status % 10) as u8,
                b'"',
            ]);
        } else {
            number(out, u64::from(status));
            out.push(b'"');
        }
    }
    if let Some(code) = span.grpc_status {
        out.extend_from_slice(b",\"rpc.grpc.status_code\":\"");
        let mut buf = itoa::Buffer::new();
        out.extend_from_slice(buf.format(code).as_bytes());
        out.push(b'"');
    }
    if let Some(service) = &span.service {
        out.extend_from_slice(b",\"mesh.service\":\"");
        cached_into(out, &mut names.service, service);
        out.push(b'"');
    }
    if let Some(endpoint) = span.endpoint {
        out.extend_from_slice(b",\"mesh.endpoint\":\"");
        match endpoint {
            SocketAddr::V4(a) if ipv4.is_some() => {
                if let Some(text) = ipv4 {
                    out.extend_from_slice(text.as_bytes());
                }
                out.push(b':');
                number(out, u64::from(a.port()));
            }
            // `[ip%scope]:port`: rare enough for the formatter.
            a => {
                use std::io::Write;
                let _ = write!(out, "{a}");
            }
        }
        out.push(b'"');
    }
    if let Some(peer) = &span.peer_node {
        str_tag(out, b",\"mesh.peer_node\":\"", peer);
    }
    if let Some(attempt) = span.attempt {
        num_tag(out, b",\"mesh.attempt\":\"", u64::from(attempt));
    }
    if let Some(code) = span.mesh_error {
        code_tag(out, b",\"mesh.error\":\"", code);
    }
    if let Some(breaker) = span.breaker {
        code_tag(out, b",\"mesh.breaker\":\"", breaker);
    }
    if let Some(fault) = span.fault {
        code_tag(out, b",\"mesh.fault\":\"", fault);
    }
    if let Some(n) = span.request_bytes {
        num_tag(out, b",\"http.request.body.size\":\"", n);
    }
    if let Some(n) = span.response_bytes {
        num_tag(out, b",\"http.response.body.size\":\"", n);
    }
    // `record_headers` values; a header named twice is recorded once (the first value).
    for (i, (key, value)) in span.extra.iter().enumerate() {
        if span.extra[..i].iter().any(|(k, _)| k == key) {
            continue;
        }
        out.extend_from_slice(b",\"");
        escape_into(out, key);
        out.extend_from_slice(b"\":\"");
        escape_into(out, value);
        out.push(b'"');
    }
    if span.is_error() {
        match (span.mesh_error, span.status) {
            (Some(code), _) => code_tag(out, b",\"error\":\"", code),
            (None, Some(status)) if status >= 400 => {
                num_tag(out, b",\"error\":\"", u64::from(status))
            }
            _ => out.extend_from_slice(b",\"error\":\"true\""),
        }
    }
}

#[inline]
fn number(out: &mut Vec<u8>, n: u64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(n).as_bytes());
}

/// An IPv4 address in dotted decimal, written digit by digit (the formatter costs several times as much).
struct Ipv4Text {
    buf: [u8; 15],
    len: usize,
}

impl Ipv4Text {
    fn new(ip: std::net::Ipv4Addr) -> Ipv4Text {
        let mut buf = [0u8; 15];
        let mut len = 0;
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                buf[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                buf[len] = b'0' + octet / 10 % 10;
                len += 1;
            }
            buf[len] = b'0' + octet % 10;
            len += 1;
        }
        Ipv4Text { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Appends `s` as the inside of a JSON string: `"` and `\` escaped, control characters as `\uXXXX` (or their
/// short forms), everything else — including non-ASCII UTF-8 — as is.
#[inline]
fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // The usual case, nothing to escape: one scan and one copy.
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0x0f)],
            ]),
            _ => out.push(b),
        }
    }
}

/// The escaped form of the last node and service names written: a batch names the same few again and again
/// (every span names this agent's node twice and its service up to three times).
#[derive(Default)]
struct Names {
    /// The node, and the two fragments that name it: `,"localEndpoint":{"serviceName":"NODE"}` and
    /// `,"tags":{"mesh.node":"NODE"`.
    node: Option<(Arc<str>, Vec<u8>, Vec<u8>)>,
    service: Option<(Arc<str>, Vec<u8>)>,
}

impl Names {
    /// The two fragments naming `node` (see [`Names::node`]), made once per batch and node.
    fn node(&mut self, node: &Arc<str>) -> (&[u8], &[u8]) {
        let fresh = match &self.node {
            Some((known, _, _)) => !(Arc::ptr_eq(known, node) || **known == **node),
            None => true,
        };
        if fresh {
            let mut escaped = Vec::with_capacity(node.len());
            escape_into(&mut escaped, node);
            let mut local = b",\"localEndpoint\":{\"serviceName\":\"".to_vec();
            local.extend_from_slice(&escaped);
            local.extend_from_slice(b"\"}");
            let mut tags = b",\"tags\":{\"mesh.node\":\"".to_vec();
            tags.extend_from_slice(&escaped);
            tags.push(b'"');
            self.node = Some((Arc::clone(node), local, tags));
        }
        match &self.node {
            Some((_, local, tags)) => (local, tags),
            None => (&[], &[]),
        }
    }
}

/// Appends `name` escaped, from `slot` when it holds the same string.
fn cached_into(out: &mut Vec<u8>, slot: &mut Option<(Arc<str>, Vec<u8>)>, name: &Arc<str>) {
    match slot {
        Some((known, escaped)) if Arc::ptr_eq(known, name) || **known == **name => {
            out.extend_from_slice(escaped);
        }
        _ => {
            let mut escaped = Vec::with_capacity(name.len());
            escape_into(&mut escaped, name);
            out.extend_from_slice(&escaped);
            *slot = Some((Arc::clone(name), escaped));
        }
    }
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
        let mut span = Span::new(&ids, SpanKind::Server, Arc::from("node-a"));
        span.method = Some(http::Method::POST);
        span.duration = Duration::from_nanos(10); // rounds to 0 µs → 1
        span.status = Some(404);
        span.endpoint = Some("[fd00::1]:4143".parse().unwrap());
        let v: Value = serde_json::from_slice(&encode([&span])).unwrap();
        let s = &v[0];
        assert!(s.get("parentId").is_none());
        assert_eq!(s["kind"], "SERVER");
        assert_eq!(s["name"], "POST");
        assert_eq!(s["duration"], 1);
        assert_eq!(
            s["remoteEndpoint"],
            json!({"ipv6": "fd00::1", "port": 4143})
        );
        assert_eq!(
            s["tags"],
            json!({"http.method": "POST", "http.status_code": "404", "mesh.node": "node-a", "mesh.endpoint": "[fd00::1]:4143"}),
            "a 4xx is not an error on a server span"
        );
    }

    #[test]
    fn strings_are_escaped_and_names_joined() {
        let mut span = sample_span();
        span.local_node = Arc::from("node \"a\"\\\n\t\u{1}é→");
        span.name_prefix = "outbound";
        span.extra = vec![
            ("http.request.header.x-tenant".into(), "a\"b".into()),
            ("http.request.header.x-tenant".into(), "second".into()),
        ];
        let body = encode([&span, &sample_span()]);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        let s = &v[0];
        assert_eq!(s["name"], "outbound GET payments");
        assert_eq!(s["localEndpoint"]["serviceName"], "node \"a\"\\\n\t\u{1}é→");
        assert_eq!(s["tags"]["mesh.node"], "node \"a\"\\\n\t\u{1}é→");
        assert_eq!(
            s["tags"]["http.request.header.x-tenant"], "a\"b",
            "the first value of a repeated name"
        );
        assert_eq!(v[1]["name"], "GET payments");
    }

    #[test]
    fn ipv6_endpoints_and_grpc_codes() {
        let mut span = sample_span();
        span.endpoint = Some("[fd00::7]:8080".parse().unwrap());
        span.grpc_status = Some(-1);
        let v: Value = serde_json::from_slice(&encode([&span])).unwrap();
        assert_eq!(
            v[0]["remoteEndpoint"],
            json!({"serviceName": "node-b", "ipv6": "fd00::7", "port": 8080})
        );
        assert_eq!(v[0]["tags"]["mesh.endpoint"], "[fd00::7]:8080");
        assert_eq!(v[0]["tags"]["rpc.grpc.status_code"], "-1");
    }

    proptest::proptest! {
        /// Whatever the strings hold, the output is JSON that gives them back.
        #[test]
        fn any_strings_round_trip(node in "\\PC*|[\\x00-\\x7f]*", service in ".*", value in "\\PC*|[\\x00-\\x7f]*") {
            let mut span = sample_span();
            span.local_node = Arc::from(node.as_str());
            span.service = Some(Arc::from(service.as_str()));
            span.extra = vec![("http.request.header.x".into(), value.clone())];
            let v: Value = serde_json::from_slice(&encode([&span])).unwrap();
            proptest::prop_assert_eq!(&v[0]["localEndpoint"]["serviceName"], &json!(node));
            proptest::prop_assert_eq!(&v[0]["tags"]["mesh.service"], &json!(service));
            proptest::prop_assert_eq!(&v[0]["tags"]["http.request.header.x"], &json!(value));
        }
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
