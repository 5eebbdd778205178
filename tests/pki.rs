//! `meshd ca init` and `meshd cert issue`, run as a user would: the files they write, their modes, what they
//! refuse, and that the host certificates chain to the CA under rustls's own verifier.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn meshd(args: &[&str]) -> Output {
    Command::new(MESHD).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn cert(p: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(p).unwrap()
}

/// Verifies `leaf` as a TLS client certificate against `ca` with rustls's WebPKI verifier.
fn chains_to(leaf: &Path, ca: &Path) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert(ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    verifier
        .verify_client_cert(&cert(leaf), &[], UnixTime::now())
        .map(|_| ())
}

fn uris(p: &Path) -> Vec<String> {
    let der = cert(p);
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    meshd::tls::identity::uri_sans(&x509)
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_ca_and_host_certificates_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let o = meshd(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.test",
        "--out",
        ca.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ca.crt") && text(&o).contains("ca.key"),
        "{}",
        text(&o)
    );
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(uris(&ca.join("ca.crt")), ["spiffe://mesh.test"]);

    let hosts = dir.path().join("hosts");
    let o = meshd(&[
        "cert",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--node",
        "host-a",
        "--out",
        hosts.to_str().unwrap(),
        "--days",
        "30",
        "--ip",
        "10.1.2.3",
        "--dns",
        "host-a.example",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("spiffe://mesh.test/node/host-a"),
        "{}",
        text(&o)
    );
    let (crt, key) = (hosts.join("host-a.crt"), hosts.join("host-a.key"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(uris(&crt), ["spiffe://mesh.test/node/host-a"]);
    chains_to(&crt, &ca.join("ca.crt")).unwrap();
    let der = cert(&crt);
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!x509.is_ca());
    let days =
        (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 30);
    let td = meshd::tls::identity::TrustDomain::parse("mesh.test").unwrap();
    assert_eq!(
        meshd::tls::identity::node_of(&x509, &td).unwrap().node,
        "host-a"
    );

    // A certificate from another CA does not chain to this one.
    let other = dir.path().join("other");
    assert!(
        meshd(&[
            "ca",
            "init",
            "--trust-domain",
            "mesh.test",
            "--out",
            other.to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(chains_to(&crt, &other.join("ca.crt")).is_err());
}

#[test]
fn existing_files_are_kept_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let init = |force: bool| {
        let mut args = vec![
            "ca",
            "init",
            "--trust-domain",
            "mesh.test",
            "--out",
            ca.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        meshd(&args)
    };
    assert!(init(false).status.success());
    let before = std::fs::read(ca.join("ca.key")).unwrap();
    let o = init(false);
    assert_eq!(o.status.code(), Some(73), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(
        std::fs::read(ca.join("ca.key")).unwrap(),
        before,
        "the key was replaced"
    );
    let o = init(true);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(ca.join("ca.key")).unwrap(), before);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let issue = |force: bool| {
        let mut args = vec![
            "cert",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--node",
            "n1",
            "--out",
            ca.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        meshd(&args)
    };
    assert!(issue(false).status.success());
    assert_eq!(issue(false).status.code(), Some(73));
    assert!(issue(true).status.success());
    assert_eq!(mode(&ca.join("n1.key")), 0o600);
    // No temporary file is left behind.
    let mut names: Vec<String> = std::fs::read_dir(&ca)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key", "n1.crt", "n1.key"]);
}

#[test]
fn bad_input_is_named_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = dir.path().join("out");
    let (ca_s, out_s) = (ca.to_str().unwrap(), out.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ca", "init", "--trust-domain", "Mesh.Test", "--out", ca_s],
            "'M' is not allowed",
        ),
        (
            vec!["ca", "init", "--trust-domain", "spiffe://x", "--out", ca_s],
            "':' is not allowed",
        ),
        (
            vec![
                "ca",
                "init",
                "--trust-domain",
                "m",
                "--out",
                ca_s,
                "--days",
                "0",
            ],
            "--days",
        ),
        (
            vec![
                "ca",
                "init",
                "--trust-domain",
                "m",
                "--out",
                ca_s,
                "--days",
                "4000000000",
            ],
            "too far",
        ),
        (
            vec!["cert", "issue", "--ca", ca_s, "--node", "a", "--out", out_s],
            "ca.crt",
        ),
    ];
    for (args, want) in &cases {
        let o = meshd(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    assert!(
        !ca.exists() && !out.exists(),
        "a failed command wrote files"
    );

    // A real CA, then broken copies of it.
    assert!(
        meshd(&["ca", "init", "--trust-domain", "mesh.test", "--out", ca_s])
            .status
            .success()
    );
    let o = meshd(&[
        "cert", "issue", "--ca", ca_s, "--node", "../x", "--out", out_s,
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("node name"), "{}", text(&o));

    let other = dir.path().join("other");
    assert!(
        meshd(&[
            "ca",
            "init",
            "--trust-domain",
            "mesh.test",
            "--out",
            other.to_str().unwrap()
        ])
        .status
        .success()
    );
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(ca.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    std::fs::copy(other.join("ca.key"), mixed.join("ca.key")).unwrap();
    let o = meshd(&[
        "cert",
        "issue",
        "--ca",
        mixed.to_str().unwrap(),
        "--node",
        "a",
        "--out",
        out_s,
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("does not match"), "{}", text(&o));

    std::fs::write(
        mixed.join("ca.key"),
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let o = meshd(&[
        "cert",
        "issue",
        "--ca",
        mixed.to_str().unwrap(),
        "--node",
        "a",
        "--out",
        out_s,
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("ca.key"), "{}", text(&o));

    // A host certificate is not a CA.
    assert!(
        meshd(&["cert", "issue", "--ca", ca_s, "--node", "h", "--out", out_s])
            .status
            .success()
    );
    let fake = dir.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::copy(out.join("h.crt"), fake.join("ca.crt")).unwrap();
    std::fs::copy(out.join("h.key"), fake.join("ca.key")).unwrap();
    let o = meshd(&[
        "cert",
        "issue",
        "--ca",
        fake.to_str().unwrap(),
        "--node",
        "a",
        "--out",
        out_s,
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("not a CA certificate"), "{}", text(&o));
    assert!(!out.join("a.crt").exists());
}
