//! The agent as an operator meets it: the `meshd` binary's commands, the admin API, a real Prometheus scrape
//! checked by promtool, and shutdown with a drain.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn write_config(text: &str) -> tempfile_path::Path {
    tempfile_path::Path::new(text)
}

/// A config file in the target directory that is removed when dropped.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn new(text: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("meshd-test-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("{}.toml", fastrand::u64(..)));
            std::fs::write(&p, text).unwrap();
            Path(p)
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            // The directory goes with its last file.
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A meshd process that is killed if the test ends (or panics) before it exits by itself.
struct Proc(Option<Child>);

impl Proc {
    fn id(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits for the process to exit.
    async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn check_config_reports_every_problem_and_exits_64() {
    let bad = write_config(
        "[node]\ndrain_timeout = \"forever\"\n[admin]\nlisten = \"nowhere\"\n[[discovery.static]]\nservice = \"\"\nendpoints = [\"10.0.0.1\"]\n",
    );
    let out = Command::new(MESHD)
        .args(["check-config", "--config"])
        .arg(&bad.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "node.drain_timeout (line 2)",
        "admin.listen (line 4)",
        "discovery.static[0].service (line 6)",
        "discovery.static[0].endpoints[0] (line 7)",
        "4 problems",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }

    let unknown = write_config("[node]\nnmae = \"x\"\n[outbund]\n");
    let out = Command::new(MESHD)
        .args(["check-config", "-c"])
        .arg(&unknown.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.nmae (line 2): unknown key"), "{err}");
    assert!(err.contains("outbund (line 3): unknown key"), "{err}");

    // Without [tls], a config must ask for plaintext between agents by name.
    let no_tls = write_config("[defaults]\ntimeout = \"3s\"\n");
    let out = Command::new(MESHD)
        .args(["check-config", "--config"])
        .arg(&no_tls.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls: missing") && err.contains("meshd ca init"),
        "{err}"
    );

    let good = write_config("[defaults]\ntimeout = \"3s\"\n[inbound]\ninsecure_plaintext = true\n");
    let out = Command::new(MESHD)
        .args(["check-config", "--config"])
        .arg(&good.0)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(MESHD)
        .args(["check-config", "--config", "/nonexistent/meshd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
}

#[tokio::test]
async fn admin_endpoints() {
    let b = backend("adm").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\nprotocol = \"h2c\"\n[services.users]\ntimeout = \"1500ms\"\n",
        b.addr
    ))
    .await;
    let client = h1_client();
    let admin_addr = agent.admin;
    let admin = |p: &str| {
        http::Request::get(format!("http://{admin_addr}{p}"))
            .body(full(""))
            .unwrap()
    };
    assert_eq!(
        read(client.request(admin("/live")).await.unwrap())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        read(client.request(admin("/ready")).await.unwrap())
            .await
            .status,
        StatusCode::OK
    );

    let got = read(client.request(admin("/v1/services")).await.unwrap()).await;
    let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    let users = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "users")
        .unwrap();
    assert_eq!(users["timeout"], "1500ms");
    assert_eq!(users["endpoints"][0]["address"], b.addr.to_string());
    assert_eq!(users["endpoints"][0]["protocol"], "h2c");
    assert_eq!(users["endpoints"][0]["source"], "static");
    assert_eq!(users["endpoints"][0]["local"], true);

    let got = read(client.request(admin("/v1/config")).await.unwrap()).await;
    let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(v["services"]["users"]["timeout"], "1500ms");
    assert_eq!(v["discovery"]["static"][0]["service"], "users");
    assert_eq!(v["node"]["drain_timeout"], "5s");

    // Readiness goes away as soon as the drain starts.
    let mut agent = agent;
    agent.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.request(admin("/ready")).await {
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => break,
            Err(_) => break,
            _ if Instant::now() > deadline => panic!("/ready still 200 after shutdown began"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    agent.task.take().unwrap().await.unwrap().unwrap();
}

/// Finds promtool: $PROMTOOL, then PATH, then where tests/run.sh installs it.
fn promtool() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("PROMTOOL") {
        return p.into();
    }
    let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/prometheus/usr/bin/promtool");
    if installed.exists() {
        return installed;
    }
    "promtool".into()
}

#[tokio::test]
async fn metrics_scrape_after_traffic_passes_promtool() {
    let b = backend("prom").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n",
        b.addr
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&agent, "users", "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&agent, "users", "/status/503").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&agent, "nosuch", "/").await.status,
        StatusCode::NOT_FOUND
    );

    let scrape = metrics(&agent).await;
    let out = "direction=\"outbound\"";
    assert_eq!(
        sample(
            &scrape,
            &format!("meshd_requests_total{{{out},service=\"users\",status_class=\"2xx\"}}")
        ),
        3.0,
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            &format!("meshd_requests_total{{{out},service=\"users\",status_class=\"5xx\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            &format!("meshd_requests_total{{{out},service=\"\",status_class=\"4xx\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            &format!("meshd_request_duration_seconds_count{{{out},service=\"users\"}}")
        ),
        4.0
    );
    assert_eq!(
        sample(&scrape, "meshd_discovery_endpoints{source=\"static\"}"),
        1.0
    );
    assert!(scrape.contains(&format!(
        "meshd_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(scrape.contains("meshd_open_connections{direction=\"outbound\"}"));

    let file = std::env::temp_dir().join(format!("meshd-scrape-{}.txt", std::process::id()));
    std::fs::write(&file, &scrape).unwrap();
    let tool = promtool();
    let result = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output();
    let _ = std::fs::remove_file(&file);
    let result = result.unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): run the tests with `bash tests/run.sh`, which installs it",
            tool.display()
        )
    });
    assert!(
        result.status.success(),
        "promtool rejected the scrape:\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    agent.stop().await;
}

#[tokio::test]
async fn in_flight_request_finishes_during_drain() {
    let b = backend("drain").await;
    let mut agent = agent(&format!(
        "[[discovery.static]]\nservice = \"slow\"\nendpoints = [\"{}\"]\n",
        b.addr
    ))
    .await;
    let url = agent.url("/slow?ms=1500");
    let slow = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header("host", "slow")
            .body(full(""))
            .unwrap();
        read(h1_client().request(req).await.unwrap()).await
    });
    // Wait until the backend has the request, then begin the shutdown.
    while b.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.shutdown();
    // New connections are refused once the listener closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(agent.outbound).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = slow.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "slow drain");
    agent.task.take().unwrap().await.unwrap().unwrap();
}

/// Starts `meshd` with `args`, reading its stdout until a line containing `marker`.
fn spawn_meshd(args: &[&str], marker: &str) -> (Proc, Vec<String>) {
    let mut child = Command::new(MESHD)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.contains(marker);
        lines.push(line);
        if done {
            break;
        }
    }
    (Proc(Some(child)), lines)
}

fn addr_after(lines: &[String], label: &str) -> std::net::SocketAddr {
    let line = lines
        .iter()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("{lines:?}"));
    let word = line.split_whitespace().nth(1).unwrap();
    word.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test]
async fn meshd_dev_serves_and_sigterm_drains_then_exits_0() {
    let b = backend("dev").await;
    let svc = format!("hello={}", b.addr);
    let (child, lines) = spawn_meshd(
        &[
            "dev",
            "--service",
            &svc,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
        ],
        "Ctrl-C",
    );
    let text = lines.join("\n");
    assert!(
        text.contains("curl -H 'Host: hello' http://127.0.0.1:"),
        "{text}"
    );
    let outbound = addr_after(&lines, "outbound");
    let admin = addr_after(&lines, "admin");
    wait_ready(admin).await;
    let health = Command::new(MESHD)
        .args(["health", "--admin", &admin.to_string()])
        .status()
        .unwrap();
    assert!(health.success());

    // The inbound port runs mutual TLS with a CA made in memory: no files, and no plaintext peers.
    let inbound = addr_after(&lines, "inbound");
    let config = {
        let req = http::Request::get(format!("http://{admin}/v1/config"))
            .body(full(""))
            .unwrap();
        let got = read(h1_client().request(req).await.unwrap()).await;
        serde_json::from_str::<serde_json::Value>(&got.body).unwrap()
    };
    assert_eq!(config["inbound"]["insecure_plaintext"], false, "{config}");
    assert_eq!(
        config["tls"]["certificate"]["spiffe_id"], "spiffe://dev.meshd.invalid/node/dev",
        "{config}"
    );
    assert!(
        config["tls"]["source"]
            .as_str()
            .unwrap()
            .contains("in-memory"),
        "{config}"
    );
    let plain = tokio::net::TcpStream::connect(inbound).await.unwrap();
    if let Ok((mut send, conn)) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(plain),
    )
    .await
    {
        tokio::spawn(conn);
        let req = http::Request::get("http://hello/")
            .header("mesh-service", "hello")
            .header("mesh-endpoint", b.addr.to_string())
            .body(full(""))
            .unwrap();
        assert!(
            send.send_request(req).await.is_err(),
            "meshd dev answered a plaintext peer"
        );
    }
    assert!(text.contains("mutual TLS"), "{text}");

    let req = http::Request::get(format!("http://{outbound}/slow?ms=1500"))
        .header("host", "hello")
        .body(full(""))
        .unwrap();
    let slow = tokio::spawn(async move { read(h1_client().request(req).await.unwrap()).await });
    while b.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "-TERM");
    let got = slow.await.unwrap();
    assert_eq!(
        got.status,
        StatusCode::OK,
        "the in-flight request completes during the drain"
    );
    let status = child.wait().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let b = backend("dev2").await;
    let cfg = write_config(&format!(
        "{}\n[[discovery.static]]\nservice = \"hello\"\nendpoints = [\"{}\"]\n",
        agent_config("127.0.0.1", "").replace("drain_timeout = \"5s\"", "drain_timeout = \"60s\""),
        b.addr
    ));
    let (mut child, outbound) = spawn_run(&cfg.0);
    let req = http::Request::get(format!("http://{outbound}/slow?ms=30000"))
        .header("host", "hello")
        .body(full(""))
        .unwrap();
    let _slow = tokio::spawn(async move { h1_client().request(req).await });
    while b.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().is_none(),
        "still draining after the first signal"
    );
    signal(&child, "-INT");
    let status = child.wait().await;
    assert_eq!(
        status.code(),
        Some(130),
        "the second signal exits without waiting for the 60 s drain"
    );
}

/// Starts `meshd run --config path` and reads its outbound address from its log.
fn spawn_run(path: &std::path::Path) -> (Proc, std::net::SocketAddr) {
    let (child, outbound, _) = spawn_run_with(path, &[]);
    (child, outbound)
}

/// As [`spawn_run`], with `env` added to meshd's environment; also returns the log lines up to the outbound
/// listener's.
fn spawn_run_with(
    path: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, std::net::SocketAddr, Vec<String>) {
    let mut child = Command::new(MESHD)
        .args(["run", "--config"])
        .arg(path)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The listeners are on port 0: the agent logs the addresses it bound.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut outbound = None;
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbound.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains("listening") && line.contains("outbound") {
                outbound = line.split_whitespace().find_map(|w| {
                    w.strip_prefix("addr=")
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                });
            }
            lines.push(line);
        }
    }
    let outbound = outbound.expect("agent logged its outbound address");
    (Proc(Some(child)), outbound, lines)
}

/// The runtime's worker threads of process `pid` (tokio names them `tokio-rt-worker`), once there are `want`
/// of them or 5 s have passed: a new thread takes its name only when it first runs, which on a busy machine can
/// come after the process has already answered.
fn runtime_workers(pid: u32, want: usize) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "tokio-rt-worker")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count();
        if n == want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /` for service `hello` through the outbound listener at `outbound`.
async fn get_hello(outbound: std::net::SocketAddr) -> StatusCode {
    let req = http::Request::get(format!("http://{outbound}/"))
        .header("host", "hello")
        .body(full(""))
        .unwrap();
    read(h1_client().request(req).await.unwrap()).await.status
}

#[tokio::test]
async fn one_core_runs_everything_on_one_thread_and_more_cores_get_a_worker_each() {
    let b = backend("threads").await;
    let config = format!(
        "{}\n[[discovery.static]]\nservice = \"hello\"\nendpoints = [\"{}\"]\n",
        agent_config("127.0.0.1", ""),
        b.addr
    );
    let cfg = write_config(&config);
    for (threads, workers) in [("1", 0), ("2", 2)] {
        let (child, outbound, _) = spawn_run_with(&cfg.0, &[("TOKIO_WORKER_THREADS", threads)]);
        assert_eq!(
            get_hello(outbound).await,
            StatusCode::OK,
            "{threads} thread(s)"
        );
        assert_eq!(
            runtime_workers(child.id(), workers),
            workers,
            "TOKIO_WORKER_THREADS={threads}"
        );
    }
    // A value that is not a positive number is named in the log, and meshd runs with one thread per core.
    let (child, outbound, lines) = spawn_run_with(&cfg.0, &[("TOKIO_WORKER_THREADS", "lots")]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("TOKIO_WORKER_THREADS") && l.contains("lots")),
        "{lines:?}"
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let want = if cores > 1 { cores } else { 0 };
    assert_eq!(runtime_workers(child.id(), want), want);
    assert_eq!(get_hello(outbound).await, StatusCode::OK);
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let b = backend("hup").await;
    let base = format!(
        "{}\n[[discovery.static]]\nservice = \"hello\"\nendpoints = [\"{}\"]\n",
        agent_config("127.0.0.1", ""),
        b.addr
    );
    let cfg = write_config(&base);
    let (mut child, outbound) = spawn_run(&cfg.0);
    let get_status = || async {
        let req = http::Request::get(format!("http://{outbound}/"))
            .header("host", "hello")
            .body(full(""))
            .unwrap();
        read(h1_client().request(req).await.unwrap()).await
    };
    assert_eq!(get_status().await.status, StatusCode::OK);
    std::fs::write(
        &cfg.0,
        format!(
            "{base}[services.hello]\nfault = {{ abort = {{ percent = 100, status = 503 }} }}\n"
        ),
    )
    .unwrap();
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get_status().await;
        if got.header("mesh-error") == "fault-injected" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().is_none(), "SIGHUP must not stop the agent");
    signal(&child, "-TERM");
    let status = child.wait().await;
    assert_eq!(status.code(), Some(0));
}

/// Reads the agent's stderr until a line containing `needle`, for at most 10 s.
/// Whether `GET /ready` at `admin` answers 200 within `limit`.
fn ready_within(admin: std::net::SocketAddr, limit: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(admin) {
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            if out.starts_with(b"HTTP/1.1 200") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stderr_line(child: &mut Child, needle: &str) -> Option<String> {
    let stderr = child.stderr.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
            && line.contains(needle)
        {
            return Some(line);
        }
    }
    None
}

#[test]
fn log_format_json_and_rust_log_override() {
    let cfg = write_config(&format!(
        "{}[log]\nformat = \"json\"\nlevel = \"error\"\n",
        agent_config("127.0.0.1", "")
    ));
    let mut child = Command::new(MESHD)
        .args(["run", "--config"])
        .arg(&cfg.0)
        // log.level says errors only; RUST_LOG wins.
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = stderr_line(&mut child, "listening");
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("an info line despite log.level = error, because RUST_LOG=info");
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["message"], "listening");

    // Without RUST_LOG, log.level applies: no info lines. Checked once the agent answers /ready, by which time
    // it has logged (or not) everything it logs when it starts.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let quiet = write_config(&format!(
        "[node]\nname = \"quiet\"\n[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\ninsecure_plaintext = true\n[admin]\nlisten = \"{admin}\"\n[log]\nformat = \"json\"\nlevel = \"error\"\n"
    ));
    let mut child = Command::new(MESHD)
        .args(["run", "--config"])
        .arg(&quiet.0)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = ready_within(admin, Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "the agent never answered /ready");
    let mut out = String::new();
    use std::io::Read;
    let _ = BufReader::new(stderr).read_to_string(&mut out);
    assert!(
        !out.contains("listening"),
        "info lines at log.level = error:\n{out}"
    );
}
