//! Live reload: SIGHUP and `POST /v1/reload` re-read the config file. A valid new config is published to
//! every reader at once (policies apply to new requests; connections and endpoint statistics stay); an
//! invalid one is refused with its list of problems, counted, and the old one stays.
//!
//! Each reload also re-reads the `[tls]` files ([`crate::tls::reload`]): new ones are put in use for new
//! connections; refused ones leave the running certificate in place and make the reload report the refusal.
//!
//! Owns the config `watch` sender. Listener addresses and limits, the node name, Docker discovery, logging and
//! the TLS identity (on or off, trust domain) are read once at start: a change to them is reported as needing
//! a restart.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::discovery::static_file;
use crate::routing::{RoutingHandle, Source, Update};
use crate::tls::peers::PeerTls;
use crate::tls::reload::Outcome;

/// A reload request; the reply says what happened.
pub type Request = oneshot::Sender<Result<String, String>>;

/// Sends the routing table what the config declares: its services and its static endpoints.
pub fn apply_to_routing(config: &Config, routing: &RoutingHandle) {
    let declared: BTreeSet<String> = config.services.keys().cloned().collect();
    routing.update(Update::SetDeclared { services: declared });
    routing.update(Update::SetLocal {
        source: Source::Static,
        endpoints: static_file::endpoints(&config.discovery.static_),
    });
}

/// What a reload updates.
pub struct Targets {
    /// Where the new config is published.
    pub config: watch::Sender<Arc<Config>>,
    pub routing: RoutingHandle,
    /// The `[tls]` files in use, re-read with every reload.
    pub tls: Option<Arc<PeerTls>>,
    /// Gossip, whose keyring is re-read with every reload.
    pub membership: Option<crate::membership::Membership>,
    /// `meshd_config_reload_failures_total`
    pub failures: prometheus::IntCounter,
    /// `RELOADING=1` … `READY=1` around each reload under systemd.
    pub notifier: crate::systemd::Notifier,
}

/// Serves reload requests until `shutdown`.
pub async fn run(
    path: Option<PathBuf>,
    mut requests: mpsc::Receiver<Request>,
    targets: Targets,
    shutdown: CancellationToken,
) {
    let Targets {
        config,
        routing,
        tls,
        membership,
        failures,
        notifier,
    } = targets;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = requests.recv() => match r { Some(r) => Some(r), None => return },
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => None,
        };
        notifier.reloading();
        let outcome = reload(path.as_ref(), &config, &routing, tls.as_deref());
        // The gossip keyring is re-read with every reload that got past the config file, so keys rotate
        // install → use → remove by editing the file and sending SIGHUP.
        let keyring = match (&outcome, &membership) {
            (Err(Refused::Config(_)), _) | (_, None) => Ok(()),
            (_, Some(m)) => m.reload_keyring().await.map_err(|problems| {
                let problems = problems.join("; ");
                tracing::error!(%problems, "the gossip keyring is refused; the running keys stay in use");
                format!("gossip.keyring: refused, the running keys stay in use: {problems}")
            }),
        };
        let result = match (outcome, keyring) {
            (Ok(summary), Ok(())) => {
                tracing::info!(%summary, "configuration reloaded");
                Ok(summary)
            }
            (Ok(summary), Err(keys)) => Err(format!(
                "{keys} (the rest of the configuration was {summary})"
            )),
            (Err(Refused::Config(problems)), _) => {
                failures.inc();
                tracing::error!(%problems, "configuration reload refused; keeping the running configuration");
                Err(problems)
            }
            // Counted in meshd_tls_reload_failures_total by the TLS reload itself.
            (Err(Refused::Tls { problems, summary }), keyring) => {
                tracing::error!(
                    %problems,
                    "the [tls] files are refused; the running certificate stays in use (the rest of the \
                     configuration was applied)"
                );
                let tls = format!(
                    "tls: refused, the running certificate stays in use: {problems} (the rest of the \
                     configuration was {summary})"
                );
                Err(match keyring {
                    Ok(()) => tls,
                    Err(keys) => format!("{tls}; {keys}"),
                })
            }
        };
        notifier.reloaded(&match &result {
            Ok(summary) => format!("serving; configuration reloaded: {summary}"),
            Err(problems) => format!("serving; the last reload was refused: {problems}"),
        });
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

/// Why a reload was refused.
enum Refused {
    /// The config file: nothing was applied.
    Config(String),
    /// The `[tls]` files: the rest of the config was applied (`summary`), the running certificate stays.
    Tls { problems: String, summary: String },
}

fn reload(
    path: Option<&PathBuf>,
    config: &watch::Sender<Arc<Config>>,
    routing: &RoutingHandle,
    tls: Option<&PeerTls>,
) -> Result<String, Refused> {
    let Some(path) = path else {
        return Err(Refused::Config(
            "meshd was started without a config file: nothing to reload".into(),
        ));
    };
    // No file-watcher reload may interleave with this one, up to the publication of the new config.
    let _tls_guard = tls.map(|t| t.reload_lock());
    let text = std::fs::read_to_string(path)
        .map_err(|e| Refused::Config(format!("cannot read {}: {e}", path.display())))?;
    let mut new = Config::from_toml(&text).map_err(|e| Refused::Config(e.to_string()))?;
    let old = config.borrow().clone();
    let mut restart = Vec::new();
    if new.outbound.listen != old.outbound.listen {
        restart.push("outbound.listen");
    }
    if new.outbound.limits != old.outbound.limits
        || new.outbound.upgrade_idle_timeout != old.outbound.upgrade_idle_timeout
    {
        restart.push("outbound timeouts and max_connections");
    }
    if new.inbound != old.inbound {
        restart.push("inbound");
    }
    if new.admin != old.admin {
        restart.push("admin.listen");
    }
    if new.node != old.node {
        restart.push("node");
    }
    if new.log != old.log {
        restart.push("log");
    }
    if new.discovery.docker != old.discovery.docker {
        restart.push("discovery.docker");
    }
    // New file paths apply; turning TLS on or off, or another trust domain, needs a restart.
    let same_identity = match (&new.tls, &old.tls) {
        (Some(n), Some(o)) => n.trust_domain == o.trust_domain,
        (n, o) => n == o,
    };
    if !same_identity {
        restart.push("tls");
        new.tls = old.tls.clone();
    }
    // Re-read the certificate files (SIGHUP is how an operator says they changed) before the new config is
    // published, so /v1/config never names files that are not in use.
    let mut tls_refused = None;
    let mut tls_note = None;
    if let (Some(tls), Some(t)) = (tls, &new.tls) {
        match crate::tls::reload::reload(tls, t) {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Replaced) => tls_note = Some("new TLS certificate files in use"),
            Err(problems) => {
                tls_refused = Some(problems);
                new.tls = old.tls.clone();
            }
        }
    }
    // Settings read only at start keep their running values, so /v1/config shows what is in effect.
    new.outbound.listen = old.outbound.listen.clone();
    new.outbound.limits = old.outbound.limits;
    new.outbound.upgrade_idle_timeout = old.outbound.upgrade_idle_timeout;
    new.inbound = old.inbound.clone();
    new.admin = old.admin.clone();
    new.node = old.node.clone();
    new.log = old.log.clone();
    new.discovery.docker = old.discovery.docker.clone();
    apply_to_routing(&new, routing);
    config.send_replace(Arc::new(new));
    let mut summary = "applied".to_string();
    if let Some(note) = tls_note {
        summary = format!("{summary}; {note}");
    }
    if !restart.is_empty() {
        let keys = restart.join(", ");
        tracing::warn!(keys = %keys, "these settings changed but take effect only after a restart");
        summary = format!("{summary}; {keys} take effect after a restart");
    }
    match tls_refused {
        Some(problems) => Err(Refused::Tls { problems, summary }),
        None => Ok(summary),
    }
}
