//! What an operator sees of live traffic: `/v1/stats` and `meshd stat`, `/v1/tap` and `meshd tap`, and the
//! access log — with a real agent, a real backend and the real `meshd` binary as the client.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn service(stats: &serde_json::Value, name: &str, direction: &str) -> serde_json::Value {
    stats["services"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["service"] == name && s["direction"] == direction)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no {direction} {name} in {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_requests_failures_and_latency_and_meshd_stat_shows_them() {
    let ok = backend("ok").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n",
        ok.addr
    ))
    .await;
    for _ in 0..40 {
        assert_eq!(get(&agent, "users", "/").await.status, 200);
    }
    // The slow failures: the backend answers 503 after 200 ms.
    ok.faults.set_status(503);
    ok.faults.set_delay(200);
    for _ in 0..10 {
        assert_eq!(get(&agent, "users", "/").await.status, 503);
    }
    ok.faults.set_status(0);
    ok.faults.set_delay(0);
    // An unknown service: meshd's own 404, counted under "".
    assert_eq!(get(&agent, "nobody", "/").await.status, 404);

    let stats = admin_json(&agent, "/v1/stats?window=60s").await;
    assert_eq!(stats["window_seconds"], 60);
    let users = service(&stats, "users", "outbound");
    assert_eq!(users["requests"], 50, "{users}");
    let success = users["success_rate"].as_f64().unwrap();
    assert!((success - 0.8).abs() < 1e-9, "{users}");
    let p50 = users["p50_ms"].as_f64().unwrap();
    let p99 = users["p99_ms"].as_f64().unwrap();
    assert!(p50 < 100.0, "most requests are fast: {users}");
    assert!(p99 >= 200.0, "the slow ones show at p99: {users}");
    // Ten 5xx in a row opened the endpoint's breaker (the default: five consecutive failures).
    assert_eq!(users["breakers_open"], 1);
    assert_eq!(users["endpoints"], 1);
    let none = service(&stats, "", "outbound");
    assert_eq!(
        (none["requests"].as_u64(), none["success_rate"].as_f64()),
        (Some(1), Some(0.0))
    );

    let bad = read(
        h1_client()
            .request(
                http::Request::get(format!("http://{}/v1/stats?window=2h", agent.admin))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    // `meshd stat --once` draws the same figures; `--json` gives the document.
    let admin = agent.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let once = Command::new(MESHD)
            .args(["stat", "--once", "--window", "60s", "--admin", &admin])
            .output()
            .unwrap();
        let json = Command::new(MESHD)
            .args(["stat", "--json", "--admin", &admin])
            .output()
            .unwrap();
        (once, json)
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.0.stdout).to_string();
    assert!(out.0.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("users "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "outbound", "{table}");
    assert_eq!(cells[3], "80.00%", "{table}");
    assert_eq!(cells[7], "1/1", "{table}");
    let doc: serde_json::Value = serde_json::from_slice(&out.1.stdout).unwrap();
    assert_eq!(doc["window_seconds"], 30);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_summaries_of_one_service_without_query_strings() {
    let ok = backend("ok").await;
    let other = backend("other").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n[[discovery.static]]\nservice = \"orders\"\nendpoints = [\"{}\"]\n",
        ok.addr, other.addr
    ))
    .await;
    // The real CLI, stopping after three requests of `users`.
    let mut tap = Command::new(MESHD)
        .args([
            "tap",
            "users",
            "--count",
            "3",
            "--admin",
            &agent.admin.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says it is tapping once subscribed.
    let mut err = BufReader::new(tap.stderr.take().unwrap());
    let mut first = String::new();
    tokio::task::block_in_place(|| err.read_line(&mut first).unwrap());
    assert!(first.starts_with("tapping users"), "{first}");
    get(&agent, "orders", "/not-this-one").await;
    get(&agent, "users", "/a?secret=1").await;
    ok.faults.set_status(500);
    get(&agent, "users", "/b").await;
    ok.faults.set_status(0);
    get(&agent, "users", "/c/d?token=x").await;
    let pid = tap.id();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || tap.wait_with_output().unwrap()),
    )
    .await
    .unwrap_or_else(|_| {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("meshd tap did not end after three requests")
    })
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("outbound GET    /a "), "{text}");
    assert!(
        lines[1].contains("/b ") && lines[1].contains(" 500 "),
        "{text}"
    );
    assert!(
        lines[2].contains("/c/d ") && lines[2].contains(&ok.addr.to_string()),
        "{text}"
    );
    assert!(
        !text.contains("secret") && !text.contains("token") && !text.contains("orders"),
        "{text}"
    );

    // The raw stream: JSON lines, filtered by direction too.
    let mut s = std::net::TcpStream::connect(agent.admin).unwrap();
    write!(
        s,
        "GET /v1/tap?service=users&direction=outbound HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let n = tokio::task::block_in_place(|| r.read_line(&mut head).unwrap());
        assert!(n > 0, "the tap stream ended in its head: {head}");
    }
    assert!(head.contains("application/x-ndjson"), "{head}");
    get(&agent, "users", "/e?x=1").await;
    let mut size = String::new();
    let mut line = String::new();
    tokio::task::block_in_place(|| {
        r.read_line(&mut size).unwrap();
        r.read_line(&mut line).unwrap();
    });
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["path"], "/e");
    assert_eq!(v["status"], 200);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["endpoint"], ok.addr.to_string());
    assert!(v["request_id"].is_string());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_writes_one_json_line_per_request() {
    let ok = backend("ok").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let agent = agent(&format!(
        "[log]\naccess = \"{}\"\n[[discovery.static]]\nservice = \"users\"\nendpoints = [\"{}\"]\n",
        log.display(),
        ok.addr
    ))
    .await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let req = http::Request::post(agent.url("/orders/9?card=4111"))
        .header("host", "users")
        .header("traceparent", traceparent)
        .header("mesh-request-id", "req-42")
        .body(full("hello"))
        .unwrap();
    let got = read(h1_client().request(req).await.unwrap()).await;
    assert_eq!(got.status, 200);
    assert_eq!(get(&agent, "nobody", "/").await.status, 404);
    // The writer thread flushes once its queue is empty.
    let mut lines = Vec::new();
    for _ in 0..400 {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["service"], "users");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/orders/9");
    assert_eq!(first["status"], 200);
    assert_eq!(first["request_id"], "req-42");
    assert_eq!(first["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(first["endpoint"], ok.addr.to_string());
    assert_eq!(first["retries"], 0);
    assert_eq!(first["request_bytes"], 5);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert!(!lines[0].contains("4111"), "no query strings: {}", lines[0]);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["status"], 404);
    assert_eq!(second["mesh_error"], "no-route");
    assert_eq!(second["service"], "");
    let metrics = metrics(&agent).await;
    assert_eq!(sample(&metrics, "meshd_access_log_dropped_total"), 0.0);
    agent.stop().await;
}

#[test]
fn bad_access_log_settings_are_listed_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meshd.toml");
    std::fs::write(
        &path,
        "[log]\naccess = \"relative/path.log\"\naccess_sample = 1.5\n",
    )
    .unwrap();
    let out = Command::new(MESHD)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("log.access") && text.contains("absolute file path"),
        "{text}"
    );
    assert!(
        text.contains("log.access_sample") && text.contains("above 0 and at most 1"),
        "{text}"
    );
}
