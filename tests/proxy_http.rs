//! The outbound proxy with real HTTP/1.1 and h2c clients and backends.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn static_service(name: &str, addrs: &[std::net::SocketAddr], protocol: &str) -> String {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[discovery.static]]\nservice = \"{name}\"\nendpoints = [{}]\nprotocol = \"{protocol}\"\n",
        eps.join(", ")
    )
}

#[tokio::test]
async fn routes_by_host_absolute_uri_and_suffix() {
    let b = backend("users-1").await;
    let agent = agent(&static_service("users", &[b.addr], "http")).await;

    // Host header, with a port and the default ".mesh" suffix.
    for host in ["users", "users:8080", "USERS.mesh", "users.mesh:80"] {
        let got = get(&agent, host, "/hello?x=1").await;
        assert_eq!(got.status, StatusCode::OK, "{host}: {got:?}");
        assert_eq!(got.header("x-backend"), "users-1");
        assert_eq!(got.header("x-seen-path"), "/hello?x=1");
        assert_eq!(got.header("x-seen-mesh-service"), "users");
        assert_eq!(
            got.header("x-seen-host"),
            host,
            "the app's Host reaches the backend"
        );
        assert_eq!(got.header("x-seen-xff"), "127.0.0.1");
        assert_eq!(got.header("x-seen-request-id").len(), 32);
    }

    // Absolute-form URI, as an http_proxy client sends it.
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(b"GET http://users/abs HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("x-seen-path: /abs"), "{out}");

    // An incoming request id is kept.
    let req = Request::get(agent.url("/"))
        .header("host", "users")
        .header("mesh-request-id", "abc123")
        .body(full(""))
        .unwrap();
    let got = read(h1_client().request(req).await.unwrap()).await;
    assert_eq!(got.header("x-seen-request-id"), "abc123");
    assert_eq!(
        got.header("mesh-request-id"),
        "abc123",
        "echoed to the caller"
    );
    // meshd's own answers carry one too.
    let got = get(&agent, "nosuch", "/").await;
    assert_eq!(got.header("mesh-request-id").len(), 32);
    agent.stop().await;
}

#[tokio::test]
async fn round_robin_over_static_endpoints() {
    let (a, b) = (backend("a").await, backend("b").await);
    let agent = agent(&format!(
        "{}[defaults]\nload_balancer = \"round-robin\"\n",
        static_service("web", &[a.addr, b.addr], "http")
    ))
    .await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..10 {
        let got = get(&agent, "web", "/").await;
        *seen.entry(got.header("x-backend").to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");
    agent.stop().await;
}

#[tokio::test]
async fn keep_alive_on_both_sides() {
    let b = backend("ka").await;
    let agent = agent(&static_service("ka", &[b.addr], "http")).await;
    // One client connection, many requests.
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    for i in 0..20 {
        s.write_all(format!("GET /{i} HTTP/1.1\r\nHost: ka\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(&format!("x-seen-path: /{i}")), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("keep-alive: timeout=99"),
            "hop-by-hop leaked: {text}"
        );
    }
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests reuse one pooled upstream connection"
    );
    agent.stop().await;
}

#[tokio::test]
async fn http10_keep_alive_clients_keep_their_connection() {
    let b = backend("old").await;
    let agent = agent(&static_service("old", &[b.addr], "http")).await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.0\r\nHost: old\r\nConnection: Keep-Alive\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(text.starts_with("http/1.0 200"), "{text}");
        assert!(text.contains("connection: keep-alive"), "{text}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped() {
    let b = backend("hop").await;
    let agent = agent(&static_service("hop", &[b.addr], "http")).await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: hop\r\nConnection: close, x-hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("x-seen-x-hop: \r\n"),
        "x-hop named in Connection must not be forwarded: {out}"
    );
    assert!(out.contains("x-seen-keep-alive: \r\n"), "{out}");
    assert!(out.contains("x-seen-te: trailers\r\n"), "{out}");
    assert!(out.contains("x-seen-xff: 10.9.9.9, 127.0.0.1\r\n"), "{out}");
    agent.stop().await;
}

#[tokio::test]
async fn chunked_body_streams_without_buffering() {
    let b = backend("echo").await;
    let agent = agent(&static_service("echo", &[b.addr], "http")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post(agent.url("/echo"))
        .header("host", "echo")
        .body(BodyExt::boxed_unsync(body))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first-chunk"))))
        .await
        .unwrap();
    // The response and the first echoed bytes arrive while the request body is still open: nothing waits for
    // the whole body.
    let resp = tokio::time::timeout(Duration::from_secs(10), h1_client().request(req))
        .await
        .expect("response headers before the request body ended")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first echoed chunk before the request body ended")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"first-chunk")
    );
    // Then 32 MiB more, streamed through.
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let sender = tokio::spawn(async move {
        for _ in 0..32 {
            tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        }
    });
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            total += d.len();
        }
    }
    sender.await.unwrap();
    assert_eq!(total, 32 << 20);
    agent.stop().await;
}

#[tokio::test]
async fn expect_100_continue() {
    let b = backend("cont").await;
    let agent = agent(&static_service("cont", &[b.addr], "http")).await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: cont\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue before the body is sent")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("200 OK"), "{out}");
    assert!(out.ends_with("hello"), "{out}");
    agent.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_to_h2c_and_http1_backends() {
    let b = backend("two").await;
    let cfg = format!(
        "{}{}",
        static_service("h2svc", &[b.addr], "h2c"),
        static_service("h1svc", &[b.addr], "http")
    );
    let agent = agent(&cfg).await;
    // h2 → h2c backend: stays HTTP/2. The :authority names the service.
    let req = Request::get(format!("http://h2svc{}", "/x"))
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    // Dial the agent but keep the service as :authority.
    let got = send_h2(agent.outbound, req).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-seen-version"), "HTTP/2.0");
    assert_eq!(got.header("x-seen-mesh-service"), "h2svc");
    // h2 → HTTP/1.1 backend: translated, Host set from :authority.
    let req = Request::get("http://h1svc/y")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let got = send_h2(agent.outbound, req).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-seen-version"), "HTTP/1.1");
    assert_eq!(got.header("x-seen-host"), "h1svc");
    // HTTP/1.1 → h2c backend.
    let got = get(&agent, "h2svc", "/z").await;
    assert_eq!(got.header("x-seen-version"), "HTTP/2.0");
    agent.stop().await;
}

/// Sends an h2 request whose :authority is a service name over a connection to `addr`.
async fn send_h2(addr: std::net::SocketAddr, req: Request<TestBody>) -> Got {
    let mut send = h2_connect(addr).await;
    read(send.send_request(req).await.unwrap()).await
}

#[tokio::test]
async fn meshd_errors_have_status_and_code() {
    let slow = backend("slow").await;
    // A port nothing listens on: bind, read the port, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = format!(
        "{}{}[services.empty]\n[services.slow]\ntimeout = \"200ms\"\n",
        static_service("slow", &[slow.addr], "http"),
        static_service("down", &[closed], "http"),
    );
    let agent = agent(&cfg).await;

    let got = get(&agent, "nosuch", "/").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::NOT_FOUND, "no-route")
    );
    assert!(got.body.contains("nosuch"), "{}", got.body);

    let got = get(&agent, "empty", "/").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints")
    );

    let got = get(&agent, "down", "/").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::BAD_GATEWAY, "connect-failed")
    );

    let got = get(&agent, "slow", "/slow?ms=3000").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );

    // Addresses, the admin port and CONNECT are refused.
    let got = get(&agent, "127.0.0.1", "/").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let got = get(&agent, &agent.admin.to_string(), "/metrics").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let got = get(
        &agent,
        &format!("localhost:{}", agent.admin.port()),
        "/metrics",
    )
    .await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::NOT_FOUND, "no-route")
    );
    let got = get(&agent, "[::1]:80", "/").await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(b"CONNECT slow:443 HTTP/1.1\r\nHost: slow:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("mesh-error: forbidden"), "{text}");
    assert_eq!(
        slow.requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the timed-out request reached it"
    );

    // A request with no Host at all.
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.0 400"), "{out}");
    assert!(out.contains("mesh-error: bad-request"), "{out}");

    let m = metrics(&agent).await;
    for (code, n) in [
        ("no-route", 2.0),
        ("no-endpoints", 1.0),
        ("connect-failed", 1.0),
        ("timeout", 1.0),
        ("forbidden", 4.0),
        ("bad-request", 1.0),
    ] {
        assert_eq!(
            sample(
                &m,
                &format!("meshd_proxy_errors_total{{direction=\"outbound\",error=\"{code}\"}}")
            ),
            n,
            "{code}\n{m}"
        );
    }
    agent.stop().await;
}
