//! Client connections over their life: the header timeout of a kept-alive connection's next head, the idle
//! timeout after a request longer than it (HTTP/1 and HTTP/2), and graceful drain of idle HTTP/1 and HTTP/2
//! connections and of a busy HTTP/2 one (lifecycle.rs drains a busy HTTP/1 one). Each runs on a
//! current-thread and a two-worker runtime: the connection driver reads events its own connection raised
//! without a wake-up, and events from other tasks with one.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cfg(outbound: &str, backend: std::net::SocketAddr) -> meshd::config::Config {
    let text = agent_config_with(
        "127.0.0.1",
        outbound,
        &format!("[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{backend}\"]\n"),
    );
    meshd::config::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"))
}

async fn second_head_is_cut_off() {
    let b = backend("svc").await;
    let agent = start(cfg(
        "header_timeout = \"1s\"\nidle_timeout = \"60s\"",
        b.addr,
    ))
    .await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    assert!(keepalive_get(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Half of the next head, then nothing: held to the 1 s header timeout, not the 60 s idle timeout.
    s.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
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

#[tokio::test]
async fn second_head_on_keep_alive_is_cut_off_ct() {
    second_head_is_cut_off().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_head_on_keep_alive_is_cut_off_mt() {
    second_head_is_cut_off().await
}

async fn idle_after_long_request() {
    let b = backend("svc").await;
    let agent = start(cfg(
        "header_timeout = \"1s\"\nidle_timeout = \"1s\"",
        b.addr,
    ))
    .await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    // Longer than the idle timeout: any timer armed before it has fired by the time it ends.
    assert!(
        keepalive_get(&mut s, "/slow?ms=2500")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let m = metrics(&agent).await;
    assert!(
        !m.contains("meshd_connection_errors_total{direction=\"outbound\""),
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn idle_timeout_after_a_request_longer_than_it_ct() {
    idle_after_long_request().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_after_a_request_longer_than_it_mt() {
    idle_after_long_request().await
}

async fn h2_idle() {
    let b = backend("svc").await;
    let agent = start(cfg(
        "header_timeout = \"1s\"\nidle_timeout = \"1s\"",
        b.addr,
    ))
    .await;
    let mut send = h2_connect(agent.outbound).await;
    let req = Request::get("http://svc/slow?ms=2500")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    assert_eq!(
        read(send.send_request(req).await.unwrap()).await.status,
        StatusCode::OK
    );
    let started = Instant::now();
    while !send.is_closed() {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "h2 connection not closed at the idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    agent.stop().await;
}

#[tokio::test]
async fn h2_idle_timeout_ct() {
    h2_idle().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_idle_timeout_mt() {
    h2_idle().await
}

async fn h2_drain() {
    let b = backend("svc").await;
    let mut agent = start(cfg("", b.addr)).await;
    let mut send = h2_connect(agent.outbound).await;
    let req = Request::get("http://svc/slow?ms=1000")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let fut = send.send_request(req);
    let slow = tokio::spawn(async move { read(fut.await.unwrap()).await });
    while b.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    agent.shutdown();
    let got = slow.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    // Told to go away (GOAWAY): the connection closes once its stream is done, well before the 5 s drain deadline.
    drained(
        &mut agent,
        "the agent finished draining before the drain deadline",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    h2_closed(&send, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn h2_graceful_drain_ct() {
    h2_drain().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_graceful_drain_mt() {
    h2_drain().await
}

async fn h1_idle_drain() {
    let b = backend("svc").await;
    let mut agent = start(cfg("", b.addr)).await;
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    assert!(keepalive_get(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    agent.shutdown();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drained(&mut agent, "drained before the deadline").await;
}

#[tokio::test]
async fn h1_idle_keep_alive_closes_at_once_on_shutdown_ct() {
    h1_idle_drain().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_idle_keep_alive_closes_at_once_on_shutdown_mt() {
    h1_idle_drain().await
}

async fn h2_idle_drain() {
    let b = backend("svc").await;
    let mut agent = start(cfg("", b.addr)).await;
    let mut send = h2_connect(agent.outbound).await;
    let req = Request::get("http://svc/")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    assert_eq!(
        read(send.send_request(req).await.unwrap()).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    agent.shutdown();
    drained(
        &mut agent,
        "an idle h2 connection was told to go away at once, not dropped at the drain deadline",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    h2_closed(&send, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn h2_idle_connection_closes_at_once_on_shutdown_ct() {
    h2_idle_drain().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_idle_connection_closes_at_once_on_shutdown_mt() {
    h2_idle_drain().await
}

/// Waits for the agent's task to end, well before its 5 s drain deadline.
async fn drained(agent: &mut Agent, why: &str) {
    let task = agent.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect(why)
        .unwrap()
        .unwrap();
}

/// Waits at most `within` for the client's HTTP/2 connection to be closed.
async fn h2_closed(send: &hyper::client::conn::http2::SendRequest<TestBody>, within: Duration) {
    let deadline = Instant::now() + within;
    while !send.is_closed() {
        assert!(Instant::now() < deadline, "client connection still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
