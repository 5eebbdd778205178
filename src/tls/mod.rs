//! Mutual TLS between agents: the mesh PKI (CA and host certificates) and node identities.
//!
//! - [`identity`]: trust domains, node SPIFFE IDs (`spiffe://<trust_domain>/node/<name>`), and the checks that
//!   name the node a certificate belongs to.
//! - [`pki`]: `meshd ca init`, `meshd cert issue`, and the in-memory CA of `meshd dev`.
//! - [`verify`]: the rustls verifiers for each side, and the reasons a handshake is refused.
//! - [`material`]: a host's CA bundle, certificate and key, checked together, and the rustls configs.

pub mod identity;
pub mod material;
pub mod pki;
pub mod verify;
