//! What the agent-to-agent hop costs, measured (never asserted), in one process and one run:
//!
//! - **direct**: client → backend;
//! - **one hop**: client → agent → backend (a local endpoint);
//! - **two hops, mTLS**: client → agent A → agent B over mutual TLS (pooled h2) → backend;
//! - **two hops, plaintext**: the same with `insecure_plaintext`, to separate the cost of TLS from that of the hop.
//!
//! Latency: one keep-alive HTTP/1.1 client sending requests one after another; ROUNDS interleaved rounds of
//! REQUESTS each, the median of the rounds' medians (and p99s) reported. Throughput: 16 concurrent keep-alive
//! clients for THROUGHPUT requests. Everything shares the same 2 cores (the agents, the backend and the client),
//! so read the ratios against direct, not the absolute figures. Also counted: TLS handshakes between the two
//! agents per 10,000 requests.
//!
//! ```sh
//! cargo bench --bench two_hops          # ROUNDS=3 REQUESTS=3000 THROUGHPUT=20000; writes docs/benchmarks.md
//! ```
//! Under `cargo test`/`cargo nextest` (no `--bench` argument) it does nothing.

#[path = "../tests/common/mod.rs"]
mod common;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::*;
use meshd::config::Config;
use meshd::tls::identity::TrustDomain;
use meshd::tls::pki::LoadedCa;

const BEGIN: &str = "<!-- two-hops:begin (written by cargo bench --bench two_hops) -->";
const END: &str = "<!-- two-hops:end -->";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !report::bench_requested("two_hops") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(run(
        env("ROUNDS", 3),
        env("REQUESTS", 3000),
        env("THROUGHPUT", 20_000),
    ));
    print!("{report}");
    report::write_section(BEGIN, END, &report);
}

/// A target: where the client sends, and the Host it names.
struct Target {
    name: &'static str,
    url: String,
    host: &'static str,
}

async fn run(rounds: usize, requests: usize, throughput: usize) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let backend = backend("far").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::parse("bench.test").expect("trust domain");
    let ca = LoadedCa::generate(&td, 30).expect("CA");
    std::fs::write(dir.path().join("ca.crt"), &ca.cert_pem).expect("write");
    for node in ["node-127.0.0.31", "node-127.0.0.32"] {
        let host = ca.issue(node, 30, &[], &[]).expect("issue");
        std::fs::write(dir.path().join(format!("{node}.crt")), host.cert_pem).expect("write");
        std::fs::write(dir.path().join(format!("{node}.key")), host.key_pem).expect("write");
    }
    let tls = |node: &str| {
        format!(
            "[tls]\ntrust_domain = \"bench.test\"\nca = \"{0}/ca.crt\"\ncert = \"{0}/{node}.crt\"\nkey = \"{0}/{node}.key\"\n",
            dir.path().display()
        )
    };
    let local = format!(
        "[[discovery.static]]\nservice = \"far\"\nendpoints = [\"{}\"]\n",
        backend.addr
    );
    let start_agent = |ip: &'static str, extra: String, secure: bool| async move {
        let mut text = agent_config(ip, &extra);
        if secure {
            text = text.replace("insecure_plaintext = true", "insecure_plaintext = false");
        }
        start(Config::from_toml(&text).expect("config")).await
    };
    // One hop: a local endpoint. Two hops: A knows B owns "far".
    let one = start_agent("127.0.0.30", local.clone(), false).await;
    let b_tls = start_agent(
        "127.0.0.31",
        format!("{local}{}", tls("node-127.0.0.31")),
        true,
    )
    .await;
    let a_tls = start_agent(
        "127.0.0.32",
        format!("[services.far]\n{}", tls("node-127.0.0.32")),
        true,
    )
    .await;
    let b_plain = start_agent("127.0.0.33", local.clone(), false).await;
    let a_plain = start_agent("127.0.0.34", "[services.far]\n".into(), false).await;
    learn_remote(
        &a_tls,
        "node-127.0.0.31",
        b_tls.inbound,
        &["far"],
        backend.addr,
    )
    .await;
    learn_remote(
        &a_plain,
        "node-127.0.0.33",
        b_plain.inbound,
        &["far"],
        backend.addr,
    )
    .await;

    let targets = [
        Target {
            name: "direct",
            url: format!("http://{}/", backend.addr),
            host: "far",
        },
        Target {
            name: "one hop",
            url: one.url("/"),
            host: "far",
        },
        Target {
            name: "two hops, mTLS",
            url: a_tls.url("/"),
            host: "far",
        },
        Target {
            name: "two hops, plaintext h2",
            url: a_plain.url("/"),
            host: "far",
        },
    ];
    // Warm every path (connections, pools, TLS).
    for t in &targets {
        sequential(t, 200).await;
    }
    let before = outbound_handshakes(&a_tls).await;
    let mut medians = vec![Vec::new(); targets.len()];
    let mut p99s = vec![Vec::new(); targets.len()];
    for _ in 0..rounds {
        for (i, t) in targets.iter().enumerate() {
            let mut lat = sequential(t, requests).await;
            lat.sort_by(f64::total_cmp);
            medians[i].push(lat[lat.len() / 2]);
            p99s[i].push(lat[lat.len() * 99 / 100]);
        }
    }
    let mut rates = Vec::new();
    for t in &targets {
        rates.push(concurrent(t, throughput, 16).await);
    }
    let sent_through_a = (rounds * requests + throughput) as f64;
    let per_10k = (outbound_handshakes(&a_tls).await - before) / sent_through_a * 10_000.0;

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_p50 = median(&mut medians[0].clone());
    let base_rate = rates[0];
    let mut out = String::new();
    out.push_str(&format!(
        "## The agent-to-agent hop\n\n`cargo bench --bench two_hops` (bench/two_hops.rs): agents, backend and client in one process on \
         loopback, 2 CPUs shared, optimised build. Latency: one keep-alive HTTP/1.1 client, requests one at a time, \
         {rounds} interleaved rounds of {requests}, median of the rounds. Throughput: 16 keep-alive clients, {throughput} \
         requests. Ratios are against direct in this same run.\n\n"
    ));
    out.push_str("| path | p50 µs | p99 µs | p50 vs direct | added p50 µs | req/s (16 clients) | req/s vs direct |\n|---|---|---|---|---|---|---|\n");
    for (i, t) in targets.iter().enumerate() {
        let p50 = median(&mut medians[i]);
        let p99 = median(&mut p99s[i]);
        out.push_str(&format!(
            "| {} | {p50:.0} | {p99:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× |\n",
            t.name,
            p50 / base_p50,
            p50 - base_p50,
            rates[i],
            rates[i] / base_rate
        ));
    }
    out.push_str(&format!(
        "\nTLS handshakes between the two agents per 10,000 requests after warm-up: {per_10k:.2} \
         (`meshd_tls_handshakes_total` on agent A over {sent_through_a:.0} requests).\n"
    ));
    out
}

fn request(t: &Target) -> http::Request<TestBody> {
    http::Request::get(&t.url)
        .header("host", t.host)
        .body(full(""))
        .expect("request")
}

/// Latencies in µs of `n` requests sent one at a time over one keep-alive connection.
async fn sequential(t: &Target, n: usize) -> Vec<f64> {
    let client = h1_client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let at = Instant::now();
        let r = client.request(request(t)).await.expect("response");
        assert!(r.status().is_success(), "{}: {}", t.name, r.status());
        let _ = read(r).await;
        out.push(at.elapsed().as_secs_f64() * 1e6);
    }
    out
}

/// Requests per second with `clients` keep-alive clients sending `n` in all.
async fn concurrent(t: &Target, n: usize, clients: usize) -> f64 {
    let left = Arc::new(AtomicUsize::new(n));
    let at = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (left, req) = (left.clone(), (t.url.clone(), t.host));
            tokio::spawn(async move {
                let client = h1_client();
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let r = client
                        .request(
                            http::Request::get(&req.0)
                                .header("host", req.1)
                                .body(full(""))
                                .expect("request"),
                        )
                        .await
                        .expect("response");
                    let _ = read(r).await;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    n as f64 / at.elapsed().as_secs_f64()
}
