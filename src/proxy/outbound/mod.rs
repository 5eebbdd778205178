//! The outbound proxy: requests from local apps, routed by service name to an endpoint anywhere in the mesh.
//!
//! Reads routing-table and config snapshots; writes only the per-endpoint and per-service runtime state the
//! table carries (latency, in-flight counts, breakers, budgets, rate limiters, connection pools). A request
//! goes through three steps, one module each:
//! - [`target`]: which service, under which policy and deadline — rate limit → fault → deadline → route/split;
//! - [`attempt`]: the attempt loop — balancing, sending, retries within the budget;
//! - this module: the response — meshd's own errors, metrics, the request id.
//!
//! A request for a local endpoint goes straight to it in the endpoint's protocol; one for an endpoint on
//! another node goes over HTTP/2 to that node's inbound listener, naming the service and the endpoint.
//! `Connection: Upgrade` requests (WebSocket) take [`upgrade`] instead of the attempt loop.

pub mod attempt;
pub mod target;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, Version, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::ProxyBody;
use super::ctx::RequestCtx;
use super::errors::{MeshError, error_response};
use super::headers::{MESH_REQUEST_ID, Present};
use super::pool::Upstreams;
use super::server::{ConnInfo, Handler};
use super::tunnel::Tunnels;
use crate::config::Config;
use crate::routing::{Service, Table};
use crate::telemetry::Direction;
use crate::telemetry::metrics::{PolicyMetrics, ProxyMetrics};
use crate::telemetry::requests::{Finished, Observers};

/// Shared state of the outbound proxy.
pub struct Outbound {
    pub config: watch::Receiver<Arc<Config>>,
    pub table: watch::Receiver<Arc<Table>>,
    pub upstreams: Upstreams,
    pub metrics: ProxyMetrics,
    pub policy_metrics: PolicyMetrics,
    /// Upgraded connections (WebSocket), drained on shutdown.
    pub tunnels: Tunnels,
    /// `/v1/stats`, `/v1/tap` and the access log.
    pub observers: Observers,
}

/// The outbound request handler; one clone per connection.
#[derive(Clone)]
pub struct OutboundHandler(pub Arc<Outbound>);

/// A response from an endpoint of `service`.
pub struct Served {
    pub service: Arc<Service>,
    pub resp: Response<ProxyBody>,
    /// Which of the headers meshd reads the response has.
    pub has: Present,
}

/// Why a request was answered by meshd, and for which service (if one was resolved).
#[derive(Debug)]
pub struct Refusal {
    pub service: Option<Arc<str>>,
    pub error: MeshError,
    pub detail: String,
    /// Close the client connection after answering.
    pub close: bool,
    pub retry_after: Option<Duration>,
}

impl Refusal {
    pub fn new(service: Option<&Arc<str>>, error: MeshError, detail: impl Into<String>) -> Self {
        Refusal {
            service: service.cloned(),
            error,
            detail: detail.into(),
            close: false,
            retry_after: None,
        }
    }

    /// The request is unusable as a whole: answer and close the connection.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

impl Handler for OutboundHandler {
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let this = self.0;
        async move {
            let mut req = req;
            let mut ctx = RequestCtx::new(&mut req, conn.peer);
            ctx.hop = this.observers.tracer.start(req.headers());
            // The steps before the attempts are plain functions: a future per step would be built, moved and
            // polled on every request. Only a fault delay waits here.
            let result = match this.admit(&mut ctx, &req, &conn) {
                Err(refused) => Err(refused),
                Ok(admitted) => {
                    if let Some(delay) = admitted.delay {
                        tokio::time::sleep(delay).await;
                    }
                    match target::finish(&this, &mut ctx, &req, admitted) {
                        Err(refused) => Err(refused),
                        // Rare, and its future is large: kept out of the common path's.
                        Ok(target)
                            if ctx.sent.any(Present::HOP_BY_HOP) && upgrade::is_upgrade(&req) =>
                        {
                            Box::pin(upgrade::proxy(&this, &mut ctx, target, req, conn.hold()))
                                .await
                        }
                        // Boxed: the attempt loop's future is large, and hyper and the server move the
                        // handler's future around; one allocation is cheaper than copying it at every move.
                        Ok(target) => {
                            crate::util::boxed(|| {
                                attempt::run(&this, &mut ctx, target, req, conn.peer_value())
                            })
                            .await
                        }
                    }
                }
            };
            this.respond(&ctx, result)
        }
    }
}

impl Outbound {
    /// The checks before a request is routed, then [`target::admit`].
    fn admit(
        &self,
        ctx: &mut RequestCtx,
        req: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<target::Admitted, Refusal> {
        if req.version() < Version::HTTP_2
            && let Some(why) = conn.framing.next().refusal()
        {
            return Err(Refusal::new(None, MeshError::BadRequest, why).closing());
        }
        if req.method() == Method::CONNECT {
            return Err(Refusal::new(
                None,
                MeshError::Forbidden,
                "CONNECT tunnels are not proxied; send plain HTTP requests for a service",
            ));
        }
        target::admit(self, ctx, req)
    }

    /// meshd's response: the upstream's, or meshd's own error; counted either way.
    fn respond(&self, ctx: &RequestCtx, result: Result<Served, Refusal>) -> Response<ProxyBody> {
        // meshd's own gRPC errors travel as HTTP 200: count them by the status they stand for.
        let (mut resp, counted, served, mesh_error) = match result {
            Ok(Served { service, resp, has }) => (resp, None, Some((service, has)), None),
            Err(r) => {
                self.metrics
                    .errors
                    .with_label_values(&[Direction::Outbound.as_str(), r.error.code()])
                    .inc();
                tracing::debug!(error = r.error.code(), detail = %r.detail, peer = %ctx.peer,
                    request_id = ?ctx.request_id, "outbound request answered by meshd");
                let mut resp = error_response(r.error, ctx.grpc, &r.detail);
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
                let status = r.error.status();
                let name = r.service.or_else(|| ctx.service.clone());
                let elapsed = ctx.received.elapsed();
                self.metrics.record(
                    Direction::Outbound,
                    name.as_deref().unwrap_or(""),
                    status,
                    elapsed,
                );
                self.observers.record(Finished {
                    direction: Direction::Outbound,
                    service: name.as_deref().unwrap_or(""),
                    status,
                    grpc_status: None,
                    duration: elapsed,
                    mesh_error: Some(r.error.code()),
                    ctx,
                    response: None,
                    window: None,
                });
                (resp, Some(status), None, Some(r.error.code()))
            }
        };
        // Whatever the upstream spoke, hand hyper an HTTP/1.1 response for an HTTP/1.x client (hyper then
        // writes it in the client's version and, for HTTP/1.0 keep-alive clients, keeps the connection) and
        // an HTTP/2 one for an HTTP/2 client.
        *resp.version_mut() = if ctx.version == Version::HTTP_2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // The upstream's own request id, if it set one, stands.
        let has = served.as_ref().map_or(Present::REQUEST_ID, |(_, has)| *has);
        if let Some(id) = &ctx.request_id {
            if has.any(Present::REQUEST_ID) {
                resp.headers_mut()
                    .entry(MESH_REQUEST_ID)
                    .or_insert_with(|| id.clone());
            } else {
                resp.headers_mut().insert(MESH_REQUEST_ID, id.clone());
            }
        }
        if let Some((service, has)) = served {
            let status = counted.unwrap_or(resp.status());
            let elapsed = ctx.received.elapsed();
            service
                .state
                .outbound_metrics
                .get_or_init(|| self.metrics.for_service(Direction::Outbound, &service.name))
                .record(status, elapsed);
            let window = service
                .state
                .outbound_stats
                .get_or_init(|| {
                    self.observers
                        .stats
                        .window(Direction::Outbound, &service.name)
                })
                .as_ref();
            self.observers.record(Finished {
                direction: Direction::Outbound,
                service: &service.name,
                status,
                grpc_status: has
                    .any(Present::GRPC_STATUS)
                    .then(|| crate::proxy::grpc_status_of(resp.headers()))
                    .flatten(),
                duration: elapsed,
                mesh_error,
                ctx,
                response: Some(resp.headers()),
                window,
            });
        }
        resp
    }
}
