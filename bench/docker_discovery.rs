//! Docker discovery latency against the real engine, measured (never asserted):
//!
//! - **start → routable**: from the daemon's `start` event to the routing table publishing the endpoint;
//! - **healthy → routable**: from `health_status: healthy` to the endpoint being published;
//! - **kill → withdrawn**: from the `kill` event to the table no longer listing the endpoint.
//!
//! The proxy reads each published table directly, so "published" is "routable". Event times are the daemon's
//! own (`timeNano`); the table times are read on the same host clock the moment the table changes.
//!
//! ```sh
//! cargo bench --bench docker_discovery            # RUNS=20 by default; writes docs/benchmarks.md
//! ```
//! Under `cargo test`/`cargo nextest` (no `--bench` argument) it does nothing.

#[path = "../tests/common/mod.rs"]
mod common;
mod report;
#[path = "../tests/docker/support.rs"]
mod support;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::{Stream, StreamExt};
use meshd::config::Config;
use support::*;

const SERVICE: &str = "bench";
const BEGIN: &str = "<!-- docker-discovery:begin -->";
const END: &str = "<!-- docker-discovery:end -->";

fn main() {
    if !report::bench_requested("docker_discovery") {
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(bench(runs));
    println!("{report}");
    write_report(&report);
}

type Events = std::pin::Pin<Box<dyn Stream<Item = (String, String, i64)> + Send>>;

/// Waits for `action` on container `id`; returns the event's daemon time (unix ns).
async fn event(events: &mut Events, id: &str, action: &str) -> i64 {
    let wait = async {
        while let Some((eid, eaction, t)) = events.next().await {
            if eid == id && eaction == action {
                return t;
            }
        }
        panic!("docker event stream ended");
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {action} event for {id}"))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Starts waiting (in a task) for the table to list `n` endpoints of the bench service; resolves to the
/// time it first did.
fn table_reaches(agent: &common::Agent, n: usize) -> tokio::task::JoinHandle<i64> {
    let mut table = agent.table.clone();
    tokio::spawn(async move {
        let mut at = 0;
        let res = tokio::time::timeout(
            PATIENCE,
            table.wait_for(|t| {
                let done = local_addrs(t, SERVICE).len() == n;
                if done {
                    at = now_ns();
                }
                done
            }),
        )
        .await;
        assert!(res.is_ok(), "table never reached {n} endpoints");
        at
    })
}

async fn bench(runs: usize) -> String {
    let scope = Scope::new("bench").await;
    let net = scope.network("n").await;
    let cfg = Config::from_toml(&docker_agent_config(&scope, None)).expect("config");
    let agent = common::start(cfg).await;

    let docker = bollard::Docker::connect_with_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let filters: HashMap<&str, Vec<String>> = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![format!("mesh.node={}", scope.node)]),
    ]);
    let mut events: Events = Box::pin(
        docker
            .events(Some(
                // The stream is only opened when first polled (after the first `docker start`): `since`
                // replays what happened before that.
                EventsOptionsBuilder::default()
                    .since(&meshd::discovery::docker::since_param(now_ns()))
                    .filters(&filters)
                    .build(),
            ))
            .filter_map(|e| async move {
                let e = e.ok()?;
                Some((e.actor?.id?, e.action?, e.time_nano?))
            }),
    );

    let labels = [
        "--network",
        net.as_str(),
        "-l",
        "mesh.enable=true",
        "-l",
        "mesh.service=bench",
    ];
    let (mut start, mut healthy, mut kill) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // start → routable, then kill → withdrawn.
        let c = scope.create(&format!("s{i}"), &labels, &[]).await;
        let seen = table_reaches(&agent, 1);
        docker_ok(&["start", &c.id]).await;
        let t0 = event(&mut events, &c.id, "start").await;
        start.push(seen.await.expect("watcher") - t0);

        let gone = table_reaches(&agent, 0);
        docker_ok(&["kill", &c.id]).await;
        let t0 = event(&mut events, &c.id, "kill").await;
        kill.push(gone.await.expect("watcher") - t0);
        docker_ok(&["rm", "-f", &c.id]).await;
        scope.forget(&c);

        // healthy → routable.
        let mut args = labels.to_vec();
        args.extend(["--health-interval", "200ms", "--health-retries", "1"]);
        let c = scope.create(&format!("h{i}"), &args, &[]).await;
        let seen = table_reaches(&agent, 1);
        docker_ok(&["start", &c.id]).await;
        let t0 = event(&mut events, &c.id, "health_status: healthy").await;
        healthy.push(seen.await.expect("watcher") - t0);
        let gone = table_reaches(&agent, 0);
        docker_ok(&["rm", "-f", &c.id]).await;
        gone.await.expect("watcher");
        scope.forget(&c);
    }
    agent.stop().await;

    let server = docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let row = |what: &str, v: &mut Vec<i64>| {
        v.sort_unstable();
        let ms = |ns: i64| format!("{:.1}", ns as f64 / 1e6);
        let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        format!(
            "| {what} | {} | {} | {} | {} |\n",
            ms(pct(0.5)),
            ms(pct(0.9)),
            ms(v[v.len() - 1]),
            v.len()
        )
    };
    let mut out = format!(
        "## Docker discovery latency\n\n\
         `cargo bench --bench docker_discovery` (bench/docker_discovery.rs): one in-process agent, a `FROM scratch`\n\
         backend container per run, Docker Engine {server}, {cpus} CPUs, optimised (bench profile). Times run\n\
         from the daemon's event (`timeNano`) to the routing table publishing the change, which is what the\n\
         proxy routes by. Measured, not asserted; targets from issue 4: start/healthy → routable median under\n\
         200 ms, kill → withdrawn median under 100 ms.\n\n\
         | transition | median ms | p90 ms | max ms | runs |\n|---|---|---|---|---|\n"
    );
    out.push_str(&row("start → routable", &mut start));
    out.push_str(&row("healthy → routable", &mut healthy));
    out.push_str(&row("kill → withdrawn", &mut kill));
    drop(scope);
    out
}

fn write_report(report: &str) {
    report::write_section(BEGIN, END, report);
}
