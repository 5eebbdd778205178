//! Support for tests (and the bench) that run against the real Docker engine.
//!
//! - [`image`]: the `FROM scratch` backend image (tests/docker/Dockerfile + a static `meshd-demo`),
//!   built once per run: tests/run.sh builds it under `$MESHD_TEST_IMAGE` and removes it at the end; without
//!   that variable the first test builds `meshd-test-backend:dev` under a file lock and leaves it for the next
//!   run.
//! - [`Scope`]: containers and networks with unique names (`meshd-t-<run>-<test>-…`), all labelled
//!   `meshd-test-run=<run>`, removed (`docker rm -f`, `docker network rm`) when the scope is dropped — also
//!   when the test fails. Containers carry `mesh.node=<the scope's node>`, and the scope's agent sets
//!   `discovery.docker.node_label = "mesh.node"`, so concurrent tests on one daemon never see each other.
//! - [`Relay`]: a unix socket in front of /var/run/docker.sock that a test can cut and restore, and that
//!   records every request meshd made through it.
//!
//! The tests only ever talk to loopback and to containers on networks they created.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd::routing::Table;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The daemon the tests use (and the relay forwards to).
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Every test resource carries this label, with the run id as value.
pub const RUN_LABEL: &str = "meshd-test-run";
/// The port the backend listens on inside its container.
pub const BACKEND_PORT: u16 = 8080;

/// This run's id: `$MESHD_TEST_RUN` (set by tests/run.sh), else this process's id.
pub fn run_id() -> String {
    std::env::var("MESHD_TEST_RUN")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("p{}", std::process::id()))
}

// ---------------------------------------------------------------------------------------------------------
// The docker CLI.
// ---------------------------------------------------------------------------------------------------------

/// Runs `docker args…`; stdout (trimmed) on success, else a message with stderr.
pub async fn docker(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `docker …`, panicking with the command and its stderr on failure.
pub async fn docker_ok(args: &[&str]) -> String {
    docker(args).await.unwrap_or_else(|e| panic!("{e}"))
}

fn docker_blocking(args: &[&str]) {
    let _ = std::process::Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------------------
// The backend image.
// ---------------------------------------------------------------------------------------------------------

/// Label on a lazily built image: a hash of the backend's source and Dockerfile, so a stale
/// `meshd-test-backend:dev` is rebuilt.
const SOURCE_LABEL: &str = "meshd.test-backend-source";

/// FNV-1a of the files the image is made from (stable across builds, unlike `DefaultHasher`).
fn source_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in include_str!("../../src/bin/meshd-demo.rs")
        .bytes()
        .chain(include_str!("Dockerfile").bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Whether `tag` exists (and, when `want_source` is given, was built from that source).
fn image_ready(tag: &str, want_source: Option<&str>) -> bool {
    let format = format!("{{{{index .Config.Labels \"{SOURCE_LABEL}\"}}}}");
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", &format, tag])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            want_source.is_none_or(|want| String::from_utf8_lossy(&o.stdout).trim() == want)
        }
        _ => false,
    }
}

/// The backend image's tag, building it first if this run has not: `$MESHD_TEST_IMAGE` (built by
/// tests/run.sh) as it is, else `meshd-test-backend:dev`, rebuilt when the backend's source changed.
pub async fn image() -> String {
    let from_env = std::env::var("MESHD_TEST_IMAGE")
        .ok()
        .filter(|s| !s.is_empty());
    let tag = from_env
        .clone()
        .unwrap_or_else(|| "meshd-test-backend:dev".to_string());
    let want = from_env.is_none().then(source_hash);
    let t = tag.clone();
    tokio::task::spawn_blocking(move || {
        if !image_ready(&t, want.as_deref()) {
            build_image(&t, want.as_deref());
        }
    })
    .await
    .unwrap_or_else(|e| panic!("building the test image: {e}"));
    tag
}

/// Builds the static backend and the image, once: other test processes wait on the lock, then find the
/// image there.
fn build_image(tag: &str, source: Option<&str>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join("meshd-test-image.lock")).unwrap();
    lock.lock().unwrap();
    if image_ready(tag, source) {
        return;
    }
    // A stale image of this tag is removed once replaced (if no container still uses it).
    let stale = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--bin",
            "meshd-demo",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "building the static meshd-demo failed");
    let binary = target.join("x86_64-unknown-linux-gnu/release/meshd-demo");
    let ctx = std::env::temp_dir().join(format!("meshd-test-image-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(&binary, ctx.join("meshd-demo")).unwrap();
    let out = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tag, "--label"])
        .arg(format!("{SOURCE_LABEL}={}", source.unwrap_or("")))
        .arg("-f")
        .arg(root.join("tests/docker/Dockerfile"))
        .arg(&ctx)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&ctx);
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(id) = stale {
        docker_blocking(&["rmi", &id]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Scoped containers and networks.
// ---------------------------------------------------------------------------------------------------------

/// A started container.
#[derive(Clone, Debug)]
pub struct Ctr {
    pub name: String,
    pub id: String,
}

/// Everything one test creates; removed on drop.
pub struct Scope {
    /// Name prefix of every container and network.
    pub prefix: String,
    /// The agent node name, and the `mesh.node` label of every container.
    pub node: String,
    pub image: String,
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
}

impl Scope {
    pub async fn new(test: &str) -> Scope {
        let n = fastrand::u32(..) % 100_000;
        let prefix = format!("meshd-t-{}-{test}-{n}", run_id());
        Scope {
            node: prefix.clone(),
            prefix,
            image: image().await,
            containers: Mutex::new(Vec::new()),
            networks: Mutex::new(Vec::new()),
        }
    }

    /// Creates a bridge network `<prefix>-<suffix>`.
    pub async fn network(&self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.prefix);
        self.networks.lock().unwrap().push(name.clone());
        docker_ok(&[
            "network",
            "create",
            "--label",
            &format!("{RUN_LABEL}={}", run_id()),
            &name,
        ])
        .await;
        name
    }

    /// `docker run -d` a backend named `<prefix>-<suffix>` (its `--name` is `suffix`), labelled for this
    /// scope's node. `docker_args` go before the image (labels, `--network`, health options: without any
    /// `--health-*` option the image's check is dropped), `backend_args` after it.
    pub async fn run(&self, suffix: &str, docker_args: &[&str], backend_args: &[&str]) -> Ctr {
        self.start_container("run", suffix, docker_args, backend_args)
            .await
    }

    /// `docker create`: like [`Scope::run`] but not started.
    pub async fn create(&self, suffix: &str, docker_args: &[&str], backend_args: &[&str]) -> Ctr {
        self.start_container("create", suffix, docker_args, backend_args)
            .await
    }

    async fn start_container(
        &self,
        verb: &str,
        suffix: &str,
        docker_args: &[&str],
        backend_args: &[&str],
    ) -> Ctr {
        let name = format!("{}-{suffix}", self.prefix);
        self.containers.lock().unwrap().push(name.clone());
        let run_label = format!("{RUN_LABEL}={}", run_id());
        let node_label = format!("mesh.node={}", self.node);
        let mut args = vec![verb];
        if verb == "run" {
            args.push("-d");
        }
        args.extend([
            "--name",
            &name,
            "--label",
            &run_label,
            "--label",
            &node_label,
        ]);
        if !docker_args.iter().any(|a| a.starts_with("--health")) {
            args.push("--no-healthcheck");
        }
        args.extend(docker_args);
        args.push(&self.image);
        args.extend(["--name", suffix]);
        args.extend(backend_args);
        let id = docker_ok(&args).await;
        Ctr { name, id }
    }

    /// Removes this container at the end too, under `name` (for a container the test renamed).
    pub fn track(&self, name: &str) {
        self.containers.lock().unwrap().push(name.to_string());
    }

    /// Forgets a container the test removed itself.
    pub fn forget(&self, c: &Ctr) {
        self.containers.lock().unwrap().retain(|n| n != &c.name);
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let containers =
            std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        for chunk in containers.chunks(50) {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(chunk.iter().map(String::as_str));
            docker_blocking(&args);
        }
        let networks =
            std::mem::take(&mut *self.networks.lock().unwrap_or_else(|e| e.into_inner()));
        for n in networks {
            // The daemon may still be releasing the removed containers' endpoints: retry for a while.
            let mut removed = false;
            for attempt in 0..10 {
                let out = std::process::Command::new("docker")
                    .args(["network", "rm", &n])
                    .output();
                match out {
                    Ok(o) if o.status.success() => {
                        removed = true;
                        break;
                    }
                    Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No such network") => {
                        removed = true;
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(100 * (attempt + 1))),
                }
            }
            if !removed {
                eprintln!("warning: could not remove docker network {n}: it still has endpoints");
            }
        }
    }
}

/// The container's IP on `network`.
pub async fn ip_on(c: &Ctr, network: &str) -> IpAddr {
    let out = docker_ok(&[
        "inspect",
        "--format",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        &c.id,
    ])
    .await;
    out.parse()
        .unwrap_or_else(|_| panic!("{}: no IPv4 address on {network}: {out:?}", c.name))
}

/// The backend's address on `network`.
pub async fn addr_on(c: &Ctr, network: &str) -> SocketAddr {
    SocketAddr::new(ip_on(c, network).await, BACKEND_PORT)
}

/// `docker inspect --format F`.
pub async fn inspect(c: &Ctr, format: &str) -> String {
    docker_ok(&["inspect", "--format", format, &c.id]).await
}

/// Sends `method path` straight to a container (on a network the test created), bypassing meshd.
pub async fn direct(addr: SocketAddr, method: &str, path: &str) -> Result<String, String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

// ---------------------------------------------------------------------------------------------------------
// The agent and waiting on its table.
// ---------------------------------------------------------------------------------------------------------

/// Config for a test agent on 127.0.0.1 port 0 with Docker discovery for this scope's containers; `host`
/// overrides the Docker endpoint (e.g. a [`Relay`]).
pub fn docker_agent_config(scope: &Scope, host: Option<&str>) -> String {
    let host = host
        .map(|h| format!("host = \"{h}\"\n"))
        .unwrap_or_default();
    format!(
        "[node]\nname = \"{}\"\ndrain_timeout = \"2s\"\n[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\ninsecure_plaintext = true\n[admin]\nlisten = \"127.0.0.1:0\"\n[discovery.docker]\nenabled = true\nnode_label = \"mesh.node\"\n{host}",
        scope.node
    )
}

/// How long anything is allowed to take before a test gives up: generous, since the tests must not assert
/// timings on a busy machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The local addresses the table lists for `service`.
pub fn local_addrs(table: &Table, service: &str) -> BTreeSet<SocketAddr> {
    table
        .service(service)
        .map(|s| {
            s.endpoints
                .iter()
                .filter(|e| e.is_local())
                .map(|e| e.addr)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `service`'s local endpoints are exactly `want`; panics after [`PATIENCE`].
pub async fn wait_endpoints(
    table: &tokio::sync::watch::Receiver<Arc<Table>>,
    service: &str,
    want: &BTreeSet<SocketAddr>,
) {
    let mut t = table.clone();
    let res =
        tokio::time::timeout(PATIENCE, t.wait_for(|t| local_addrs(t, service) == *want)).await;
    if res.is_err() {
        panic!(
            "{service}: endpoints are {:?}, expected {want:?}",
            local_addrs(&table.borrow(), service)
        );
    }
}

/// Polls `f` every 50 ms until it is true; panics with `what` after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

// ---------------------------------------------------------------------------------------------------------
// A Docker API relay the test can cut.
// ---------------------------------------------------------------------------------------------------------

/// A unix socket that forwards to the Docker socket while up. Cutting it closes every open connection
/// (meshd's event stream breaks) and refuses new ones until restored.
pub struct Relay {
    dir: PathBuf,
    path: PathBuf,
    generation: Mutex<CancellationToken>,
    /// `(method, path)` of every request seen.
    requests: Arc<Mutex<Vec<(String, String)>>>,
    rules: Rules,
}

/// What the relay does with a request whose path contains a given string, instead of forwarding it at once.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// Answer it with this status, never forwarding it.
    Fail(u16),
    /// Forward it after this long.
    Delay(Duration),
}

type Rules = Arc<Mutex<Vec<(String, Rule)>>>;

impl Relay {
    pub async fn start() -> Relay {
        let dir = std::env::temp_dir().join(format!(
            "meshd-relay-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let relay = Relay {
            dir,
            path,
            generation: Mutex::new(CancellationToken::new()),
            requests: Arc::new(Mutex::new(Vec::new())),
            rules: Arc::default(),
        };
        relay.listen();
        relay
    }

    /// From now on, requests whose path contains `path` get `rule`.
    pub fn rule(&self, path: &str, rule: Rule) {
        self.rules.lock().unwrap().push((path.to_string(), rule));
    }

    pub fn clear_rules(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// The relay in `DOCKER_HOST` form.
    pub fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn listen(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).unwrap();
        let token = self.generation.lock().unwrap().clone();
        let requests = self.requests.clone();
        let rules = self.rules.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let (token, requests, rules) = (token.clone(), requests.clone(), rules.clone());
                tokio::spawn(async move {
                    let Ok(daemon) = UnixStream::connect(DOCKER_SOCKET).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pipe(client, daemon, requests, rules) => {}
                    }
                });
            }
        });
    }

    /// Cuts the API: open connections are closed and new ones refused.
    pub fn cut(&self) {
        self.generation.lock().unwrap().cancel();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves again.
    pub fn restore(&self) {
        *self.generation.lock().unwrap() = CancellationToken::new();
        self.listen();
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies bytes both ways, recording each request read from the client and applying the rules to it. Requests
/// are handled whole (head and Content-Length body), one at a time, as HTTP/1.1 clients send them.
async fn pipe(
    client: UnixStream,
    daemon: UnixStream,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    rules: Rules,
) {
    let (mut cr, cw) = client.into_split();
    let (mut dr, mut dw) = daemon.into_split();
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    let down_writer = cw.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some((method, path, len)) = next_request(&pending) {
                seen.lock().unwrap().push((method, path.clone()));
                let request: Vec<u8> = pending.drain(..len).collect();
                let rule = rules
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(p, _)| path.contains(p.as_str()))
                    .map(|(_, r)| *r);
                match rule {
                    Some(Rule::Fail(status)) => {
                        let body = format!("{{\"message\":\"relay: failing {path}\"}}");
                        let resp = format!(
                            "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if cw.lock().await.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Rule::Delay(d)) => tokio::time::sleep(d).await,
                    None => {}
                }
                if dw.write_all(&request).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match dr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if down_writer.lock().await.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

/// The first complete request in `pending`: method, path, and its length (head + Content-Length body).
fn next_request(pending: &[u8]) -> Option<(String, String, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = req.parse(pending) else {
        return None;
    };
    let body: usize = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    if pending.len() < head + body {
        return None;
    }
    Some((
        req.method.unwrap_or("?").to_string(),
        req.path.unwrap_or("?").to_string(),
        head + body,
    ))
}
