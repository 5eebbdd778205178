//! Hostile and malformed clients on the outbound listener: every one gets a clear 4xx or is cut off, is
//! counted, and never reaches an upstream.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup() -> (Backend, Agent) {
    let b = backend("hard").await;
    let a = agent(&format!(
        "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
        b.addr
    ))
    .await;
    (b, a)
}

/// The connection was cut off for its header timeout: counted once, and nothing reached the backend.
async fn assert_timed_out_unserved(b: Backend, agent: Agent) {
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_connection_errors_total{direction=\"outbound\",reason=\"header-timeout\"}"
        ),
        1.0,
        "{m}"
    );
    agent.stop().await;
}

/// Writes `raw`, then reads until the server closes (or 15 s pass).
async fn exchange(agent: &Agent, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let (b, agent) = setup().await;
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: svc\r\n");
    for i in 0..100 {
        raw.push_str(&format!("X-H{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    // Host + 100 = 101 header fields.
    let out = exchange(&agent, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    let big = format!(
        "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let out = exchange(&agent, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    // 99 extra headers (100 in all) are fine.
    let mut ok = String::from("GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n");
    for i in 0..98 {
        ok.push_str(&format!("X-H{i}: v\r\n"));
    }
    ok.push_str("\r\n");
    let out = exchange(&agent, ok.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_connection_errors_total{direction=\"outbound\",reason=\"too-large\"}"
        ),
        2.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn conflicting_content_length_and_transfer_encoding_is_refused() {
    let (b, agent) = setup().await;
    // A classic CL.TE smuggling attempt: a front end trusting Content-Length would forward the second request
    // as part of the body; one trusting chunked would see two requests.
    let raw = b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n";
    let out = exchange(&agent, raw).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("mesh-error: bad-request"), "{out}");
    assert_eq!(
        out.matches("HTTP/1.1").count(),
        1,
        "exactly one response, then the connection is closed: {out}"
    );
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        0,
        "the upstream saw nothing"
    );

    // Two different Content-Length values: hyper's own 400.
    let out = exchange(
        &agent,
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Garbage.
    let out = exchange(&agent, b"\x16\x03\x01 not http\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400") || out.is_empty(), "{out}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);

    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_proxy_errors_total{direction=\"outbound\",error=\"bad-request\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "meshd_connection_errors_total{direction=\"outbound\",reason=\"malformed\"}"
        ) >= 2.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn slow_header_client_is_cut_off() {
    let (b, agent) = setup().await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let start = Instant::now();
    let mut closed = false;
    for byte in head.iter() {
        if s.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        // A read that returns means the server answered or closed.
        let mut buf = [0u8; 512];
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            match r {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    assert!(
                        !text.starts_with("HTTP/1.1 200"),
                        "served a slowloris client: {text}"
                    );
                    closed = true;
                    break;
                }
            }
        }
        if start.elapsed() > Duration::from_secs(40) {
            break;
        }
    }
    assert!(
        closed,
        "a client sending one header byte every 2 s was never cut off"
    );
    assert_timed_out_unserved(b, agent).await;
}

#[tokio::test]
async fn h2_streams_per_connection_are_capped() {
    let (b, agent) = setup().await;
    let send = h2_connect(agent.outbound).await;
    let mut tasks = Vec::new();
    for _ in 0..150 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://svc/slow?ms=500")
                .version(Version::HTTP_2)
                .body(full(""))
                .unwrap();
            send.ready().await.unwrap();
            read(send.send_request(req).await.unwrap()).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), http::StatusCode::OK);
    }
    let max = b.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= 100,
        "more than 100 streams in flight from one connection: {max}"
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 150);
    agent.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed() {
    let (b, agent) = setup().await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a connection that never sends a byte is kept open: {r:?}"
    );
    assert_timed_out_unserved(b, agent).await;
}

#[tokio::test]
async fn stalled_http2_preface_is_cut_off() {
    let (b, agent) = setup().await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    // Half of the HTTP/2 client preface, then nothing.
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a stalled preface is kept open: {r:?}"
    );
    assert_timed_out_unserved(b, agent).await;
}
