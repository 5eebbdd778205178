//! Node identities: the SPIFFE ID `spiffe://<trust_domain>/node/<name>` a host certificate carries in exactly one
//! URI SAN, and the checks that turn a verified certificate into the name of the node it belongs to.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// A SPIFFE trust domain: 1 to 255 characters of `a-z`, `0-9`, `.`, `-`, `_` (the SPIFFE ID spec).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 255 {
            return Err(format!(
                "trust domain {s:?}: use 1 to 255 characters of a-z, 0-9, '.', '-', '_'"
            ));
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(format!(
                "trust domain {s:?}: {c:?} is not allowed (use a-z, 0-9, '.', '-', '_'; no upper case, port or scheme)"
            ));
        }
        Ok(TrustDomain(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<trust_domain>`, the URI SAN of a mesh CA.
    pub fn uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` can be a node name: what `[node] name` accepts, and a valid SPIFFE path segment.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?}: use 1-63 characters of a-z, A-Z, 0-9, '.', '-', '_' (not \".\" or \"..\")"
        ))
    }
}

/// The identity of one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub trust_domain: TrustDomain,
    pub node: String,
}

impl NodeId {
    pub fn new(trust_domain: TrustDomain, node: &str) -> Result<Self, String> {
        check_node_name(node)?;
        Ok(NodeId {
            trust_domain,
            node: node.to_string(),
        })
    }

    pub fn uri(&self) -> String {
        format!("spiffe://{}/node/{}", self.trust_domain, self.node)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/node/{}", self.trust_domain, self.node)
    }
}

/// Why a certificate's identity was refused. [`Reject::as_str`] is the `reason` label of
/// `meshd_tls_handshake_errors_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reject {
    /// No URI SAN at all.
    NoIdentity,
    /// Two or more URI SANs: which one is the identity would be ambiguous.
    SeveralIdentities,
    /// A URI SAN that is not a well-formed `spiffe://` ID.
    NotSpiffe(String),
    /// A SPIFFE ID of another trust domain.
    OtherTrustDomain(String),
    /// A SPIFFE ID in this trust domain whose path is not `/node/<name>`.
    NotANode(String),
}

impl Reject {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reject::NoIdentity | Reject::SeveralIdentities | Reject::NotSpiffe(_) => "bad-identity",
            Reject::OtherTrustDomain(_) => "other-trust-domain",
            Reject::NotANode(_) => "not-a-node",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::NoIdentity => {
                f.write_str("the certificate has no URI SAN (a node's SPIFFE ID)")
            }
            Reject::SeveralIdentities => {
                f.write_str("the certificate has more than one URI SAN; a node's has exactly one")
            }
            Reject::NotSpiffe(u) => write!(f, "the URI SAN {u:?} is not a SPIFFE ID"),
            Reject::OtherTrustDomain(u) => write!(f, "{u:?} belongs to another trust domain"),
            Reject::NotANode(u) => write!(
                f,
                "{u:?} is not a node identity (spiffe://<trust domain>/node/<name>)"
            ),
        }
    }
}

/// Parses a SPIFFE ID and checks it names a node of `td`.
pub fn parse_node_uri(uri: &str, td: &TrustDomain) -> Result<NodeId, Reject> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| Reject::NotSpiffe(uri.to_string()))?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if TrustDomain::parse(domain).is_err() || uri.contains(['?', '#']) {
        return Err(Reject::NotSpiffe(uri.to_string()));
    }
    if domain != td.as_str() {
        return Err(Reject::OtherTrustDomain(uri.to_string()));
    }
    match path.strip_prefix("node/") {
        Some(name) if check_node_name(name).is_ok() => Ok(NodeId {
            trust_domain: td.clone(),
            node: name.to_string(),
        }),
        _ => Err(Reject::NotANode(uri.to_string())),
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Vec<&'a str> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The node a (chain-verified) host certificate belongs to: exactly one URI SAN, a node ID of `td`.
pub fn node_of(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<NodeId, Reject> {
    match uri_sans(cert).as_slice() {
        [] => Err(Reject::NoIdentity),
        [one] => parse_node_uri(one, td),
        _ => Err(Reject::SeveralIdentities),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("mesh.local").unwrap()
    }

    #[test]
    fn trust_domains() {
        assert!(TrustDomain::parse("mesh.local").is_ok());
        assert!(TrustDomain::parse("prod-eu_1").is_ok());
        for bad in [
            "",
            "Mesh",
            "mesh:8443",
            "spiffe://mesh",
            "a/b",
            "mésh",
            &"x".repeat(256),
        ] {
            assert!(TrustDomain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_names() {
        assert!(check_node_name("host-a.eu_1").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_uris() {
        let id = parse_node_uri("spiffe://mesh.local/node/host-a", &td()).unwrap();
        assert_eq!(id.node, "host-a");
        assert_eq!(id.uri(), "spiffe://mesh.local/node/host-a");
        let cases = [
            ("https://mesh.local/node/a", "bad-identity"),
            ("spiffe://MESH/node/a", "bad-identity"),
            ("spiffe://mesh.local/node/a?x=1", "bad-identity"),
            ("spiffe://other.local/node/a", "other-trust-domain"),
            ("spiffe://mesh.local/ns/default/sa/web", "not-a-node"),
            ("spiffe://mesh.local/node/", "not-a-node"),
            ("spiffe://mesh.local/node/a/b", "not-a-node"),
            ("spiffe://mesh.local/node/..", "not-a-node"),
            ("spiffe://mesh.local", "not-a-node"),
        ];
        for (uri, reason) in cases {
            let got = parse_node_uri(uri, &td()).unwrap_err();
            assert_eq!(got.as_str(), reason, "{uri}: {got}");
        }
    }
}
