//! The routing table: which endpoints serve each service, merged from this host's discovery and from the
//! endpoint sets that other nodes announce.
//!
//! [`Router`] is the table's only writer. Discovery and membership send it typed [`Update`]s; after each one it
//! builds a fresh immutable [`Table`] and publishes it on a `watch` channel. The proxy reads snapshots and never
//! writes. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use http::uri::Authority;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Protocol;

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub weight: u32,
    pub location: Location,
    /// `addr` as a URI authority and as a header value (`mesh-endpoint`).
    pub addr_authority: Authority,
    pub addr_header: HeaderValue,
    /// Where requests for this endpoint are sent: `addr` itself, or the owning node's inbound listener.
    pub next_hop: Authority,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, protocol: Protocol, weight: u32, location: Location) -> Self {
        let next_hop = match &location {
            Location::Local { .. } => addr,
            Location::Remote { inbound, .. } => *inbound,
        };
        Endpoint {
            addr,
            protocol,
            weight,
            location,
            addr_authority: authority(addr),
            addr_header: HeaderValue::from_str(&addr.to_string())
                .unwrap_or_else(|_| unreachable!("a socket address is a valid header value")),
            next_hop: authority(next_hop),
        }
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
    /// Round-robin cursor. The traffic-policy balancers replace this.
    next: AtomicUsize,
}

impl Service {
    /// Picks the next endpoint in turn, or `None` when the service has no endpoints.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

/// An immutable snapshot of every known service.
#[derive(Debug, Default)]
pub struct Table {
    pub services: BTreeMap<String, Service>,
}

impl Table {
    pub fn service(&self, name: &str) -> Option<&Service> {
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

    fn build(&self) -> Table {
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
                eps.push(Endpoint::new(
                    s.addr,
                    s.protocol,
                    s.weight,
                    Location::Local { source: *source },
                ));
            }
        }
        for (node, (inbound, specs)) in &self.remote {
            for s in specs {
                services
                    .entry(s.service.clone())
                    .or_default()
                    .push(Endpoint::new(
                        s.addr,
                        s.protocol,
                        s.weight,
                        Location::Remote {
                            node: node.clone(),
                            inbound: *inbound,
                        },
                    ));
            }
        }
        Table {
            services: services
                .into_iter()
                .map(|(name, endpoints)| {
                    let svc = Service {
                        name: Arc::from(name.as_str()),
                        // Service names are validated (config) or come from discovery, which validates them too.
                        name_header: HeaderValue::from_str(&name)
                            .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                        endpoints,
                        next: AtomicUsize::new(0),
                    };
                    (name, svc)
                })
                .collect(),
        }
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
    table_tx: watch::Sender<Arc<Table>>,
}

impl Router {
    pub fn new() -> (Router, RoutingHandle, watch::Receiver<Arc<Table>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (table_tx, table_rx) = watch::channel(Arc::new(Table::default()));
        (
            Router {
                rx,
                inputs: Inputs::default(),
                table_tx,
            },
            RoutingHandle { tx },
            table_rx,
        )
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
            let table = self.inputs.build();
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
        let t = inputs.build();
        assert_eq!(t.service("users").unwrap().endpoints.len(), 3);
        assert!(t.service("empty").unwrap().endpoints.is_empty());
        assert!(t.service("empty").unwrap().pick().is_none());
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
        assert_eq!(inputs.build().service("users").unwrap().endpoints.len(), 2);
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let mut inputs = Inputs::default();
        inputs.apply(Update::SetLocal {
            source: Source::Static,
            endpoints: vec![
                spec("a", "10.0.0.1:80"),
                spec("a", "10.0.0.2:80"),
                spec("a", "10.0.0.3:80"),
            ],
        });
        let t = inputs.build();
        let svc = t.service("a").unwrap();
        let picks: BTreeSet<SocketAddr> = (0..3).map(|_| svc.pick().unwrap().addr).collect();
        assert_eq!(picks.len(), 3);
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
