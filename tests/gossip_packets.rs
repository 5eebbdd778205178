//! Sealed gossip datagrams from outside the crate: the fuzz seed corpus replayed through `seal::open` (so CI
//! runs every seed without a nightly toolchain), and sealed packets over real UDP sockets.
//!
//! The corpus in `tests/fuzz/corpus/packet/` is written by `MESHD_WRITE_CORPUS=1 cargo test --test
//! gossip_packets write_corpus`; each file's name says what `open` must answer: `valid-*` opens, `junk-*`,
//! `truncated-*`, `wrong-cluster-*` and so on are refused for that reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshd::config::GossipProfile;
use meshd::membership::core::{Core, foca_config};
use meshd::membership::identity::NodeId;
use meshd::membership::keyring::Keyring;
use meshd::membership::seal::{
    self, Cluster, HEADER, MAX_DATAGRAM, MAX_PAYLOAD, OVERHEAD, Rejected, ReplayWindow,
};
use meshd::membership::suspicion::Control;

/// The test keyring, the same as the fuzz target's: the primary key, then a second one.
const TEST_KEYRING: &str = "\
ESIzRFVmd4iZqrvM3e7/ABEiM0RVZneImaq7zN3u/wA=
/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4=
";
/// The second key alone, to seal seeds the test ring opens with its second key.
const SECOND_KEY: &str = "/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v4=\n";
/// A key outside the test ring.
const STRANGER_KEY: &str = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n";
const TEST_CLUSTER: &str = "fuzz-cluster";
/// The seeds' timestamp: 2025-01-01T00:00:00Z.
const SEED_NOW_MS: u64 = 1_735_689_600_000;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/packet")
}

fn test_ring() -> Keyring {
    Keyring::parse(TEST_KEYRING).unwrap()
}

fn sealed(keyring: &Keyring, cluster: &str, at: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    seal::seal(keyring, &Cluster::new(cluster), at, payload, &mut out);
    out
}

/// What `open` must answer for a corpus file, from its name: `Ok` for `valid-*`.
fn expected(name: &str) -> Result<(), Rejected> {
    if name.starts_with("valid-") {
        return Ok(());
    }
    // Longest first: no reason's name is a prefix of another's today, but the check should not depend on it.
    let mut reasons = Rejected::ALL;
    reasons.sort_by_key(|r| std::cmp::Reverse(r.as_str().len()));
    match reasons
        .iter()
        .find(|r| name.starts_with(&format!("{}-", r.as_str())))
    {
        Some(r) => Err(*r),
        None => panic!(
            "corpus file {name:?}: the name must start with valid- or a rejection reason and -"
        ),
    }
}

#[test]
fn every_corpus_seed_opens_or_is_refused_as_its_name_says() {
    let (keyring, cluster) = (test_ring(), Cluster::new(TEST_CLUSTER));
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "the corpus has {} seeds", seeds.len());

    let mut covered = std::collections::HashSet::new();
    for (name, bytes) in &seeds {
        let mut out = vec![0xff];
        let result = seal::open(
            &keyring,
            &cluster,
            &mut ReplayWindow::new(),
            SEED_NOW_MS,
            bytes,
            &mut out,
        );
        assert_eq!(result, expected(name), "seed {name}");
        match result {
            Ok(()) => assert_eq!(out.len() + OVERHEAD, bytes.len(), "seed {name}"),
            Err(_) => assert!(out.is_empty(), "seed {name}"),
        }
        covered.insert(result);
    }
    // A replay needs two packets; every other answer has a seed.
    for want in std::iter::once(Ok(())).chain(
        Rejected::ALL
            .into_iter()
            .filter(|r| *r != Rejected::Replayed)
            .map(Err),
    ) {
        assert!(covered.contains(&want), "no seed answers {want:?}");
    }
}

fn node(name: &str, i: u8) -> NodeId {
    NodeId {
        name: std::sync::Arc::from(name),
        addr: SocketAddr::from(([10, 9, 9, i], 4145)),
        inbound_port: 4143,
        generation: 1,
    }
}

/// The identity of the agent in the fuzz target.
fn fuzz_agent() -> NodeId {
    node("fuzz", 9)
}

#[test]
fn the_check_seed_reaches_the_agent_it_names() {
    let (keyring, cluster) = (test_ring(), Cluster::new(TEST_CLUSTER));
    let bytes = std::fs::read(corpus_dir().join("valid-control-check")).unwrap();
    let mut out = Vec::new();
    seal::open(
        &keyring,
        &cluster,
        &mut ReplayWindow::new(),
        SEED_NOW_MS,
        &bytes,
        &mut out,
    )
    .unwrap();
    let mut core = Core::new(
        fuzz_agent(),
        foca_config(GossipProfile::Lan, 10),
        rand::SeedableRng::seed_from_u64(1),
        keyring,
        cluster,
    );
    core.handle_payload(Duration::ZERO, SEED_NOW_MS, &out);
    assert_eq!(
        core.stats.checks("received"),
        1,
        "the agent answered the check"
    );
    // It answers the checker with the nonce (and tells the prober it is alive).
    let (keyring, cluster) = (test_ring(), Cluster::new(TEST_CLUSTER));
    let mut replay = ReplayWindow::new();
    let replies: Vec<Control> = core
        .take_outbox()
        .into_iter()
        .filter(|(to, _)| *to == node("peer", 2).addr)
        .filter_map(|(_, d)| {
            seal::open(&keyring, &cluster, &mut replay, SEED_NOW_MS, &d, &mut out).ok()?;
            Control::decode(&out)?.ok()
        })
        .collect();
    assert_eq!(replies, vec![Control::Reply { nonce: 7 }]);
}

#[test]
fn the_fuzz_target_uses_the_same_fixture() {
    let target = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/fuzz_targets/packet.rs"),
    )
    .unwrap();
    for constant in [
        TEST_KEYRING,
        TEST_CLUSTER,
        &SEED_NOW_MS.to_string(),
        "[10, 9, 9, 9], 4145",
    ] {
        let constant = constant.replace("_", "");
        assert!(
            target.replace("_", "").contains(&constant),
            "the fuzz target lacks {constant:?}"
        );
    }
}

#[test]
fn sealed_packets_cross_real_udp_sockets() {
    use std::net::UdpSocket;
    let (keyring, cluster) = (test_ring(), Cluster::new(TEST_CLUSTER));
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut window = ReplayWindow::new();
    let mut buf = vec![0u8; 65536];
    let mut opened = Vec::new();

    // The largest payload foca may hand us arrives whole and opens.
    let payload: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    let datagram = sealed(&keyring, TEST_CLUSTER, SEED_NOW_MS, &payload);
    assert_eq!(datagram.len(), MAX_DATAGRAM);
    a.send_to(&datagram, b.local_addr().unwrap()).unwrap();
    let (n, from) = b.recv_from(&mut buf).unwrap();
    assert_eq!(from, a.local_addr().unwrap());
    let received = &buf[..n];
    assert_eq!(
        seal::open(
            &keyring,
            &cluster,
            &mut window,
            SEED_NOW_MS + 5,
            received,
            &mut opened
        ),
        Ok(())
    );
    assert_eq!(opened, payload);

    // The same datagram sent again (a duplicate, or an attacker's copy) is refused.
    a.send_to(&datagram, b.local_addr().unwrap()).unwrap();
    let (n, _) = b.recv_from(&mut buf).unwrap();
    assert_eq!(
        seal::open(
            &keyring,
            &cluster,
            &mut window,
            SEED_NOW_MS + 10,
            &buf[..n],
            &mut opened
        ),
        Err(Rejected::Replayed)
    );
}

/// Writes the seed corpus, only when `MESHD_WRITE_CORPUS=1` (the files are committed; valid seeds carry random
/// nonces, so every run writes different bytes).
#[test]
fn write_corpus() {
    if std::env::var("MESHD_WRITE_CORPUS").as_deref() != Ok("1") {
        return;
    }
    let ring = test_ring();
    let second = Keyring::parse(SECOND_KEY).unwrap();
    let stranger = Keyring::parse(STRANGER_KEY).unwrap();
    let now = SEED_NOW_MS;
    let hello = b"hello gossip".as_slice();
    let valid = sealed(&ring, TEST_CLUSTER, now, hello);

    let mut flipped = valid.clone();
    if let Some(b) = flipped.get_mut(HEADER + 2) {
        *b ^= 0x04;
    }
    let mut bad_tag = sealed(&ring, TEST_CLUSTER, now, b"");
    if let Some(b) = bad_tag.last_mut() {
        *b ^= 0x80;
    }
    let mut wrong_version = valid.clone();
    wrong_version[2] = 2;
    let mut random = [0u8; 64];
    rand::fill(&mut random[..]);
    random[0] = b'\x00';

    // Direct checks of a suspect (failure detection) as peers seal them: one of the fuzz target's own agent.
    let check = Control::Check {
        nonce: 7,
        from: node("peer", 2),
        prober: node("prober", 3),
        target: fuzz_agent(),
        incarnation: 0,
    }
    .encode();
    let vote = Control::Vote {
        nonce: 7,
        from: node("peer", 2),
        target: node("other", 3),
        incarnation: 1,
    }
    .encode();

    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "valid-control-check",
            sealed(&ring, TEST_CLUSTER, now, &check),
        ),
        (
            "valid-control-vote",
            sealed(&ring, TEST_CLUSTER, now, &vote),
        ),
        ("valid-empty", sealed(&ring, TEST_CLUSTER, now, b"")),
        ("valid-hello", valid.clone()),
        (
            "valid-binary",
            sealed(&ring, TEST_CLUSTER, now, &(0..=255u8).collect::<Vec<_>>()),
        ),
        (
            "valid-second-key",
            sealed(&second, TEST_CLUSTER, now, hello),
        ),
        (
            "valid-59s-old",
            sealed(&ring, TEST_CLUSTER, now - 59_000, hello),
        ),
        (
            "valid-59s-ahead",
            sealed(&ring, TEST_CLUSTER, now + 59_000, hello),
        ),
        ("junk-empty", Vec::new()),
        ("junk-random", random.to_vec()),
        ("junk-wrong-version", wrong_version),
        ("junk-http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("truncated-magic-only", b"MG\x01".to_vec()),
        ("truncated-header", valid[..HEADER].to_vec()),
        ("truncated-no-tag", valid[..OVERHEAD - 1].to_vec()),
        (
            "wrong-cluster-1",
            sealed(&ring, "other-cluster", now, hello),
        ),
        ("unknown-key-1", sealed(&stranger, TEST_CLUSTER, now, hello)),
        (
            "stale-61s-old",
            sealed(&ring, TEST_CLUSTER, now - 61_000, hello),
        ),
        (
            "stale-61s-ahead",
            sealed(&ring, TEST_CLUSTER, now + 61_000, hello),
        ),
        ("auth-failed-flipped-ciphertext", flipped),
        ("auth-failed-flipped-tag", bad_tag),
        (
            "oversized-1",
            sealed(&ring, TEST_CLUSTER, now, &[0u8; MAX_PAYLOAD + 1]),
        ),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
