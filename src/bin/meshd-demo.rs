//! `meshd-demo`: the small app of the compose demo (compose/) and the backend the Docker tests run, in one
//! static binary that is the only file in its `FROM scratch` image.
//!
//! ```text
//! meshd-demo [serve] [--name NAME] [--listen 0.0.0.0:8080] [--health ok|fail] [--stop-delay SECS]
//!                    [--delay MS] [--status CODE] [--call SERVICE [--proxy http://HOST:PORT]]
//! meshd-demo front [--listen 0.0.0.0:8080] [--upstream SERVICE] [--proxy http://HOST:PORT]
//! meshd-demo collector [--listen 0.0.0.0:9411]
//! meshd-demo health [--url http://127.0.0.1:8080/healthz]      # exit 0 when it answers 200
//! ```
//!
//! `serve` speaks HTTP/1.1 and h2c (prior knowledge) on one port. `GET /healthz` answers 200 or 503 depending
//! on the health switch, which `POST /health/fail` and `POST /health/ok` flip; every other request answers
//! with the server's name as the body and in `x-backend`: 200, or `--status` (a replica that is up but
//! broken), after `--delay` milliseconds (a slow replica). On SIGTERM it exits, or with `--stop-delay` keeps
//! serving for that many seconds first (like an app draining in-flight work). With `--call SERVICE` it is the
//! middle of a chain: each such request first calls `http://SERVICE/` through the local mesh agent (`--proxy`,
//! else `$http_proxy`) with the request's trace headers copied on, and answers with the chain it saw
//! (`mid@node-c > back-2@node-b`, or `mid@node-c > 503 no-endpoints` with status 502).
//!
//! `front` is the caller: `GET /?calls=N` sends N requests (default 20, four at a time) to
//! `http://SERVICE/` through the local mesh agent (`--proxy`, else `$http_proxy`) and answers with a tally of
//! who answered; `&upstream=SERVICE` calls another service than `--upstream`, `&format=json` gives the tally as
//! JSON. The caller's trace headers (W3C `traceparent`/`tracestate`, B3 `X-B3-*` and `b3`) go on every call, so
//! the calls are part of the caller's trace; without them the agent starts a new trace per call.
//!
//! `collector` is a tiny Zipkin v2 receiver for the demo's agents: `POST /api/v2/spans` keeps the last 10,000
//! spans in memory, `GET /traces?limit=N&min_ms=MS` prints the newest traces as trees (one line per span),
//! `GET /api/v2/trace/{traceId}` gives one trace's spans as Zipkin JSON. Only tokio, hyper, hyper-util, serde,
//! serde_json, time and gethostname.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage:
  meshd-demo [serve] [--name NAME (default: the host name)] [--listen ADDR] [--health ok|fail] [--stop-delay SECS] [--delay MS] [--status CODE] [--call SERVICE] [--proxy http://HOST:PORT]
  meshd-demo front [--listen ADDR] [--upstream SERVICE] [--proxy http://HOST:PORT]
  meshd-demo collector [--listen ADDR (default 0.0.0.0:9411)]
  meshd-demo health [--url http://127.0.0.1:8080/healthz]";

struct Serve {
    name: String,
    listen: SocketAddr,
    healthy: bool,
    stop_delay: Duration,
    /// How every answer other than /healthz is delayed and with which status.
    behaviour: Behaviour,
    /// `--call`: the service each answer first calls, and through which agent.
    call: Option<Call>,
}

/// A downstream call of `serve --call`.
struct Call {
    service: String,
    /// The local agent's `host:port`.
    proxy: String,
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
    Collector { listen: SocketAddr },
    Health { url: String },
}

fn parse(args: &[String]) -> Result<Cmd, String> {
    let mut it = args.iter().peekable();
    let mode = match it.peek().map(|s| s.as_str()) {
        Some(m @ ("health" | "serve" | "front" | "collector")) => {
            it.next();
            m
        }
        _ => "serve",
    };
    let mut name = None;
    let mut listen = None;
    let mut healthy = true;
    let mut stop_delay = 0u64;
    let mut url = "http://127.0.0.1:8080/healthz".to_string();
    let mut delay = 0u64;
    let mut status = StatusCode::OK;
    let mut upstream = "back".to_string();
    let mut call = None;
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
            "--listen" => listen = Some(value()?),
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
            "--upstream" => upstream = service_name(&value()?)?,
            "--call" => call = Some(service_name(&value()?)?),
            "--proxy" => proxy = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let default_listen = if mode == "collector" {
        "0.0.0.0:9411"
    } else {
        "0.0.0.0:8080"
    };
    let listen = listen.as_deref().unwrap_or(default_listen);
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("--listen {listen:?}: not an IP:port"))?;
    let agent = || -> Result<String, String> {
        let proxy = proxy
            .as_deref()
            .ok_or("--proxy or $http_proxy is required: the local mesh agent")?;
        proxy_authority(proxy)
    };
    match mode {
        "health" => return Ok(Cmd::Health { url }),
        "collector" => return Ok(Cmd::Collector { listen }),
        "front" => {
            return Ok(Cmd::Front(Front {
                listen,
                upstream,
                proxy: agent()?,
            }));
        }
        _ => {}
    }
    let call = match call {
        Some(service) => Some(Call {
            service,
            proxy: agent()?,
        }),
        None => None,
    };
    Ok(Cmd::Serve(Serve {
        // Without --name, the host name: a Swarm service sets it per task with a template.
        name: match name {
            Some(n) => n,
            None => gethostname::gethostname()
                .into_string()
                .map_err(|_| "--name is required (the host name is not UTF-8)")?,
        },
        listen,
        healthy,
        stop_delay: Duration::from_secs(stop_delay),
        behaviour: Behaviour {
            delay: Duration::from_millis(delay),
            status,
        },
        call,
    }))
}

/// A service name as apps put it in a URL (`back`, `back-stable.mesh`): letters, digits, `-`, `_`, `.`.
fn service_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?}: a service name (letters, digits, '-', '_', '.')"
        ))
    }
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
            Cmd::Collector { listen } => match collector(listen).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshd-demo: {e}");
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
    let call = s.call.map(Arc::new);
    // A task, so it keeps accepting while a stop delay runs.
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, healthy, call) = (name.clone(), healthy.clone(), call.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(name.clone(), healthy.clone(), behaviour, call.clone(), req)
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

async fn handle<B: hyper::body::Body>(
    name: Arc<str>,
    healthy: Arc<AtomicBool>,
    behaviour: Behaviour,
    call: Option<Arc<Call>>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // The body and `x-backend`: this server's name, or with --call the chain behind it.
    let answer = |status: StatusCode, backend: &str| {
        let mut r = Response::new(Full::new(Bytes::from(backend.to_string())));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(backend) {
            r.headers_mut().insert("x-backend", v);
        }
        r
    };
    let reply = |status: StatusCode, body: String| {
        let mut r = answer(status, &name);
        *r.body_mut() = Full::new(Bytes::from(body));
        r
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let trace = match call {
        Some(_) => trace_headers(req.headers()),
        None => hyper::HeaderMap::new(),
    };
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
            // With --call, the downstream first (one fresh connection: the demo's rates need no pool).
            let (status, backend) = match &call {
                None => (behaviour.status, name.to_string()),
                Some(c) => match call_once(&mut None, &c.proxy, &c.service, &trace).await {
                    Ok(chain) => (behaviour.status, format!("{name} > {chain}")),
                    Err(what) => (StatusCode::BAD_GATEWAY, format!("{name} > {what}")),
                },
            };
            if !behaviour.delay.is_zero() {
                tokio::time::sleep(behaviour.delay).await;
            }
            answer(status, &backend)
        }
    })
}

/// The trace context headers an app passes on from the request it serves to the requests it makes for it:
/// W3C and both B3 forms (the agent reads whichever came and writes the next hop's context in that format).
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];

/// The trace headers of `headers`, to copy onto outgoing calls.
fn trace_headers(headers: &hyper::HeaderMap) -> hyper::HeaderMap {
    let mut out = hyper::HeaderMap::new();
    for name in TRACE_HEADERS {
        for value in headers.get_all(name) {
            out.append(name, value.clone());
        }
    }
    out
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
    serve_until_terminated(listener, move |req| front_request(f.clone(), req)).await;
    Ok(())
}

/// Serves HTTP/1.1 and h2c on `listener`, each request answered by `handler`, until SIGTERM or SIGINT.
async fn serve_until_terminated<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(handler.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = terminated() => {}
    }
}

async fn front_request<B>(
    f: Arc<Front>,
    req: Request<B>,
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
    let mut upstream = f.upstream.clone();
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
            Some(("upstream", v)) => match service_name(v) {
                Ok(name) => upstream = name,
                Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("upstream={e}\n"))),
            },
            Some(("format", "json")) => json = true,
            _ => {}
        }
    }
    let trace = trace_headers(req.headers());
    let tally = call_many(&f.proxy, &upstream, calls, &trace).await;
    Ok(if json {
        let mut r = text(StatusCode::OK, tally.json(&f.proxy));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        text(StatusCode::OK, tally.text(&f.proxy))
    })
}

/// Who answered: per replica (its `x-backend`) the count and latencies, and failures by status and
/// `mesh-error`.
#[derive(Default)]
struct Tally {
    upstream: String,
    calls: usize,
    replicas: BTreeMap<String, Vec<Duration>>,
    errors: BTreeMap<String, usize>,
}

impl Tally {
    fn ok(&self) -> usize {
        self.replicas.values().map(Vec::len).sum()
    }

    fn text(&self, proxy: &str) -> String {
        let mut out = format!(
            "{} calls to http://{}/ through {}: {} answered 200\n",
            self.calls,
            self.upstream,
            proxy,
            self.ok()
        );
        // Chains (`mid@node-c > back-1@node-a`) are longer than replica names.
        let width = self
            .replicas
            .keys()
            .chain(self.errors.keys())
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(24);
        for (name, times) in &self.replicas {
            out.push_str(&format!(
                "  {name:<width$} {:>4}   p50 {:>6.1} ms\n",
                times.len(),
                median_ms(times)
            ));
        }
        for (what, n) in &self.errors {
            out.push_str(&format!("  {what:<width$} {n:>4}\n"));
        }
        out
    }

    fn json(&self, proxy: &str) -> String {
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
            "upstream": self.upstream,
            "proxy": proxy,
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

/// `calls` GETs of `http://UPSTREAM/` through the proxy, `WORKERS` at a time on kept-alive connections, each
/// carrying the caller's `trace` headers.
async fn call_many(proxy: &str, upstream: &str, calls: usize, trace: &hyper::HeaderMap) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS.min(calls) {
        let (next, proxy, upstream, trace) = (
            next.clone(),
            proxy.to_string(),
            upstream.to_string(),
            trace.clone(),
        );
        workers.spawn(async move {
            let mut mine = Vec::new();
            let mut conn = None;
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let started = std::time::Instant::now();
                let outcome = call_once(&mut conn, &proxy, &upstream, &trace).await;
                mine.push((outcome, started.elapsed()));
            }
            mine
        });
    }
    let mut tally = Tally {
        upstream: upstream.to_string(),
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

/// One GET through the proxy, in absolute form as `http_proxy` clients send it, with the caller's `trace`
/// headers: the replica that answered 200 (its `x-backend`), or what went wrong ("503 no-endpoints",
/// "connect: ...").
async fn call_once(
    conn: &mut Option<Conn>,
    proxy: &str,
    upstream: &str,
    trace: &hyper::HeaderMap,
) -> Result<String, String> {
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
        let mut req = Request::get(format!("http://{upstream}/"))
            .header(hyper::header::HOST, upstream)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        req.headers_mut().extend(trace.clone());
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

// ---------------------------------------------------------------------------------------------------------
// collector: a tiny Zipkin v2 receiver for the demo's agents.
// ---------------------------------------------------------------------------------------------------------

/// Spans the collector keeps; the oldest go first.
const COLLECTOR_SPANS: usize = 10_000;
/// The largest `POST /api/v2/spans` body read (an agent sends at most 512 spans per batch, a few hundred KiB).
const COLLECTOR_MAX_BODY: usize = 8 << 20;
/// Traces `GET /traces` prints without `limit`, and the most it prints.
const DEFAULT_TRACES: usize = 10;
const MAX_TRACES: usize = 1000;

/// One Zipkin v2 span as received, kept and given back; fields the demo does not show (annotations, shared,
/// debug) are dropped.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan {
    trace_id: String,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    /// Microseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    /// Microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_endpoint: Option<ZipkinEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<ZipkinEndpoint>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

impl ZipkinSpan {
    /// Zipkin's id rules (trace id 16 or 32 hex digits, span ids 16), ids lower-cased so lookups match.
    fn normalize(&mut self) -> Result<(), String> {
        fn hex_id(what: &str, id: &mut String, lengths: &[usize]) -> Result<(), String> {
            id.make_ascii_lowercase();
            if lengths.contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(());
            }
            let shown = if id.len() > 40 {
                format!("of {} bytes", id.len())
            } else {
                format!("{id:?}")
            };
            let digits = lengths.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            Err(format!(
                "{what} {shown}: {} hex digits",
                digits.join(" or ")
            ))
        }
        hex_id("traceId", &mut self.trace_id, &[16, 32])?;
        hex_id("id", &mut self.id, &[16])?;
        if let Some(parent) = &mut self.parent_id {
            hex_id("parentId", parent, &[16])?;
        }
        Ok(())
    }

    fn duration_us(&self) -> u64 {
        self.duration.unwrap_or(0)
    }

    /// `node-c -> node-b 172.18.0.7:8080`: where the span was recorded, and the other side.
    fn hop(&self) -> String {
        let local = self
            .local_endpoint
            .as_ref()
            .and_then(|e| e.service_name.as_deref())
            .unwrap_or("?");
        let remote = self.remote_endpoint.as_ref().map(|e| {
            let addr = match (&e.ipv4, &e.ipv6, e.port) {
                (Some(ip), _, Some(port)) => format!("{ip}:{port}"),
                (None, Some(ip), Some(port)) => format!("[{ip}]:{port}"),
                (Some(ip), _, None) | (None, Some(ip), None) => ip.clone(),
                (None, None, _) => String::new(),
            };
            let name = e.service_name.as_deref().unwrap_or("");
            format!("{name} {addr}").trim().to_string()
        });
        match (self.kind.as_deref(), remote.filter(|r| !r.is_empty())) {
            (Some("CLIENT" | "PRODUCER"), Some(r)) => format!("{local} -> {r}"),
            (_, Some(r)) => format!("{local} <- {r}"),
            (_, None) => local.to_string(),
        }
    }

    /// The status and what went wrong: `200`, `502 error=upstream-failed attempt=2`.
    fn outcome(&self) -> String {
        let t = |k: &str| self.tags.get(k).map(String::as_str);
        let mut out = Vec::new();
        if let Some(s) = t("http.status_code") {
            out.push(s.to_string());
        }
        if let Some(s) = t("rpc.grpc.status_code") {
            out.push(format!("grpc={s}"));
        }
        match t("error") {
            // meshd's error tag of a plain 5xx is the status again.
            Some(e) if Some(e) == t("http.status_code") => out.push("error".into()),
            Some(e) => out.push(format!("error={e}")),
            None => {}
        }
        if let Some(a) = t("mesh.attempt").filter(|a| *a != "1") {
            out.push(format!("attempt={a}"));
        }
        if let Some(f) = t("mesh.fault") {
            out.push(format!("fault={f}"));
        }
        if let Some(b) = t("mesh.breaker").filter(|b| *b != "closed") {
            out.push(format!("breaker={b}"));
        }
        out.join(" ")
    }
}

/// The collector's spans, oldest first, at most [`COLLECTOR_SPANS`].
#[derive(Default)]
struct Store {
    spans: VecDeque<ZipkinSpan>,
}

impl Store {
    fn add(&mut self, spans: Vec<ZipkinSpan>) {
        for span in spans {
            if self.spans.len() >= COLLECTOR_SPANS {
                self.spans.pop_front();
            }
            self.spans.push_back(span);
        }
    }

    /// Every trace, newest first (by its first span's start).
    fn traces(&self) -> Vec<Trace<'_>> {
        let mut by_id: BTreeMap<&str, Vec<&ZipkinSpan>> = BTreeMap::new();
        for span in &self.spans {
            by_id.entry(&span.trace_id).or_default().push(span);
        }
        let mut traces: Vec<Trace<'_>> = by_id
            .into_iter()
            .map(|(id, spans)| Trace::new(id, spans))
            .collect();
        traces.sort_by(|a, b| b.start_us.cmp(&a.start_us).then(a.id.cmp(b.id)));
        traces
    }
}

/// One trace's spans as a tree: roots are spans without a parent or whose parent the collector has not got
/// (the caller's own span, or one lost on the way).
struct Trace<'a> {
    id: &'a str,
    /// In print order: depth-first, children by start time.
    lines: Vec<(usize, &'a ZipkinSpan)>,
    start_us: u64,
    /// The longest root's duration: how long the trace took as far as the collector can tell.
    root_us: u64,
}

impl<'a> Trace<'a> {
    fn new(id: &'a str, mut spans: Vec<&'a ZipkinSpan>) -> Trace<'a> {
        spans.sort_by_key(|s| s.timestamp.unwrap_or(0));
        let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
        let mut children: std::collections::HashMap<&str, Vec<usize>> = Default::default();
        let mut roots = Vec::new();
        for (i, s) in spans.iter().enumerate() {
            match s.parent_id.as_deref() {
                Some(p) if ids.contains(p) => children.entry(p).or_default().push(i),
                _ => roots.push(i),
            }
        }
        let root_us = roots
            .iter()
            .map(|&i| spans[i].duration_us())
            .max()
            .unwrap_or_else(|| spans.iter().map(|s| s.duration_us()).max().unwrap_or(0));
        // Depth-first without recursion, each span once: ids that repeat or loop cannot hang it. Spans that
        // only loop among themselves (no root above them) are printed last, as roots.
        let mut seen = vec![false; spans.len()];
        let mut lines = Vec::with_capacity(spans.len());
        let starts = roots.into_iter().chain(0..spans.len());
        for start in starts {
            let mut stack = vec![(start, 0usize)];
            while let Some((i, depth)) = stack.pop() {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                lines.push((depth, spans[i]));
                if let Some(c) = children.get(spans[i].id.as_str()) {
                    stack.extend(c.iter().rev().map(|&c| (c, depth + 1)));
                }
            }
        }
        Trace {
            id,
            lines,
            start_us: spans.iter().filter_map(|s| s.timestamp).min().unwrap_or(0),
            root_us,
        }
    }

    /// A header line, then one line per span: name (indented under its parent), hop, duration, outcome.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let start =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.start_us) * 1000)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| "?".into());
        let _ = writeln!(
            out,
            "trace {}  {start}  {:.1} ms  {} spans",
            self.id,
            ms(self.root_us),
            self.lines.len()
        );
        let name = |s: &ZipkinSpan| s.name.clone().unwrap_or_else(|| "?".into());
        let name_width = self
            .lines
            .iter()
            .map(|(d, s)| 2 * d + name(s).len())
            .max()
            .unwrap_or(0)
            .min(60);
        let hops: Vec<String> = self.lines.iter().map(|(_, s)| s.hop()).collect();
        let hop_width = hops.iter().map(String::len).max().unwrap_or(0).min(50);
        for ((depth, span), hop) in self.lines.iter().zip(&hops) {
            let indented = format!("{:width$}{}", "", name(span), width = 2 * depth);
            let line = format!(
                "  {indented:<name_width$}  {hop:<hop_width$}  {:>8.1} ms  {}",
                ms(span.duration_us()),
                span.outcome()
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn collector(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!(
        "collector listening on {}: POST /api/v2/spans, GET /traces?limit=N&min_ms=MS, GET /api/v2/trace/ID",
        listener.local_addr()?
    );
    let store = Arc::new(Mutex::new(Store::default()));
    serve_until_terminated(listener, move |req| {
        let store = store.clone();
        async move { Ok(collector_request(&store, req).await) }
    })
    .await;
    Ok(())
}

/// The store, also after a panic elsewhere while it was held (it holds plain data, always consistent).
fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn collector_request<B>(store: &Mutex<Store>, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let path = req.uri().path().to_string();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match path.as_str() {
        "/api/v2/spans" if req.method() == Method::POST => {}
        "/healthz" if get => return text(StatusCode::OK, "ok\n".into()),
        "/" if get => {
            return text(
                StatusCode::OK,
                "meshd-demo collector: POST /api/v2/spans (Zipkin v2 JSON), GET /traces?limit=N&min_ms=MS, \
                 GET /api/v2/trace/ID\n"
                    .into(),
            );
        }
        "/traces" if get => {
            return match traces_query(req.uri().query().unwrap_or_default()) {
                Ok((limit, min_ms)) => {
                    text(StatusCode::OK, traces_text(&lock(store), limit, min_ms))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
        }
        p if get && p.starts_with("/api/v2/trace/") => {
            let id = p["/api/v2/trace/".len()..].to_ascii_lowercase();
            let spans: Vec<ZipkinSpan> = lock(store)
                .spans
                .iter()
                .filter(|s| s.trace_id == id)
                .cloned()
                .collect();
            if spans.is_empty() {
                return text(StatusCode::NOT_FOUND, format!("no spans of trace {id:?}\n"));
            }
            // Plain strings and numbers: serializing cannot fail.
            let body = serde_json::to_string(&spans).unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        "/api/v2/spans" | "/traces" | "/healthz" | "/" => {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    }

    // POST /api/v2/spans: a JSON array of spans, all accepted or none.
    if req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send uncompressed JSON (no Content-Encoding)\n".into(),
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), COLLECTOR_MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a body of at most {COLLECTOR_MAX_BODY} bytes\n"),
            );
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
    };
    let mut spans: Vec<ZipkinSpan> = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not a JSON array of Zipkin v2 spans: {e}\n"),
            );
        }
    };
    for (i, span) in spans.iter_mut().enumerate() {
        if let Err(e) = span.normalize() {
            return text(StatusCode::BAD_REQUEST, format!("span {i}: {e}\n"));
        }
    }
    lock(store).add(spans);
    text(StatusCode::ACCEPTED, String::new())
}

/// `limit=N&min_ms=MS` of `GET /traces`.
fn traces_query(query: &str) -> Result<(usize, u64), String> {
    let (mut limit, mut min_ms) = (DEFAULT_TRACES, 0);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_TRACES).contains(n))
                    .ok_or_else(|| format!("limit={v:?}: a number from 1 to {MAX_TRACES}"))?;
            }
            Some(("min_ms", v)) => {
                min_ms = v
                    .parse()
                    .map_err(|_| format!("min_ms={v:?}: whole milliseconds"))?;
            }
            _ => return Err(format!("{pair:?}: use limit=N and min_ms=MS")),
        }
    }
    Ok((limit, min_ms))
}

/// The newest `limit` traces whose root took at least `min_ms`, as trees.
fn traces_text(store: &Store, limit: usize, min_ms: u64) -> String {
    let traces: Vec<Trace<'_>> = store
        .traces()
        .into_iter()
        .filter(|t| t.root_us >= min_ms.saturating_mul(1000))
        .take(limit)
        .collect();
    if traces.is_empty() {
        return format!(
            "no traces{} among {} spans\n",
            if min_ms > 0 {
                format!(" of {min_ms} ms or more")
            } else {
                String::new()
            },
            store.spans.len()
        );
    }
    let mut out = String::new();
    for (i, t) in traces.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        t.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd::telemetry::trace::{Span, SpanIds, SpanKind, zipkin};
    use serde_json::Value;
    use std::time::SystemTime;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn call_and_upstream_take_service_names() {
        let Ok(Cmd::Serve(s)) = parse(&args(
            "serve --name mid --call back-stable --proxy http://agent-c:4140",
        )) else {
            panic!("serve --call");
        };
        let call = s.call.expect("--call");
        assert_eq!(
            (call.service.as_str(), call.proxy.as_str()),
            ("back-stable", "agent-c:4140")
        );
        assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
        let Ok(Cmd::Serve(s)) = parse(&args("--name back-1")) else {
            panic!("serve");
        };
        assert!(s.call.is_none());
        for bad in [
            "--call a/b",
            "--call",
            "--call a?b=1",
            "front --upstream x:80",
        ] {
            let a = args(&format!("{bad} --proxy http://agent:4140"));
            assert!(parse(&a).is_err(), "{bad}");
        }
        let Ok(Cmd::Collector { listen }) = parse(&args("collector")) else {
            panic!("collector");
        };
        assert_eq!(listen, "0.0.0.0:9411".parse().unwrap());
    }

    // ---- the chain: serve --call and front pass the caller's trace context on ----

    /// A stand-in for the local agent: answers `back-stable` as `back-1@node-a`, anything else with meshd's
    /// `503 no-endpoints`, and sends every request's headers to the returned channel.
    async fn fake_agent() -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<hyper::HeaderMap>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let _ = tx.send(req.headers().clone());
                            let mut r = Response::new(Full::new(Bytes::new()));
                            if req.headers()["host"] == "back-stable" {
                                r.headers_mut()
                                    .insert("x-backend", "back-1@node-a".parse().unwrap());
                            } else {
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                r.headers_mut()
                                    .insert("mesh-error", "no-endpoints".parse().unwrap());
                            }
                            async move { Ok::<_, Infallible>(r) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, rx)
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }

    async fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = r.status();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    const W3C: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[tokio::test]
    async fn serve_with_call_copies_the_trace_headers_and_answers_the_chain() {
        let (agent, mut seen) = fake_agent().await;
        let mid = |service: &str| {
            Some(Arc::new(Call {
                service: service.into(),
                proxy: agent.clone(),
            }))
        };
        let behaviour = Behaviour {
            delay: Duration::ZERO,
            status: StatusCode::OK,
        };
        let healthy = Arc::new(AtomicBool::new(true));
        let incoming = [
            ("traceparent", W3C),
            ("tracestate", "vendor=1"),
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
            ("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
            ("authorization", "secret"),
            ("x-request-id", "r1"),
        ];
        let r = handle(
            Arc::from("mid@node-c"),
            healthy.clone(),
            behaviour,
            mid("back-stable"),
            request("/", &incoming),
        )
        .await
        .unwrap();
        assert_eq!(r.headers()["x-backend"], "mid@node-c > back-1@node-a");
        assert_eq!(
            body(r).await,
            (StatusCode::OK, "mid@node-c > back-1@node-a".into())
        );
        let sent = seen.recv().await.unwrap();
        for (k, v) in &incoming[..6] {
            assert_eq!(sent.get(*k).unwrap(), v, "{k}");
        }
        assert!(sent.get("authorization").is_none() && sent.get("x-request-id").is_none());
        assert_eq!(sent["host"], "back-stable");

        // What the downstream said when it failed, as a 502.
        let r = handle(
            Arc::from("mid@node-c"),
            healthy,
            behaviour,
            mid("gone"),
            request("/", &[]),
        )
        .await
        .unwrap();
        assert_eq!(
            body(r).await,
            (
                StatusCode::BAD_GATEWAY,
                "mid@node-c > 503 no-endpoints".into()
            )
        );
        assert!(seen.recv().await.unwrap().get("traceparent").is_none());
    }

    #[tokio::test]
    async fn front_forwards_the_callers_trace_headers_on_every_call() {
        let (agent, mut seen) = fake_agent().await;
        let f = Arc::new(Front {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: "gone".into(),
            proxy: agent,
        });
        let r = front_request(
            f.clone(),
            request(
                "/?calls=3&upstream=back-stable&format=json",
                &[("traceparent", W3C), ("tracestate", "vendor=1")],
            ),
        )
        .await
        .unwrap();
        let (status, text) = body(r).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["upstream"], "back-stable");
        assert_eq!(v["replicas"]["back-1@node-a"]["count"], 3, "{v}");
        for _ in 0..3 {
            let sent = seen.recv().await.unwrap();
            assert_eq!(sent["traceparent"], W3C);
            assert_eq!(sent["tracestate"], "vendor=1");
            assert_eq!(sent["host"], "back-stable");
        }
        // Without context, none is made up (the agent starts the trace); a bad upstream is refused.
        let r = front_request(f.clone(), request("/?calls=1", &[]))
            .await
            .unwrap();
        assert!(body(r).await.1.contains("503 no-endpoints"));
        assert!(seen.recv().await.unwrap().get("traceparent").is_none());
        let r = front_request(f, request("/?upstream=a/b", &[]))
            .await
            .unwrap();
        assert_eq!(body(r).await.0, StatusCode::BAD_REQUEST);
    }

    // ---- the collector ----

    async fn call(store: &Mutex<Store>, req: Request<Full<Bytes>>) -> (StatusCode, String) {
        body(collector_request(store, req).await).await
    }

    async fn post(store: &Mutex<Store>, json: impl Into<Bytes>) -> (StatusCode, String) {
        let req = Request::post("/api/v2/spans")
            .header("content-type", "application/json")
            .body(Full::new(json.into()))
            .unwrap();
        call(store, req).await
    }

    async fn get(store: &Mutex<Store>, uri: &str) -> (StatusCode, String) {
        call(store, request(uri, &[])).await
    }

    /// What meshd records for front -> agent-a -> agent-c -> mid: a server and a client span on node-a, a server
    /// span on node-c; encoded by meshd's own Zipkin encoder.
    fn meshd_chain(trace: u8, start: SystemTime, total: Duration) -> Vec<Span> {
        let root = SpanIds {
            trace_id: [trace; 16],
            span_id: [1; 8],
            parent_id: Some([9; 8]), // the caller's span, which no agent recorded
        };
        let client = SpanIds {
            trace_id: root.trace_id,
            span_id: [2; 8],
            parent_id: Some(root.span_id),
        };
        let inbound = client.child();
        // `prefix` starts the name: `outbound GET mid`, `GET mid`, `inbound GET mid`.
        let span = |ids: &SpanIds, prefix: &'static str, kind, node: &str, took: Duration| {
            let mut s = Span::new(ids, kind, Arc::from(node));
            s.name_prefix = prefix;
            s.start = start;
            s.duration = took;
            s.service = Some(Arc::from("mid"));
            s.method = Some(http::Method::GET);
            s.status = Some(200);
            s
        };
        let mut a = span(&root, "outbound", SpanKind::Server, "node-a", total);
        a.status = Some(502);
        let mut b = span(&client, "", SpanKind::Client, "node-a", total / 2);
        b.peer_node = Some(Arc::from("node-c"));
        b.endpoint = Some("172.18.0.9:8080".parse().unwrap());
        b.attempt = Some(2);
        b.breaker = Some("closed");
        let mut c = span(&inbound, "inbound", SpanKind::Server, "node-c", total / 4);
        c.peer_node = Some(Arc::from("node-a"));
        c.start = start + Duration::from_millis(1);
        vec![a, b, c]
    }

    #[tokio::test]
    async fn takes_what_meshd_sends_and_gives_it_back_unchanged() {
        let store = Mutex::new(Store::default());
        let spans = meshd_chain(0xab, SystemTime::now(), Duration::from_millis(300));
        let sent = zipkin::encode(&spans);
        assert_eq!(post(&store, sent.clone()).await.0, StatusCode::ACCEPTED);
        let (status, got) = get(&store, &format!("/api/v2/trace/{}", "AB".repeat(16))).await;
        assert_eq!(status, StatusCode::OK);
        let sent: Value = serde_json::from_slice(&sent).unwrap();
        let got: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(got, sent, "every field meshd sends is kept as sent");
        assert_eq!(
            get(&store, "/api/v2/trace/00000000000000000000000000000001")
                .await
                .0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn traces_print_as_trees_newest_first_filtered_by_the_roots_duration() {
        let store = Mutex::new(Store::default());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let slow = meshd_chain(0x0a, t0, Duration::from_millis(312));
        let fast = meshd_chain(0x0b, t0 + Duration::from_secs(1), Duration::from_millis(4));
        post(&store, zipkin::encode(slow.iter().chain(&fast))).await;

        let (status, text) = get(&store, "/traces").await;
        assert_eq!(status, StatusCode::OK);
        let expected_slow = "\
trace 0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a  2027-01-15T08:00:00Z  312.0 ms  3 spans
  outbound GET mid     node-a                               312.0 ms  502 error
    GET mid            node-a -> node-c 172.18.0.9:8080     156.0 ms  200 attempt=2
      inbound GET mid  node-c <- node-a                      78.0 ms  200
";
        let (newest, oldest) = text.split_once("\n\n").expect("two traces");
        assert!(newest.starts_with("trace 0b0b"), "newest first:\n{text}");
        assert_eq!(oldest, expected_slow, "\n{text}");

        let (_, text) = get(&store, "/traces?min_ms=300").await;
        assert_eq!(text, expected_slow);
        let (_, text) = get(&store, "/traces?limit=1").await;
        assert!(
            text.starts_with("trace 0b0b") && !text.contains("0a0a"),
            "{text}"
        );
        let (_, text) = get(&store, "/traces?min_ms=1000").await;
        assert_eq!(text, "no traces of 1000 ms or more among 6 spans\n");
        for bad in ["limit=0", "limit=1001", "limit=x", "min_ms=-1", "slow=1"] {
            assert_eq!(
                get(&store, &format!("/traces?{bad}")).await.0,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_posts_are_400_and_store_nothing() {
        let store = Mutex::new(Store::default());
        let ok = r#"{"traceId":"00000000000000000000000000000001","id":"0000000000000001"}"#;
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            b"{}",
            b"[1]",
            br#"[{"id":"0000000000000001"}]"#,
            br#"[{"traceId":"xyz","id":"0000000000000001"}]"#,
            br#"[{"traceId":"00000000000000000000000000000001","id":"1"}]"#,
            br#"[{"traceId":"00000000000000000000000000000001","id":"0000000000000001","parentId":""}]"#,
            br#"[{"traceId":"00000000000000000000000000000001","id":"0000000000000001","duration":-1}]"#,
            br#"[{"traceId":"00000000000000000000000000000001","id":"0000000000000001","tags":{"a":1}}]"#,
            b"[\xff\xfe]",
        ];
        for case in cases {
            let (status, why) = post(&store, case.to_vec()).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{}: {why}",
                String::from_utf8_lossy(case)
            );
        }
        // One bad span refuses the whole batch.
        let (status, why) = post(
            &store,
            format!(
                r#"[{ok},{{"traceId":"{}","id":"0000000000000002"}}]"#,
                "f".repeat(100)
            ),
        )
        .await;
        assert_eq!(
            (status, why.as_str()),
            (
                StatusCode::BAD_REQUEST,
                "span 1: traceId of 100 bytes: 16 or 32 hex digits\n"
            )
        );
        assert!(lock(&store).spans.is_empty());

        let big = Bytes::from(vec![b' '; COLLECTOR_MAX_BODY + 1]);
        assert_eq!(post(&store, big).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        let gzip = Request::post("/api/v2/spans")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from(ok)))
            .unwrap();
        assert_eq!(
            call(&store, gzip).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            get(&store, "/api/v2/spans").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(get(&store, "/nope").await.0, StatusCode::NOT_FOUND);
        assert!(lock(&store).spans.is_empty());
        // Upper-case ids are taken and looked up in lower case.
        let upper = r#"[{"traceId":"0000000000000000000000000000000A","id":"000000000000000B"}]"#;
        assert_eq!(post(&store, upper).await.0, StatusCode::ACCEPTED);
        assert_eq!(
            get(&store, "/api/v2/trace/0000000000000000000000000000000a")
                .await
                .0,
            StatusCode::OK
        );
    }

    #[test]
    fn keeps_the_last_10000_spans() {
        let mut store = Store::default();
        let span = |i: usize| ZipkinSpan {
            trace_id: format!("{i:032x}"),
            id: format!("{i:016x}"),
            ..ZipkinSpan::default()
        };
        store.add((0..COLLECTOR_SPANS + 5).map(span).collect());
        assert_eq!(store.spans.len(), COLLECTOR_SPANS);
        assert_eq!(store.spans.front(), Some(&span(5)));
        assert_eq!(store.spans.back(), Some(&span(COLLECTOR_SPANS + 4)));
    }

    #[test]
    fn loops_and_repeated_ids_print_each_span_once() {
        let span = |id: &str, parent: Option<&str>| ZipkinSpan {
            trace_id: "0".repeat(32),
            id: id.repeat(16),
            parent_id: parent.map(|p| p.repeat(16)),
            name: Some(format!("span {id}")),
            ..ZipkinSpan::default()
        };
        // 1 is its own parent; 2 and 3 are each other's; 4 appears twice under the root 5.
        let spans = [
            span("1", Some("1")),
            span("2", Some("3")),
            span("3", Some("2")),
            span("5", None),
            span("4", Some("5")),
            span("4", Some("5")),
        ];
        let t = Trace::new("t", spans.iter().collect());
        assert_eq!(t.lines.len(), spans.len());
        assert_eq!(t.lines[0].1.id, "5".repeat(16), "the root comes first");
        let mut out = String::new();
        t.render(&mut out);
        assert_eq!(out.lines().count(), 1 + spans.len(), "{out}");
    }
}
