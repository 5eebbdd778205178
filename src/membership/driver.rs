//! The membership task: one task owns the [`Core`] (and so foca), and feeds it UDP datagrams, timers, this
//! host's endpoint changes, seed addresses, state-sync messages and commands. After each input it sends what
//! the core sealed, passes routing changes to the router and, once a second, publishes members and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::core::{Core, MemberInfo, Stats};
use super::identity::NodeId;
use super::keyring::Keyring;
use super::seal;
use super::sync::{Incoming, SyncClient, SyncRequest, SyncResponse};
use crate::config::GossipProfile;
use crate::readiness::ReadyToken;
use crate::routing::{EndpointSpec, RoutingHandle};
use crate::telemetry::metrics::GossipMetrics;

/// Seeds not seen among the members are announced to this often once joined (and every second before).
pub fn reannounce_interval(profile: GossipProfile) -> Duration {
    match profile {
        GossipProfile::Lan => Duration::from_secs(10),
        GossipProfile::Wan => Duration::from_secs(30),
    }
}

/// State sync with one random member this often.
pub fn sync_interval(profile: GossipProfile) -> Duration {
    match profile {
        GossipProfile::Lan => Duration::from_secs(30),
        GossipProfile::Wan => Duration::from_secs(60),
    }
}

/// Commands from the rest of the agent.
pub enum Command {
    /// Leave the cluster gracefully; answered once the leave has been sent.
    Leave(oneshot::Sender<()>),
    /// Use a new keyring (SIGHUP).
    Keyring(Keyring),
    /// Seed addresses, freshly resolved.
    Seeds(Vec<SocketAddr>),
    /// A sync this agent started needs its digest and live members.
    Digest(oneshot::Sender<(Vec<super::records::DigestEntry>, Vec<NodeId>)>),
    /// A sync this agent started got snapshots, members and a list of wanted nodes: apply, and answer with
    /// those.
    Diff {
        /// The node that answered (its certificate proved it).
        peer: String,
        snapshots: Vec<super::records::NodeSnapshot>,
        want: Vec<String>,
        members: Vec<NodeId>,
        reply: oneshot::Sender<Vec<super::records::NodeSnapshot>>,
    },
    /// The outcome of a sync this agent started.
    SyncDone(&'static str),
    /// The systemd watchdog's probe: answered as soon as the driver gets to it.
    Ping(oneshot::Sender<()>),
}

pub(super) struct Driver {
    pub core: Core,
    pub socket: Arc<UdpSocket>,
    pub profile: GossipProfile,
    pub commands: mpsc::Receiver<Command>,
    pub command_tx: mpsc::Sender<Command>,
    pub sync_in: mpsc::Receiver<Incoming>,
    pub local: watch::Receiver<Arc<BTreeMap<String, Vec<EndpointSpec>>>>,
    pub routing: RoutingHandle,
    pub members_tx: watch::Sender<Arc<Vec<MemberInfo>>>,
    pub joined_tx: watch::Sender<bool>,
    pub metrics: GossipMetrics,
    pub sync: Arc<SyncClient>,
    pub has_seeds: bool,
    pub ready: Option<ReadyToken>,
    pub join_timeout: Duration,
    /// The driver's clock starts here.
    pub started: Instant,
    /// Seed addresses, as last resolved.
    pub seeds: Vec<SocketAddr>,
    pub last_seed_announce: Option<Duration>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Driver {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let start = self.started;
        let now = || start.elapsed();
        let mut buf = vec![0u8; seal::MAX_DATAGRAM + 1];
        let mut published = Stats::default();
        let mut record_counts = BTreeMap::new();

        let mut publish = tokio::time::interval(Duration::from_secs(1));
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync_tick = tokio::time::interval(sync_interval(self.profile));
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sync_tick.reset();
        let join_deadline = tokio::time::Instant::now() + self.join_timeout;
        if !self.has_seeds {
            // Nobody to join: this is the first host.
            self.ready.take();
        }
        let local = self.local.borrow_and_update().clone();
        self.core.set_local(now(), wall_ms(), &local);
        loop {
            let timer_at = self
                .core
                .next_timer()
                .map(|t| tokio::time::Instant::from_std(start + t));
            tokio::select! {
                // Datagrams first: after a stall, acks waiting in the socket must be seen before the probe
                // timers they answer fire.
                biased;
                _ = shutdown.cancelled() => break,
                // Commands and sync requests are rare: before datagrams, so a flood cannot starve them.
                Some(cmd) = self.commands.recv() => self.command(cmd, now()).await,
                Some(inc) = self.sync_in.recv() => self.serve_sync(inc),
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, _from)) => {
                        self.core.handle_datagram(now(), wall_ms(), &buf[..n]);
                        // Whatever else is already queued, before any timer.
                        for _ in 0..64 {
                            match self.socket.try_recv_from(&mut buf) {
                                Ok((n, _)) => self.core.handle_datagram(now(), wall_ms(), &buf[..n]),
                                Err(_) => break,
                            }
                        }
                        // Timers that fell due meanwhile run now, so a flood of datagrams cannot hold them off.
                        self.core.handle_timers(now(), wall_ms());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "gossip socket");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Ok(()) = self.local.changed() => {
                    let local = self.local.borrow_and_update().clone();
                    self.core.set_local(now(), wall_ms(), &local);
                }
                _ = async {
                    match timer_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.core.handle_timers(now(), wall_ms()),
                _ = sync_tick.tick() => self.start_sync(),
                _ = publish.tick() => {
                    self.publish(&mut published, &mut record_counts);
                    if self.ready.is_some() && tokio::time::Instant::now() >= join_deadline {
                        tracing::warn!(
                            timeout = ?self.join_timeout,
                            "no gossip seed answered within gossip.join_timeout: reporting ready (degraded) and \
                             still trying"
                        );
                        self.ready.take();
                    }
                }
            }
            // Seeds we cannot see: announce to them (every second until joined, then now and then).
            let every = if self.core.joined() {
                reannounce_interval(self.profile)
            } else {
                Duration::from_secs(1)
            };
            if !self.seeds.is_empty() && self.last_seed_announce.is_none_or(|t| now() >= t + every)
            {
                self.last_seed_announce = Some(now());
                let own = self.core.identity().addr;
                for s in self.seeds.clone() {
                    if s != own && !self.core.knows_addr(s) {
                        self.core.announce(now(), wall_ms(), s);
                    }
                }
            }
            if self.core.joined() {
                self.ready.take();
            }
            if self.core.take_sync_due(now()) {
                self.start_sync();
            }
            if let Some(peer) = self.core.take_repair_target(now()) {
                self.sync_with_peer(peer);
            }
            self.flush().await;
        }
        self.publish(&mut published, &mut record_counts);
    }

    async fn command(&mut self, cmd: Command, now: Duration) {
        match cmd {
            Command::Leave(done) => {
                self.core.leave(now, wall_ms());
                self.flush().await;
                let _ = done.send(());
            }
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::Keyring(k) => {
                tracing::info!(keys = ?k.ids(), "gossip keyring reloaded");
                self.core.set_keyring(k);
            }
            Command::Seeds(addrs) => {
                self.seeds = addrs;
                self.last_seed_announce = None;
            }
            Command::Digest(reply) => {
                let _ = reply.send((self.core.digest(), self.core.live_members()));
            }
            Command::Diff {
                peer,
                snapshots,
                want,
                members,
                reply,
            } => {
                self.core.learn_members(now, wall_ms(), members);
                let n = self.core.apply_snapshots(&peer, &snapshots);
                if n > 0 {
                    tracing::debug!(applied = n, "state sync repaired records");
                }
                let _ = reply.send(self.core.snapshots(&want));
            }
            Command::SyncDone(result) => {
                self.metrics.syncs.with_label_values(&[result]).inc();
            }
        }
    }

    /// Sends what the core sealed and passes its routing changes on.
    async fn flush(&mut self) {
        for (dst, data) in self.core.take_outbox() {
            if let Err(e) = self.socket.send_to(&data, dst).await {
                tracing::debug!(error = %e, %dst, "gossip send");
                self.metrics
                    .packets
                    .with_label_values(&["out", "error"])
                    .inc();
            }
        }
        for u in self.core.take_routing() {
            self.routing.update(u);
        }
        let joined = self.core.joined();
        self.joined_tx.send_if_modified(|j| {
            let changed = *j != joined;
            *j = joined;
            changed
        });
    }

    fn publish(&mut self, published: &mut Stats, records: &mut BTreeMap<&'static str, u64>) {
        self.core.prune(wall_ms());
        let stats = self.core.stats.clone();
        for (key, n) in &stats.packets {
            let before = published.packets.get(key).copied().unwrap_or(0);
            if *n > before {
                self.metrics
                    .packets
                    .with_label_values(&[key.0, key.1])
                    .inc_by(n - before);
            }
        }
        self.metrics
            .bytes
            .with_label_values(&["in"])
            .inc_by(stats.bytes_in.saturating_sub(published.bytes_in));
        self.metrics
            .bytes
            .with_label_values(&["out"])
            .inc_by(stats.bytes_out.saturating_sub(published.bytes_out));
        for (result, n) in &stats.checks {
            let before = published.checks.get(result).copied().unwrap_or(0);
            if *n > before {
                self.metrics
                    .checks
                    .with_label_values(&[result])
                    .inc_by(n - before);
            }
        }
        self.metrics
            .suspicions_shortened
            .inc_by(stats.shortened.saturating_sub(published.shortened));
        *published = stats;
        for (result, n) in self.core.record_counts() {
            let before = records.get(result).copied().unwrap_or(0);
            if n > before {
                self.metrics
                    .records
                    .with_label_values(&[result])
                    .inc_by(n - before);
            }
            records.insert(result, n);
        }
        for (state, n) in self.core.member_counts() {
            self.metrics
                .members
                .with_label_values(&[state])
                .set(n as i64);
        }
        let members = self.core.members_info();
        let live: BTreeSet<String> = members
            .iter()
            .filter(|m| m.state != "down")
            .map(|m| m.name.clone())
            .collect();
        self.sync.retain(|n| live.contains(n));
        self.sync.sweep();
        self.members_tx.send_replace(Arc::new(members));
    }

    /// Answers a sync request from a peer.
    fn serve_sync(&mut self, inc: Incoming) {
        let response = match inc.request {
            SyncRequest::Hello { hash, .. } => {
                if hash == self.core.digest_hash() {
                    SyncResponse::InSync
                } else {
                    SyncResponse::SendDigest
                }
            }
            SyncRequest::Digest {
                digest, members, ..
            } => {
                let (now, wall) = (self.started.elapsed(), wall_ms());
                self.core.learn_members(now, wall, members);
                let (snapshots, want) = self.core.compare(&digest);
                SyncResponse::Diff {
                    snapshots,
                    want,
                    members: self.core.live_members(),
                }
            }
            SyncRequest::Push { from, snapshots } => SyncResponse::Done {
                applied: self.core.apply_snapshots(&from, &snapshots),
            },
        };
        let _ = inc.reply.send(response);
    }

    /// Starts a state sync with a random live member, in its own task.
    fn start_sync(&mut self) {
        if let Some(peer) = self.core.sync_peer(fastrand::usize(..)) {
            self.sync_with_peer(peer);
        }
    }

    fn sync_with_peer(&mut self, peer: NodeId) {
        let from = self.core.identity().name.to_string();
        let hash = self.core.digest_hash();
        let client = self.sync.clone();
        let commands = self.command_tx.clone();
        tokio::spawn(async move {
            let result = match sync_with(&client, &peer, from, hash, &commands).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(peer = %peer.name, error = %e, "state sync failed");
                    "failed"
                }
            };
            let _ = commands.send(Command::SyncDone(result)).await;
        });
    }
}

/// One sync exchange, as the side that starts it.
async fn sync_with(
    client: &SyncClient,
    peer: &super::identity::NodeId,
    from: String,
    hash: u64,
    commands: &mpsc::Sender<Command>,
) -> anyhow::Result<&'static str> {
    let inbound = peer.inbound();
    let hello = SyncRequest::Hello {
        from: from.clone(),
        hash,
    };
    match client.send(&peer.name, inbound, &hello).await? {
        SyncResponse::InSync => return Ok("in-sync"),
        SyncResponse::SendDigest => {}
        other => anyhow::bail!("unexpected answer to hello: {other:?}"),
    }
    let (tx, rx) = oneshot::channel();
    commands.send(Command::Digest(tx)).await?;
    let (digest, members) = rx.await?;
    let request = SyncRequest::Digest {
        from: from.clone(),
        digest,
        members,
    };
    let (snapshots, want, members) = match client.send(&peer.name, inbound, &request).await? {
        SyncResponse::Diff {
            snapshots,
            want,
            members,
        } => (snapshots, want, members),
        other => anyhow::bail!("unexpected answer to digest: {other:?}"),
    };
    let (tx, rx) = oneshot::channel();
    commands
        .send(Command::Diff {
            peer: peer.name.to_string(),
            snapshots,
            want,
            members,
            reply: tx,
        })
        .await?;
    let push = rx.await?;
    if !push.is_empty() {
        client
            .send(
                &peer.name,
                inbound,
                &SyncRequest::Push {
                    from,
                    snapshots: push,
                },
            )
            .await?;
    }
    Ok("repaired")
}

/// Resolves the seeds now and then (DNS names may move) and hands the addresses to the driver.
pub async fn resolve_seeds(
    seeds: Vec<String>,
    profile: GossipProfile,
    commands: mpsc::Sender<Command>,
    joined: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut last: Vec<SocketAddr> = Vec::new();
    loop {
        let mut addrs = Vec::new();
        for s in &seeds {
            match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(s.as_str()))
                .await
            {
                Ok(Ok(found)) => addrs.extend(found),
                Ok(Err(e)) => tracing::debug!(seed = %s, error = %e, "cannot resolve gossip seed"),
                Err(_) => tracing::debug!(seed = %s, "resolving gossip seed timed out"),
            }
        }
        addrs.sort();
        addrs.dedup();
        if addrs != last || !*joined.borrow() {
            last = addrs.clone();
            if commands.send(Command::Seeds(addrs)).await.is_err() {
                return;
            }
        }
        let wait = if *joined.borrow() {
            reannounce_interval(profile)
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
