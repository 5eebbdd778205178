//! Distributed tracing through real agents: a request from an app through two agents to a backend yields one
//! connected trace at a real (in-test) Zipkin collector, in the format the app sent; retries are separate client
//! spans; sampling follows the sender, `mesh-sample` and `sample_rate`; malformed context starts a new root;
//! with tracing off, trace headers pass through untouched.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;

/// A Zipkin v2 collector on 127.0.0.1: every span it receives goes to the channel.
async fn zipkin() -> (SocketAddr, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/api/v2/spans");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let spans: Vec<Value> = serde_json::from_slice(&body).unwrap();
                        for s in spans {
                            let _ = tx.send(s);
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(full("")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Spans received until `n` have arrived (or 15 s passed).
async fn spans(rx: &mut mpsc::UnboundedReceiver<Value>, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(s)) => got.push(s),
            _ => break,
        }
    }
    got
}

fn tracing_toml(collector: SocketAddr, rate: f64) -> String {
    format!("[tracing]\nsample_rate = {rate}\nzipkin = \"http://{collector}/api/v2/spans\"\n")
}

async fn send(agent: &Agent, host: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = http::Request::get(agent.url("/hello?q=secret")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(
        h1_client()
            .request(req.body(full("")).unwrap())
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_and_a_backend_make_one_connected_trace_in_the_callers_format() {
    let (collector, mut rx) = zipkin().await;
    let back = backend("back").await;
    // B owns the backend; A routes `users` to it through B's inbound port.
    let b = agent_at(
        "127.0.0.2",
        &format!(
            "{}[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n",
            tracing_toml(collector, 0.0),
            back.addr
        ),
    )
    .await;
    let a = agent_at("127.0.0.1", &tracing_toml(collector, 0.0)).await;
    learn_remote(&a, "node-127.0.0.2", b.inbound, &["users"], back.addr).await;

    // B3 multi from the app, sampled by the app: honoured although sample_rate is 0.
    let trace = "463ac35c9f6413ad48485a3953bb6124";
    let got = send(
        &a,
        "users",
        &[
            ("x-b3-traceid", trace),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(got.status, 200);
    // The backend got B3 (the format received), same trace, parent = B's server span.
    assert_eq!(got.header("x-seen-x-b3-traceid"), trace);
    assert_eq!(got.header("x-seen-traceparent"), "");

    let spans = spans(&mut rx, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let by_kind = |kind: &str, node: &str| -> Value {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["localEndpoint"]["serviceName"] == node)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} span from {node}: {spans:#?}"))
    };
    let a_server = by_kind("SERVER", "node-127.0.0.1");
    let a_client = by_kind("CLIENT", "node-127.0.0.1");
    let b_server = by_kind("SERVER", "node-127.0.0.2");
    for s in [&a_server, &a_client, &b_server] {
        assert_eq!(s["traceId"], trace, "{s}");
        assert_eq!(s["tags"]["mesh.service"], "users", "{s}");
        assert_eq!(s["tags"]["http.method"], "GET", "{s}");
        assert_eq!(s["tags"]["http.status_code"], "200", "{s}");
        assert!(!s.to_string().contains("secret"), "no query strings: {s}");
    }
    // One chain: app → A server → A client (attempt 1) → B server → backend.
    assert_eq!(a_server["parentId"], "a2fb4a1d1a96d312");
    assert_eq!(a_client["parentId"], a_server["id"]);
    assert_eq!(b_server["parentId"], a_client["id"], "{spans:#?}");
    // The backend's parent is B's server span.
    assert_eq!(
        got.header("x-seen-x-b3-spanid"),
        b_server["id"].as_str().unwrap()
    );
    assert_eq!(a_client["tags"]["mesh.attempt"], "1");
    assert_eq!(a_client["tags"]["mesh.peer_node"], "node-127.0.0.2");
    assert_eq!(a_client["tags"]["mesh.endpoint"], back.addr.to_string());
    // Over plaintext no peer is proven, so none is named (with mutual TLS it is the certificate's node).
    assert!(
        b_server["tags"].get("mesh.peer_node").is_none(),
        "{b_server}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_separate_client_spans_and_sampling_follows_the_rules() {
    let (collector, mut rx) = zipkin().await;
    let back = backend("back").await;
    let a = agent(&format!(
        "{}[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n[services.users]\nretry = {{ max_attempts = 3, on = [\"5xx\"] }}\nfault = {{ allow_header_override = true }}\n",
        tracing_toml(collector, 0.0),
        back.addr
    ))
    .await;

    // Not sampled: sample_rate 0 and no decision from the app — nothing is exported, but the context goes on
    // (W3C for a new root) with the sampled flag off.
    let got = send(&a, "users", &[]).await;
    let tp = got.header("x-seen-traceparent").to_string();
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    // The app said "not sampled": honoured.
    send(
        &a,
        "users",
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        )],
    )
    .await;
    // Malformed context: a new root, never an error.
    let got = send(
        &a,
        "users",
        &[
            ("traceparent", "00-zzzz-b7ad6b7169203331-01"),
            ("mesh-sample", "1"),
        ],
    )
    .await;
    assert_eq!(got.status, 200);
    let new_root = got.header("x-seen-traceparent").to_string();
    assert!(
        new_root.ends_with("-01") && !new_root.contains("zzzz"),
        "{new_root}"
    );
    let forced = spans(&mut rx, 2).await;
    assert_eq!(
        forced.len(),
        2,
        "only the forced request is exported: {forced:#?}"
    );
    assert!(
        forced
            .iter()
            .all(|s| s.get("parentId").is_none() || s["kind"] == "CLIENT")
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "nothing else"
    );

    // Three attempts against a failing backend: one server span, three client spans with attempts 1..3.
    back.faults.set_status(503);
    let got = send(
        &a,
        "users",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await;
    assert_eq!(got.status, 503);
    let tries = spans(&mut rx, 4).await;
    assert_eq!(tries.len(), 4, "{tries:#?}");
    let mut attempts: Vec<String> = tries
        .iter()
        .filter(|s| s["kind"] == "CLIENT")
        .map(|s| s["tags"]["mesh.attempt"].as_str().unwrap_or("").to_string())
        .collect();
    attempts.sort();
    assert_eq!(attempts, ["1", "2", "3"]);
    let server = tries.iter().find(|s| s["kind"] == "SERVER").unwrap();
    assert_eq!(server["tags"]["http.status_code"], "503");
    assert!(
        server["tags"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{server}"
    );
    let ids: HashMap<&str, &Value> = tries
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s))
        .collect();
    for c in tries.iter().filter(|s| s["kind"] == "CLIENT") {
        assert_eq!(c["parentId"], server["id"]);
        assert!(ids.contains_key(c["parentId"].as_str().unwrap()));
    }
    // A fault this agent injects is on the request's server span: an abort answers before any attempt.
    let got = send(
        &a,
        "users",
        &[("mesh-sample", "1"), ("mesh-fault-abort", "418")],
    )
    .await;
    assert_eq!(got.status, 418);
    let aborted = spans(&mut rx, 1).await;
    assert_eq!(
        aborted.len(),
        1,
        "no client span without an attempt: {aborted:#?}"
    );
    assert_eq!(aborted[0]["kind"], "SERVER");
    assert_eq!(aborted[0]["tags"]["mesh.fault"], "abort", "{}", aborted[0]);
    assert_eq!(aborted[0]["tags"]["mesh.error"], "fault-injected");
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "no client span without an attempt"
    );

    // Counted once the collector has answered, which is just after it received the spans: poll.
    let exported = "meshd_trace_spans_exported_total{exporter=\"zipkin\"}";
    let mut m = metrics(&a).await;
    for _ in 0..200 {
        if sample(&m, exported) >= 7.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = metrics(&a).await;
    }
    assert!(sample(&m, exported) >= 7.0, "{m}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_trace_headers_pass_through_untouched() {
    let back = backend("back").await;
    let a = agent(&format!(
        "[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n",
        back.addr
    ))
    .await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let got = send(
        &a,
        "users",
        &[
            ("traceparent", tp),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ],
    )
    .await;
    assert_eq!(got.header("x-seen-traceparent"), tp);
    assert_eq!(
        got.header("x-seen-b3"),
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
    );
    let none = send(&a, "users", &[]).await;
    assert_eq!(
        none.header("x-seen-traceparent"),
        "",
        "no context is invented while tracing is off"
    );
    a.stop().await;
}

#[test]
fn bad_tracing_settings_are_listed_with_their_keys() {
    let text = "[tracing]\nsample_rate = 2.0\nzipkin = \"https://zipkin:9411/api/v2/spans\"\notlp = \"collector\"\nrecord_headers = [\"x-tenant\", \"bad header\"]\n";
    let errs = meshd::config::Config::from_toml(text)
        .unwrap_err()
        .to_string();
    for key in [
        "tracing.sample_rate",
        "tracing.zipkin",
        "tracing.otlp",
        "tracing.record_headers[1]",
    ] {
        assert!(errs.contains(key), "{key} not in {errs}");
    }
}

/// A gRPC status that comes in the trailers (every successful call, and failures after the head) is on the
/// attempt's client span: the span ends with the response body, not with its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_from_the_trailers_is_on_the_client_span() {
    let (collector, mut rx) = zipkin().await;
    let back = backend("grpc-1").await;
    let a = agent(&format!(
        "{}[[discovery.static]]\nservice = \"echo\"\nendpoints = [\"{}\"]\nprotocol = \"grpc\"\n",
        tracing_toml(collector, 1.0),
        back.addr
    ))
    .await;
    let mut client = grpc_client(a.outbound, "echo").await;

    let reply = grpc_unary(&mut client, GRPC_UNARY, "hi").await.unwrap();
    assert_eq!(reply.message, "hi");
    let ok = spans(&mut rx, 2).await;
    let ok_client = ok
        .iter()
        .find(|s| s["kind"] == "CLIENT")
        .unwrap_or_else(|| panic!("no client span: {ok:#?}"));
    assert_eq!(
        ok_client["tags"]["rpc.grpc.status_code"], "0",
        "{ok_client}"
    );
    assert!(ok_client["tags"].get("error").is_none(), "{ok_client}");
    // gRPC declares no Content-Length: the span counts the body's bytes (a 5-byte frame header and the reply).
    let size: u64 = ok_client["tags"]["http.response.body.size"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no body size: {ok_client}"));
    assert!(size > 5, "{ok_client}");

    let err = grpc_unary(&mut client, GRPC_FAIL, "x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let failed = spans(&mut rx, 2).await;
    let failed_client = failed
        .iter()
        .find(|s| s["kind"] == "CLIENT")
        .unwrap_or_else(|| panic!("no client span: {failed:#?}"));
    assert_eq!(
        failed_client["tags"]["rpc.grpc.status_code"], "5",
        "{failed_client}"
    );
    assert!(
        failed_client["tags"].get("error").is_some(),
        "a non-OK status is an error on a client span: {failed_client}"
    );
    a.stop().await;
}
