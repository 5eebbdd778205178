//! A host's TLS material — the CA bundle, its certificate chain and key — checked as a whole when loaded, and
//! the rustls configurations built from it.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::identity::{NodeId, TrustDomain, node_of};
use super::verify::{NodeClientVerifier, NodeServerVerifier, describe};

/// The one crypto provider meshd uses (ring: it builds into a static executable).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host certificate's remaining lifetime below which meshd warns, at start and daily.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// ALPN: agents speak HTTP/2 to each other.
const ALPN_H2: &[u8] = b"h2";

/// Which of the three inputs a problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Ca,
    Cert,
    Key,
}

/// Where each PEM came from, for messages.
pub struct Sources<'a> {
    pub ca: &'a str,
    pub cert: &'a str,
    pub key: &'a str,
}

/// Verified material for one node.
#[derive(Debug)]
pub struct Material {
    pub id: NodeId,
    pub roots: Arc<RootCertStore>,
    pub key: Arc<CertifiedKey>,
    /// The host certificate's subject, issuer and expiry (seconds since the epoch).
    pub subject: String,
    pub issuer: String,
    pub not_after: i64,
    /// The subjects of the CA certificates this host trusts, in bundle order.
    pub anchors: Vec<String>,
}

impl Material {
    /// Parses and checks everything, listing every problem found: the bundle, the chain (host certificate
    /// first), the key (type, and that it matches), the identity (this node of this trust domain) and that the
    /// certificate chains to the bundle now.
    pub fn from_pem(
        td: &TrustDomain,
        node: &str,
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        src: &Sources<'_>,
    ) -> Result<Material, Vec<(Part, String)>> {
        let provider = provider();
        let mut problems = Vec::new();

        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        match CertificateDer::pem_slice_iter(ca).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if certs.is_empty() => problems.push((
                Part::Ca,
                format!("{}: no certificate in the CA bundle", src.ca),
            )),
            Ok(certs) => {
                for (i, c) in certs.into_iter().enumerate() {
                    // A trust anchor is trusted as is: only a mesh CA of this trust domain may be one (a host
                    // certificate pasted here could otherwise mint any node's identity).
                    let added = check_anchor(&c, td).and_then(|subject| {
                        roots.add(c).map(|()| subject).map_err(|e| e.to_string())
                    });
                    match added {
                        Ok(subject) => anchors.push(subject),
                        Err(e) => problems
                            .push((Part::Ca, format!("{}: certificate {}: {e}", src.ca, i + 1))),
                    }
                }
            }
            Err(e) => problems.push((Part::Ca, format!("{}: not PEM certificates ({e})", src.ca))),
        }

        let chain = match CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>() {
            Ok(c) if c.is_empty() => {
                problems.push((Part::Cert, format!("{}: no certificate", src.cert)));
                None
            }
            Ok(c) => Some(c),
            Err(e) => {
                problems.push((
                    Part::Cert,
                    format!("{}: not PEM certificates ({e})", src.cert),
                ));
                None
            }
        };
        let mut facts = None;
        if let Some(chain) = &chain {
            match x509_parser::parse_x509_certificate(&chain[0]) {
                Ok((_, leaf)) if leaf.is_ca() => problems.push((Part::Cert, format!(
                    "{}: the first certificate is a CA; the host certificate must come first (chain in the wrong order?)",
                    src.cert
                ))),
                Ok((_, leaf)) => {
                    match node_of(&leaf, td) {
                        Ok(id) if id.node == node => {}
                        Ok(id) => problems.push((Part::Cert, format!(
                            "{}: the certificate is for node {:?}, but this node is {node:?} ([node] name)",
                            src.cert, id.node
                        ))),
                        Err(e) => problems.push((Part::Cert, format!("{}: {e}", src.cert))),
                    }
                    facts = Some((
                        leaf.subject().to_string(),
                        leaf.issuer().to_string(),
                        leaf.validity().not_after.timestamp(),
                    ));
                }
                Err(e) => problems.push((Part::Cert, format!("{}: not an X.509 certificate ({e})", src.cert))),
            }
        }

        let signing_key = match PrivateKeyDer::from_pem_slice(key) {
            Ok(k) => match provider.key_provider.load_private_key(k) {
                Ok(k) => Some(k),
                Err(e) => {
                    problems.push((Part::Key, format!(
                        "{}: a private key of a type meshd cannot use ({e}); use ECDSA P-256/P-384, Ed25519 or RSA",
                        src.key
                    )));
                    None
                }
            },
            Err(e) => {
                problems.push((
                    Part::Key,
                    format!("{}: not a PEM private key ({e})", src.key),
                ));
                None
            }
        };

        let (Some(chain), Some(signing_key), Some((subject, issuer, not_after))) =
            (chain, signing_key, facts)
        else {
            return Err(problems);
        };
        let certified = CertifiedKey::new(chain, signing_key);
        if certified.keys_match().is_err() {
            problems.push((
                Part::Key,
                format!("{} does not match {}", src.key, src.cert),
            ));
        }
        let roots = Arc::new(roots);
        if !roots.is_empty() {
            // The chain as a peer will check it (client authentication; the server side checks the same).
            let check = NodeClientVerifier::new(roots.clone(), td.clone(), provider.clone())
                .map_err(|e| vec![(Part::Ca, format!("{}: {e}", src.ca))])?;
            // And as a server, toward which peers check the other purpose.
            let as_server = NodeServerVerifier::new(roots.clone(), td.clone(), node, &provider);
            let name = rustls::pki_types::ServerName::try_from("peer.invalid")
                .map_err(|e| vec![(Part::Cert, e.to_string())])?;
            let checked = check
                .verify_client_cert(&certified.cert[0], &certified.cert[1..], UnixTime::now())
                .map(|_| ())
                .and_then(|()| {
                    rustls::client::danger::ServerCertVerifier::verify_server_cert(
                        &as_server,
                        &certified.cert[0],
                        &certified.cert[1..],
                        &name,
                        &[],
                        UnixTime::now(),
                    )
                    .map(|_| ())
                });
            if let Err(e) = checked {
                problems.push((
                    Part::Cert,
                    format!(
                        "{}: does not verify against {}: {}",
                        src.cert,
                        src.ca,
                        describe(&e)
                    ),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let id = NodeId::new(td.clone(), node).map_err(|e| vec![(Part::Cert, e)])?;
        Ok(Material {
            id,
            roots,
            key: Arc::new(certified),
            subject,
            issuer,
            not_after,
            anchors,
        })
    }

    /// The host certificate's expiry as RFC 3339 (UTC).
    pub fn expires(&self) -> String {
        match time::OffsetDateTime::from_unix_timestamp(self.not_after) {
            Ok(t) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => self.not_after.to_string(),
        }
    }

    /// Whole days until the host certificate expires (negative once it has).
    pub fn days_left(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        (self.not_after - now).div_euclid(86_400)
    }

    /// Logs a warning when the host certificate expires within [`EXPIRY_WARNING_DAYS`] days.
    pub fn warn_if_expiring(&self) {
        let days_left = self.days_left();
        if days_left < EXPIRY_WARNING_DAYS {
            tracing::warn!(
                spiffe_id = %self.id,
                expires = %self.expires(),
                days_left,
                "this host's mesh certificate expires within {EXPIRY_WARNING_DAYS} days: issue a new one with \
                 `meshd cert issue` and replace the files (meshd picks them up without a restart)"
            );
        }
    }

    /// The inbound side: peers must present a node certificate of this trust domain.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let verifier =
            NodeClientVerifier::new(self.roots.clone(), self.id.trust_domain.clone(), provider())?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(HostKey(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The outbound side toward `expected`: the server must be that node.
    pub fn client_config(&self, expected: &str) -> Result<Arc<ClientConfig>, String> {
        let p = provider();
        let verifier = NodeServerVerifier::new(
            self.roots.clone(),
            self.id.trust_domain.clone(),
            expected,
            &p,
        );
        let mut cfg = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(HostKey(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Whether `der` can be a trust anchor of `td`: a CA certificate whose one URI SAN is `spiffe://<td>`. Its
/// subject when it can.
fn check_anchor(der: &CertificateDer<'_>, td: &TrustDomain) -> Result<String, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    if !x509.is_ca() {
        return Err("not a CA certificate (a host certificate in the CA bundle?)".into());
    }
    match super::identity::uri_sans(&x509).as_slice() {
        [one] if *one == td.uri() => Ok(x509.subject().to_string()),
        _ => Err(format!(
            "not a mesh CA of trust domain {td} (its one URI SAN must be {})",
            td.uri()
        )),
    }
}

/// This host's certificate and key, presented on both sides.
#[derive(Debug)]
struct HostKey(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for HostKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for HostKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
