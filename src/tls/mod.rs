//! Mutual TLS between agents: the mesh PKI (CA and host certificates) and node identities.
//!
//! - [`identity`]: trust domains, node SPIFFE IDs (`spiffe://<trust_domain>/node/<name>`), and the checks that
//!   name the node a certificate belongs to.
//! - [`pki`]: `meshd ca init`, `meshd cert issue`, and the in-memory CA of `meshd dev`.
//! - [`verify`]: the rustls verifiers for each side, and the reasons a handshake is refused.
//! - [`material`]: a host's CA bundle, certificate and key, checked together, and the rustls configs.
//! - [`peers`]: TLS at run time — the acceptor, a client config per expected node, failed-handshake accounting.
//! - [`stream`]: a connection that is plain TCP or TLS.

pub mod identity;
pub mod material;
pub mod peers;
pub mod pki;
pub mod stream;
pub mod verify;

use crate::config::Config;

/// Reads and checks the `[tls]` files of `cfg`: `Ok(None)` without `[tls]`; otherwise the material, or every
/// problem with the key it is about (`tls.ca`, `tls.cert`, `tls.key`).
pub fn load(cfg: &Config) -> Result<Option<material::Material>, Vec<(&'static str, String)>> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
    let td =
        identity::TrustDomain::parse(&t.trust_domain).map_err(|e| vec![("tls.trust_domain", e)])?;
    let key_of = |p: material::Part| match p {
        material::Part::Ca => "tls.ca",
        material::Part::Cert => "tls.cert",
        material::Part::Key => "tls.key",
    };
    let mut problems = Vec::new();
    let mut read = |part: material::Part, path: &std::path::Path| match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push((key_of(part), format!("{}: {e}", path.display())));
            Vec::new()
        }
    };
    let ca = read(material::Part::Ca, &t.ca);
    let cert = read(material::Part::Cert, &t.cert);
    let key = read(material::Part::Key, &t.key);
    if !problems.is_empty() {
        return Err(problems);
    }
    let (ca_name, cert_name, key_name) = (
        t.ca.display().to_string(),
        t.cert.display().to_string(),
        t.key.display().to_string(),
    );
    let src = material::Sources {
        ca: &ca_name,
        cert: &cert_name,
        key: &key_name,
    };
    material::Material::from_pem(&td, &cfg.node.name, &ca, &cert, &key, &src)
        .map(Some)
        .map_err(|list| list.into_iter().map(|(p, m)| (key_of(p), m)).collect())
}
