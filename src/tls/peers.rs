//! TLS toward and from peer agents at run time: the client configs per expected node, the acceptor, and the
//! accounting of failed handshakes (a metric per reason; a log line at most once per peer address a minute).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::material::Material;
use super::verify::{describe, reason};

/// How often one peer address may be logged for failed handshakes.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// This host's TLS, shared by the inbound listener and the upstream pools.
pub struct PeerTls {
    pub material: Arc<Material>,
    acceptor: tokio_rustls::TlsAcceptor,
    clients: Mutex<HashMap<Arc<str>, tokio_rustls::TlsConnector>>,
    errors: prometheus::IntCounterVec,
    logged: Mutex<HashMap<IpAddr, Instant>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("id", &self.material.id)
            .finish()
    }
}

impl PeerTls {
    pub fn new(material: Material, errors: prometheus::IntCounterVec) -> Result<Self, String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(material.server_config()?);
        Ok(PeerTls {
            material: Arc::new(material),
            acceptor,
            clients: Mutex::default(),
            errors,
            logged: Mutex::default(),
        })
    }

    /// The accepting side: the handshake, then the peer's node name.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, String)> {
        match self.acceptor.accept(tcp).await {
            Ok(tls) => {
                let node = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| super::verify::peer_node(c, &self.material.id.trust_domain))
                    .map(|id| id.node);
                match node {
                    Some(n) => Some((tls, n)),
                    // The verifier passed it, so this cannot happen; refuse rather than serve an unknown peer.
                    None => {
                        self.failed(
                            "inbound",
                            "bad-identity",
                            peer,
                            "no node identity after the handshake",
                        );
                        None
                    }
                }
            }
            Err(e) => {
                let (why, text) = classify(&e);
                self.failed("inbound", why, peer, &text);
                None
            }
        }
    }

    /// Counts a handshake that did not complete in time.
    pub fn timed_out(&self, direction: &str, peer: SocketAddr) {
        self.failed(
            direction,
            "handshake-timeout",
            peer,
            "the TLS handshake did not finish in time",
        );
    }

    /// The connecting side toward `node` at `addr`: the server must prove it is that node.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        node: &Arc<str>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let connector = self.connector(node)?;
        // Names play no part in verification (the node identity does); this one is only the SNI sent.
        let name = ServerName::try_from("meshd.invalid").map_err(|e| e.to_string())?;
        connector.connect(name, tcp).await.map_err(|e| {
            let (why, text) = classify(&e);
            self.failed("outbound", why, addr, &text);
            format!("TLS with node {node:?} at {addr}: {text}")
        })
    }

    fn connector(&self, node: &Arc<str>) -> Result<tokio_rustls::TlsConnector, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(node) {
            return Ok(c.clone());
        }
        let c = tokio_rustls::TlsConnector::from(self.material.client_config(node)?);
        clients.insert(node.clone(), c.clone());
        Ok(c)
    }

    fn failed(&self, direction: &str, why: &str, peer: SocketAddr, text: &str) {
        self.errors.with_label_values(&[direction, why]).inc();
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() > 4096 {
            logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        }
        let due = logged
            .get(&peer.ip())
            .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY);
        if due {
            logged.insert(peer.ip(), now);
            tracing::warn!(direction, %peer, reason = why, "TLS handshake with a peer failed: {text}");
        }
    }
}

/// The reason label and a readable account of a failed handshake's I/O error.
fn classify(e: &std::io::Error) -> (&'static str, String) {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => (reason(t), describe(t)),
        None => ("protocol", e.to_string()),
    }
}
