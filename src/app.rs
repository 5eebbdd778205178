//! Wiring: builds every subsystem from a [`Config`], binds the listeners (failing early), and runs them until
//! the shutdown future resolves; then drains and returns.
//!
//! `build` returns a [`Bound`] with the real listener addresses, so tests bind port 0 and read them back.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::docker;
use crate::proxy::inbound::{Inbound, InboundHandler};
use crate::proxy::outbound::{Outbound, OutboundHandler};
use crate::proxy::pool::{SWEEP_INTERVAL, Upstreams};
use crate::proxy::server::{self, Options, Versions};
use crate::proxy::spans::Tracer;
use crate::proxy::tunnel::Tunnels;
use crate::readiness::Readiness;
use crate::reload;
use crate::routing::{Router, RoutingHandle, Source, Table};
use crate::systemd::READY_NOTIFY_LIMIT;
use crate::telemetry::requests::Observers;
use crate::telemetry::trace::{ExportConfig, Exporter};
use crate::telemetry::{Direction, Metrics};

/// After leaving the gossip cluster, listeners stay open this long (at most half the drain timeout) while
/// peers learn of the leave.
pub const LEAVE_GRACE: Duration = Duration::from_millis(1500);

/// An agent whose listeners are bound but not yet serving.
pub struct Bound {
    pub config: Arc<Config>,
    /// The file `POST /v1/reload` and SIGHUP re-read; `None` (e.g. `meshd dev`) refuses reloads.
    pub config_path: Option<PathBuf>,
    /// Actual outbound addresses, in `outbound.listen` order.
    pub outbound: Vec<SocketAddr>,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The gossip socket's address (`[gossip]`).
    pub gossip: Option<SocketAddr>,
    /// Send endpoint updates (the gossip layer uses this for other nodes' endpoints).
    pub routing: RoutingHandle,
    pub table: watch::Receiver<Arc<Table>>,
    pub metrics: Metrics,
    outbound_listeners: Vec<TcpListener>,
    inbound_listener: TcpListener,
    admin_listener: TcpListener,
    router: Router,
    /// Mutual TLS with peer agents (`[tls]`).
    tls: Option<Arc<crate::tls::peers::PeerTls>>,
    gossip_socket: Option<crate::membership::Bound>,
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

/// Raises the soft limit on open files to the hard limit: a proxy holds two descriptors per request in flight,
/// and the usual soft limit of 1,024 would block it after a few hundred idle connections.
fn raise_open_file_limit(config: &Config) {
    let wanted = config.outbound.limits.max_connections * config.outbound.listen.len()
        + config.inbound.limits.max_connections
        + config.admin.limits.max_connections;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open file limit");
            // Each client connection may need an upstream one as well.
            if (limit as usize) < 2 * wanted {
                tracing::warn!(
                    limit,
                    max_connections = wanted,
                    "the open file limit is below twice the listeners' max_connections: raise LimitNOFILE \
                     (or ulimit -n), or lower max_connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

/// Binds every listener and prepares the subsystems, with the `[tls]` files of `config` when it has them.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    build_with(config, None).await
}

/// As [`build`], with TLS material made elsewhere (`meshd dev`'s in-memory CA) when `material` is given.
pub async fn build_with(
    config: Config,
    material: Option<crate::tls::material::Material>,
) -> anyhow::Result<Bound> {
    raise_open_file_limit(&config);
    let mut outbound_listeners = Vec::new();
    for (i, addr) in config.outbound.listen.iter().enumerate() {
        outbound_listeners.push(bind(*addr, &format!("outbound.listen[{i}]")).await?);
    }
    let inbound_listener = bind(config.inbound.listen, "inbound.listen").await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let gossip_socket = crate::membership::bind(&config, inbound_listener.local_addr()?).await?;
    let loaded = match material {
        Some(m) => Some((m, None)),
        None => crate::tls::load(&config)
            .map_err(|problems| {
                let list: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
                anyhow::anyhow!("[tls]: {}", list.join("; "))
            })?
            .map(|(m, files)| (m, Some(files))),
    };
    let metrics = Metrics::new();
    let tls = match loaded {
        Some((m, files)) => {
            m.warn_if_expiring();
            Some(Arc::new(
                crate::tls::peers::PeerTls::new(m, files, metrics.tls.clone())
                    .map_err(|e| anyhow::anyhow!("[tls]: {e}"))?,
            ))
        }
        None => None,
    };
    let (router, routing, table) = Router::new();
    Ok(Bound {
        outbound: outbound_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?,
        inbound: inbound_listener.local_addr()?,
        admin: admin_listener.local_addr()?,
        gossip: gossip_socket.as_ref().map(|g| g.local_addr()),
        gossip_socket,
        config: Arc::new(config),
        config_path: None,
        routing,
        table,
        metrics,
        outbound_listeners,
        inbound_listener,
        admin_listener,
        router,
        tls,
    })
}

impl Bound {
    /// Names the file that reloads re-read.
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Serves until `shutdown` resolves, then stops accepting, drains in-flight requests for at most
    /// `node.drain_timeout`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Bound {
            config,
            config_path,
            routing,
            table,
            metrics,
            outbound_listeners,
            inbound_listener,
            admin_listener,
            router,
            tls,
            outbound: outbound_addrs,
            inbound: inbound_addr,
            admin: admin_addr,
            gossip: _,
            gossip_socket,
        } = self;
        let stop_router = CancellationToken::new();
        let stop_proxies = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let readiness = Readiness::new();
        let discovery_synced = readiness.token();

        let local_endpoints = router.local_endpoints();
        let router_task = tokio::spawn(
            router
                .with_breaker_gauge(metrics.policy.breaker_open.clone())
                .run(stop_router.clone()),
        );
        let upstreams = Upstreams::new(metrics.upstream.clone(), tls.clone());
        // Gossip: other hosts' endpoints flow into the routing table; /ready waits for the first join.
        let stop_gossip = CancellationToken::new();
        let (membership, gossip_task) = match gossip_socket {
            Some(g) => {
                let (m, task) = g.start(
                    routing.clone(),
                    local_endpoints,
                    upstreams.clone(),
                    metrics.gossip.clone(),
                    readiness.token(),
                    stop_gossip.clone(),
                );
                (Some(m), Some(task))
            }
            None => (None, None),
        };
        let notifier = crate::systemd::Notifier::from_env();
        let (config_tx, config_rx) = watch::channel(config.clone());
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let reloader = tokio::spawn(reload::run(
            config_path,
            reload_rx,
            reload::Targets {
                config: config_tx,
                routing: routing.clone(),
                tls: tls.clone(),
                membership: membership.clone(),
                failures: metrics.config_reload_failures.clone(),
                notifier: notifier.clone(),
            },
            stop_router.clone(),
        ));
        // New certificate files are picked up when they change on disk, too.
        let tls_watcher = match (&tls, &config.tls) {
            (Some(t), Some(_)) => Some(tokio::spawn(crate::tls::reload::watch(
                t.clone(),
                config_rx.clone(),
                stop_router.clone(),
            ))),
            _ => None,
        };
        let table_watch = {
            let mut table = table.clone();
            let gauge = metrics.discovery.endpoints.clone();
            tokio::spawn(async move {
                loop {
                    let counts = table.borrow_and_update().local_counts();
                    for src in [Source::Static, Source::Docker] {
                        gauge
                            .with_label_values(&[src.as_str()])
                            .set(counts.get(&src).copied().unwrap_or(0) as i64);
                    }
                    if table.changed().await.is_err() {
                        return;
                    }
                }
            })
        };

        // Docker discovery, when enabled, follows the daemon on its own; /ready waits for its first sync.
        let (docker_task, docker_status) = docker::spawn(
            &config,
            routing.clone(),
            table.clone(),
            metrics.discovery.clone(),
            readiness.token(),
            stop_router.clone(),
        );

        // Static discovery and declared services are known at once.
        reload::apply_to_routing(&config, &routing);
        let mut synced = table.clone();
        let expect_static = !config.discovery.static_.is_empty() || !config.services.is_empty();
        if expect_static {
            // Ready only once the first table holding them is published.
            let _ = synced.wait_for(|t| !t.services.is_empty()).await;
        }
        discovery_synced.ready();

        let sweeper = tokio::spawn(sweep_pools(table.clone(), stop_router.clone()));
        let drain = config.node.drain_timeout;
        let outbound_tunnels = Tunnels::new(metrics.tunnels.clone(), Direction::Outbound.as_str());
        let inbound_tunnels = Tunnels::new(metrics.tunnels.clone(), Direction::Inbound.as_str());
        let mut proxies = JoinSet::new();
        // Tracing, with a collector to send spans to: one exporter task per collector, stopped after the drain.
        let stop_exporter = CancellationToken::new();
        let (tracer, exporter_task) = if config.tracing.enabled() {
            let mut export = ExportConfig::new(Arc::from(config.node.name.as_str()));
            export.zipkin = config.tracing.zipkin.clone();
            export.otlp = config.tracing.otlp.clone();
            let (sink, task) =
                Exporter::spawn(export, metrics.trace.clone(), stop_exporter.clone())?;
            (
                Tracer::new(sink, &config.tracing, &config.node.name),
                Some(task),
            )
        } else {
            (Tracer::disabled(), None)
        };
        let observers = Observers::new(&config.log, metrics.access_log_dropped.clone(), tracer)
            .context("log.access")?;
        let outbound = OutboundHandler(Arc::new(Outbound {
            config: config_rx.clone(),
            table: table.clone(),
            upstreams: upstreams.clone(),
            metrics: metrics.proxy.clone(),
            policy_metrics: metrics.policy.clone(),
            tunnels: outbound_tunnels.clone(),
            observers: observers.clone(),
        }));
        let outbound_opts = Options {
            direction: Direction::Outbound,
            versions: Versions::Auto,
            limits: config.outbound.limits,
            drain,
            follow_framing: true,
            tls: None,
        };
        for listener in outbound_listeners {
            proxies.spawn(server::serve(
                listener,
                outbound_opts.clone(),
                outbound.clone(),
                metrics.proxy.clone(),
                stop_proxies.clone(),
            ));
        }
        if let Some(t) = &tls {
            tracing::info!(identity = %t.material().id, "the inbound listener accepts peer agents over mutual TLS");
        } else if config.inbound.insecure_plaintext {
            tracing::warn!(
                "inbound.insecure_plaintext = true: peer agents are accepted over plaintext HTTP/2 without \
                 authentication; use this only on a trusted test network"
            );
        } else {
            tracing::warn!(
                "the inbound listener refuses every request: there is no [tls] section; add one (see \
                 docs/security.md) or set inbound.insecure_plaintext = true to accept plaintext peers (tests only)"
            );
        }
        proxies.spawn(server::serve(
            inbound_listener,
            Options {
                direction: Direction::Inbound,
                versions: Versions::H2Only,
                limits: config.inbound.limits,
                drain,
                follow_framing: false,
                tls: tls.clone(),
            },
            InboundHandler(Arc::new(Inbound {
                config: config_rx.clone(),
                table: table.clone(),
                upstreams,
                metrics: metrics.proxy.clone(),
                tunnels: inbound_tunnels.clone(),
                sync: membership.as_ref().map(|m| m.sync.clone()),
                observers: observers.clone(),
            })),
            metrics.proxy.clone(),
            stop_proxies.clone(),
        ));
        let admin_router = admin::router(AdminState {
            config: config_rx.clone(),
            reload: reload_tx,
            table: table.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            docker: docker_status,
            tls: tls.clone(),
            membership: membership.clone(),
            observers,
            draining: stop_proxies.clone(),
        });
        let admin_task = tokio::spawn(server::serve_with(
            admin_listener,
            Options {
                direction: Direction::Admin,
                versions: Versions::Auto,
                limits: config.admin.limits,
                drain,
                follow_framing: false,
                tls: None,
            },
            metrics.proxy.clone(),
            stop_admin.clone(),
            move |_| hyper_util::service::TowerToHyperService::new(admin_router.clone()),
        ));
        for l in &outbound_addrs {
            tracing::info!(direction = "outbound", addr = %l, "listening");
        }
        tracing::info!(direction = "inbound", addr = %inbound_addr, "listening");
        tracing::info!(direction = "admin", addr = %admin_addr, "listening");
        tracing::info!(node = %config.node.name, "meshd is serving");
        let stop_watchdog = CancellationToken::new();
        if notifier.enabled() {
            tokio::spawn(notify_ready(
                notifier.clone(),
                readiness.clone(),
                membership.clone(),
            ));
            if let Some(interval) = crate::systemd::watchdog_interval() {
                let (notifier, routing, membership) =
                    (notifier.clone(), routing.clone(), membership.clone());
                let stop = stop_watchdog.clone();
                tokio::spawn(async move {
                    let probe = || {
                        let (routing, membership) = (routing.clone(), membership.clone());
                        async move {
                            if !routing.is_alive() {
                                return Err("the router has stopped".to_string());
                            }
                            if let Some(m) = membership
                                && !m.ping(interval / 2).await
                            {
                                return Err("the gossip task does not answer".to_string());
                            }
                            Ok(())
                        }
                    };
                    crate::systemd::watchdog(&notifier, interval, probe, stop).await
                });
            }
        }

        shutdown.await;
        notifier.stopping();
        stop_watchdog.cancel();
        readiness.set_draining();
        let drain_deadline = tokio::time::Instant::now() + drain;
        if let Some(m) = &membership {
            // Leave first, and keep serving for a moment: peers learn that this host is gone and stop
            // sending to it before its listeners close, so a rolling restart fails no request.
            m.leave(Duration::from_secs(1)).await;
            tracing::info!("left the gossip cluster");
            tokio::time::sleep(LEAVE_GRACE.min(drain / 2)).await;
        }
        stop_gossip.cancel();
        stop_proxies.cancel();
        while let Some(res) = proxies.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "a listener task failed");
            }
        }
        // Upgraded connections (WebSocket) get the same deadline as requests.
        tokio::join!(
            outbound_tunnels.drain(drain_deadline),
            inbound_tunnels.drain(drain_deadline)
        );
        stop_admin.cancel();
        stop_router.cancel();
        let _ = admin_task.await;
        let _ = router_task.await;
        if let Some(t) = gossip_task {
            let _ = t.await;
        }
        let _ = reloader.await;
        if let Some(t) = tls_watcher {
            let _ = t.await;
        }
        if let Some(t) = docker_task {
            let _ = t.await;
        }
        table_watch.abort();
        let _ = sweeper.await;
        // The spans of the drain go out last (bounded by the exporter's own shutdown limit).
        stop_exporter.cancel();
        if let Some(t) = exporter_task {
            let _ = t.await;
        }
        tracing::info!("meshd stopped");
        Ok(())
    }
}

/// `READY=1` for systemd once `/ready` would answer 200, or after [`READY_NOTIFY_LIMIT`] with a degraded
/// status: a host whose Docker socket is missing still starts and serves what gossip and static config give.
async fn notify_ready(
    notifier: crate::systemd::Notifier,
    readiness: Arc<Readiness>,
    membership: Option<crate::membership::Membership>,
) {
    let waited = tokio::time::timeout(READY_NOTIFY_LIMIT, readiness.wait()).await;
    // Stopped before it was ready: STOPPING=1 has gone out, READY=1 must not follow it.
    if readiness.is_draining() {
        return;
    }
    let status = match waited {
        Ok(()) => match &membership {
            Some(m) if !m.joined() => "serving (degraded: gossip has not joined)".to_string(),
            _ => "serving".to_string(),
        },
        Err(_) => {
            tracing::warn!(
                limit = ?READY_NOTIFY_LIMIT,
                "not ready yet (discovery has not synced or gossip has not joined): telling systemd the agent \
                 started anyway; /ready still answers 503"
            );
            format!(
                "serving (degraded: not ready after {}s; see /ready and the log)",
                READY_NOTIFY_LIMIT.as_secs()
            )
        }
    };
    notifier.ready(&status);
    // A late join clears the degraded status in `systemctl status`.
    if let Some(m) = membership.filter(|m| !m.joined()) {
        m.wait_joined().await;
        if readiness.is_ready() && !readiness.is_draining() {
            notifier.status("serving");
        }
    }
}

/// Closes pooled connections that have been idle too long, across every endpoint in the table.
async fn sweep_pools(table: watch::Receiver<Arc<Table>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = table.borrow().clone();
        let now = std::time::Instant::now();
        for svc in snapshot.services.values() {
            for ep in &svc.endpoints {
                ep.state.pool.sweep(now);
            }
        }
    }
}
