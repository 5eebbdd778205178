//! The driver of `bench/run`: meshd beside a direct connection, HAProxy and nginx in one run, on loopback, with
//! every process pinned the same way. `bench/run` installs the tools and builds the binaries, then runs this.
//!
//! ```text
//! bench-harness --meshd PATH --backend PATH --oha PATH --results DIR --docs DIR [--quick]
//! ```
//!
//! Phases, each target in turn inside every repetition (so slow drifts of the machine hit all alike):
//! 1. **one core**: each proxy pinned to core 0 with one worker thread (meshd: one tokio worker; HAProxy:
//!    `nbthread 1`; nginx: one worker, no master), the backend and the load generator on the other cores.
//!    Open-loop latency at fixed rates, CPU seconds per 1,000 requests, maximum throughput (closed loop),
//!    resident memory idle, under load and with 10,000 idle client connections.
//! 2. **all cores**: every process on every core, one thread (or worker) per core: maximum throughput.
//! 3. **callgrind**: each one-hop proxy under valgrind serving N and then 2N sequential keep-alive requests;
//!    (Ir(2N) − Ir(N)) / N is the instruction count per request with start-up and shutdown subtracted.
//!    Counting is switched on (`callgrind_control --instr=on`) only once the proxy answers, so neither its
//!    start-up nor the readiness probes, whose number varies run to run, enter either total.
//!
//! Results go to `DIR/<timestamp>.json`; the report (tables, SVG charts) to `DOCS/benchmarks.md` and
//! `DOCS/bench/*.svg`.

mod load;
mod procs;
mod report;
mod swarm;
mod targets;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use load::{Figures, Oha, Shape};
use procs::Cores;
use targets::{Env, Layout, Proto, Target};

/// What a run measures, and how long.
pub struct Plan {
    pub quick: bool,
    pub reps: usize,
    pub rates: Vec<u32>,
    pub rate_duration: Duration,
    pub max_duration: Duration,
    pub idle_connections: usize,
    pub cg_requests: u64,
    /// Gossip members, meshd included.
    pub members: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 1,
                rates: vec![1000],
                rate_duration: Duration::from_secs(1),
                max_duration: Duration::from_secs(1),
                idle_connections: 500,
                cg_requests: 200,
                members: 50,
            }
        } else {
            Plan {
                quick,
                reps: 3,
                rates: vec![1000, 5000, 20000],
                rate_duration: Duration::from_secs(4),
                max_duration: Duration::from_secs(4),
                idle_connections: 10_000,
                cg_requests: 2000,
                members: 1000,
            }
        }
    }
}

struct Args {
    quick: bool,
    /// `--only PHASE`: one of one-core, gossip, all-cores, callgrind (the report then has gaps).
    only: Option<String>,
    meshd: PathBuf,
    backend: PathBuf,
    oha: PathBuf,
    results: PathBuf,
    docs: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut quick = false;
    let (mut meshd, mut backend, mut oha, mut results, mut docs) = (None, None, None, None, None);
    let mut only: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let slot = match arg.as_str() {
            "--quick" => {
                quick = true;
                continue;
            }
            "--meshd" => &mut meshd,
            "--backend" => &mut backend,
            "--oha" => &mut oha,
            "--results" => &mut results,
            "--docs" => &mut docs,
            "--only" => &mut only,
            other => return Err(format!("unknown argument {other:?}")),
        };
        *slot = Some(PathBuf::from(
            it.next().ok_or(format!("{arg} needs a value"))?,
        ));
    }
    let need = |v: Option<PathBuf>, name: &str| v.ok_or(format!("--{name} is required"));
    Ok(Args {
        quick,
        only: only.map(|p| p.to_string_lossy().into_owned()),
        meshd: need(meshd, "meshd")?,
        backend: need(backend, "backend")?,
        oha: need(oha, "oha")?,
        results: need(results, "results")?,
        docs: need(docs, "docs")?,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-harness: {e}");
            return ExitCode::from(64);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-harness: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    // The idle-connection run holds 10,000 sockets here, and the proxies (which inherit the limit) as many.
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("raising the open-file limit: {e}"))?;
    if (limit as usize) < plan.idle_connections + 1000 {
        return Err(format!(
            "the open-file limit is {limit}: {} idle connections need more (raise the hard limit)",
            plan.idle_connections
        ));
    }
    let work = tempdir()?;
    let env = Env {
        meshd: args.meshd.clone(),
        backend: args.backend.clone(),
        pki: work.path.join("pki"),
        keyring: work.path.join("gossip.keys"),
        work: work.path.clone(),
        prefix: Vec::new(),
    };
    make_pki(&env)?;
    let oha = Oha {
        bin: args.oha.clone(),
        grpc_body: load::grpc_body(&work.path)?,
        cores: Cores::Load.list(),
    };
    let mut results = Results::default();

    let phase = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    if phase("one-core") {
        eprintln!("== one core: proxies on core 0, one thread; backend and load on the others");
        one_core(&env, &oha, &plan, &mut results)?;
    }
    if phase("gossip") {
        eprintln!("== gossip: meshd with {} members", plan.members);
        gossip_members(&env, &oha, &plan, &mut results)?;
    }
    let all_oha = Oha {
        cores: Cores::All.list(),
        ..oha
    };
    if phase("all-cores") {
        eprintln!("== all cores: one thread per core");
        all_cores(&env, &all_oha, &plan, &mut results)?;
    }
    if phase("callgrind") {
        eprintln!("== callgrind: instructions per request");
        instructions(&env, &all_oha, &plan, &mut results)?;
    }

    let doc = results.to_json(&plan, args, started.elapsed());
    std::fs::create_dir_all(&args.results).map_err(|e| e.to_string())?;
    let stamp = time::OffsetDateTime::now_utc();
    let name = format!(
        "{:04}-{:02}-{:02}T{:02}{:02}{:02}Z.json",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second()
    );
    let path = args.results.join(&name);
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    report::write(&doc, &name, &args.docs)?;
    if args.only.is_none() {
        let missing = missing_figures(&doc);
        if !missing.is_empty() {
            return Err(format!(
                "figures missing from {}: {}",
                path.display(),
                missing.join("; ")
            ));
        }
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything measured, as lists of rows; each row holds every repetition and their median.
#[derive(Default)]
struct Results {
    latency: Vec<Value>,
    cpu: Vec<Value>,
    throughput: Vec<Value>,
    memory: Vec<Value>,
    instructions: Vec<Value>,
    failures: u64,
}

impl Results {
    fn to_json(&self, plan: &Plan, args: &Args, took: Duration) -> Value {
        json!({
            "meshd": git_describe(),
            "quick": plan.quick,
            "host": {
                "cores": procs::cores(),
                "cpu": cpu_model(),
                "kernel": command_line("uname", &["-r"]),
            },
            "tools": {
                "haproxy": command_line("haproxy", &["-v"]),
                "nginx": command_line("nginx", &["-v"]),
                "oha": command_line(&args.oha.to_string_lossy(), &["--version"]),
                "valgrind": command_line("valgrind", &["--version"]),
            },
            "plan": {
                "repetitions": plan.reps,
                "rates": plan.rates,
                "rate_seconds": plan.rate_duration.as_secs_f64(),
                "max_seconds": plan.max_duration.as_secs_f64(),
                "idle_connections": plan.idle_connections,
                "callgrind_requests": plan.cg_requests,
                "gossip_members": plan.members,
            },
            "seconds": took.as_secs_f64().round(),
            "failed_requests": self.failures,
            "latency": self.latency,
            "cpu": self.cpu,
            "throughput": self.throughput,
            "memory": self.memory,
            "instructions": self.instructions,
        })
    }
}

/// Every figure that is missing, zero or not a number (a measurement that silently failed), by where it is.
fn missing_figures(doc: &Value) -> Vec<String> {
    let checks: [(&str, &[&str]); 5] = [
        ("latency", &["p50_us", "p99_us", "p999_us", "rps"]),
        ("cpu", &["cpu_s_per_1k"]),
        ("throughput", &["rps"]),
        ("instructions", &["per_request"]),
        ("memory", &["mib"]),
    ];
    let mut out = Vec::new();
    for (list, fields) in checks {
        let rows = doc[list].as_array().map_or(&[][..], |v| v.as_slice());
        if rows.is_empty() {
            out.push(format!("{list}: no rows"));
        }
        for row in rows {
            for field in fields {
                // CPU time comes in 10 ms ticks: a short quick run may see none.
                let least = if list == "cpu" {
                    0.0
                } else {
                    f64::MIN_POSITIVE
                };
                if !row[*field]
                    .as_f64()
                    .is_some_and(|v| v.is_finite() && v >= least)
                {
                    out.push(format!(
                        "{list} {} {} {}: {field}",
                        row["target"],
                        row["protocol"].as_str().unwrap_or(""),
                        row["rate"]
                            .as_u64()
                            .map(|r| format!("{r}/s"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    out
}

pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn one_core(env: &Env, oha: &Oha, plan: &Plan, results: &mut Results) -> Result<(), String> {
    let layout = Layout::OneCore;
    let _backend = env.backend(layout)?;
    let targets = vec![
        env.direct(),
        env.meshd(layout, 19100)?,
        env.haproxy(layout, 19120)?,
        env.nginx(layout, 19130)?,
        env.meshd_two_hops(layout, 19200)?,
        env.haproxy_two_hops(layout, 19220)?,
    ];
    for t in &targets {
        ready(t, oha)?;
    }
    for t in targets.iter().filter(|t| !t.procs.is_empty()) {
        results.memory.push(
            json!({"target": t.name, "scenario": t.scenario, "state": "idle", "mib": t.rss_mib()}),
        );
    }

    // Open-loop latency and CPU per request at each rate; the RSS peak at the highest rate.
    let mut runs: Vec<Vec<(u32, Proto, Figures, f64)>> = vec![Vec::new(); targets.len()];
    let mut peaks: Vec<f64> = vec![0.0; targets.len()];
    let top = plan.rates.iter().copied().max().unwrap_or(0);
    for rep in 0..plan.reps {
        for &rate in &plan.rates {
            for proto in Proto::ALL {
                for (i, t) in targets.iter().enumerate() {
                    let cpu = t.cpu_seconds();
                    let (f, peak) = with_peak_rss(t, || {
                        oha.run(t.addr(proto), proto, Shape::Rate(rate), plan.rate_duration)
                    });
                    let f = f?;
                    let cpu = t.cpu_seconds() - cpu;
                    results.failures += f.failed;
                    eprintln!(
                        "  rep {} {rate}/s {:5} {:12} p50 {:6.0} µs p99 {:6.0} µs p99.9 {:6.0} µs  {:.0} req/s  failed {}",
                        rep + 1,
                        proto.name(),
                        t.name,
                        f.p50_us,
                        f.p99_us,
                        f.p999_us,
                        f.rps,
                        f.failed
                    );
                    if rate == top {
                        peaks[i] = peaks[i].max(peak);
                    }
                    runs[i].push((rate, proto, f, cpu));
                }
            }
        }
    }
    for (i, t) in targets.iter().enumerate() {
        for &rate in &plan.rates {
            for proto in Proto::ALL {
                let reps: Vec<&(u32, Proto, Figures, f64)> = runs[i]
                    .iter()
                    .filter(|r| r.0 == rate && r.1 == proto)
                    .collect();
                let field =
                    |g: fn(&Figures) -> f64| -> Vec<f64> { reps.iter().map(|r| g(&r.2)).collect() };
                let (p50, p99, p999, rps) = (
                    field(|f| f.p50_us),
                    field(|f| f.p99_us),
                    field(|f| f.p999_us),
                    field(|f| f.rps),
                );
                results.latency.push(json!({
                    "target": t.name, "scenario": t.scenario, "protocol": proto.name(), "rate": rate,
                    "p50_us": median(&p50), "p99_us": median(&p99), "p999_us": median(&p999), "rps": median(&rps),
                    "repetitions": {"p50_us": p50, "p99_us": p99, "p999_us": p999, "rps": rps},
                }));
                if !t.procs.is_empty() {
                    // CPU seconds per 1,000 answered requests.
                    let per_k: Vec<f64> = reps
                        .iter()
                        .map(|r| {
                            r.3 * 1000.0 / (r.2.rps * plan.rate_duration.as_secs_f64()).max(1.0)
                        })
                        .collect();
                    results.cpu.push(json!({
                        "target": t.name, "scenario": t.scenario, "protocol": proto.name(), "rate": rate,
                        "cpu_s_per_1k": median(&per_k), "repetitions": per_k,
                    }));
                }
            }
        }
        if !t.procs.is_empty() {
            results.memory.push(json!({"target": t.name, "scenario": t.scenario, "state": format!("load {top}/s"), "mib": peaks[i]}));
        }
    }

    throughput(&targets, oha, plan, Layout::OneCore, results)?;

    // Idle client connections, each after one request (HTTP/1.1 keep-alive).
    for t in targets.iter().filter(|t| !t.procs.is_empty()) {
        let (mib, open) = idle_connections(t, plan.idle_connections)?;
        eprintln!(
            "  {} idle connections: {} {mib:.1} MiB ({open} still open)",
            plan.idle_connections, t.name
        );
        results.memory.push(json!({
            "target": t.name, "scenario": t.scenario,
            "state": format!("{} idle connections", plan.idle_connections), "mib": mib, "still_open": open,
        }));
    }
    Ok(())
}

/// meshd's resident memory as the first host of a cluster, alone and then with `plan.members` members (each
/// publishing 20 endpoints) that joined through it.
fn gossip_members(env: &Env, oha: &Oha, plan: &Plan, results: &mut Results) -> Result<(), String> {
    let base = 19700;
    let _backend = env.backend(Layout::OneCore)?;
    let (t, seed) = env.meshd_gossip(base)?;
    ready(&t, oha)?;
    std::thread::sleep(Duration::from_secs(1));
    let alone = t.rss_mib();
    let others = plan.members - 1;
    let inbound = SocketAddr::from(([127, 0, 0, 1], base + 3));
    let _swarm = swarm::start(others, seed, inbound, &env.keyring)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    // Every member alive, and each member's 20 endpoints in meshd's routing table.
    let want = others * swarm::SERVICES * swarm::ENDPOINTS;
    let (mut alive, mut endpoints) = (0, 0);
    while Instant::now() < deadline {
        alive = alive_members(Env::admin(base)).unwrap_or(0);
        endpoints = gossip_endpoints(Env::admin(base)).unwrap_or(0);
        if alive >= others && endpoints >= want {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let joined = started.elapsed().as_secs_f64();
    // The answers to /v1/services (megabytes at this size) are freed and purged back to the system by now.
    std::thread::sleep(Duration::from_secs(10));
    let mib = t.rss_mib();
    let alive = alive_members(Env::admin(base)).unwrap_or(alive);
    eprintln!(
        "  gossip: alone {alone:.1} MiB; {} members alive, {endpoints} remote endpoints after {joined:.0} s; {mib:.1} MiB",
        alive + 1
    );
    results.memory.push(json!({"target": "meshd", "scenario": "gossip", "state": "gossip, no members", "mib": alone}));
    results.memory.push(json!({
        "target": "meshd", "scenario": "gossip", "state": format!("{} gossip members", plan.members),
        "mib": mib, "members_alive": alive + 1, "remote_endpoints": endpoints, "seconds_to_join": joined,
    }));
    if alive < others || endpoints < want {
        return Err(format!(
            "after {joined:.0} s meshd saw {} of {} gossip members alive and {endpoints} of {want} endpoints",
            alive + 1,
            plan.members
        ));
    }
    Ok(())
}

/// `meshd_gossip_members{state="alive"}` from the admin API's /metrics.
fn alive_members(admin: SocketAddr) -> Result<usize, String> {
    let body = http_body(admin, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("meshd_gossip_members{state=\"alive\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as usize)
        .ok_or("no meshd_gossip_members{state=\"alive\"} in /metrics".into())
}

/// How many endpoints `GET /v1/services` lists as learned by gossip.
fn gossip_endpoints(admin: SocketAddr) -> Result<usize, String> {
    let body = http_body(admin, "/v1/services")?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("/v1/services: {e}"))?;
    let services = v["services"]
        .as_array()
        .or(v.as_array())
        .ok_or("/v1/services: no list of services")?;
    Ok(services
        .iter()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["source"] == "gossip")
        .count())
}

/// The body of a GET over HTTP/1.1 with `Connection: close`.
fn http_body(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or("not an HTTP answer".into())
}

fn all_cores(env: &Env, oha: &Oha, plan: &Plan, results: &mut Results) -> Result<(), String> {
    let layout = Layout::AllCores;
    let _backend = env.backend(layout)?;
    let targets = vec![
        env.direct(),
        env.meshd(layout, 19500)?,
        env.haproxy(layout, 19520)?,
        env.nginx(layout, 19530)?,
        env.meshd_two_hops(layout, 19600)?,
        env.haproxy_two_hops(layout, 19620)?,
    ];
    for t in &targets {
        ready(t, oha)?;
    }
    throughput(&targets, oha, plan, layout, results)
}

/// Closed-loop maximum throughput of every target and protocol.
fn throughput(
    targets: &[Target],
    oha: &Oha,
    plan: &Plan,
    layout: Layout,
    results: &mut Results,
) -> Result<(), String> {
    let mut rps = vec![vec![Vec::new(); Proto::ALL.len()]; targets.len()];
    for _ in 0..plan.reps {
        for (pi, proto) in Proto::ALL.into_iter().enumerate() {
            for (i, t) in targets.iter().enumerate() {
                let f = oha.run(t.addr(proto), proto, Shape::Max, plan.max_duration)?;
                results.failures += f.failed;
                eprintln!(
                    "  max {} {:5} {:12} {:.0} req/s",
                    layout.name(),
                    proto.name(),
                    t.name,
                    f.rps
                );
                rps[i][pi].push(f.rps);
            }
        }
    }
    for (i, t) in targets.iter().enumerate() {
        for (pi, proto) in Proto::ALL.into_iter().enumerate() {
            results.throughput.push(json!({
                "target": t.name, "scenario": t.scenario, "protocol": proto.name(), "layout": layout.name(),
                "rps": median(&rps[i][pi]), "repetitions": rps[i][pi],
            }));
        }
    }
    Ok(())
}

/// Callgrind: each one-hop proxy serving N then 2N sequential requests; the difference over N.
fn instructions(env: &Env, oha: &Oha, plan: &Plan, results: &mut Results) -> Result<(), String> {
    let _backend = env.backend(Layout::OneCore)?;
    let n = plan.cg_requests;
    type Start = fn(&Env, Layout, u16) -> Result<Target, String>;
    let proxies: [(&str, Start); 3] = [
        ("meshd", Env::meshd),
        ("haproxy", Env::haproxy),
        ("nginx", Env::nginx),
    ];
    let mut per_request: Vec<Vec<f64>> = vec![Vec::new(); proxies.len()];
    for _ in 0..plan.reps {
        for (i, (name, start)) in proxies.iter().enumerate() {
            let one = callgrind_total(env, oha, *start, n)?;
            let two = callgrind_total(env, oha, *start, 2 * n)?;
            let per = (two - one) as f64 / n as f64;
            eprintln!("  callgrind {name}: {per:.0} instructions per request");
            per_request[i].push(per);
        }
    }
    for (i, (name, _)) in proxies.iter().enumerate() {
        results.instructions.push(json!({
            "target": name, "scenario": "one-hop", "protocol": "http1",
            "per_request": median(&per_request[i]), "repetitions": per_request[i],
        }));
    }
    Ok(())
}

/// The instructions one proxy ran in all (every thread, start-up and shutdown included) to serve `n`
/// sequential requests on one keep-alive connection.
fn callgrind_total(
    env: &Env,
    oha: &Oha,
    start: fn(&Env, Layout, u16) -> Result<Target, String>,
    n: u64,
) -> Result<u64, String> {
    let out = env
        .work
        .join(format!("callgrind.{n}.{}", fastrand_suffix()));
    let cg_env = Env {
        prefix: vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            // Counting starts once the proxy is ready (below): start-up, and the readiness probes whose number
            // varies with how long start-up takes under valgrind, stay out of the total.
            "--instr-atstart=no".into(),
            format!("--callgrind-out-file={}", out.display()),
        ],
        meshd: env.meshd.clone(),
        backend: env.backend.clone(),
        work: env.work.clone(),
        pki: env.pki.clone(),
        keyring: env.keyring.clone(),
    };
    let target = start(&cg_env, Layout::OneCore, 19800)?;
    // Under valgrind a start takes seconds.
    ready_within(&target, oha, Duration::from_secs(120))?;
    for p in &target.procs {
        let on = Command::new("callgrind_control")
            .args(["--instr=on", &p.pid().to_string()])
            .output()
            .map_err(|e| format!("callgrind_control: {e}"))?;
        if !on.status.success() {
            return Err(format!(
                "callgrind_control --instr=on {}: {}",
                p.pid(),
                String::from_utf8_lossy(&on.stderr)
            ));
        }
    }
    let f = oha.run(
        target.addr(Proto::H1),
        Proto::H1,
        Shape::Sequential(n),
        Duration::ZERO,
    )?;
    if f.ok != n {
        return Err(format!(
            "{}: {} of {n} requests answered 2xx under callgrind",
            target.name, f.ok
        ));
    }
    for p in target.procs {
        p.stop(Duration::from_secs(60));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(format!("no instruction total in {}", out.display()))
}

fn fastrand_suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// Waits until every protocol of `t` answers 2xx.
fn ready(t: &Target, oha: &Oha) -> Result<(), String> {
    ready_within(t, oha, Duration::from_secs(30))
}

fn ready_within(t: &Target, oha: &Oha, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    for proto in Proto::ALL {
        loop {
            let answered = match proto {
                Proto::H1 => get(t.addr(proto), proto.service()).is_ok_and(|s| s == 200),
                _ => {
                    procs::wait_listening(t.addr(proto), Duration::from_millis(500)).is_ok()
                        && oha
                            .run(t.addr(proto), proto, Shape::Sequential(5), Duration::ZERO)
                            .is_ok_and(|f| f.ok == 5)
                }
            };
            if answered {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} does not answer {} on {} after {within:?} (logs in the work directory)",
                    t.name,
                    proto.name(),
                    t.addr(proto)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Warm up: connections, pools, TLS sessions.
    for proto in Proto::ALL {
        oha.run(
            t.addr(proto),
            proto,
            Shape::Rate(1000),
            Duration::from_millis(300),
        )?;
    }
    Ok(())
}

/// One HTTP/1.1 GET on a new connection; the status code.
fn get(addr: SocketAddr, host: &str) -> Result<u16, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or("not an HTTP/1.1 answer".to_string())
}

/// Runs `f` while sampling `t`'s resident memory every 100 ms; `f`'s result and the peak.
fn with_peak_rss<R>(t: &Target, f: impl FnOnce() -> R) -> (R, f64) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = t.rss_mib();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                peak = peak.max(t.rss_mib());
            }
            peak
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        (r, sampler.join().unwrap_or(f64::NAN))
    })
}

/// Opens `n` client connections to `t`'s HTTP/1.1 port, sends one request on each and reads its answer, then
/// keeps them open (idle) while the target's memory is read. Returns the MiB and how many were still open.
fn idle_connections(t: &Target, n: usize) -> Result<(f64, usize), String> {
    let addr = t.addr(Proto::H1);
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", Proto::H1.service());
    let mut conns = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let mut s = TcpStream::connect(addr)
            .map_err(|e| format!("{}: connection {}: {e}", t.name, conns.len()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        read_answer(&mut s, &mut buf)
            .map_err(|e| format!("{}: connection {}: {e}", t.name, conns.len()))?;
        conns.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    let mib = t.rss_mib();
    // Still open: a read finds nothing to read (not EOF).
    let mut open = 0;
    for s in &mut conns {
        let _ = s.set_nonblocking(true);
        if matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    Ok((mib, open))
}

/// Reads one HTTP/1.1 answer with a Content-Length body.
fn read_answer(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    let mut have = Vec::new();
    loop {
        let n = s.read(buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the answer ended".into());
        }
        have.extend_from_slice(&buf[..n]);
        let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&have[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("an answer without content-length")?;
        if have.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

/// A temporary directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("kept {}", self.path.display());
        }
    }
}

fn tempdir() -> Result<TempDir, String> {
    let path = std::env::temp_dir().join(format!("meshd-bench-{}", fastrand_suffix()));
    std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
    Ok(TempDir { path })
}

/// The mesh CA, the certificates of agents `bench-a` and `bench-b`, and a gossip keyring, made by meshd's own
/// commands.
fn make_pki(env: &Env) -> Result<(), String> {
    let pki = env.pki.display().to_string();
    let meshd = |args: &[&str]| -> Result<Vec<u8>, String> {
        let out = Command::new(&env.meshd)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "meshd {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    };
    meshd(&[
        "ca",
        "init",
        "--trust-domain",
        "bench.test",
        "--out",
        &format!("{pki}/ca"),
    ])?;
    for node in ["bench-a", "bench-b"] {
        meshd(&[
            "cert",
            "issue",
            "--ca",
            &format!("{pki}/ca"),
            "--node",
            node,
            "--out",
            &format!("{pki}/{node}"),
        ])?;
    }
    let key = meshd(&["gossip", "keygen"])?;
    std::fs::write(&env.keyring, key).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.keyring, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn git_describe() -> String {
    command_line("git", &["describe", "--always", "--dirty"])
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default()
}

/// The first line a command prints (stdout, else stderr).
fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}
