//! What the table is built from — this host's discovery, what each other node announces, the declared
//! services — as the router last heard it, and which parts of the table each update invalidates.
//!
//! Inputs are kept grouped by service, so that an update can say exactly which (service, origin) segments of
//! the table it changed; an update that changes nothing marks nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use super::{EndpointSpec, Location, Source, Update};

/// Who announced an endpoint: this host's discovery, or another node. Ordered as a service lists its
/// endpoints: this host's first, then other nodes' by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Origin {
    Local,
    Remote(Arc<str>),
}

/// [`Origin`] borrowed from an endpoint's location; same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum OriginRef<'a> {
    Local,
    Remote(&'a str),
}

impl Origin {
    pub(super) fn as_ref(&self) -> OriginRef<'_> {
        match self {
            Origin::Local => OriginRef::Local,
            Origin::Remote(n) => OriginRef::Remote(n),
        }
    }
}

impl<'a> OriginRef<'a> {
    pub(super) fn of(location: &'a Location) -> Self {
        match location {
            Location::Local { .. } => OriginRef::Local,
            Location::Remote { node, .. } => OriginRef::Remote(node),
        }
    }
}

/// The (service, origin) segments an update invalidated. A service with an empty set only changed whether it
/// is declared.
pub(super) type Dirty = BTreeMap<String, BTreeSet<Origin>>;

fn mark(dirty: &mut Dirty, service: &str, origin: Option<&Origin>) {
    let set = match dirty.get_mut(service) {
        Some(s) => s,
        None => dirty.entry(service.to_string()).or_default(),
    };
    if let Some(o) = origin {
        set.insert(o.clone());
    }
}

/// Endpoint specs grouped by service; no group is empty.
pub(super) type ByService = BTreeMap<String, Vec<EndpointSpec>>;

fn group(endpoints: Vec<EndpointSpec>) -> ByService {
    let mut out = ByService::new();
    for e in endpoints {
        match out.get_mut(&e.service) {
            Some(v) => v.push(e),
            None => {
                out.insert(e.service.clone(), vec![e]);
            }
        }
    }
    out
}

/// Services whose group differs between `old` and `new`.
fn differing<'a>(old: &'a ByService, new: &'a ByService) -> impl Iterator<Item = &'a str> {
    let changed = new
        .iter()
        .filter(|(s, v)| old.get(*s) != Some(*v))
        .map(|(s, _)| s.as_str());
    let gone = old
        .keys()
        .filter(|s| !new.contains_key(*s))
        .map(String::as_str);
    changed.chain(gone)
}

/// What one other node announces.
pub(super) struct RemoteNode {
    /// The node's name, shared by its origin and by the pool keys of its endpoints.
    pub(super) name: Arc<str>,
    /// Its inbound listener, which every one of its endpoints is reached through.
    pub(super) inbound: SocketAddr,
    pub(super) services: ByService,
}

#[derive(Default)]
pub(super) struct Inputs {
    pub(super) declared: BTreeSet<String>,
    /// This host's endpoints, by source (static first: it wins an address both list).
    pub(super) local: BTreeMap<Source, ByService>,
    /// Nodes that announce at least one endpoint.
    pub(super) remote: HashMap<String, RemoteNode>,
}

impl Inputs {
    /// Applies `update`, marking in `dirty` what it changed.
    pub(super) fn apply(&mut self, update: Update, dirty: &mut Dirty) {
        match update {
            Update::SetLocal { source, endpoints } => {
                let new = group(endpoints);
                let old = self.local.remove(&source).unwrap_or_default();
                for s in differing(&old, &new) {
                    mark(dirty, s, Some(&Origin::Local));
                }
                self.local.insert(source, new);
            }
            Update::SetRemote {
                node,
                inbound,
                endpoints,
            } => {
                let new = group(endpoints);
                let old = self.remote.remove(&node);
                let name = match &old {
                    Some(o) => o.name.clone(),
                    None => Arc::from(node.as_str()),
                };
                let origin = Origin::Remote(name.clone());
                match &old {
                    // Every endpoint of the node moves to the new inbound.
                    Some(o) if o.inbound != inbound => {
                        for s in o.services.keys().chain(new.keys()) {
                            mark(dirty, s, Some(&origin));
                        }
                    }
                    _ => {
                        let empty = ByService::new();
                        let old = old.as_ref().map_or(&empty, |o| &o.services);
                        for s in differing(old, &new) {
                            mark(dirty, s, Some(&origin));
                        }
                    }
                }
                if !new.is_empty() {
                    let services = new;
                    self.remote.insert(
                        node,
                        RemoteNode {
                            name,
                            inbound,
                            services,
                        },
                    );
                }
            }
            Update::SetRemoteService {
                node,
                inbound,
                service,
                mut endpoints,
            } => {
                let before = endpoints.len();
                endpoints.retain(|e| e.service == service);
                if endpoints.len() != before {
                    tracing::warn!(
                        %node,
                        %service,
                        ignored = before - endpoints.len(),
                        "SetRemoteService: ignoring endpoints of other services"
                    );
                }
                if endpoints.is_empty() && !self.remote.contains_key(&node) {
                    return;
                }
                let entry = self
                    .remote
                    .entry(node)
                    .or_insert_with_key(|node| RemoteNode {
                        name: Arc::from(node.as_str()),
                        inbound,
                        services: ByService::new(),
                    });
                let origin = Origin::Remote(entry.name.clone());
                if entry.inbound != inbound {
                    entry.inbound = inbound;
                    for s in entry.services.keys() {
                        mark(dirty, s, Some(&origin));
                    }
                }
                let old = entry.services.get(&service);
                if old.map_or(endpoints.is_empty(), |o| *o == endpoints) {
                    return;
                }
                mark(dirty, &service, Some(&origin));
                if endpoints.is_empty() {
                    entry.services.remove(&service);
                    if entry.services.is_empty() {
                        let node = entry.name.clone();
                        self.remote.remove(&*node);
                    }
                } else {
                    entry.services.insert(service, endpoints);
                }
            }
            Update::RemoveRemote { node } => {
                if let Some(old) = self.remote.remove(&node) {
                    let origin = Origin::Remote(old.name);
                    for s in old.services.keys() {
                        mark(dirty, s, Some(&origin));
                    }
                }
            }
            Update::SetDeclared { services } => {
                for s in self.declared.symmetric_difference(&services) {
                    mark(dirty, s, None);
                }
                self.declared = services;
            }
        }
    }

    /// Every segment of every service, as if all had changed.
    pub(super) fn everything(&self) -> Dirty {
        let mut dirty = Dirty::new();
        for s in &self.declared {
            mark(&mut dirty, s, None);
        }
        for s in self.local.values().flat_map(|by| by.keys()) {
            mark(&mut dirty, s, Some(&Origin::Local));
        }
        for n in self.remote.values() {
            let origin = Origin::Remote(n.name.clone());
            for s in n.services.keys() {
                mark(&mut dirty, s, Some(&origin));
            }
        }
        dirty
    }
}
