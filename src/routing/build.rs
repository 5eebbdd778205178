//! Rebuilding one service's endpoint list from its previous list and the segments that changed.
//!
//! A service's endpoints are kept in segments by origin (this host's, then each node's by name). Clean segments
//! are copied from the previous list as they are; dirty ones are rebuilt from the inputs. An endpoint's runtime
//! state lives only in the table, so the previous segment is also where a rebuilt endpoint finds its state: the
//! same (address, pool key) within the same service and origin keeps its `Arc<EndpointState>`, anything else
//! gets a fresh one, and what the new segment no longer holds is reported as removed. Only dirty segments are
//! ever looked at.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::inputs::{Inputs, Origin, OriginRef};
use super::{Endpoint, EndpointSpec, EndpointState, Location, Source, pool_key};
use crate::proxy::pool::{PoolKey, Wire};

/// `service`'s endpoints after the `dirty` segments change; the addresses of endpoints whose state was dropped
/// are pushed to `removed`.
pub(super) fn endpoints(
    inputs: &Inputs,
    service: &str,
    prev: &[Endpoint],
    dirty: &BTreeSet<Origin>,
    now: Instant,
    removed: &mut Vec<SocketAddr>,
) -> Vec<Endpoint> {
    let mut out = Vec::with_capacity(prev.len());
    let mut dirty = dirty.iter().peekable();
    let mut rest = prev;
    while let Some(first) = rest.first() {
        let origin = OriginRef::of(&first.location);
        let len = rest
            .iter()
            .position(|e| OriginRef::of(&e.location) != origin)
            .unwrap_or(rest.len());
        let (old, tail) = rest.split_at(len);
        rest = tail;
        // Segments that were empty come before this one.
        while let Some(d) = dirty.next_if(|d| d.as_ref() < origin) {
            segment(inputs, service, d, &[], now, &mut out, removed);
        }
        match dirty.next_if(|d| d.as_ref() == origin) {
            Some(d) => segment(inputs, service, d, old, now, &mut out, removed),
            None => out.extend_from_slice(old),
        }
    }
    for d in dirty {
        segment(inputs, service, d, &[], now, &mut out, removed);
    }
    out
}

/// Appends `service`'s endpoints from `origin` to `out`, reusing what `old` (that segment of the previous list)
/// can give.
fn segment(
    inputs: &Inputs,
    service: &str,
    origin: &Origin,
    old: &[Endpoint],
    now: Instant,
    out: &mut Vec<Endpoint>,
    removed: &mut Vec<SocketAddr>,
) {
    let mut reuse = Reuse::new(old);
    match origin {
        Origin::Local => {
            let mut seen = Vec::new();
            let mut seen_many = HashSet::new();
            for (source, by) in &inputs.local {
                for s in by.get(service).into_iter().flatten() {
                    // The same address found twice (static and docker) is one endpoint.
                    let dup = if seen.len() < SMALL {
                        seen.contains(&s.addr) || {
                            seen.push(s.addr);
                            false
                        }
                    } else {
                        seen_many.extend(seen.drain(..));
                        !seen_many.insert(s.addr)
                    };
                    if dup {
                        continue;
                    }
                    let location = Place::Local(*source);
                    let key = pool_key(s.addr, s.protocol, &Location::Local { source: *source });
                    out.push(reuse.endpoint(s, location, key, now));
                }
            }
        }
        Origin::Remote(node) => {
            if let Some(n) = inputs.remote.get(&**node) {
                for s in n.services.get(service).into_iter().flatten() {
                    let key = PoolKey {
                        addr: n.inbound,
                        wire: Wire::H2,
                        identity: Some(n.name.clone()),
                    };
                    let location = Place::Remote(&n.name, n.inbound);
                    out.push(reuse.endpoint(s, location, key, now));
                }
            }
        }
    }
    reuse.leftover(removed);
}

/// Up to this many, a segment's endpoints are searched in a list rather than hashed: gossip updates carry a
/// handful.
const SMALL: usize = 16;

/// Where a rebuilt endpoint lives, before it is known whether a [`Location`] must be allocated for it.
#[derive(Clone, Copy)]
enum Place<'a> {
    Local(Source),
    Remote(&'a str, SocketAddr),
}

impl Place<'_> {
    fn is(&self, l: &Location) -> bool {
        match (self, l) {
            (Place::Local(a), Location::Local { source }) => a == source,
            (Place::Remote(n, i), Location::Remote { node, inbound }) => n == node && i == inbound,
            _ => false,
        }
    }

    fn location(&self) -> Location {
        match *self {
            Place::Local(source) => Location::Local { source },
            Place::Remote(node, inbound) => Location::Remote {
                node: node.to_string(),
                inbound,
            },
        }
    }
}

/// The previous endpoints of one segment, by state identity (address and pool key).
struct Reuse<'a> {
    /// Each with whether the new segment took its state.
    old: Vec<(&'a Endpoint, bool)>,
    /// Index into `old`, for long segments.
    index: HashMap<(SocketAddr, &'a PoolKey), usize>,
    /// Fresh states handed out by this rebuild (an endpoint listed twice shares one).
    fresh: HashMap<(SocketAddr, PoolKey), Arc<EndpointState>>,
}

impl<'a> Reuse<'a> {
    fn new(old: &'a [Endpoint]) -> Self {
        let index = if old.len() > SMALL {
            old.iter()
                .enumerate()
                .map(|(i, e)| ((e.addr, e.state.pool.key()), i))
                .collect()
        } else {
            HashMap::new()
        };
        Reuse {
            old: old.iter().map(|e| (e, false)).collect(),
            index,
            fresh: HashMap::new(),
        }
    }

    fn find(&self, addr: SocketAddr, key: &PoolKey) -> Option<usize> {
        if self.old.len() > SMALL {
            self.index.get(&(addr, key)).copied()
        } else {
            self.old
                .iter()
                .position(|(e, _)| e.addr == addr && e.state.pool.key() == key)
        }
    }

    fn endpoint(&mut self, s: &EndpointSpec, place: Place, key: PoolKey, now: Instant) -> Endpoint {
        if let Some(i) = self.find(s.addr, &key) {
            let (old, taken) = &mut self.old[i];
            let unchanged = !*taken
                && old.protocol == s.protocol
                && old.weight == s.weight
                && place.is(&old.location);
            *taken = true;
            return if unchanged {
                // Copy it rather than format its address again.
                old.clone()
            } else {
                Endpoint::new(
                    s.addr,
                    s.protocol,
                    s.weight,
                    place.location(),
                    old.state.clone(),
                )
            };
        }
        let state = self
            .fresh
            .entry((s.addr, key))
            .or_insert_with_key(|(_, key)| Arc::new(EndpointState::new(now, key.clone())))
            .clone();
        Endpoint::new(s.addr, s.protocol, s.weight, place.location(), state)
    }

    /// Pushes the addresses of previous endpoints the new segment does not hold.
    fn leftover(self, removed: &mut Vec<SocketAddr>) {
        for (i, (e, taken)) in self.old.iter().enumerate() {
            // An endpoint listed twice is one state, found (and taken) at one of its places: count it there.
            if !taken && self.find(e.addr, e.state.pool.key()) == Some(i) {
                removed.push(e.addr);
            }
        }
    }
}

/// Local endpoints of a service's list (its first segment) counted by source.
pub(super) fn local_by_source(endpoints: &[Endpoint]) -> impl Iterator<Item = Source> + '_ {
    endpoints.iter().map_while(|e| match e.location {
        Location::Local { source } => Some(source),
        Location::Remote { .. } => None,
    })
}

/// The specs of a service's local endpoints, sorted: what this host announces for it.
pub(super) fn local_specs(service: &str, endpoints: &[Endpoint]) -> Vec<EndpointSpec> {
    let mut out: Vec<EndpointSpec> = endpoints
        .iter()
        .take_while(|e| e.is_local())
        .map(|e| EndpointSpec {
            service: service.to_string(),
            addr: e.addr,
            protocol: e.protocol,
            weight: e.weight,
        })
        .collect();
    out.sort();
    out
}
