//! The Grafana dashboard (docs/grafana/meshd.json) and the alerting rules (docs/prometheus/) against a real
//! Prometheus: agents with mutual TLS, gossip and Docker discovery (the real engine) run under traffic that exercises every
//! panel — 5xx, retries, an exhausted retry budget, an open breaker, rate limits, faults, a refused connect, a
//! gossip member that crashes, datagrams from another cluster, a failed TLS handshake, a refused reload, a
//! skipped container. Prometheus (Debian's package, unpacked by tests/run.sh) scrapes them every second, and each
//! panel query must return data through its HTTP API. The rules pass `promtool check rules` and `test rules`,
//! and Prometheus evaluates them against the live series without error.

mod common;
#[path = "docker/support.rs"]
mod dsupport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const DASHBOARD: &str = "docs/grafana/meshd.json";
const RULES: &str = "docs/prometheus/meshd-alerts.yml";
const RULES_TEST: &str = "docs/prometheus/meshd-alerts.test.yml";

/// What the dashboard's template variables become in the test's queries: every value.
const RATE_INTERVAL: &str = "10s";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// promtool: $PROMTOOL, else where tests/run.sh unpacks it.
fn promtool() -> PathBuf {
    std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("target/tools/prometheus/usr/bin/promtool"))
}

/// The Prometheus server: next to promtool (Debian's `prometheus` package ships both).
fn prometheus_bin() -> PathBuf {
    let beside = promtool().with_file_name("prometheus");
    if beside.exists() {
        return beside;
    }
    repo("target/tools/prometheus/usr/bin/prometheus")
}

// ---------------------------------------------------------------------------------------------------------
// Processes that must not outlive the test.
// ---------------------------------------------------------------------------------------------------------

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Agents.
// ---------------------------------------------------------------------------------------------------------

fn static_service(name: &str, addr: SocketAddr) -> String {
    format!("[[discovery.static]]\nservice = \"{name}\"\nendpoints = [\"{addr}\"]\n")
}

async fn member_state(agent: &Agent, node: &str) -> String {
    let v = admin_json(agent, "/v1/members").await;
    v["members"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == node))
        .map_or("absent".into(), |m| {
            m["state"].as_str().unwrap_or("").to_string()
        })
}

async fn wait_member(agent: &Agent, node: &str, states: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = member_state(agent, node).await;
        if states.contains(&s.as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} is {s} at {}, wanted one of {states:?} within {within:?}: {:#}",
            agent.admin,
            admin_json(agent, "/v1/members").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET through `a`'s outbound listener; the status, or nothing if the request failed (the traffic must not stop
/// the test on a loaded machine: the panels and the waits below say what was missing).
async fn try_get(a: &Agent, host: &str, path: &str) -> Option<StatusCode> {
    let req = Request::get(a.url(path))
        .header("host", host)
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), h1_client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let _ = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await;
    Some(status)
}

/// One round of traffic through `a`: successes, 5xx, retries, a refused retry, an open breaker, 429s, faults, a
/// refused connect, an unknown service, and a service on the other agent.
async fn traffic_round(a: &Agent) {
    for (host, path, times) in [
        ("users", "/", 3),
        ("users", "/slow?ms=30", 1),
        ("users", "/status/500", 1),
        ("flaky", "/", 1),
        ("stingy", "/status/503", 1),
        ("limited", "/", 3),
        ("faulty", "/", 1),
        ("dead", "/", 1),
        ("nosuch", "/", 1),
        ("orders", "/", 1),
    ] {
        for _ in 0..times {
            try_get(a, host, path).await;
        }
    }
}

/// The `meshd_*` metric names in `text`, without the histogram suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("meshd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| b.ends_with("_seconds"))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Prometheus.
// ---------------------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// GETs a Prometheus API path; the JSON answer, or an error text.
async fn prom_get(prom: SocketAddr, path_and_query: &str) -> Result<serde_json::Value, String> {
    let req = Request::get(format!("http://{prom}{path_and_query}"))
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), h1_client().request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let got = read(resp).await;
    serde_json::from_str(&got.body).map_err(|e| format!("{} {e}: {}", got.status, got.body))
}

async fn prom_query(prom: SocketAddr, expr: &str) -> Result<serde_json::Value, String> {
    prom_get(prom, &format!("/api/v1/query?query={}", urlencode(expr))).await
}

/// The first sample's value of an instant query, if any.
async fn prom_scalar(prom: SocketAddr, expr: &str) -> Option<f64> {
    let v = prom_query(prom, expr).await.ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Every panel target of the dashboard: (panel title, expr).
fn dashboard_targets(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            if let Some(inner) = p["panels"].as_array() {
                walk(inner, out);
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_string(),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().unwrap(), &mut out);
    out
}

/// A panel expr with the dashboard's variables replaced as Grafana would for "All".
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$service", ".*")
        .replace("$instance", ".*")
        .replace("$direction", ".*")
}

// ---------------------------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus_and_the_alert_rules_pass_promtool()
 {
    let started = Instant::now();
    let prometheus = prometheus_bin();
    assert!(
        prometheus.exists(),
        "no Prometheus server at {}: run the tests with `bash tests/run.sh`, which unpacks Debian's prometheus \
         package into target/tools/prometheus (or set PROMTOOL to a promtool with `prometheus` beside it)",
        prometheus.display()
    );

    // The rules first: they need no agents.
    for args in [
        vec![
            "check".to_string(),
            "rules".into(),
            repo(RULES).display().to_string(),
        ],
        vec![
            "test".to_string(),
            "rules".into(),
            repo(RULES_TEST).display().to_string(),
        ],
    ] {
        let out = Command::new(promtool())
            .args(&args)
            .current_dir(repo("docs/prometheus"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", promtool().display()));
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap();
    let targets = dashboard_targets(&dash);
    assert!(targets.len() >= 20, "{} targets", targets.len());
    // Every metric the dashboard and the rules use is documented.
    let docs = std::fs::read_to_string(repo("docs/metrics.md")).unwrap();
    let exprs: String = targets
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let rules_text = std::fs::read_to_string(repo(RULES)).unwrap();
    let used = metric_names(&format!("{exprs}\n{rules_text}"));
    for name in &used {
        assert!(
            docs.contains(&format!("`{name}`")),
            "{name} is used by the dashboard or the rules but not documented in docs/metrics.md"
        );
    }

    // --- the mesh ----------------------------------------------------------------------------------------
    let dir = tempfile::tempdir().unwrap();
    let (ip_a, ip_b, ip_c, ip_d) = ("127.0.0.121", "127.0.0.122", "127.0.0.123", "127.0.0.124");
    let nodes: Vec<String> = [ip_a, ip_b, ip_c, ip_d]
        .iter()
        .map(|ip| format!("node-{ip}"))
        .collect();
    pki(
        dir.path(),
        &nodes.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    write_keys(
        &dir.path().join("gossip.keys"),
        &[&meshd::membership::keyring::generate_line()],
    );

    let users = backend("users").await;
    // Every fourth request fails with 503: retried (retry.on = 5xx).
    users.faults.fail_every.store(4, Ordering::SeqCst);
    let flaky = backend("flaky").await;
    flaky.faults.set_status(503);
    let orders = backend("orders").await;
    // Docker discovery on the real engine, scoped to agent A's node name: a container with a broken
    // `mesh.port` (skipped: bad-port), started once A watches the events. Removed at the end by the scope.
    let mut scope = dsupport::Scope::new("dashboard").await;
    scope.node = format!("node-{ip_a}");
    // Nothing listens on port 1 of this loopback address: connects are refused.
    let dead: SocketAddr = "127.0.0.125:1".parse().unwrap();

    // A: the seed, with every policy; its config is a file so that a broken reload can be refused.
    let a_extra = format!(
        "{}{}{}{}{}{}\
         [discovery.docker]\nenabled = true\nnode_label = \"mesh.node\"\n\
         [services.users]\nretry = {{ on = [\"5xx\"], max_attempts = 3 }}\n\
         [services.flaky]\ncircuit_breaker = {{ failures = 3, backoff = {{ min = \"2s\", max = \"10s\" }} }}\n\
         [services.stingy]\nretry = {{ on = [\"5xx\"], max_attempts = 2, budget_ratio = 0.0, min_per_second = 0.0 }}\n\
         [services.limited]\nrate_limit = {{ requests_per_second = 1.0, burst = 1.0 }}\n\
         [services.faulty]\nfault = {{ abort = {{ percent = 50.0, status = 503 }}, delay = {{ percent = 50.0, duration = \"5ms\" }} }}\n",
        static_service("users", users.addr),
        static_service("stingy", users.addr),
        static_service("limited", users.addr),
        static_service("faulty", users.addr),
        static_service("flaky", flaky.addr),
        static_service("dead", dead),
    );
    let a_text = gossip_config(ip_a, dir.path(), &[], &a_extra);
    let a_path = dir.path().join("a.toml");
    std::fs::write(&a_path, &a_text).unwrap();
    let a = start_from_file(&a_path).await;
    let _bad_port = scope
        .run(
            "bad-port",
            &[
                "-l",
                "mesh.enable=true",
                "-l",
                "mesh.service=web",
                "-l",
                "mesh.port=not-a-port",
            ],
            &[],
        )
        .await;
    let seed = a.gossip.unwrap();

    // B: joins A and serves `orders`, which A reaches over mutual TLS.
    let b = start(
        meshd::config::Config::from_toml(&gossip_config(
            ip_b,
            dir.path(),
            &[seed],
            &static_service("orders", orders.addr),
        ))
        .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;

    // C: another cluster name with the right key; A drops its datagrams as wrong-cluster.
    let c_text = gossip_config(ip_c, dir.path(), &[seed], "")
        .replace("[node]\n", "[node]\ncluster = \"elsewhere\"\n")
        .replace("join_timeout = \"10s\"", "join_timeout = \"1s\"");
    let c =
        start(meshd::config::Config::from_toml(&c_text).unwrap_or_else(|e| panic!("{e}"))).await;

    // D: a separate meshd process that joins and is then killed: suspected, checked, then down.
    let d_path = dir.path().join("d.toml");
    std::fs::write(&d_path, gossip_config(ip_d, dir.path(), &[seed], "")).unwrap();
    let mut d = Killed(
        Command::new(MESHD)
            .args(["run", "--config"])
            .arg(&d_path)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let node_b = format!("node-{ip_b}");
    let node_d = format!("node-{ip_d}");
    wait_member(&a, &node_b, &["alive"], Duration::from_secs(60)).await;
    wait_member(&a, &node_d, &["alive"], Duration::from_secs(60)).await;
    wait_member(&b, &node_d, &["alive"], Duration::from_secs(60)).await;

    // Traffic, all along until the queries are done.
    let stop = Arc::new(AtomicBool::new(false));
    let a = Arc::new(a);
    let traffic = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                traffic_round(&a).await;
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            rounds
        })
    };

    // The remote service works (so both agents have traffic), and the breaker has opened.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(&a).await;
        let open = m.lines().any(|l| {
            l.starts_with("meshd_circuit_breaker_open{") && l.contains("flaky") && l.ends_with(" 1")
        });
        let remote = sample(
            &m,
            "meshd_requests_total{direction=\"outbound\",service=\"orders\",status_class=\"2xx\"}",
        );
        if open && remote > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no open breaker or no remote traffic: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A datagram of junk on A's gossip port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(b"not a gossip datagram", seed).await.unwrap();
    // Plaintext on A's inbound port: a TLS handshake error (protocol).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(a.inbound).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    }
    // A reload of a broken file is refused (and the good file is put back).
    std::fs::write(&a_path, "[node\nthis is not toml").unwrap();
    let r = admin_post(&a, "/v1/reload").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    std::fs::write(&a_path, &a_text).unwrap();

    // D crashes: A or B suspects it, the other checks it directly, then it is down.
    d.0.kill().unwrap();
    let _ = d.0.wait();
    wait_member(&a, &node_d, &["down", "absent"], Duration::from_secs(90)).await;

    // Every metric the dashboard and the rules use is in a real scrape of A or B.
    let scraped = format!("{}\n{}", metrics(&a).await, metrics(&b).await);
    for name in &used {
        assert!(
            scraped
                .lines()
                .any(|l| l.strip_prefix(name.as_str()).is_some_and(|rest| {
                    rest.starts_with(['{', ' '])
                        || ["_bucket", "_count", "_sum"]
                            .iter()
                            .any(|s| rest.starts_with(s))
                })),
            "{name} is not in the agents' /metrics:\n{scraped}"
        );
    }

    // --- Prometheus ----------------------------------------------------------------------------------------
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(prom_dir.join("data")).unwrap();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: meshd\n    static_configs:\n      - targets: ['{a}', '{b}']\n",
            rules = repo(RULES).display(),
            a = a.admin,
            b = b.admin,
        ),
    )
    .unwrap();
    let port = free_port();
    let prom: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log_path = prom_dir.join("prometheus.log");
    let _server = Killed(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({e})", prometheus.display())),
    );
    let prom_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Both targets up and scraped a good few times.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let up = prom_scalar(prom, "sum(up{job=\"meshd\"})").await;
        let scrapes = prom_scalar(prom, "min(count_over_time(up{job=\"meshd\"}[5m]))").await;
        if up == Some(2.0) && scrapes.unwrap_or(0.0) >= 8.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both agents (up {up:?}, scrapes {scrapes:?}); log:\n{}",
            prom_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The template variables' queries find values.
    for (label, matcher) in [
        ("service", "meshd_requests_total"),
        ("instance", "meshd_build_info"),
    ] {
        let v = prom_get(
            prom,
            &format!(
                "/api/v1/label/{label}/values?match[]={}",
                urlencode(matcher)
            ),
        )
        .await
        .unwrap();
        assert!(
            v["data"].as_array().is_some_and(|a| !a.is_empty()),
            "variable {label}: {v}"
        );
    }

    // Every panel query: success and data. A query that has no data yet is asked again for a while (a rate
    // needs two scrapes of a series); one that errors fails at once.
    let mut pending: Vec<(String, String)> = targets.clone();
    // And what the traffic was meant to produce is there, so the panels show more than zeros.
    for expr in [
        "meshd_requests_total{direction=\"outbound\",status_class=\"5xx\"} > 0",
        "meshd_requests_total{direction=\"inbound\",service=\"orders\"} > 0",
        "meshd_proxy_errors_total{error=\"no-route\"} > 0",
        "meshd_circuit_breaker_open{service=\"flaky\"} == 1",
        "meshd_retries_total{service=\"users\",outcome=\"success\"} > 0",
        "meshd_retry_budget_exhausted_total{service=\"stingy\"} > 0",
        "meshd_rate_limited_total{service=\"limited\"} > 0",
        "meshd_faults_injected_total{service=\"faulty\"} > 0",
        "meshd_upstream_connects_total{result=\"refused\"} > 0",
        "meshd_gossip_members{state=\"alive\"} > 0",
        "meshd_gossip_packets_total{direction=\"in\",result=\"wrong-cluster\"} > 0",
        "meshd_gossip_checks_total > 0",
        "meshd_tls_handshake_errors_total{direction=\"inbound\"} > 0",
        "meshd_tls_cert_expiry_timestamp_seconds - time() > 86400",
        "meshd_discovery_events_total{action=\"start\"} > 0",
        "meshd_discovery_skipped_total{reason=\"bad-port\"} > 0",
        "meshd_config_reload_failures_total > 0",
    ] {
        pending.push(("(traffic)".into(), expr.into()));
    }
    let total = pending.len();
    let mut last: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !pending.is_empty() {
        last.clear();
        let mut still = Vec::new();
        for (title, expr) in pending {
            let q = substitute(&expr);
            let v = prom_query(prom, &q)
                .await
                .unwrap_or_else(|e| panic!("panel {title:?}: {q}: {e}"));
            assert_eq!(
                v["status"],
                "success",
                "panel {title:?}: {q}: {v}\nPrometheus log:\n{}",
                prom_log()
            );
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                last.push(format!("panel {title:?}: {q}: {v}"));
                still.push((title, expr));
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {total} queries returned no data:\n{}",
                last.len(),
                last.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Prometheus evaluates every alerting rule against the live series without error.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prom_get(prom, "/api/v1/rules").await.unwrap();
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        assert!(rules.len() >= 10, "{v}");
        let bad: Vec<&&serde_json::Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        if bad.is_empty() {
            break;
        }
        let failing = bad.iter().any(|r| r["health"] == "err");
        assert!(
            !failing && Instant::now() < deadline,
            "rules not evaluated cleanly: {bad:#?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    stop.store(true, Ordering::SeqCst);
    let rounds = traffic.await.unwrap();
    eprintln!(
        "dashboard: {} panel queries returned data after {rounds} rounds of traffic, in {:?}",
        targets.len(),
        started.elapsed()
    );
    drop(_server);
    c.stop().await;
    b.stop().await;
    match Arc::try_unwrap(a) {
        Ok(a) => a.stop().await,
        Err(_) => panic!("traffic still holds agent A"),
    }
}
