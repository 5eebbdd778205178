//! Upstream connections as a production mesh needs them: per-endpoint pools (HTTP/1.1 reuse and idle
//! timeouts, HTTP/2 spread over several connections), GOAWAY, connect timeouts, stale keep-alive
//! connections, and the keep-alive timeout toward apps.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn statics(name: &str, addrs: &[SocketAddr], protocol: &str) -> String {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[discovery.static]]\nservice = \"{name}\"\nendpoints = [{}]\nprotocol = \"{protocol}\"\n",
        eps.join(", ")
    )
}

async fn eventually<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within {within:?}: {what}");
}

/// An address that accepts no connection and refuses none: a listener whose accept queue is full, so the
/// kernel drops further SYNs and a connect hangs (a black-holed host, on loopback).
async fn black_hole() -> (
    SocketAddr,
    Vec<std::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the queue; whatever does not fit hangs, so stop after a short try.
    let mut fill = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(250))
            }),
        )
        .await
        {
            Ok(Ok(Ok(s))) => fill.push(s),
            _ => break,
        }
    }
    (addr, fill, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_h2_requests_to_one_endpoint_all_proceed() {
    // The endpoint allows 100 streams per connection, like many servers.
    let b = backend_with(
        "127.0.0.1:0".parse().unwrap(),
        "wide",
        BackendOptions {
            h2_max_streams: Some(100),
            ..Default::default()
        },
    )
    .await;
    let agent = agent(&statics("wide", &[b.addr], "h2c")).await;
    // 10 client connections × 100 streams (meshd's own per-connection limit).
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let send = h2_connect(agent.outbound).await;
        for _ in 0..100 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get("http://wide/slow?ms=1500")
                    .version(Version::HTTP_2)
                    .body(full(""))
                    .unwrap();
                send.ready().await.unwrap();
                read(send.send_request(req).await.unwrap()).await.status
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 1000);
    assert_eq!(
        b.max_in_flight.load(Ordering::SeqCst),
        1000,
        "every request was in flight at once: none waited for a stream on a full connection"
    );
    let conns = b.connections.load(Ordering::SeqCst);
    assert!(
        (10..=20).contains(&conns),
        "{conns} connections for 1000 streams at 100 each"
    );
    agent.stop().await;
}

#[tokio::test]
async fn goaway_drains_a_connection_and_new_requests_use_a_new_one() {
    let b = backend("g2").await;
    let agent = agent(&statics("g2", &[b.addr], "h2c")).await;
    let first = get(&agent, "g2", "/").await;
    let conn_before = first.header("x-seen-conn").to_string();
    // Five slow requests in flight on that connection, then the backend sends GOAWAY.
    let mut slow = Vec::new();
    for _ in 0..5 {
        let url = agent.url("/slow?ms=800");
        slow.push(tokio::spawn(async move {
            let req = Request::get(url)
                .header("host", "g2")
                .body(full(""))
                .unwrap();
            read(h1_client().request(req).await.unwrap()).await
        }));
    }
    eventually("five in flight", Duration::from_secs(5), || {
        b.max_in_flight.load(Ordering::SeqCst) >= 5
    })
    .await;
    b.faults.goaway();
    // New requests go to a new connection at once (one racing the GOAWAY is refused by the old connection and
    // retried), while the old one finishes its streams.
    for _ in 0..3 {
        let got = get(&agent, "g2", "/").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_ne!(got.header("x-seen-conn"), conn_before);
    }
    for t in slow {
        let got = t.await.unwrap();
        assert_eq!(
            got.status,
            StatusCode::OK,
            "in-flight streams finish after GOAWAY"
        );
        assert_eq!(got.header("x-seen-conn"), conn_before);
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
    agent.stop().await;
}

#[tokio::test]
async fn idle_http1_connections_are_reused_last_in_first_out_and_closed_when_idle() {
    let b = backend("lifo").await;
    let agent = agent(&statics("lifo", &[b.addr], "http")).await;
    // Three at once: three connections.
    let mut burst = Vec::new();
    for ms in [300, 200, 100] {
        let url = agent.url(&format!("/slow?ms={ms}"));
        burst.push(tokio::spawn(async move {
            let req = Request::get(url)
                .header("host", "lifo")
                .body(full(""))
                .unwrap();
            read(h1_client().request(req).await.unwrap()).await
        }));
    }
    let mut conns = Vec::new();
    for t in burst {
        conns.push(t.await.unwrap().header("x-seen-conn").to_string());
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 3);
    // The 300 ms one came back last: sequential requests all take it, the others stay idle.
    let last = conns[0].clone();
    for _ in 0..5 {
        let got = get(&agent, "lifo", "/").await;
        assert_eq!(got.header("x-seen-conn"), last);
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 3);
    // Idle connections close after 4 s (below the 5 s of Node and others).
    eventually("idle connections closed", Duration::from_secs(8), || {
        b.open.load(Ordering::SeqCst) == 0
    })
    .await;
    let m = metrics(&agent).await;
    assert_eq!(
        sample(&m, "meshd_upstream_connections{protocol=\"http1\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "meshd_upstream_connects_total{protocol=\"http1\",result=\"ok\"}"
        ),
        3.0
    );
    agent.stop().await;
}

#[tokio::test]
async fn connections_close_when_the_endpoint_leaves_the_table() {
    let (h1, h2) = (backend("one").await, backend("two").await);
    let agent = agent(&format!(
        "{}{}",
        statics("one", &[h1.addr], "http"),
        statics("two", &[h2.addr], "h2c")
    ))
    .await;
    assert_eq!(get(&agent, "one", "/").await.status, StatusCode::OK);
    assert_eq!(get(&agent, "two", "/").await.status, StatusCode::OK);
    assert_eq!(
        (
            h1.open.load(Ordering::SeqCst),
            h2.open.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    // Discovery withdraws both: their pooled connections close at once, not after an idle timeout.
    agent.routing.update(meshd::routing::Update::SetLocal {
        source: meshd::routing::Source::Static,
        endpoints: vec![],
    });
    eventually("connections closed", Duration::from_secs(2), || {
        h1.open.load(Ordering::SeqCst) == 0 && h2.open.load(Ordering::SeqCst) == 0
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_black_holed_endpoint_is_a_connect_failure_not_a_timeout() {
    let (hole, _fill, _listener) = black_hole().await;
    let good = backend("good").await;
    let agent = agent(&format!(
        "{}[services.web]\nload_balancer = \"round-robin\"\ntimeout = \"5s\"\nconnect_timeout = \"200ms\"\ncircuit_breaker = {{ failures = 3, backoff = {{ min = \"30s\" }} }}\nretry = {{ min_per_second = 100 }}\n",
        statics("web", &[hole, good.addr], "http")
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..6 {
        let started = Instant::now();
        let got = get(&agent, "web", "/").await;
        assert_eq!(got.status, StatusCode::OK, "request {i}: {got:?}");
        assert_eq!(got.header("x-backend"), "good");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a connect attempt took the whole request timeout"
        );
    }
    // Counted by the breaker: three connect timeouts eject the hole.
    assert_eq!(endpoint_view(&agent, "web", hole).await["breaker"], "open");
    let m = metrics(&agent).await;
    assert!(
        sample(
            &m,
            "meshd_upstream_connects_total{protocol=\"http1\",result=\"timeout\"}"
        ) >= 3.0,
        "{m}"
    );
    // With the hole as the only endpoint the answer is 502 connect-failed after the connect timeout.
    let agent2 = common::agent(&format!(
        "{}[services.hole]\ntimeout = \"5s\"\nconnect_timeout = \"200ms\"\nretry = {{ max_attempts = 1 }}\n",
        statics("hole", &[hole], "http")
    ))
    .await;
    let got = get(&agent2, "hole", "/").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::BAD_GATEWAY, "connect-failed"),
        "{got:?}"
    );
    agent.stop().await;
    agent2.stop().await;
}

#[tokio::test]
async fn connects_cut_short_by_the_request_deadline_give_their_slot_back() {
    let (hole, _fill, _listener) = black_hole().await;
    let agent = agent(&format!(
        "{}[services.hole]\ntimeout = \"300ms\"\nconnect_timeout = \"2s\"\nretry = {{ max_attempts = 1 }}\n",
        statics("hole", &[hole], "http")
    ))
    .await;
    for _ in 0..3 {
        let got = get(&agent, "hole", "/").await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    }
    // The connects were abandoned with their requests: none is still counted as an open connection.
    let view = endpoint_view(&agent, "hole", hole).await;
    assert_eq!(view["connections"], 0, "{view}");
    agent.stop().await;
}

#[tokio::test]
async fn a_backend_closing_idle_connections_after_1s_causes_no_failures() {
    let b = backend_with(
        "127.0.0.1:0".parse().unwrap(),
        "node",
        BackendOptions {
            h1_idle_close: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    )
    .await;
    let agent = agent(&format!(
        "{}[services.node]\nretry = {{ max_attempts = 1 }}\n",
        statics("node", &[b.addr], "http")
    ))
    .await;
    // Requests spaced just past the backend's idle close: each finds its pooled connection closed, or
    // closing as it is reused.
    let mut failures = Vec::new();
    for gap_ms in [1000, 1005, 1010, 1020, 1000, 1002, 1030, 1001] {
        // Only requests that are safe to send twice: a GET, and a POST the app marked retryable.
        for (method, headers, body) in [
            ("GET", &[][..], vec![]),
            ("POST", &[("mesh-retryable", "true")][..], b"x".to_vec()),
        ] {
            let got = send(&agent, method, "node", "/", headers, body).await;
            if got.status != StatusCode::OK {
                failures.push((method, gap_ms, got));
            }
        }
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        endpoint_view(&agent, "node", b.addr).await["breaker"],
        "closed"
    );
    agent.stop().await;
}

/// A backend that answers the first request on each connection (keep-alive) and closes the connection, without
/// a byte of response, on the second: what a reused connection looks like when the server closed it just as
/// the request went out.
async fn closes_on_second_request() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                let mut requests = 0;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let body: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if seen.len() < end + 4 + body {
                            break;
                        }
                        seen.drain(..end + 4 + body);
                        requests += 1;
                        if requests == 2 {
                            return; // closed, nothing answered
                        }
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, answered)
}

#[tokio::test]
async fn a_request_on_a_stale_connection_is_sent_again_only_when_safe() {
    let (addr, answered) = closes_on_second_request().await;
    let agent = agent(&format!(
        "{}[services.stale]\nretry = {{ max_attempts = 1 }}\ncircuit_breaker = {{ failures = 1, backoff = {{ min = \"30s\" }} }}\n",
        statics("stale", &[addr], "http")
    ))
    .await;
    // First request opens a connection; the second reuses it, the backend closes it unanswered, and meshd
    // sends the GET again on a fresh connection — even with retries off, and without a breaker failure.
    assert_eq!(get(&agent, "stale", "/1").await.status, StatusCode::OK);
    assert_eq!(get(&agent, "stale", "/2").await.status, StatusCode::OK);
    assert_eq!(answered.load(Ordering::SeqCst), 2);
    let m = metrics(&agent).await;
    assert_eq!(sample(&m, "meshd_upstream_stale_retries_total"), 1.0, "{m}");
    assert_eq!(
        endpoint_view(&agent, "stale", addr).await["breaker"],
        "closed"
    );
    // The same for a POST marked retryable, with its buffered body.
    let got = send(
        &agent,
        "POST",
        "stale",
        "/3",
        &[("mesh-retryable", "true")],
        b"abc".to_vec(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    // A plain POST may have been processed: it is not sent again, and the client hears why. (The pooled
    // connection has answered /3, so /4 is its second request.)
    let got = send(&agent, "POST", "stale", "/4", &[], b"abc".to_vec()).await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::BAD_GATEWAY, "upstream-failed"),
        "{got:?}"
    );
    assert!(
        got.body.contains("closed a kept-alive connection"),
        "{}",
        got.body
    );
    // Still not counted against the endpoint (failures = 1 would have opened the breaker).
    assert_eq!(
        endpoint_view(&agent, "stale", addr).await["breaker"],
        "closed"
    );
    agent.stop().await;
}

#[tokio::test]
async fn app_keep_alive_connections_outlive_the_header_timeout_until_the_idle_timeout() {
    let b = backend("ka").await;
    let cfg = agent_config_with(
        "127.0.0.1",
        "header_timeout = \"1s\"\nidle_timeout = \"3s\"",
        &statics("ka", &[b.addr], "http"),
    );
    let agent = start(meshd::config::Config::from_toml(&cfg).unwrap()).await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    let ask = async |s: &mut TcpStream| -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: ka\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout: still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle past the idle timeout: closed by meshd, not counted as an error.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?}");
    let m = metrics(&agent).await;
    assert!(
        !m.contains("meshd_connection_errors_total{direction=\"outbound\""),
        "{m}"
    );
    agent.stop().await;
}

/// An HTTP/1.1 upstream that answers each request with a scripted response chosen by its path, written in
/// pieces with pauses between them (so meshd reads a head or body in several parts), and closes the connection
/// after the scripts that end with the connection. Counts the connections it accepted.
async fn scripted_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    fn script(path: &str) -> (Vec<&'static [u8]>, bool) {
        match path {
            "/split" => (
                vec![
                    b"HTTP/1.1 200 OK\r\ncontent-le",
                    b"ngth: 10\r\n\r\n01234",
                    b"56789",
                ],
                false,
            ),
            "/head" => (vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"], false),
            "/interim" => (
                vec![
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                ],
                false,
            ),
            "/chunked" => (
                vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5;ext=1\r\nhel",
                    b"lo\r\n6\r\n worl",
                    b"d\r\n0\r\nx-sum: 42\r\n\r\n",
                ],
                false,
            ),
            "/eof" => (vec![b"HTTP/1.1 200 OK\r\n\r\npart1-", b"part2"], true),
            "/reason" => (
                vec![b"HTTP/1.1 299 Fine Thanks\r\ncontent-length: 2\r\n\r\nok"],
                false,
            ),
            "/both" => (
                vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n",
                    b"2\r\nok\r\n0\r\n\r\n",
                ],
                false,
            ),
            "/short" => (
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123"],
                true,
            ),
            _ => (vec![b"HTTP/1.1 200 OK\r\nbad field\r\n\r\n"], true),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_string();
                        seen.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                        let (pieces, close) = script(&path);
                        for (i, piece) in pieces.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(30)).await;
                            }
                            if s.write_all(piece).await.is_err() {
                                return;
                            }
                        }
                        if close {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn http1_responses_are_read_as_framed_and_connections_reused_only_when_whole() {
    let (addr, accepted) = scripted_upstream().await;
    let agent = agent(&format!(
        "{}[services.raw]\nretry = {{ max_attempts = 1 }}\n",
        statics("raw", &[addr], "http")
    ))
    .await;
    let conns = || accepted.load(Ordering::SeqCst);

    // A head and a body in pieces.
    let got = get(&agent, "raw", "/split").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "0123456789")
    );
    // HEAD: a Content-Length but no body; the connection is reused.
    let got = send(&agent, "HEAD", "raw", "/head", &[], Vec::new()).await;
    assert_eq!(
        (got.status, got.header("content-length"), got.body.as_str()),
        (StatusCode::OK, "5", "")
    );
    // 100 and 103 are skipped; the 200 after them is the response.
    let got = get(&agent, "raw", "/interim").await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ok"));
    // Chunked, in pieces, with an extension and a trailer (which the client asked for).
    let raw = exchange(
        agent.outbound,
        b"GET /chunked HTTP/1.1\r\nHost: raw\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = dechunk(&raw);
    assert_eq!(body.0, "hello world", "{raw}");
    assert!(body.1.contains("x-sum: 42"), "{raw}");
    assert_eq!(conns(), 1, "one connection carried all four");

    // A body delimited by the close: whole, and that connection is not reused.
    let got = get(&agent, "raw", "/eof").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "part1-part2")
    );
    let got = get(&agent, "raw", "/split").await;
    assert_eq!(got.body, "0123456789");
    assert_eq!(conns(), 2);

    // Closed four bytes into a ten-byte body: the client gets no more than what came, never a complete-looking
    // response, and the connection is gone.
    let raw = exchange(
        agent.outbound,
        b"GET /short HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    assert!(
        !head.contains(" 200 ") || body.len() < 10,
        "a truncated body passed for a whole one: {raw}"
    );
    let got = get(&agent, "raw", "/split").await;
    assert_eq!(got.body, "0123456789");
    assert_eq!(conns(), 3);

    // A reason phrase of the upstream's own reaches the client.
    let raw = exchange(
        agent.outbound,
        b"GET /reason HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 299 Fine Thanks\r\n"), "{raw}");
    assert_eq!(conns(), 3, "reused");
    // Both Transfer-Encoding and Content-Length: read as chunked, and that connection is not trusted again.
    let got = get(&agent, "raw", "/both").await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ok"));
    let got = get(&agent, "raw", "/split").await;
    assert_eq!(got.body, "0123456789");
    assert_eq!(conns(), 4);

    // A malformed head is the upstream failing: 502.
    let got = get(&agent, "raw", "/malformed").await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::BAD_GATEWAY, "upstream-failed"),
        "{got:?}"
    );
    agent.stop().await;
}

/// The data and the trailer section of a chunked HTTP/1.1 response.
fn dechunk(raw: &str) -> (String, String) {
    let Some((_, mut rest)) = raw.split_once("\r\n\r\n") else {
        return (String::new(), String::new());
    };
    let mut data = String::new();
    loop {
        let Some((line, after)) = rest.split_once("\r\n") else {
            return (data, String::new());
        };
        let size =
            usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            return (data, after.to_string());
        }
        data.push_str(&after[..size.min(after.len())]);
        rest = after.get(size + 2..).unwrap_or("");
    }
}
