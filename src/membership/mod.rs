//! Membership: SWIM gossip (foca) over encrypted UDP, this host's endpoint records disseminated through foca's
//! custom broadcasts, and a periodic push/pull state sync over the inbound port. It owns the set of remote
//! endpoints and feeds them to the routing table; it does no HTTP routing.
//!
//! - [`identity`]: who a member is (name, addresses, generation) and the codec that checks identities;
//! - [`seal`], [`keyring`]: every datagram sealed with XChaCha20-Poly1305 under the cluster's keyring;
//! - [`records`]: versioned per-service endpoint records and their validation;
//! - [`core`]: the I/O-free state machine (foca + timers + records), shared with the simulator;
//! - [`driver`]: the task that feeds the core from a UDP socket and the agent;
//! - [`sync`]: push/pull state sync over HTTP/2 with mutual TLS.

pub mod core;
pub mod driver;
pub mod identity;
pub mod keyring;
pub mod records;
pub mod seal;
pub mod suspicion;
pub mod sync;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::SeedableRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::core::{Core, MemberInfo};
use self::driver::{Command, Driver};
use self::identity::NodeId;
use self::keyring::Keyring;
use self::seal::Cluster;
use self::sync::{SyncClient, SyncServer};
use crate::config::{Config, GossipConfig};
use crate::proxy::pool::Upstreams;
use crate::readiness::ReadyToken;
use crate::routing::{EndpointSpec, RoutingHandle};
use crate::telemetry::metrics::GossipMetrics;

/// Cluster size foca's timing presets are computed for (they scale with log N).
const EXPECTED_CLUSTER_SIZE: u32 = 100;

/// The gossip socket, bound, with everything needed to start.
pub struct Bound {
    socket: UdpSocket,
    config: GossipConfig,
    id: NodeId,
    keyring: Keyring,
    cluster: String,
}

/// The address peers reach this agent at: `node.advertise_addr` (an IP, or this host's address on a subnet),
/// else the gossip listener's own IP, else the
/// local address the kernel would use toward the first seed that resolves (an IP, or a DNS name such as a
/// compose service), else the address of the default route. Connecting a UDP socket sends nothing.
async fn own_ip(config: &Config, gossip: &GossipConfig) -> anyhow::Result<IpAddr> {
    if let Some(ip) = config.node.advertise_addr {
        return Ok(ip);
    }
    let toward = |addr: SocketAddr| -> Option<IpAddr> {
        let any = if addr.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        };
        let s = std::net::UdpSocket::bind((any, 0)).ok()?;
        s.connect(addr).ok()?;
        let local = s.local_addr().ok()?.ip();
        (!local.is_unspecified()).then_some(local)
    };
    if let Some(net) = config.node.advertise_subnet {
        // The kernel's choice of source address toward the subnet is this host's address on it.
        return match toward(SocketAddr::new(net.probe(), 4145)) {
            Some(ip) if net.contains(ip) => Ok(ip),
            found => anyhow::bail!(
                "node.advertise_addr = \"{net}\": this host has no address on {net} (the route toward it leaves \
                 from {}); attach the agent to that network or set advertise_addr to an IP address",
                found.map_or_else(|| "nowhere".to_string(), |ip| ip.to_string())
            ),
        };
    }
    if !gossip.listen.ip().is_unspecified() {
        return Ok(gossip.listen.ip());
    }
    for seed in &gossip.seeds {
        let found: Vec<SocketAddr> = match seed.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => match tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::lookup_host(seed.as_str()),
            )
            .await
            {
                Ok(Ok(addrs)) => addrs.collect(),
                _ => Vec::new(),
            },
        };
        if let Some(ip) = found.into_iter().find_map(toward) {
            return Ok(ip);
        }
    }
    // No seed resolves (they may not exist yet): the interface of the default route.
    let probe = SocketAddr::from(([192, 0, 2, 1], 4145));
    if let Some(ip) = toward(probe) {
        tracing::info!(
            %ip,
            "node.advertise_addr is not set and no gossip seed resolves: advertising the default route's address"
        );
        return Ok(ip);
    }
    anyhow::bail!(
        "node.advertise_addr: gossip listens on {}, no seed resolves and there is no default route to find the \
         local address by: set node.advertise_addr to the address other hosts reach this one at",
        gossip.listen
    )
}

/// Reads the keyring and binds the gossip socket (`None` without `[gossip]`).
pub async fn bind(config: &Config, inbound: SocketAddr) -> anyhow::Result<Option<Bound>> {
    let Some(g) = &config.gossip else {
        return Ok(None);
    };
    let keyring = read_keyring(&g.keyring)
        .map_err(|problems| anyhow::anyhow!("gossip.keyring: {}", problems.join("; ")))?;
    let socket = UdpSocket::bind(g.listen)
        .await
        .with_context(|| format!("gossip.listen: cannot listen on {}", g.listen))?;
    let ip = own_ip(config, g).await?;
    let port = socket.local_addr()?.port();
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let id = NodeId {
        name: Arc::from(config.node.name.as_str()),
        addr: SocketAddr::new(ip, port),
        inbound_port: inbound.port(),
        generation,
    };
    Ok(Some(Bound {
        socket,
        config: g.clone(),
        id,
        keyring,
        cluster: config.node.cluster.clone(),
    }))
}

/// Reads a keyring file, warning when others may read it.
pub fn read_keyring(path: &std::path::Path) -> Result<Keyring, Vec<String>> {
    let k = Keyring::read(path)?;
    if let Some(warning) = Keyring::check_permissions(path) {
        tracing::warn!("gossip.keyring: {warning}");
    }
    Ok(k)
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.listen)
    }

    pub fn identity(&self) -> &NodeId {
        &self.id
    }

    /// Starts the membership task. `ready` is given back once joined (or at once without seeds, or after
    /// `gossip.join_timeout`).
    pub fn start(
        self,
        routing: RoutingHandle,
        local: watch::Receiver<Arc<BTreeMap<String, Vec<EndpointSpec>>>>,
        upstreams: Upstreams,
        metrics: GossipMetrics,
        ready: ReadyToken,
        shutdown: CancellationToken,
    ) -> (Membership, JoinHandle<()>) {
        let Bound {
            socket,
            config,
            id,
            keyring,
            cluster,
        } = self;
        tracing::info!(node = %id.name, addr = %id.addr, inbound = %id.inbound(), keys = ?keyring.ids(), "gossip listening");
        let core = Core::new(
            id.clone(),
            core::foca_config(config.profile, EXPECTED_CLUSTER_SIZE),
            rand::rngs::StdRng::from_rng(&mut rand::rng()),
            keyring,
            Cluster::new(&cluster),
        );
        let (command_tx, commands) = mpsc::channel(64);
        let (sync_tx, sync_in) = mpsc::channel(64);
        let (members_tx, members) = watch::channel(Arc::new(Vec::new()));
        let (joined_tx, joined) = watch::channel(false);
        let socket = Arc::new(socket);
        let resolver = tokio::spawn(driver::resolve_seeds(
            config.seeds.clone(),
            config.profile,
            command_tx.clone(),
            joined.clone(),
            shutdown.clone(),
        ));
        let driver = Driver {
            core,
            socket,
            profile: config.profile,
            commands,
            command_tx: command_tx.clone(),
            sync_in,
            local,
            routing,
            members_tx,
            joined_tx,
            metrics: metrics.clone(),
            sync: Arc::new(SyncClient::new(upstreams)),
            has_seeds: !config.seeds.is_empty(),
            ready: Some(ready),
            join_timeout: config.join_timeout,
            started: std::time::Instant::now(),
            seeds: Vec::new(),
            last_seed_announce: None,
        };
        let task = tokio::spawn(async move {
            driver.run(shutdown).await;
            resolver.abort();
        });
        (
            Membership {
                commands: command_tx,
                members,
                joined,
                sync: SyncServer {
                    tx: sync_tx,
                    permits: Arc::new(tokio::sync::Semaphore::new(sync::MAX_CONCURRENT_SYNCS)),
                },
                keyring_path: config.keyring.clone(),
                has_seeds: !config.seeds.is_empty(),
                metrics,
                id,
            },
            task,
        )
    }
}

/// What the rest of the agent holds of membership.
#[derive(Clone, Debug)]
pub struct Membership {
    commands: mpsc::Sender<Command>,
    members: watch::Receiver<Arc<Vec<MemberInfo>>>,
    joined: watch::Receiver<bool>,
    /// For the inbound listener: state-sync requests from peers.
    pub sync: SyncServer,
    keyring_path: PathBuf,
    has_seeds: bool,
    metrics: GossipMetrics,
    id: NodeId,
}

impl std::fmt::Debug for GossipMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipMetrics")
    }
}

impl Membership {
    /// Members as last published (once a second).
    pub fn members(&self) -> Arc<Vec<MemberInfo>> {
        self.members.borrow().clone()
    }

    pub fn identity(&self) -> &NodeId {
        &self.id
    }

    /// Joined, or nothing to join.
    pub fn joined(&self) -> bool {
        !self.has_seeds || *self.joined.borrow()
    }

    /// Resolves once [`Membership::joined`] is true (never, if the gossip task ends first).
    pub async fn wait_joined(&self) {
        if !self.has_seeds {
            return;
        }
        let mut joined = self.joined.clone();
        if joined.wait_for(|j| *j).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Leaves the cluster; returns once the leave is sent (or after `timeout`).
    pub async fn leave(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        let _ = tokio::time::timeout(timeout, async {
            if self.commands.send(Command::Leave(tx)).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }

    /// Whether the gossip task answers a command within `timeout` (the systemd watchdog's probe).
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(timeout, async {
            self.commands.send(Command::Ping(tx)).await.is_ok() && rx.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Re-reads the keyring file (SIGHUP, `POST /v1/reload`); the running keys stay if it is refused.
    pub async fn reload_keyring(&self) -> Result<(), Vec<String>> {
        match read_keyring(&self.keyring_path) {
            Ok(k) => {
                let _ = self.commands.send(Command::Keyring(k)).await;
                Ok(())
            }
            Err(problems) => {
                self.metrics.keyring_reload_failures.inc();
                Err(problems)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn advertised(addr: &str) -> anyhow::Result<IpAddr> {
        let config = Config::from_toml(&format!(
            "[node]\nadvertise_addr = \"{addr}\"\n[gossip]\nkeyring = \"/nonexistent\"\n"
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let gossip = config
            .gossip
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no gossip"))?;
        own_ip(&config, &gossip).await
    }

    #[tokio::test]
    async fn a_subnet_advertises_this_hosts_address_on_it() {
        assert_eq!(
            advertised("127.0.0.0/8").await.unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
        // TEST-NET-3 is on no interface here: the error names the subnet instead of advertising another address.
        let err = advertised("203.0.113.0/24").await.unwrap_err().to_string();
        assert!(err.contains("no address on 203.0.113.0/24"), "{err}");
    }
}
