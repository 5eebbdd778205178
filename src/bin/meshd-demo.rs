//! `meshd-test-backend`: the tiny HTTP server the Docker tests run in their `FROM scratch` image.
//!
//! ```text
//! meshd-test-backend [serve] --name NAME [--listen 0.0.0.0:8080] [--health ok|fail] [--stop-delay SECS]
//! meshd-test-backend health [--url http://127.0.0.1:8080/healthz]      # exit 0 when it answers 200
//! ```
//!
//! It speaks HTTP/1.1 and h2c (prior knowledge) on one port. `GET /healthz` answers 200 or 503 depending on
//! the health switch, which `POST /health/fail` and `POST /health/ok` flip; every other request answers 200
//! with the backend's name as the body and in `x-backend`. On SIGTERM it exits, or with `--stop-delay` keeps
//! serving for that many seconds first (like an app draining in-flight work), which lets tests observe a
//! container that is stopping but still running. Only tokio, hyper and hyper-util: the binary is linked
//! statically and is the only file in its image.

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
  meshd-test-backend [serve] --name NAME [--listen ADDR] [--health ok|fail] [--stop-delay SECS]
  meshd-test-backend health [--url http://127.0.0.1:8080/healthz]";

struct Serve {
    name: String,
    listen: SocketAddr,
    healthy: bool,
    stop_delay: Duration,
}

enum Cmd {
    Serve(Serve),
    Health { url: String },
}

fn parse(args: &[String]) -> Result<Cmd, String> {
    let mut it = args.iter().peekable();
    let health = match it.peek().map(|s| s.as_str()) {
        Some("health") => {
            it.next();
            true
        }
        Some("serve") => {
            it.next();
            false
        }
        _ => false,
    };
    let mut name = None;
    let mut listen = "0.0.0.0:8080".to_string();
    let mut healthy = true;
    let mut stop_delay = 0u64;
    let mut url = "http://127.0.0.1:8080/healthz".to_string();
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
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if health {
        return Ok(Cmd::Health { url });
    }
    Ok(Cmd::Serve(Serve {
        name: name.ok_or("--name is required")?,
        listen: listen
            .parse()
            .map_err(|_| format!("--listen {listen:?}: not an IP:port"))?,
        healthy,
        stop_delay: Duration::from_secs(stop_delay),
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd-test-backend: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd-test-backend: cannot start the runtime: {e}");
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
            Cmd::Serve(s) => match serve(s).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshd-test-backend: {e}");
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
    // A task, so it keeps accepting while a stop delay runs.
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, healthy) = (name.clone(), healthy.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(name.clone(), healthy.clone(), req)
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
        _ => reply(StatusCode::OK, name.to_string()),
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
