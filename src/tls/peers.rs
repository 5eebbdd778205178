//! TLS toward and from peer agents at run time: the client configs per expected node, the acceptor, the
//! material in use (replaced on reload), and the accounting of handshakes (completed ones by kind, failed ones
//! by reason with a log line at most once per peer address a minute).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::Files;
use super::material::Material;
use super::verify::{describe, reason};
use crate::telemetry::metrics::TlsMetrics;

/// How often one peer address may be logged for failed handshakes.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// This host's TLS, shared by the inbound listener and the upstream pools. The material in use can be replaced
/// while connections are open ([`PeerTls::replace`]): new handshakes use the new one, established connections
/// carry on.
pub struct PeerTls {
    active: RwLock<Arc<Active>>,
    /// Held by whoever reads, checks and installs new files, so two reloads never interleave.
    reloads: Mutex<()>,
    metrics: TlsMetrics,
    logged: Mutex<HashMap<IpAddr, Instant>>,
}

/// One generation of material and what is built from it. Each generation has its own session caches, so a
/// session from before a reload is never resumed after it (a removed root cannot live on in a ticket).
struct Active {
    material: Arc<Material>,
    /// The file bytes it came from (`None`: made in memory, `meshd dev`).
    files: Option<Files>,
    acceptor: tokio_rustls::TlsAcceptor,
    clients: Mutex<HashMap<Arc<str>, tokio_rustls::TlsConnector>>,
}

impl Active {
    fn new(material: Material, files: Option<Files>) -> Result<Active, String> {
        Ok(Active {
            acceptor: tokio_rustls::TlsAcceptor::from(material.server_config()?),
            material: Arc::new(material),
            files,
            clients: Mutex::default(),
        })
    }
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("id", &self.material().id)
            .finish()
    }
}

impl PeerTls {
    pub fn new(
        material: Material,
        files: Option<Files>,
        metrics: TlsMetrics,
    ) -> Result<Self, String> {
        let tls = PeerTls {
            active: RwLock::new(Arc::new(Active::new(material, files)?)),
            reloads: Mutex::new(()),
            metrics,
            logged: Mutex::default(),
        };
        tls.publish_expiry();
        Ok(tls)
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The material new handshakes use.
    pub fn material(&self) -> Arc<Material> {
        self.active().material.clone()
    }

    /// Whether `files` are the bytes the running material came from.
    pub fn is_running(&self, files: &Files) -> bool {
        self.active().files.as_ref() == Some(files)
    }

    /// Puts `material` in use for every handshake from now on.
    pub fn replace(&self, material: Material, files: Files) -> Result<(), String> {
        let next = Arc::new(Active::new(material, Some(files))?);
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = next;
        self.publish_expiry();
        Ok(())
    }

    /// Serialises reloads: the file watcher and SIGHUP / `POST /v1/reload` hold it from reading the files to
    /// installing them (and the latter until the new config naming them is published).
    pub fn reload_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refused reload.
    pub fn reload_failed(&self) {
        self.metrics.reload_failures.inc();
    }

    fn publish_expiry(&self) {
        let m = self.material();
        // One series: the identity cannot change while the agent runs.
        self.metrics
            .cert_expiry
            .with_label_values(&[&m.id.uri()])
            .set(m.not_after as f64);
    }

    /// The accepting side: the handshake, then the peer's node name.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, String)> {
        let active = self.active();
        match active.acceptor.accept(tcp).await {
            Ok(tls) => {
                let node = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| super::verify::peer_node(c, &active.material.id.trust_domain))
                    .map(|id| id.node);
                match node {
                    Some(n) => {
                        self.completed("inbound", tls.get_ref().1.handshake_kind());
                        Some((tls, n))
                    }
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
        match connector.connect(name, tcp).await {
            Ok(tls) => {
                self.completed("outbound", tls.get_ref().1.handshake_kind());
                Ok(tls)
            }
            Err(e) => {
                let (why, text) = classify(&e);
                self.failed("outbound", why, addr, &text);
                Err(format!("TLS with node {node:?} at {addr}: {text}"))
            }
        }
    }

    /// The client config toward `node`, kept per node so its session cache lets later connections resume.
    fn connector(&self, node: &Arc<str>) -> Result<tokio_rustls::TlsConnector, String> {
        let active = self.active();
        let mut clients = active.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(node) {
            return Ok(c.clone());
        }
        let c = tokio_rustls::TlsConnector::from(active.material.client_config(node)?);
        // Nodes come from the routing table; a departed node's entry goes with the next reload.
        clients.insert(node.clone(), c.clone());
        Ok(c)
    }

    /// Counts a completed handshake. Outbound, "completed" is the client's view: with TLS 1.3 the server
    /// checks the client certificate after that, and a refusal shows up as the connection's first error (and in
    /// the server's `meshd_tls_handshake_errors_total`).
    fn completed(&self, direction: &str, kind: Option<rustls::HandshakeKind>) {
        let kind = match kind {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.metrics
            .handshakes
            .with_label_values(&[direction, kind])
            .inc();
    }

    fn failed(&self, direction: &str, why: &str, peer: SocketAddr, text: &str) {
        self.metrics
            .handshake_errors
            .with_label_values(&[direction, why])
            .inc();
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
