//! Resource limits a production proxy needs: the open-file limit, a connection cap and header timeout on every
//! listener (the admin port included), and memory that goes back to the system after a burst of connections.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_admin_connections_starves_nothing() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let b = backend("svc").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
        b.addr
    ))
    .await;
    // 600 connections to the admin port that never send a byte (its cap is 128).
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(TcpStream::connect(agent.admin).await.unwrap());
    }
    // The proxy is unaffected, and /ready still answers: idle connections make room for new ones.
    let started = Instant::now();
    let got = get(&agent, "svc", "/").await;
    assert_eq!(got.status, StatusCode::OK);
    let ready = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(agent.admin).await.unwrap();
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
    .expect("/ready answered while 600 idle connections were open");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let m = metrics(&agent).await;
    assert!(
        sample(&m, "meshd_connections_evicted_total{direction=\"admin\"}") >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "meshd_open_connections{direction=\"admin\"}") <= 128.0,
        "{m}"
    );
    drop(idle);
    agent.stop().await;
}

#[tokio::test]
async fn silent_admin_connections_are_cut_off_at_the_header_timeout() {
    let cfg = "[node]\nname = \"n\"\n[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"1s\"\n";
    let agent = start(meshd::config::Config::from_toml(cfg).unwrap()).await;
    let mut s = TcpStream::connect(agent.admin).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    // And a slow head is cut off too.
    let mut s = TcpStream::connect(agent.admin).await.unwrap();
    s.write_all(b"GET /ready HTTP/1.1\r\n").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_connection_errors_total{direction=\"admin\",reason=\"header-timeout\"}"
        ),
        2.0,
        "{m}"
    );
    agent.stop().await;
}

/// The soft and hard "Max open files" of a process.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    (parts[3].to_string(), parts[4].to_string())
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = std::env::temp_dir().join(format!("meshd-rlimit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("meshd.toml");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &cfg,
        format!("[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\ninsecure_plaintext = true\n[admin]\nlisten = \"{admin}\"\n"),
    )
    .unwrap();
    // Started with the usual soft limit of 1024.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 1024 && exec {MESHD} run --config {}",
            cfg.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut raised = None;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(admin).is_ok() {
            raised = Some(open_file_limits(pid));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let (soft, hard) = raised.expect("meshd started");
    assert_eq!(soft, hard, "soft limit {soft}, hard {hard}");
    assert_ne!(soft, "1024");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_after_bursts_of_connections() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let b = backend("burst").await;
    let (mut child, lines) = spawn_dev(&[
        "--service",
        &format!("burst={}", b.addr),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
    ]);
    let out = listener_after(&lines, "outbound");
    let pid = child.id();
    let idle = rss_kib(pid);
    let mut report = Vec::new();
    for round in 0..2 {
        // 2,000 clients at once, each with a request in flight, then all gone.
        let mut conns = Vec::new();
        for _ in 0..2000 {
            let mut s = TcpStream::connect(out).await.unwrap();
            s.write_all(b"GET /slow?ms=300 HTTP/1.1\r\nHost: burst\r\n\r\n")
                .await
                .unwrap();
            conns.push(s);
        }
        let mut served = 0;
        for s in &mut conns {
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
                && buf[..n].starts_with(b"HTTP/1.1 200")
            {
                served += 1;
            }
        }
        let peak = rss_kib(pid);
        drop(conns);
        assert!(served > 1900, "round {round}: {served} of 2000 served");
        // Freed memory goes back to the system within seconds (jemalloc's background purging).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut now = rss_kib(pid);
        while now > idle + 24 * 1024 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            now = rss_kib(pid);
        }
        report.push((peak, now));
        assert!(
            now <= idle + 24 * 1024,
            "round {round}: idle {idle} KiB, peak {peak} KiB, still {now} KiB 30 s after the burst"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("idle {idle} KiB; (peak, after) per burst: {report:?}");
}

/// Starts `meshd dev` and returns it with the lines of its banner.
fn spawn_dev(args: &[&str]) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = Command::new(MESHD)
        .arg("dev")
        .args(args)
        .env("RUST_LOG", "warn")
        .env("DOCKER_HOST", "unix:///nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    (child, lines)
}

fn listener_after(lines: &[String], label: &str) -> std::net::SocketAddr {
    lines
        .iter()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(label)?;
            let addr = rest.split_whitespace().next()?;
            addr.trim_start_matches("http://").parse().ok()
        })
        .unwrap_or_else(|| panic!("no {label} address in {lines:?}"))
}

fn capped_outbound(cap: usize, backend: std::net::SocketAddr) -> meshd::config::Config {
    let cfg = agent_config_with(
        "127.0.0.1",
        &format!("max_connections = {cap}\nidle_timeout = \"60s\""),
        &format!("[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{backend}\"]\n"),
    );
    meshd::config::Config::from_toml(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn at_the_cap_a_connection_that_goes_idle_makes_room() {
    let b = backend("svc").await;
    let agent = start(capped_outbound(2, b.addr)).await;
    // Both slots busy with a slow request each.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(agent.outbound).await.unwrap();
        s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: svc\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third client waits at the cap; once the slow requests finish, their connections sit idle (kept alive
    // for 60 s) and one is evicted for it, well before any idle timeout.
    let third = tokio::spawn(async move {
        let mut s = TcpStream::connect(agent.outbound).await.unwrap();
        let out = keepalive_get(&mut s, "/").await;
        (out, agent)
    });
    let (out, agent) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the third connection was served once a slot went idle")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The slow requests were answered in full first: eviction closes only idle connections.
    for s in &mut busy {
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let m = metrics(&agent).await;
    assert!(
        sample(
            &m,
            "meshd_connections_evicted_total{direction=\"outbound\"}"
        ) >= 1.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_listener_slot() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let b = backend("svc").await;
    let agent = start(capped_outbound(1, b.addr)).await;
    let stream = TcpStream::connect(agent.outbound).await.unwrap();
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        "ws://svc/ws",
    )
    .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    // The WebSocket is idle as HTTP goes, but it is open: a new connection neither evicts it nor gets in.
    let waiting = tokio::spawn({
        let outbound = agent.outbound;
        async move {
            let mut s = TcpStream::connect(outbound).await.unwrap();
            keepalive_get(&mut s, "/").await
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "a second connection got past a cap of 1"
    );
    ws.send(Message::text("still here")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "STILL HERE"),
        other => panic!("{other:?}"),
    }
    let m = metrics(&agent).await;
    assert_eq!(
        sample(&m, "meshd_open_connections{direction=\"outbound\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "meshd_connections_evicted_total{direction=\"outbound\"}"
        ),
        0.0,
        "{m}"
    );
    // Once it closes, the waiting client gets its slot.
    ws.close(None).await.unwrap();
    drop(ws);
    let out = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once the WebSocket closed")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    agent.stop().await;
}

#[tokio::test]
async fn an_evicted_connection_with_half_a_head_is_still_cut_off_at_the_header_timeout() {
    let b = backend("svc").await;
    let cfg = agent_config_with(
        "127.0.0.1",
        "max_connections = 1\nidle_timeout = \"60s\"\nheader_timeout = \"1s\"",
        &format!(
            "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
            b.addr
        ),
    );
    let agent = start(meshd::config::Config::from_toml(&cfg).unwrap()).await;
    // Half a request head, then nothing: evicting it cannot wait for the head to finish.
    let mut stalled = TcpStream::connect(agent.outbound).await.unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = tokio::spawn({
        let outbound = agent.outbound;
        async move {
            let mut s = TcpStream::connect(outbound).await.unwrap();
            keepalive_get(&mut s, "/").await
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the stalled connection gave up its slot")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    agent.stop().await;
}
