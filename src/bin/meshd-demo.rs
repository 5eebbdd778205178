//! `meshd-demo`: the small app of the compose demo (compose/) and the backend the Docker tests run, in one
//! static binary that is the only file in its `FROM scratch` image.
//!
//! ```text
//! meshd-demo [serve] [--name NAME] [--listen 0.0.0.0:8080] [--health ok|fail] [--stop-delay SECS]
//!                    [--delay MS] [--status CODE]
//! meshd-demo front [--listen 0.0.0.0:8080] [--upstream SERVICE] [--proxy http://HOST:PORT]
//! meshd-demo health [--url http://127.0.0.1:8080/healthz]      # exit 0 when it answers 200
//! ```
//!
//! `serve` speaks HTTP/1.1 and h2c (prior knowledge) on one port. `GET /healthz` answers 200 or 503 depending
//! on the health switch, which `POST /health/fail` and `POST /health/ok` flip; every other request answers
//! with the server's name as the body and in `x-backend`: 200, or `--status` (a replica that is up but
//! broken), after `--delay` milliseconds (a slow replica). On SIGTERM it exits, or with `--stop-delay` keeps
//! serving for that many seconds first (like an app draining in-flight work).
//!
//! `front` is the caller: `GET /?calls=N` sends N requests (default 20, four at a time) to
//! `http://SERVICE/` through the local mesh agent (`--proxy`, else `$http_proxy`) and answers with a tally of
//! who answered; `&format=json` gives the same as JSON. Only tokio, hyper, hyper-util, serde_json and gethostname.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage:
  meshd-demo [serve] [--name NAME (default: the host name)] [--listen ADDR] [--health ok|fail] [--stop-delay SECS] [--delay MS] [--status CODE]
  meshd-demo front [--listen ADDR] [--upstream SERVICE] [--proxy http://HOST:PORT]
  meshd-demo health [--url http://127.0.0.1:8080/healthz]";

struct Serve {
    name: String,
    listen: SocketAddr,
    healthy: bool,
    stop_delay: Duration,
    /// How every answer other than /healthz is delayed and with which status.
    behaviour: Behaviour,
}

#[derive(Clone, Copy)]
struct Behaviour {
    delay: Duration,
    status: StatusCode,
}

struct Front {
    listen: SocketAddr,
    upstream: String,
    proxy: String,
}

enum Cmd {
    Serve(Serve),
    Front(Front),
    Health { url: String },
}

fn parse(args: &[String]) -> Result<Cmd, String> {
    let mut it = args.iter().peekable();
    let mode = match it.peek().map(|s| s.as_str()) {
        Some(m @ ("health" | "serve" | "front")) => {
            it.next();
            m
        }
        _ => "serve",
    };
    let mut name = None;
    let mut listen = "0.0.0.0:8080".to_string();
    let mut healthy = true;
    let mut stop_delay = 0u64;
    let mut url = "http://127.0.0.1:8080/healthz".to_string();
    let mut delay = 0u64;
    let mut status = StatusCode::OK;
    let mut upstream = "back".to_string();
    let mut proxy = std::env::var("http_proxy")
        .or_else(|_| std::env::var("HTTP_PROXY"))
        .ok();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--listen" => listen = value()?,
            "--health" => {
                healthy = match value()?.as_str() {
                    "ok" => true,
                    "fail" => false,
                    v => return Err(format!("--health {v:?}: use ok or fail")),
                }
            }
            "--stop-delay" => {
                let v = value()?;
                stop_delay = v
                    .parse()
                    .map_err(|_| format!("--stop-delay {v:?}: whole seconds"))?;
            }
            "--url" => url = value()?,
            "--delay" => {
                let v = value()?;
                delay = v
                    .parse()
                    .map_err(|_| format!("--delay {v:?}: whole milliseconds"))?;
            }
            "--status" => {
                let v = value()?;
                status = v
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("--status {v:?}: an HTTP status code"))?;
            }
            "--upstream" => upstream = value()?,
            "--proxy" => proxy = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen_addr = || {
        listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("--listen {listen:?}: not an IP:port"))
    };
    match mode {
        "health" => return Ok(Cmd::Health { url }),
        "front" => {
            let proxy = proxy.ok_or("--proxy or $http_proxy is required: the local mesh agent")?;
            return Ok(Cmd::Front(Front {
                listen: listen_addr()?,
                upstream,
                proxy: proxy_authority(&proxy)?,
            }));
        }
        _ => {}
    }
    Ok(Cmd::Serve(Serve {
        // Without --name, the host name: a Swarm service sets it per task with a template.
        name: match name {
            Some(n) => n,
            None => gethostname::gethostname()
                .into_string()
                .map_err(|_| "--name is required (the host name is not UTF-8)")?,
        },
        listen: listen
            .parse()
            .map_err(|_| format!("--listen {listen:?}: not an IP:port"))?,
        healthy,
        stop_delay: Duration::from_secs(stop_delay),
        behaviour: Behaviour {
            delay: Duration::from_millis(delay),
            status,
        },
    }))
}

/// `http://agent-a:4140` or `agent-a:4140` → `agent-a:4140`.
fn proxy_authority(proxy: &str) -> Result<String, String> {
    let rest = proxy.strip_prefix("http://").unwrap_or(proxy);
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        return Err(format!("proxy {proxy:?}: use http://HOST:PORT"));
    }
    Ok(authority.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd-demo: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cmd {
            Cmd::Health { url } => match check(&url).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            },
            Cmd::Front(f) => match front(f).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshd-demo: {e}");
                    ExitCode::FAILURE
                }
            },
            Cmd::Serve(s) => match serve(s).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshd-demo: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

async fn serve(s: Serve) -> std::io::Result<()> {
    let listener = TcpListener::bind(s.listen).await?;
    println!("{} listening on {}", s.name, listener.local_addr()?);
    let healthy = Arc::new(AtomicBool::new(s.healthy));
    let name: Arc<str> = Arc::from(s.name.as_str());
    let behaviour = s.behaviour;
    // A task, so it keeps accepting while a stop delay runs.
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, healthy) = (name.clone(), healthy.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(name.clone(), healthy.clone(), behaviour, req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    tokio::select! {
        _ = accept => Ok(()),
        _ = terminated() => {
            if !s.stop_delay.is_zero() {
                println!("{}: stopping in {:?}", s.name, s.stop_delay);
                // Keep serving while "draining", as a real app would.
                let _ = tokio::time::timeout(s.stop_delay, std::future::pending::<()>()).await;
            }
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT (as PID 1 in a container nothing else would stop us).
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn handle(
    name: Arc<str>,
    healthy: Arc<AtomicBool>,
    behaviour: Behaviour,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
            r.headers_mut().insert("x-backend", v);
        }
        r
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // Drain the request body so keep-alive connections stay usable.
    let _ = req.into_body().collect().await;
    Ok(match (method, path.as_str()) {
        (_, "/healthz") => {
            if healthy.load(Ordering::SeqCst) {
                reply(StatusCode::OK, "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "failing\n".into())
            }
        }
        (Method::POST, "/health/fail") => {
            healthy.store(false, Ordering::SeqCst);
            reply(StatusCode::OK, "health: fail\n".into())
        }
        (Method::POST, "/health/ok") => {
            healthy.store(true, Ordering::SeqCst);
            reply(StatusCode::OK, "health: ok\n".into())
        }
        _ => {
            if !behaviour.delay.is_zero() {
                tokio::time::sleep(behaviour.delay).await;
            }
            reply(behaviour.status, name.to_string())
        }
    })
}

/// One HTTP/1.1 GET to `url` (`http://IP:PORT/path` only); Ok when the status is 200.
async fn check(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| format!("{authority:?}: use IP:PORT"))?;
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let status_line = String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if status_line.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(status_line)
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// How many requests one `GET /` of the front may ask for.
const MAX_CALLS: usize = 1000;
/// Requests in flight at once.
const WORKERS: usize = 4;

async fn front(f: Front) -> std::io::Result<()> {
    let listener = TcpListener::bind(f.listen).await?;
    println!(
        "front listening on {}: GET /?calls=N calls http://{}/ through {}",
        listener.local_addr()?,
        f.upstream,
        f.proxy
    );
    let f = Arc::new(f);
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| front_request(f.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = accept => Ok(()),
        _ = terminated() => Ok(()),
    }
}

async fn front_request(
    f: Arc<Front>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n".into()));
    }
    let mut calls = 20usize;
    let mut json = false;
    for pair in req.uri().query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("calls", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_CALLS).contains(&n) => calls = n,
                _ => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        format!("calls={v:?}: a number from 1 to {MAX_CALLS}\n"),
                    ));
                }
            },
            Some(("format", "json")) => json = true,
            _ => {}
        }
    }
    let tally = call_many(&f, calls).await;
    Ok(if json {
        let mut r = text(StatusCode::OK, tally.json(&f));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        text(StatusCode::OK, tally.text(&f))
    })
}

/// Who answered: per replica (its `x-backend`) the count and latencies, and failures by status and
/// `mesh-error`.
#[derive(Default)]
struct Tally {
    calls: usize,
    replicas: std::collections::BTreeMap<String, Vec<Duration>>,
    errors: std::collections::BTreeMap<String, usize>,
}

impl Tally {
    fn ok(&self) -> usize {
        self.replicas.values().map(Vec::len).sum()
    }

    fn text(&self, f: &Front) -> String {
        let mut out = format!(
            "{} calls to http://{}/ through {}: {} answered 200\n",
            self.calls,
            f.upstream,
            f.proxy,
            self.ok()
        );
        for (name, times) in &self.replicas {
            out.push_str(&format!(
                "  {name:<24} {:>4}   p50 {:>6.1} ms\n",
                times.len(),
                median_ms(times)
            ));
        }
        for (what, n) in &self.errors {
            out.push_str(&format!("  {what:<24} {n:>4}\n"));
        }
        out
    }

    fn json(&self, f: &Front) -> String {
        let replicas: serde_json::Map<String, serde_json::Value> = self
            .replicas
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::json!({ "count": v.len(), "p50_ms": median_ms(v) }),
                )
            })
            .collect();
        let v = serde_json::json!({
            "upstream": f.upstream,
            "proxy": f.proxy,
            "calls": self.calls,
            "ok": self.ok(),
            "replicas": replicas,
            "errors": self.errors,
        });
        format!("{v}\n")
    }
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// `calls` GETs of `http://UPSTREAM/` through the proxy, `WORKERS` at a time on kept-alive connections.
async fn call_many(f: &Front, calls: usize) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS.min(calls) {
        let (next, proxy, upstream) = (next.clone(), f.proxy.clone(), f.upstream.clone());
        workers.spawn(async move {
            let mut mine = Vec::new();
            let mut conn = None;
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let started = std::time::Instant::now();
                let outcome = call_once(&mut conn, &proxy, &upstream).await;
                mine.push((outcome, started.elapsed()));
            }
            mine
        });
    }
    let mut tally = Tally {
        calls,
        ..Tally::default()
    };
    while let Some(done) = workers.join_next().await {
        for (outcome, took) in done.unwrap_or_default() {
            match outcome {
                Ok(replica) => tally.replicas.entry(replica).or_default().push(took),
                Err(what) => *tally.errors.entry(what).or_default() += 1,
            }
        }
    }
    tally
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One GET through the proxy, in absolute form as `http_proxy` clients send it: the replica that answered 200,
/// or what went wrong ("503 no-endpoints", "connect: ...").
async fn call_once(conn: &mut Option<Conn>, proxy: &str, upstream: &str) -> Result<String, String> {
    let attempt = async {
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            let stream = TcpStream::connect(proxy)
                .await
                .map_err(|e| format!("connect {proxy}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (send, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(driver);
            *conn = Some(send);
        }
        let Some(send) = conn.as_mut() else {
            return Err("no connection".to_string());
        };
        let req = Request::get(format!("http://{upstream}/"))
            .header(hyper::header::HOST, upstream)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        let resp = send.send_request(req).await.map_err(|e| {
            if e.is_canceled() {
                "connection closed".to_string()
            } else {
                e.to_string()
            }
        })?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (backend, mesh_error) = (header("x-backend"), header("mesh-error"));
        let _ = resp.into_body().collect().await;
        match (status, backend, mesh_error) {
            (StatusCode::OK, Some(b), _) => Ok(b),
            (s, _, Some(e)) => Err(format!("{} {e}", s.as_u16())),
            (s, Some(b), None) => Err(format!("{} from {b}", s.as_u16())),
            (s, None, None) => Err(format!("{}", s.as_u16())),
        }
    };
    let r = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r,
        Err(_) => Err("timed out".to_string()),
    };
    if r.is_err() {
        // A fresh connection for the next call: this one may be in an unknown state.
        *conn = None;
    }
    r
}
