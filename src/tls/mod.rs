//! Mutual TLS between agents: the mesh PKI (CA and host certificates) and node identities.
//!
//! - [`identity`]: trust domains, node SPIFFE IDs (`spiffe://<trust_domain>/node/<name>`), and the checks that
//!   name the node a certificate belongs to.
//! - [`pki`]: `meshd ca init`, `meshd cert issue`, and the in-memory CA of `meshd dev`.
//! - [`verify`]: the rustls verifiers for each side, and the reasons a handshake is refused.
//! - [`material`]: a host's CA bundle, certificate and key, checked together, and the rustls configs.
//! - [`peers`]: TLS at run time — the acceptor, a client config per expected node, failed-handshake accounting.
//! - [`reload`]: new certificate files picked up on SIGHUP, `POST /v1/reload` and when they change on disk.
//! - [`stream`]: a connection that is plain TCP or TLS.

pub mod identity;
pub mod material;
pub mod peers;
pub mod pki;
pub mod reload;
pub mod stream;
pub mod verify;

use crate::config::{Config, TlsConfig};

/// Problems found, each with the config key it is about.
pub type Problems = Vec<(&'static str, String)>;

/// The bytes of the three `[tls]` files as last read: a reload that finds the same bytes changes nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn key_of(p: material::Part) -> &'static str {
    match p {
        material::Part::Ca => "tls.ca",
        material::Part::Cert => "tls.cert",
        material::Part::Key => "tls.key",
    }
}

/// Reads the `[tls]` files, naming each one that cannot be read.
pub fn read_files(t: &TlsConfig) -> Result<Files, Problems> {
    let mut problems = Vec::new();
    let mut read = |part: material::Part, path: &std::path::Path| match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push((key_of(part), format!("{}: {e}", path.display())));
            Vec::new()
        }
    };
    let files = Files {
        ca: read(material::Part::Ca, &t.ca),
        cert: read(material::Part::Cert, &t.cert),
        key: read(material::Part::Key, &t.key),
    };
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

/// Checks `files` as the material of `node` in `td`, listing every problem with its key.
pub fn check(
    t: &TlsConfig,
    td: &identity::TrustDomain,
    node: &str,
    files: &Files,
) -> Result<material::Material, Problems> {
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
    material::Material::from_pem(td, node, &files.ca, &files.cert, &files.key, &src)
        .map_err(|list| list.into_iter().map(|(p, m)| (key_of(p), m)).collect())
}

/// Reads and checks the `[tls]` files of `cfg`: `Ok(None)` without `[tls]`; otherwise the material (and the
/// bytes it came from), or every problem with the key it is about (`tls.ca`, `tls.cert`, `tls.key`).
pub fn load(cfg: &Config) -> Result<Option<(material::Material, Files)>, Problems> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
    let td =
        identity::TrustDomain::parse(&t.trust_domain).map_err(|e| vec![("tls.trust_domain", e)])?;
    let files = read_files(t)?;
    let material = check(t, &td, &cfg.node.name, &files)?;
    Ok(Some((material, files)))
}

/// The trust domain of `meshd dev`'s in-memory CA.
pub const DEV_TRUST_DOMAIN: &str = "dev.meshd.invalid";

/// Material from a CA made in memory for `node` (`meshd dev`): mutual TLS on the inbound port with no files. Every
/// start makes a new CA, so nothing outside this process trusts it.
pub fn in_memory(node: &str) -> Result<material::Material, String> {
    let td = identity::TrustDomain::parse(DEV_TRUST_DOMAIN)?;
    let ca = pki::LoadedCa::generate(&td, 30).map_err(|e| e.to_string())?;
    let host = ca.issue(node, 30, &[], &[]).map_err(|e| e.to_string())?;
    let src = material::Sources {
        ca: "the in-memory CA",
        cert: "the in-memory host certificate",
        key: "its key",
    };
    material::Material::from_pem(
        &td,
        node,
        ca.cert_pem.as_bytes(),
        host.cert_pem.as_bytes(),
        host.key_pem.as_bytes(),
        &src,
    )
    .map_err(|p| p.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; "))
}
