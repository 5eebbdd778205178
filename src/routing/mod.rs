//! The routing table: which endpoints serve each service, merged from this host's discovery and from the
//! endpoint sets that other nodes announce.
//!
//! [`Router`] is the table's only writer. Discovery and membership send it typed [`Update`]s; after each burst
//! it publishes a fresh immutable [`Table`] on a `watch` channel. The proxy reads snapshots and never writes.
//! Nothing here does I/O.
//!
//! Tables are built incrementally, so that gossip from a thousand hosts costs what it changes rather than the
//! size of the mesh: services are shared `Arc<Service>`s, and an update rebuilds only the services it touches
//! — within them, only the segments (this host's endpoints, or one node's) it changed; every other service is
//! the same `Arc` in the next table.
//!
//! Each endpoint and service carries runtime state that must outlive any one table — latency estimate,
//! in-flight count, circuit breaker and connection pool per endpoint; round-robin cursor, retry budget and rate
//! limiter per service. That state lives in the table itself: a rebuilt endpoint takes the `Arc` of the
//! endpoint with the same identity (service, address, owning node, pool key) in the previous table, so churn
//! elsewhere or a config reload never resets an endpoint's statistics, and an endpoint that leaves takes its
//! state with it. A service's state lives while the service exists (declared, or with endpoints).
//!
//! The router also publishes what this host's own discovery found ([`Router::local_endpoints`]), for gossip
//! to announce.
//!
//! Layout: `table` (the published types and their runtime state), `inputs` (what the table is built from and
//! what each update invalidates), `build` (rebuilding one service's endpoint list).

mod build;
mod inputs;
mod table;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use inputs::{Dirty, Inputs, Origin};
use table::LocalCounts;
pub use table::{
    DEFAULT_WEIGHT, Endpoint, EndpointSpec, EndpointState, Location, Pending, Service,
    ServiceState, Source, Table, pool_key,
};

/// A burst of updates that takes longer than this to apply is logged: the proxy reads a stale table meanwhile.
pub const SLOW_UPDATE: Duration = Duration::from_millis(50);

/// A change to the inputs of the table.
#[derive(Clone, Debug)]
pub enum Update {
    /// Replace every local endpoint from `source`.
    SetLocal {
        source: Source,
        endpoints: Vec<EndpointSpec>,
    },
    /// Replace everything node `node` announces; its endpoints are reached through `inbound`. Services it no
    /// longer lists lose that node's endpoints.
    SetRemote {
        node: String,
        inbound: SocketAddr,
        endpoints: Vec<EndpointSpec>,
    },
    /// Replace what node `node` announces for one service (an empty list withdraws it). Endpoints whose
    /// `service` is another one are ignored. When `inbound` is not the node's current inbound address, all of
    /// the node's endpoints move to it, with fresh runtime state.
    SetRemoteService {
        node: String,
        inbound: SocketAddr,
        service: String,
        endpoints: Vec<EndpointSpec>,
    },
    /// Forget a node.
    RemoveRemote { node: String },
    /// Replace the names of services declared in the config (known even with no endpoints).
    SetDeclared { services: BTreeSet<String> },
}

/// This host's endpoints by service, as [`Router::local_endpoints`] publishes them.
pub type LocalEndpoints = Arc<BTreeMap<String, Vec<EndpointSpec>>>;

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

    /// False once the router has stopped (the systemd watchdog's probe).
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// The table's owner.
pub struct Router {
    rx: mpsc::UnboundedReceiver<Update>,
    inputs: Inputs,
    /// The services of the table last published.
    services: BTreeMap<Arc<str>, Arc<Service>>,
    local: LocalCounts,
    /// This host's endpoints by service (only services that have some), as last published on `local_tx`.
    announced: BTreeMap<String, Vec<EndpointSpec>>,
    table_tx: watch::Sender<Arc<Table>>,
    local_tx: watch::Sender<LocalEndpoints>,
    /// `meshd_circuit_breaker_open`: series of removed endpoints are deleted.
    breaker_gauge: Option<prometheus::IntGaugeVec>,
}

impl Router {
    pub fn new() -> (Router, RoutingHandle, watch::Receiver<Arc<Table>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (table_tx, table_rx) = watch::channel(Arc::new(Table::default()));
        let (local_tx, _) = watch::channel(LocalEndpoints::default());
        (
            Router {
                rx,
                inputs: Inputs::default(),
                services: BTreeMap::new(),
                local: LocalCounts::default(),
                announced: BTreeMap::new(),
                table_tx,
                local_tx,
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

    /// This host's own endpoints, for gossip to announce: one entry per service with at least one local
    /// endpoint (static and docker merged, one per address as in the table, sorted). A new value is published
    /// only when they change.
    pub fn local_endpoints(&self) -> watch::Receiver<LocalEndpoints> {
        self.local_tx.subscribe()
    }

    /// Applies updates until shutdown. Bursts are coalesced: one table is published after draining the queue.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut burst = Vec::new();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                u = self.rx.recv() => match u { Some(u) => u, None => return },
            };
            burst.push(first);
            while let Ok(u) = self.rx.try_recv() {
                burst.push(u);
            }
            self.apply(burst.drain(..));
        }
    }

    /// Applies a burst of updates and publishes the resulting table — once, and only when something changed.
    /// This is what [`Router::run`] does with each burst; benches and tests call it to drive the router without
    /// a runtime.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = Update>) {
        let mut dirty = Dirty::new();
        for u in updates {
            self.inputs.apply(u, &mut dirty);
        }
        self.rebuild(dirty);
    }

    /// Rebuilds every service from the inputs and publishes, as every update did before tables were built
    /// incrementally (runtime state is kept, as then). For benchmarks and consistency checks.
    pub fn rebuild_all(&mut self) {
        let dirty = self.inputs.everything();
        self.rebuild(dirty);
    }

    fn rebuild(&mut self, dirty: Dirty) {
        if dirty.is_empty() {
            return;
        }
        let started = Instant::now();
        let now = started;
        let mut changed = false;
        let mut announced_changed = false;
        let mut removed = Vec::new();
        for (name, origins) in &dirty {
            let declared = self.inputs.declared.contains(name);
            let prev = self.services.get(name.as_str());
            if origins.is_empty() {
                // Only whether it is declared changed.
                match prev {
                    Some(p) if !declared && p.endpoints.is_empty() => {
                        self.services.remove(name.as_str());
                        changed = true;
                    }
                    None if declared => {
                        let svc = Arc::new(Service::fresh(name, Vec::new(), now));
                        self.services.insert(svc.name.clone(), svc);
                        changed = true;
                    }
                    _ => {}
                }
                continue;
            }
            changed = true;
            let prev_endpoints = prev.map_or(&[][..], |p| &p.endpoints[..]);
            removed.clear();
            let endpoints = build::endpoints(
                &self.inputs,
                name,
                prev_endpoints,
                origins,
                now,
                &mut removed,
            );
            if origins.contains(&Origin::Local) {
                for source in build::local_by_source(prev_endpoints) {
                    *self.local.get_mut(source) -= 1;
                }
                for source in build::local_by_source(&endpoints) {
                    *self.local.get_mut(source) += 1;
                }
                let specs = build::local_specs(name, &endpoints);
                if self.announced.get(name).map_or(&[][..], Vec::as_slice) != specs.as_slice() {
                    announced_changed = true;
                    if specs.is_empty() {
                        self.announced.remove(name);
                    } else {
                        self.announced.insert(name.clone(), specs);
                    }
                }
            }
            if let Some(g) = &self.breaker_gauge {
                for addr in &removed {
                    let _ = g.remove_label_values(&[name, &addr.to_string()]);
                }
            }
            let svc = match prev {
                _ if endpoints.is_empty() && !declared => None,
                Some(p) => Some(p.with_endpoints(endpoints)),
                None => Some(Service::fresh(name, endpoints, now)),
            };
            match svc {
                Some(svc) => {
                    let svc = Arc::new(svc);
                    self.services.insert(svc.name.clone(), svc);
                }
                None => {
                    self.services.remove(name.as_str());
                }
            }
        }
        if changed {
            let table = Table {
                services: self.services.clone(),
                local: self.local,
            };
            self.table_tx.send_replace(Arc::new(table));
        }
        if announced_changed {
            self.local_tx.send_replace(Arc::new(self.announced.clone()));
        }
        let elapsed = started.elapsed();
        if elapsed > SLOW_UPDATE {
            tracing::warn!(
                services = self.services.len(),
                touched = dirty.len(),
                ?elapsed,
                "routing table update was slow"
            );
        } else {
            tracing::debug!(
                services = self.services.len(),
                touched = dirty.len(),
                ?elapsed,
                "routing table updated"
            );
        }
    }
}
