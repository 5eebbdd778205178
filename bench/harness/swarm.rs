//! Gossip members for the memory figure "with 1,000 gossip members": meshd's own membership core
//! (`meshd::membership::core::Core`: foca with meshd's codec, sealed datagrams and endpoint records), one per
//! member, each on its own UDP socket on 127.0.0.1, all in this process. Each member publishes 4 services of 5
//! endpoints, like a real host, and joins through the meshd under test. The endpoints reach meshd by state sync
//! only: once joined, each member pushes its host snapshot (`Push` on the inbound port, h2c, as a peer agent
//! does when it repairs what gossip missed). They are not gossiped: every member would then store and relay
//! every other member's records, a thousand routing tables in this one process. The members do not serve
//! state sync themselves: a sync meshd asks of them finds nothing listening and fails, which meshd handles as
//! with any unreachable peer.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshd::config::{GossipProfile, Protocol};
use meshd::membership::core::{Core, foca_config};
use meshd::membership::identity::NodeId;
use meshd::membership::keyring::Keyring;
use meshd::membership::records::{NodeSnapshot, WireEndpoint};
use meshd::membership::seal::Cluster;
use meshd::membership::sync::{SYNC_PATH, SyncRequest};
use meshd::routing::EndpointSpec;
use rand::SeedableRng;
use tokio::net::UdpSocket;

/// Services each member publishes, with 5 endpoints each.
pub const SERVICES: usize = 4;
/// Endpoints of each service.
pub const ENDPOINTS: usize = 5;

/// A running swarm; dropping it stops every member.
pub struct Swarm {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts `n` members that join through `seed` (the meshd under test), with the keyring at `keys`.
pub fn start(
    n: usize,
    seed: SocketAddr,
    inbound: SocketAddr,
    keys: &Path,
) -> Result<Swarm, String> {
    let keyring = Keyring::read(keys).map_err(|e| e.join("; "))?;
    // One worker thread runs every member (the harness runs on the load cores).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let generation = wall_ms();
    let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
    // The pushes have their own thread: among a thousand busy member tasks they would wait their turn.
    let push_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("swarm-sync".into())
        .spawn(move || push_rt.block_on(pusher(inbound, push_rx)))
        .map_err(|e| e.to_string())?;
    for i in 0..n {
        let keyring = keyring.clone();
        let socket = runtime
            .block_on(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
            .map_err(|e| format!("gossip member {i}: {e}"))?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let id = NodeId {
            name: Arc::from(format!("swarm-{i}").as_str()),
            addr,
            // Nothing listens there (it is this member's UDP port): a state sync is refused at once.
            inbound_port: addr.port(),
            generation,
        };
        let core = Core::new(
            id,
            // The slower timing keeps a thousand members within one core; meshd keeps its own (`lan`).
            foca_config(GossipProfile::Wan, 100),
            rand::rngs::StdRng::seed_from_u64(i as u64),
            keyring,
            Cluster::new("default"),
        );
        // Joins spread over n/50 seconds (20 s for 1,000), as hosts of a cluster start.
        let delay = Duration::from_millis(fastrand::u64(0..=(n as u64 * 20)));
        runtime.spawn(member(core, socket, seed, local(i), push_tx.clone(), delay));
    }
    Ok(Swarm {
        runtime: Some(runtime),
    })
}

/// Member `i`'s endpoints: 4 services of 5 endpoints on addresses nobody connects to (no request is routed to
/// them).
fn local(i: usize) -> BTreeMap<String, Vec<EndpointSpec>> {
    let mut out = BTreeMap::new();
    for s in 0..SERVICES {
        let name = format!("svc-{s}");
        let eps = (0..ENDPOINTS)
            .map(|e| EndpointSpec {
                service: name.clone(),
                addr: SocketAddr::from((
                    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1),
                    10_000 + e as u16,
                )),
                protocol: Protocol::Http,
                weight: 100,
            })
            .collect();
        out.insert(name, eps);
    }
    out
}

async fn member(
    mut core: Core,
    socket: UdpSocket,
    seed: SocketAddr,
    local: BTreeMap<String, Vec<EndpointSpec>>,
    push: tokio::sync::mpsc::UnboundedSender<SyncRequest>,
    delay: Duration,
) {
    tokio::time::sleep(delay).await;
    let name = core.identity().name.to_string();
    let generation = core.identity().generation;
    // When to push the snapshot, after joining: meshd may not have taken the member in yet the first time (a
    // snapshot of an unknown host is dropped), so three times, as meshd syncs three times after joining.
    let mut pushes = vec![
        Duration::from_secs(15),
        Duration::from_secs(5),
        Duration::from_secs(1),
    ];
    let mut joined_at: Option<Instant> = None;
    let start = Instant::now();
    let now = || start.elapsed();
    let mut buf = vec![0u8; 65_536];
    let mut announced: Option<Instant> = None;
    loop {
        // Announce to the seed until it knows us (every second), as meshd does with its seeds.
        if !core.knows_addr(seed) && announced.is_none_or(|a| a.elapsed() > Duration::from_secs(1))
        {
            core.announce(now(), wall_ms(), seed);
            announced = Some(Instant::now());
        }
        if joined_at.is_none() && core.knows_addr(seed) {
            joined_at = Some(Instant::now());
        }
        if let (Some(at), Some(next)) = (joined_at, pushes.last())
            && at.elapsed() >= *next
        {
            pushes.pop();
            let snapshots = vec![snapshot(&name, generation, &local)];
            let _ = push.send(SyncRequest::Push {
                from: name.clone(),
                snapshots,
            });
        }
        for (dst, data) in core.take_outbox() {
            let _ = socket.send_to(&data, dst).await;
        }
        // Routing changes and sync requests are not needed here: drop them so they do not pile up.
        let _ = core.take_routing();
        let _ = core.take_sync_due(now());
        let _ = core.take_repair_target(now());
        let wake = core
            .next_timer()
            .map_or(Duration::from_secs(1), |t| t.saturating_sub(now()))
            .min(Duration::from_secs(1));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, _)) = r {
                    core.handle_datagram(now(), wall_ms(), &buf[..n]);
                }
            }
            _ = tokio::time::sleep(wake) => core.handle_timers(now(), wall_ms()),
        }
    }
}

/// Sends the members' snapshots to meshd's inbound port one at a time over one h2c connection (meshd serves a
/// few syncs at once and answers 503 beyond: those are sent again).
async fn pusher(
    inbound: SocketAddr,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<SyncRequest>,
) {
    let mut sender = None;
    while let Some(request) = pushes.recv().await {
        let Ok(body) = postcard::to_allocvec(&request) else {
            continue;
        };
        for _ in 0..50 {
            if sender.is_none() {
                sender = connect(inbound).await;
            }
            let Some(s) = sender.as_mut() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let req = http::Request::post(format!("http://{inbound}{SYNC_PATH}"))
                .header(http::header::CONTENT_TYPE, "application/x-meshd-sync")
                .body(Full::new(Bytes::from(body.clone())));
            let Ok(req) = req else { break };
            match s.send_request(req).await {
                Ok(resp) if resp.status() == http::StatusCode::OK => {
                    let _ = resp.into_body().collect().await;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => sender = None,
            }
        }
    }
}

async fn connect(
    inbound: SocketAddr,
) -> Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(inbound).await.ok()?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// The member's whole endpoint set as one state-sync snapshot (version 1: it never changes).
fn snapshot(
    name: &str,
    generation: u64,
    local: &BTreeMap<String, Vec<EndpointSpec>>,
) -> NodeSnapshot {
    NodeSnapshot {
        node: name.to_string(),
        generation,
        version: 1,
        services: local
            .iter()
            .map(|(service, specs)| {
                (
                    service.clone(),
                    1,
                    specs.iter().map(WireEndpoint::from_spec).collect(),
                )
            })
            .collect(),
    }
}
