//! One received gossip datagram through `seal::open`, with the keyring, cluster and clock the seed corpus was
//! sealed with (the same constants as `tests/gossip_packets.rs`), so valid seeds open and mutations of them
//! reach the cipher and the replay window.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::config::GossipProfile;
use meshd::membership::core::{Core, foca_config};
use meshd::membership::identity::NodeId;
use meshd::membership::keyring::Keyring;
use meshd::membership::seal::{self, Cluster, ReplayWindow};

/// The test keyring: the primary key, then a second one (some seeds are sealed with it).
const TEST_KEYRING: &str = "\
ESIzRFVmd4iZqrvM3e7/ABEiM0RVZneImaq7zN3u/wA=
/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4=
";
const TEST_CLUSTER: &str = "fuzz-cluster";
/// The seeds' timestamp: 2025-01-01T00:00:00Z.
const SEED_NOW_MS: u64 = 1_735_689_600_000;

struct Fixture {
    keyring: Keyring,
    cluster: Cluster,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        keyring: Keyring::parse(TEST_KEYRING).expect("the test keyring parses"),
        cluster: Cluster::new(TEST_CLUSTER),
    })
}

thread_local! {
    /// One agent's membership state, fed every payload that opens.
    static CORE: std::cell::RefCell<Core> = std::cell::RefCell::new(Core::new(
        NodeId {
            name: std::sync::Arc::from("fuzz"),
            addr: std::net::SocketAddr::from(([10, 9, 9, 9], 4145)),
            inbound_port: 4143,
            generation: 1,
        },
        foca_config(GossipProfile::Lan, 10),
        rand::SeedableRng::seed_from_u64(1),
        Keyring::parse(TEST_KEYRING).expect("the test keyring parses"),
        Cluster::new(TEST_CLUSTER),
    ));
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // A fresh window per input keeps runs reproducible.
    let mut replay = ReplayWindow::new();
    let mut out = Vec::new();
    if seal::open(
        &f.keyring,
        &f.cluster,
        &mut replay,
        SEED_NOW_MS,
        data,
        &mut out,
    )
    .is_ok()
    {
        // Opened: on to foca's decoder, meshd's identity checks and the endpoint-record decoder.
        CORE.with(|c| c.borrow_mut().handle_payload(std::time::Duration::ZERO, SEED_NOW_MS, &out));
    }
});
