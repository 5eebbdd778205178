//! The admin API (axum): health, readiness, metrics and read-only views of the routing table and config.
//!
//! Handlers read shared handles only (a `watch` snapshot of the table, the config, the metrics registry and
//! the readiness state); nothing here changes the agent.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::Config;
use crate::readiness::Readiness;
use crate::routing::{Location, Table};
use crate::telemetry::Metrics;

/// Config keys whose values are secrets and are never shown by `/v1/config`.
const SECRET_KEYS: &[&str] = &[
    "password",
    "secret",
    "token",
    "private_key",
    "key_pem",
    "gossip_key",
];

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub config: watch::Receiver<Arc<Config>>,
    pub reload: tokio::sync::mpsc::Sender<crate::reload::Request>,
    pub table: watch::Receiver<Arc<Table>>,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    /// Docker discovery's state (`enabled: false` when it is off).
    pub docker: watch::Receiver<crate::discovery::docker::Status>,
    /// Mutual TLS with peer agents, when on: `/v1/config` shows the certificate in use.
    pub tls: Option<Arc<crate::tls::peers::PeerTls>>,
    /// Gossip membership (`[gossip]`).
    pub membership: Option<crate::membership::Membership>,
    /// Windowed figures (`/v1/stats`) and the live request stream (`/v1/tap`).
    pub observers: crate::telemetry::requests::Observers,
    /// Cancelled when the proxies stop at shutdown: open taps end then, so they do not hold up the drain.
    pub draining: tokio_util::sync::CancellationToken,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/members", get(members))
        .route("/v1/config", get(config))
        .route("/v1/stats", get(stats))
        .route("/v1/tap", get(tap))
        .route("/v1/reload", axum::routing::post(reload))
        .with_state(state)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if !s.readiness.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    }
    // Ready after gossip.join_timeout even when no seed answered: this host still serves its own endpoints.
    match &s.membership {
        Some(m) if !m.joined() => (StatusCode::OK, "ready (degraded: gossip has not joined)\n"),
        _ => (StatusCode::OK, "ready\n"),
    }
}

/// `GET /v1/members`: this agent and every member it knows.
async fn members(State(s): State<AdminState>) -> impl IntoResponse {
    let Some(m) = &s.membership else {
        let config = s.config.borrow().clone();
        return Json(json!({
            "node": config.node.name,
            "gossip": false,
            "members": [],
        }));
    };
    let id = m.identity();
    Json(json!({
        "node": &*id.name,
        "gossip": true,
        "joined": m.joined(),
        "self": {
            "name": &*id.name,
            "gossip_addr": id.addr.to_string(),
            "inbound_addr": id.inbound().to_string(),
            "generation": id.generation,
        },
        "members": &*m.members(),
    }))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn services(State(s): State<AdminState>) -> Json<Value> {
    let table = s.table.borrow().clone();
    let config = s.config.borrow().clone();
    let now = std::time::Instant::now();
    let services: Vec<Value> = table
        .services
        .values()
        .map(|svc| {
            let endpoints: Vec<Value> = svc
                .endpoints
                .iter()
                .map(|e| {
                    let (node, source, via) = match &e.location {
                        Location::Local { source } => {
                            (config.node.name.clone(), source.as_str(), None)
                        }
                        Location::Remote { node, inbound } => {
                            (node.clone(), "gossip", Some(inbound.to_string()))
                        }
                    };
                    json!({
                        "address": e.addr.to_string(),
                        "protocol": e.protocol.as_str(),
                        "weight": e.weight,
                        "node": node,
                        "local": e.is_local(),
                        "source": source,
                        "via": via,
                        "ewma_latency_ms": e.state.latency(now).as_secs_f64() * 1000.0,
                        "pending": e.state.pending(),
                        "connections": e.state.pool.open(),
                        // Discovery lists only routable endpoints; an open breaker ejects one for a while.
                        "health": if e.state.breaker_state(now) == crate::policy::breaker::State::Open { "ejected" } else { "healthy" },
                        "breaker": e.state.breaker_state(now).as_str(),
                    })
                })
                .collect();
            let policy = config.policy_for(&svc.name);
            json!({
                "name": &*svc.name,
                "timeout": crate::util::duration::format(policy.timeout),
                "load_balancer": policy.load_balancer,
                "endpoints": endpoints,
            })
        })
        .collect();
    let docker = s.docker.borrow().clone();
    Json(json!({
        "node": config.node.name,
        "discovery": { "docker": docker },
        "services": services,
    }))
}

/// Default and largest `/v1/stats` window.
const STATS_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(serde::Deserialize)]
struct StatsQuery {
    /// `10s`, `1m`: 1 s to 60 s.
    window: Option<String>,
}

/// `GET /v1/stats[?window=30s]`: per service and direction, requests per second, success rate, latency
/// percentiles over the window, and the breakers open now.
async fn stats(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<StatsQuery>,
) -> axum::response::Response {
    let window = match q.window.as_deref().map(crate::util::duration::parse) {
        None => STATS_WINDOW,
        Some(Ok(w))
            if w >= std::time::Duration::from_secs(1)
                && w.as_secs() <= crate::telemetry::requests::WINDOW_SLOTS as u64 =>
        {
            w
        }
        Some(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "window: a duration from 1s to 60s, e.g. window=10s\n",
            )
                .into_response();
        }
    };
    let table = s.table.borrow().clone();
    let now = std::time::Instant::now();
    let services: Vec<Value> = s
        .observers
        .stats
        .figures(window)
        .into_iter()
        .map(|f| {
            let mut v = serde_json::to_value(&f).unwrap_or(Value::Null);
            // Breakers are the endpoints' state now, for the services this agent routes to.
            if let Some(svc) = table.services.get(f.service.as_str()) {
                let open = svc
                    .endpoints
                    .iter()
                    .filter(|e| e.state.breaker_state(now) != crate::policy::breaker::State::Closed)
                    .count();
                v["breakers_open"] = json!(open);
                v["endpoints"] = json!(svc.endpoints.len());
            }
            v
        })
        .collect();
    Json(json!({
        "node": s.config.borrow().node.name,
        "window_seconds": window.as_secs(),
        "services": services,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct TapQuery {
    service: Option<String>,
    /// `outbound` or `inbound`; both when absent.
    direction: Option<String>,
}

/// `GET /v1/tap?service=NAME`: a live stream of request summaries as JSON lines, from the moment it is opened.
/// A client that reads too slowly gets `{"skipped": N}` lines instead of the summaries it missed.
async fn tap(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<TapQuery>,
) -> axum::response::Response {
    use futures_util::StreamExt;
    use tokio::sync::broadcast::error::RecvError;
    if let Some(d) = q.direction.as_deref()
        && d != "outbound"
        && d != "inbound"
    {
        return (StatusCode::BAD_REQUEST, "direction: outbound or inbound\n").into_response();
    }
    let rx = s.observers.subscribe();
    let lines = futures_util::stream::unfold(rx, move |mut rx| {
        let (service, direction) = (q.service.clone(), q.direction.clone());
        async move {
            loop {
                let line = match rx.recv().await {
                    Ok(summary) => {
                        if service
                            .as_deref()
                            .is_some_and(|want| want != summary.service)
                            || direction.as_deref().is_some_and(|d| d != summary.direction)
                        {
                            continue;
                        }
                        serde_json::to_string(&*summary).unwrap_or_default()
                    }
                    Err(RecvError::Lagged(n)) => json!({ "skipped": n }).to_string(),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok::<_, std::convert::Infallible>(format!("{line}\n")), rx));
            }
        }
    })
    .take_until(s.draining.clone().cancelled_owned())
    .boxed();
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

async fn config(State(s): State<AdminState>) -> Json<Value> {
    let config = s.config.borrow().clone();
    let mut v = serde_json::to_value(&*config).unwrap_or(Value::Null);
    redact(&mut v);
    if let Some(tls) = &s.tls {
        let m = tls.material();
        if v["tls"].is_null() {
            // `meshd dev`: no files.
            v["tls"] = json!({"source": "in-memory CA (meshd dev)", "trust_domain": m.id.trust_domain.as_str()});
        }
        // The certificate in use, which a reload may have replaced since start; never the key.
        v["tls"]["certificate"] = json!({
            "spiffe_id": m.id.uri(),
            "subject": m.subject,
            "issuer": m.issuer,
            "not_after": m.expires(),
            "days_left": m.days_left(),
        });
        v["tls"]["trusted_cas"] = json!(m.anchors);
    }
    Json(v)
}

/// `POST /v1/reload`: the same as SIGHUP. 200 when applied, 400 with the problems when refused.
async fn reload(State(s): State<AdminState>) -> (StatusCode, Json<Value>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if s.reload.send(tx).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "refused", "problems": "shutting down"})),
        );
    }
    match rx.await {
        Ok(Ok(summary)) => (
            StatusCode::OK,
            Json(json!({"status": "reloaded", "summary": summary})),
        ),
        Ok(Err(problems)) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "refused", "problems": problems})),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "refused", "problems": "shutting down"})),
        ),
    }
}

/// Replaces the value of every secret-named key with `"<redacted>"`.
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if SECRET_KEYS.iter().any(|s| k.contains(s)) && !val.is_null() {
                    *val = Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_nested_secrets() {
        let mut v = json!({"tls": {"private_key": "-----BEGIN", "cert": "/etc/c.pem"}, "list": [{"token": "t"}]});
        redact(&mut v);
        assert_eq!(v["tls"]["private_key"], "<redacted>");
        assert_eq!(v["tls"]["cert"], "/etc/c.pem");
        assert_eq!(v["list"][0]["token"], "<redacted>");
    }
}
