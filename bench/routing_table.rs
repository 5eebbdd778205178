//! What one routing-table update costs at mesh scale, measured (never asserted).
//!
//! A table of 1,000 remote nodes × 20 endpoints, laid out two ways: spread over 50 services (400 endpoints
//! each, one per node) and over 1,000 services (20 endpoints each). On each, through `Router::apply` — what
//! the router's task runs for every burst: apply the update, rebuild what it touched, publish the table (and
//! drop the one it replaces):
//!
//! - **one node, one service** (`SetRemoteService`): a node adds an endpoint to one of its services, or
//!   withdraws it again, alternately; a different node each time;
//! - **node removal** (`RemoveRemote`): a node leaves (it is announced again, untimed, before the next one);
//! - **full rebuild** (`Router::rebuild_all`): every service rebuilt from the inputs through today's code.
//!
//! And the same two changes through the router as it was before tables were incremental (its build and
//! state store copied below from commit daf0b75): the one-service change there is a `SetRemote` of the node's
//! whole list, since that router had nothing finer, and every update rebuilt the whole table.
//!
//! Median and p99 over ITERATIONS updates per case (FULL_ITERATIONS full rebuilds, OLD_ITERATIONS updates
//! through the old router), one thread, with the agent's allocator (jemalloc, unless built without the
//! `jemalloc` feature).
//!
//! ```sh
//! cargo bench --bench routing_table   # ITERATIONS=5000 FULL_ITERATIONS=1000 OLD_ITERATIONS=1000; writes docs/benchmarks.md
//! ```
//! Under `cargo test`/`cargo nextest` (no `--bench` argument) it does nothing.

mod report;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd::config::Protocol;
use meshd::routing::{DEFAULT_WEIGHT, EndpointSpec, Router, Update};

const BEGIN: &str = "<!-- routing-table:begin (written by cargo bench --bench routing_table) -->";
const END: &str = "<!-- routing-table:end -->";

const NODES: usize = 1000;
const PER_NODE: usize = 20;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !report::bench_requested("routing_table") {
        return;
    }
    let iterations = env("ITERATIONS", 5000).max(1);
    let full = env("FULL_ITERATIONS", 1000).max(1);
    let old = env("OLD_ITERATIONS", 1000).max(1);
    let layouts = [Layout { services: 50 }, Layout { services: 1000 }];
    let mut rows = Vec::new();
    for layout in &layouts {
        rows.push(measure(layout, iterations, full, old));
        eprintln!("routing_table: {} services done", layout.services);
    }
    let report = render(&rows, iterations, full, old);
    print!("{report}");
    report::write_section(BEGIN, END, &report);
}

/// How the 1,000 × 20 endpoints are spread over services.
struct Layout {
    services: usize,
}

impl Layout {
    fn node(i: usize) -> String {
        format!("node-{i:04}")
    }

    fn inbound(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 1 + (i / 250) as u8, (i % 250) as u8, 1], 4143))
    }

    /// The service of node `i`'s `j`th endpoint: each node's 20 are in 20 different services, and every service
    /// gets the same number.
    fn service(&self, i: usize, j: usize) -> String {
        format!("svc-{:04}", (i * PER_NODE + j) % self.services)
    }

    fn spec(&self, i: usize, j: usize, port: u16) -> EndpointSpec {
        EndpointSpec {
            service: self.service(i, j),
            addr: SocketAddr::from(([10, 1 + (i / 250) as u8, (i % 250) as u8, 1], port)),
            protocol: Protocol::Http,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// Node `i`'s endpoints for its `j`th service: its base endpoint, and a second one when `extra`.
    fn service_specs(&self, i: usize, j: usize, extra: bool) -> Vec<EndpointSpec> {
        let mut out = vec![self.spec(i, j, 8000 + j as u16)];
        if extra {
            out.push(self.spec(i, j, 9000 + j as u16));
        }
        out
    }

    /// Everything node `i` announces, with a second endpoint in the services `extra` lists.
    fn set_remote(&self, i: usize, extra: &HashSet<(usize, usize)>) -> Update {
        Update::SetRemote {
            node: Self::node(i),
            inbound: Self::inbound(i),
            endpoints: (0..PER_NODE)
                .flat_map(|j| self.service_specs(i, j, extra.contains(&(i, j))))
                .collect(),
        }
    }
}

/// The one-service changes: (node, which of its services, whether it gains its second endpoint there). Each
/// pair of iterations adds an endpoint and withdraws it again; each pair is another node.
fn toggle(k: usize) -> (usize, usize, bool) {
    let p = k / 2;
    (
        (p * 37) % NODES,
        (p / NODES) % PER_NODE,
        k.is_multiple_of(2),
    )
}

/// The node that leaves at iteration `k`.
fn leaver(k: usize) -> usize {
    (k * 37) % NODES
}

struct Row {
    services: usize,
    endpoints: usize,
    initial: Duration,
    one_service: Stats,
    removal: Stats,
    full: Stats,
    old_initial: Duration,
    old_one_service: Stats,
    old_removal: Stats,
}

#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    p99: Duration,
}

/// Runs `step(k)` for k in 0..n; each returns how long its timed part took.
fn timed(n: usize, step: impl FnMut(usize) -> Duration) -> Stats {
    let mut samples: Vec<Duration> = (0..n).map(step).collect();
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Stats {
        median: at(0.5),
        p99: at(0.99),
    }
}

/// How long `f` took.
fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn measure(layout: &Layout, iterations: usize, full: usize, old_iterations: usize) -> Row {
    let none = HashSet::new();
    let (mut router, _handle, table) = Router::new();
    let started = Instant::now();
    router.apply((0..NODES).map(|i| layout.set_remote(i, &none)));
    let initial = started.elapsed();
    let endpoints = |t: &meshd::routing::Table| -> usize {
        t.services.values().map(|s| s.endpoints.len()).sum()
    };
    assert_eq!(endpoints(&table.borrow()), NODES * PER_NODE);
    assert_eq!(table.borrow().services.len(), layout.services);

    let one_service = timed(iterations, |k| {
        let (i, j, extra) = toggle(k);
        let u = Update::SetRemoteService {
            node: Layout::node(i),
            inbound: Layout::inbound(i),
            service: layout.service(i, j),
            endpoints: layout.service_specs(i, j, extra),
        };
        time(|| router.apply([u]))
    });
    let removal = timed(iterations, |k| {
        let u = Update::RemoveRemote {
            node: Layout::node(leaver(k)),
        };
        let d = time(|| router.apply([u]));
        router.apply([layout.set_remote(leaver(k), &none)]);
        d
    });
    let full = timed(full, |_| time(|| router.rebuild_all()));
    assert_eq!(endpoints(&table.borrow()), NODES * PER_NODE);
    drop(router);

    let mut old = before::Router::new();
    let started = Instant::now();
    old.apply((0..NODES).map(|i| layout.set_remote(i, &none)));
    let old_initial = started.elapsed();
    let mut extra = HashSet::new();
    let old_one_service = timed(old_iterations, |k| {
        let (i, j, add) = toggle(k);
        if add {
            extra.insert((i, j));
        } else {
            extra.remove(&(i, j));
        }
        let u = layout.set_remote(i, &extra);
        time(|| old.apply([u]))
    });
    let old_removal = timed(old_iterations, |k| {
        let u = Update::RemoveRemote {
            node: Layout::node(leaver(k)),
        };
        let d = time(|| old.apply([u]));
        old.apply([layout.set_remote(leaver(k), &none)]);
        d
    });

    Row {
        services: layout.services,
        endpoints: NODES * PER_NODE,
        initial,
        one_service,
        removal,
        full,
        old_initial,
        old_one_service,
        old_removal,
    }
}

fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} CPUs available")
}

fn render(rows: &[Row], iterations: usize, full: usize, old: usize) -> String {
    let mut out = String::from("## Routing table updates at 1,000 hosts\n\n");
    let build = if cfg!(debug_assertions) {
        "unoptimised"
    } else {
        "optimised"
    };
    let allocator = if cfg!(feature = "jemalloc") {
        "jemalloc"
    } else {
        "the system allocator"
    };
    out.push_str(&format!(
        "`cargo bench --bench routing_table` (bench/routing_table.rs): {NODES} remote nodes × {PER_NODE} \
         endpoints, {build} build, one thread, {allocator}, {}; other work may have shared the machine. Each \
         update goes through `Router::apply`, as the router's task runs it for a burst of one: apply, rebuild \
         what it touched, publish the table and drop the one it replaces. **One service**: a node adds an \
         endpoint to one of its services or withdraws it again (`SetRemoteService`), another node each time. \
         **Removal**: a node leaves (`RemoveRemote`; announced again, untimed, before the next). **Full \
         rebuild**: `Router::rebuild_all`, every service rebuilt by today's code. **Before**: the same changes \
         through the router as it was before tables were incremental (its build and state store, copied into \
         the bench from commit daf0b75), which rebuilt the whole table on every update and had no per-service \
         update, so a node's one-service change was a `SetRemote` of its whole list. {iterations} updates per \
         case, {full} full rebuilds, {old} updates through the old router. ×: the old router's median over \
         today's for the same change.\n\n",
        machine()
    ));
    out.push_str(
        "| layout | change | p50 µs | p99 µs | before p50 µs | before p99 µs | × |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let layout = format!("{} services × {}", r.services, r.endpoints / r.services);
        let ratio =
            |new: Stats, old: Stats| old.median.as_secs_f64() / new.median.as_secs_f64().max(1e-9);
        out.push_str(&format!(
            "| {layout} | first table, 1,000 nodes in one burst (one run) | {} | | {} | | {:.1} |\n",
            us(r.initial),
            us(r.old_initial),
            r.old_initial.as_secs_f64() / r.initial.as_secs_f64().max(1e-9),
        ));
        for (name, new, old) in [
            ("one node, one service", r.one_service, r.old_one_service),
            ("one node leaves", r.removal, r.old_removal),
        ] {
            out.push_str(&format!(
                "| {layout} | {name} | {} | {} | {} | {} | {:.0} |\n",
                us(new.median),
                us(new.p99),
                us(old.median),
                us(old.p99),
                ratio(new, old),
            ));
        }
        out.push_str(&format!(
            "| {layout} | full rebuild (today's code) | {} | {} | | | |\n",
            us(r.full.median),
            us(r.full.p99),
        ));
    }
    out.push_str(
        "\nA one-service update copies that service's endpoint list (the other nodes' endpoints are cloned, \
         their state shared) and the service map (a reference count per service); a node leaving does that for \
         each of its 20 services. Untouched services are the same `Arc` in the next table.\n",
    );
    out
}

/// The router as it was before tables were incremental: `Inputs` and `StateStore` from src/routing/mod.rs at
/// commit daf0b75, unchanged but for building outside the crate (the table it publishes is the bare service
/// map: `Table`'s counts field is private now). Every update rebuilt every service and walked every state.
mod before {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    use http::HeaderValue;
    use meshd::proxy::pool::PoolKey;
    use meshd::routing::{
        Endpoint, EndpointSpec, EndpointState, Location, Service, ServiceState, Source, Update,
        pool_key,
    };
    use tokio::sync::watch;

    type Services = BTreeMap<String, Arc<Service>>;

    /// `Router::run`'s loop body, then: apply, build, prune, publish.
    pub struct Router {
        inputs: Inputs,
        states: StateStore,
        tx: watch::Sender<Arc<Services>>,
    }

    impl Router {
        pub fn new() -> Self {
            Router {
                inputs: Inputs::default(),
                states: StateStore::default(),
                tx: watch::channel(Arc::default()).0,
            }
        }

        pub fn apply(&mut self, updates: impl IntoIterator<Item = Update>) {
            for u in updates {
                self.inputs.apply(u);
            }
            let table = self.inputs.build(&mut self.states, Instant::now());
            let removed = self.states.prune();
            std::hint::black_box(removed);
            self.tx.send_replace(Arc::new(table));
        }
    }

    /// The inputs the table is built from.
    #[derive(Default)]
    struct Inputs {
        declared: BTreeSet<String>,
        local: BTreeMap<Source, Vec<EndpointSpec>>,
        remote: BTreeMap<String, (SocketAddr, Vec<EndpointSpec>)>,
    }

    impl Inputs {
        fn apply(&mut self, update: Update) {
            match update {
                Update::SetRemoteService { .. } => {
                    unreachable!("the old router had no SetRemoteService")
                }
                Update::SetLocal { source, endpoints } => {
                    self.local.insert(source, endpoints);
                }
                Update::SetRemote {
                    node,
                    inbound,
                    endpoints,
                } => {
                    self.remote.insert(node, (inbound, endpoints));
                }
                Update::RemoveRemote { node } => {
                    self.remote.remove(&node);
                }
                Update::SetDeclared { services } => self.declared = services,
            }
        }

        fn build(&self, reg: &mut StateStore, now: Instant) -> Services {
            let mut services: BTreeMap<String, Vec<Endpoint>> = self
                .declared
                .iter()
                .map(|n| (n.clone(), Vec::new()))
                .collect();
            for (source, specs) in &self.local {
                for s in specs {
                    let eps = services.entry(s.service.clone()).or_default();
                    // The same address found twice (static and docker) is one endpoint.
                    if eps.iter().any(|e| e.addr == s.addr && e.is_local()) {
                        continue;
                    }
                    let location = Location::Local { source: *source };
                    let key = pool_key(s.addr, s.protocol, &location);
                    eps.push(Endpoint::new(
                        s.addr,
                        s.protocol,
                        s.weight,
                        location,
                        reg.endpoint(&s.service, s.addr, "", key, now),
                    ));
                }
            }
            for (node, (inbound, specs)) in &self.remote {
                for s in specs {
                    let location = Location::Remote {
                        node: node.clone(),
                        inbound: *inbound,
                    };
                    let key = pool_key(s.addr, s.protocol, &location);
                    let state = reg.endpoint(&s.service, s.addr, node, key, now);
                    services
                        .entry(s.service.clone())
                        .or_default()
                        .push(Endpoint::new(s.addr, s.protocol, s.weight, location, state));
                }
            }
            services
                .into_iter()
                .map(|(name, endpoints)| {
                    let svc = Arc::new(Service {
                        name: Arc::from(name.as_str()),
                        // Service names are validated (config) or come from discovery, which validates them too.
                        name_header: HeaderValue::from_str(&name)
                            .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                        endpoints,
                        state: reg.service(&name, now),
                    });
                    (name, svc)
                })
                .collect()
        }
    }

    /// An endpoint's identity for its runtime state: service, address, owning node ("" for this one), and what
    /// its connections are for. An endpoint whose route changes (another inbound address, another protocol) gets
    /// fresh state, so no connection is ever reused for a key it was not opened with.
    type EndpointKey = (String, SocketAddr, String, PoolKey);

    /// The runtime state of every endpoint and service in the current table.
    #[derive(Default)]
    struct StateStore {
        endpoints: HashMap<EndpointKey, Arc<EndpointState>>,
        services: HashMap<String, Arc<ServiceState>>,
        /// Keys used by the build in progress.
        used_endpoints: std::collections::HashSet<EndpointKey>,
        used_services: std::collections::HashSet<String>,
    }

    impl StateStore {
        fn endpoint(
            &mut self,
            service: &str,
            addr: SocketAddr,
            node: &str,
            pool: PoolKey,
            now: Instant,
        ) -> Arc<EndpointState> {
            let key = (service.to_string(), addr, node.to_string(), pool);
            self.used_endpoints.insert(key.clone());
            self.endpoints
                .entry(key)
                .or_insert_with_key(|k| Arc::new(EndpointState::new(now, k.3.clone())))
                .clone()
        }

        fn service(&mut self, name: &str, now: Instant) -> Arc<ServiceState> {
            self.used_services.insert(name.to_string());
            self.services
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(ServiceState::new(now)))
                .clone()
        }

        /// Forgets state no longer in the table; returns the (service, address) pairs of removed endpoints.
        fn prune(&mut self) -> Vec<(String, SocketAddr)> {
            let used = std::mem::take(&mut self.used_endpoints);
            let mut removed = Vec::new();
            self.endpoints.retain(|k, _| {
                let keep = used.contains(k);
                if !keep {
                    removed.push((k.0.clone(), k.1));
                }
                keep
            });
            let used = std::mem::take(&mut self.used_services);
            self.services.retain(|k, _| used.contains(k));
            removed
        }
    }
}
