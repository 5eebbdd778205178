//! Two agents in one process: endpoints owned by another node are reached through that node's inbound
//! listener, in the protocol the endpoint speaks; the inbound side forwards only to its own endpoints.

mod common;

use std::net::SocketAddr;

use common::*;
use http::{Request, StatusCode, Version};
use meshd::config::Protocol;
use meshd::routing::{DEFAULT_WEIGHT, EndpointSpec, Update};

struct Pair {
    a: Agent,
    b: Agent,
}

/// Agent B owns `service` at `addr`; agent A learns it through the routing API, as gossip will feed it.
async fn pair(service: &str, addr: SocketAddr, protocol: &str) -> Pair {
    let b = agent_at(
        "127.0.0.3",
        &format!("[[discovery.static]]\nservice = \"{service}\"\nendpoints = [\"{addr}\"]\nprotocol = \"{protocol}\"\n"),
    )
    .await;
    let a = agent_at("127.0.0.2", "").await;
    let mut table = a.table.clone();
    a.routing.update(Update::SetRemote {
        node: "node-b".into(),
        inbound: b.inbound,
        endpoints: vec![EndpointSpec {
            service: service.into(),
            addr,
            protocol: Protocol::parse(protocol).unwrap(),
            weight: DEFAULT_WEIGHT,
        }],
    });
    table
        .wait_for(|t| t.service(service).is_some())
        .await
        .unwrap();
    Pair { a, b }
}

#[tokio::test]
async fn http1_through_two_agents() {
    let backend = backend("far-h1").await;
    let p = pair("far", backend.addr, "http").await;
    let got = get(&p.a, "far", "/via").await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-backend"), "far-h1");
    assert_eq!(
        got.header("x-seen-version"),
        "HTTP/1.1",
        "B restores HTTP/1.1 toward the container"
    );
    assert_eq!(
        got.header("x-seen-mesh-endpoint"),
        "",
        "mesh-endpoint stops at the receiving agent"
    );
    assert_eq!(got.header("x-seen-mesh-orig-proto"), "");
    assert_eq!(got.header("x-seen-mesh-service"), "far");
    assert_eq!(got.header("x-seen-host"), "far");
    // XFF: the app as A saw it, then agent A as B saw it.
    let xff: Vec<&str> = got.header("x-seen-xff").split(", ").collect();
    assert_eq!(xff.len(), 2, "{xff:?}");
    assert_eq!(xff[0], "127.0.0.1");

    let ma = metrics(&p.a).await;
    let mb = metrics(&p.b).await;
    assert_eq!(
        sample(
            &ma,
            "meshd_requests_total{direction=\"outbound\",service=\"far\",status_class=\"2xx\"}"
        ),
        1.0,
        "{ma}"
    );
    assert_eq!(
        sample(
            &mb,
            "meshd_requests_total{direction=\"inbound\",service=\"far\",status_class=\"2xx\"}"
        ),
        1.0,
        "{mb}"
    );
    p.a.stop().await;
    p.b.stop().await;
}

#[tokio::test]
async fn h2_through_two_agents() {
    let backend = backend("far-h2").await;
    let p = pair("far2", backend.addr, "h2c").await;
    let mut send = h2_connect(p.a.outbound).await;
    let req = Request::get("http://far2/h2")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let got = read(send.send_request(req).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-backend"), "far-h2");
    assert_eq!(got.header("x-seen-version"), "HTTP/2.0");
    p.a.stop().await;
    p.b.stop().await;
}

#[tokio::test]
async fn grpc_through_two_agents() {
    let backend = backend("far-grpc").await;
    let p = pair("fargrpc", backend.addr, "grpc").await;
    let mut client = grpc_client(p.a.outbound, "fargrpc").await;
    let reply = grpc_unary(&mut client, GRPC_UNARY, "over two hops")
        .await
        .unwrap();
    assert_eq!(reply.message, "over two hops");
    assert_eq!(reply.backend, "far-grpc");
    let err = grpc_unary(&mut client, GRPC_FAIL, "x").await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "trailers survive both hops: {err:?}"
    );
    p.a.stop().await;
    p.b.stop().await;
}

/// Sends an h2 request straight to an agent's inbound listener.
async fn to_inbound(inbound: SocketAddr, headers: &[(&str, String)]) -> Got {
    let mut send = h2_connect(inbound).await;
    let mut req = Request::get(format!("http://{inbound}/x")).version(Version::HTTP_2);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    read(
        send.send_request(req.body(full("")).unwrap())
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn inbound_forwards_only_to_its_own_endpoints() {
    let backend = backend("local").await;
    let other = common::backend("not-listed").await;
    let b = agent_at(
        "127.0.0.4",
        &format!(
            "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
            backend.addr
        ),
    )
    .await;
    let good = [
        ("mesh-service", "svc".to_string()),
        ("mesh-endpoint", backend.addr.to_string()),
        ("mesh-orig-proto", "HTTP/1.1".to_string()),
    ];
    let got = to_inbound(b.inbound, &good).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-backend"), "local");

    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![good[0].clone(), good[2].clone()],
        // An address this node's discovery does not list: the inbound port is not an open proxy.
        vec![
            good[0].clone(),
            ("mesh-endpoint", other.addr.to_string()),
            good[2].clone(),
        ],
        // A listed address under another service name.
        vec![
            ("mesh-service", "other".to_string()),
            good[1].clone(),
            good[2].clone(),
        ],
    ];
    for headers in &cases {
        let got = to_inbound(b.inbound, headers).await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(got.header("mesh-error"), "forbidden");
    }
    assert_eq!(other.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    // mesh-orig-proto is advisory: this node speaks the protocol its own discovery lists (HTTP/1.1 here),
    // whatever the peer says, or when it says nothing.
    for proto in [Some("HTTP/2"), Some("SPDY/3"), None] {
        let mut headers = vec![good[0].clone(), good[1].clone()];
        if let Some(p) = proto {
            headers.push(("mesh-orig-proto", p.to_string()));
        }
        let got = to_inbound(b.inbound, &headers).await;
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        assert_eq!(got.header("x-seen-version"), "HTTP/1.1", "{proto:?}");
    }

    // HTTP/1.1 on the inbound port is not served at all.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(b.inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    let m = metrics(&b).await;
    assert_eq!(
        sample(
            &m,
            "meshd_proxy_errors_total{direction=\"inbound\",error=\"forbidden\"}"
        ),
        cases.len() as f64,
        "{m}"
    );
    b.stop().await;
}

#[tokio::test]
async fn inbound_refuses_everything_without_the_plaintext_opt_in() {
    let backend = backend("local").await;
    let cfg = agent_config(
        "127.0.0.6",
        &format!(
            "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
            backend.addr
        ),
    )
    .replace("insecure_plaintext = true", "insecure_plaintext = false");
    let b = start(meshd::config::Config::from_toml(&cfg).unwrap()).await;
    let got = to_inbound(
        b.inbound,
        &[
            ("mesh-service", "svc".to_string()),
            ("mesh-endpoint", backend.addr.to_string()),
            ("mesh-orig-proto", "HTTP/1.1".to_string()),
        ],
    )
    .await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(got.body.contains("mutual TLS"), "{}", got.body);
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    b.stop().await;
}
