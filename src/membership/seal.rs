//! Sealed gossip datagrams: every UDP packet foca sends is encrypted and authenticated with the keyring's first
//! key, and every packet received is checked, classified and decrypted before foca sees a byte of it.
//!
//! It owns the datagram layout and the replay window; it does no I/O and reads time from a parameter, so the
//! driver and a simulator on a virtual clock call the same functions. It must not decode the payload: that is
//! foca's codec, after [`open`] has said the bytes came from a key holder in this cluster.
//!
//! Layout, one UDP datagram:
//!
//! ```text
//! "MG" (2) | version 1 (1) | key id (4) | cluster tag (4) | unix ms, u64 BE (8) | nonce (24) | ciphertext | tag (16)
//! ```
//!
//! The cipher is XChaCha20-Poly1305 with a random nonce. The associated data is the 43-byte clear header
//! followed by the full cluster name, so the key id, cluster and timestamp cannot be altered, and two clusters
//! whose 4-byte tags collide still cannot read each other's packets.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use chacha20poly1305::{AeadInOut as _, Tag, XNonce};

use super::keyring::{Keyring, sha256_prefix};

/// The first bytes of every sealed datagram.
pub const MAGIC: [u8; 2] = *b"MG";
/// The layout version this build seals and opens.
pub const VERSION: u8 = 1;
/// The clear header: magic, version, key id, cluster tag, timestamp and nonce.
pub const HEADER: usize = 2 + 1 + 4 + 4 + 8 + NONCE;
/// The bytes sealing adds to a payload: the header and the Poly1305 tag.
pub const OVERHEAD: usize = HEADER + TAG;
/// Received datagrams longer than this are refused as oversized (foca's max_packet_size is set to
/// `MAX_DATAGRAM - OVERHEAD`): it stays under a 1500-byte Ethernet MTU with room for IPv6, UDP and tunnels.
pub const MAX_DATAGRAM: usize = 1400;
/// The largest payload that seals into a datagram receivers accept.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - OVERHEAD;
/// How far a packet's timestamp may be from our clock. Hosts' clocks must agree this well (NTP does far
/// better); it bounds how long a captured packet can be replayed and so how long nonces are remembered.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

const NONCE: usize = 24;
const TAG: usize = 16;
const MAX_SKEW_MS: u64 = MAX_SKEW.as_millis() as u64;
/// A nonce is remembered this long after its packet arrived: a packet stamped up to [`MAX_SKEW`] ahead of our
/// clock stays fresh until `MAX_SKEW` after its stamp.
const REMEMBER_MS: u64 = 2 * MAX_SKEW_MS;

/// The cluster a host gossips in: its name, and the 4-byte tag of it sent in clear.
#[derive(Clone, Debug)]
pub struct Cluster {
    name: String,
    tag: [u8; 4],
}

impl Cluster {
    pub fn new(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            tag: sha256_prefix(name.as_bytes()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first 4 bytes of SHA-256 of the name, as sent in every datagram's header.
    pub fn tag(&self) -> [u8; 4] {
        self.tag
    }
}

/// Why a received datagram was dropped, in the order [`open`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// Not a sealed gossip datagram: too short for the magic, or the wrong magic or version.
    Junk,
    /// The magic and version are right but the datagram is shorter than the header and tag.
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    Oversized,
    /// Sealed with a key this host's keyring does not hold (a rotation not yet installed here, or a stranger).
    UnknownKey,
    /// The tag does not verify: altered in flight, or forged.
    AuthFailed,
    /// Its nonce was seen within the window: a duplicate or a replay.
    Replayed,
    /// Its timestamp is more than [`MAX_SKEW`] from our clock: an old capture, or a host whose clock is off.
    Stale,
    /// From another cluster (by the header's cluster tag).
    WrongCluster,
}

impl Rejected {
    pub const ALL: [Rejected; 8] = [
        Rejected::Junk,
        Rejected::Truncated,
        Rejected::Oversized,
        Rejected::UnknownKey,
        Rejected::AuthFailed,
        Rejected::Replayed,
        Rejected::Stale,
        Rejected::WrongCluster,
    ];

    /// A short name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Junk => "junk",
            Rejected::Truncated => "truncated",
            Rejected::Oversized => "oversized",
            Rejected::UnknownKey => "unknown-key",
            Rejected::AuthFailed => "auth-failed",
            Rejected::Replayed => "replayed",
            Rejected::Stale => "stale",
            Rejected::WrongCluster => "wrong-cluster",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends the sealed datagram for `payload` to `out` (which is cleared first), sealed with the keyring's first
/// key and stamped `now_ms` (unix milliseconds; injected so a simulator can run on a virtual clock).
///
/// Keep `payload` within [`MAX_PAYLOAD`]: a longer one seals, but receivers refuse it as oversized.
pub fn seal(keyring: &Keyring, cluster: &Cluster, now_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let key = keyring.primary();
    let mut nonce = [0u8; NONCE];
    // A random 192-bit nonce never repeats in practice, so hosts sharing a key need no coordination.
    rand::fill(&mut nonce);
    out.reserve(OVERHEAD + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&cluster.tag);
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = associated_data(out, cluster);
    out.extend_from_slice(payload);
    let (_, body) = out.split_at_mut(HEADER);
    match key
        .cipher
        .encrypt_inout_detached(&XNonce::from(nonce), &aad, body.into())
    {
        Ok(tag) => out.extend_from_slice(&tag),
        // XChaCha20 refuses only messages over 256 GiB, which no caller has in memory for a datagram; an
        // empty `out` is refused as junk by every receiver rather than leaking a half-built packet.
        Err(_) => out.clear(),
    }
}

/// Checks and decrypts one datagram into `out` (cleared first; left empty unless `Ok`). `now_ms` is our clock in
/// unix milliseconds.
///
/// Checks, in order: size, magic and version, cluster, key, timestamp, authentication, replay. The replay window
/// is consulted and filled only for authenticated packets, so forged packets cannot evict real nonces.
pub fn open(
    keyring: &Keyring,
    cluster: &Cluster,
    replay: &mut ReplayWindow,
    now_ms: u64,
    datagram: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Rejected> {
    out.clear();
    if datagram.len() > MAX_DATAGRAM {
        return Err(Rejected::Oversized);
    }
    match datagram {
        [m0, m1, version, ..] if [*m0, *m1] == MAGIC && *version == VERSION => {}
        _ => return Err(Rejected::Junk),
    }
    if datagram.len() < OVERHEAD {
        return Err(Rejected::Truncated);
    }
    let parsed = Parsed::split(datagram).ok_or(Rejected::Truncated)?;
    if parsed.cluster_tag != cluster.tag {
        return Err(Rejected::WrongCluster);
    }
    let key = keyring.get(parsed.key_id).ok_or(Rejected::UnknownKey)?;
    if now_ms.abs_diff(parsed.timestamp_ms) > MAX_SKEW_MS {
        return Err(Rejected::Stale);
    }
    let aad = associated_data(parsed.header, cluster);
    out.extend_from_slice(parsed.ciphertext);
    let opened = key.cipher.decrypt_inout_detached(
        &XNonce::from(parsed.nonce),
        &aad,
        out.as_mut_slice().into(),
        &Tag::from(parsed.tag),
    );
    if opened.is_err() {
        out.clear();
        return Err(Rejected::AuthFailed);
    }
    if replay.seen(&parsed.nonce, parsed.timestamp_ms) {
        out.clear();
        return Err(Rejected::Replayed);
    }
    replay.record(parsed.nonce, parsed.timestamp_ms, now_ms);
    Ok(())
}

/// The fields of a datagram at least [`OVERHEAD`] long, split without indexing.
struct Parsed<'a> {
    header: &'a [u8],
    key_id: [u8; 4],
    cluster_tag: [u8; 4],
    timestamp_ms: u64,
    nonce: [u8; NONCE],
    ciphertext: &'a [u8],
    tag: [u8; TAG],
}

impl<'a> Parsed<'a> {
    fn split(datagram: &'a [u8]) -> Option<Parsed<'a>> {
        let (header, body) = datagram.split_at_checked(HEADER)?;
        let (_magic, rest) = header.split_first_chunk::<3>()?;
        let (key_id, rest) = rest.split_first_chunk::<4>()?;
        let (cluster_tag, rest) = rest.split_first_chunk::<4>()?;
        let (timestamp, rest) = rest.split_first_chunk::<8>()?;
        let nonce: [u8; NONCE] = rest.try_into().ok()?;
        let (ciphertext, tag) = body.split_last_chunk::<TAG>()?;
        Some(Parsed {
            header,
            key_id: *key_id,
            cluster_tag: *cluster_tag,
            timestamp_ms: u64::from_be_bytes(*timestamp),
            nonce,
            ciphertext,
            tag: *tag,
        })
    }
}

fn associated_data(header: &[u8], cluster: &Cluster) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + cluster.name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(cluster.name.as_bytes());
    aad
}

/// Remembers the nonces of accepted packets for 2 × [`MAX_SKEW`] after they arrive (any replay later than that
/// is stale), bounded in memory.
///
/// When full, the oldest entry is evicted and its packet timestamp raises a floor: packets stamped at or below
/// the floor count as replayed, so eviction never lets an evicted nonce back in. The price, only under a flood
/// of authenticated packets, is that genuine packets from a host whose clock is behind may be refused until the
/// floor falls out of the skew window.
pub struct ReplayWindow {
    capacity: usize,
    /// (arrival ms, packet timestamp ms, nonce), oldest arrival first.
    order: VecDeque<(u64, u64, [u8; NONCE])>,
    nonces: HashSet<[u8; NONCE]>,
    /// The newest packet timestamp evicted before it expired.
    floor_ms: Option<u64>,
}

impl ReplayWindow {
    /// Entries held before the oldest is evicted: 2 minutes at 546 accepted packets a second, about 6 MiB when
    /// full.
    pub const DEFAULT_CAPACITY: usize = 1 << 16;

    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A window holding at most `capacity` nonces (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        ReplayWindow {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            nonces: HashSet::new(),
            floor_ms: None,
        }
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Packets stamped at or below this are refused as replayed (set once an unexpired entry was evicted).
    pub fn floor_ms(&self) -> Option<u64> {
        self.floor_ms
    }

    fn seen(&self, nonce: &[u8; NONCE], timestamp_ms: u64) -> bool {
        self.floor_ms.is_some_and(|floor| timestamp_ms <= floor) || self.nonces.contains(nonce)
    }

    fn record(&mut self, nonce: [u8; NONCE], timestamp_ms: u64, now_ms: u64) {
        let expired_before = now_ms.saturating_sub(REMEMBER_MS);
        while let Some(&(arrived, _, old)) = self.order.front() {
            if arrived >= expired_before {
                break;
            }
            self.order.pop_front();
            self.nonces.remove(&old);
        }
        while self.order.len() >= self.capacity {
            let Some((_, stamped, old)) = self.order.pop_front() else {
                break;
            };
            self.nonces.remove(&old);
            self.floor_ms = Some(self.floor_ms.map_or(stamped, |f| f.max(stamped)));
        }
        if self.nonces.insert(nonce) {
            self.order.push_back((now_ms, timestamp_ms, nonce));
        }
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("len", &self.order.len())
            .field("capacity", &self.capacity)
            .field("floor_ms", &self.floor_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: [u8; 32] = [0x11; 32];
    const K2: [u8; 32] = [0x22; 32];
    /// 2023-11-14T22:13:20Z.
    const NOW: u64 = 1_700_000_000_000;

    fn ring(keys: &[[u8; 32]]) -> Keyring {
        Keyring::from_keys(keys).unwrap()
    }

    fn sealed(keyring: &Keyring, cluster: &Cluster, at: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal(keyring, cluster, at, payload, &mut out);
        out
    }

    /// Opens with a fresh replay window at [`NOW`].
    fn open_fresh(
        keyring: &Keyring,
        cluster: &Cluster,
        datagram: &[u8],
    ) -> Result<Vec<u8>, Rejected> {
        let mut out = Vec::new();
        open(
            keyring,
            cluster,
            &mut ReplayWindow::new(),
            NOW,
            datagram,
            &mut out,
        )
        .map(|()| out)
    }

    #[test]
    fn layout_sizes() {
        assert_eq!(HEADER, 43);
        assert_eq!(OVERHEAD, 59);
        assert_eq!(MAX_PAYLOAD, 1341);
    }

    #[test]
    fn round_trip() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        for payload in [&b""[..], b"hello gossip", &[0xa5; MAX_PAYLOAD]] {
            let d = sealed(&k, &c, NOW, payload);
            assert_eq!(d.len(), OVERHEAD + payload.len());
            assert_eq!(&d[..3], b"MG\x01");
            assert_eq!(&d[11..19], &NOW.to_be_bytes());
            assert_eq!(open_fresh(&k, &c, &d).as_deref(), Ok(payload));
            if !payload.is_empty() {
                assert!(
                    !d.windows(payload.len()).any(|w| w == payload),
                    "payload in clear"
                );
            }
        }
    }

    #[test]
    fn two_seals_of_one_payload_differ() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        assert_ne!(sealed(&k, &c, NOW, b"x"), sealed(&k, &c, NOW, b"x"));
    }

    #[test]
    fn another_cluster_is_wrong_cluster() {
        let k = ring(&[K1]);
        let d = sealed(&k, &Cluster::new("staging"), NOW, b"ping");
        assert_eq!(
            open_fresh(&k, &Cluster::new("prod"), &d),
            Err(Rejected::WrongCluster)
        );
    }

    #[test]
    fn a_colliding_cluster_tag_still_fails_authentication() {
        // Same tag in the header, another name in the associated data: what a 4-byte tag collision looks like.
        let k = ring(&[K1]);
        let theirs = Cluster {
            name: "staging".into(),
            tag: Cluster::new("prod").tag(),
        };
        let d = sealed(&k, &theirs, NOW, b"ping");
        assert_eq!(
            open_fresh(&k, &Cluster::new("prod"), &d),
            Err(Rejected::AuthFailed)
        );
    }

    #[test]
    fn another_key_is_unknown_key() {
        let c = Cluster::new("prod");
        let d = sealed(&ring(&[K2]), &c, NOW, b"ping");
        assert_eq!(open_fresh(&ring(&[K1]), &c, &d), Err(Rejected::UnknownKey));
    }

    #[test]
    fn a_second_copy_is_replayed() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let d = sealed(&k, &c, NOW, b"ping");
        let mut window = ReplayWindow::new();
        let mut out = Vec::new();
        assert_eq!(open(&k, &c, &mut window, NOW, &d, &mut out), Ok(()));
        assert_eq!(
            open(&k, &c, &mut window, NOW + 30_000, &d, &mut out),
            Err(Rejected::Replayed)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn timestamps_beyond_the_skew_are_stale() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let old = sealed(&k, &c, NOW - 61_000, b"ping");
        assert_eq!(open_fresh(&k, &c, &old), Err(Rejected::Stale));
        let ahead = sealed(&k, &c, NOW + 61_000, b"ping");
        assert_eq!(open_fresh(&k, &c, &ahead), Err(Rejected::Stale));
        let edge = sealed(&k, &c, NOW - 60_000, b"ping");
        assert!(open_fresh(&k, &c, &edge).is_ok());
    }

    #[test]
    fn an_altered_timestamp_fails_authentication() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let mut d = sealed(&k, &c, NOW - 50_000, b"ping");
        d[11..19].copy_from_slice(&NOW.to_be_bytes());
        assert_eq!(open_fresh(&k, &c, &d), Err(Rejected::AuthFailed));
    }

    #[test]
    fn a_flipped_bit_anywhere_after_the_checked_fields_fails_authentication() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let d = sealed(&k, &c, NOW, b"some gossip payload");
        // Timestamp low bytes (stays within the skew), nonce, ciphertext and tag.
        for i in 17..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open_fresh(&k, &c, &bad),
                Err(Rejected::AuthFailed),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_failed_packet_leaves_the_window_untouched() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let d = sealed(&k, &c, NOW, b"ping");
        let mut forged = d.clone();
        *forged.last_mut().unwrap() ^= 0x80;
        let mut window = ReplayWindow::new();
        let mut out = Vec::new();
        assert_eq!(
            open(&k, &c, &mut window, NOW, &forged, &mut out),
            Err(Rejected::AuthFailed)
        );
        assert!(window.is_empty());
        // The genuine packet with the same nonce still opens.
        assert_eq!(open(&k, &c, &mut window, NOW, &d, &mut out), Ok(()));
    }

    #[test]
    fn short_long_and_junk_datagrams() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let d = sealed(&k, &c, NOW, b"ping");
        for len in 3..OVERHEAD {
            assert_eq!(
                open_fresh(&k, &c, &d[..len]),
                Err(Rejected::Truncated),
                "len {len}"
            );
        }
        for len in 0..3 {
            assert_eq!(
                open_fresh(&k, &c, &d[..len]),
                Err(Rejected::Junk),
                "len {len}"
            );
        }
        // A header and tag with nothing between is a valid empty payload's length: it fails on the tag.
        let tagless = [&d[..HEADER], &d[d.len() - TAG..]].concat();
        assert_eq!(open_fresh(&k, &c, &tagless), Err(Rejected::AuthFailed));

        let big = sealed(&k, &c, NOW, &[0; MAX_PAYLOAD + 1]);
        assert_eq!(big.len(), MAX_DATAGRAM + 1);
        assert_eq!(open_fresh(&k, &c, &big), Err(Rejected::Oversized));

        let mut wrong_version = d.clone();
        wrong_version[2] = 2;
        assert_eq!(open_fresh(&k, &c, &wrong_version), Err(Rejected::Junk));
        let mut random = vec![0u8; 200];
        rand::fill(&mut random[..]);
        random[0] = b'{';
        assert_eq!(open_fresh(&k, &c, &random), Err(Rejected::Junk));
    }

    #[test]
    fn rotation_keeps_every_step_open() {
        let c = Cluster::new("prod");
        // Step 1: k2 installed second everywhere; hosts still on [k1] and hosts on [k1, k2] interoperate.
        let d = sealed(&ring(&[K1]), &c, NOW, b"a");
        assert_eq!(
            open_fresh(&ring(&[K2, K1]), &c, &d).as_deref(),
            Ok(&b"a"[..])
        );
        // Step 2: a host that moved k2 first seals with it; a host still on [k1, k2] opens it.
        let d = sealed(&ring(&[K2, K1]), &c, NOW, b"b");
        assert_eq!(&d[3..7], &sha256_prefix(&K2));
        assert_eq!(
            open_fresh(&ring(&[K1, K2]), &c, &d).as_deref(),
            Ok(&b"b"[..])
        );
        // Skipping step 1 splits the cluster: a host on [k1] alone cannot read k2's packets.
        assert_eq!(open_fresh(&ring(&[K1]), &c, &d), Err(Rejected::UnknownKey));
    }

    #[test]
    fn rejected_names_are_distinct() {
        let names: HashSet<&str> = Rejected::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Rejected::ALL.len());
        assert_eq!(Rejected::UnknownKey.to_string(), "unknown-key");
    }

    fn nonce(i: u32) -> [u8; NONCE] {
        let mut n = [0; NONCE];
        n[..4].copy_from_slice(&i.to_be_bytes());
        n
    }

    #[test]
    fn window_expires_after_twice_the_skew() {
        let mut w = ReplayWindow::with_capacity(8);
        w.record(nonce(1), NOW, NOW);
        assert!(w.seen(&nonce(1), NOW));
        w.record(nonce(2), NOW, NOW + REMEMBER_MS);
        assert!(w.seen(&nonce(1), NOW), "expires only after 2 × MAX_SKEW");
        w.record(nonce(3), NOW, NOW + REMEMBER_MS + 1);
        assert!(!w.seen(&nonce(1), NOW));
        assert_eq!(w.len(), 2);
        assert_eq!(w.floor_ms(), None, "expiry is not eviction");
    }

    #[test]
    fn window_eviction_raises_a_floor_that_keeps_evicted_nonces_out() {
        let mut w = ReplayWindow::with_capacity(3);
        // Arrival order is not timestamp order: hosts' clocks differ.
        w.record(nonce(1), NOW + 500, NOW);
        w.record(nonce(2), NOW - 2_000, NOW + 1);
        w.record(nonce(3), NOW + 100, NOW + 2);
        assert_eq!(w.floor_ms(), None);
        w.record(nonce(4), NOW + 200, NOW + 3);
        assert_eq!(w.len(), 3);
        assert_eq!(w.floor_ms(), Some(NOW + 500));
        assert!(
            w.seen(&nonce(1), NOW + 500),
            "the evicted nonce is still refused"
        );
        assert!(
            w.seen(&nonce(9), NOW + 400),
            "anything stamped at or below the floor is refused"
        );
        assert!(!w.seen(&nonce(9), NOW + 501));
        // The floor only rises: evicting an older stamp leaves it.
        w.record(nonce(5), NOW + 600, NOW + 4);
        assert_eq!(w.floor_ms(), Some(NOW + 500));
        assert!(w.seen(&nonce(2), NOW - 2_000));
        // Holding 3 (+100), 4 (+200), 5 (+600): evicting 3 and 4 leaves the floor, evicting 5 raises it.
        w.record(nonce(6), NOW + 700, NOW + 5);
        w.record(nonce(7), NOW + 800, NOW + 6);
        assert_eq!(w.floor_ms(), Some(NOW + 500));
        w.record(nonce(8), NOW + 900, NOW + 7);
        assert_eq!(w.floor_ms(), Some(NOW + 600));
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_full_window_refuses_replays_through_open() {
        let (k, c) = (ring(&[K1]), Cluster::new("prod"));
        let mut w = ReplayWindow::with_capacity(4);
        let mut out = Vec::new();
        let packets: Vec<Vec<u8>> = (0..10u64).map(|i| sealed(&k, &c, NOW + i, b"p")).collect();
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(
                open(&k, &c, &mut w, NOW + 10, p, &mut out),
                Ok(()),
                "packet {i}"
            );
        }
        assert_eq!(w.len(), 4);
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(
                open(&k, &c, &mut w, NOW + 20, p, &mut out),
                Err(Rejected::Replayed),
                "packet {i}"
            );
        }
    }

    proptest! {
        #[test]
        fn open_never_panics_and_never_accepts_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..1500),
            sealed_prefix in any::<bool>(),
            now in any::<u64>(),
        ) {
            let (k, c) = (ring(&[K1, K2]), Cluster::new("prod"));
            // Half the cases carry a valid header, so the later checks and the cipher see them too.
            let mut datagram = bytes;
            if sealed_prefix {
                let header = sealed(&k, &c, now, b"");
                for (d, h) in datagram.iter_mut().zip(&header[..HEADER]) {
                    *d = *h;
                }
            }
            let mut out = vec![1, 2, 3];
            let mut w = ReplayWindow::with_capacity(2);
            let result = open(&k, &c, &mut w, now, &datagram, &mut out);
            prop_assert!(result.is_err());
            prop_assert!(out.is_empty());
            prop_assert!(w.is_empty());
        }
    }
}
