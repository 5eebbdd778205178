//! HTTP semantics across the proxy: which authority each hop sees, trailers and cookies through protocol
//! conversions, deadlines (`mesh-deadline`, `grpc-timeout`), the client's own faults, and WebSocket upgrades.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn statics(name: &str, addrs: &[std::net::SocketAddr], protocol: &str) -> String {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[discovery.static]]\nservice = \"{name}\"\nendpoints = [{}]\nprotocol = \"{protocol}\"\n",
        eps.join(", ")
    )
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn every_hop_sees_the_routed_authority() {
    let b = backend("web").await;
    let agent = agent(&format!(
        "{}{}",
        statics("web", &[b.addr], "http"),
        statics("grpcish", &[b.addr], "h2c")
    ))
    .await;
    // Absolute form: the URI's authority replaces the client's Host (RFC 9112 §3.2.2).
    let out = exchange(
        agent.outbound,
        b"GET http://web/x HTTP/1.1\r\nHost: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(header(&out, "x-seen-host"), Some("web"));
    // Toward an h2c endpoint, :authority is the service authority the app used, not the endpoint's address.
    let got = get(&agent, "grpcish.mesh:8080", "/y").await;
    assert_eq!(got.header("x-seen-version"), "HTTP/2.0");
    assert_eq!(got.header("x-seen-authority"), "grpcish.mesh:8080");
    assert_eq!(got.header("x-seen-host"), "", "no second, disagreeing Host");
    // h2 client → HTTP/1.1 endpoint: Host from :authority.
    let mut h2 = h2_connect(agent.outbound).await;
    let req = Request::get("http://web.mesh/z")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let got = read(h2.send_request(req).await.unwrap()).await;
    assert_eq!(got.header("x-seen-host"), "web.mesh");
    assert_eq!(b.requests.load(Ordering::SeqCst), 3);
    agent.stop().await;
}

#[tokio::test]
async fn ambiguous_or_unsafe_authorities_get_400() {
    let b = backend("web").await;
    let agent = agent(&statics("web", &[b.addr], "http")).await;
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: web\r\nHost: web\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil@web\r\nConnection: close\r\n\r\n",
        b"GET http://evil@web/ HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        b"GET https://web/ HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    ] {
        let out = exchange(agent.outbound, raw).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{}\n{out}",
            String::from_utf8_lossy(raw)
        );
        assert_eq!(header(&out, "mesh-error"), Some("bad-request"), "{out}");
    }
    // An h2 request whose Host names another authority than :authority.
    let mut h2 = h2_connect(agent.outbound).await;
    let req = Request::get("http://web/")
        .version(Version::HTTP_2)
        .header("host", "evil")
        .body(full(""))
        .unwrap();
    let got = read(h2.send_request(req).await.unwrap()).await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::BAD_REQUEST, "bad-request")
    );
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        0,
        "none reached the upstream"
    );
    agent.stop().await;
}

/// Sends a chunked HTTP/1.1 request with a trailer on a raw connection; returns the raw response.
async fn chunked_with_trailer(agent: &Agent, host: &str, path: &str) -> String {
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\nTE: trailers\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n"
    );
    exchange(agent.outbound, raw.as_bytes()).await
}

#[tokio::test]
async fn trailers_pass_through_http1_and_across_protocols() {
    let b = backend("t").await;
    let agent = agent(&format!(
        "{}{}",
        statics("t1", &[b.addr], "http"),
        statics("t2", &[b.addr], "h2c")
    ))
    .await;
    for svc in ["t1", "t2"] {
        // Request trailers reach the upstream (HTTP/1.1 → HTTP/1.1, and HTTP/1.1 → h2c).
        let out = chunked_with_trailer(&agent, svc, "/collect").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{svc}: {out}");
        assert!(out.contains("len=5; x-checksum=abc123"), "{svc}: {out}");
        // Response trailers reach an HTTP/1.1 client that asked for them.
        let out = exchange(
            agent.outbound,
            format!("GET /with-trailers HTTP/1.1\r\nHost: {svc}\r\nTE: trailers\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{svc}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("0\r\nx-checksum: abc123\r\n"),
            "{svc}: {out}"
        );
    }
    // h2 client → HTTP/1.1 upstream and back: trailers both ways.
    let mut h2 = h2_connect(agent.outbound).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("http://t1/collect")
        .version(Version::HTTP_2)
        .header("trailer", "x-checksum")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        .unwrap();
    let got = read(h2.send_request(req).await.unwrap()).await;
    assert_eq!(got.body, "len=5; x-checksum=abc123");
    let req = Request::get("http://t1/with-trailers")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(
        collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .unwrap(),
        "abc123"
    );
    agent.stop().await;
}

#[tokio::test]
async fn trailers_cross_two_agents() {
    let backend = backend("far").await;
    let b = agent_at("127.0.0.6", &statics("far", &[backend.addr], "http")).await;
    let a = agent_at("127.0.0.7", "[services.far]\n").await;
    a.routing.update(meshd::routing::Update::SetRemote {
        node: "node-b".into(),
        inbound: b.inbound,
        endpoints: vec![meshd::routing::EndpointSpec {
            service: "far".into(),
            addr: backend.addr,
            protocol: meshd::config::Protocol::Http,
            weight: 100,
        }],
    });
    let mut table = a.table.clone();
    table
        .wait_for(|t| t.service("far").is_some_and(|s| !s.endpoints.is_empty()))
        .await
        .unwrap();
    let out = chunked_with_trailer(&a, "far", "/collect").await;
    assert!(out.contains("len=5; x-checksum=abc123"), "{out}");
    let out = exchange(
        a.outbound,
        b"GET /with-trailers HTTP/1.1\r\nHost: far\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.to_ascii_lowercase()
            .contains("0\r\nx-checksum: abc123\r\n"),
        "{out}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn h2_cookie_crumbs_are_joined_for_http1() {
    let b = backend("c").await;
    let agent = agent(&format!(
        "{}{}",
        statics("c1", &[b.addr], "http"),
        statics("c2", &[b.addr], "h2c")
    ))
    .await;
    let mut h2 = h2_connect(agent.outbound).await;
    for (svc, want) in [("c1", "a=1; b=2; c=3"), ("c2", "a=1 | b=2 | c=3")] {
        let req = Request::get(format!("http://{svc}/"))
            .version(Version::HTTP_2)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
            .body(full(""))
            .unwrap();
        let got = read(h2.send_request(req).await.unwrap()).await;
        assert_eq!(got.header("x-seen-cookie"), want, "{svc}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn grpc_timeout_is_honoured_and_forwarded_decremented() {
    let b = backend("g").await;
    let agent = agent(&format!(
        "{}[services.g]\ntimeout = \"10s\"\n",
        statics("g", &[b.addr], "grpc")
    ))
    .await;
    // A 300 ms grpc-timeout against a 5 s wait: DEADLINE_EXCEEDED from meshd, well inside the 10 s timeout.
    let mut h2 = h2_connect(agent.outbound).await;
    let req = Request::post("http://g/slow?ms=5000")
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "300m")
        .body(full(""))
        .unwrap();
    let started = std::time::Instant::now();
    let got = read(h2.send_request(req).await.unwrap()).await;
    assert_eq!(got.header("grpc-status"), "4", "{got:?}");
    assert_eq!(got.header("mesh-error"), "timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    // The upstream sees what is left, in grpc-timeout form, never more than the caller gave.
    let req = Request::post("http://g/anything")
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "2S")
        .body(full(""))
        .unwrap();
    let got = read(h2.send_request(req).await.unwrap()).await;
    let seen = got.header("x-seen-grpc-timeout");
    let ms: u64 = seen
        .strip_suffix('m')
        .unwrap_or_else(|| panic!("{seen:?}"))
        .parse()
        .unwrap();
    assert!(ms <= 2000 && ms > 1000, "{seen}");
    agent.stop().await;
}

#[tokio::test]
async fn the_deadline_crosses_agents_as_a_relative_budget() {
    let backend = backend("far").await;
    let b = agent_at("127.0.0.8", &statics("far", &[backend.addr], "http")).await;
    let a = agent_at("127.0.0.9", "[services.far]\ntimeout = \"3s\"\n").await;
    a.routing.update(meshd::routing::Update::SetRemote {
        node: "node-b".into(),
        inbound: b.inbound,
        endpoints: vec![meshd::routing::EndpointSpec {
            service: "far".into(),
            addr: backend.addr,
            protocol: meshd::config::Protocol::Http,
            weight: 100,
        }],
    });
    let mut table = a.table.clone();
    table
        .wait_for(|t| t.service("far").is_some_and(|s| !s.endpoints.is_empty()))
        .await
        .unwrap();
    // What the peer agent receives: a relative budget, not a wall-clock time.
    let mut seen_by_b = h2_connect(b.inbound).await;
    let req = Request::get("http://far/")
        .version(Version::HTTP_2)
        .header("mesh-service", "far")
        .header("mesh-endpoint", backend.addr.to_string())
        .header("mesh-deadline", "400ms")
        .body(full(""))
        .unwrap();
    let got = read(seen_by_b.send_request(req).await.unwrap()).await;
    let at: u128 = got.header("x-seen-mesh-deadline").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(
        at > now && at <= now + 400,
        "the container sees an absolute deadline inside the 400 ms budget"
    );
    // End to end through both agents: the app's 3 s timeout bounds the container's deadline.
    let got = get(&a, "far", "/").await;
    let at: u128 = got.header("x-seen-mesh-deadline").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(at > now + 2000 && at <= now + 3000, "{at} vs {now}");
    a.stop().await;
    b.stop().await;
}

/// Requests whose bodies break on the client's side: malformed chunks, an oversized chunk extension, an upload
/// cut off, h2 streams reset mid-upload. Each is the client's fault: a 400 or a closed connection.
async fn client_faults(agent: &Agent, host: &str) {
    let head =
        format!("POST /collect HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let cases = [
        // A malformed chunk size after a good chunk.
        format!("{head}5\r\nhello\r\nzz\r\n"),
        // A chunk extension far beyond hyper's limit.
        format!("{head}5;{}\r\nhello\r\n", "x".repeat(64 * 1024)),
        // An upload cut off mid-body.
        format!("{head}100\r\nonly a few bytes"),
    ];
    for (i, raw) in cases.iter().enumerate() {
        for _ in 0..2 {
            let mut s = TcpStream::connect(agent.outbound).await.unwrap();
            s.write_all(raw.as_bytes()).await.unwrap();
            if i == 2 {
                // The client goes away mid-upload.
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(s);
                continue;
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            let out = String::from_utf8_lossy(&out);
            assert!(
                out.is_empty() || out.starts_with("HTTP/1.1 400"),
                "case {i}: {out}"
            );
            // The status line and mesh-error, not a substring search (a random request id can contain "502").
            assert!(
                !out.contains("mesh-error: upstream-failed") && !out.starts_with("HTTP/1.1 502"),
                "case {i}: {out}"
            );
        }
    }
    // h2 clients that reset their stream mid-upload.
    for _ in 0..2 {
        let mut h2 = h2_connect(agent.outbound).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let req = Request::post(format!("http://{host}/collect"))
            .version(Version::HTTP_2)
            .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync())
            .unwrap();
        let fut = tokio::spawn(async move { h2.send_request(req).await });
        tx.send(Ok(Frame::data(Bytes::from_static(b"partial"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Dropping the request future resets the stream.
        fut.abort();
        let _ = tx.send(Err("client gave up".into())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The endpoint was never blamed: its breaker is closed, it serves everyone else, and no upstream failure was
/// counted on any agent the requests crossed.
async fn not_blamed(agents: &[&Agent], service: &str, addr: std::net::SocketAddr) {
    assert_eq!(
        endpoint_view(agents[0], service, addr).await["breaker"],
        "closed"
    );
    let got = get(agents[0], service, "/").await;
    assert_eq!(got.status, StatusCode::OK);
    for agent in agents {
        let m = metrics(agent).await;
        for direction in ["outbound", "inbound"] {
            assert_eq!(
                sample(
                    &m,
                    &format!(
                        "meshd_proxy_errors_total{{direction=\"{direction}\",error=\"upstream-failed\"}}"
                    )
                ),
                0.0,
                "{m}"
            );
        }
    }
    let m = metrics(agents[0]).await;
    assert!(
        sample(
            &m,
            "meshd_proxy_errors_total{direction=\"outbound\",error=\"bad-request\"}"
        ) >= 2.0,
        "{m}"
    );
}

const STRICT_BREAKER: &str = "circuit_breaker = { failures = 3, backoff = { min = \"30s\" } }";

#[tokio::test]
async fn the_clients_faults_are_the_clients() {
    for protocol in ["http", "h2c"] {
        let b = backend("victim").await;
        let agent = agent(&format!(
            "{}[services.victim]\n{STRICT_BREAKER}\n",
            statics("victim", &[b.addr], protocol)
        ))
        .await;
        client_faults(&agent, "victim").await;
        not_blamed(&[&agent], "victim", b.addr).await;
        agent.stop().await;
    }
}

#[tokio::test]
async fn the_clients_faults_are_the_clients_across_two_agents() {
    let backend = backend("victim").await;
    let b = agent_at(
        "127.0.0.10",
        &format!(
            "{}[services.victim]\n{STRICT_BREAKER}\n",
            statics("victim", &[backend.addr], "http")
        ),
    )
    .await;
    let a = agent_at(
        "127.0.0.11",
        &format!("[services.victim]\n{STRICT_BREAKER}\n"),
    )
    .await;
    a.routing.update(meshd::routing::Update::SetRemote {
        node: "node-b".into(),
        inbound: b.inbound,
        endpoints: vec![meshd::routing::EndpointSpec {
            service: "victim".into(),
            addr: backend.addr,
            protocol: meshd::config::Protocol::Http,
            weight: 100,
        }],
    });
    let mut table = a.table.clone();
    table
        .wait_for(|t| t.service("victim").is_some_and(|s| !s.endpoints.is_empty()))
        .await
        .unwrap();
    client_faults(&a, "victim").await;
    not_blamed(&[&a, &b], "victim", backend.addr).await;
    assert_eq!(
        endpoint_view(&b, "victim", backend.addr).await["breaker"],
        "closed"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_deadline() {
    let b = backend("slowbody").await;
    let agent = agent(&format!(
        "{}[services.slowbody]\ntimeout = \"2s\"\n",
        statics("slowbody", &[b.addr], "http")
    ))
    .await;
    // Declares 60 KB (small enough to be held for a retry) and sends a byte a second.
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    s.write_all(b"PUT /collect HTTP/1.1\r\nHost: slowbody\r\nContent-Length: 60000\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if s.write_all(b"x").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(header(&out, "mesh-error"), Some("timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held past the deadline"
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    agent.stop().await;
}

async fn ws_connect(
    outbound: std::net::SocketAddr,
    host: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(outbound).await.unwrap();
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{host}/ws"),
    )
    .unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn ws_roundtrip(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    text: &str,
) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn websocket_to_a_local_endpoint() {
    let b = backend("ws").await;
    let agent = agent(&statics("ws", &[b.addr], "http")).await;
    let mut ws = ws_connect(agent.outbound, "ws").await;
    assert_eq!(ws_roundtrip(&mut ws, "hello").await, "HELLO");
    assert_eq!(ws_roundtrip(&mut ws, "who").await, "ws");
    // Bytes both ways, many times, on the one upgraded connection.
    let blob = vec![7u8; 200_000];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(b.len(), blob.len()),
        other => panic!("{other:?}"),
    }
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_upgrades_total{direction=\"outbound\",result=\"upgraded\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "meshd_upgraded_connections{direction=\"outbound\"}"),
        1.0,
        "{m}"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    // A declined upgrade is an ordinary response.
    let out = exchange(
        agent.outbound,
        b"GET /status/404 HTTP/1.1\r\nHost: ws\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    for _ in 0..100 {
        if sample(
            &metrics(&agent).await,
            "meshd_upgraded_connections{direction=\"outbound\"}",
        ) == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = metrics(&agent).await;
    assert_eq!(
        sample(&m, "meshd_upgraded_connections{direction=\"outbound\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "meshd_upgrades_total{direction=\"outbound\",result=\"declined\"}"
        ),
        1.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn websocket_across_two_agents() {
    let backend = backend("farws").await;
    let b = agent_at("127.0.0.10", &statics("farws", &[backend.addr], "http")).await;
    let a = agent_at("127.0.0.11", "[services.farws]\n").await;
    a.routing.update(meshd::routing::Update::SetRemote {
        node: "node-b".into(),
        inbound: b.inbound,
        endpoints: vec![meshd::routing::EndpointSpec {
            service: "farws".into(),
            addr: backend.addr,
            protocol: meshd::config::Protocol::Http,
            weight: 100,
        }],
    });
    let mut table = a.table.clone();
    table
        .wait_for(|t| t.service("farws").is_some_and(|s| !s.endpoints.is_empty()))
        .await
        .unwrap();
    let mut ws = ws_connect(a.outbound, "farws").await;
    assert_eq!(
        ws_roundtrip(&mut ws, "over two hops").await,
        "OVER TWO HOPS"
    );
    assert_eq!(ws_roundtrip(&mut ws, "who").await, "farws");
    let m = metrics(&b).await;
    assert_eq!(
        sample(
            &m,
            "meshd_upgrades_total{direction=\"inbound\",result=\"upgraded\"}"
        ),
        1.0,
        "{m}"
    );
    drop(ws);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn idle_websockets_are_closed_and_open_ones_drain_on_shutdown() {
    let b = backend("ws").await;
    let cfg = agent_config_with(
        "127.0.0.1",
        "upgrade_idle_timeout = \"1s\"",
        &statics("ws", &[b.addr], "http"),
    );
    let mut agent = start(meshd::config::Config::from_toml(&cfg).unwrap()).await;
    let mut idle = ws_connect(agent.outbound, "ws").await;
    assert_eq!(ws_roundtrip(&mut idle, "a").await, "A");
    match tokio::time::timeout(Duration::from_secs(5), idle.next()).await {
        Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {}
        other => panic!("an idle WebSocket stayed open: {other:?}"),
    }
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_upgraded_connection_ends_total{direction=\"outbound\",reason=\"idle\"}"
        ),
        1.0,
        "{m}"
    );
    // A busy one carries on through the drain, and is closed at the drain deadline (5 s in tests).
    let mut busy = ws_connect(agent.outbound, "ws").await;
    agent.shutdown();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(ws_roundtrip(&mut busy, "still here").await, "STILL HERE");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(answered >= 5);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if busy.send(Message::text("x")).await.is_err() {
                return;
            }
            match busy.next().await {
                Some(Ok(Message::Text(_))) => tokio::time::sleep(Duration::from_millis(300)).await,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "closed at the drain deadline");
    if let Some(t) = agent.task.take() {
        t.await.unwrap().unwrap();
    }
}
