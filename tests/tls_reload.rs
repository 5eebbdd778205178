//! Certificates replaced while agents run: new files are picked up (on change, `POST /v1/reload`; SIGHUP runs
//! the same reload, see tests/lifecycle.rs) for new
//! handshakes while established connections carry on; broken files are refused and counted, the running
//! certificate stays; a root rotation with two agents and traffic flowing fails no request. Also: steady traffic
//! between agents does no handshakes, and a reconnect resumes the TLS session.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use meshd::tls::identity::TrustDomain;
use meshd::tls::material::{Material, Sources};
use meshd::tls::pki::LoadedCa;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn td() -> TrustDomain {
    TrustDomain::parse("mesh.test").unwrap()
}

/// Writes `path` the way deployment tools do: a temporary file renamed over the old one.
fn put(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// A host's files in `dir`: `ca.crt` (the bundle), `<node>.crt`, `<node>.key`.
struct Host {
    dir: PathBuf,
    node: String,
}

impl Host {
    fn new(dir: &Path, node: &str) -> Host {
        std::fs::create_dir_all(dir).unwrap();
        Host {
            dir: dir.to_path_buf(),
            node: node.into(),
        }
    }
    fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.node))
    }
    fn key_path(&self) -> PathBuf {
        self.dir.join(format!("{}.key", self.node))
    }
    fn bundle(&self, cas: &[&LoadedCa]) {
        let pem: String = cas.iter().map(|c| c.cert_pem.clone()).collect();
        put(&self.ca_path(), &pem);
    }
    /// Issues a certificate from `ca` valid for `days`, writes it and its key; returns the certificate PEM.
    fn issue(&self, ca: &LoadedCa, days: u32) -> String {
        let host = ca.issue(&self.node, days, &[], &[]).unwrap();
        put(&self.key_path(), &host.key_pem);
        put(&self.cert_path(), &host.cert_pem);
        host.cert_pem
    }
    fn tls_section(&self) -> String {
        format!(
            "[tls]\ntrust_domain = \"mesh.test\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.ca_path().display(),
            self.cert_path().display(),
            self.key_path().display()
        )
    }
}

/// A test-side peer agent's material: node `node`, certificate from `ca`, trusting `cas`.
fn peer(ca: &LoadedCa, cas: &[&LoadedCa], node: &str) -> Material {
    let host = ca.issue(node, 30, &[], &[]).unwrap();
    let bundle: String = cas.iter().map(|c| c.cert_pem.clone()).collect();
    let src = Sources {
        ca: "bundle",
        cert: "cert",
        key: "key",
    };
    Material::from_pem(
        &td(),
        node,
        bundle.as_bytes(),
        host.cert_pem.as_bytes(),
        host.key_pem.as_bytes(),
        &src,
    )
    .unwrap()
}

/// A TLS handshake with the agent at `inbound` as `me`, expecting node `node`: the certificate it presented.
async fn handshake(
    inbound: std::net::SocketAddr,
    me: &Material,
    node: &str,
) -> Result<
    (
        Vec<u8>,
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ),
    String,
> {
    let tcp = tokio::net::TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(me.client_config(node)?);
    let name = rustls::pki_types::ServerName::try_from("meshd.invalid").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // The server's verdict on our certificate comes with its first reply: make it arrive.
    Ok((presented, tls))
}

/// The certificate the agent at `inbound` presents to a new connection now.
async fn presented(inbound: std::net::SocketAddr, me: &Material, node: &str) -> Vec<u8> {
    handshake(inbound, me, node).await.unwrap().0
}

/// An HTTP/2 connection to the agent at `inbound` over TLS as `me`.
async fn h2_over_tls(
    inbound: std::net::SocketAddr,
    me: &Material,
    node: &str,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let (_, tls) = handshake(inbound, me, node).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// A request over an agent-to-agent connection, as a peer agent sends it.
async fn peer_request(
    send: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    service: &str,
    endpoint: std::net::SocketAddr,
) -> StatusCode {
    let req = http::Request::get(format!("http://{service}/via-peer"))
        .header("mesh-service", service)
        .header("mesh-endpoint", endpoint.to_string())
        .body(full(""))
        .unwrap();
    send.send_request(req).await.unwrap().status()
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_file(dir: &Path, ip: &str, host: &Host, extra: &str) -> PathBuf {
    let text = agent_config(ip, &format!("{extra}{}", host.tls_section()))
        .replace("insecure_plaintext = true", "insecure_plaintext = false");
    let path = dir.join(format!("{ip}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn reload_failures(agent: &Agent) -> f64 {
    sample(&metrics(agent).await, "meshd_tls_reload_failures_total")
}

#[tokio::test]
async fn new_certificate_files_are_used_for_new_handshakes_and_broken_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LoadedCa::generate(&td(), 30).unwrap();
    let node = "node-127.0.0.21";
    let host = Host::new(&dir.path().join("b"), node);
    host.bundle(&[&ca]);
    let first = host.issue(&ca, 10);
    let backend = backend("far").await;
    let cfg = agent_file(
        dir.path(),
        "127.0.0.21",
        &host,
        &format!(
            "[[discovery.static]]\nservice = \"far\"\nendpoints = [\"{}\"]\n",
            backend.addr
        ),
    );
    let b = start_from_file(&cfg).await;
    let me = peer(&ca, &[&ca], "node-test");
    assert_eq!(presented(b.inbound, &me, node).await, der(&first));
    let mut established = h2_over_tls(b.inbound, &me, node).await;
    assert_eq!(
        peer_request(&mut established, "far", backend.addr).await,
        StatusCode::OK
    );

    // A new certificate written over the old one is picked up from disk, with no signal.
    let second = host.issue(&ca, 20);
    wait_until("the agent presents the new certificate", || async {
        presented(b.inbound, &me, node).await == der(&second)
    })
    .await;
    assert_eq!(
        peer_request(&mut established, "far", backend.addr).await,
        StatusCode::OK,
        "a connection made before the reload carries on"
    );
    let expiry = x509_parser::parse_x509_certificate(&der(&second))
        .unwrap()
        .1
        .validity()
        .not_after
        .timestamp();
    let m = metrics(&b).await;
    assert_eq!(
        sample(
            &m,
            &format!(
                "meshd_tls_cert_expiry_timestamp_seconds{{spiffe_id=\"spiffe://mesh.test/node/{node}\"}}"
            )
        ),
        expiry as f64,
        "{m}"
    );
    // /v1/config shows the certificate in use, never the key.
    let v = admin_json(&b, "/v1/config").await;
    let c = &v["tls"]["certificate"];
    assert_eq!(c["spiffe_id"], format!("spiffe://mesh.test/node/{node}"));
    assert!(c["issuer"].as_str().unwrap().contains("mesh.test"), "{v}");
    assert!(!c["subject"].as_str().unwrap().is_empty(), "{v}");
    let days = c["days_left"].as_i64().unwrap();
    assert!((19..=20).contains(&days), "{v}");
    let date = time::OffsetDateTime::from_unix_timestamp(expiry)
        .unwrap()
        .date();
    assert!(
        c["not_after"]
            .as_str()
            .unwrap()
            .starts_with(&date.to_string()),
        "{v}"
    );
    assert_eq!(v["tls"]["trusted_cas"].as_array().unwrap().len(), 1, "{v}");
    assert!(!v.to_string().contains("PRIVATE KEY"), "{v}");
    assert_eq!(reload_failures(&b).await, 0.0);

    // Broken files: refused when they appear on disk (once, not at every look), refused again by an explicit
    // reload, and the running certificate stays in use.
    let other = LoadedCa::generate(&TrustDomain::parse("other.test").unwrap(), 30).unwrap();
    let foreign = other.issue(node, 30, &[], &[]).unwrap();
    let unrelated = ca.issue(node, 30, &[], &[]).unwrap();
    let second_key = std::fs::read_to_string(host.key_path()).unwrap();
    type Breaker = Box<dyn Fn(&Host)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "a key that does not match the certificate",
            Box::new(move |h: &Host| put(&h.key_path(), &unrelated.key_pem)),
            "does not match",
        ),
        (
            "a certificate of another trust domain",
            Box::new(move |h: &Host| {
                put(&h.key_path(), &foreign.key_pem);
                put(&h.cert_path(), &foreign.cert_pem);
            }),
            "another trust domain",
        ),
        (
            "an unreadable key file",
            Box::new(|h: &Host| std::fs::remove_file(h.key_path()).unwrap()),
            "tls.key",
        ),
    ];
    let mut failures = 0.0;
    for (i, (what, break_it, why)) in cases.iter().enumerate() {
        // Back to the good pair first, so each case breaks one thing.
        put(&host.key_path(), &second_key);
        put(&host.cert_path(), &second);
        break_it(&host);
        wait_until(&format!("{what} is refused from disk"), || async {
            reload_failures(&b).await > failures
        })
        .await;
        failures += 1.0;
        if i == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(
                reload_failures(&b).await,
                failures,
                "the same broken files were counted again"
            );
        }
        let got = admin_post(&b, "/v1/reload").await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{what}: {got:?}");
        assert!(got.body.contains(why), "{what}: {}", got.body);
        failures += 1.0;
        assert_eq!(reload_failures(&b).await, failures, "{what}");
        assert_eq!(
            presented(b.inbound, &me, node).await,
            der(&second),
            "{what}: the running certificate must stay"
        );
    }

    // Good files again: an explicit reload puts them in use before it answers.
    let third = host.issue(&ca, 25);
    let got = admin_post(&b, "/v1/reload").await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(presented(b.inbound, &me, node).await, der(&third));
    assert_eq!(
        peer_request(&mut established, "far", backend.addr).await,
        StatusCode::OK
    );
    assert_eq!(reload_failures(&b).await, failures);
    b.stop().await;
}

#[tokio::test]
async fn a_root_rotation_with_traffic_flowing_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let old_root = LoadedCa::generate(&td(), 30).unwrap();
    let new_root = LoadedCa::generate(&td(), 30).unwrap();
    let (ip_a, ip_b) = ("127.0.0.22", "127.0.0.23");
    let host_a = Host::new(&dir.path().join("a"), &format!("node-{ip_a}"));
    let host_b = Host::new(&dir.path().join("b"), &format!("node-{ip_b}"));
    for h in [&host_a, &host_b] {
        h.bundle(&[&old_root]);
        h.issue(&old_root, 30);
    }
    let backend = backend("far").await;
    // B serves the backend under one service name per phase: each phase's first request opens a new
    // connection, so every phase makes a handshake with the material of that moment.
    let phases: Vec<String> = (0..5).map(|i| format!("far{i}")).collect();
    let phase_names: Vec<&str> = phases.iter().map(String::as_str).collect();
    let statics: String = phases
        .iter()
        .map(|s| {
            format!(
                "[[discovery.static]]\nservice = \"{s}\"\nendpoints = [\"{}\"]\n",
                backend.addr
            )
        })
        .collect();
    let declared: String = phases.iter().map(|s| format!("[services.{s}]\n")).collect();
    let b = start_from_file(&agent_file(dir.path(), ip_b, &host_b, &statics)).await;
    let a = start_from_file(&agent_file(dir.path(), ip_a, &host_a, &declared)).await;
    learn_remote(&a, &host_b.node, b.inbound, &phase_names, backend.addr).await;
    assert_eq!(get(&a, "far0", "/").await.status, StatusCode::OK);

    // Steady traffic through the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = a.url("/steady");
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
            tokio::spawn(async move {
                let client = h1_client();
                while !stop.load(Ordering::SeqCst) {
                    let req = http::Request::get(&url)
                        .header("host", "far0")
                        .body(full(""))
                        .unwrap();
                    match client.request(req).await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            let _ = read(r).await;
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            eprintln!("failed: {:?}", read(r).await);
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            eprintln!("failed: {e}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();

    // A new connection from A to B in this phase: it must succeed with a new handshake.
    let mut phase = 1;
    let mut new_connection = async |why: &str| {
        let before = outbound_handshakes(&a).await;
        let got = get(&a, &phases[phase], "/").await;
        assert_eq!(got.status, StatusCode::OK, "{why}: {got:?}");
        assert_eq!(
            outbound_handshakes(&a).await,
            before + 1.0,
            "{why}: no new handshake"
        );
        phase += 1;
    };

    // 1. Both agents trust both roots (POST /v1/reload).
    for (h, agent) in [(&host_a, &a), (&host_b, &b)] {
        h.bundle(&[&old_root, &new_root]);
        let got = admin_post(agent, "/v1/reload").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(
            admin_json(agent, "/v1/config").await["tls"]["trusted_cas"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
    new_connection("both roots trusted").await;

    // 2. Every host gets a certificate from the new root, one at a time (picked up from disk).
    let new_issuer = |agent: &Agent| {
        let admin = agent.admin;
        async move {
            let req = http::Request::get(format!("http://{admin}/v1/config"))
                .body(full(""))
                .unwrap();
            let got = read(h1_client().request(req).await.unwrap()).await;
            let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
            v["tls"]["certificate"]["days_left"] == 19
        }
    };
    host_b.issue(&new_root, 20);
    wait_until("B uses its new certificate", || new_issuer(&b)).await;
    new_connection("B reissued, A not yet").await;
    host_a.issue(&new_root, 20);
    wait_until("A uses its new certificate", || new_issuer(&a)).await;
    new_connection("both reissued").await;

    // 3. The old root leaves every bundle (an explicit reload on each: the reply comes once it is in use).
    for (h, agent) in [(&host_a, &a), (&host_b, &b)] {
        h.bundle(&[&new_root]);
        let got = admin_post(agent, "/v1/reload").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
    }
    let old_peer = peer(&old_root, &[&old_root, &new_root], "node-old");
    for agent in [&a, &b] {
        wait_until("the old root is no longer trusted", || async {
            admin_json(agent, "/v1/config").await["tls"]["trusted_cas"]
                .as_array()
                .unwrap()
                .len()
                == 1
        })
        .await;
    }
    new_connection("old root removed").await;
    // A peer still holding a certificate of the old root is refused now.
    let refused = match handshake(b.inbound, &old_peer, &host_b.node).await {
        Err(_) => true,
        Ok((_, mut tls)) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(
                tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            )
        }
    };
    assert!(refused, "a certificate of the removed root was accepted");
    let m = metrics(&b).await;
    assert!(
        sample(
            &m,
            "meshd_tls_handshake_errors_total{direction=\"inbound\",reason=\"unknown-ca\"}"
        ) >= 1.0,
        "{m}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for t in traffic {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(failed, 0, "{failed} requests failed during the rotation");
    assert!(ok > 100, "only {ok} requests went through");
    for agent in [&a, &b] {
        assert_eq!(reload_failures(agent).await, 0.0);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn steady_traffic_between_agents_does_no_handshakes_and_a_reconnect_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LoadedCa::generate(&td(), 30).unwrap();
    let (ip_a, ip_b) = ("127.0.0.24", "127.0.0.25");
    let host_a = Host::new(&dir.path().join("a"), &format!("node-{ip_a}"));
    let host_b = Host::new(&dir.path().join("b"), &format!("node-{ip_b}"));
    for h in [&host_a, &host_b] {
        h.bundle(&[&ca]);
        h.issue(&ca, 30);
    }
    let backend = backend("far").await;
    // B closes agent connections idle for 1 s, so the test can see a reconnect.
    let text = std::fs::read_to_string(agent_file(
        dir.path(),
        ip_b,
        &host_b,
        &format!(
            "[[discovery.static]]\nservice = \"far\"\nendpoints = [\"{}\"]\n",
            backend.addr
        ),
    ))
    .unwrap()
    .replace(
        "insecure_plaintext = false",
        "insecure_plaintext = false\nidle_timeout = \"1s\"",
    );
    let b = start(meshd::config::Config::from_toml(&text).unwrap()).await;
    let a = start_from_file(&agent_file(dir.path(), ip_a, &host_a, "[services.far]\n")).await;
    learn_remote(&a, &host_b.node, b.inbound, &["far"], backend.addr).await;

    // 10,000 requests, 300 of them at once at the start: one connection, one handshake. (An untrusted client
    // may open 100 streams per connection; an authenticated agent 1,000.)
    backend.faults.set_delay(300);
    let burst: Vec<_> = (0..300)
        .map(|_| {
            let url = a.url("/burst");
            tokio::spawn(async move {
                let req = http::Request::get(url)
                    .header("host", "far")
                    .body(full(""))
                    .unwrap();
                h1_client().request(req).await.unwrap().status()
            })
        })
        .collect();
    for r in burst {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    assert!(backend.max_in_flight.load(Ordering::SeqCst) > 100);
    backend.faults.set_delay(0);
    let done = Arc::new(AtomicUsize::new(300));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (done, url) = (done.clone(), a.url("/steady"));
            tokio::spawn(async move {
                let client = h1_client();
                while done.fetch_add(1, Ordering::SeqCst) < 10_000 {
                    let req = http::Request::get(&url)
                        .header("host", "far")
                        .body(full(""))
                        .unwrap();
                    let r = client.request(req).await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                    let _ = read(r).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert!(backend.requests.load(Ordering::SeqCst) >= 10_000);
    let m = metrics(&a).await;
    let series = |kind: &str| {
        format!("meshd_tls_handshakes_total{{direction=\"outbound\",kind=\"{kind}\"}}")
    };
    assert_eq!(sample(&m, &series("full")), 1.0, "{m}");
    assert_eq!(sample(&m, &series("resumed")), 0.0, "{m}");

    // B closes the idle connection; the next request reconnects and resumes the session.
    wait_until("B closes the idle connection", || async {
        admin_json(&a, "/v1/services")
            .await
            .to_string()
            .contains("\"connections\":0")
    })
    .await;
    assert_eq!(get(&a, "far", "/again").await.status, StatusCode::OK);
    let m = metrics(&a).await;
    assert_eq!(sample(&m, &series("full")), 1.0, "{m}");
    assert_eq!(sample(&m, &series("resumed")), 1.0, "{m}");
    let m = metrics(&b).await;
    assert_eq!(
        sample(
            &m,
            "meshd_tls_handshakes_total{direction=\"inbound\",kind=\"resumed\"}"
        ),
        1.0,
        "{m}"
    );
    a.stop().await;
    b.stop().await;
}
