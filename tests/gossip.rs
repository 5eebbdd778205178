//! Gossip between real agents in one process: real UDP with sealed datagrams, real mutual TLS for state sync
//! and the agent-to-agent hop. Agents find each other through seeds, learn each other's endpoints, and forget
//! a host that leaves; agents with another key or cluster never join.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Mesh certificates for `nodes` and `dir/gossip.keys` (one key).
fn gossip_pki(dir: &Path, nodes: &[&str]) {
    pki(dir, nodes);
    write_keys(
        &dir.join("gossip.keys"),
        &[&meshd::membership::keyring::generate_line()],
    );
}

async fn gossip_agent(ip: &str, dir: &Path, seeds: &[SocketAddr], extra: &str) -> Agent {
    let cfg = gossip_config(ip, dir, seeds, extra);
    start(meshd::config::Config::from_toml(&cfg).unwrap_or_else(|e| panic!("{e}"))).await
}

/// An agent whose config is a file (reloads re-read it) and whose keyring is its own file, `<ip>.keys`, holding
/// `keys`; returns the agent and that keyring's path.
async fn agent_with_keyring(
    ip: &str,
    dir: &Path,
    seeds: &[SocketAddr],
    keys: &[&str],
) -> (Agent, std::path::PathBuf) {
    let keyring = dir.join(format!("{ip}.keys"));
    write_keys(&keyring, keys);
    let cfg = gossip_config(ip, dir, seeds, "").replace(
        &dir.join("gossip.keys").display().to_string(),
        &keyring.display().to_string(),
    );
    let path = dir.join(format!("{ip}.toml"));
    std::fs::write(&path, cfg).unwrap();
    (start_from_file(&path).await, keyring)
}

/// Members `/v1/members` shows as alive.
fn alive(v: &serde_json::Value) -> usize {
    v["members"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|m| m["state"] == "alive").count())
}

fn static_service(name: &str, addr: SocketAddr) -> String {
    format!("[[discovery.static]]\nservice = \"{name}\"\nendpoints = [\"{addr}\"]\n")
}

/// Waits until `pred` holds for the agent's `/v1/members`, or panics after `within`.
async fn wait_members(
    agent: &Agent,
    within: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let v = admin_json(agent, "/v1/members").await;
        if pred(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {within:?}; members: {v:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn member<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    v["members"].as_array()?.iter().find(|m| m["name"] == name)
}

fn state_of(v: &serde_json::Value, name: &str) -> String {
    member(v, name).map_or("absent".into(), |m| {
        m["state"].as_str().unwrap_or("").to_string()
    })
}

/// Endpoints of `service` in the agent's routing table, by node.
fn endpoints_of(agent: &Agent, service: &str) -> Vec<String> {
    let t = agent.table.borrow().clone();
    t.service(service).map_or(Vec::new(), |s| {
        s.endpoints
            .iter()
            .map(|e| match &e.location {
                meshd::routing::Location::Local { .. } => "local".to_string(),
                meshd::routing::Location::Remote { node, .. } => node.clone(),
            })
            .collect()
    })
}

async fn wait_endpoints(agent: &Agent, service: &str, within: Duration, want: &[&str]) {
    let deadline = Instant::now() + within;
    loop {
        let mut got = endpoints_of(agent, service);
        got.sort();
        let mut w: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        w.sort();
        if got == w {
            return;
        }
        if Instant::now() > deadline {
            panic!("{service}: endpoints by node {got:?}, wanted {w:?} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_agents_share_endpoints_and_a_leaving_one_is_forgotten_at_once() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(
        dir.path(),
        &["node-127.0.0.61", "node-127.0.0.62", "node-127.0.0.63"],
    );
    let users_b = backend("users-on-b").await;
    let users_c = backend("users-on-c").await;
    let orders = backend("orders-on-c").await;
    // Round-robin, so twenty requests show both endpoints (P2C would rightly favour the faster one).
    let a = gossip_agent(
        "127.0.0.61",
        dir.path(),
        &[],
        "[services.users]\nload_balancer = \"round-robin\"\n",
    )
    .await;
    let seed = a.gossip.unwrap();
    let b = gossip_agent(
        "127.0.0.62",
        dir.path(),
        &[seed],
        &static_service("users", users_b.addr),
    )
    .await;
    let mut c = gossip_agent(
        "127.0.0.63",
        dir.path(),
        &[seed],
        &format!(
            "{}{}",
            static_service("users", users_c.addr),
            static_service("orders", orders.addr)
        ),
    )
    .await;

    // Everyone sees everyone, and B and C (which only know A) have found each other.
    for (agent, others) in [
        (&a, ["node-127.0.0.62", "node-127.0.0.63"]),
        (&b, ["node-127.0.0.61", "node-127.0.0.63"]),
        (&c, ["node-127.0.0.61", "node-127.0.0.62"]),
    ] {
        wait_members(agent, Duration::from_secs(10), "full view", |v| {
            others.iter().all(|n| state_of(v, n) == "alive")
        })
        .await;
    }
    let v = admin_json(&a, "/v1/members").await;
    let mb = member(&v, "node-127.0.0.62").unwrap();
    assert_eq!(mb["inbound_addr"], b.inbound.to_string());
    assert_eq!(mb["gossip_addr"], b.gossip.unwrap().to_string());
    assert!(mb["generation"].as_u64().unwrap() > 0);

    // A has no endpoints of its own; it learns both users endpoints and orders, and reaches them over mTLS.
    wait_endpoints(
        &a,
        "users",
        Duration::from_secs(10),
        &["node-127.0.0.62", "node-127.0.0.63"],
    )
    .await;
    wait_endpoints(&a, "orders", Duration::from_secs(10), &["node-127.0.0.63"]).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = get(&a, "users", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        seen.insert(r.header("x-backend").to_string());
    }
    assert_eq!(
        seen.len(),
        2,
        "both users endpoints answer through A: {seen:?}"
    );
    let r = get(&b, "orders", "/").await;
    assert_eq!(r.status, StatusCode::OK, "B reaches C's orders");
    assert_eq!(r.header("x-backend"), "orders-on-c");

    let m = metrics(&a).await;
    assert!(
        sample(
            &m,
            "meshd_gossip_packets_total{direction=\"in\",result=\"ok\"}"
        ) > 0.0
    );
    assert!(sample(&m, "meshd_gossip_bytes_total{direction=\"out\"}") > 0.0);
    assert_eq!(sample(&m, "meshd_gossip_members{state=\"alive\"}"), 2.0);

    // C leaves (SIGTERM's path): A stops routing to it well before failure detection could have noticed.
    let left = Instant::now();
    c.shutdown();
    wait_endpoints(&a, "users", Duration::from_secs(3), &["node-127.0.0.62"]).await;
    wait_endpoints(&a, "orders", Duration::from_secs(1), &[]).await;
    let took = left.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "a leaving host is forgotten at once (took {took:?})"
    );
    // orders existed only on C, so A no longer knows it at all.
    let r = get(&a, "orders", "/").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("mesh-error"), "no-route");
    wait_members(&a, Duration::from_secs(3), "C down", |v| {
        state_of(v, "node-127.0.0.63") == "down"
    })
    .await;
    if let Some(t) = c.task.take() {
        t.await.unwrap().unwrap();
    }
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn agents_with_another_key_or_cluster_never_join_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(
        dir.path(),
        &["node-127.0.0.64", "node-127.0.0.65", "node-127.0.0.66"],
    );
    let other_keys = dir.path().join("other.keys");
    write_keys(&other_keys, &[&meshd::membership::keyring::generate_line()]);
    let a = gossip_agent("127.0.0.64", dir.path(), &[], "").await;
    let seed = a.gossip.unwrap();
    // Another key: its datagrams cannot be opened.
    let cfg = gossip_config("127.0.0.65", dir.path(), &[seed], "").replace(
        &dir.path().join("gossip.keys").display().to_string(),
        &other_keys.display().to_string(),
    );
    let cfg = cfg.replace("join_timeout = \"10s\"", "join_timeout = \"1s\"");
    let wrong_key =
        start(meshd::config::Config::from_toml(&cfg).unwrap_or_else(|e| panic!("{e}"))).await;
    // Another cluster name, the right key.
    let cfg = gossip_config("127.0.0.66", dir.path(), &[seed], "")
        .replace("[node]\n", "[node]\ncluster = \"elsewhere\"\n")
        .replace("join_timeout = \"10s\"", "join_timeout = \"1s\"");
    let wrong_cluster =
        start(meshd::config::Config::from_toml(&cfg).unwrap_or_else(|e| panic!("{e}"))).await;

    // Both keep announcing; A drops every datagram and counts why.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&a).await;
        let unknown = sample(
            &m,
            "meshd_gossip_packets_total{direction=\"in\",result=\"unknown-key\"}",
        );
        let cluster = sample(
            &m,
            "meshd_gossip_packets_total{direction=\"in\",result=\"wrong-cluster\"}",
        );
        if unknown >= 2.0 && cluster >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drops not counted: {unknown} unknown-key, {cluster} wrong-cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for agent in [&a, &wrong_key, &wrong_cluster] {
        let v = admin_json(agent, "/v1/members").await;
        assert_eq!(v["members"].as_array().unwrap().len(), 0, "{v:#}");
    }
    // Not joined: ready only as degraded after join_timeout (10 s), never reporting a member.
    let r = get_admin(&wrong_key, "/ready").await;
    assert!(
        r.body.contains("degraded") || r.status != StatusCode::OK,
        "{}",
        r.body
    );
    wrong_key.stop().await;
    wrong_cluster.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_restarted_host_replaces_its_old_self() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(dir.path(), &["node-127.0.0.67", "node-127.0.0.68"]);
    let users = backend("users").await;
    let users2 = backend("users-after-restart").await;
    let a = gossip_agent("127.0.0.67", dir.path(), &[], "").await;
    let seed = a.gossip.unwrap();
    let b = gossip_agent(
        "127.0.0.68",
        dir.path(),
        &[seed],
        &static_service("users", users.addr),
    )
    .await;
    let v = wait_members(&a, Duration::from_secs(10), "B alive", |v| {
        state_of(v, "node-127.0.0.68") == "alive"
    })
    .await;
    let first_gen = member(&v, "node-127.0.0.68").unwrap()["generation"]
        .as_u64()
        .unwrap();
    wait_endpoints(&a, "users", Duration::from_secs(10), &["node-127.0.0.68"]).await;
    b.stop().await;
    // Same name, new run, another endpoint.
    let b2 = gossip_agent(
        "127.0.0.68",
        dir.path(),
        &[seed],
        &static_service("users", users2.addr),
    )
    .await;
    let v = wait_members(
        &a,
        Duration::from_secs(10),
        "B back with a new generation",
        |v| {
            member(v, "node-127.0.0.68").is_some_and(|m| {
                m["state"] == "alive" && m["generation"].as_u64().unwrap() > first_gen
            })
        },
    )
    .await;
    assert_eq!(
        v["members"].as_array().unwrap().len(),
        1,
        "one entry per host: {v:#}"
    );
    wait_endpoints(&a, "users", Duration::from_secs(10), &["node-127.0.0.68"]).await;
    let r = get(&a, "users", "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-backend"), "users-after-restart");
    b2.stop().await;
    a.stop().await;
}

async fn get_admin(agent: &Agent, path: &str) -> Got {
    let req = http::Request::get(format!("http://{}{path}", agent.admin))
        .body(full(""))
        .unwrap();
    read(h1_client().request(req).await.unwrap()).await
}

/// A `meshd run` process, killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_host_is_dropped_within_the_detection_bound() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(dir.path(), &["node-127.0.0.71", "node-127.0.0.72"]);
    let local = backend("users-on-a").await;
    let far = backend("users-on-b").await;
    let a = gossip_agent(
        "127.0.0.71",
        dir.path(),
        &[],
        &format!(
            "{}[services.users]\nload_balancer = \"round-robin\"\n",
            static_service("users", local.addr)
        ),
    )
    .await;
    // B is a real process on fixed ports (its own loopback address), so it can be SIGKILLed.
    let cfg = gossip_config(
        "127.0.0.72",
        dir.path(),
        &[a.gossip.unwrap()],
        &static_service("users", far.addr),
    )
    .replace("127.0.0.72:0", "127.0.0.72:4140");
    // Then one port per listener.
    let cfg = cfg
        .replace(
            "[inbound]\nlisten = \"127.0.0.72:4140\"",
            "[inbound]\nlisten = \"127.0.0.72:4143\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.72:4140\"",
            "[admin]\nlisten = \"127.0.0.72:9990\"",
        )
        .replace(
            "[gossip]\nlisten = \"127.0.0.72:4140\"",
            "[gossip]\nlisten = \"127.0.0.72:4145\"",
        );
    let path = dir.path().join("b.toml");
    std::fs::write(&path, &cfg).unwrap();
    let b = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready("127.0.0.72:9990".parse().unwrap()).await;
    wait_endpoints(
        &a,
        "users",
        Duration::from_secs(10),
        &["local", "node-127.0.0.72"],
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(get(&a, "users", "/").await.header("x-backend").to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // SIGKILL: no leave message. Failure detection finds it: probe (1.5 s) + suspicion (4 s) and gossip.
    let killed = Instant::now();
    drop(b);
    wait_endpoints(&a, "users", Duration::from_secs(15), &["local"]).await;
    let took = killed.elapsed();
    eprintln!("a killed host was dropped after {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "dropped before any probe could fail: {took:?}"
    );
    for _ in 0..10 {
        let r = get(&a, "users", "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-backend"), "users-on-a");
    }
    // The member list is published once a second.
    wait_members(&a, Duration::from_secs(2), "B down", |v| {
        state_of(v, "node-127.0.0.72") == "down"
    })
    .await;
    a.stop().await;
}

#[tokio::test]
async fn a_partition_heals_into_one_view() {
    // Four agents; the partition is made by the transport itself: each half gets a keyring the other half does
    // not have, so every datagram across is dropped as unknown-key. Healing installs both keys everywhere.
    let dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.0.81", "127.0.0.82", "127.0.0.83", "127.0.0.84"];
    let nodes: Vec<String> = ips.iter().map(|ip| format!("node-{ip}")).collect();
    gossip_pki(
        dir.path(),
        &nodes.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let shared = std::fs::read_to_string(dir.path().join("gossip.keys")).unwrap();
    let (k1, k2) = (
        meshd::membership::keyring::generate_line(),
        meshd::membership::keyring::generate_line(),
    );
    let mut agents = Vec::new();
    let mut seed = Vec::new();
    let mut paths = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let (agent, keys) = agent_with_keyring(ip, dir.path(), &seed, &[shared.trim()]).await;
        if i == 0 {
            seed.push(agent.gossip.unwrap());
        }
        agents.push(agent);
        paths.push(keys);
    }
    // The later agents' seed is the first, which learns of them by gossip. After the partition, the far half
    // (3-4) keeps announcing to that seed, and that is how the halves meet again.
    for a in &agents {
        wait_members(a, Duration::from_secs(10), "full view", |v| alive(v) == 3).await;
    }
    let split = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    for (i, p) in paths.iter().enumerate() {
        let k = if i < 2 { split(&[&k1]) } else { split(&[&k2]) };
        write_keys(p, &k.iter().map(String::as_str).collect::<Vec<_>>());
        let r = admin_post(&agents[i], "/v1/reload").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // Each half sees the other half down.
    for (i, a) in agents.iter().enumerate() {
        let others: Vec<String> = if i < 2 {
            nodes[2..].to_vec()
        } else {
            nodes[..2].to_vec()
        };
        wait_members(a, Duration::from_secs(30), "partitioned", |v| {
            others.iter().all(|n| state_of(v, n) == "down")
        })
        .await;
    }
    let m = metrics(&agents[0]).await;
    assert!(
        sample(
            &m,
            "meshd_gossip_packets_total{direction=\"in\",result=\"unknown-key\"}"
        ) > 0.0
    );
    // Heal: every agent decrypts both halves' keys (each keeps encrypting with its own first key).
    let healed = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        let (first, second) = if i < 2 { (&k1, &k2) } else { (&k2, &k1) };
        write_keys(p, &[first, second]);
        let r = admin_post(&agents[i], "/v1/reload").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    for a in &agents {
        wait_members(a, Duration::from_secs(60), "healed", |v| alive(v) == 3).await;
    }
    eprintln!(
        "the partition healed into one view in {:?}",
        healed.elapsed()
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test]
async fn keys_rotate_install_use_remove_without_a_lost_packet() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(dir.path(), &["node-127.0.0.91", "node-127.0.0.92"]);
    let old = std::fs::read_to_string(dir.path().join("gossip.keys")).unwrap();
    let old = old.trim().to_string();
    let new = meshd::membership::keyring::generate_line();
    let mut agents = Vec::new();
    let mut keyfiles = Vec::new();
    for ip in ["127.0.0.91", "127.0.0.92"] {
        let seeds: Vec<SocketAddr> = agents.iter().map(|a: &Agent| a.gossip.unwrap()).collect();
        let (agent, keys) = agent_with_keyring(ip, dir.path(), &seeds, &[&old]).await;
        agents.push(agent);
        keyfiles.push(keys);
    }
    for a in &agents {
        wait_members(a, Duration::from_secs(10), "joined", |v| alive(v) > 0).await;
    }
    // install (second everywhere) → use (first everywhere) → remove the old one; one host at a time, with
    // gossip flowing between the steps.
    for step in [vec![&old, &new], vec![&new, &old], vec![&new]] {
        for (i, a) in agents.iter().enumerate() {
            let lines: Vec<&str> = step.iter().map(|s| s.as_str()).collect();
            write_keys(&keyfiles[i], &lines);
            let r = admin_post(a, "/v1/reload").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for a in &agents {
        let m = metrics(a).await;
        for reason in ["unknown-key", "auth-failed"] {
            let n = sample(
                &m,
                &format!("meshd_gossip_packets_total{{direction=\"in\",result=\"{reason}\"}}"),
            );
            assert_eq!(n, 0.0, "{reason}: a packet was lost during the rotation");
        }
        assert!(
            sample(
                &m,
                "meshd_gossip_packets_total{direction=\"in\",result=\"ok\"}"
            ) > 10.0
        );
        let v = admin_json(a, "/v1/members").await;
        assert!(
            v["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["state"] == "alive"),
            "{v:#}"
        );
    }
    // A broken keyring is refused on reload: the running keys stay, the reload answers 400.
    std::fs::write(&keyfiles[0], "not base64!\n").unwrap();
    let r = admin_post(&agents[0], "/v1/reload").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("gossip.keyring"), "{}", r.body);
    let m = metrics(&agents[0]).await;
    assert_eq!(
        sample(&m, "meshd_gossip_keyring_reload_failures_total"),
        1.0
    );
    for a in agents {
        a.stop().await;
    }
}

#[test]
fn gossip_config_problems_are_listed_with_their_keys_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check("no-keyring.toml", "[gossip]\nseeds = [\"10.0.0.9:4145\"]\n");
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("gossip.keyring") && err.contains("missing"),
        "{err}"
    );

    let (code, err) = check(
        "self-seed.toml",
        "[node]\nadvertise_addr = \"10.0.0.5\"\n[gossip]\nseeds = [\"10.0.0.5:4145\", \"bad seed!\"]\nkeyring = \"/x\"\n",
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("gossip.seeds[0]") && err.contains("own gossip address"),
        "{err}"
    );
    assert!(err.contains("gossip.seeds[1]"), "{err}");

    let missing = dir.path().join("absent.keys");
    let (code, err) = check(
        "unreadable.toml",
        &format!(
            "[inbound]\ninsecure_plaintext = true\n[gossip]\nkeyring = \"{}\"\n",
            missing.display()
        ),
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("gossip.keyring") && err.contains("absent.keys"),
        "{err}"
    );

    let (code, err) = check(
        "profile.toml",
        "[gossip]\nkeyring = \"/x\"\nprofile = \"moon\"\n",
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("gossip.profile"), "{err}");
}

#[tokio::test]
async fn a_rolling_restart_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    gossip_pki(
        dir.path(),
        &["node-127.0.0.95", "node-127.0.0.96", "node-127.0.0.97"],
    );
    let on_b = backend("users-on-b").await;
    let on_c = backend("users-on-c").await;
    let a = gossip_agent("127.0.0.95", dir.path(), &[], "[services.users]\n").await;
    let seed = [a.gossip.unwrap()];
    let b_cfg = static_service("users", on_b.addr);
    let c_cfg = static_service("users", on_c.addr);
    let mut hosts = vec![
        Some(gossip_agent("127.0.0.96", dir.path(), &seed, &b_cfg).await),
        Some(gossip_agent("127.0.0.97", dir.path(), &seed, &c_cfg).await),
    ];
    wait_endpoints(
        &a,
        "users",
        Duration::from_secs(10),
        &["node-127.0.0.96", "node-127.0.0.97"],
    )
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, url) = (stop.clone(), a.outbound);
        clients.push(tokio::spawn(async move {
            let client = h1_client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{url}/"))
                    .header("host", "users")
                    .body(full(""))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{} {:?}",
                        r.status(),
                        r.headers().get("mesh-error")
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }));
    }
    // Restart B, then C: each leaves, drains, comes back under the same name, and is routed to again.
    for (i, (ip, cfg)) in [("127.0.0.96", &b_cfg), ("127.0.0.97", &c_cfg)]
        .into_iter()
        .enumerate()
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(old) = hosts[i].take() {
            old.stop().await;
        }
        hosts[i] = Some(gossip_agent(ip, dir.path(), &seed, cfg).await);
        wait_endpoints(
            &a,
            "users",
            Duration::from_secs(10),
            &["node-127.0.0.96", "node-127.0.0.97"],
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in clients {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 100, "traffic flowed ({ok} requests)");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    for h in hosts.into_iter().flatten() {
        h.stop().await;
    }
    a.stop().await;
}
