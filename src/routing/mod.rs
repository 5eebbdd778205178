//! The routing table: which endpoints serve each service, merged from this host's discovery and from the
//! endpoint sets that other nodes announce.
//!
//! [`Router`] is the table's only writer. Discovery and membership send it typed [`Update`]s; after each one it
//! builds a fresh immutable [`Table`] and publishes it on a `watch` channel. The proxy reads snapshots and never
//! writes. Nothing here does I/O.
//!
//! Each endpoint and service carries runtime state that must outlive any one table — latency estimate,
//! in-flight count and circuit breaker per endpoint; round-robin cursor, retry budget and rate limiter per
//! service. The router keeps that state in a state store keyed by identity and hands the same `Arc`s to every
//! table it builds, so churn elsewhere in the table or a config reload never resets an endpoint's statistics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderValue;
use http::uri::Authority;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Protocol;
use crate::policy::balance::{Candidate, PeakEwma};
use crate::policy::breaker::{self, Breaker, BreakerConfig, Permit, Transition};
use crate::policy::budget::{BudgetConfig, RetryBudget};
use crate::policy::ratelimit::{RateLimitConfig, TokenBucket};
use crate::proxy::pool::{Pool, PoolKey, Wire};

/// Default relative weight of an endpoint.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Where discovered endpoints came from on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Static,
    Docker,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Docker => "docker",
        }
    }
}

/// One endpoint of a service, as discovery on its own host describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EndpointSpec {
    pub service: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub weight: u32,
}

/// Where an endpoint lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// On this host: the proxy connects to it directly.
    Local { source: Source },
    /// On another node: requests go through that node's inbound listener.
    Remote { node: String, inbound: SocketAddr },
}

/// An endpoint in the published table, with the forms the proxy needs precomputed once per table build
/// rather than per request.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub weight: u32,
    pub location: Location,
    /// `addr` as a URI authority and as a header value (`mesh-endpoint`).
    pub addr_authority: Authority,
    pub addr_header: HeaderValue,
    /// Latency, load, breaker and connection pool, shared by every table that holds this endpoint.
    pub state: Arc<EndpointState>,
}

/// What connections to an endpoint are made for: straight to a local endpoint in its own protocol, or over
/// HTTP/2 to the owning node's inbound listener, whose identity that node must prove.
pub fn pool_key(addr: SocketAddr, protocol: Protocol, location: &Location) -> PoolKey {
    match location {
        Location::Local { .. } => PoolKey {
            addr,
            wire: if protocol.is_h2() { Wire::H2 } else { Wire::H1 },
            identity: None,
        },
        Location::Remote { node, inbound } => PoolKey {
            addr: *inbound,
            wire: Wire::H2,
            identity: Some(Arc::from(node.as_str())),
        },
    }
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        protocol: Protocol,
        weight: u32,
        location: Location,
        state: Arc<EndpointState>,
    ) -> Self {
        Endpoint {
            addr,
            protocol,
            weight,
            location,
            addr_authority: authority(addr),
            addr_header: HeaderValue::from_str(&addr.to_string())
                .unwrap_or_else(|_| unreachable!("a socket address is a valid header value")),
            state,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain numbers: a panic elsewhere cannot leave them unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runtime state of one endpoint. Locks are held for a few instructions, never across an await.
#[derive(Debug)]
pub struct EndpointState {
    pending: AtomicU32,
    ewma: Mutex<PeakEwma>,
    breaker: Mutex<Breaker>,
    /// Connections to the endpoint (or to the node that owns it).
    pub pool: Pool,
}

impl EndpointState {
    pub fn new(now: Instant, key: PoolKey) -> Self {
        EndpointState {
            pending: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            breaker: Mutex::new(Breaker::new(now)),
            pool: Pool::new(key),
        }
    }

    /// Marks a request as sent; the guard marks it answered when dropped.
    pub fn start(self: &Arc<Self>) -> Pending {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending(self.clone())
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        lock(&self.ewma).observe(rtt, now);
    }

    pub fn latency(&self, now: Instant) -> Duration {
        lock(&self.ewma).estimate(now)
    }

    pub fn breaker_state(&self, now: Instant) -> breaker::State {
        lock(&self.breaker).state(now)
    }

    pub fn breaker_acquire(&self, now: Instant) -> Option<Permit> {
        lock(&self.breaker).acquire(now)
    }

    /// A permit for an ejected endpoint (every endpoint of the service is ejected).
    pub fn breaker_forced(&self) -> Permit {
        lock(&self.breaker).forced()
    }

    pub fn breaker_release(&self, now: Instant, permit: Permit) {
        lock(&self.breaker).release(now, permit)
    }

    pub fn breaker_record(
        &self,
        cfg: &BreakerConfig,
        now: Instant,
        permit: Permit,
        ok: bool,
        r: f64,
    ) -> Option<Transition> {
        lock(&self.breaker).record(cfg, now, permit, ok, r)
    }

    /// Ejects an endpoint whose breaker tripped; false when it was no longer closed.
    pub fn breaker_eject(&self, cfg: &BreakerConfig, now: Instant, r: f64) -> bool {
        lock(&self.breaker).eject(cfg, now, r)
    }

    pub fn is_ejected(&self) -> bool {
        lock(&self.breaker).is_ejected()
    }

    pub fn last_failure(&self) -> Option<Instant> {
        lock(&self.breaker).last_failure()
    }
}

/// An in-flight request to an endpoint.
#[derive(Debug)]
pub struct Pending(Arc<EndpointState>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Candidate for Endpoint {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn available(&self, now: Instant) -> bool {
        lock(&self.state.breaker).is_available(now)
    }
    fn pending(&self) -> u32 {
        self.state.pending()
    }
    fn latency(&self, now: Instant) -> f64 {
        self.state.latency(now).as_nanos() as f64
    }
}

/// Runtime state of one service, kept across tables and reloads.
#[derive(Debug)]
pub struct ServiceState {
    /// Round-robin cursor.
    pub rr: AtomicUsize,
    /// The service's outbound request metrics, resolved on first use.
    pub outbound_metrics: std::sync::OnceLock<crate::telemetry::metrics::ServiceMetrics>,
    budget: Mutex<RetryBudget>,
    bucket: Mutex<Option<TokenBucket>>,
    /// Held while deciding whether one more endpoint may be ejected, so two breakers tripping at once cannot
    /// both take the last ejection the service allows.
    pub ejection: Mutex<()>,
}

impl ServiceState {
    pub fn new(now: Instant) -> Self {
        ServiceState {
            rr: AtomicUsize::new(0),
            outbound_metrics: std::sync::OnceLock::new(),
            budget: Mutex::new(RetryBudget::new(now)),
            bucket: Mutex::new(None),
            ejection: Mutex::new(()),
        }
    }

    pub fn budget_deposit(&self, cfg: &BudgetConfig, now: Instant) {
        lock(&self.budget).deposit(cfg, now);
    }

    pub fn budget_withdraw(&self, cfg: &BudgetConfig, now: Instant) -> bool {
        lock(&self.budget).try_withdraw(cfg, now)
    }

    /// Takes a rate-limit token (the bucket starts full the first time a limit applies).
    pub fn rate_limit(&self, cfg: &RateLimitConfig, now: Instant) -> Result<(), Duration> {
        let mut b = lock(&self.bucket);
        b.get_or_insert_with(|| TokenBucket::new(cfg, now))
            .try_acquire(cfg, now)
    }
}

fn authority(addr: SocketAddr) -> Authority {
    match Authority::try_from(addr.to_string().as_str()) {
        Ok(a) => a,
        Err(_) => unreachable!("a socket address is a valid authority"),
    }
}

impl Endpoint {
    pub fn is_local(&self) -> bool {
        matches!(self.location, Location::Local { .. })
    }
}

/// A service and its endpoints.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// The name as a `mesh-service` header value.
    pub name_header: HeaderValue,
    pub endpoints: Vec<Endpoint>,
    pub state: Arc<ServiceState>,
}

impl Service {
    /// Endpoints whose breaker has them out of rotation.
    pub fn ejected(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.state.is_ejected())
            .count()
    }

    /// How many of the service's endpoints may be ejected at once under `max_ejection_percent`: that share,
    /// rounded down, but at least one unless the percentage is 0.
    pub fn ejection_limit(&self, max_ejection_percent: f64) -> usize {
        if max_ejection_percent <= 0.0 {
            return 0;
        }
        ((self.endpoints.len() as f64 * max_ejection_percent / 100.0).floor() as usize).max(1)
    }
}

/// An immutable snapshot of every known service.
#[derive(Debug, Default)]
pub struct Table {
    pub services: BTreeMap<String, Arc<Service>>,
}

impl Table {
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The local endpoint `addr` of `service`, if this host's own discovery lists it.
    pub fn local_endpoint(&self, service: &str, addr: SocketAddr) -> Option<&Endpoint> {
        self.services
            .get(service)?
            .endpoints
            .iter()
            .find(|e| e.addr == addr && e.is_local())
    }

    /// Number of local endpoints by source, for the discovery gauge.
    pub fn local_counts(&self) -> HashMap<Source, usize> {
        let mut out = HashMap::new();
        for svc in self.services.values() {
            for e in &svc.endpoints {
                if let Location::Local { source } = e.location {
                    *out.entry(source).or_default() += 1;
                }
            }
        }
        out
    }
}

/// A change to the inputs of the table.
#[derive(Debug)]
pub enum Update {
    /// Replace every local endpoint from `source`.
    SetLocal {
        source: Source,
        endpoints: Vec<EndpointSpec>,
    },
    /// Replace everything node `node` announces; its endpoints are reached through `inbound`.
    SetRemote {
        node: String,
        inbound: SocketAddr,
        endpoints: Vec<EndpointSpec>,
    },
    /// Forget a node.
    RemoveRemote { node: String },
    /// Replace the names of services declared in the config (known even with no endpoints).
    SetDeclared { services: BTreeSet<String> },
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

    fn build(&self, reg: &mut StateStore, now: Instant) -> Table {
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
        Table {
            services: services
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
                .collect(),
        }
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

/// Handle for sending updates to the router.
#[derive(Clone, Debug)]
pub struct RoutingHandle {
    tx: mpsc::UnboundedSender<Update>,
}

impl RoutingHandle {
    /// Sends an update; it is applied in order. Returns false once the router has stopped.
    pub fn update(&self, update: Update) -> bool {
        self.tx.send(update).is_ok()
    }
}

/// The table's owner.
pub struct Router {
    rx: mpsc::UnboundedReceiver<Update>,
    inputs: Inputs,
    states: StateStore,
    table_tx: watch::Sender<Arc<Table>>,
    /// `meshd_circuit_breaker_open`: series of removed endpoints are deleted.
    breaker_gauge: Option<prometheus::IntGaugeVec>,
}

impl Router {
    pub fn new() -> (Router, RoutingHandle, watch::Receiver<Arc<Table>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (table_tx, table_rx) = watch::channel(Arc::new(Table::default()));
        (
            Router {
                rx,
                inputs: Inputs::default(),
                states: StateStore::default(),
                table_tx,
                breaker_gauge: None,
            },
            RoutingHandle { tx },
            table_rx,
        )
    }

    /// Deletes the breaker series of endpoints that leave the table.
    pub fn with_breaker_gauge(mut self, gauge: prometheus::IntGaugeVec) -> Self {
        self.breaker_gauge = Some(gauge);
        self
    }

    /// Applies updates until shutdown. Bursts are coalesced: one table is built after draining the queue.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                u = self.rx.recv() => match u { Some(u) => u, None => return },
            };
            self.inputs.apply(first);
            while let Ok(u) = self.rx.try_recv() {
                self.inputs.apply(u);
            }
            let table = self.inputs.build(&mut self.states, Instant::now());
            for (service, addr) in self.states.prune() {
                if let Some(g) = &self.breaker_gauge {
                    let _ = g.remove_label_values(&[&service, &addr.to_string()]);
                }
            }
            tracing::debug!(services = table.services.len(), "routing table updated");
            self.table_tx.send_replace(Arc::new(table));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(service: &str, addr: &str) -> EndpointSpec {
        EndpointSpec {
            service: service.into(),
            addr: addr.parse().unwrap(),
            protocol: Protocol::Http,
            weight: DEFAULT_WEIGHT,
        }
    }

    #[test]
    fn merges_local_and_remote() {
        let mut inputs = Inputs::default();
        inputs.apply(Update::SetDeclared {
            services: ["empty".to_string()].into(),
        });
        inputs.apply(Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("users", "10.0.0.1:80"), spec("users", "10.0.0.2:80")],
        });
        inputs.apply(Update::SetRemote {
            node: "b".into(),
            inbound: "10.1.0.1:4143".parse().unwrap(),
            endpoints: vec![spec("users", "10.0.9.1:80")],
        });
        let mut reg = StateStore::default();
        let now = Instant::now();
        let t = inputs.build(&mut reg, now);
        reg.prune();
        assert_eq!(t.service("users").unwrap().endpoints.len(), 3);
        assert!(t.service("empty").unwrap().endpoints.is_empty());
        assert!(
            t.local_endpoint("users", "10.0.0.1:80".parse().unwrap())
                .is_some()
        );
        // A remote endpoint is never "local", even under the same service.
        assert!(
            t.local_endpoint("users", "10.0.9.1:80".parse().unwrap())
                .is_none()
        );
        assert!(
            t.local_endpoint("other", "10.0.0.1:80".parse().unwrap())
                .is_none()
        );

        inputs.apply(Update::RemoveRemote { node: "b".into() });
        assert_eq!(
            inputs
                .build(&mut reg, now)
                .service("users")
                .unwrap()
                .endpoints
                .len(),
            2
        );
        let removed = reg.prune();
        assert_eq!(
            removed,
            vec![("users".to_string(), "10.0.9.1:80".parse().unwrap())]
        );
    }

    #[test]
    fn endpoint_state_survives_rebuilds() {
        let mut inputs = Inputs::default();
        let mut reg = StateStore::default();
        let now = Instant::now();
        inputs.apply(Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("a", "10.0.0.1:80")],
        });
        let t1 = inputs.build(&mut reg, now);
        reg.prune();
        t1.service("a").unwrap().endpoints[0]
            .state
            .observe_latency(Duration::from_millis(500), now);
        let _pending = t1.service("a").unwrap().endpoints[0].state.start();
        // Another service comes and goes: "a" keeps its statistics.
        inputs.apply(Update::SetDeclared {
            services: ["b".to_string()].into(),
        });
        let t2 = inputs.build(&mut reg, now);
        reg.prune();
        let e = &t2.service("a").unwrap().endpoints[0];
        assert_eq!(e.state.latency(now), Duration::from_millis(500));
        assert_eq!(e.state.pending(), 1);
        assert!(Arc::ptr_eq(
            &t1.service("a").unwrap().state,
            &t2.service("a").unwrap().state
        ));
    }

    #[tokio::test]
    async fn router_publishes_snapshots() {
        let (router, handle, mut rx) = Router::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(router.run(stop.clone()));
        assert!(handle.update(Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("a", "10.0.0.1:80")],
        }));
        rx.changed().await.unwrap();
        assert!(rx.borrow().service("a").is_some());
        stop.cancel();
        task.await.unwrap();
    }
}
