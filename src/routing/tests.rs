use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::Protocol;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn spec(service: &str, a: &str) -> EndpointSpec {
    EndpointSpec {
        service: service.into(),
        addr: addr(a),
        protocol: Protocol::Http,
        weight: DEFAULT_WEIGHT,
    }
}

fn remote(node: &str, inbound: &str, endpoints: Vec<EndpointSpec>) -> Update {
    Update::SetRemote {
        node: node.into(),
        inbound: addr(inbound),
        endpoints,
    }
}

fn remote_service(node: &str, inbound: &str, service: &str, addrs: &[&str]) -> Update {
    Update::SetRemoteService {
        node: node.into(),
        inbound: addr(inbound),
        service: service.into(),
        endpoints: addrs.iter().map(|a| spec(service, a)).collect(),
    }
}

/// A router driven synchronously, with its table receiver.
fn router() -> (Router, watch::Receiver<Arc<Table>>) {
    let (router, _handle, rx) = Router::new();
    (router, rx)
}

fn table(rx: &watch::Receiver<Arc<Table>>) -> Arc<Table> {
    rx.borrow().clone()
}

/// (address, owning node) of a service's endpoints, in table order.
fn listing(t: &Table, service: &str) -> Vec<(SocketAddr, String)> {
    t.service(service)
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| match &e.location {
                    Location::Local { .. } => (e.addr, String::new()),
                    Location::Remote { node, .. } => (e.addr, node.clone()),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn find<'a>(t: &'a Table, service: &str, a: &str, node: &str) -> &'a Endpoint {
    t.service(service)
        .unwrap()
        .endpoints
        .iter()
        .find(|e| {
            e.addr == addr(a)
                && match &e.location {
                    Location::Local { .. } => node.is_empty(),
                    Location::Remote { node: n, .. } => n == node,
                }
        })
        .unwrap_or_else(|| panic!("{service}: no {a} from {node:?}"))
}

#[test]
fn merges_local_and_remote() {
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("breaker_open", "test"),
        &["service", "endpoint"],
    )
    .unwrap();
    let (router, _h, rx) = Router::new();
    let mut router = router.with_breaker_gauge(gauge.clone());
    router.apply([
        Update::SetDeclared {
            services: ["empty".to_string()].into(),
        },
        Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("users", "10.0.0.1:80"), spec("users", "10.0.0.2:80")],
        },
        remote("b", "10.1.0.1:4143", vec![spec("users", "10.0.9.1:80")]),
    ]);
    let t = table(&rx);
    assert_eq!(t.service("users").unwrap().endpoints.len(), 3);
    assert!(t.service("empty").unwrap().endpoints.is_empty());
    assert!(t.local_endpoint("users", addr("10.0.0.1:80")).is_some());
    // A remote endpoint is never "local", even under the same service.
    assert!(t.local_endpoint("users", addr("10.0.9.1:80")).is_none());
    assert!(t.local_endpoint("other", addr("10.0.0.1:80")).is_none());
    assert_eq!(t.local_counts(), HashMap::from([(Source::Static, 2)]));

    for e in ["10.0.0.1:80", "10.0.9.1:80"] {
        gauge.with_label_values(&["users", e]).set(1);
    }
    router.apply([Update::RemoveRemote { node: "b".into() }]);
    assert_eq!(table(&rx).service("users").unwrap().endpoints.len(), 2);
    // The removed endpoint's breaker series is gone; the others' stay.
    let series: Vec<String> = prometheus::core::Collector::collect(&gauge)[0]
        .get_metric()
        .iter()
        .flat_map(|m| m.get_label().iter())
        .filter(|l| l.name() == "endpoint")
        .map(|l| l.value().to_string())
        .collect();
    assert_eq!(series, vec!["10.0.0.1:80".to_string()]);
}

#[test]
fn endpoint_state_survives_rebuilds() {
    let (mut router, rx) = router();
    let now = Instant::now();
    router.apply([Update::SetLocal {
        source: Source::Static,
        endpoints: vec![spec("a", "10.0.0.1:80")],
    }]);
    let t1 = table(&rx);
    t1.service("a").unwrap().endpoints[0]
        .state
        .observe_latency(Duration::from_millis(500), now);
    let _pending = t1.service("a").unwrap().endpoints[0].state.start();
    // Another service comes and goes: "a" keeps its statistics.
    router.apply([Update::SetDeclared {
        services: ["b".to_string()].into(),
    }]);
    router.apply([Update::SetDeclared {
        services: BTreeSet::new(),
    }]);
    let t2 = table(&rx);
    assert!(t2.service("b").is_none());
    let e = &t2.service("a").unwrap().endpoints[0];
    assert_eq!(e.state.latency(now), Duration::from_millis(500));
    assert_eq!(e.state.pending(), 1);
    assert!(Arc::ptr_eq(
        &t1.service("a").unwrap().state,
        &t2.service("a").unwrap().state
    ));
    // So does a full rebuild.
    router.rebuild_all();
    let t3 = table(&rx);
    assert!(Arc::ptr_eq(
        &t1.service("a").unwrap().endpoints[0].state,
        &t3.service("a").unwrap().endpoints[0].state
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

#[test]
fn untouched_services_are_the_same_arc() {
    let (mut router, rx) = router();
    router.apply([
        Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("local", "10.0.0.1:80")],
        },
        remote(
            "n1",
            "10.1.0.1:4143",
            vec![spec("a", "10.0.1.1:80"), spec("b", "10.0.1.2:80")],
        ),
        remote(
            "n2",
            "10.1.0.2:4143",
            vec![spec("a", "10.0.2.1:80"), spec("c", "10.0.2.2:80")],
        ),
    ]);
    let t1 = table(&rx);
    router.apply([remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.9:80"])]);
    let t2 = table(&rx);
    for s in ["local", "b", "c"] {
        let (before, after) = (t1.service(s).unwrap(), t2.service(s).unwrap());
        assert!(Arc::ptr_eq(before, after), "{s} was rebuilt");
        // Not even its endpoint list was copied.
        assert_eq!(before.endpoints.as_ptr(), after.endpoints.as_ptr());
    }
    let (a1, a2) = (t1.service("a").unwrap(), t2.service("a").unwrap());
    assert!(!Arc::ptr_eq(a1, a2));
    assert!(Arc::ptr_eq(&a1.state, &a2.state));
    // n2's endpoint of the touched service keeps its state.
    assert!(Arc::ptr_eq(
        &find(&t1, "a", "10.0.2.1:80", "n2").state,
        &find(&t2, "a", "10.0.2.1:80", "n2").state
    ));
    // An update that changes nothing publishes nothing.
    router.apply([remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.9:80"])]);
    assert!(Arc::ptr_eq(&t2, &table(&rx)));
}

#[test]
fn set_remote_service_adds_replaces_and_removes() {
    let (mut router, rx) = router();
    router.apply([remote(
        "n1",
        "10.1.0.1:4143",
        vec![spec("b", "10.0.1.5:80")],
    )]);
    // Add: a service n1 did not announce, and a node not yet known.
    router.apply([
        remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.1:80", "10.0.1.2:80"]),
        remote_service("n0", "10.1.0.9:4143", "a", &["10.0.0.7:80"]),
    ]);
    let t = table(&rx);
    // Nodes in name order, each in announced order.
    assert_eq!(
        listing(&t, "a"),
        vec![
            (addr("10.0.0.7:80"), "n0".to_string()),
            (addr("10.0.1.1:80"), "n1".to_string()),
            (addr("10.0.1.2:80"), "n1".to_string()),
        ]
    );
    assert_eq!(listing(&t, "b").len(), 1);
    let kept = find(&t, "a", "10.0.1.2:80", "n1").state.clone();

    // Replace: one endpoint goes, one stays (with its state), one arrives.
    router.apply([remote_service(
        "n1",
        "10.1.0.1:4143",
        "a",
        &["10.0.1.2:80", "10.0.1.3:80"],
    )]);
    let t = table(&rx);
    assert_eq!(
        listing(&t, "a"),
        vec![
            (addr("10.0.0.7:80"), "n0".to_string()),
            (addr("10.0.1.2:80"), "n1".to_string()),
            (addr("10.0.1.3:80"), "n1".to_string()),
        ]
    );
    assert!(Arc::ptr_eq(
        &kept,
        &find(&t, "a", "10.0.1.2:80", "n1").state
    ));
    assert_eq!(listing(&t, "b").len(), 1);

    // Remove: n1 withdraws "a"; "b" is untouched. Then n0 withdraws its last service: "a" is gone.
    router.apply([remote_service("n1", "10.1.0.1:4143", "a", &[])]);
    let t = table(&rx);
    assert_eq!(
        listing(&t, "a"),
        vec![(addr("10.0.0.7:80"), "n0".to_string())]
    );
    assert_eq!(listing(&t, "b").len(), 1);
    router.apply([remote_service("n0", "10.1.0.9:4143", "a", &[])]);
    assert!(table(&rx).service("a").is_none());
    // SetRemote without "b" withdraws it, too.
    router.apply([remote(
        "n1",
        "10.1.0.1:4143",
        vec![spec("c", "10.0.1.6:80")],
    )]);
    let t = table(&rx);
    assert!(t.service("b").is_none());
    assert_eq!(listing(&t, "c").len(), 1);
}

#[test]
fn declared_services_stay_without_endpoints() {
    let (mut router, rx) = router();
    router.apply([
        Update::SetDeclared {
            services: ["a".to_string()].into(),
        },
        remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.1:80"]),
        remote_service("n1", "10.1.0.1:4143", "b", &["10.0.1.2:80"]),
    ]);
    let state = table(&rx).service("a").unwrap().state.clone();
    router.apply([Update::RemoveRemote { node: "n1".into() }]);
    let t = table(&rx);
    assert!(t.service("b").is_none());
    let a = t.service("a").unwrap();
    assert!(a.endpoints.is_empty());
    assert!(Arc::ptr_eq(&state, &a.state));
    router.apply([Update::SetDeclared {
        services: BTreeSet::new(),
    }]);
    assert!(table(&rx).services.is_empty());
}

#[test]
fn inbound_change_moves_every_endpoint_of_the_node_to_fresh_state() {
    let (mut router, rx) = router();
    router.apply([
        remote(
            "n1",
            "10.1.0.1:4143",
            vec![spec("a", "10.0.1.1:80"), spec("b", "10.0.1.2:80")],
        ),
        remote("n2", "10.1.0.2:4143", vec![spec("a", "10.0.2.1:80")]),
    ]);
    let t1 = table(&rx);
    // n1 restarted on another address, and says so for one service only.
    router.apply([remote_service("n1", "10.1.0.7:4143", "a", &["10.0.1.1:80"])]);
    let t2 = table(&rx);
    for (s, a) in [("a", "10.0.1.1:80"), ("b", "10.0.1.2:80")] {
        let (before, after) = (find(&t1, s, a, "n1"), find(&t2, s, a, "n1"));
        assert_eq!(
            after.location,
            Location::Remote {
                node: "n1".into(),
                inbound: addr("10.1.0.7:4143")
            }
        );
        assert_eq!(after.state.pool.key().addr, addr("10.1.0.7:4143"));
        assert!(!Arc::ptr_eq(&before.state, &after.state), "{s} kept state");
    }
    // n2's endpoint is the same state; a service n2 alone serves would be the same Arc.
    assert!(Arc::ptr_eq(
        &find(&t1, "a", "10.0.2.1:80", "n2").state,
        &find(&t2, "a", "10.0.2.1:80", "n2").state
    ));
}

#[test]
fn pruning_drops_the_state_of_removed_endpoints_only() {
    let (mut router, rx) = router();
    router.apply([
        Update::SetLocal {
            source: Source::Static,
            endpoints: vec![spec("a", "10.0.0.1:80")],
        },
        remote(
            "n1",
            "10.1.0.1:4143",
            vec![
                spec("a", "10.0.1.1:80"),
                spec("a", "10.0.1.2:80"),
                spec("b", "10.0.1.3:80"),
            ],
        ),
    ]);
    let weak: BTreeMap<(String, SocketAddr), Weak<EndpointState>> = table(&rx)
        .services
        .values()
        .flat_map(|s| {
            s.endpoints
                .iter()
                .map(|e| ((s.name.to_string(), e.addr), Arc::downgrade(&e.state)))
        })
        .collect();
    assert_eq!(weak.len(), 4);
    router.apply([remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.2:80"])]);
    // Only the current table holds states now.
    for ((service, a), w) in &weak {
        let alive = w.upgrade();
        if *a == addr("10.0.1.1:80") {
            assert!(alive.is_none(), "{service} {a} was not dropped");
        } else {
            let alive = alive.unwrap_or_else(|| panic!("{service} {a} was dropped"));
            let t = table(&rx);
            let node = if *a == addr("10.0.0.1:80") { "" } else { "n1" };
            assert!(Arc::ptr_eq(
                &alive,
                &find(&t, service, &a.to_string(), node).state
            ));
        }
    }
}

#[test]
fn local_endpoints_are_published_only_when_they_change() {
    let (mut router, _rx) = router();
    let mut local = router.local_endpoints();
    assert!(local.borrow().is_empty());
    router.apply([Update::SetLocal {
        source: Source::Docker,
        endpoints: vec![spec("a", "10.0.0.2:80"), spec("b", "10.0.0.3:80")],
    }]);
    assert!(local.has_changed().unwrap());
    local.borrow_and_update();
    // Static wins an address both list; the merged list is sorted.
    let mut fast = spec("a", "10.0.0.2:80");
    fast.weight = 7;
    router.apply([Update::SetLocal {
        source: Source::Static,
        endpoints: vec![fast.clone(), spec("a", "10.0.0.1:80")],
    }]);
    assert!(local.has_changed().unwrap());
    assert_eq!(
        **local.borrow_and_update(),
        BTreeMap::from([
            (
                "a".to_string(),
                vec![spec("a", "10.0.0.1:80"), fast.clone()]
            ),
            ("b".to_string(), vec![spec("b", "10.0.0.3:80")]),
        ])
    );
    // Gossip, declarations, and a docker change hidden behind a static address change nothing here.
    router.apply([
        remote_service("n1", "10.1.0.1:4143", "a", &["10.0.1.1:80"]),
        Update::SetDeclared {
            services: ["c".to_string()].into(),
        },
        Update::SetLocal {
            source: Source::Docker,
            endpoints: vec![spec("b", "10.0.0.3:80")],
        },
    ]);
    assert!(!local.has_changed().unwrap());
    router.apply([Update::SetLocal {
        source: Source::Docker,
        endpoints: vec![],
    }]);
    assert!(local.has_changed().unwrap());
    assert_eq!(
        **local.borrow_and_update(),
        BTreeMap::from([("a".to_string(), vec![spec("a", "10.0.0.1:80"), fast])])
    );
}

// ---- The incremental table against a from-scratch build ----

/// The inputs kept the simplest way, and the table built from them the way it was before it was incremental.
#[derive(Default)]
struct Model {
    declared: BTreeSet<String>,
    local: BTreeMap<Source, Vec<EndpointSpec>>,
    remote: BTreeMap<String, (SocketAddr, Vec<EndpointSpec>)>,
}

/// What the test compares of an endpoint: address, owning node and inbound (none when local), source (none
/// when remote), protocol, weight.
type Row = (
    SocketAddr,
    Option<(String, SocketAddr)>,
    Option<Source>,
    Protocol,
    u32,
);

impl Model {
    fn apply(&mut self, u: &Update) {
        match u.clone() {
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
            Update::SetRemoteService {
                node,
                inbound,
                service,
                endpoints,
            } => {
                let (at, specs) = self.remote.entry(node).or_insert((inbound, Vec::new()));
                *at = inbound;
                specs.retain(|e| e.service != service);
                specs.extend(endpoints.into_iter().filter(|e| e.service == service));
            }
            Update::RemoveRemote { node } => {
                self.remote.remove(&node);
            }
            Update::SetDeclared { services } => self.declared = services,
        }
    }

    fn build(&self) -> BTreeMap<String, Vec<Row>> {
        let mut services: BTreeMap<String, Vec<Row>> = self
            .declared
            .iter()
            .map(|n| (n.clone(), Vec::new()))
            .collect();
        for (source, specs) in &self.local {
            for s in specs {
                let rows = services.entry(s.service.clone()).or_default();
                if rows.iter().any(|r| r.0 == s.addr && r.1.is_none()) {
                    continue;
                }
                rows.push((s.addr, None, Some(*source), s.protocol, s.weight));
            }
        }
        for (node, (inbound, specs)) in &self.remote {
            for s in specs {
                services.entry(s.service.clone()).or_default().push((
                    s.addr,
                    Some((node.clone(), *inbound)),
                    None,
                    s.protocol,
                    s.weight,
                ));
            }
        }
        services
    }

    /// Everything that decides what `service` looks like.
    fn inputs_of(&self, service: &str) -> String {
        let of = |specs: &[EndpointSpec]| -> Vec<EndpointSpec> {
            specs
                .iter()
                .filter(|e| e.service == service)
                .cloned()
                .collect()
        };
        let local: Vec<_> = self.local.iter().map(|(s, v)| (*s, of(v))).collect();
        let remote: Vec<_> = self
            .remote
            .iter()
            .map(|(n, (i, v))| (n, i, of(v)))
            .filter(|(_, _, v)| !v.is_empty())
            .collect();
        format!("{} {local:?} {remote:?}", self.declared.contains(service))
    }

    fn local_endpoints(&self) -> BTreeMap<String, Vec<EndpointSpec>> {
        let mut out: BTreeMap<String, Vec<EndpointSpec>> = BTreeMap::new();
        for (service, rows) in self.build() {
            let mut specs: Vec<EndpointSpec> = rows
                .iter()
                .filter(|r| r.1.is_none())
                .map(|r| EndpointSpec {
                    service: service.clone(),
                    addr: r.0,
                    protocol: r.3,
                    weight: r.4,
                })
                .collect();
            specs.sort();
            if !specs.is_empty() {
                out.insert(service, specs);
            }
        }
        out
    }
}

fn contents(t: &Table) -> BTreeMap<String, Vec<Row>> {
    t.services
        .iter()
        .map(|(name, s)| {
            assert_eq!(**name, *s.name);
            let rows = s
                .endpoints
                .iter()
                .map(|e| match &e.location {
                    Location::Local { source } => {
                        (e.addr, None, Some(*source), e.protocol, e.weight)
                    }
                    Location::Remote { node, inbound } => (
                        e.addr,
                        Some((node.clone(), *inbound)),
                        None,
                        e.protocol,
                        e.weight,
                    ),
                })
                .collect();
            (name.to_string(), rows)
        })
        .collect()
}

/// An endpoint's identity for its runtime state.
fn identity(
    service: &str,
    e: &Endpoint,
) -> (String, SocketAddr, String, crate::proxy::pool::PoolKey) {
    let node = match &e.location {
        Location::Local { .. } => String::new(),
        Location::Remote { node, .. } => node.clone(),
    };
    (
        service.to_string(),
        e.addr,
        node,
        pool_key(e.addr, e.protocol, &e.location),
    )
}

/// The (service, endpoint) label pairs of a breaker gauge's series.
fn series(gauge: &prometheus::IntGaugeVec) -> BTreeSet<(String, String)> {
    prometheus::core::Collector::collect(gauge)
        .iter()
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            (label("service"), label("endpoint"))
        })
        .collect()
}

const SERVICES: [&str; 4] = ["s0", "s1", "s2", "s3"];
const NODES: [&str; 3] = ["n0", "n1", "n2"];

fn arb_spec_of(service: &'static str) -> impl Strategy<Value = EndpointSpec> {
    (
        1u8..=5,
        prop_oneof![Just(Protocol::Http), Just(Protocol::Grpc)],
        prop_oneof![Just(100u32), Just(200)],
    )
        .prop_map(move |(host, protocol, weight)| EndpointSpec {
            service: service.into(),
            addr: SocketAddr::from(([10, 0, 0, host], 80)),
            protocol,
            weight,
        })
}

fn arb_spec() -> impl Strategy<Value = EndpointSpec> {
    prop::sample::select(SERVICES.to_vec()).prop_flat_map(arb_spec_of)
}

fn arb_node() -> impl Strategy<Value = String> {
    prop::sample::select(NODES.to_vec()).prop_map(String::from)
}

fn arb_inbound() -> impl Strategy<Value = SocketAddr> {
    (1u8..=2).prop_map(|h| SocketAddr::from(([10, 1, 0, h], 4143)))
}

fn arb_update() -> impl Strategy<Value = Update> {
    prop_oneof![
        1 => (
            prop_oneof![Just(Source::Static), Just(Source::Docker)],
            prop::collection::vec(arb_spec(), 0..6)
        )
            .prop_map(|(source, endpoints)| Update::SetLocal { source, endpoints }),
        1 => (arb_node(), arb_inbound(), prop::collection::vec(arb_spec(), 0..6)).prop_map(
            |(node, inbound, endpoints)| Update::SetRemote {
                node,
                inbound,
                endpoints
            }
        ),
        3 => (
            arb_node(),
            arb_inbound(),
            prop::sample::select(SERVICES.to_vec())
        )
            .prop_flat_map(|(node, inbound, service)| {
                prop::collection::vec(arb_spec_of(service), 0..4).prop_map(move |endpoints| {
                    Update::SetRemoteService {
                        node: node.clone(),
                        inbound,
                        service: service.into(),
                        endpoints,
                    }
                })
            }),
        1 => arb_node().prop_map(|node| Update::RemoveRemote { node }),
        1 => prop::sample::subsequence(SERVICES.to_vec(), 0..=2).prop_map(|s| Update::SetDeclared {
            services: s.into_iter().map(String::from).collect()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After every burst of updates, the incrementally maintained table holds exactly what a from-scratch
    /// build of the inputs would (services, endpoints and their order), the counts and the announced local
    /// endpoints agree, services whose inputs no update in the burst touched are the same `Arc`, and an
    /// endpoint keeps its runtime state exactly when its identity was in the previous table.
    #[test]
    fn incremental_table_matches_a_from_scratch_build(
        bursts in prop::collection::vec(prop::collection::vec(arb_update(), 1..4), 1..24)
    ) {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("breaker_open", "test"),
            &["service", "endpoint"],
        )
        .unwrap();
        let (router, _h, rx) = Router::new();
        let mut router = router.with_breaker_gauge(gauge.clone());
        let local = router.local_endpoints();
        let mut model = Model::default();
        for burst in bursts {
            let before = table(&rx);
            // Every endpoint has a breaker series; those of endpoints whose state goes must be deleted.
            gauge.reset();
            for (name, svc) in &before.services {
                for e in &svc.endpoints {
                    gauge.with_label_values(&[&**name, &e.addr.to_string()]).set(1);
                }
            }
            let mut touched = BTreeSet::new();
            for u in &burst {
                let was: Vec<String> = SERVICES.iter().map(|s| model.inputs_of(s)).collect();
                model.apply(u);
                for (i, s) in SERVICES.iter().enumerate() {
                    if model.inputs_of(s) != was[i] {
                        touched.insert(*s);
                    }
                }
            }
            router.apply(burst);
            let after = table(&rx);
            let want = model.build();
            prop_assert_eq!(contents(&after), want.clone());

            let mut counts = HashMap::new();
            for rows in want.values() {
                for r in rows {
                    if let Some(s) = r.2 {
                        *counts.entry(s).or_insert(0) += 1;
                    }
                }
            }
            prop_assert_eq!(after.local_counts(), counts);
            prop_assert_eq!(&**local.borrow(), &model.local_endpoints());

            for (name, svc) in &after.services {
                if let Some(old) = before.service(name)
                    && !touched.contains(&**name)
                {
                    prop_assert!(Arc::ptr_eq(old, svc), "{} rebuilt though untouched", name);
                }
            }
            let ids = |t: &Table| -> BTreeSet<_> {
                t.services
                    .iter()
                    .flat_map(|(n, s)| s.endpoints.iter().map(|e| identity(n, e)))
                    .collect()
            };
            let (was, is) = (ids(&before), ids(&after));
            let gone: BTreeSet<(String, String)> = was
                .difference(&is)
                .map(|id| (id.0.clone(), id.1.to_string()))
                .collect();
            let want_series: BTreeSet<(String, String)> = was
                .iter()
                .map(|id| (id.0.clone(), id.1.to_string()))
                .filter(|s| !gone.contains(s))
                .collect();
            prop_assert_eq!(series(&gauge), want_series);

            let mut old_states = HashMap::new();
            for (name, svc) in &before.services {
                for e in &svc.endpoints {
                    old_states.insert(identity(name, e), e.state.clone());
                }
            }
            let mut new_states: HashMap<_, Arc<EndpointState>> = HashMap::new();
            for (name, svc) in &after.services {
                for e in &svc.endpoints {
                    let id = identity(name, e);
                    // The same identity listed twice is one state.
                    if let Some(s) = new_states.get(&id) {
                        prop_assert!(Arc::ptr_eq(s, &e.state));
                    }
                    match old_states.get(&id) {
                        Some(s) => prop_assert!(Arc::ptr_eq(s, &e.state), "{:?} lost its state", id),
                        None => prop_assert!(
                            !old_states.values().any(|s| Arc::ptr_eq(s, &e.state)),
                            "{:?} took another endpoint's state", id
                        ),
                    }
                    new_states.insert(id, e.state.clone());
                }
            }
        }
        // A full rebuild changes nothing but the Arcs.
        let series_before = series(&gauge);
        let before = table(&rx);
        router.rebuild_all();
        prop_assert_eq!(contents(&table(&rx)), contents(&before));
        prop_assert_eq!(series(&gauge), series_before);
    }
}
