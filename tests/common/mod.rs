//! Test support: real backends (HTTP/1.1 + h2c on one port, and gRPC through tonic), agents started in-process
//! on loopback port 0, and HTTP clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshd::config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

// ---------------------------------------------------------------------------------------------------------
// gRPC messages (hand-written prost types: no protoc needed).
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub backend: String,
}

pub const GRPC_UNARY: &str = "/test.Echo/Unary";
pub const GRPC_STREAM: &str = "/test.Echo/Stream";
pub const GRPC_FAIL: &str = "/test.Echo/Fail";
pub const GRPC_SLOW: &str = "/test.Echo/Slow";
pub const GRPC_UNAVAILABLE: &str = "/test.Echo/Unavailable";

// ---------------------------------------------------------------------------------------------------------
// Backend.
// ---------------------------------------------------------------------------------------------------------

/// A real HTTP backend on 127.0.0.1:0 speaking HTTP/1.1, h2c (prior knowledge) and gRPC on one port.
///
/// Routes: `/echo` streams the request body back; `/slow?ms=N` answers after N ms; `/status/N` answers N;
/// the gRPC methods above; anything else answers 200 with the backend's name. Every response carries
/// `x-backend` and `x-seen-*` headers describing the request as the backend saw it.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    /// `METHOD /path` of every request received, in order.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// Most requests ever in flight at once.
    pub max_in_flight: Arc<AtomicUsize>,
    /// Misbehaviour the test can switch on and off while the backend runs.
    pub faults: Arc<BackendFaults>,
    stop: Option<oneshot::Sender<()>>,
}

/// How a backend misbehaves (all off by default).
#[derive(Debug)]
pub struct BackendFaults {
    /// Non-zero: every request is answered with this status.
    pub status: std::sync::atomic::AtomicU16,
    /// Non-zero N: every Nth request (by arrival) is answered 503.
    pub fail_every: AtomicUsize,
    /// Delay before every answer, in milliseconds.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Bumped to make every open connection shut down gracefully (HTTP/2: GOAWAY, in-flight streams finish).
    pub goaway: tokio::sync::watch::Sender<u64>,
}

impl Default for BackendFaults {
    fn default() -> Self {
        BackendFaults {
            status: Default::default(),
            fail_every: Default::default(),
            delay_ms: Default::default(),
            goaway: tokio::sync::watch::channel(0).0,
        }
    }
}

/// How a backend serves its connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendOptions {
    /// HTTP/2 `MAX_CONCURRENT_STREAMS` it announces (hyper's default otherwise).
    pub h2_max_streams: Option<u32>,
    /// Closes HTTP/1.1 keep-alive connections idle this long (like Node's 5 s `keepAliveTimeout`).
    pub h1_idle_close: Option<Duration>,
}

impl BackendFaults {
    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
    /// Every open connection shuts down gracefully; new ones are still accepted.
    pub fn goaway(&self) {
        self.goaway.send_modify(|g| *g += 1);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn backend(name: &str) -> Backend {
    backend_on("127.0.0.1:0".parse().unwrap(), name).await
}

pub async fn backend_on(addr: SocketAddr, name: &str) -> Backend {
    backend_with(addr, name, BackendOptions::default()).await
}

pub async fn backend_with(addr: SocketAddr, name: &str, opts: BackendOptions) -> Backend {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(BackendFaults::default());
    let fl = faults.clone();
    let (tx, mut rx) = oneshot::channel();
    let (n, r, c, o, sn) = (
        name.to_string(),
        requests.clone(),
        connections.clone(),
        open.clone(),
        seen.clone(),
    );
    let (mx, inf) = (max_in_flight.clone(), in_flight.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut rx => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let conn_id = c.fetch_add(1, Ordering::SeqCst) + 1;
            o.fetch_add(1, Ordering::SeqCst);
            let (n, r, mx, inf, fl, o, sn) = (
                n.clone(),
                r.clone(),
                mx.clone(),
                inf.clone(),
                fl.clone(),
                o.clone(),
                sn.clone(),
            );
            let mut goaway = fl.goaway.subscribe();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    sn.lock()
                        .unwrap()
                        .push(format!("{} {}", req.method(), req.uri().path()));
                    let seq = r.fetch_add(1, Ordering::SeqCst) + 1;
                    let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                    mx.fetch_max(now, Ordering::SeqCst);
                    let (n, inf, fl) = (n.clone(), inf.clone(), fl.clone());
                    async move {
                        let delay = fl.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let every = fl.fail_every.load(Ordering::SeqCst);
                        let status = match fl.status.load(Ordering::SeqCst) {
                            0 if every > 0 && seq % every == 0 => 503,
                            s => s,
                        };
                        let resp = if status != 0 {
                            let mut r = Response::new(full(format!("{n} fails with {status}")));
                            *r.status_mut() = StatusCode::from_u16(status).unwrap();
                            r.headers_mut()
                                .insert("x-backend", http::HeaderValue::from_str(&n).unwrap());
                            Ok(r)
                        } else {
                            handle(n, req).await
                        };
                        inf.fetch_sub(1, Ordering::SeqCst);
                        resp.map(|mut r| {
                            r.headers_mut()
                                .insert("x-seen-conn", http::HeaderValue::from(conn_id));
                            r
                        })
                    }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // Above meshd's own limit, so meshd's limit is what the tests see.
                builder.http1().max_headers(200);
                if let Some(idle) = opts.h1_idle_close {
                    // hyper's header timer also runs while a kept-alive connection waits: an idle close.
                    builder
                        .http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(idle);
                }
                if let Some(n) = opts.h2_max_streams {
                    builder.http2().max_concurrent_streams(n);
                }
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let mut conn = std::pin::pin!(conn);
                goaway.borrow_and_update();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = goaway.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Backend {
        addr,
        name: name.to_string(),
        requests,
        connections,
        open,
        seen,
        max_in_flight,
        faults,
        stop: Some(tx),
    }
}

async fn handle(name: String, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let seen: Vec<(String, String)> = {
        let h = req.headers();
        let get = |k: &str| {
            h.get_all(k)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            ("x-backend".into(), name.clone()),
            ("x-seen-version".into(), format!("{:?}", req.version())),
            ("x-seen-host".into(), get("host")),
            (
                "x-seen-authority".into(),
                req.uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            (
                "x-seen-path".into(),
                req.uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            ),
            ("x-seen-mesh-service".into(), get("mesh-service")),
            ("x-seen-mesh-endpoint".into(), get("mesh-endpoint")),
            ("x-seen-mesh-orig-proto".into(), get("mesh-orig-proto")),
            ("x-seen-request-id".into(), get("mesh-request-id")),
            ("x-seen-xff".into(), get("x-forwarded-for")),
            ("x-seen-connection".into(), get("connection")),
            ("x-seen-x-hop".into(), get("x-hop")),
            ("x-seen-keep-alive".into(), get("keep-alive")),
            ("x-seen-te".into(), get("te")),
            ("x-seen-expect".into(), get("expect")),
            ("x-seen-mesh-deadline".into(), get("mesh-deadline")),
            ("x-seen-grpc-timeout".into(), get("grpc-timeout")),
            ("x-seen-trailer".into(), get("trailer")),
            ("x-seen-upgrade".into(), get("upgrade")),
            ("x-seen-traceparent".into(), get("traceparent")),
            ("x-seen-b3".into(), get("b3")),
            ("x-seen-x-b3-traceid".into(), get("x-b3-traceid")),
            ("x-seen-x-b3-spanid".into(), get("x-b3-spanid")),
            (
                "x-seen-cookie".into(),
                h.get_all("cookie")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
        ]
    };
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let mut resp = match path.as_str() {
        GRPC_UNARY | GRPC_STREAM | GRPC_FAIL | GRPC_SLOW | GRPC_UNAVAILABLE => {
            grpc(name.clone(), req).await
        }
        "/echo" => {
            // What the request announced as trailers, the echo announces too (HTTP/1.1 needs it to send them).
            let announced = req.headers().get("trailer").cloned();
            let mut r = Response::new(
                req.into_body()
                    .map_err(|e| Box::new(e) as BoxError)
                    .boxed_unsync(),
            );
            if let Some(t) = announced {
                r.headers_mut().insert("trailer", t);
            }
            r
        }
        // Reads the whole body before answering: its length and trailers, or 400 if it broke.
        "/collect" => match req.into_body().collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let len = collected.to_bytes().len();
                let mut text = format!("len={len}");
                for (k, v) in &trailers {
                    text.push_str(&format!("; {k}={}", v.to_str().unwrap_or("?")));
                }
                Response::new(full(text))
            }
            Err(e) => {
                let mut r = Response::new(full(format!("body error: {e}")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        },
        // A body with a trailer, announced in `Trailer`.
        "/with-trailers" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
            let frames: Vec<Result<hyper::body::Frame<Bytes>, BoxError>> = vec![
                Ok(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            let mut r = Response::new(
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
            );
            r.headers_mut()
                .insert("trailer", http::HeaderValue::from_static("x-checksum"));
            r
        }
        "/ws" => websocket(name.clone(), req),
        "/slow" => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(format!("slow {name}")))
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let mut r = Response::new(full(format!("status {code}")));
            *r.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        _ => Response::new(full(name.clone())),
    };
    for (k, v) in seen {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    // A hop-by-hop header the proxy must strip from responses.
    resp.headers_mut()
        .insert("keep-alive", http::HeaderValue::from_static("timeout=99"));
    Ok(resp)
}

/// A WebSocket echo server (tokio-tungstenite): text is echoed upper-cased, `"who"` answers the backend's
/// name, binary is echoed as is.
fn websocket(name: String, mut req: Request<Incoming>) -> Response<TestBody> {
    use tokio_tungstenite::tungstenite::Message;
    let key = req.headers().get("sec-websocket-key").cloned();
    let (Some(key), true) = (
        key,
        req.headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket")),
    ) else {
        let mut r = Response::new(full("not a websocket handshake"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) if t.as_str() == "who" => Message::text(name.clone()),
                Message::Text(t) => Message::text(t.to_uppercase()),
                Message::Binary(b) => Message::binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if futures_util::SinkExt::send(&mut ws, reply).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    h.insert("connection", http::HeaderValue::from_static("upgrade"));
    h.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&accept).unwrap(),
    );
    r
}

async fn grpc(name: String, req: Request<Incoming>) -> Response<TestBody> {
    use tonic::{Status, Streaming};
    let codec = tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default();
    let mut server = tonic::server::Grpc::new(codec);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        GRPC_UNARY => {
            let svc = tower::service_fn(move |r: tonic::Request<EchoRequest>| {
                let name = name.clone();
                async move {
                    Ok::<_, Status>(tonic::Response::new(EchoReply {
                        message: r.into_inner().message,
                        backend: name,
                    }))
                }
            });
            server.unary(svc, req).await
        }
        GRPC_SLOW => {
            let svc = tower::service_fn(move |r: tonic::Request<EchoRequest>| {
                let name = name.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<_, Status>(tonic::Response::new(EchoReply {
                        message: r.into_inner().message,
                        backend: name,
                    }))
                }
            });
            server.unary(svc, req).await
        }
        GRPC_FAIL => {
            let svc = tower::service_fn(move |_r: tonic::Request<EchoRequest>| async move {
                Err::<tonic::Response<EchoReply>, _>(Status::not_found("no such thing"))
            });
            server.unary(svc, req).await
        }
        GRPC_UNAVAILABLE => {
            let svc = tower::service_fn(move |_r: tonic::Request<EchoRequest>| async move {
                Err::<tonic::Response<EchoReply>, _>(Status::unavailable("backend overloaded"))
            });
            server.unary(svc, req).await
        }
        _ => {
            let svc = tower::service_fn(move |r: tonic::Request<Streaming<EchoRequest>>| {
                let name = name.clone();
                async move {
                    type Out =
                        Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, Status>> + Send>>;
                    // The message "unavailable" ends the stream with UNAVAILABLE in the trailers.
                    let out: Out = Box::pin(r.into_inner().map(move |m| {
                        m.and_then(|m| {
                            if m.message == "unavailable" {
                                Err(Status::unavailable("stream failed"))
                            } else {
                                Ok(EchoReply {
                                    message: m.message.to_uppercase(),
                                    backend: name.clone(),
                                })
                            }
                        })
                    }));
                    Ok::<_, Status>(tonic::Response::new(out))
                }
            });
            server.streaming(svc, req).await
        }
    };
    resp.map(|b| b.map_err(|s| Box::new(s) as BoxError).boxed_unsync())
}

// ---------------------------------------------------------------------------------------------------------
// Agents.
// ---------------------------------------------------------------------------------------------------------

/// An agent running in this process on loopback port 0.
pub struct Agent {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The gossip socket (`[gossip]`).
    pub gossip: Option<SocketAddr>,
    pub routing: meshd::routing::RoutingHandle,
    pub table: tokio::sync::watch::Receiver<Arc<meshd::routing::Table>>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Agent {
    /// Starts the graceful shutdown (returns at once).
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.outbound, path)
    }
}

/// Config text for a test agent: loopback port-0 listeners, plus `extra` TOML appended.
pub fn agent_config(ip: &str, extra: &str) -> String {
    agent_config_with(ip, "", extra)
}

/// As [`agent_config`], with `outbound` keys added to the `[outbound]` table.
pub fn agent_config_with(ip: &str, outbound: &str, extra: &str) -> String {
    format!(
        "[node]\nname = \"node-{ip}\"\ndrain_timeout = \"5s\"\n[outbound]\nlisten = [\"{ip}:0\"]\n{outbound}\n[inbound]\nlisten = \"{ip}:0\"\ninsecure_plaintext = true\n[admin]\nlisten = \"{ip}:0\"\n{extra}"
    )
}

pub async fn agent(extra: &str) -> Agent {
    agent_at("127.0.0.1", extra).await
}

pub async fn agent_at(ip: &str, extra: &str) -> Agent {
    let cfg = Config::from_toml(&agent_config(ip, extra)).unwrap_or_else(|e| panic!("{e}"));
    start(cfg).await
}

pub async fn start(cfg: Config) -> Agent {
    start_bound(meshd::app::build(cfg).await.unwrap()).await
}

/// Starts an agent whose config comes from `path` (so reloads re-read it).
pub async fn start_from_file(path: &std::path::Path) -> Agent {
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"));
    start_bound(
        meshd::app::build(cfg)
            .await
            .unwrap()
            .with_config_path(path.to_path_buf()),
    )
    .await
}

async fn start_bound(bound: meshd::app::Bound) -> Agent {
    let (tx, rx) = oneshot::channel::<()>();
    let agent = Agent {
        outbound: bound.outbound[0],
        inbound: bound.inbound,
        admin: bound.admin,
        gossip: bound.gossip,
        routing: bound.routing.clone(),
        table: bound.table.clone(),
        stop: Some(tx),
        task: None,
    };
    let task = tokio::spawn(bound.run(async move {
        let _ = rx.await;
    }));
    let agent = Agent {
        task: Some(task),
        ..agent
    };
    wait_ready(agent.admin).await;
    agent
}

/// Polls `/ready` until it answers 200.
pub async fn wait_ready(admin: SocketAddr) {
    let client = h1_client();
    for _ in 0..200 {
        let req = Request::get(format!("http://{admin}/ready"))
            .body(full(""))
            .unwrap();
        if let Ok(r) = client.request(req).await
            && r.status() == StatusCode::OK
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("agent at {admin} never became ready");
}

// ---------------------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------------------

pub fn h1_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, k: &str) -> &str {
        self.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A request through the outbound listener with `Host: host` and extra headers, over HTTP/1.1.
pub async fn send(
    agent: &Agent,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(agent.url(path))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(
        h1_client()
            .request(req.body(full(body)).unwrap())
            .await
            .unwrap(),
    )
    .await
}

/// POSTs to an admin endpoint.
pub async fn admin_post(agent: &Agent, path: &str) -> Got {
    let req = Request::post(format!("http://{}{path}", agent.admin))
        .body(full(""))
        .unwrap();
    read(h1_client().request(req).await.unwrap()).await
}

/// GETs an admin endpoint as JSON.
pub async fn admin_json(agent: &Agent, path: &str) -> serde_json::Value {
    let req = Request::get(format!("http://{}{path}", agent.admin))
        .body(full(""))
        .unwrap();
    let got = read(h1_client().request(req).await.unwrap()).await;
    serde_json::from_str(&got.body).unwrap_or_else(|e| panic!("{e}: {}", got.body))
}

/// An endpoint's entry in `/v1/services`.
pub async fn endpoint_view(agent: &Agent, service: &str, addr: SocketAddr) -> serde_json::Value {
    let v = admin_json(agent, "/v1/services").await;
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| {
            s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == addr.to_string())
                .cloned()
        })
        .unwrap_or_else(|| panic!("{service} {addr} not in {v}"))
}

/// Writes `raw` on a new connection and reads until the server closes (or 10 s pass).
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `GET path` on a kept-alive connection and reads one response head and its `content-length` body.
pub async fn keepalive_get(s: &mut TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// GET `path` through the outbound listener with `Host: host` over HTTP/1.1.
pub async fn get(agent: &Agent, host: &str, path: &str) -> Got {
    let req = Request::get(agent.url(path))
        .header("host", host)
        .body(full(""))
        .unwrap();
    read(h1_client().request(req).await.unwrap()).await
}

/// An HTTP/2 (prior knowledge) connection to `addr`, driven in the background.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A tonic gRPC client that dials `addr` but names `service` as its authority.
pub async fn grpc_client(
    addr: SocketAddr,
    service: &str,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

pub async fn grpc_unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    message: &str,
) -> Result<EchoReply, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    client
        .unary(
            tonic::Request::new(EchoRequest {
                message: message.into(),
            }),
            http::uri::PathAndQuery::from_static(method),
            codec,
        )
        .await
        .map(|r| r.into_inner())
}

/// Scrapes the agent's metrics.
pub async fn metrics(agent: &Agent) -> String {
    let req = Request::get(format!("http://{}/metrics", agent.admin))
        .body(full(""))
        .unwrap();
    read(h1_client().request(req).await.unwrap()).await.body
}

/// The value of one sample line of a scrape (0 when absent).
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Tells `a` that `node`, whose inbound port is `inbound`, owns each of `services` at `addr` (what gossip will
/// do), and waits until the table routes them.
pub async fn learn_remote(
    a: &Agent,
    node: &str,
    inbound: SocketAddr,
    services: &[&str],
    addr: SocketAddr,
) {
    use meshd::routing::{DEFAULT_WEIGHT, EndpointSpec, Update};
    let mut table = a.table.clone();
    a.routing.update(Update::SetRemote {
        node: node.into(),
        inbound,
        endpoints: services
            .iter()
            .map(|s| EndpointSpec {
                service: (*s).into(),
                addr,
                protocol: meshd::config::Protocol::Http,
                weight: DEFAULT_WEIGHT,
            })
            .collect(),
    });
    table
        .wait_for(|t| {
            services
                .iter()
                .all(|s| t.service(s).is_some_and(|s| !s.endpoints.is_empty()))
        })
        .await
        .unwrap();
}

/// Writes a mesh CA for trust domain `mesh.test` to `dir/ca.crt` and, for each node, `dir/<node>.crt` and
/// `.key`, made by meshd's own PKI code.
pub fn pki(dir: &std::path::Path, nodes: &[&str]) {
    use meshd::tls::identity::TrustDomain;
    use meshd::tls::pki::LoadedCa;
    std::fs::create_dir_all(dir).unwrap();
    let ca = LoadedCa::generate(&TrustDomain::parse("mesh.test").unwrap(), 30).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    for node in nodes {
        let host = ca.issue(node, 30, &[], &[]).unwrap();
        std::fs::write(dir.join(format!("{node}.crt")), host.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{node}.key")), host.key_pem).unwrap();
    }
}

/// TLS handshakes the agent has completed toward peers, full and resumed.
pub async fn outbound_handshakes(agent: &Agent) -> f64 {
    let m = metrics(agent).await;
    sample(
        &m,
        "meshd_tls_handshakes_total{direction=\"outbound\",kind=\"full\"}",
    ) + sample(
        &m,
        "meshd_tls_handshakes_total{direction=\"outbound\",kind=\"resumed\"}",
    )
}

/// Writes a gossip keyring file (one key per line, mode 0600).
pub fn write_keys(path: &std::path::Path, lines: &[&str]) {
    std::fs::write(path, format!("{}\n", lines.join("\n"))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Config for node `node-<ip>`: mutual TLS from `dir`, gossip on `<ip>:0` with `seeds`, plus `extra`.
pub fn gossip_config(ip: &str, dir: &std::path::Path, seeds: &[SocketAddr], extra: &str) -> String {
    let node = format!("node-{ip}");
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    agent_config(
        ip,
        &format!(
            "{extra}\n[tls]\ntrust_domain = \"mesh.test\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [gossip]\nlisten = \"{ip}:0\"\nseeds = [{seeds}]\nkeyring = \"{keys}\"\njoin_timeout = \"10s\"\n",
            ca = dir.join("ca.crt").display(),
            cert = dir.join(format!("{node}.crt")).display(),
            key = dir.join(format!("{node}.key")).display(),
            keys = dir.join("gossip.keys").display(),
            seeds = seeds.join(", "),
        ),
    )
    .replace("insecure_plaintext = true", "insecure_plaintext = false")
}
