//! gRPC through the outbound proxy with a real tonic client and server: unary, bidirectional streaming,
//! trailers carrying a non-OK status, and meshd's own errors as trailers-only responses.

mod common;

use common::*;
use tonic::Code;

fn grpc_service(name: &str, addr: std::net::SocketAddr) -> String {
    format!(
        "[[discovery.static]]\nservice = \"{name}\"\nendpoints = [\"{addr}\"]\nprotocol = \"grpc\"\n"
    )
}

#[tokio::test]
async fn unary_streaming_and_trailers() {
    let b = backend("grpc-1").await;
    let agent = agent(&grpc_service("echo", b.addr)).await;
    let mut client = grpc_client(agent.outbound, "echo").await;

    let reply = grpc_unary(&mut client, GRPC_UNARY, "hi").await.unwrap();
    assert_eq!(reply.message, "hi");
    assert_eq!(reply.backend, "grpc-1");

    // A non-OK status travels in the trailers and reaches the client intact.
    let err = grpc_unary(&mut client, GRPC_FAIL, "x").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such thing");
    assert!(
        err.metadata().get("mesh-error").is_none(),
        "the backend's error is not meshd's"
    );

    // Bidirectional streaming: 100 messages out, 100 back, in order.
    client.ready().await.unwrap();
    let outbound = tokio_stream::iter((0..100).map(|i| EchoRequest {
        message: format!("m{i}"),
    }));
    let resp = client
        .streaming(
            tonic::Request::new(outbound),
            http::uri::PathAndQuery::from_static(GRPC_STREAM),
            tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default(),
        )
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(m.message);
    }
    assert_eq!(got.len(), 100);
    assert_eq!(got[0], "M0");
    assert_eq!(got[99], "M99");
    agent.stop().await;
}

#[tokio::test]
async fn meshd_errors_are_grpc_statuses() {
    let b = backend("grpc-slow").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = format!(
        "{}{}[services.empty]\n[services.slow]\ntimeout = \"200ms\"\n",
        grpc_service("slow", b.addr),
        grpc_service("down", closed)
    );
    let agent = agent(&cfg).await;
    for (service, method, code, mesh_error) in [
        ("nosuch", GRPC_UNARY, Code::Unimplemented, "no-route"),
        ("empty", GRPC_UNARY, Code::Unavailable, "no-endpoints"),
        ("down", GRPC_UNARY, Code::Unavailable, "connect-failed"),
        ("slow", GRPC_SLOW, Code::DeadlineExceeded, "timeout"),
    ] {
        let mut client = grpc_client(agent.outbound, service).await;
        let err = grpc_unary(&mut client, method, "x").await.unwrap_err();
        assert_eq!(err.code(), code, "{service}: {err:?}");
        assert_eq!(
            err.metadata()
                .get("mesh-error")
                .and_then(|v| v.to_str().ok()),
            Some(mesh_error),
            "{service}: {err:?}"
        );
        assert!(!err.message().is_empty());
    }
    agent.stop().await;
}
