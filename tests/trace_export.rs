//! The span exporter against real HTTP collectors on 127.0.0.1: what reaches Zipkin and OTLP (checked field by
//! field, OTLP decoded with the official protobuf types), and what a collector that is down, refusing or hung
//! costs — dropped spans, counted by reason, and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshd::telemetry::trace::{
    ExportConfig, Exporter, Span, SpanIds, SpanKind, TraceMetrics, TraceSink,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a collector received.
#[derive(Debug)]
struct Received {
    path: String,
    content_type: Option<String>,
    body: Bytes,
}

#[derive(Clone, Copy)]
enum Mode {
    Status(u16),
    /// Accepts connections and never answers.
    Hang,
}

/// A collector on `listener` answering every POST per `mode`; each request body goes to the returned channel.
fn collector(
    listener: TcpListener,
    mode: Mode,
) -> (mpsc::UnboundedReceiver<Received>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let status = match mode {
                Mode::Hang => {
                    held.push(stream);
                    continue;
                }
                Mode::Status(status) => status,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req.into_body().collect().await?.to_bytes();
                        let _ = tx.send(Received {
                            path,
                            content_type,
                            body,
                        });
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (rx, task)
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn config(zipkin: Option<SocketAddr>, otlp: Option<SocketAddr>) -> ExportConfig {
    let mut config = ExportConfig::new(Arc::from("node-a"));
    config.zipkin = zipkin.map(|a| format!("http://{a}/api/v2/spans"));
    config.otlp = otlp.map(|a| format!("http://{a}"));
    config.flush_interval = Duration::from_millis(100);
    config
}

fn spawn(config: ExportConfig) -> (TraceSink, JoinHandle<()>, TraceMetrics, CancellationToken) {
    let registry = prometheus::Registry::new();
    let metrics = TraceMetrics::new(&registry).unwrap();
    let token = CancellationToken::new();
    let (sink, handle) = Exporter::spawn(config, metrics.clone(), token.clone()).unwrap();
    (sink, handle, metrics, token)
}

fn dropped(metrics: &TraceMetrics, reason: &str) -> u64 {
    metrics.dropped.with_label_values(&[reason]).get()
}

fn exported(metrics: &TraceMetrics, exporter: &str) -> u64 {
    metrics.exported.with_label_values(&[exporter]).get()
}

async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the collector received nothing within 10 s")
        .expect("collector gone")
}

/// A server span (from a peer agent) and its client span (attempt 2 to a local endpoint).
fn spans() -> (Span, Span) {
    let server_ids = SpanIds {
        trace_id: [0x11; 16],
        span_id: [0x22; 8],
        parent_id: Some([0x33; 8]),
    };
    let start = SystemTime::UNIX_EPOCH + Duration::from_micros(1_750_000_000_000_001);
    let mut server = Span::new(&server_ids, SpanKind::Server, Arc::from("node-a"));
    server.start = start;
    server.duration = Duration::from_micros(4_200);
    server.service = Some(Arc::from("orders"));
    server.peer_node = Some(Arc::from("node-b"));
    server.endpoint = Some("10.1.2.3:4143".parse().unwrap());
    server.method = Some(http::Method::GET);
    server.status = Some(200);
    server.request_bytes = Some(0);
    server.response_bytes = Some(77);

    let client_ids = SpanIds {
        trace_id: server_ids.trace_id,
        span_id: [0x44; 8],
        parent_id: Some(server_ids.span_id),
    };
    let mut client = Span::new(&client_ids, SpanKind::Client, Arc::from("node-a"));
    client.start = start + Duration::from_micros(100);
    client.duration = Duration::from_micros(3_000);
    client.service = Some(Arc::from("orders"));
    client.endpoint = Some("172.17.0.5:8080".parse().unwrap());
    client.method = Some(http::Method::GET);
    client.status = Some(504);
    client.attempt = Some(2);
    client.mesh_error = Some("timeout");
    client.breaker = Some("closed");
    (server, client)
}

#[tokio::test]
async fn zipkin_receives_v2_json_field_by_field() {
    let (listener, addr) = bind().await;
    let (mut rx, _server) = collector(listener, Mode::Status(202));
    let (sink, handle, metrics, token) = spawn(config(Some(addr), None));
    let (server, client) = spans();
    sink.record(server);
    sink.record(client);

    let mut got = Vec::new();
    while got.len() < 2 {
        let r = next(&mut rx).await;
        assert_eq!(r.path, "/api/v2/spans");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        got.extend(v.as_array().unwrap().iter().cloned());
    }
    let server = got.iter().find(|s| s["kind"] == "SERVER").unwrap();
    assert_eq!(
        *server,
        json!({
            "traceId": "11111111111111111111111111111111",
            "id": "2222222222222222",
            "parentId": "3333333333333333",
            "name": "GET orders",
            "kind": "SERVER",
            "timestamp": 1_750_000_000_000_001u64,
            "duration": 4_200,
            "localEndpoint": {"serviceName": "node-a"},
            "remoteEndpoint": {"serviceName": "node-b", "ipv4": "10.1.2.3", "port": 4143},
            "tags": {
                "http.method": "GET",
                "http.status_code": "200",
                "mesh.service": "orders",
                "mesh.endpoint": "10.1.2.3:4143",
                "mesh.node": "node-a",
                "mesh.peer_node": "node-b",
                "http.request.body.size": "0",
                "http.response.body.size": "77",
            }
        })
    );
    let client = got.iter().find(|s| s["kind"] == "CLIENT").unwrap();
    assert_eq!(
        *client,
        json!({
            "traceId": "11111111111111111111111111111111",
            "id": "4444444444444444",
            "parentId": "2222222222222222",
            "name": "GET orders",
            "kind": "CLIENT",
            "timestamp": 1_750_000_000_000_101u64,
            "duration": 3_000,
            "localEndpoint": {"serviceName": "node-a"},
            "remoteEndpoint": {"serviceName": "orders", "ipv4": "172.17.0.5", "port": 8080},
            "tags": {
                "http.method": "GET",
                "http.status_code": "504",
                "mesh.service": "orders",
                "mesh.endpoint": "172.17.0.5:8080",
                "mesh.node": "node-a",
                "mesh.attempt": "2",
                "mesh.error": "timeout",
                "mesh.breaker": "closed",
                "error": "timeout",
            }
        })
    );
    eventually(
        "2 spans counted as exported",
        Duration::from_secs(5),
        || exported(&metrics, "zipkin") == 2,
    )
    .await;
    token.cancel();
    handle.await.unwrap();
    assert_eq!(dropped(&metrics, "shutdown"), 0);
}

#[tokio::test]
async fn otlp_body_decodes_with_the_official_types() {
    let (listener, addr) = bind().await;
    let (mut rx, _server) = collector(listener, Mode::Status(200));
    let (sink, handle, metrics, token) = spawn(config(None, Some(addr)));
    let (server, client) = spans();
    sink.record(server);
    sink.record(client);

    let mut got = Vec::new();
    let mut resource = None;
    while got.len() < 2 {
        let r = next(&mut rx).await;
        assert_eq!(r.path, "/v1/traces");
        assert_eq!(r.content_type.as_deref(), Some("application/x-protobuf"));
        let req = ExportTraceServiceRequest::decode(r.body).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = req.resource_spans.into_iter().next().unwrap();
        resource = rs.resource;
        assert_eq!(rs.scope_spans.len(), 1);
        assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "meshd");
        got.extend(rs.scope_spans.into_iter().next().unwrap().spans);
    }
    let resource: Vec<(String, Value)> = resource
        .unwrap()
        .attributes
        .into_iter()
        .map(|kv| (kv.key, kv.value.unwrap().value.unwrap()))
        .collect();
    assert_eq!(
        resource,
        vec![
            (
                "service.name".to_string(),
                Value::StringValue("meshd".into())
            ),
            ("host.name".to_string(), Value::StringValue("node-a".into())),
        ]
    );

    let attrs = |span: &opentelemetry_proto::tonic::trace::v1::Span| -> Vec<(String, Value)> {
        let mut a: Vec<_> = span
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        a
    };
    let s = |k: &str, v: &str| (k.to_string(), Value::StringValue(v.to_string()));
    let i = |k: &str, v: i64| (k.to_string(), Value::IntValue(v));

    let server = got.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.trace_id, vec![0x11; 16]);
    assert_eq!(server.span_id, vec![0x22; 8]);
    assert_eq!(server.parent_span_id, vec![0x33; 8]);
    assert_eq!(server.name, "GET orders");
    assert_eq!(server.start_time_unix_nano, 1_750_000_000_000_001_000);
    assert_eq!(server.end_time_unix_nano, 1_750_000_000_004_201_000);
    assert_eq!(server.status, None);
    assert_eq!(
        attrs(server),
        vec![
            i("http.request.body.size", 0),
            s("http.request.method", "GET"),
            i("http.response.body.size", 77),
            i("http.response.status_code", 200),
            s("mesh.endpoint", "10.1.2.3:4143"),
            s("mesh.node", "node-a"),
            s("mesh.peer_node", "node-b"),
            s("mesh.service", "orders"),
            s("server.address", "10.1.2.3"),
            i("server.port", 4143),
        ]
    );

    let client = got.iter().find(|s| s.kind == 3).unwrap();
    assert_eq!(client.trace_id, vec![0x11; 16]);
    assert_eq!(client.span_id, vec![0x44; 8]);
    assert_eq!(client.parent_span_id, vec![0x22; 8]);
    assert_eq!(
        client.end_time_unix_nano - client.start_time_unix_nano,
        3_000_000
    );
    let status = client.status.as_ref().unwrap();
    assert_eq!((status.code, status.message.as_str()), (2, "timeout"));
    assert_eq!(
        attrs(client),
        vec![
            s("http.request.method", "GET"),
            i("http.response.status_code", 504),
            i("mesh.attempt", 2),
            s("mesh.breaker", "closed"),
            s("mesh.endpoint", "172.17.0.5:8080"),
            s("mesh.error", "timeout"),
            s("mesh.node", "node-a"),
            s("mesh.service", "orders"),
            s("server.address", "172.17.0.5"),
            i("server.port", 8080),
        ]
    );
    eventually(
        "2 spans counted as exported",
        Duration::from_secs(5),
        || exported(&metrics, "otlp") == 2,
    )
    .await;
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn outage_costs_dropped_spans_then_export_resumes() {
    // A port nobody listens on (yet): connections are refused.
    let (listener, addr) = bind().await;
    drop(listener);
    let (sink, handle, metrics, token) = spawn(config(Some(addr), Some(addr)));
    let (server, client) = spans();
    sink.record(server.clone());
    sink.record(client.clone());
    eventually(
        "spans dropped as unreachable",
        Duration::from_secs(10),
        || dropped(&metrics, "unreachable") == 4,
    )
    .await;
    assert_eq!(exported(&metrics, "zipkin") + exported(&metrics, "otlp"), 0);

    // The collector comes up on that address: later spans arrive.
    let listener = TcpListener::bind(addr).await.unwrap();
    let (mut rx, _server) = collector(listener, Mode::Status(200));
    sink.record(server);
    let mut paths = Vec::new();
    while paths.len() < 2 {
        paths.push(next(&mut rx).await.path);
    }
    paths.sort();
    assert_eq!(paths, ["/api/v2/spans", "/v1/traces"]);
    eventually("export resumed", Duration::from_secs(5), || {
        exported(&metrics, "zipkin") == 1 && exported(&metrics, "otlp") == 1
    })
    .await;
    assert_eq!(dropped(&metrics, "unreachable"), 4);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_collector_answering_500_costs_rejected_spans() {
    let (listener, addr) = bind().await;
    let (mut rx, _server) = collector(listener, Mode::Status(500));
    let (sink, handle, metrics, token) = spawn(config(Some(addr), None));
    for _ in 0..3 {
        sink.record(spans().0);
    }
    next(&mut rx).await;
    eventually("3 spans rejected", Duration::from_secs(5), || {
        dropped(&metrics, "rejected") == 3
    })
    .await;
    assert_eq!(exported(&metrics, "zipkin"), 0);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_hung_collector_times_out_and_never_blocks_record() {
    let (listener, addr) = bind().await;
    let (_rx, _server) = collector(listener, Mode::Hang);
    let mut config = config(Some(addr), None);
    config.request_timeout = Duration::from_millis(300);
    let (sink, handle, metrics, token) = spawn(config);
    sink.record(spans().0);
    eventually("a span dropped by timeout", Duration::from_secs(10), || {
        dropped(&metrics, "timeout") == 1
    })
    .await;
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn record_returns_while_the_collector_hangs_and_shutdown_is_bounded() {
    let (listener, addr) = bind().await;
    let (_rx, _server) = collector(listener, Mode::Hang);
    // The default 5 s request timeout: only the 2 s shutdown deadline can end the POST in flight.
    let (sink, handle, metrics, token) = spawn(config(Some(addr), Some(addr)));
    let (server, _) = spans();
    // Far more than the queues hold, while the exporter waits on the hung collector: every call returns.
    let n = 20_000u64;
    for _ in 0..n {
        sink.record(server.clone());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..n {
        sink.record(server.clone());
    }
    assert!(dropped(&metrics, "queue-full") > 0);

    let started = Instant::now();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("shutdown did not finish within 5 s")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // Every span is accounted for: nothing exported, the rest dropped by queue-full or shutdown.
    assert_eq!(exported(&metrics, "zipkin") + exported(&metrics, "otlp"), 0);
    assert_eq!(
        dropped(&metrics, "queue-full") + dropped(&metrics, "shutdown"),
        2 * 2 * n
    );
    // After shutdown, recording still returns and counts.
    sink.record(server);
    assert_eq!(
        dropped(&metrics, "shutdown") + dropped(&metrics, "queue-full"),
        2 * 2 * n + 2
    );
}
