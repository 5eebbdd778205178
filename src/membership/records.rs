//! Endpoint records: what each host serves, versioned, as they travel in gossip broadcasts and state sync.
//!
//! Every host numbers the changes to its own endpoint set: version 1, 2, 3, … within one generation (one run of
//! the agent). A change to one service travels as a [`ServiceRecord`] carrying the version before and after it,
//! so a receiver can tell when it has missed one: it still applies what it got (it is newer for that service),
//! but its "complete" version for the host stays behind until the gap is filled — by the missing record, or by
//! a [`NodeSnapshot`] from state sync, which replaces the host's whole set at once. State-sync digests compare
//! complete versions, so whatever gossip lost is repaired at the next sync.
//!
//! Nothing from the network reaches the routing table unchecked: names, addresses, protocols, weights and
//! counts are validated here, and a record that fails is dropped and counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::identity::{check_ip, check_name};
use crate::config::{Protocol, check_service_name};
use crate::routing::EndpointSpec;

/// Endpoints one host may announce for one service.
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 1024;
/// Services one host may announce.
pub const MAX_SERVICES_PER_NODE: usize = 4096;
/// Out-of-order changes remembered per host while a gap is open.
pub const MAX_AHEAD: usize = 1024;
/// Largest endpoint weight accepted from a peer.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// One endpoint as it travels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WireEndpoint {
    pub addr: SocketAddr,
    /// 0 http, 1 h2c, 2 grpc.
    pub protocol: u8,
    pub weight: u32,
}

impl WireEndpoint {
    pub fn from_spec(s: &EndpointSpec) -> WireEndpoint {
        WireEndpoint {
            addr: s.addr,
            protocol: match s.protocol {
                Protocol::Http => 0,
                Protocol::H2c => 1,
                Protocol::Grpc => 2,
            },
            weight: s.weight,
        }
    }

    fn to_spec(&self, service: &str) -> Result<EndpointSpec, &'static str> {
        check_ip(self.addr.ip()).map_err(|_| "endpoint address")?;
        if self.addr.port() == 0 {
            return Err("endpoint port 0");
        }
        let protocol = match self.protocol {
            0 => Protocol::Http,
            1 => Protocol::H2c,
            2 => Protocol::Grpc,
            _ => return Err("protocol"),
        };
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err("weight");
        }
        Ok(EndpointSpec {
            service: service.to_string(),
            addr: self.addr,
            protocol,
            weight: self.weight,
        })
    }
}

/// A change to what `node` serves for `service`: its endpoints as of the host's version `version` (the one
/// before the change was `prev`). No endpoints: the host no longer serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub node: String,
    pub generation: u64,
    pub prev: u64,
    pub version: u64,
    pub service: String,
    pub endpoints: Vec<WireEndpoint>,
}

impl ServiceRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<ServiceRecord, &'static str> {
        postcard::from_bytes(data).map_err(|_| "undecodable record")
    }
}

/// Everything `node` serves as of `version`: each service with the version it last changed at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    pub node: String,
    pub generation: u64,
    pub version: u64,
    pub services: Vec<(String, u64, Vec<WireEndpoint>)>,
}

/// One line of a state-sync digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DigestEntry {
    pub node: String,
    pub generation: u64,
    pub version: u64,
}

/// What became of a record or snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Newer than what we had: applied (and worth passing on).
    New,
    /// Known already, or older.
    Stale,
    /// About a host that is not a live member at that generation (yet, or any more): a record may name only a
    /// host foca vouches for, so nobody can void a live host's records with a made-up generation.
    Unknown,
    /// Failed validation.
    Invalid(&'static str),
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::New => "accepted",
            Outcome::Stale => "stale",
            Outcome::Unknown => "unknown-node",
            Outcome::Invalid(_) => "invalid",
        }
    }
}

fn check_endpoints(
    service: &str,
    endpoints: &[WireEndpoint],
) -> Result<Vec<EndpointSpec>, &'static str> {
    check_service_name(service).map_err(|_| "service name")?;
    if service.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("service name case");
    }
    if endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
        return Err("too many endpoints");
    }
    let mut specs = endpoints
        .iter()
        .map(|e| e.to_spec(service))
        .collect::<Result<Vec<_>, _>>()?;
    specs.sort();
    specs.dedup_by(|a, b| a.addr == b.addr);
    Ok(specs)
}

/// What one host serves, as far as this agent knows.
#[derive(Debug, Default)]
struct NodeRecords {
    generation: u64,
    /// Every change up to this version has been applied.
    complete: u64,
    /// Changes applied beyond `complete`: prev → version, to close the gap when the missing one arrives.
    ahead: BTreeMap<u64, u64>,
    /// Service → (version it last changed at, endpoints). An empty list is kept as a tombstone, so an older
    /// record cannot bring the endpoints back.
    services: BTreeMap<String, (u64, Vec<EndpointSpec>)>,
}

impl NodeRecords {
    fn advance(&mut self) {
        while let Some(v) = self.ahead.remove(&self.complete) {
            self.complete = v;
        }
        // Anything at or below `complete` is covered now.
        let complete = self.complete;
        self.ahead.retain(|p, _| *p > complete);
    }
}

/// The endpoint records of every other host, for the membership driver (their only writer) and the foca
/// broadcast handler. Records of hosts that are not (yet) live members are kept but not routed; the driver
/// decides what reaches the routing table.
#[derive(Debug, Default)]
pub struct Store {
    own: String,
    nodes: HashMap<String, NodeRecords>,
    /// Hosts declared down: records of these generations or older are refused.
    buried: HashMap<String, u64>,
    /// Live members by name, with their generation: only their records are taken.
    members: HashMap<String, u64>,
    /// (node, service) whose endpoints changed since the driver last looked.
    changed: BTreeSet<(String, String)>,
    /// Records dropped by reason, and accepted ones.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Store {
    pub fn new(own: &str) -> Store {
        Store {
            own: own.to_string(),
            ..Store::default()
        }
    }

    fn count(&mut self, outcome: Outcome) -> Outcome {
        *self.counts.entry(outcome.label()).or_default() += 1;
        if let Outcome::Invalid(why) = outcome {
            tracing::debug!(reason = why, "dropped an invalid endpoint record");
        }
        outcome
    }

    /// The record state of `node` at `generation`, replacing an older generation's; `None` when the
    /// generation is older than what is known (or buried).
    fn node_at(&mut self, node: &str, generation: u64) -> Option<&mut NodeRecords> {
        if self.buried.get(node).is_some_and(|g| generation <= *g) {
            return None;
        }
        if self.members.get(node) != Some(&generation) {
            return None;
        }
        let entry = self.nodes.entry(node.to_string()).or_default();
        if generation < entry.generation {
            return None;
        }
        if generation > entry.generation {
            // A new run of that host: everything it said before is void.
            for s in entry.services.keys() {
                self.changed.insert((node.to_string(), s.clone()));
            }
            *entry = NodeRecords {
                generation,
                ..NodeRecords::default()
            };
        }
        Some(entry)
    }

    /// Applies one broadcast record.
    pub fn apply_record(&mut self, r: &ServiceRecord) -> Outcome {
        let outcome = self.apply_record_inner(r);
        self.count(outcome)
    }

    fn apply_record_inner(&mut self, r: &ServiceRecord) -> Outcome {
        if check_name(&r.node).is_err() {
            return Outcome::Invalid("node name");
        }
        if r.node == self.own {
            // Our own record, echoed back by gossip.
            return Outcome::Stale;
        }
        if r.version <= r.prev {
            return Outcome::Invalid("version");
        }
        let specs = match check_endpoints(&r.service, &r.endpoints) {
            Ok(s) => s,
            Err(why) => return Outcome::Invalid(why),
        };
        if self.members.get(&r.node) != Some(&r.generation) {
            return Outcome::Unknown;
        }
        let Some(n) = self.node_at(&r.node, r.generation) else {
            return Outcome::Stale;
        };
        if r.version <= n.complete {
            return Outcome::Stale;
        }
        let newer = n
            .services
            .get(&r.service)
            .is_none_or(|(v, _)| *v < r.version);
        let known_step = n.ahead.get(&r.prev) == Some(&r.version);
        if !newer && known_step {
            return Outcome::Stale;
        }
        if !n.services.contains_key(&r.service) && n.services.len() >= MAX_SERVICES_PER_NODE {
            return Outcome::Invalid("too many services");
        }
        if n.ahead.len() >= MAX_AHEAD {
            // Too many gaps to track: state sync repairs them.
            return Outcome::Stale;
        }
        n.ahead.insert(r.prev, r.version);
        n.advance();
        if newer {
            let changed = n
                .services
                .get(&r.service)
                .is_none_or(|(_, old)| *old != specs);
            n.services.insert(r.service.clone(), (r.version, specs));
            if changed {
                self.changed.insert((r.node.clone(), r.service.clone()));
            }
        }
        Outcome::New
    }

    /// Applies a state-sync snapshot: the host's whole set as of its version. `from_owner`: it came from that
    /// host itself (its certificate proved it), so it replaces what is known even if a relayed copy claimed a
    /// later version.
    pub fn apply_snapshot(&mut self, s: &NodeSnapshot, from_owner: bool) -> Outcome {
        let outcome = self.apply_snapshot_inner(s, from_owner);
        self.count(outcome)
    }

    fn apply_snapshot_inner(&mut self, s: &NodeSnapshot, from_owner: bool) -> Outcome {
        if check_name(&s.node).is_err() {
            return Outcome::Invalid("node name");
        }
        if s.node == self.own {
            return Outcome::Stale;
        }
        if s.services.len() > MAX_SERVICES_PER_NODE {
            return Outcome::Invalid("too many services");
        }
        let mut checked = BTreeMap::new();
        for (name, version, endpoints) in &s.services {
            if *version > s.version {
                return Outcome::Invalid("version");
            }
            match check_endpoints(name, endpoints) {
                Ok(specs) => {
                    if checked.insert(name.clone(), (*version, specs)).is_some() {
                        return Outcome::Invalid("duplicate service");
                    }
                }
                Err(why) => return Outcome::Invalid(why),
            }
        }
        if self.members.get(&s.node) != Some(&s.generation) {
            return Outcome::Unknown;
        }
        let Some(n) = self.node_at(&s.node, s.generation) else {
            return Outcome::Stale;
        };
        let mut changed = Vec::new();
        let reset = from_owner && s.version != n.complete;
        if reset {
            // The owner's word is final: forget whatever relays said about versions it never had.
            changed.extend(n.services.keys().cloned());
            n.services.clear();
            n.complete = 0;
            n.ahead.clear();
        }
        if s.version <= n.complete && !reset {
            return Outcome::Stale;
        }
        // Services we know at or below the snapshot's version and that it no longer lists are gone.
        for (name, (v, specs)) in n.services.iter_mut() {
            if *v <= s.version && !checked.contains_key(name) {
                if !specs.is_empty() {
                    changed.push(name.clone());
                }
                *v = s.version;
                specs.clear();
            }
        }
        for (name, (v, specs)) in checked {
            match n.services.get(&name) {
                Some((mine, _)) if *mine >= v => {}
                Some((_, old)) if *old == specs => {
                    n.services.insert(name, (v, specs));
                }
                _ => {
                    changed.push(name.clone());
                    n.services.insert(name, (v, specs));
                }
            }
        }
        n.complete = s.version;
        n.advance();
        for svc in changed {
            self.changed.insert((s.node.clone(), svc));
        }
        Outcome::New
    }

    /// What this agent knows of `node`, as a snapshot to send a peer.
    pub fn snapshot(&self, node: &str) -> Option<NodeSnapshot> {
        let n = self.nodes.get(node)?;
        Some(NodeSnapshot {
            node: node.to_string(),
            generation: n.generation,
            version: n.complete,
            services: n
                .services
                .iter()
                .filter(|(_, (v, specs))| *v <= n.complete && !specs.is_empty())
                .map(|(name, (v, specs))| {
                    (
                        name.clone(),
                        *v,
                        specs.iter().map(WireEndpoint::from_spec).collect(),
                    )
                })
                .collect(),
        })
    }

    /// (generation, complete version) known for `node`.
    pub fn version(&self, node: &str) -> Option<(u64, u64)> {
        self.nodes.get(node).map(|n| (n.generation, n.complete))
    }

    /// `node`'s endpoints for every service, if its records are of `generation`.
    pub fn endpoints(&self, node: &str, generation: u64) -> Option<Vec<EndpointSpec>> {
        let n = self
            .nodes
            .get(node)
            .filter(|n| n.generation == generation)?;
        Some(
            n.services
                .values()
                .flat_map(|(_, specs)| specs.iter().cloned())
                .collect(),
        )
    }

    /// `node`'s endpoints for `service`, if its records are of `generation`.
    pub fn service_endpoints(
        &self,
        node: &str,
        generation: u64,
        service: &str,
    ) -> Option<Vec<EndpointSpec>> {
        let n = self
            .nodes
            .get(node)
            .filter(|n| n.generation == generation)?;
        Some(
            n.services
                .get(service)
                .map(|(_, s)| s.clone())
                .unwrap_or_default(),
        )
    }

    /// Number of endpoints known for `node`.
    pub fn endpoint_count(&self, node: &str) -> usize {
        self.nodes
            .get(node)
            .map_or(0, |n| n.services.values().map(|(_, s)| s.len()).sum())
    }

    /// Takes the (node, service) pairs changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<(String, String)> {
        std::mem::take(&mut self.changed)
    }

    /// Forgets `node` up to `generation`: it was declared down or left. Its later records (a new run) are
    /// welcome; this run's are refused from now on.
    pub fn bury(&mut self, node: &str, generation: u64) {
        let g = self.buried.entry(node.to_string()).or_insert(generation);
        *g = (*g).max(generation);
        if self
            .nodes
            .get(node)
            .is_some_and(|n| n.generation <= generation)
        {
            self.nodes.remove(node);
        }
    }

    /// `name` is a live member at `generation` (or, with `None`, no longer one): its records are taken only
    /// while it is, and forgotten when it stops being one.
    pub fn set_member(&mut self, name: &str, generation: Option<u64>) {
        match generation {
            Some(g) => {
                self.members.insert(name.to_string(), g);
            }
            None => {
                self.members.remove(name);
                self.nodes.remove(name);
            }
        }
        // Bounded: the newest burials matter; an old one only refuses very late records.
        if self.buried.len() > 2 * MAX_SERVICES_PER_NODE {
            self.buried.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> WireEndpoint {
        WireEndpoint {
            addr: addr.parse().unwrap(),
            protocol: 0,
            weight: 100,
        }
    }

    fn rec(prev: u64, version: u64, service: &str, eps: &[&str]) -> ServiceRecord {
        ServiceRecord {
            node: "b".into(),
            generation: 7,
            prev,
            version,
            service: service.into(),
            endpoints: eps.iter().map(|a| ep(a)).collect(),
        }
    }

    #[test]
    fn records_apply_in_any_order_and_close_gaps() {
        let mut s = Store::new("a");
        s.set_member("b", Some(7));
        assert_eq!(
            s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"])),
            Outcome::New
        );
        assert_eq!(s.version("b"), Some((7, 1)));
        // Version 2 is lost; 3 arrives: applied, but the host is not complete beyond 1.
        assert_eq!(
            s.apply_record(&rec(2, 3, "orders", &["10.0.0.2:80"])),
            Outcome::New
        );
        assert_eq!(s.version("b"), Some((7, 1)));
        assert_eq!(
            s.apply_record(&rec(2, 3, "orders", &["10.0.0.2:80"])),
            Outcome::Stale
        );
        assert_eq!(s.apply_record(&rec(1, 2, "users", &[])), Outcome::New);
        assert_eq!(s.version("b"), Some((7, 3)));
        assert_eq!(s.endpoints("b", 7).unwrap().len(), 1);
        // Older news for a service never overwrites newer.
        assert_eq!(
            s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"])),
            Outcome::Stale
        );
        assert!(s.service_endpoints("b", 7, "users").unwrap().is_empty());
        let changed = s.take_changed();
        assert!(changed.contains(&("b".into(), "users".into())));
        assert!(changed.contains(&("b".into(), "orders".into())));
    }

    #[test]
    fn invalid_records_are_refused() {
        let mut s = Store::new("a");
        s.set_member("b", Some(7));
        let mut bad = rec(0, 1, "users", &["0.0.0.0:80"]);
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(0, 1, "Users", &["10.0.0.1:80"]);
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(0, 1, "10.0.0.1", &["10.0.0.1:80"]);
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(0, 1, "users", &["10.0.0.1:80"]);
        bad.endpoints[0].protocol = 9;
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad.endpoints[0].protocol = 0;
        bad.endpoints[0].weight = 0;
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(0, 1, "users", &[]);
        bad.endpoints = (0..=MAX_ENDPOINTS_PER_SERVICE)
            .map(|i| ep(&format!("10.0.{}.{}:80", i / 250, i % 250 + 1)))
            .collect();
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(3, 3, "users", &[]);
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        bad = rec(0, 1, "users", &[]);
        bad.node = "bad name".into();
        assert!(matches!(s.apply_record(&bad), Outcome::Invalid(_)));
        assert!(s.take_changed().is_empty());
        assert_eq!(s.counts.get("invalid"), Some(&8));
    }

    #[test]
    fn a_snapshot_replaces_the_set_and_a_new_generation_voids_the_old() {
        let mut s = Store::new("a");
        s.set_member("b", Some(7));
        s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"]));
        s.apply_record(&rec(1, 2, "orders", &["10.0.0.2:80"]));
        s.take_changed();
        let snap = NodeSnapshot {
            node: "b".into(),
            generation: 7,
            version: 5,
            services: vec![("users".into(), 4, vec![ep("10.0.0.9:80")])],
        };
        assert_eq!(s.apply_snapshot(&snap, false), Outcome::New);
        assert_eq!(s.apply_snapshot(&snap, false), Outcome::Stale);
        assert_eq!(s.version("b"), Some((7, 5)));
        let users = s.service_endpoints("b", 7, "users").unwrap();
        assert_eq!(users[0].addr, "10.0.0.9:80".parse().unwrap());
        assert!(s.service_endpoints("b", 7, "orders").unwrap().is_empty());
        assert_eq!(s.take_changed().len(), 2);
        // Our snapshot of b carries what we know.
        assert_eq!(s.snapshot("b").unwrap().services.len(), 1);

        // b restarts: generation 8 starts from nothing.
        let mut r = rec(0, 1, "users", &["10.0.0.3:80"]);
        r.generation = 8;
        s.set_member("b", Some(8));
        assert_eq!(s.apply_record(&r), Outcome::New);
        assert_eq!(s.version("b"), Some((8, 1)));
        assert!(s.endpoints("b", 7).is_none());
        // Generation 7 is void now: not the live member's.
        assert_eq!(s.apply_record(&rec(5, 6, "users", &[])), Outcome::Unknown);

        // Buried: that generation's records are refused, a later one is welcome.
        s.bury("b", 8);
        assert_eq!(s.version("b"), None);
        assert_eq!(s.apply_record(&r), Outcome::Stale);
        r.generation = 9;
        s.set_member("b", Some(9));
        assert_eq!(s.apply_record(&r), Outcome::New);
    }

    #[test]
    fn only_live_members_records_are_taken_and_the_owner_has_the_last_word() {
        let mut s = Store::new("a");
        // Not a member: refused, and nothing is stored.
        assert_eq!(
            s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"])),
            Outcome::Unknown
        );
        assert!(s.version("b").is_none());
        s.set_member("b", Some(7));
        // A made-up generation cannot void the live one.
        let mut forged = rec(0, 1, "users", &[]);
        forged.generation = u64::MAX;
        assert_eq!(s.apply_record(&forged), Outcome::Unknown);
        assert_eq!(
            s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"])),
            Outcome::New
        );
        // A relayed snapshot claiming a far later version empties the set; the owner's own puts it back.
        let relayed = NodeSnapshot {
            node: "b".into(),
            generation: 7,
            version: 1000,
            services: vec![],
        };
        assert_eq!(s.apply_snapshot(&relayed, false), Outcome::New);
        assert!(s.service_endpoints("b", 7, "users").unwrap().is_empty());
        let own = NodeSnapshot {
            node: "b".into(),
            generation: 7,
            version: 1,
            services: vec![("users".into(), 1, vec![ep("10.0.0.1:80")])],
        };
        assert_eq!(s.apply_snapshot(&own, true), Outcome::New);
        assert_eq!(s.service_endpoints("b", 7, "users").unwrap().len(), 1);
        assert_eq!(s.version("b"), Some((7, 1)));
        // No longer a member: forgotten.
        s.set_member("b", None);
        assert!(s.version("b").is_none());
    }

    #[test]
    fn own_records_are_ignored() {
        let mut s = Store::new("b");
        s.set_member("b", Some(7));
        assert_eq!(
            s.apply_record(&rec(0, 1, "users", &["10.0.0.1:80"])),
            Outcome::Stale
        );
        assert!(s.version("b").is_none());
    }
}
