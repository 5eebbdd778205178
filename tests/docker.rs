//! Docker discovery against the real Docker engine: labelled containers started here become routable through
//! the outbound proxy of an in-process agent, and are withdrawn when Docker says they go away.
//!
//! Each test creates its own uniquely named containers and networks (removed on drop, even on failure), all
//! labelled `mesh.node=<the test's node>`, and its agent sets `node_label = "mesh.node"`: tests running at the
//! same time on one daemon never see each other's containers. Waits are bounded generously
//! ([`support::PATIENCE`]); no test asserts a timing.

mod common;
#[path = "docker/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use meshd::config::Config;
use serde_json::Value;
use support::*;

async fn start_agent(scope: &Scope, host: Option<&str>) -> Agent {
    let cfg =
        Config::from_toml(&docker_agent_config(scope, host)).unwrap_or_else(|e| panic!("{e}"));
    start(cfg).await
}

fn set(addrs: &[SocketAddr]) -> BTreeSet<SocketAddr> {
    addrs.iter().copied().collect()
}

async fn admin_json(agent: &Agent, path: &str) -> Value {
    let req = Request::get(format!("http://{}{path}", agent.admin))
        .body(full(""))
        .unwrap();
    let got = read(h1_client().request(req).await.unwrap()).await;
    serde_json::from_str(&got.body).unwrap()
}

/// Waits until a request for `service` through the outbound proxy is answered by backend `name`.
async fn wait_routed(agent: &Agent, service: &str, name: &str) {
    eventually(
        &format!("{service} answered by {name} through the proxy"),
        || async {
            let got = get(agent, service, "/").await;
            got.status == StatusCode::OK && got.body == name
        },
    )
    .await;
}

/// Asserts a request for `service` through the proxy is refused by meshd itself (no endpoint to send to).
async fn assert_not_routed(agent: &Agent, service: &str) {
    let got = get(agent, service, "/").await;
    assert!(
        got.status == StatusCode::SERVICE_UNAVAILABLE || got.status == StatusCode::NOT_FOUND,
        "{service}: expected 503/404 from meshd, got {} {:?}",
        got.status,
        got.body
    );
    assert!(!got.header("mesh-error").is_empty(), "{got:?}");
}

const ENABLE: &str = "mesh.enable=true";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_container_is_routable_through_the_proxy() {
    let scope = Scope::new("route").await;
    let net = scope.network("n").await;
    let agent = start_agent(&scope, None).await;

    // An unlabelled container first, then a labelled one: events arrive in order, so once the second is
    // routable the first has been seen and ignored.
    let plain = scope.run("plain", &["--network", &net], &[]).await;
    let web = scope
        .run(
            "web",
            &["--network", &net, "-l", ENABLE, "-l", "mesh.service=web"],
            &[],
        )
        .await;
    let addr = addr_on(&web, &net).await;
    wait_endpoints(&agent.table, "web", &set(&[addr])).await;
    wait_routed(&agent, "web", "web").await;
    assert!(agent.table.borrow().service(&plain.name).is_none());

    let services = admin_json(&agent, "/v1/services").await;
    let docker = &services["discovery"]["docker"];
    assert_eq!(docker["enabled"], true, "{services}");
    assert_eq!(docker["synced"], true, "{services}");
    assert_eq!(docker["degraded"], false, "{services}");
    let web_json = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    assert_eq!(web_json["endpoints"][0]["source"], "docker");
    assert_eq!(web_json["endpoints"][0]["address"], addr.to_string());

    let scrape = metrics(&agent).await;
    assert_eq!(
        sample(&scrape, "meshd_discovery_endpoints{source=\"docker\"}"),
        1.0
    );
    assert!(
        sample(
            &scrape,
            "meshd_discovery_events_total{action=\"start\",source=\"docker\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&scrape, "meshd_discovery_degraded{source=\"docker\"}"),
        0.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_gates_routing() {
    let scope = Scope::new("health").await;
    let net = scope.network("n").await;
    let agent = start_agent(&scope, None).await;

    // Failing checks during the start period keep it "starting"; one success makes it healthy; after that a
    // single failure (retries 1) makes it unhealthy.
    let hc = scope
        .run(
            "hc",
            &[
                "--network",
                &net,
                "-l",
                ENABLE,
                "-l",
                "mesh.service=hc",
                "--health-interval",
                "300ms",
                "--health-retries",
                "1",
                "--health-start-period",
                "60s",
            ],
            &["--health", "fail"],
        )
        .await;
    let addr = addr_on(&hc, &net).await;
    eventually("two failed health checks", || async {
        inspect(&hc, "{{.State.Health.Status}} {{len .State.Health.Log}}")
            .await
            .split_once(' ')
            .is_some_and(|(s, n)| s == "starting" && n.parse::<usize>().unwrap_or(0) >= 2)
    })
    .await;
    // A later container proves discovery has processed hc's start.
    let mark = scope
        .run(
            "mark",
            &["--network", &net, "-l", ENABLE, "-l", "mesh.service=mark"],
            &[],
        )
        .await;
    wait_endpoints(&agent.table, "mark", &set(&[addr_on(&mark, &net).await])).await;
    assert!(
        local_addrs(&agent.table.borrow(), "hc").is_empty(),
        "routable while starting"
    );
    assert_not_routed(&agent, "hc").await;

    direct(addr, "POST", "/health/ok").await.unwrap();
    wait_endpoints(&agent.table, "hc", &set(&[addr])).await;
    wait_routed(&agent, "hc", "hc").await;

    direct(addr, "POST", "/health/fail").await.unwrap();
    wait_endpoints(&agent.table, "hc", &BTreeSet::new()).await;
    assert_eq!(inspect(&hc, "{{.State.Health.Status}}").await, "unhealthy");
    assert_not_routed(&agent, "hc").await;

    direct(addr, "POST", "/health/ok").await.unwrap();
    wait_endpoints(&agent.table, "hc", &set(&[addr])).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stop_and_pause_withdraw() {
    let scope = Scope::new("kill").await;
    let net = scope.network("n").await;
    let agent = start_agent(&scope, None).await;

    let run = |name: &'static str, extra: &'static [&'static str]| {
        let (scope, net) = (&scope, net.clone());
        async move {
            let svc = format!("mesh.service={name}");
            let c = scope
                .run(name, &["--network", &net, "-l", ENABLE, "-l", &svc], extra)
                .await;
            let addr = addr_on(&c, &net).await;
            (c, addr)
        }
    };
    // "slow" keeps serving for a minute after SIGTERM, like an app draining in-flight work.
    let ((k, k_addr), (s, s_addr), (p, p_addr)) = tokio::join!(
        run("k", &[]),
        run("slow", &["--stop-delay", "60"]),
        run("p", &[])
    );
    for (svc, addr) in [("k", k_addr), ("slow", s_addr), ("p", p_addr)] {
        wait_endpoints(&agent.table, svc, &set(&[addr])).await;
    }

    docker_ok(&["kill", &k.id]).await;
    wait_endpoints(&agent.table, "k", &BTreeSet::new()).await;
    assert_not_routed(&agent, "k").await;

    // docker stop: withdrawn on the stop signal, while the container still runs and answers.
    let stopping = {
        let id = s.id.clone();
        tokio::spawn(async move { docker(&["stop", "-t", "90", &id]).await })
    };
    wait_endpoints(&agent.table, "slow", &BTreeSet::new()).await;
    assert_eq!(inspect(&s, "{{.State.Running}}").await, "true");
    let answer = direct(s_addr, "GET", "/").await.unwrap();
    assert!(answer.ends_with("slow"), "{answer}");
    assert_not_routed(&agent, "slow").await;
    stopping.abort();

    docker_ok(&["pause", &p.id]).await;
    wait_endpoints(&agent.table, "p", &BTreeSet::new()).await;
    docker_ok(&["unpause", &p.id]).await;
    wait_endpoints(&agent.table, "p", &set(&[p_addr])).await;
    wait_routed(&agent, "p", "p").await;

    let scrape = metrics(&agent).await;
    for action in ["kill", "pause", "unpause"] {
        assert!(
            sample(
                &scrape,
                &format!("meshd_discovery_events_total{{action=\"{action}\",source=\"docker\"}}")
            ) >= 1.0,
            "{action}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_network_chooses_the_address() {
    let scope = Scope::new("nets").await;
    let (a, b) = (scope.network("a").await, scope.network("b").await);
    let agent = start_agent(&scope, None).await;

    // On both networks; mesh.network names the second.
    let chosen = format!("mesh.network={b}");
    let two = scope
        .create(
            "two",
            &[
                "--network",
                &a,
                "-l",
                ENABLE,
                "-l",
                "mesh.service=two",
                "-l",
                &chosen,
            ],
            &[],
        )
        .await;
    // On both networks without mesh.network: the first network by name (…-a), with a logged warning.
    let multi = scope
        .create(
            "multi",
            &["--network", &a, "-l", ENABLE, "-l", "mesh.service=multi"],
            &[],
        )
        .await;
    for c in [&two, &multi] {
        docker_ok(&["network", "connect", &b, &c.id]).await;
        docker_ok(&["start", &c.id]).await;
    }
    let on_b = addr_on(&two, &b).await;
    assert_ne!(on_b, addr_on(&two, &a).await);
    wait_endpoints(&agent.table, "two", &set(&[on_b])).await;
    wait_routed(&agent, "two", "two").await;
    wait_endpoints(&agent.table, "multi", &set(&[addr_on(&multi, &a).await])).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_container_uses_the_node_address() {
    let scope = Scope::new("host").await;
    let agent = start_agent(&scope, None).await;
    // The backend shares the host's network: it listens on a free loopback port, named by mesh.port. The
    // agent has no node.advertise_addr, so the endpoint is 127.0.0.1:<port>.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_label = format!("mesh.port={port}");
    let listen = format!("127.0.0.1:{port}");
    scope
        .run(
            "hostnet",
            &[
                "--network",
                "host",
                "-l",
                ENABLE,
                "-l",
                "mesh.service=hostnet",
                "-l",
                &port_label,
            ],
            &["--listen", &listen],
        )
        .await;
    let addr: SocketAddr = listen.parse().unwrap();
    wait_endpoints(&agent.table, "hostnet", &set(&[addr])).await;
    wait_routed(&agent, "hostnet", "hostnet").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_and_swarm_labels_name_the_service() {
    let scope = Scope::new("names").await;
    let net = scope.network("n").await;
    let agent = start_agent(&scope, None).await;

    // A compose one-off (`docker compose run`) of the same service is never exposed; started first so the
    // later containers prove it was seen.
    let oneoff = scope
        .run(
            "oneoff",
            &[
                "--network",
                &net,
                "-l",
                ENABLE,
                "-l",
                "com.docker.compose.service=shop-api",
                "-l",
                "com.docker.compose.oneoff=True",
            ],
            &[],
        )
        .await;
    let compose = scope
        .run(
            "compose",
            &[
                "--network",
                &net,
                "-l",
                ENABLE,
                "-l",
                "com.docker.compose.project=shop",
                "-l",
                "com.docker.compose.service=shop-api",
            ],
            &[],
        )
        .await;
    // Swarm's label wins over compose's.
    let swarm = scope
        .run(
            "swarm",
            &[
                "--network",
                &net,
                "-l",
                ENABLE,
                "-l",
                "com.docker.swarm.service.name=stack_front",
                "-l",
                "com.docker.compose.service=ignored",
            ],
            &[],
        )
        .await;
    let named = scope
        .run("named", &["--network", &net, "-l", ENABLE], &[])
        .await;

    wait_endpoints(
        &agent.table,
        "shop-api",
        &set(&[addr_on(&compose, &net).await]),
    )
    .await;
    wait_endpoints(
        &agent.table,
        "stack_front",
        &set(&[addr_on(&swarm, &net).await]),
    )
    .await;
    wait_endpoints(
        &agent.table,
        &named.name,
        &set(&[addr_on(&named, &net).await]),
    )
    .await;
    assert!(agent.table.borrow().service("ignored").is_none());
    assert!(
        !local_addrs(&agent.table.borrow(), "shop-api").contains(&addr_on(&oneoff, &net).await)
    );
    wait_routed(&agent, "shop-api", "compose").await;
    wait_routed(&agent, &named.name, "named").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_labels_skip_only_that_container() {
    let scope = Scope::new("bad").await;
    let net = scope.network("n").await;
    let agent = start_agent(&scope, None).await;

    let bad: &[(&str, &[&str])] = &[
        ("badport", &["-l", "mesh.port=http"]),
        ("badproto", &["-l", "mesh.protocol=spdy"]),
        ("twoports", &["--expose", "9000"]),
        ("badweight", &["-l", "mesh.weight=0"]),
    ];
    for (name, extra) in bad {
        let svc = format!("mesh.service={name}");
        let mut args = vec!["--network", net.as_str(), "-l", ENABLE, "-l", &svc];
        args.extend_from_slice(extra);
        scope.run(name, &args, &[]).await;
    }
    let ok = scope
        .run(
            "ok",
            &["--network", &net, "-l", ENABLE, "-l", "mesh.service=ok"],
            &[],
        )
        .await;
    wait_endpoints(&agent.table, "ok", &set(&[addr_on(&ok, &net).await])).await;
    wait_routed(&agent, "ok", "ok").await;
    {
        let table = agent.table.borrow();
        for (name, _) in bad {
            assert!(table.service(name).is_none(), "{name} was exposed");
        }
    }
    let scrape = metrics(&agent).await;
    for reason in ["bad-port", "bad-protocol", "ambiguous-port", "bad-weight"] {
        assert_eq!(
            sample(
                &scrape,
                &format!("meshd_discovery_skipped_total{{reason=\"{reason}\",source=\"docker\"}}")
            ),
            1.0,
            "{reason}\n{scrape}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_outage_withdraws_nothing_and_resyncs() {
    let scope = Scope::new("outage").await;
    let net = scope.network("n").await;
    let relay = Relay::start().await;
    let agent = start_agent(&scope, Some(&relay.host())).await;

    let web = |name: &'static str| {
        let (scope, net) = (&scope, net.clone());
        async move {
            let svc = format!("mesh.service={name}");
            let c = scope
                .run(name, &["--network", &net, "-l", ENABLE, "-l", &svc], &[])
                .await;
            let addr = addr_on(&c, &net).await;
            (c, addr)
        }
    };
    let ((_stays, stays_addr), (gone, gone_addr)) = tokio::join!(web("stays"), web("gone"));
    wait_endpoints(&agent.table, "stays", &set(&[stays_addr])).await;
    wait_endpoints(&agent.table, "gone", &set(&[gone_addr])).await;

    relay.cut();
    eventually("degraded in /v1/services", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == true
    })
    .await;
    let scrape = metrics(&agent).await;
    assert_eq!(
        sample(&scrape, "meshd_discovery_degraded{source=\"docker\"}"),
        1.0
    );

    // While the API is cut: one container starts, one is killed. Nothing is withdrawn meanwhile — checked
    // after meshd has tried to reach the API twice more since the kill, so it had every chance to.
    let (new, new_addr) = web("new").await;
    docker_ok(&["kill", &gone.id]).await;
    let reconnects = |m: &str| sample(m, "meshd_discovery_reconnects_total{source=\"docker\"}");
    let before = reconnects(&metrics(&agent).await);
    eventually("two more reconnect attempts", || async {
        reconnects(&metrics(&agent).await) >= before + 2.0
    })
    .await;
    assert_eq!(
        local_addrs(&agent.table.borrow(), "stays"),
        set(&[stays_addr])
    );
    assert_eq!(
        local_addrs(&agent.table.borrow(), "gone"),
        set(&[gone_addr])
    );
    assert!(local_addrs(&agent.table.borrow(), "new").is_empty());
    wait_routed(&agent, "stays", "stays").await;

    // Restored: the resync applies the difference.
    relay.restore();
    wait_endpoints(&agent.table, "new", &set(&[new_addr])).await;
    wait_endpoints(&agent.table, "gone", &BTreeSet::new()).await;
    assert_eq!(
        local_addrs(&agent.table.borrow(), "stays"),
        set(&[stays_addr])
    );
    eventually("not degraded any more", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == false
    })
    .await;
    wait_routed(&agent, "new", "new").await;
    let _ = new;

    // meshd only ever read from the API.
    let requests = relay.requests();
    assert!(requests.len() >= 4, "{requests:?}");
    for (method, path) in &requests {
        assert_eq!(method, "GET", "{method} {path}");
        let path = path.split('?').next().unwrap_or_default();
        let path = path
            .strip_prefix("/v")
            .and_then(|p| p.split_once('/').map(|(_, rest)| rest))
            .unwrap_or(path.trim_start_matches('/'));
        assert!(
            ["version", "containers/", "events"]
                .iter()
                .any(|p| path.starts_with(p)),
            "unexpected API path {path}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_inspect_stalls_nothing_and_keeps_the_last_state() {
    let scope = Scope::new("inspect").await;
    let net = scope.network("n").await;
    let relay = Relay::start().await;
    let agent = start_agent(&scope, Some(&relay.host())).await;
    let run = |name: &'static str| {
        let (scope, net) = (&scope, net.clone());
        async move {
            let svc = format!("mesh.service={name}");
            let c = scope
                .run(name, &["--network", &net, "-l", ENABLE, "-l", &svc], &[])
                .await;
            let addr = addr_on(&c, &net).await;
            (c, addr)
        }
    };
    let (flaky, flaky_addr) = run("flaky").await;
    wait_endpoints(&agent.table, "flaky", &set(&[flaky_addr])).await;

    // From now on, inspecting "flaky" fails, and inspecting "slow" hangs for 20 s.
    relay.rule(&format!("/containers/{}/json", flaky.id), Rule::Fail(500));
    let svc = "mesh.service=slow".to_string();
    let slow = scope
        .create("slow", &["--network", &net, "-l", ENABLE, "-l", &svc], &[])
        .await;
    relay.rule(
        &format!("/containers/{}/json", slow.id),
        Rule::Delay(Duration::from_secs(20)),
    );
    docker_ok(&["start", &slow.id]).await;
    // A rename makes meshd read "flaky" again: the inspect fails, and it keeps its last state (routable).
    let renamed = format!("{}-renamed", flaky.name);
    scope.track(&renamed);
    docker_ok(&["rename", &flaky.name, &renamed]).await;
    // A container started after the hung inspect is routable long before the hang ends.
    let started = std::time::Instant::now();
    let (_fresh, fresh_addr) = run("fresh").await;
    wait_endpoints(&agent.table, "fresh", &set(&[fresh_addr])).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the hung inspect of another container held up the event loop"
    );
    eventually("the failed inspect is counted", || async {
        sample(
            &metrics(&agent).await,
            "meshd_discovery_inspect_errors_total{source=\"docker\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(
        local_addrs(&agent.table.borrow(), "flaky"),
        set(&[flaky_addr])
    );
    wait_routed(&agent, "flaky", "flaky").await;

    // A resync (after the API comes back) keeps "flaky" too, though its inspect still fails.
    relay.clear_rules();
    relay.rule(&format!("/containers/{}/json", flaky.id), Rule::Fail(500));
    relay.cut();
    eventually("degraded", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == true
    })
    .await;
    relay.restore();
    eventually("resynced", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == false
    })
    .await;
    assert_eq!(
        local_addrs(&agent.table.borrow(), "flaky"),
        set(&[flaky_addr])
    );
    relay.clear_rules();
    let _ = slow;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_a_container_that_is_gone_end_after_one_inspect() {
    let scope = Scope::new("gone").await;
    let net = scope.network("n").await;
    let relay = Relay::start().await;
    let agent = start_agent(&scope, Some(&relay.host())).await;
    let seen_before = agent.table.borrow().services.len();
    // While meshd cannot see the API, a container starts, is killed and removed: on reconnect meshd replays
    // its events (start, kill, die, destroy) for a container that no longer exists.
    relay.cut();
    eventually("degraded", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == true
    })
    .await;
    let c = scope
        .run(
            "ghost",
            &["--network", &net, "-l", ENABLE, "-l", "mesh.service=ghost"],
            &[],
        )
        .await;
    docker_ok(&["kill", &c.id]).await;
    docker_ok(&["rm", "-f", &c.id]).await;
    scope.forget(&c);
    relay.restore();
    eventually("resynced", || async {
        admin_json(&agent, "/v1/services").await["discovery"]["docker"]["degraded"] == false
    })
    .await;
    // Give a loop time to show itself, then count meshd's reads of the gone container.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inspects = relay
        .requests()
        .iter()
        .filter(|(_, path)| path.contains(&format!("/containers/{}/json", c.id)))
        .count();
    assert!(
        inspects <= 3,
        "{inspects} inspects of a container that is gone"
    );
    assert!(local_addrs(&agent.table.borrow(), "ghost").is_empty());
    assert_eq!(agent.table.borrow().services.len(), seen_before);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_50_containers_matches_docker_ps() {
    let scope = Scope::new("churn").await;
    // Docker's default bridge, not a network of the test's own: concurrent starts and removals on a
    // user-defined network occasionally leave it with stale endpoints that only a daemon restart clears
    // (seen with Engine 20.10), and this test sends no traffic to the containers, only reads their addresses.
    let net = "bridge";
    let agent = start_agent(&scope, None).await;
    let args = ["--network", net, "-l", ENABLE, "-l", "mesh.service=churn"];

    let start_batch = |range: std::ops::Range<usize>| {
        let scope = &scope;
        async move {
            let mut out = Vec::new();
            for batch in range.collect::<Vec<_>>().chunks(10) {
                let names: Vec<String> = batch.iter().map(|i| format!("c{i}")).collect();
                out.extend(join_all(names.iter().map(|n| scope.run(n, &args, &[]))).await);
            }
            out
        }
    };
    let first = start_batch(0..30).await;
    // Start 20 more while taking 15 of the first 30 away in different ways.
    let remove = async {
        join_all(first.iter().take(15).enumerate().map(|(i, c)| async move {
            match i % 3 {
                0 => docker_ok(&["kill", &c.id]).await,
                1 => docker_ok(&["stop", "-t", "1", &c.id]).await,
                _ => docker_ok(&["rm", "-f", &c.id]).await,
            };
        }))
        .await
    };
    let (second, _) = tokio::join!(start_batch(30..50), remove);
    assert_eq!(first.len() + second.len(), 50);

    let running = docker_ok(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=mesh.node={}", scope.node),
    ])
    .await;
    let ids: Vec<&str> = running.lines().collect();
    assert_eq!(ids.len(), 35, "{running}");
    let format = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    let mut inspect_args = vec!["inspect", "--format", format.as_str()];
    inspect_args.extend(&ids);
    let want: BTreeSet<SocketAddr> = docker_ok(&inspect_args)
        .await
        .lines()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), BACKEND_PORT))
        .collect();
    wait_endpoints(&agent.table, "churn", &want).await;
    agent.stop().await;
}
