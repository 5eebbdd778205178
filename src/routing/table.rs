//! The published shapes: [`Table`], [`Service`], [`Endpoint`] and the runtime state they carry. Built only by
//! the router (see [`super`]); everything here is read by the proxy and the admin API.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderValue;
use http::uri::Authority;
use serde::Serialize;

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
    /// The service's outbound `/v1/stats` window, resolved on first use.
    pub outbound_stats: std::sync::OnceLock<Option<crate::telemetry::requests::StatsWindow>>,
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
            outbound_stats: std::sync::OnceLock::new(),
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

/// A service and its endpoints. Shared between tables: an update that does not touch a service leaves the same
/// `Arc<Service>` in the next table.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// The name as a `mesh-service` header value.
    pub name_header: HeaderValue,
    /// This host's endpoints first (static before docker, in discovery order), then each other node's, by node
    /// name, in the order that node announced them.
    pub endpoints: Vec<Endpoint>,
    pub state: Arc<ServiceState>,
}

impl Service {
    /// A service first seen now, with fresh runtime state.
    pub(super) fn fresh(name: &str, endpoints: Vec<Endpoint>, now: Instant) -> Self {
        Service {
            name: Arc::from(name),
            // Service names are validated (config) or come from discovery, which validates them too.
            name_header: HeaderValue::from_str(name)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            endpoints,
            state: Arc::new(ServiceState::new(now)),
        }
    }

    /// The same service with other endpoints: its name and runtime state carry over.
    pub(super) fn with_endpoints(&self, endpoints: Vec<Endpoint>) -> Self {
        Service {
            name: self.name.clone(),
            name_header: self.name_header.clone(),
            endpoints,
            state: self.state.clone(),
        }
    }

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
///
/// Keys are `Arc<str>` (each the service's own [`Service::name`]) so that publishing a table, which copies the
/// map, costs a reference count per service rather than a string allocation. Lookups take a `&str`.
#[derive(Debug, Default)]
pub struct Table {
    pub services: BTreeMap<Arc<str>, Arc<Service>>,
    /// Local endpoints by source, kept by the router as it rebuilds services.
    pub(super) local: LocalCounts,
}

/// How many local endpoints each discovery source contributes to the table (after de-duplication: an address
/// listed by both counts once, as static).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LocalCounts {
    pub(super) static_: usize,
    pub(super) docker: usize,
}

impl LocalCounts {
    pub(super) fn get_mut(&mut self, source: Source) -> &mut usize {
        match source {
            Source::Static => &mut self.static_,
            Source::Docker => &mut self.docker,
        }
    }
}

impl Table {
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The local endpoint `addr` of `service`, if this host's own discovery lists it.
    pub fn local_endpoint(&self, service: &str, addr: SocketAddr) -> Option<&Endpoint> {
        // A service lists this host's endpoints first.
        self.services
            .get(service)?
            .endpoints
            .iter()
            .take_while(|e| e.is_local())
            .find(|e| e.addr == addr)
    }

    /// Number of local endpoints by source, for the discovery gauge: sources with none are absent. Constant
    /// time — the router keeps the counts as it rebuilds services.
    pub fn local_counts(&self) -> HashMap<Source, usize> {
        [
            (Source::Static, self.local.static_),
            (Source::Docker, self.local.docker),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}
