//! Mutual TLS between agents at the handshake: real rustls handshakes over loopback TCP, with certificates the
//! test makes itself (rcgen), one for every way a peer can be wrong. The accepting side must refuse each with
//! its reason, and no application byte may cross.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use meshd::tls::identity::TrustDomain;
use meshd::tls::material::{Material, Sources, provider};
use meshd::tls::verify::{NodeServerVerifier, peer_node, reason};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, format!("test CA {td}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

/// How to make a leaf certificate.
struct Leaf<'a> {
    uris: Vec<String>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    is_ca: bool,
    /// Valid for TLS client authentication (every leaf is valid for server authentication).
    client_auth: bool,
    signer: &'a Ca,
}

impl<'a> Leaf<'a> {
    fn node(signer: &'a Ca, td: &str, node: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Leaf {
            uris: vec![format!("spiffe://{td}/node/{node}")],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(30),
            is_ca: false,
            client_auth: true,
            signer,
        }
    }

    fn make(&self) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "leaf");
        p.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI(u.clone().try_into().unwrap()))
            .collect();
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        if self.is_ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if self.client_auth {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = p.signed_by(&key, &self.signer.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

const TD: &str = "mesh.test";

/// A certificate and its key, PEM.
type Pem = (String, String);

fn material(ca: &Ca, node: &str) -> Material {
    let (cert, key) = Leaf::node(ca, TD, node).make();
    Material::from_pem(
        &TrustDomain::parse(TD).unwrap(),
        node,
        ca.pem.as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        &Sources {
            ca: "ca",
            cert: "cert",
            key: "key",
        },
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

/// A client config presenting `cert` (or nothing), trusting `roots_pem` and expecting node `expected`.
fn client(roots_pem: &str, cert: Option<Pem>, expected: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let p = provider();
    let verifier = NodeServerVerifier::new(
        Arc::new(roots),
        TrustDomain::parse(TD).unwrap(),
        expected,
        &p,
    );
    let b = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match cert {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

/// One handshake: the server's outcome (`Ok(peer node)` or the reason it refused), the client's outcome, and
/// whether the server received the client's application bytes.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
) -> (Result<String, &'static str>, Result<(), &'static str>, bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let td = TrustDomain::parse(TD).unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match tokio_rustls::TlsAcceptor::from(server).accept(tcp).await {
            Ok(mut tls) => {
                let node = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| peer_node(c, &td))
                    .map(|id| id.node)
                    .unwrap_or_default();
                let mut buf = [0u8; 5];
                let got = tls.read_exact(&mut buf).await.is_ok() && &buf == b"hello";
                let _ = tls.write_all(b"ok").await;
                (Ok(node), got)
            }
            Err(e) => {
                let why = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .map(reason)
                    .unwrap_or("io");
                (Err(why), false)
            }
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("peer.invalid").unwrap();
    let client_side = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            // TLS 1.3: the client may finish before the server has judged its certificate; the server's
            // refusal then arrives as an alert on the first read.
            let _ = tls.write_all(b"hello").await;
            let mut buf = [0u8; 2];
            match tls.read_exact(&mut buf).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .map(reason)
                    .unwrap_or("io")),
            }
        }
        Err(e) => Err(e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .map(reason)
            .unwrap_or("io")),
    };
    let (server_side, received) = srv.await.unwrap();
    (server_side, client_side, received)
}

#[tokio::test]
async fn every_wrong_client_certificate_is_refused_with_its_reason() {
    let mesh = ca(TD);
    let server = material(&mesh, "server").server_config().unwrap();
    let foreign = ca(TD);
    let now = OffsetDateTime::now_utc();

    // The good case first: the handshake completes and the peer's node name is known.
    let good = Leaf::node(&mesh, TD, "client-a").make();
    let (s, c, received) = handshake(server.clone(), client(&mesh.pem, Some(good), "server")).await;
    assert_eq!(s, Ok("client-a".to_string()));
    assert_eq!(c, Ok(()));
    assert!(received);

    let mut expired = Leaf::node(&mesh, TD, "a");
    (expired.not_before, expired.not_after) = (now - Duration::days(10), now - Duration::days(1));
    let mut early = Leaf::node(&mesh, TD, "a");
    (early.not_before, early.not_after) = (now + Duration::days(1), now + Duration::days(10));
    let mut ca_leaf = Leaf::node(&mesh, TD, "a");
    ca_leaf.is_ca = true;
    let mut no_uri = Leaf::node(&mesh, TD, "a");
    no_uri.uris.clear();
    let mut two_uris = Leaf::node(&mesh, TD, "a");
    two_uris.uris.push(format!("spiffe://{TD}/node/b"));
    let mut server_only = Leaf::node(&mesh, TD, "a");
    server_only.client_auth = false;
    let mut workload = Leaf::node(&mesh, TD, "a");
    workload.uris = vec![format!("spiffe://{TD}/ns/default/sa/web")];

    let rows: Vec<(&str, Option<Pem>, &str)> = vec![
        ("no client certificate", None, "no-client-cert"),
        (
            "a foreign CA",
            Some(Leaf::node(&foreign, TD, "a").make()),
            "unknown-ca",
        ),
        ("expired", Some(expired.make()), "expired"),
        ("not yet valid", Some(early.make()), "not-yet-valid"),
        (
            "a CA certificate as the leaf",
            Some(ca_leaf.make()),
            "not-a-host-certificate",
        ),
        (
            "not for client authentication",
            Some(server_only.make()),
            "not-a-host-certificate",
        ),
        ("no URI SAN", Some(no_uri.make()), "bad-identity"),
        ("two URI SANs", Some(two_uris.make()), "bad-identity"),
        (
            "another trust domain",
            Some(Leaf::node(&mesh, "other.test", "a").make()),
            "other-trust-domain",
        ),
        ("not a node identity", Some(workload.make()), "not-a-node"),
    ];
    for (what, cert, want) in rows {
        let (s, c, received) = handshake(server.clone(), client(&mesh.pem, cert, "server")).await;
        assert_eq!(s, Err(want), "{what}");
        assert!(c.is_err(), "{what}: the client thinks it got through");
        assert!(!received, "{what}: application bytes crossed");
    }
}

/// A server presenting `cert` whatever it is (no client authentication asked).
fn bare_server(cert: Pem) -> Arc<rustls::ServerConfig> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            CertificateDer::pem_slice_iter(cert.0.as_bytes())
                .map(Result::unwrap)
                .collect(),
            PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test]
async fn the_outbound_side_accepts_only_the_node_that_owns_the_endpoint() {
    let mesh = ca(TD);
    // The client side as meshd builds it.
    let me = material(&mesh, "client-a");
    let toward = |node: &str| (*me.client_config(node).unwrap()).clone();
    let server_b = material(&mesh, "node-b").server_config().unwrap();

    // Expecting node-b and reaching node-b: through, and node-b knows who called.
    let (s, c, received) = handshake(server_b.clone(), toward("node-b")).await;
    assert_eq!((s, c, received), (Ok("client-a".to_string()), Ok(()), true));

    // Any other mesh node is refused by the client, however valid its certificate.
    let (s, c, received) = handshake(server_b.clone(), toward("node-c")).await;
    assert_eq!(c, Err("wrong-node"));
    assert!(s.is_err() && !received);

    // Servers whose certificates are wrong in the other ways.
    let now = OffsetDateTime::now_utc();
    let foreign = ca(TD);
    let mut expired = Leaf::node(&mesh, TD, "node-b");
    (expired.not_before, expired.not_after) = (now - Duration::days(10), now - Duration::days(1));
    let mut ca_leaf = Leaf::node(&mesh, TD, "node-b");
    ca_leaf.is_ca = true;
    let rows = [
        (
            "a foreign CA",
            Leaf::node(&foreign, TD, "node-b").make(),
            "unknown-ca",
        ),
        ("expired", expired.make(), "expired"),
        ("a CA certificate", ca_leaf.make(), "not-a-host-certificate"),
        (
            "another trust domain",
            Leaf::node(&mesh, "other.test", "node-b").make(),
            "other-trust-domain",
        ),
    ];
    for (what, cert, want) in rows {
        let (_, c, received) = handshake(bare_server(cert), toward("node-b")).await;
        assert_eq!(c, Err(want), "{what}");
        assert!(!received, "{what}: application bytes crossed");
    }
}

#[test]
fn broken_material_is_refused_with_every_problem_named() {
    let mesh = ca(TD);
    let td = TrustDomain::parse(TD).unwrap();
    let (cert, key) = Leaf::node(&mesh, TD, "n1").make();
    let (_, other_key) = Leaf::node(&mesh, TD, "n1").make();
    let src = Sources {
        ca: "/etc/meshd/ca.crt",
        cert: "/etc/meshd/n1.crt",
        key: "/etc/meshd/n1.key",
    };
    let load = |ca: &str, cert: &str, key: &str, node: &str| {
        Material::from_pem(
            &td,
            node,
            ca.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            &src,
        )
    };
    assert!(load(&mesh.pem, &cert, &key, "n1").is_ok());
    let err = |r: Result<Material, Vec<(meshd::tls::material::Part, String)>>| {
        let list = r.map(|_| ()).unwrap_err();
        list.into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("\n")
    };

    let e = err(load(&mesh.pem, &cert, &other_key, "n1"));
    assert!(
        e.contains("/etc/meshd/n1.key does not match /etc/meshd/n1.crt"),
        "{e}"
    );
    let e = err(load(&mesh.pem, &cert, &key, "n2"));
    assert!(
        e.contains("for node \"n1\", but this node is \"n2\""),
        "{e}"
    );
    let e = err(load("", &cert, &key, "n1"));
    assert!(e.contains("/etc/meshd/ca.crt: no certificate"), "{e}");
    let e = err(load(&mesh.pem, "garbage", "garbage", "n1"));
    assert!(
        e.contains("/etc/meshd/n1.crt") && e.contains("/etc/meshd/n1.key"),
        "{e}"
    );
    // Chain in the wrong order: the CA first.
    let e = err(load(&mesh.pem, &format!("{}{cert}", mesh.pem), &key, "n1"));
    assert!(e.contains("wrong order"), "{e}");
    // Signed by another CA than the bundle's.
    let foreign = ca(TD);
    let e = err(load(&foreign.pem, &cert, &key, "n1"));
    assert!(
        e.contains("does not verify against /etc/meshd/ca.crt"),
        "{e}"
    );
    // A key of a type rustls cannot sign with (a PKCS#8 wrapper around nonsense).
    let bad_key =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
    let e = err(load(&mesh.pem, &cert, bad_key, "n1"));
    assert!(
        e.contains("/etc/meshd/n1.key: a private key of a type meshd cannot use"),
        "{e}"
    );
    // Only mesh CAs of this trust domain may be trust anchors: not a host certificate, not another domain's CA.
    let e = err(load(&format!("{}{cert}", mesh.pem), &cert, &key, "n1"));
    assert!(e.contains("certificate 2: not a CA certificate"), "{e}");
    let e = err(load(
        &format!("{}{}", mesh.pem, ca("other.test").pem),
        &cert,
        &key,
        "n1",
    ));
    assert!(
        e.contains("certificate 2: not a mesh CA of trust domain mesh.test"),
        "{e}"
    );
    // Not valid for TLS client authentication: peers would refuse it.
    let mut server_only = Leaf::node(&mesh, TD, "n1");
    server_only.client_auth = false;
    let (c, k) = server_only.make();
    let e = err(load(&mesh.pem, &c, &k, "n1"));
    assert!(e.contains("does not verify"), "{e}");
}
