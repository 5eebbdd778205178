//! The outbound proxy: requests from local apps, routed by service name to an endpoint anywhere in the mesh.
//!
//! Reads routing-table and config snapshots; writes only the per-endpoint and per-service runtime state the
//! table carries (latency, in-flight counts, breakers, budgets, rate limiters). For each request, in order:
//! rate limit → fault → deadline → route/split → retries (with a budget) around balancing and sending.
//! A request for a local endpoint goes straight to it in the endpoint's protocol; one for an endpoint on
//! another node goes over HTTP/2 to that node's inbound listener, naming the service, the endpoint and the
//! protocol to restore.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderName, HeaderValue, Method, Request, Response, Version, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use tokio::sync::watch;

use super::client::{Clients, FailKind, ReqBody, SendError};
use super::errors::{MeshError, error_response};
use super::framing::Verdict;
use super::headers::{
    MESH_ENDPOINT, MESH_ORIG_PROTO, MESH_REQUEST_ID, MESH_RETRYABLE, MESH_SERVICE,
    append_forwarded_for, ensure_request_id, read_deadline, remove_all, strip_hop_by_hop,
    write_deadline,
};
use super::observe::{Observed, Report};
use super::server::{ConnInfo, Handler};
use super::{ProxyBody, is_grpc, proto_name};
use crate::config::{Config, ServicePolicy};
use crate::policy::balance::{self, Tried};
use crate::policy::{fault, route};
use crate::routing::{Endpoint, Location, Service, ServiceState, Table};
use crate::telemetry::Direction;
use crate::telemetry::metrics::{PolicyMetrics, ProxyMetrics};

/// Request bodies up to this size are buffered so the request can be retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Retry backoff: full jitter over an exponential from this base…
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// …up to this cap.
const RETRY_BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Shared state of the outbound proxy.
pub struct Outbound {
    pub config: watch::Receiver<Arc<Config>>,
    pub table: watch::Receiver<Arc<Table>>,
    pub clients: Clients,
    pub metrics: ProxyMetrics,
    pub policy_metrics: PolicyMetrics,
}

/// The outbound request handler; one clone per connection.
#[derive(Clone)]
pub struct OutboundHandler(pub Arc<Outbound>);

impl Handler for OutboundHandler {
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let this = self.0;
        async move {
            let start = Instant::now();
            let mut req = req;
            let grpc = is_grpc(&req);
            let version = req.version();
            let request_id = ensure_request_id(req.headers_mut());
            // meshd's own gRPC errors travel as HTTP 200: count them by the status they stand for.
            let mut counted_status = None;
            let mut served_by = None;
            let (service, mut resp) = match this.proxy(req, &conn, grpc).await {
                Ok((service, state, resp)) => {
                    served_by = Some(state);
                    (Some(service), resp.map(Either::Left))
                }
                Err(r) => {
                    counted_status = Some(r.error.status());
                    this.metrics
                        .errors
                        .with_label_values(&[Direction::Outbound.as_str(), r.error.code()])
                        .inc();
                    tracing::debug!(error = r.error.code(), detail = %r.detail, "outbound request answered by meshd");
                    let mut resp = error_response(r.error, grpc, &r.detail);
                    if r.close {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    if let Some(wait) = r.retry_after {
                        resp.headers_mut().insert(
                            header::RETRY_AFTER,
                            HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
                        );
                    }
                    (r.service, resp)
                }
            };
            // Whatever the upstream spoke, hand hyper an HTTP/1.1 response for an HTTP/1.x client (hyper then
            // writes it in the client's version and, for HTTP/1.0 keep-alive clients, keeps the connection) and
            // an HTTP/2 one for an HTTP/2 client.
            *resp.version_mut() = if version == http::Version::HTTP_2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            };
            if let Some(id) = request_id {
                resp.headers_mut().entry(MESH_REQUEST_ID).or_insert(id);
            }
            let status = counted_status.unwrap_or(resp.status());
            match (&served_by, &service) {
                (Some(state), Some(name)) => state
                    .outbound_metrics
                    .get_or_init(|| this.metrics.for_service(Direction::Outbound, name))
                    .record(status, start.elapsed()),
                _ => this.metrics.record(
                    Direction::Outbound,
                    service.as_deref().unwrap_or(""),
                    status,
                    start.elapsed(),
                ),
            }
            resp
        }
    }
}

/// Why a request was answered by meshd, and for which service (if one was resolved).
struct Refusal {
    service: Option<Arc<str>>,
    error: MeshError,
    detail: String,
    /// Close the client connection after answering.
    close: bool,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(service: Option<&Arc<str>>, error: MeshError, detail: String) -> Self {
        Refusal {
            service: service.cloned(),
            error,
            detail,
            close: false,
            retry_after: None,
        }
    }
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Full jitter over min(cap, base × 2^n).
fn retry_backoff(n: u32, r: f64) -> Duration {
    let ceiling = RETRY_BACKOFF_BASE
        .saturating_mul(1u32 << n.min(16))
        .min(RETRY_BACKOFF_CAP);
    ceiling.mul_f64(r.clamp(0.0, 1.0))
}

/// One attempt's result.
// Lives on the stack for one attempt; boxing the response would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Response(Response<Observed>),
    Failed(SendError),
}

impl Outbound {
    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        grpc: bool,
    ) -> Result<(Arc<str>, Arc<ServiceState>, Response<Observed>), Refusal> {
        if req.version() < Version::HTTP_2 && conn.verdicts.next() == Verdict::ConflictingFraming {
            return Err(Refusal {
                close: true,
                ..Refusal::new(
                    None,
                    MeshError::BadRequest,
                    "both Transfer-Encoding and Content-Length are set; refusing an ambiguous request".into(),
                )
            });
        }
        if req.method() == Method::CONNECT {
            return Err(Refusal::new(
                None,
                MeshError::Forbidden,
                "CONNECT tunnels are not proxied; send plain HTTP requests for a service".into(),
            ));
        }
        let authority = request_authority(&req).ok_or_else(|| {
            Refusal::new(
                None,
                MeshError::BadRequest,
                "no Host header or absolute URI: cannot tell which service is wanted".into(),
            )
        })?;
        let config = self.config.borrow().clone();
        let name = service_name(&config, authority.host())?;
        let table = self.table.borrow().clone();
        let logical = table.service(&name).ok_or_else(|| {
            Refusal::new(
                None,
                MeshError::NoRoute,
                format!("no service named {name:?} is known to this mesh"),
            )
        })?;
        let policy = config.policy_for(&logical.name);
        let now = Instant::now();
        let mut rng = fastrand::Rng::new();

        // Rate limit.
        if let Some(rl) = &policy.rate_limit
            && let Err(wait) = logical.state.rate_limit(&rl.config(), now)
        {
            self.policy_metrics
                .rate_limited
                .with_label_values(&[&logical.name])
                .inc();
            return Err(Refusal {
                retry_after: Some(wait),
                ..Refusal::new(
                    Some(&logical.name),
                    MeshError::RateLimited,
                    format!(
                        "service {:?} is over its rate limit on this node",
                        logical.name
                    ),
                )
            });
        }

        // Faults.
        if let Some(f) = &policy.fault {
            let decision = fault::decide(f, req.headers(), rng.f64(), rng.f64());
            if let Some(delay) = decision.delay {
                self.policy_metrics
                    .faults
                    .with_label_values(&[&logical.name, "delay"])
                    .inc();
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                self.policy_metrics
                    .faults
                    .with_label_values(&[&logical.name, "abort"])
                    .inc();
                return Err(Refusal::new(
                    Some(&logical.name),
                    MeshError::FaultInjected(status),
                    format!("fault injected for service {:?}", logical.name),
                ));
            }
        }

        // Deadline: the service's timeout, or sooner if the caller's mesh-deadline says so.
        let start = Instant::now();
        let mut deadline = start + policy.timeout;
        if let Some(remaining) = read_deadline(req.headers()) {
            deadline = deadline.min(start + remaining);
        }
        if deadline <= start {
            return Err(Refusal::new(
                Some(&logical.name),
                MeshError::Timeout,
                "the request's mesh-deadline has already passed".into(),
            ));
        }

        // Route or split to the service whose endpoints are used.
        let path = req.uri().path();
        let target: &Service = match route::target(
            &policy.routes,
            &policy.split,
            path,
            req.headers(),
            rng.f64(),
        ) {
            None => logical,
            Some(t) if t == &*logical.name => logical,
            Some(t) => table.service(t).ok_or_else(|| {
                Refusal::new(
                    Some(&logical.name),
                    MeshError::NoRoute,
                    format!(
                        "service {:?} sends this request to {t:?}, which is not known",
                        logical.name
                    ),
                )
            })?,
        };
        if target.endpoints.is_empty() {
            return Err(Refusal::new(
                Some(&target.name),
                MeshError::NoEndpoints,
                format!("service {:?} has no routable endpoint", target.name),
            ));
        }

        // Headers shared by every attempt.
        let retryable_method = idempotent(req.method())
            || req
                .headers()
                .get(MESH_RETRYABLE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Headers that stop here: `Expect` (answered by meshd's own server) and meshd's per-hop controls.
        remove_all(
            &mut parts.headers,
            &[
                header::EXPECT,
                MESH_ENDPOINT,
                MESH_ORIG_PROTO,
                MESH_RETRYABLE,
                HeaderName::from_static(fault::MESH_FAULT_DELAY),
                HeaderName::from_static(fault::MESH_FAULT_ABORT),
            ],
        );
        append_forwarded_for(&mut parts.headers, conn.peer.ip());
        parts
            .headers
            .insert(MESH_SERVICE, target.name_header.clone());
        write_deadline(&mut parts.headers, deadline);
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }

        // A request can be retried only if its body can be sent again.
        let max_attempts = if retryable_method {
            policy.retry.max_attempts.max(1)
        } else {
            1
        };
        let mut body = Some(body);
        let replay: Option<Bytes> = if max_attempts > 1 {
            buffer_small_body(&parts.headers, &mut body)
                .await
                .map_err(|e| {
                    Refusal::new(
                        Some(&target.name),
                        MeshError::BadRequest,
                        format!("reading the request body: {e}"),
                    )
                })?
        } else {
            None
        };
        let max_attempts = if replay.is_some() { max_attempts } else { 1 };
        let budget = policy.retry.budget();
        logical.state.budget_deposit(&budget, start);

        let mut tried = Tried::default();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(Refusal::new(
                    Some(&target.name),
                    MeshError::Timeout,
                    format!(
                        "service {:?}: no response within {}",
                        target.name,
                        crate::config::format_duration(policy.timeout)
                    ),
                ));
            }
            let (idx, endpoint) =
                pick_endpoint(policy, target, now, &mut rng, tried).ok_or_else(|| {
                    Refusal::new(
                        Some(&target.name),
                        MeshError::BreakerOpen,
                        format!(
                            "every endpoint of service {:?} has an open circuit breaker",
                            target.name
                        ),
                    )
                })?;
            tried.add(idx);
            let body = match (&replay, body.take()) {
                (Some(bytes), _) => Either::Right(Full::new(bytes.clone())),
                (None, Some(b)) => Either::Left(b),
                (None, None) => Either::Right(Full::new(Bytes::new())),
            };
            let uri = super::upstream_uri(endpoint.next_hop.clone(), &parts.uri);
            // Copy the head only when another attempt may need it.
            let head = if attempt < max_attempts {
                parts.clone()
            } else {
                std::mem::replace(&mut parts, Request::new(()).into_parts().0)
            };
            let mut req = Request::from_parts(head, body);
            let version = set_endpoint_headers(req.headers_mut(), endpoint);
            let try_timeout = policy
                .per_try_timeout
                .map_or(remaining, |t| t.min(remaining));
            let result = self
                .send_once(
                    req,
                    uri,
                    version,
                    try_timeout,
                    &config,
                    &logical.name,
                    &target.name,
                    endpoint,
                    grpc,
                )
                .await;

            // Decide on a retry.
            let (retry_wanted, failed) = match &result {
                Attempt::Response(r) => (
                    policy.retry.on.status(r.status()),
                    r.status().is_server_error(),
                ),
                Attempt::Failed(e) => (
                    match e.kind {
                        FailKind::Connect => policy.retry.on.connect_failure,
                        FailKind::RefusedStream => policy.retry.on.refused_stream,
                        FailKind::Timeout => policy.retry.on.timeout,
                        FailKind::Other => false,
                    },
                    true,
                ),
            };
            if attempt > 1 {
                let outcome = if failed { "failure" } else { "success" };
                self.policy_metrics
                    .retries
                    .with_label_values(&[&logical.name, outcome])
                    .inc();
            }
            let backoff = retry_backoff(attempt - 1, rng.f64());
            let can_retry =
                retry_wanted && attempt < max_attempts && Instant::now() + backoff < deadline && {
                    let granted = logical.state.budget_withdraw(&budget, Instant::now());
                    if !granted {
                        self.policy_metrics
                            .budget_exhausted
                            .with_label_values(&[&logical.name])
                            .inc();
                    }
                    granted
                };
            if can_retry {
                tracing::debug!(service = %target.name, endpoint = %endpoint.addr, attempt, "retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
            return match result {
                Attempt::Response(mut resp) => {
                    strip_hop_by_hop(resp.headers_mut());
                    Ok((target.name.clone(), target.state.clone(), resp))
                }
                Attempt::Failed(e) => Err(Refusal::new(
                    Some(&target.name),
                    e.mesh_error(),
                    format!("service {:?}: {}", target.name, e.detail),
                )),
            };
        }
    }

    /// Sends one attempt to `endpoint`, feeding its latency estimate and circuit breaker.
    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        req: Request<ReqBody>,
        uri: http::Uri,
        version: Version,
        timeout: Duration,
        config: &Arc<Config>,
        logical: &Arc<str>,
        target: &Arc<str>,
        endpoint: &Endpoint,
        grpc: bool,
    ) -> Attempt {
        let report = Report::new(
            endpoint.state.clone(),
            config.clone(),
            logical.clone(),
            target.clone(),
            endpoint.addr,
            self.policy_metrics.breaker_open.clone(),
        );
        let pending = endpoint.state.start();
        let sent = Instant::now();
        let result = self.clients.send(req, uri, version, timeout).await;
        drop(pending);
        let now = Instant::now();
        let failure_on = &config.policy_for(logical).circuit_breaker.failure_on;
        match result {
            Ok(resp) => {
                endpoint.state.observe_latency(now - sent, now);
                let trailers_only_grpc = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u8>().ok());
                let failed_now = failure_on.status(resp.status())
                    || trailers_only_grpc.is_some_and(|c| failure_on.grpc_status(c));
                // A gRPC response's status comes in its trailers: judge it when the body ends.
                let report = if grpc && trailers_only_grpc.is_none() && !failed_now {
                    Some(report)
                } else {
                    report.finish(!failed_now);
                    None
                };
                Attempt::Response(resp.map(|b| Observed::new(b, report)))
            }
            Err(e) => {
                let counts = match e.kind {
                    FailKind::Connect => failure_on.connect_failure,
                    FailKind::RefusedStream => failure_on.refused_stream,
                    FailKind::Timeout => {
                        endpoint.state.observe_latency(now - sent, now);
                        failure_on.timeout
                    }
                    FailKind::Other => true,
                };
                report.finish(!counts);
                Attempt::Failed(e)
            }
        }
    }
}

/// Picks an endpoint of `target` by the service's balancer and takes its breaker's permission (the single
/// probe, for an endpoint whose backoff has just passed). `None` when every breaker is open.
fn pick_endpoint<'t>(
    policy: &ServicePolicy,
    target: &'t Service,
    now: Instant,
    rng: &mut fastrand::Rng,
    mut tried: Tried,
) -> Option<(usize, &'t Endpoint)> {
    // Another request may take a probe between the pick and the acquire: try a few times.
    for _ in 0..4 {
        let idx = balance::pick(
            policy.load_balancer,
            &target.endpoints,
            now,
            rng,
            &target.state.rr,
            tried,
        )?;
        let ep = &target.endpoints[idx];
        if ep.state.breaker_acquire(now) {
            return Some((idx, ep));
        }
        tried.add(idx);
    }
    None
}

/// Adds the headers an attempt to `endpoint` needs; returns the HTTP version to send with.
fn set_endpoint_headers(headers: &mut http::HeaderMap, endpoint: &Endpoint) -> Version {
    let container_version = if endpoint.protocol.is_h2() {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    match &endpoint.location {
        Location::Local { .. } => container_version,
        Location::Remote { .. } => {
            headers.insert(MESH_ENDPOINT, endpoint.addr_header.clone());
            headers.insert(
                MESH_ORIG_PROTO,
                HeaderValue::from_static(proto_name(container_version)),
            );
            Version::HTTP_2
        }
    }
}

/// Buffers the request body when it is known to be small (Content-Length ≤ 64 KiB, or no body at all), so
/// the request can be sent again. Bodies of unknown length are streamed and never retried: waiting for their
/// end could stall a streaming client.
async fn buffer_small_body(
    headers: &http::HeaderMap,
    body: &mut Option<Incoming>,
) -> Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(b) = body.as_ref() else {
        return Ok(None);
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let small = b.is_end_stream() || declared.is_some_and(|n| n <= MAX_REPLAY_BODY as u64);
    if !small {
        return Ok(None);
    }
    let Some(b) = body.take() else {
        return Ok(None);
    };
    let collected = Limited::new(b, MAX_REPLAY_BODY).collect().await?;
    Ok(Some(collected.to_bytes()))
}

/// Host → service name: lowercased, port and configured suffixes removed. Addresses are refused.
fn service_name<'h>(config: &Config, host: &'h str) -> Result<Cow<'h, str>, Refusal> {
    let host = host.trim_end_matches('.');
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(Refusal::new(
            None,
            MeshError::Forbidden,
            format!("{host} is an address; meshd routes only to service names"),
        ));
    }
    let mut name: Cow<'h, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    for suffix in &config.outbound.strip_suffixes {
        if let Some(len) = name.strip_suffix(suffix.as_str()).map(str::len)
            && len > 0
        {
            match &mut name {
                Cow::Borrowed(b) => *b = &b[..len],
                Cow::Owned(o) => o.truncate(len),
            }
            break;
        }
    }
    Ok(name)
}

/// The authority a request is for: the absolute-form URI (proxy style) or h2 `:authority`, else `Host`.
fn request_authority(req: &Request<Incoming>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        assert_eq!(retry_backoff(0, 1.0), Duration::from_millis(25));
        assert_eq!(retry_backoff(1, 1.0), Duration::from_millis(50));
        assert_eq!(retry_backoff(10, 1.0), Duration::from_millis(250));
        assert_eq!(retry_backoff(3, 0.0), Duration::ZERO);
        assert!(retry_backoff(2, 0.5) <= Duration::from_millis(50));
    }

    #[test]
    fn idempotent_methods() {
        assert!(
            idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE)
        );
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}
