//! New certificate files without a restart: on SIGHUP and `POST /v1/reload` (through [`crate::reload`]), and
//! when the files change on disk ([`watch`]). New handshakes use the new material; established connections
//! carry on. Files that cannot be read, do not parse, do not belong together or name another identity are
//! refused: the running material stays, the refusal is logged and counted in `meshd_tls_reload_failures_total`.
//!
//! The identity is fixed while the agent runs: new files must be for the same node of the same trust domain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::peers::PeerTls;
use super::{Files, check, read_files};
use crate::config::{Config, TlsConfig};

/// How often the watcher looks at the files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// After a change is seen, how long the files must stay the same before they are loaded: a certificate and its
/// key are rarely replaced in one step, and a half-written pair is not worth a refusal.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the certificate's expiry is checked for the warning.
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 3600);

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The files are the ones in use.
    Unchanged,
    /// New material is in use.
    Replaced,
}

/// Reads the files `t` names and puts them in use if they differ from the running ones and pass every check.
/// The caller holds [`PeerTls::reload_lock`].
pub fn reload(tls: &PeerTls, t: &TlsConfig) -> Result<Outcome, String> {
    match read_files(t) {
        Ok(files) if tls.is_running(&files) => Ok(Outcome::Unchanged),
        Ok(files) => apply(tls, t, files).map(|()| Outcome::Replaced),
        Err(problems) => {
            tls.reload_failed();
            Err(join(&problems))
        }
    }
}

/// Checks `files` against the running identity and puts them in use; a refusal is counted.
fn apply(tls: &PeerTls, t: &TlsConfig, files: Files) -> Result<(), String> {
    let running = tls.material();
    let result = check(t, &running.id.trust_domain, &running.id.node, &files)
        .map_err(|p| join(&p))
        .and_then(|material| tls.replace(material, files));
    match &result {
        Ok(()) => installed(tls),
        Err(_) => tls.reload_failed(),
    }
    result
}

fn installed(tls: &PeerTls) {
    let m = tls.material();
    tracing::info!(
        spiffe_id = %m.id,
        subject = %m.subject,
        issuer = %m.issuer,
        expires = %m.expires(),
        trusted_cas = m.anchors.len(),
        "new TLS certificate files are in use for new connections"
    );
    m.warn_if_expiring();
}

fn join(problems: &[(&'static str, String)]) -> String {
    problems
        .iter()
        .map(|(k, m)| format!("{k}: {m}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Watches the `[tls]` files until `shutdown`, loading them when they change, and warns daily while the host
/// certificate is close to expiry. Files that fail the checks are refused (logged and counted) when they are
/// still the same at the next look, and once, not at every look.
pub async fn watch(
    tls: Arc<PeerTls>,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The start-up warning has just been given.
    let mut next_expiry_check = tokio::time::Instant::now() + EXPIRY_CHECK;
    let mut refused = None;
    // Refused files seen once; refused for good if they are still there at the next look.
    let mut pending = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if tokio::time::Instant::now() >= next_expiry_check {
            next_expiry_check += EXPIRY_CHECK;
            tls.material().warn_if_expiring();
        }
        let Some(t) = config.borrow().tls.clone() else {
            continue;
        };
        let seen = read_files(&t);
        if let Ok(files) = &seen
            && tls.is_running(files)
        {
            refused = None;
            continue;
        }
        if refused.as_ref() == Some(&seen) {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SETTLE) => {}
        }
        let _guard = tls.reload_lock();
        // The paths again, under the lock: an explicit reload may have just changed them.
        let Some(t) = config.borrow().tls.clone() else {
            continue;
        };
        let settled = read_files(&t);
        if settled != seen {
            // Still being written (or just reloaded): look again at the next tick.
            continue;
        }
        let checked = match &settled {
            Ok(files) if tls.is_running(files) => continue,
            Ok(files) => check(&t, &running_td(&tls), &tls.material().id.node, files)
                .map(|m| (m, files.clone()))
                .map_err(|p| join(&p)),
            Err(problems) => Err(join(problems)),
        };
        match checked {
            Ok((material, files)) => {
                if let Err(e) = tls.replace(material, files) {
                    tls.reload_failed();
                    tracing::error!(problems = %e, "the new [tls] files are refused; the running certificate stays in use");
                } else {
                    installed(&tls);
                }
                pending = None;
            }
            // Refused only if still so at the next look: a certificate and key replaced a few seconds apart
            // are not worth an alert.
            Err(_) if pending.as_ref() != Some(&seen) => pending = Some(seen),
            Err(problems) => {
                tls.reload_failed();
                tracing::error!(
                    %problems,
                    "the [tls] files changed but are refused; the running certificate stays in use"
                );
                refused = Some(seen);
                pending = None;
            }
        }
    }
}

fn running_td(tls: &PeerTls) -> super::identity::TrustDomain {
    tls.material().id.trust_domain.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::TrustDomain;
    use crate::tls::material::{Material, Sources};
    use crate::tls::pki::LoadedCa;

    /// Log lines, as the fmt subscriber writes them.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn count(&self, needle: &str) -> usize {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
                .into_owned();
            text.matches(needle).count()
        }
    }

    async fn let_it_run() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warns_once_a_day_while_the_certificate_is_close_to_expiry() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _log = tracing::subscriber::set_default(subscriber);

        let td = TrustDomain::parse("mesh.test").unwrap();
        let ca = LoadedCa::generate(&td, 30).unwrap();
        let host = ca.issue("n1", 5, &[], &[]).unwrap();
        let src = Sources {
            ca: "ca",
            cert: "cert",
            key: "key",
        };
        let material = Material::from_pem(
            &td,
            "n1",
            ca.cert_pem.as_bytes(),
            host.cert_pem.as_bytes(),
            host.key_pem.as_bytes(),
            &src,
        )
        .unwrap();
        let metrics = crate::telemetry::Metrics::new();
        let tls = Arc::new(PeerTls::new(material, None, metrics.tls.clone()).unwrap());
        let (_config, rx) = watch::channel(Arc::new(Config::from_toml("").unwrap()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(tls, rx, stop.clone()));

        let warning = "expires within 14 days";
        let_it_run().await;
        // The start-up warning is the caller's; the watcher's first comes a day later, then one a day.
        assert_eq!(lines.count(warning), 0);
        tokio::time::advance(Duration::from_secs(23 * 3600)).await;
        let_it_run().await;
        assert_eq!(lines.count(warning), 0);
        tokio::time::advance(Duration::from_secs(3600 + 5)).await;
        let_it_run().await;
        assert_eq!(lines.count(warning), 1);
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        let_it_run().await;
        assert_eq!(lines.count(warning), 2);
        stop.cancel();
        task.await.unwrap();
    }
}
