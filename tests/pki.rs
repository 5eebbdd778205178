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

/// Runs `args` and checks it exits with `code` saying `want`.
fn refused(args: &[&str], code: i32, want: &str) {
    let o = meshd(args);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
    assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
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
        refused(args, 64, want);
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
    refused(
        &[
            "cert", "issue", "--ca", ca_s, "--node", "../x", "--out", out_s,
        ],
        64,
        "node name",
    );

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
    refused(
        &[
            "cert",
            "issue",
            "--ca",
            mixed.to_str().unwrap(),
            "--node",
            "a",
            "--out",
            out_s,
        ],
        64,
        "does not match",
    );

    std::fs::write(
        mixed.join("ca.key"),
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    refused(
        &[
            "cert",
            "issue",
            "--ca",
            mixed.to_str().unwrap(),
            "--node",
            "a",
            "--out",
            out_s,
        ],
        64,
        "ca.key",
    );

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
    refused(
        &[
            "cert",
            "issue",
            "--ca",
            fake.to_str().unwrap(),
            "--node",
            "a",
            "--out",
            out_s,
        ],
        64,
        "not a CA certificate",
    );
    assert!(!out.join("a.crt").exists());
}

mod common;

/// A config for node `name` with `[tls]` pointing at `dir/ca/ca.crt` and `dir/hosts/<cert_node>.{crt,key}`.
fn tls_config(dir: &Path, name: &str, cert_node: &str, extra_tls: &str) -> String {
    format!(
        "[node]\nname = \"{name}\"\n[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\ninsecure_plaintext = true\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ntrust_domain = \"mesh.test\"\nca = \"{ca}\"\ncert = \"{crt}\"\nkey = \"{key}\"\n{extra_tls}",
        ca = dir.join("ca/ca.crt").display(),
        crt = dir.join(format!("hosts/{cert_node}.crt")).display(),
        key = dir.join(format!("hosts/{cert_node}.key")).display(),
    )
}

#[tokio::test]
async fn tls_files_are_checked_by_check_config_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, hosts) = (dir.path().join("ca"), dir.path().join("hosts"));
    assert!(
        meshd(&[
            "ca",
            "init",
            "--trust-domain",
            "mesh.test",
            "--out",
            ca.to_str().unwrap()
        ])
        .status
        .success()
    );
    for node in ["n1", "n2"] {
        let o = meshd(&[
            "cert",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--node",
            node,
            "--out",
            hosts.to_str().unwrap(),
            "--days",
            "10",
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let check = |cfg: &str| {
        let path = dir.path().join("meshd.toml");
        std::fs::write(&path, cfg).unwrap();
        meshd(&["check-config", "--config", path.to_str().unwrap()])
    };
    let o = check(&tls_config(dir.path(), "n1", "n1", ""));
    assert!(o.status.success(), "{}", text(&o));

    // This node is n1 but the files are n2's.
    let o = check(&tls_config(dir.path(), "n1", "n2", ""));
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("tls.cert:")
            && text(&o).contains("for node \"n2\", but this node is \"n1\""),
        "{}",
        text(&o)
    );
    // n1's certificate with n2's key.
    let mixed = tls_config(dir.path(), "n1", "n1", "").replace("hosts/n1.key", "hosts/n2.key");
    let o = check(&mixed);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("tls.key:") && text(&o).contains("does not match"),
        "{}",
        text(&o)
    );
    // A missing file, a bad trust domain, a missing key.
    let o = check(&tls_config(dir.path(), "n1", "n9", ""));
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("tls.cert:") && text(&o).contains("n9.crt"),
        "{}",
        text(&o)
    );
    let o = check(&tls_config(dir.path(), "n1", "n1", "").replace("\"mesh.test\"", "\"Mesh\""));
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("tls.trust_domain"), "{}", text(&o));
    let no_key: String = tls_config(dir.path(), "n1", "n1", "")
        .lines()
        .filter(|l| !l.starts_with("key ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let o = check(&no_key);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("tls.key") && text(&o).contains("required"),
        "{}",
        text(&o)
    );

    // An agent started with good files exports its certificate's expiry.
    let cfg = meshd::config::Config::from_toml(&tls_config(dir.path(), "n1", "n1", "")).unwrap();
    let agent = common::start(cfg).await;
    let m = common::metrics(&agent).await;
    let expiry = common::sample(
        &m,
        "meshd_tls_cert_expiry_timestamp_seconds{spiffe_id=\"spiffe://mesh.test/node/n1\"}",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        (expiry - (now + 10.0 * 86400.0)).abs() < 120.0,
        "{expiry} vs {now}: {m}"
    );
    // Ten days left: still ready (an expiring certificate is a warning, not an outage), and /v1/config says so.
    common::wait_ready(agent.admin).await;
    let v = common::admin_json(&agent, "/v1/config").await;
    let days_left = v["tls"]["certificate"]["days_left"].as_i64().unwrap();
    assert!((9..=10).contains(&days_left), "{v}");
    agent.stop().await;
    // `meshd run` warns about it at start.
    let path = dir.path().join("expiring.toml");
    std::fs::write(&path, tls_config(dir.path(), "n1", "n1", "")).unwrap();
    let mut child = std::process::Command::new(MESHD)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut warned = None;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(100))
            && line.contains("expires within 14 days")
        {
            warned = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warned = warned.expect("no warning about the certificate expiring within 14 days");
    assert!(
        warned.contains("days_left=9") || warned.contains("days_left=10"),
        "{warned}"
    );
    // And refuses to start with bad ones.
    let bad = meshd::config::Config::from_toml(&tls_config(dir.path(), "n1", "n2", "")).unwrap();
    let err = meshd::app::build(bad)
        .await
        .err()
        .expect("started with another node's certificate");
    assert!(err.to_string().contains("tls.cert"), "{err}");
}
