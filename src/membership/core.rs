//! The membership state machine, free of I/O: foca, its timers, packet sealing, endpoint records and what
//! reaches the routing table. The UDP driver ([`super::driver`]) and the simulator (`bench/gossip_sim.rs`)
//! both drive a [`Core`], each with its own clock and network; so what the simulator measures is what runs.
//!
//! Time is a `Duration` since an arbitrary start (monotonic), plus the wall clock in Unix milliseconds for
//! packet timestamps.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Incarnation, Invalidates, Member,
    OwnedNotification, State, Timer,
};
use rand::rngs::StdRng;

use super::identity::{MeshCodec, NodeId};
use super::keyring::Keyring;
use super::records::{DigestEntry, NodeSnapshot, Outcome, ServiceRecord, Store, WireEndpoint};
use super::seal::{self, Cluster, Rejected, ReplayWindow};
use super::suspicion::{self, Control, Suspicions};
use crate::config::GossipProfile;
use crate::routing::{EndpointSpec, Update};

/// What a broadcast record is about, so a newer version replaces an older one still being disseminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    node: String,
    service: String,
    generation: u64,
    version: u64,
}

impl Invalidates for RecordKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node
            && self.service == other.service
            && (self.generation, self.version) >= (other.generation, other.version)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(&'static str);

/// Foca's custom broadcast handler: decodes, validates and stores endpoint records. A record is passed on only
/// when it was news; an invalid one is dropped without failing the rest of the packet.
pub struct Records(Arc<Mutex<Store>>);

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // The store is plain data; a panic elsewhere cannot leave it half-updated in a way that matters.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

impl BroadcastHandler<NodeId> for Records {
    type Key = RecordKey;
    type Error = RecordError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<RecordKey>, RecordError> {
        let Ok(r) = ServiceRecord::decode(data) else {
            if sender.is_none() {
                return Err(RecordError("undecodable own record"));
            }
            *lock(&self.0).counts.entry("invalid").or_default() += 1;
            return Ok(None);
        };
        let key = |r: ServiceRecord| RecordKey {
            node: r.node,
            service: r.service,
            generation: r.generation,
            version: r.version,
        };
        // No sender: one of this host's own records, added to be disseminated.
        if sender.is_none() {
            return Ok(Some(key(r)));
        }
        match lock(&self.0).apply_record(&r) {
            Outcome::New => Ok(Some(key(r))),
            Outcome::Stale | Outcome::Unknown | Outcome::Invalid(_) => Ok(None),
        }
    }
}

/// Timing presets (`gossip.profile`).
pub fn foca_config(profile: GossipProfile, cluster_size: u32) -> foca::Config {
    let n = std::num::NonZeroU32::new(cluster_size.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let mut c = match profile {
        GossipProfile::Lan => {
            let mut c = foca::Config::new_lan(n);
            // Probing every 1.5 s keeps idle traffic near 100 B/s per host with encryption; crashes are still
            // seen within a few seconds.
            c.probe_period = Duration::from_millis(1500);
            c.probe_rtt = Duration::from_millis(500);
            // With stale suspicion timers dropped (see `Core::handle_timers`) and 4·log10(N)+12 transmissions, the
            // simulator sees no false downs at 10 % loss, and crashes are seen by all within ~7 s.
            c.suspect_to_down_after = Duration::from_secs(4);
            c.periodic_gossip = Some(foca::PeriodicParams {
                frequency: Duration::from_millis(200),
                num_members: std::num::NonZeroUsize::new(3).unwrap_or(std::num::NonZeroUsize::MIN),
            });
            c
        }
        GossipProfile::Wan => foca::Config::new_wan(n),
    };
    // Seeds are re-announced by the driver and state sync repairs the rest: foca's own periodic announce would
    // send a whole member feed every 30 s.
    c.periodic_announce = None;
    c.max_packet_size = std::num::NonZeroUsize::new(seal::MAX_DATAGRAM - seal::OVERHEAD)
        .unwrap_or(std::num::NonZeroUsize::MIN);
    c.remove_down_after = Duration::from_secs(120).into();
    // A member that is down but still talks (the far side of a healed partition) is told so, and rejoins under
    // a new generation. (foca 2.0 also sends this when a suspicion timer runs out after the member refuted;
    // `Core::handle_timers` drops those timers, see there.)
    c.notify_down_members = true;
    // Every update is passed on more often than foca's 4·log10(N): at 10 % loss a refutation must reach every
    // member before its suspicion runs out, or a live host is declared down.
    let tx = (4.0 * f64::from(cluster_size.max(1) + 1).log10()).ceil() as u32 + 12;
    c.max_transmissions =
        std::num::NonZeroU8::new(tx.min(255) as u8).unwrap_or(c.max_transmissions);
    c
}

/// Largest encoded record broadcast by gossip; bigger ones (services with very many endpoints on one host)
/// travel by state sync only.
pub const MAX_BROADCAST_RECORD: usize = 1000;

/// State syncs right after joining, this far apart: a newcomer has the whole view within seconds.
const JOIN_SYNCS: u8 = 3;
const JOIN_SYNC_SPACING: Duration = Duration::from_secs(2);

/// At most one repair sync (pulling a member's records from it) this often.
pub const REPAIR_SPACING: Duration = Duration::from_secs(1);

/// Members told directly when this agent leaves.
const LEAVE_FANOUT: usize = 8;

/// A member as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberInfo {
    pub name: String,
    pub gossip_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub state: &'static str,
    pub generation: u64,
    /// Wall-clock Unix milliseconds of the last state change.
    pub last_change_ms: u64,
    pub endpoints: usize,
}

/// Counters the driver turns into metrics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// (direction, result) → packets.
    pub packets: BTreeMap<(&'static str, &'static str), u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Direct checks of suspects by result: `sent` (datagrams), `answered`, `unanswered` (a vote for the
    /// prober), `received` (this agent was checked, and answered).
    pub checks: BTreeMap<&'static str, u64>,
    /// Suspicion timers of this agent brought forward by votes.
    pub shortened: u64,
}

impl Stats {
    fn packet(&mut self, direction: &'static str, result: &'static str) {
        *self.packets.entry((direction, result)).or_default() += 1;
    }

    fn check(&mut self, result: &'static str) {
        *self.checks.entry(result).or_default() += 1;
    }

    /// Checks by result so far.
    pub fn checks(&self, result: &str) -> u64 {
        self.checks.get(result).copied().unwrap_or(0)
    }
}

/// What the timer heap holds: foca's timers and this agent's own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Foca(Timer<NodeId>),
    /// The next step of a direct check, by nonce.
    Check(u64),
}

/// Something due at `at` (then in submission order).
type Scheduled = Reverse<(Duration, u64, Due)>;

/// A direct check of a suspect in progress.
struct Pending {
    target: NodeId,
    incarnation: Incarnation,
    tries: u8,
    started: Duration,
    /// The prober that asked, told if the suspect stays silent, and the nonce of its request.
    requester: NodeId,
    request_nonce: u64,
}

/// The membership state machine of one agent.
pub struct Core {
    foca: Foca<NodeId, MeshCodec, StdRng, Records>,
    config: foca::Config,
    rt: AccumulatingRuntime<NodeId>,
    timers: BinaryHeap<Scheduled>,
    seq: u64,
    store: Arc<Mutex<Store>>,
    keyring: Keyring,
    cluster: Cluster,
    replay: ReplayWindow,
    /// Sealed datagrams to send.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// Changes for the routing table.
    routing: Vec<Update>,
    /// Active members by name.
    members: BTreeMap<String, NodeId>,
    /// Every member seen, with its state, for the admin API.
    info: BTreeMap<String, MemberInfo>,
    /// This host's own services: name → (version it last changed at, endpoints).
    local: BTreeMap<String, (u64, Vec<EndpointSpec>)>,
    local_version: u64,
    joined: bool,
    /// When the next extra state sync is due (a few in a row right after joining).
    next_sync: Option<Duration>,
    sync_burst: u8,
    next_repair: Option<Duration>,
    /// The last scan found every member's records: none can be missing until a member comes up.
    repair_clean: bool,
    /// Deliver every timer as foca asks (the simulator's baseline); false in the agent.
    plain_foca: bool,
    /// This agent has left the cluster (shutting down).
    left: bool,
    /// Rotates the repair target among members without records.
    repair_turn: usize,
    pub stats: Stats,
    /// Suspicions being timed, with the votes on them; and the checks this agent runs.
    suspicions: Suspicions,
    checks: HashMap<u64, Pending>,
    /// Other agents seen with this agent's own node name (each logged once).
    name_conflicts: HashSet<NodeId>,
    rng: fastrand::Rng,
    buf: Vec<u8>,
    wall_ms: u64,
    now: Duration,
}

impl Core {
    pub fn new(
        id: NodeId,
        config: foca::Config,
        mut rng: StdRng,
        keyring: Keyring,
        cluster: Cluster,
    ) -> Core {
        let own_rng = fastrand::Rng::with_seed(rand::Rng::next_u64(&mut rng));
        let suspicions = Suspicions::new(config.suspect_to_down_after);
        let store = Arc::new(Mutex::new(Store::new(&id.name)));
        let foca = Foca::with_custom_broadcast(
            id,
            config.clone(),
            rng,
            MeshCodec::default(),
            Records(store.clone()),
        );
        Core {
            foca,
            config,
            rt: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            store,
            keyring,
            cluster,
            replay: ReplayWindow::new(),
            outbox: Vec::new(),
            routing: Vec::new(),
            members: BTreeMap::new(),
            info: BTreeMap::new(),
            local: BTreeMap::new(),
            local_version: 0,
            joined: false,
            next_sync: None,
            sync_burst: 0,
            next_repair: None,
            repair_clean: false,
            plain_foca: false,
            left: false,
            repair_turn: 0,
            stats: Stats::default(),
            suspicions,
            checks: HashMap::new(),
            name_conflicts: HashSet::new(),
            rng: own_rng,
            buf: Vec::new(),
            wall_ms: 0,
            now: Duration::ZERO,
        }
    }

    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Baseline for the simulator: deliver foca's timers unfiltered, as a plain foca runtime would.
    pub fn set_plain_foca(&mut self, plain: bool) {
        self.plain_foca = plain;
    }

    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.keyring = keyring;
    }

    /// Whether this agent has been accepted by at least one member (since the last time it had none).
    pub fn joined(&self) -> bool {
        self.joined
    }

    fn clock(&mut self, now: Duration, wall_ms: u64) {
        self.now = now;
        self.wall_ms = wall_ms;
    }

    /// One received datagram.
    pub fn handle_datagram(&mut self, now: Duration, wall_ms: u64, data: &[u8]) {
        self.clock(now, wall_ms);
        self.stats.bytes_in += data.len() as u64;
        let mut plain = std::mem::take(&mut self.buf);
        let result = seal::open(
            &self.keyring,
            &self.cluster,
            &mut self.replay,
            wall_ms,
            data,
            &mut plain,
        );
        match result {
            Err(r) => self.stats.packet("in", r.as_str()),
            Ok(()) => self.payload(&plain),
        }
        self.buf = plain;
        self.drain();
    }

    /// An opened datagram's payload (what [`seal::open`] returns), for the fuzz target and tests: the same path
    /// as [`Core::handle_datagram`] after decryption.
    pub fn handle_payload(&mut self, now: Duration, wall_ms: u64, payload: &[u8]) {
        self.clock(now, wall_ms);
        self.payload(payload);
        self.drain();
    }

    fn payload(&mut self, plain: &[u8]) {
        if let Some(control) = Control::decode(plain) {
            match control {
                Ok(c) => {
                    let result = self.control(c);
                    self.stats.packet("in", result);
                }
                Err(why) => {
                    tracing::debug!(error = why, "dropped a gossip packet");
                    self.stats.packet("in", "malformed");
                }
            }
            return;
        }
        match self.foca.handle_data(plain, &mut self.rt) {
            Ok(()) => self.stats.packet("in", "ok"),
            Err(e) => {
                let result = match e {
                    foca::Error::DataFromOurselves => "from-self",
                    foca::Error::DataTooBig => Rejected::Oversized.as_str(),
                    _ => "malformed",
                };
                tracing::debug!(error = %e, "dropped a gossip packet");
                self.stats.packet("in", result)
            }
        }
    }

    /// A direct-check control message (see [`super::suspicion`]); returns how to count the packet.
    fn control(&mut self, c: Control) -> &'static str {
        if self.plain_foca || self.left {
            return "ok";
        }
        match c {
            Control::CheckRequest {
                nonce,
                from,
                target,
                incarnation,
            } => {
                if from.check().is_err() || target.check().is_err() {
                    return "malformed";
                }
                if &target == self.foca.identity() {
                    self.refute(incarnation, &from);
                    return "ok";
                }
                // Only members are checked (nobody can make this agent send to an arbitrary address), and
                // only so many at once.
                if self.members.get(&*target.name) != Some(&target)
                    || self.checks.len() >= suspicion::MAX_CHECKS
                {
                    return "ok";
                }
                let check_nonce = self.rng.u64(..);
                self.checks.insert(
                    check_nonce,
                    Pending {
                        target,
                        incarnation,
                        tries: 0,
                        started: self.now,
                        requester: from,
                        request_nonce: nonce,
                    },
                );
                self.check_step(check_nonce);
            }
            Control::Check {
                nonce,
                from,
                prober,
                target,
                incarnation,
            } => {
                if from.check().is_err() || prober.check().is_err() {
                    return "malformed";
                }
                // A check of an earlier run of this host: nothing to answer.
                if &target != self.foca.identity() {
                    return "ok";
                }
                self.stats.check("received");
                self.refute(incarnation, &prober);
                self.send_control(from.addr, &Control::Reply { nonce });
            }
            Control::Reply { nonce } => {
                if self.checks.remove(&nonce).is_some() {
                    self.stats.check("answered");
                }
            }
            Control::Alive { from, incarnation } => {
                if from.check().is_err() {
                    return "malformed";
                }
                if self.members.get(&*from.name) == Some(&from) {
                    let alive = Member::new(from, incarnation, State::Alive);
                    if let Err(e) = self
                        .foca
                        .apply_many(std::iter::once(alive), true, &mut self.rt)
                    {
                        tracing::debug!(error = %e, "a suspect's refutation");
                    }
                }
            }
            Control::Vote {
                nonce,
                from,
                target,
                incarnation,
            } => {
                if from.check().is_err() {
                    return "malformed";
                }
                if let Some((at, timer)) =
                    self.suspicions.vote(self.now, nonce, &target, incarnation)
                {
                    tracing::debug!(node = %target.name, voter = %from.name, "a check confirmed a suspicion");
                    self.stats.shortened += 1;
                    self.schedule(at, Due::Foca(timer));
                }
            }
        }
        "ok"
    }

    /// `prober` suspects this agent at `incarnation`: refute at once rather than wait for gossip to say so,
    /// and tell the prober directly (foca then sits at `incarnation + 1` or above).
    fn refute(&mut self, incarnation: Incarnation, prober: &NodeId) {
        let me = Member::new(self.foca.identity().clone(), incarnation, State::Suspect);
        if let Err(e) = self
            .foca
            .apply_many(std::iter::once(me), true, &mut self.rt)
        {
            tracing::debug!(error = %e, "refuting a suspicion");
        }
        if incarnation < Incarnation::MAX && prober != self.foca.identity() {
            let alive = Control::Alive {
                from: self.foca.identity().clone(),
                incarnation: incarnation + 1,
            };
            self.send_control(prober.addr, &alive);
        }
    }

    fn send_control(&mut self, to: SocketAddr, c: &Control) {
        let mut out = Vec::new();
        seal::seal(
            &self.keyring,
            &self.cluster,
            self.wall_ms,
            &c.encode(),
            &mut out,
        );
        self.stats.bytes_out += out.len() as u64;
        self.stats.packet("out", "ok");
        self.outbox.push((to, out));
    }

    fn schedule(&mut self, at: Duration, due: Due) {
        self.seq += 1;
        self.timers.push(Reverse((at, self.seq, due)));
    }

    /// Our probe of `target` failed: ask a few other members to check it directly. Returns the requests'
    /// nonces, which their votes carry.
    fn request_checks(&mut self, target: &NodeId, incarnation: Incarnation) -> Vec<u64> {
        let mut others: Vec<&NodeId> = self
            .members
            .values()
            .filter(|m| m.name != target.name)
            .collect();
        let picks = suspicion::CHECKERS.min(others.len());
        for i in 0..picks {
            let j = self.rng.usize(i..others.len());
            others.swap(i, j);
        }
        let me = self.foca.identity().clone();
        let helpers: Vec<SocketAddr> = others[..picks].iter().map(|m| m.addr).collect();
        let mut nonces = Vec::with_capacity(helpers.len());
        for to in helpers {
            let nonce = self.rng.u64(..);
            let request = Control::CheckRequest {
                nonce,
                from: me.clone(),
                target: target.clone(),
                incarnation,
            };
            self.send_control(to, &request);
            nonces.push(nonce);
        }
        nonces
    }

    /// Sends the next check datagram, or gives up and tells the prober.
    fn check_step(&mut self, nonce: u64) {
        let Some(p) = self.checks.get_mut(&nonce) else {
            return;
        };
        if p.tries >= suspicion::CHECK_TRIES {
            let Some(p) = self.checks.remove(&nonce) else {
                return;
            };
            tracing::debug!(node = %p.target.name, incarnation = p.incarnation, "a suspect did not answer a direct check");
            self.stats.check("unanswered");
            let vote = Control::Vote {
                nonce: p.request_nonce,
                from: self.foca.identity().clone(),
                target: p.target,
                incarnation: p.incarnation,
            };
            self.send_control(p.requester.addr, &vote);
            return;
        }
        p.tries += 1;
        let (spacing, expiry) = suspicion::check_timing(self.config.probe_rtt);
        let next = if p.tries < suspicion::CHECK_TRIES {
            self.now + spacing
        } else {
            p.started + expiry
        };
        let (to, check) = (
            p.target.addr,
            Control::Check {
                nonce,
                from: self.foca.identity().clone(),
                prober: p.requester.clone(),
                target: p.target.clone(),
                incarnation: p.incarnation,
            },
        );
        self.stats.check("sent");
        self.send_control(to, &check);
        self.schedule(next, Due::Check(nonce));
    }

    /// When the next timer is due.
    pub fn next_timer(&self) -> Option<Duration> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Delivers every timer due by `now`, in order.
    pub fn handle_timers(&mut self, now: Duration, wall_ms: u64) {
        self.clock(now, wall_ms);
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, due))) = self.timers.pop() else {
                break;
            };
            let timer = match due {
                Due::Foca(timer) => timer,
                Due::Check(nonce) => {
                    self.check_step(nonce);
                    self.drain();
                    continue;
                }
            };
            // foca 2.0 answers every expired suspicion timer with TurnUndead to the member, even when it refuted
            // in time; the member then declares itself down and rejoins under a new generation, a false "down"
            // everywhere. Found by the simulator (bench/gossip_sim.rs): deliver the timer only while the
            // suspicion it ends still stands.
            if let Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } = &timer
                && !self.plain_foca
                && !self.foca.iter_members().any(|m| {
                    m.id() == member_id
                        && m.state() == foca::State::Suspect
                        && m.incarnation() == *incarnation
                })
            {
                continue;
            }
            if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
                tracing::debug!(error = %e, "gossip timer");
            }
            self.drain();
        }
    }

    /// Sends an announce to a seed (only its address is known).
    pub fn announce(&mut self, now: Duration, wall_ms: u64, seed: SocketAddr) {
        self.clock(now, wall_ms);
        if let Err(e) = self.foca.announce(NodeId::seed(seed), &mut self.rt) {
            tracing::debug!(error = %e, %seed, "gossip announce");
        }
        self.drain();
    }

    /// Whether an active member has this gossip address.
    pub fn knows_addr(&self, addr: SocketAddr) -> bool {
        self.members.values().any(|m| m.addr == addr)
    }

    /// Leaves the cluster: peers stop routing to this host at once.
    pub fn leave(&mut self, now: Duration, wall_ms: u64) {
        self.clock(now, wall_ms);
        // Tell more members than a normal gossip round does: this is the only chance (foca's leave gossips
        // to `num_indirect_probes` members once).
        self.left = true;
        let mut config = self.config.clone();
        config.num_indirect_probes =
            std::num::NonZeroUsize::new(LEAVE_FANOUT).unwrap_or(config.num_indirect_probes);
        if let Err(e) = self.foca.set_config(config) {
            tracing::debug!(error = %e, "gossip leave fan-out");
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "gossip leave");
        }
        self.drain();
    }

    /// This host's endpoints changed: disseminate a record per service that differs.
    pub fn set_local(
        &mut self,
        now: Duration,
        wall_ms: u64,
        local: &BTreeMap<String, Vec<EndpointSpec>>,
    ) {
        self.clock(now, wall_ms);
        let mut changed: Vec<String> = local
            .iter()
            .filter(|(name, specs)| self.local.get(*name).is_none_or(|(_, old)| old != *specs))
            .map(|(name, _)| name.clone())
            .collect();
        changed.extend(
            self.local
                .iter()
                .filter(|(name, (_, specs))| !specs.is_empty() && !local.contains_key(*name))
                .map(|(name, _)| name.clone()),
        );
        for name in changed {
            let specs = local.get(&name).cloned().unwrap_or_default();
            self.publish_local(name, specs);
        }
        self.drain();
    }

    fn publish_local(&mut self, service: String, specs: Vec<EndpointSpec>) {
        let prev = self.local_version;
        self.local_version += 1;
        let id = self.foca.identity();
        let record = ServiceRecord {
            node: id.name.to_string(),
            generation: id.generation,
            prev,
            version: self.local_version,
            service: service.clone(),
            endpoints: specs.iter().map(WireEndpoint::from_spec).collect(),
        };
        self.local.insert(service, (self.local_version, specs));
        let data = record.encode();
        if data.len() > MAX_BROADCAST_RECORD {
            // Peers see the gap in versions and fetch the set by state sync.
            tracing::debug!(service = %record.service, bytes = data.len(), "record too large for gossip; it travels by state sync");
            return;
        }
        if let Err(e) = self.foca.add_broadcast(&data) {
            tracing::debug!(error = %e, "gossip broadcast");
        }
    }

    /// This host's own records as a snapshot.
    fn own_snapshot(&self) -> NodeSnapshot {
        let id = self.foca.identity();
        NodeSnapshot {
            node: id.name.to_string(),
            generation: id.generation,
            version: self.local_version,
            services: self
                .local
                .iter()
                .filter(|(_, (_, specs))| !specs.is_empty())
                .map(|(name, (v, specs))| {
                    (
                        name.clone(),
                        *v,
                        specs.iter().map(WireEndpoint::from_spec).collect(),
                    )
                })
                .collect(),
        }
    }

    /// After every foca call: seal what it sends, schedule its timers, act on its notifications, and turn
    /// record changes into routing updates.
    fn drain(&mut self) {
        while let Some((dst, data)) = self.rt.to_send() {
            let mut out = Vec::with_capacity(data.len() + seal::OVERHEAD);
            seal::seal(&self.keyring, &self.cluster, self.wall_ms, &data, &mut out);
            self.stats.bytes_out += out.len() as u64;
            self.stats.packet("out", "ok");
            self.outbox.push((dst.addr, out));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            // Only the member whose probe failed times a suspicion (foca's ProbeFailed): it asks others to
            // confirm, and their votes shorten the wait.
            if let Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } = &timer
                && !self.plain_foca
                && !self.suspicions.is_tracked(member_id, *incarnation)
            {
                let (target, incarnation) = (member_id.clone(), *incarnation);
                let asked = self.request_checks(&target, incarnation);
                self.suspicions.started(self.now, after, &timer, asked);
            }
            self.schedule(self.now + after, Due::Foca(timer));
        }
        while let Some(n) = self.rt.to_notify() {
            self.notified(n);
        }
        let changed = lock(&self.store).take_changed();
        if changed.is_empty() {
            return;
        }
        let store = lock(&self.store);
        for (node, service) in changed {
            let Some(m) = self.members.get(&node) else {
                continue;
            };
            if let Some(endpoints) = store.service_endpoints(&node, m.generation, &service) {
                self.routing.push(Update::SetRemoteService {
                    node: node.clone(),
                    inbound: m.inbound(),
                    service,
                    endpoints,
                });
            }
        }
    }

    fn set_info(&mut self, id: &NodeId, state: &'static str) {
        // News about an older run of that name (a restart's `Rename` after the new run is up) changes nothing.
        if self
            .info
            .get(&*id.name)
            .is_some_and(|m| m.generation > id.generation)
        {
            return;
        }
        let endpoints = lock(&self.store).endpoint_count(&id.name);
        self.info.insert(
            id.name.to_string(),
            MemberInfo {
                name: id.name.to_string(),
                gossip_addr: id.addr,
                inbound_addr: id.inbound(),
                state,
                generation: id.generation,
                last_change_ms: self.wall_ms,
                endpoints,
            },
        );
    }

    fn member_up(&mut self, id: NodeId) {
        // Another agent with this agent's name: a configuration mistake (two hosts with one `node.name`).
        // Never route to it from here; peers keep routing to the one they saw first.
        if id.name == self.identity().name && id.addr != self.identity().addr {
            if self.name_conflicts.len() < 64 && self.name_conflicts.insert(id.clone()) {
                tracing::error!(
                    node = %id.name,
                    other = %id.addr,
                    own = %self.identity().addr,
                    "another agent claims this agent's node name: peers keep routing to the one they saw first; \
                     give every agent its own node.name"
                );
            }
            return;
        }
        // Two live agents with one name: keep routing to the one already routed, so a misconfigured newcomer
        // cannot take a host's endpoints out of the mesh. It takes over once the other is declared down or
        // leaves (`member_down`), as a host that came back at another address does.
        if let Some(old) = self.members.get(&*id.name)
            && old.addr != id.addr
            && self.foca.iter_members().any(|m| m.id() == old)
        {
            if self.name_conflicts.len() < 64 && self.name_conflicts.insert(id.clone()) {
                tracing::warn!(
                    node = %id.name,
                    addr = %id.addr,
                    routed = %old.addr,
                    "two live agents claim this node name: routing stays with the one already routed; give \
                     every agent its own node.name"
                );
            }
            return;
        }
        // A newer run of that name is already routed (an old identity resurfacing from a peer's list).
        if self
            .members
            .get(&*id.name)
            .is_some_and(|m| m.generation > id.generation)
        {
            return;
        }
        tracing::info!(node = %id.name, addr = %id.addr, generation = id.generation, "member up");
        self.repair_clean = false;
        self.set_info(&id, "alive");
        let endpoints = {
            let mut store = lock(&self.store);
            store.set_member(&id.name, Some(id.generation));
            store.endpoints(&id.name, id.generation).unwrap_or_default()
        };
        self.routing.push(Update::SetRemote {
            node: id.name.to_string(),
            inbound: id.inbound(),
            endpoints,
        });
        self.members.insert(id.name.to_string(), id);
    }

    fn member_down(&mut self, id: &NodeId) {
        if id.name == self.identity().name && id.addr != self.identity().addr {
            return; // the other agent with this agent's name: never routed here
        }
        if self
            .members
            .get(&*id.name)
            .is_some_and(|m| m.addr != id.addr)
        {
            // A second agent with a routed member's name (never routed) has gone: nothing changes.
            return;
        }
        tracing::info!(node = %id.name, generation = id.generation, "member down");
        self.set_info(id, "down");
        let routed = self
            .members
            .get(&*id.name)
            .is_some_and(|m| m.generation <= id.generation);
        lock(&self.store).bury(&id.name, id.generation);
        if routed {
            self.members.remove(&*id.name);
            lock(&self.store).set_member(&id.name, None);
            self.routing.push(Update::RemoveRemote {
                node: id.name.to_string(),
            });
            // Another live identity with that name (the host came back at another address) takes over.
            let next = self
                .foca
                .iter_members()
                .filter(|m| m.id().name == id.name && m.id() != id)
                .max_by_key(|m| m.id().generation)
                .map(|m| m.id().clone());
            if let Some(next) = next {
                self.member_up(next);
            }
        }
    }

    fn notified(&mut self, n: OwnedNotification<NodeId>) {
        match n {
            OwnedNotification::MemberUp(id) => self.member_up(id),
            OwnedNotification::MemberDown(id) => self.member_down(&id),
            OwnedNotification::Rename(old, new) => {
                tracing::info!(node = %new.name, old = old.generation, new = new.generation, "member restarted");
                let was_active = self.members.contains_key(&*old.name);
                self.member_down(&old);
                if was_active && self.foca.iter_members().any(|m| m.id() == &new) {
                    self.member_up(new);
                }
            }
            OwnedNotification::Active => {
                tracing::info!("joined the gossip cluster");
                self.joined = true;
                self.next_sync = Some(self.now);
                self.sync_burst = JOIN_SYNCS;
            }
            OwnedNotification::Idle => {
                tracing::warn!("no live gossip members left");
                self.joined = false;
            }
            OwnedNotification::Rejoin(id) => {
                tracing::warn!(
                    generation = id.generation,
                    "this agent was declared down; rejoined with a new generation"
                );
                self.republish_all();
            }
            // Also what leaving the cluster ends with.
            OwnedNotification::Defunct if self.left => {}
            OwnedNotification::Defunct => {
                tracing::error!("this agent was declared down and cannot rejoin");
            }
        }
    }

    /// After a change of generation: every service again, from version 1.
    fn republish_all(&mut self) {
        let local = std::mem::take(&mut self.local);
        self.local_version = 0;
        for (name, (_, specs)) in local {
            if !specs.is_empty() {
                self.publish_local(name, specs);
            }
        }
    }

    /// Takes the datagrams to send.
    pub fn take_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Takes the routing updates produced so far.
    pub fn take_routing(&mut self) -> Vec<Update> {
        std::mem::take(&mut self.routing)
    }

    /// Whether an extra state sync should start now (right after joining: a few, two seconds apart).
    pub fn take_sync_due(&mut self, now: Duration) -> bool {
        match self.next_sync {
            Some(at) if now >= at => {
                self.sync_burst = self.sync_burst.saturating_sub(1);
                self.next_sync = (self.sync_burst > 0).then(|| now + JOIN_SYNC_SPACING);
                true
            }
            _ => false,
        }
    }

    /// A member this agent has no records of at all, to pull them from it directly; gossip or a random sync
    /// may have missed it. Members are looked through at most every [`REPAIR_SPACING`], whether or not one was
    /// missing (the driver asks after every datagram), and not at all once none was, until a member comes up.
    pub fn take_repair_target(&mut self, now: Duration) -> Option<NodeId> {
        if self.next_repair.is_some_and(|t| now < t) {
            return None;
        }
        self.next_repair = Some(now + REPAIR_SPACING);
        if self.repair_clean {
            return None;
        }
        let store = lock(&self.store);
        let missing: Vec<&NodeId> = self
            .members
            .values()
            .filter(|m| {
                store
                    .version(&m.name)
                    .is_none_or(|(g, _)| g != m.generation)
            })
            .collect();
        // In turn, so one member whose sync keeps failing does not keep the others waiting.
        self.repair_turn = self.repair_turn.wrapping_add(1);
        let target =
            (!missing.is_empty()).then(|| missing[self.repair_turn % missing.len()].clone());
        drop(store);
        self.repair_clean = target.is_none();
        target
    }

    /// Live members and this agent: what a state sync tells a peer.
    pub fn live_members(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.members.values().cloned().collect();
        out.push(self.foca.identity().clone());
        out.truncate(super::sync::MAX_SNAPSHOTS);
        out
    }

    /// Members a peer knows: foca takes them as alive unless it knows better (a later incarnation, a newer
    /// generation, or down — which is final for that identity).
    pub fn learn_members(&mut self, now: Duration, wall_ms: u64, ids: Vec<NodeId>) {
        self.clock(now, wall_ms);
        let own = self.foca.identity().clone();
        let fresh: Vec<foca::Member<NodeId>> = ids
            .into_iter()
            .take(super::sync::MAX_SNAPSHOTS)
            .filter(|id| {
                id.check().is_ok() && id.addr != own.addr && self.members.get(&*id.name) != Some(id)
            })
            .map(foca::Member::alive)
            .collect();
        if fresh.is_empty() {
            return;
        }
        if let Err(e) = self.foca.apply_many(fresh.into_iter(), false, &mut self.rt) {
            tracing::debug!(error = %e, "members from state sync");
        }
        self.drain();
    }

    /// A random active member to sync with.
    pub fn sync_peer(&self, pick: usize) -> Option<NodeId> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        self.members.values().nth(pick % n).cloned()
    }

    /// Active members, by name.
    pub fn member(&self, name: &str) -> Option<&NodeId> {
        self.members.get(name)
    }

    pub fn num_members(&self) -> usize {
        self.members.len()
    }

    /// Forgets down members shown for longer than foca remembers them (two minutes).
    pub fn prune(&mut self, wall_ms: u64) {
        self.info
            .retain(|_, m| m.state != "down" || wall_ms.saturating_sub(m.last_change_ms) < 120_000);
    }

    /// Every member seen (including down ones foca still remembers), for the admin API.
    pub fn members_info(&self) -> Vec<MemberInfo> {
        let store = lock(&self.store);
        let mut out: Vec<MemberInfo> = self
            .info
            .values()
            .cloned()
            .map(|mut m| {
                if let Some(id) = self.members.get(&m.name) {
                    m.endpoints = store.endpoint_count(&id.name);
                    m.state = match self
                        .foca
                        .iter_members()
                        .find(|x| x.id() == id)
                        .map(|x| x.state())
                    {
                        Some(foca::State::Suspect) => "suspect",
                        _ => "alive",
                    };
                } else {
                    m.endpoints = 0;
                }
                m
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Counts of members by state: alive, suspect, down.
    pub fn member_counts(&self) -> [(&'static str, usize); 3] {
        let mut alive = 0;
        let mut suspect = 0;
        for m in self.foca.iter_members() {
            match m.state() {
                foca::State::Suspect => suspect += 1,
                _ => alive += 1,
            }
        }
        let down = self.info.values().filter(|m| m.state == "down").count();
        [("alive", alive), ("suspect", suspect), ("down", down)]
    }

    // --- state sync -------------------------------------------------------------------------------------

    /// The digest of every live member's records (and ours): what a sync compares.
    pub fn digest(&self) -> Vec<DigestEntry> {
        let store = lock(&self.store);
        let id = self.foca.identity();
        let mut out = vec![DigestEntry {
            node: id.name.to_string(),
            generation: id.generation,
            version: self.local_version,
        }];
        for m in self.members.values() {
            if let Some((generation, version)) = store.version(&m.name) {
                out.push(DigestEntry {
                    node: m.name.to_string(),
                    generation,
                    version,
                });
            }
        }
        out.sort();
        out
    }

    /// A short hash of the digest: two agents that agree skip the rest of the sync.
    pub fn digest_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.digest().hash(&mut h);
        h.finish()
    }

    /// Given a peer's digest: the snapshots it lacks (ours newer), and the nodes it knows newer than us.
    pub fn compare(&self, theirs: &[DigestEntry]) -> (Vec<NodeSnapshot>, Vec<String>) {
        let mine = self.digest();
        let theirs_by: HashMap<&str, (u64, u64)> = theirs
            .iter()
            .map(|e| (e.node.as_str(), (e.generation, e.version)))
            .collect();
        let mut give = Vec::new();
        let store = lock(&self.store);
        let own = self.foca.identity().name.clone();
        for e in &mine {
            if theirs_by
                .get(e.node.as_str())
                .is_none_or(|t| *t < (e.generation, e.version))
            {
                let snap = if *e.node == *own {
                    Some(self.own_snapshot())
                } else {
                    store.snapshot(&e.node)
                };
                give.extend(snap);
            }
        }
        let mine_by: HashMap<&str, (u64, u64)> = mine
            .iter()
            .map(|e| (e.node.as_str(), (e.generation, e.version)))
            .collect();
        let want = theirs
            .iter()
            .filter(|e| {
                *e.node != *own
                    && mine_by
                        .get(e.node.as_str())
                        .is_none_or(|m| *m < (e.generation, e.version))
            })
            .map(|e| e.node.clone())
            .take(super::sync::MAX_SNAPSHOTS)
            .collect();
        (give, want)
    }

    /// Snapshots of the named nodes (what a peer asked for).
    pub fn snapshots(&self, nodes: &[String]) -> Vec<NodeSnapshot> {
        let own = self.foca.identity().name.clone();
        let store = lock(&self.store);
        nodes
            .iter()
            .take(super::sync::MAX_SNAPSHOTS)
            .filter_map(|n| {
                if **n == *own {
                    Some(self.own_snapshot())
                } else {
                    store.snapshot(n)
                }
            })
            .collect()
    }

    /// Applies snapshots from a sync with `peer` (the node its certificate proved); returns how many were news.
    pub fn apply_snapshots(&mut self, peer: &str, snaps: &[NodeSnapshot]) -> usize {
        let mut new = 0;
        {
            let mut store = lock(&self.store);
            for s in snaps.iter().take(super::sync::MAX_SNAPSHOTS) {
                if store.apply_snapshot(s, s.node == peer) == Outcome::New {
                    new += 1;
                }
            }
        }
        self.drain();
        new
    }

    /// Record outcomes so far (accepted, stale, invalid).
    pub fn record_counts(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.store).counts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn core(i: u8) -> Core {
        let id = NodeId {
            name: Arc::from(format!("n{i}").as_str()),
            addr: SocketAddr::from(([10, 0, 0, i], 4145)),
            inbound_port: 4143,
            generation: 1,
        };
        Core::new(
            id,
            foca_config(GossipProfile::Lan, 10),
            StdRng::seed_from_u64(u64::from(i)),
            Keyring::from_keys(&[[3u8; 32]]).unwrap(),
            Cluster::new("test"),
        )
    }

    /// Real payloads: an announce from A, B's feed back, then A's records.
    fn real_payloads() -> Vec<Vec<u8>> {
        let (mut a, mut b) = (core(1), core(2));
        let (keys, cluster) = (
            Keyring::from_keys(&[[3u8; 32]]).unwrap(),
            Cluster::new("test"),
        );
        let mut replay = ReplayWindow::new();
        let mut out = Vec::new();
        let local: BTreeMap<String, Vec<EndpointSpec>> = [(
            "users".to_string(),
            vec![EndpointSpec {
                service: "users".into(),
                addr: "10.1.0.1:80".parse().unwrap(),
                protocol: crate::config::Protocol::Http,
                weight: 100,
            }],
        )]
        .into();
        a.set_local(Duration::ZERO, 1_000, &local);
        a.announce(Duration::ZERO, 1_000, b.identity().addr);
        let mut payloads = Vec::new();
        for _ in 0..4 {
            for (_, d) in a.take_outbox() {
                seal::open(&keys, &cluster, &mut replay, 1_000, &d, &mut out).unwrap();
                payloads.push(out.clone());
                b.handle_payload(Duration::ZERO, 1_000, &out);
            }
            for (_, d) in b.take_outbox() {
                seal::open(&keys, &cluster, &mut replay, 1_000, &d, &mut out).unwrap();
                payloads.push(out.clone());
                a.handle_payload(Duration::ZERO, 1_000, &out);
            }
            a.handle_timers(Duration::from_secs(1), 2_000);
        }
        assert!(b.member("n1").is_some(), "B learned A from the exchange");
        payloads
    }

    #[test]
    fn records_reach_routing_through_real_payloads() {
        let mut b = core(2);
        for p in real_payloads() {
            b.handle_payload(Duration::ZERO, 1_000, &p);
        }
        let updates = b.take_routing();
        assert!(
            updates
                .iter()
                .any(|u| matches!(u, Update::SetRemote { node, .. } if node == "n1")),
            "{updates:?}"
        );
    }

    /// Two cores on a lossless in-memory network where B's datagrams to A can be dropped, on a virtual clock
    /// stepped 50 ms at a time. Returns B's generation at the end and whether A still routes B.
    fn refuted_suspicion(plain: bool) -> (u64, bool) {
        let (mut a, mut b) = (core(1), core(2));
        a.set_plain_foca(plain);
        let wall = |t: Duration| 1_000_000 + t.as_millis() as u64;
        let mut now = Duration::ZERO;
        b.announce(now, wall(now), a.identity().addr);
        let step = |a: &mut Core, b: &mut Core, now: Duration, drop_b: bool| {
            a.handle_timers(now, wall(now));
            b.handle_timers(now, wall(now));
            for _ in 0..10 {
                let (from_a, from_b) = (a.take_outbox(), b.take_outbox());
                if from_a.is_empty() && from_b.is_empty() {
                    break;
                }
                for (_, d) in from_a {
                    b.handle_datagram(now, wall(now), &d);
                }
                for (_, d) in from_b {
                    if !drop_b {
                        a.handle_datagram(now, wall(now), &d);
                    }
                }
            }
        };
        // Join, then lose everything B sends for 3 s: A suspects B, B hears of it and refutes, but A only
        // learns of the refutation once B's datagrams get through again, before the suspicion runs out.
        for (until, drop_b) in [(2_000, false), (5_000, true), (15_000, false)] {
            while now < Duration::from_millis(until) {
                now += Duration::from_millis(50);
                step(&mut a, &mut b, now, drop_b);
            }
        }
        (
            b.identity().generation,
            a.member("n2")
                .is_some_and(|m| m.generation == b.identity().generation),
        )
    }

    #[test]
    fn a_refuted_suspicion_does_not_make_the_member_rejoin() {
        let (generation, routed) = refuted_suspicion(false);
        assert_eq!(generation, 1, "B kept its identity");
        assert!(routed, "A still has B as a member");
        // What foca 2.0 does on its own: the expired timer sends TurnUndead, and B rejoins as a new member.
        let (generation, _) = refuted_suspicion(true);
        assert!(generation > 1, "plain foca makes B rejoin");
    }

    /// `n` cores on a lossless in-memory network, on a virtual clock stepped 50 ms at a time. From `from` on,
    /// member `victim` is silent: for good (`stall: None`, a crash) or for `stall` (it neither runs nor reads;
    /// what was sent to it waits, as in a socket buffer). Returns, for each other core, how long after `from` it
    /// took the victim out of its routing table (if it did), and the victim's generation at the end.
    struct Silence {
        removed: Vec<Option<Duration>>,
        generation: u64,
        /// Suspicion timers brought forward, all cores together.
        shortened: u64,
    }

    fn silence(
        n: u8,
        victim: usize,
        from: Duration,
        stall: Option<Duration>,
        plain: bool,
    ) -> Silence {
        let mut cores: Vec<Core> = (1..=n).map(core).collect();
        for c in cores.iter_mut() {
            c.set_plain_foca(plain);
        }
        let wall = |t: Duration| 1_000_000 + t.as_millis() as u64;
        let seed = cores[0].identity().addr;
        let mut now = Duration::ZERO;
        for c in cores.iter_mut().skip(1) {
            c.announce(now, wall(now), seed);
        }
        let name = cores[victim].identity().name.to_string();
        let mut removed = vec![None; cores.len()];
        let mut queued: Vec<Vec<u8>> = Vec::new();
        while now < from + Duration::from_secs(20) {
            now += Duration::from_millis(50);
            let silent = now >= from && stall.is_none_or(|d| now < from + d);
            let crashed = now >= from && stall.is_none();
            if !silent && !crashed {
                for d in queued.drain(..) {
                    cores[victim].handle_datagram(now, wall(now), &d);
                }
            }
            for (i, c) in cores.iter_mut().enumerate() {
                if i != victim || !silent {
                    c.handle_timers(now, wall(now));
                }
            }
            for _ in 0..10 {
                let mut sent = Vec::new();
                for (i, c) in cores.iter_mut().enumerate() {
                    for (to, d) in c.take_outbox() {
                        if i != victim || !crashed {
                            sent.push((to, d));
                        }
                    }
                }
                if sent.is_empty() {
                    break;
                }
                for (to, d) in sent {
                    let Some(i) = cores.iter().position(|c| c.identity().addr == to) else {
                        continue;
                    };
                    if i != victim || !silent {
                        cores[i].handle_datagram(now, wall(now), &d);
                    } else if !crashed {
                        queued.push(d);
                    }
                }
            }
            for (i, c) in cores.iter_mut().enumerate() {
                let gone = c
                    .take_routing()
                    .iter()
                    .any(|u| matches!(u, Update::RemoveRemote { node } if *node == name));
                if gone && now >= from && removed[i].is_none() {
                    removed[i] = Some(now - from);
                }
            }
        }
        removed.remove(victim);
        Silence {
            removed,
            generation: cores[victim].identity().generation,
            shortened: cores.iter().map(|c| c.stats.shortened).sum(),
        }
    }

    #[test]
    fn checks_confirm_a_crash_sooner_than_a_fixed_suspicion() {
        let all =
            |r: Vec<Option<Duration>>| r.into_iter().map(|t| t.unwrap_or(Duration::MAX)).max();
        let ours = all(silence(6, 3, Duration::from_secs(20), None, false).removed).unwrap();
        let plain = all(silence(6, 3, Duration::from_secs(20), None, true).removed).unwrap();
        assert!(
            ours < Duration::from_secs(20),
            "every member saw the crash: {ours:?}"
        );
        // The prober's four helpers all vote: its suspicion runs 1.5 s instead of 4 s.
        assert!(
            ours + Duration::from_secs(2) <= plain,
            "ours {ours:?}, plain foca {plain:?}"
        );
    }

    #[test]
    fn a_member_stalled_for_under_three_seconds_stays_up() {
        // Stalls long enough to fail probes and, in some of these runs, to draw checkers' votes; the member
        // resumes before the shortened suspicion runs out, answers the queued checks and tells the prober.
        let mut shortened = 0;
        for victim in [2, 3] {
            for from_ms in (20_000..21_500).step_by(250) {
                let from = Duration::from_millis(from_ms);
                let run = silence(6, victim, from, Some(Duration::from_millis(2800)), false);
                assert!(
                    run.removed.iter().all(Option::is_none),
                    "member {victim} stalled from {from:?}: {:?}",
                    run.removed
                );
                assert_eq!(run.generation, 1, "it kept its identity");
                shortened += run.shortened;
            }
        }
        assert!(shortened > 0, "no run drew a vote: the test shows nothing");
        // Silent for good, the same member is gone everywhere.
        let run = silence(6, 3, Duration::from_secs(20), None, false);
        assert!(run.removed.iter().all(Option::is_some), "{:?}", run.removed);
    }

    #[test]
    fn a_suspects_word_that_it_is_alive_clears_the_suspicion_at_the_prober() {
        let (mut a, mut b) = (core(1), core(2));
        b.announce(Duration::ZERO, 1_000, a.identity().addr);
        for _ in 0..4 {
            for (_, d) in b.take_outbox() {
                a.handle_datagram(Duration::ZERO, 1_000, &d);
            }
            for (_, d) in a.take_outbox() {
                b.handle_datagram(Duration::ZERO, 1_000, &d);
            }
        }
        let b_id = b.identity().clone();
        assert!(a.member("n2").is_some(), "A has B");
        let state = |a: &Core| {
            a.foca
                .iter_members()
                .find(|m| m.id() == &b_id)
                .map(|m| (m.state(), m.incarnation()))
        };
        let suspect = Member::new(b_id.clone(), 0, State::Suspect);
        a.foca
            .apply_many(std::iter::once(suspect), false, &mut a.rt)
            .unwrap();
        assert_eq!(state(&a), Some((State::Suspect, 0)));
        let alive = Control::Alive {
            from: b_id.clone(),
            incarnation: 1,
        };
        a.handle_payload(Duration::ZERO, 1_000, &alive.encode());
        assert_eq!(state(&a), Some((State::Alive, 1)));
    }

    #[test]
    fn a_check_makes_the_suspect_refute_and_junk_control_messages_are_counted() {
        let (mut a, mut b, prober) = (core(1), core(2), core(3));
        let (keys, cluster) = (
            Keyring::from_keys(&[[3u8; 32]]).unwrap(),
            Cluster::new("test"),
        );
        let check = Control::Check {
            nonce: 42,
            from: a.identity().clone(),
            prober: prober.identity().clone(),
            target: b.identity().clone(),
            incarnation: 0,
        };
        b.handle_payload(Duration::ZERO, 1_000, &check.encode());
        assert_eq!(b.stats.checks("received"), 1);
        // B answers A with the nonce, and tells the prober it is alive above the suspected incarnation.
        let mut replay = ReplayWindow::new();
        let mut out = Vec::new();
        let sent: Vec<(SocketAddr, Control)> = b
            .take_outbox()
            .into_iter()
            .filter_map(|(to, d)| {
                seal::open(&keys, &cluster, &mut replay, 1_000, &d, &mut out).ok()?;
                Some((to, Control::decode(&out)?.ok()?))
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                (
                    prober.identity().addr,
                    Control::Alive {
                        from: b.identity().clone(),
                        incarnation: 1
                    }
                ),
                (a.identity().addr, Control::Reply { nonce: 42 }),
            ]
        );
        // A check of another run of B (an older generation) is not B's to answer.
        let mut old = b.identity().clone();
        old.generation = 0;
        let stale = Control::Check {
            nonce: 43,
            from: a.identity().clone(),
            prober: prober.identity().clone(),
            target: old,
            incarnation: 0,
        };
        b.handle_payload(Duration::ZERO, 1_000, &stale.encode());
        assert_eq!(b.stats.checks("received"), 1);
        assert!(b.take_outbox().is_empty());
        // Tagged junk, and a well-formed request naming an invalid identity, are dropped and counted.
        a.handle_payload(Duration::ZERO, 1_000, &[suspicion::TAG, 0xee, 0x01]);
        let mut nameless = b.identity().clone();
        nameless.name = Arc::from("");
        let bad = Control::CheckRequest {
            nonce: 1,
            from: nameless,
            target: b.identity().clone(),
            incarnation: 0,
        };
        a.handle_payload(Duration::ZERO, 1_000, &bad.encode());
        assert_eq!(a.stats.packets.get(&("in", "malformed")), Some(&2));
        assert_eq!(a.stats.packets.get(&("in", "ok")), None);
        assert!(a.take_outbox().is_empty(), "nothing sent for junk");
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let mut c = core(9);
            c.handle_payload(Duration::ZERO, 1_000, &data);
        }

        #[test]
        fn mutated_real_payloads_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let payloads = real_payloads();
            let mut c = core(9);
            for p in payloads {
                let mut p = p.clone();
                for (at, byte) in &flips {
                    if !p.is_empty() {
                        let i = at % p.len();
                        p[i] ^= byte;
                    }
                }
                c.handle_payload(Duration::ZERO, 1_000, &p);
            }
        }
    }
}
