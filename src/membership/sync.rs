//! Push/pull state sync over the inbound port (HTTP/2, mutual TLS): repairs whatever gossip missed.
//!
//! Now and then — and right after joining — an agent picks a random live member and compares digests (each
//! host's generation and complete version). Agreeing agents exchange one hash and stop. Otherwise the digests
//! are exchanged and each side sends the other the host snapshots it lacks:
//!
//! 1. `Hello { hash }` → `InSync`, or `SendDigest`;
//! 2. `Digest { digest }` → `Diff { snapshots it lacks… for us, nodes it wants }`;
//! 3. `Push { snapshots }` → `Done`.
//!
//! The driver owns all state; this module only carries messages. Each request names its sender, which must be
//! the node the peer's certificate proves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::identity::NodeId;
use super::records::{DigestEntry, NodeSnapshot};
use crate::proxy::pool::{Pool, PoolKey, SendOpts, Upstreams, Wire};

/// The path on the inbound port.
pub const SYNC_PATH: &str = "/.meshd/v1/sync";
/// Most snapshots one message carries.
pub const MAX_SNAPSHOTS: usize = 4096;
/// Largest sync body either way.
pub const MAX_SYNC_BODY: usize = 16 << 20;
/// A sync that takes longer than this is abandoned.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    Hello {
        from: String,
        hash: u64,
    },
    Digest {
        from: String,
        digest: Vec<DigestEntry>,
        /// The live members the sender knows (itself included), so a newcomer learns the whole cluster at once.
        members: Vec<NodeId>,
    },
    Push {
        from: String,
        snapshots: Vec<NodeSnapshot>,
    },
}

impl SyncRequest {
    pub fn from(&self) -> &str {
        match self {
            SyncRequest::Hello { from, .. }
            | SyncRequest::Digest { from, .. }
            | SyncRequest::Push { from, .. } => from,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    InSync,
    SendDigest,
    Diff {
        snapshots: Vec<NodeSnapshot>,
        want: Vec<String>,
        members: Vec<NodeId>,
    },
    Done {
        applied: usize,
    },
}

/// A sync request for the driver, from the inbound listener.
pub struct Incoming {
    pub request: SyncRequest,
    pub reply: oneshot::Sender<SyncResponse>,
}

/// What the inbound listener holds to pass sync requests to the membership driver.
#[derive(Clone, Debug)]
pub struct SyncServer {
    pub(super) tx: mpsc::Sender<Incoming>,
    /// Syncs served at once; more are answered 503 (the peer tries another member next time).
    pub(super) permits: Arc<tokio::sync::Semaphore>,
}

/// Sync requests handled at once.
pub const MAX_CONCURRENT_SYNCS: usize = 4;

/// Why a sync request was refused.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub detail: String,
}

impl SyncServer {
    /// Handles one sync request from `peer` (the node its certificate proved; `None` over plaintext).
    pub async fn handle(&self, peer: Option<&str>, body: Bytes) -> Result<Bytes, Refused> {
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            return Err(Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                detail: "too many state syncs at once".into(),
            });
        };
        let request: SyncRequest = postcard::from_bytes(&body).map_err(|_| Refused {
            status: StatusCode::BAD_REQUEST,
            detail: "undecodable sync request".into(),
        })?;
        if let Some(peer) = peer
            && peer != request.from()
        {
            return Err(Refused {
                status: StatusCode::FORBIDDEN,
                detail: format!(
                    "sync request names {:?} but the certificate is {peer:?}",
                    request.from()
                ),
            });
        }
        let (reply, rx) = oneshot::channel();
        let unavailable = || Refused {
            status: StatusCode::SERVICE_UNAVAILABLE,
            detail: "membership is shutting down".into(),
        };
        self.tx
            .send(Incoming { request, reply })
            .await
            .map_err(|_| unavailable())?;
        let response = rx.await.map_err(|_| unavailable())?;
        Ok(Bytes::from(
            postcard::to_allocvec(&response).unwrap_or_default(),
        ))
    }
}

/// The client side: one exchange with a peer's inbound listener.
pub struct SyncClient {
    upstreams: Upstreams,
    pools: std::sync::Mutex<std::collections::HashMap<(String, SocketAddr), Arc<Pool>>>,
}

impl SyncClient {
    pub fn new(upstreams: Upstreams) -> SyncClient {
        SyncClient {
            upstreams,
            pools: Default::default(),
        }
    }

    fn pool(&self, node: &str, inbound: SocketAddr) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry((node.to_string(), inbound))
            .or_insert_with(|| {
                Arc::new(Pool::new(PoolKey {
                    addr: inbound,
                    wire: Wire::H2,
                    identity: Some(Arc::from(node)),
                }))
            })
            .clone()
    }

    /// Forgets connections to nodes that are no longer members.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|(n, _), _| keep(n));
    }

    /// Closes idle connections.
    pub fn sweep(&self) {
        let now = std::time::Instant::now();
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for p in pools.values() {
            p.sweep(now);
        }
    }

    /// Sends one request to `node` at `inbound` and returns its answer.
    pub async fn send(
        &self,
        node: &str,
        inbound: SocketAddr,
        request: &SyncRequest,
    ) -> anyhow::Result<SyncResponse> {
        let pool = self.pool(node, inbound);
        let body = postcard::to_allocvec(request)?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{inbound}{SYNC_PATH}"))
            .version(Version::HTTP_2)
            .header(http::header::CONTENT_TYPE, "application/x-meshd-sync")
            .body(Either::Right(Full::new(Bytes::from(body))))?;
        let opts = SendOpts {
            connect_timeout: Duration::from_secs(3),
            fresh: false,
        };
        let exchange = async {
            let (resp, lease) = pool
                .send(&self.upstreams, req, opts)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.detail))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_SYNC_BODY)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the sync response: {e}"))?
                .to_bytes();
            drop(lease);
            if status != StatusCode::OK {
                anyhow::bail!(
                    "{node} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                );
            }
            Ok::<_, anyhow::Error>(postcard::from_bytes(&body)?)
        };
        tokio::time::timeout(SYNC_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {node} within {SYNC_TIMEOUT:?}"))?
    }
}
