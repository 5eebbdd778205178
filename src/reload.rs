//! Live reload: SIGHUP and `POST /v1/reload` re-read the config file. A valid new config is published to
//! every reader at once (policies apply to new requests; connections and endpoint statistics stay); an
//! invalid one is refused with its list of problems, counted, and the old one stays.
//!
//! Owns the config `watch` sender. Listener addresses and limits, the node name, Docker discovery and logging
//! are read once at start: a change to them is reported as needing a restart.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::discovery::static_file;
use crate::routing::{RoutingHandle, Source, Update};

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

/// Serves reload requests until `shutdown`.
pub async fn run(
    path: Option<PathBuf>,
    mut requests: mpsc::Receiver<Request>,
    config: watch::Sender<Arc<Config>>,
    routing: RoutingHandle,
    failures: prometheus::IntCounter,
    shutdown: CancellationToken,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = requests.recv() => match r { Some(r) => Some(r), None => return },
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => None,
        };
        let result = reload(path.as_ref(), &config, &routing);
        match &result {
            Ok(summary) => tracing::info!(%summary, "configuration reloaded"),
            Err(problems) => {
                failures.inc();
                tracing::error!(%problems, "configuration reload refused; keeping the running configuration");
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

fn reload(
    path: Option<&PathBuf>,
    config: &watch::Sender<Arc<Config>>,
    routing: &RoutingHandle,
) -> Result<String, String> {
    let Some(path) = path else {
        return Err("meshd was started without a config file: nothing to reload".into());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut new = Config::from_toml(&text).map_err(|e| e.to_string())?;
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
    // The [tls] files are read at start (hot reload of certificates is still to come).
    if new.tls != old.tls {
        restart.push("tls");
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
    new.tls = old.tls.clone();
    apply_to_routing(&new, routing);
    config.send_replace(Arc::new(new));
    Ok(if restart.is_empty() {
        "applied".to_string()
    } else {
        let keys = restart.join(", ");
        tracing::warn!(keys = %keys, "these settings changed but take effect only after a restart");
        format!("applied; {keys} take effect after a restart")
    })
}
