//! Certificate verification between agents: the chain (rustls's WebPKI verification against the mesh CA
//! bundle), then the identity — a node of this trust domain on the inbound side, exactly the expected node on the
//! outbound side — and the fixed set of reasons a handshake is refused for.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::identity::{NodeId, Reject, TrustDomain, node_of};

/// Why a peer's certificate was refused beyond what WebPKI checks, carried inside a rustls error so the
/// handshake's failure can be classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Identity(Reject),
    /// A CA certificate presented as a host certificate.
    CaAsLeaf,
    /// A node of this mesh, but not the one that owns the endpoint.
    WrongNode {
        expected: String,
        presented: String,
    },
    /// Not a parseable X.509 certificate.
    Unparseable,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Identity(r) => r.fmt(f),
            Refusal::CaAsLeaf => {
                f.write_str("a CA certificate was presented as a host certificate")
            }
            Refusal::WrongNode {
                expected,
                presented,
            } => write!(f, "expected node {expected:?}, the peer is {presented:?}"),
            Refusal::Unparseable => f.write_str("the certificate is not valid X.509"),
        }
    }
}

impl std::error::Error for Refusal {}

fn refuse(r: Refusal) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
}

/// The node a leaf certificate names, before or after chain verification; CA certificates refused.
fn leaf_identity(leaf: &CertificateDer<'_>, td: &TrustDomain) -> Result<NodeId, Refusal> {
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|_| Refusal::Unparseable)?;
    if x509.is_ca() {
        return Err(Refusal::CaAsLeaf);
    }
    node_of(&x509, td).map_err(Refusal::Identity)
}

/// Both sides' order of checks, the leaf parsed once: a CA certificate as the leaf gets its own reason, before
/// the chain check (`chain`, WebPKI) gives its generic one; then the identity.
fn verify_leaf(
    leaf: &CertificateDer<'_>,
    td: &TrustDomain,
    chain: impl FnOnce() -> Result<(), Error>,
) -> Result<NodeId, Error> {
    let identity = leaf_identity(leaf, td);
    if let Err(Refusal::CaAsLeaf) = identity {
        return Err(refuse(Refusal::CaAsLeaf));
    }
    chain()?;
    identity.map_err(refuse)
}

/// The node a verified peer certificate names (for attaching to requests after the handshake).
pub fn peer_node(leaf: &CertificateDer<'_>, td: &TrustDomain) -> Option<NodeId> {
    leaf_identity(leaf, td).ok()
}

/// Inbound: a client certificate is required, must chain to the bundle and name a node of `td`.
#[derive(Debug)]
pub struct NodeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    td: TrustDomain,
}

impl NodeClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        td: TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("the CA bundle: {e}"))?;
        Ok(NodeClientVerifier { webpki, td })
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_leaf(end_entity, &self.td, || {
            self.webpki
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ())
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Outbound: the server must chain to the bundle and be exactly `expected` (the node that owns the endpoint);
/// DNS names and IP addresses in its certificate play no part.
#[derive(Debug)]
pub struct NodeServerVerifier {
    roots: Arc<RootCertStore>,
    td: TrustDomain,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

impl NodeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        td: TrustDomain,
        expected: &str,
        provider: &CryptoProvider,
    ) -> Self {
        NodeServerVerifier {
            roots,
            td,
            expected: expected.to_string(),
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_leaf(end_entity, &self.td, || {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                intermediates,
                now,
                self.algs.all,
            )
        })?;
        if id.node != self.expected {
            return Err(refuse(Refusal::WrongNode {
                expected: self.expected.clone(),
                presented: id.node,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The `reason` label of `meshd_tls_handshake_errors_total` for a failed handshake: a small fixed set.
pub fn reason(err: &Error) -> &'static str {
    match err {
        Error::NoCertificatesPresented => "no-client-cert",
        Error::InvalidCertificate(c) => match c {
            // A bad signature on the chain: a CA of the same name but another key (a foreign CA), or a
            // forgery; either way the certificate is not from a CA in the bundle.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown-ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not-yet-valid"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "not-a-host-certificate"
            }
            CertificateError::Other(OtherError(e)) => match e.downcast_ref::<Refusal>() {
                Some(Refusal::Identity(r)) => r.as_str(),
                Some(Refusal::CaAsLeaf) => "not-a-host-certificate",
                Some(Refusal::WrongNode { .. }) => "wrong-node",
                Some(Refusal::Unparseable) | None => "bad-certificate",
            },
            _ => "bad-certificate",
        },
        Error::AlertReceived(_) => "refused-by-peer",
        _ => "protocol",
    }
}

/// A readable account of a failed handshake, for the log.
pub fn describe(err: &Error) -> String {
    match err {
        Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => e.to_string(),
        Error::NoCertificatesPresented => "the peer sent no certificate".into(),
        other => other.to_string(),
    }
}
