//! Helpers for tests that drive whole clusters through the docker CLI (tests/compose.rs, tests/swarm.rs,
//! tests/sysctl.rs): running docker and docker-compose, plain HTTP/1.1 GETs against published ports, polling,
//! and the images compose/build.sh makes.
// Each test crate that includes this file uses a different subset of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command and returns its output; panics with its stderr when it cannot start.
pub fn run(program: &str, args: &[&str], envs: &[(&str, String)]) -> Output {
    let mut c = Command::new(program);
    c.args(args).current_dir(repo());
    for (k, v) in envs {
        c.env(k, v);
    }
    match c.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {program} {args:?}: {e}"),
    }
}

/// Like [`run`], and the command must succeed; returns its stdout.
pub fn ok(program: &str, args: &[&str], envs: &[(&str, String)]) -> String {
    let o = run(program, args, envs);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The tag of the demo's images: `$MESHD_COMPOSE_TAG` when tests/run.sh built them, else built here now
/// under this run's own tag (and removed by the caller's guard).
pub fn images() -> (String, bool) {
    if let Ok(tag) = std::env::var("MESHD_COMPOSE_TAG")
        && !tag.is_empty()
    {
        return (tag, false);
    }
    let tag = format!("t{}-{}", std::process::id(), fastrand::u32(..));
    ok("bash", &["compose/build.sh"], &[("MESHD_TAG", tag.clone())]);
    (tag, true)
}

pub fn remove_images(tag: &str) {
    for name in ["meshd", "meshd-demo", "meshd-init"] {
        let _ = run("docker", &["rmi", "-f", &format!("{name}:{tag}")], &[]);
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// GET `path` from 127.0.0.1:`port` with `Host: host`: (status, body), or None when it cannot connect.
pub fn http_get(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    http_get_with(port, host, path, &[])
}

/// [`http_get`] with extra request headers.
pub fn http_get_with(
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    // Chunked bodies (axum) are not decoded: callers parse JSON out of them with `json_in`.
    Some((status, body))
}

/// The first JSON value in a body that may be chunk-framed.
pub fn json_in(body: &str) -> Option<serde_json::Value> {
    let start = body.find(['{', '['])?;
    let mut de =
        serde_json::Deserializer::from_str(&body[start..]).into_iter::<serde_json::Value>();
    de.next()?.ok()
}

/// Polls `f` every 500 ms until it returns Some, for at most `limit`; the elapsed time with the value.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(Duration, T)> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((start.elapsed(), v));
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A container's logs (stdout and stderr).
pub fn logs(container: &str) -> String {
    let o = run("docker", &["logs", container], &[]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| panic!("non-UTF-8 path {p:?}"))
}
