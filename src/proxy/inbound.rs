//! The inbound proxy: requests from peer agents for endpoints on this host.
//!
//! A peer names the service (`mesh-service`) and the endpoint it chose (`mesh-endpoint`). The request is
//! forwarded only when this host's own discovery lists that endpoint for that service; anything else is
//! refused with 403 `forbidden` and counted. This stops the inbound port from being used as an open proxy into
//! the host's networks. The protocol toward the container is the one this host's discovery knows;
//! `mesh-orig-proto` from the peer is advisory, and a disagreement is logged.
//!
//! An extended CONNECT (RFC 8441) from a peer is an app's upgrade (WebSocket): it becomes an HTTP/1.1 upgrade
//! toward the container, answered 200 with the container's 101 headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use tokio::sync::watch;

use super::ctx::RequestCtx;
use super::errors::{MeshError, error_response};
use super::headers::{
    GRPC_TIMEOUT, MESH_ENDPOINT, MESH_ORIG_PROTO, MESH_RETRYABLE, MESH_SERVICE, Present,
    append_forwarded_for, caller_budget, join_cookies, set_host, strip_hop_by_hop, write_deadline,
    write_grpc_timeout,
};
use super::observe::Observed;
use super::outbound::attempt::request_target;
use super::outbound::upgrade::restore_upgrade_headers;
use super::pool::{BodyWatch, ClientBody, FailKind, ReqBody, SendOpts, Upstreams, Wire, h1};
use super::server::{ConnInfo, Handler};
use super::tunnel::Tunnels;
use super::{ProxyBody, proto_name};
use crate::config::Config;
use crate::routing::{Endpoint, Table};
use crate::telemetry::Direction;
use crate::telemetry::metrics::ProxyMetrics;
use crate::telemetry::requests::Finished;

/// Shared state of the inbound proxy.
pub struct Inbound {
    pub config: watch::Receiver<Arc<Config>>,
    pub table: watch::Receiver<Arc<Table>>,
    pub upstreams: Upstreams,
    pub metrics: ProxyMetrics,
    pub tunnels: Tunnels,
    /// Gossip state sync from peers (`[gossip]`).
    pub sync: Option<crate::membership::sync::SyncServer>,
    /// `/v1/stats`, `/v1/tap` and the access log.
    pub observers: crate::telemetry::requests::Observers,
}

/// The inbound request handler; one clone per connection.
#[derive(Clone)]
pub struct InboundHandler(pub Arc<Inbound>);

/// Why a request from a peer was answered by this agent.
struct Refused {
    service: Option<String>,
    error: MeshError,
    detail: String,
}

fn forbidden(detail: impl Into<String>) -> Refused {
    Refused {
        service: None,
        error: MeshError::Forbidden,
        detail: detail.into(),
    }
}

impl Handler for InboundHandler {
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let this = self.0;
        async move {
            let mut req = req;
            let mut ctx = RequestCtx::new(&mut req, conn.peer);
            // The node its certificate proved (mutual TLS); `None` over plaintext.
            ctx.peer_identity = conn.peer_node.get().map(|n| Arc::from(n.as_str()));
            if req.uri().path() == crate::membership::sync::SYNC_PATH
                && !req.headers().contains_key(MESH_SERVICE)
            {
                return this.sync(&ctx, req).await;
            }
            // Boxed, as on the outbound side: a large future, moved by hyper and the server.
            let (service, resp, mesh_error) = match crate::util::boxed(|| {
                this.proxy(&mut ctx, req, &conn)
            })
            .await
            {
                Ok((service, resp)) => (Some(service), resp, None),
                Err(r) => {
                    this.metrics
                        .errors
                        .with_label_values(&[Direction::Inbound.as_str(), r.error.code()])
                        .inc();
                    tracing::debug!(peer = %ctx.peer, peer_node = ctx.peer_identity.as_deref().unwrap_or("-"), error = r.error.code(), detail = %r.detail, "inbound request refused");
                    (
                        r.service,
                        error_response(r.error, ctx.grpc, &r.detail),
                        Some(r.error.code()),
                    )
                }
            };
            let elapsed = ctx.received.elapsed();
            let service = service.as_deref().unwrap_or("");
            this.metrics
                .record(Direction::Inbound, service, resp.status(), elapsed);
            this.observers.record(Finished {
                direction: Direction::Inbound,
                service,
                status: resp.status(),
                grpc_status: crate::proxy::grpc_status_of(resp.headers()),
                duration: elapsed,
                mesh_error,
                ctx: &ctx,
                response: Some(resp.headers()),
                window: None,
            });
            resp
        }
    }
}

impl Inbound {
    /// A gossip state-sync request from a peer agent (never forwarded anywhere).
    async fn sync(&self, ctx: &RequestCtx, req: Request<Incoming>) -> Response<ProxyBody> {
        use http_body_util::BodyExt;
        let plaintext_ok = self.config.borrow().inbound.insecure_plaintext;
        let refuse = |error: MeshError, detail: &str| {
            self.metrics
                .errors
                .with_label_values(&[Direction::Inbound.as_str(), error.code()])
                .inc();
            tracing::debug!(peer = %ctx.peer, detail, "gossip sync refused");
            error_response(error, false, detail)
        };
        let Some(server) = &self.sync else {
            return refuse(MeshError::Forbidden, "this node does not gossip");
        };
        if ctx.peer_identity.is_none() && !plaintext_ok {
            return refuse(MeshError::Forbidden, "state sync needs mutual TLS");
        }
        if req.method() != Method::POST {
            return refuse(MeshError::BadRequest, "state sync is POST");
        }
        let body = match http_body_util::Limited::new(
            req.into_body(),
            crate::membership::sync::MAX_SYNC_BODY,
        )
        .collect()
        .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return refuse(MeshError::BadRequest, "unreadable or oversized sync body"),
        };
        match server.handle(ctx.peer_identity.as_deref(), body).await {
            Ok(bytes) => {
                let mut resp = Response::new(Either::Right(Full::new(bytes)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-meshd-sync"),
                );
                resp
            }
            Err(r) => {
                let error = match r.status {
                    StatusCode::FORBIDDEN => MeshError::Forbidden,
                    StatusCode::SERVICE_UNAVAILABLE => MeshError::RateLimited,
                    _ => MeshError::BadRequest,
                };
                refuse(error, &r.detail)
            }
        }
    }

    async fn proxy(
        &self,
        ctx: &mut RequestCtx,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(String, Response<ProxyBody>), Refused> {
        let config = self.config.borrow().clone();
        // Without mutual TLS there is no way to tell a peer agent from anyone else who can reach the port.
        if ctx.peer_identity.is_none() && !config.inbound.insecure_plaintext {
            return Err(forbidden(
                "this node accepts peer agents only over mutual TLS: configure [tls], or set \
                 inbound.insecure_plaintext = true on a trusted test network",
            ));
        }
        if req.version() != Version::HTTP_2 {
            return Err(forbidden(
                "the inbound port accepts only HTTP/2 from peer agents",
            ));
        }
        // Traced only once the peer is accepted: a stranger cannot force sampled spans.
        ctx.hop = self.observers.tracer.start(req.headers());
        let (service, addr) = mesh_target(req.headers()).map_err(forbidden)?;
        let table = self.table.borrow().clone();
        let Some(local) = table.local_endpoint(&service, addr) else {
            return Err(forbidden(format!(
                "{addr} is not an endpoint of service {service:?} on this node"
            )));
        };
        ctx.endpoint = Some(addr);
        // The app's spans are children of this agent's server span.
        if let Some(hop) = &ctx.hop {
            hop.write(req.headers_mut(), &hop.ids);
        }
        check_orig_proto(req.headers(), local, ctx.peer);
        // The sender's budget bounds this hop too.
        let mut timeout = config.timeout_for(&service);
        if let Some(left) = caller_budget(req.headers(), ctx.sent) {
            timeout = timeout.min(left);
        }
        if timeout.is_zero() {
            return Err(Refused {
                service: Some(service),
                error: MeshError::Timeout,
                detail: "the request's deadline has already passed".into(),
            });
        }
        let now = Instant::now();
        let deadline = now + timeout;
        let connect_timeout = config.policy_for(&service).connect_timeout;
        // An extended CONNECT names the app's upgrade protocol in `:protocol`.
        let upgrade = (req.method() == Method::CONNECT)
            .then(|| req.extensions().get::<hyper::ext::Protocol>())
            .flatten()
            .and_then(|p| HeaderValue::from_str(p.as_str()).ok());
        let client_side = upgrade.map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        // Sending it twice is safe for an idempotent method, or when the app said so (the sending agent passes
        // its `mesh-retryable` on).
        let safe_to_repeat = super::outbound::attempt::idempotent(req.method())
            || req
                .headers()
                .get(MESH_RETRYABLE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let (mut head, body) = req.into_parts();
        strip_hop_by_hop(&mut head.headers);
        head.headers.remove(MESH_ENDPOINT);
        head.headers.remove(MESH_ORIG_PROTO);
        head.headers.remove(MESH_RETRYABLE);
        append_forwarded_for(
            &mut head.headers,
            ctx.sent.any(Present::FORWARDED_FOR),
            conn.peer_value(),
        );
        // The sending agent put the app's authority in `:authority`.
        let authority = head.uri.authority().cloned().ok_or_else(|| Refused {
            service: Some(service.clone()),
            error: MeshError::BadRequest,
            detail: "no :authority from the peer agent".into(),
        })?;
        let wire = local.state.pool.key().wire;
        head.uri = request_target(wire, &authority, &head.uri);
        match wire {
            Wire::H1 => {
                head.version = Version::HTTP_11;
                set_host(&mut head.headers, &authority);
                if ctx.sent.any(Present::COOKIE) {
                    join_cookies(&mut head.headers);
                }
                // This hop can carry trailers on (HTTP/2): ask for them.
                head.headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            Wire::H2 => head.version = Version::HTTP_2,
        }
        write_deadline(&mut head.headers, deadline, now);
        if ctx.grpc || head.headers.contains_key(GRPC_TIMEOUT) {
            write_grpc_timeout(&mut head.headers, timeout);
        }
        let refused = |e: super::pool::SendError| Refused {
            service: Some(service.clone()),
            error: MeshError::for_failure(e.kind),
            detail: format!("service {service:?}: {}", e.detail),
        };
        let timed_out = || Refused {
            service: Some(service.clone()),
            error: MeshError::Timeout,
            detail: format!(
                "service {service:?}: no response within {}",
                crate::util::duration::format(timeout)
            ),
        };

        if let Some((protocol, client_side)) = client_side {
            return self
                .upgrade(
                    head,
                    local,
                    protocol,
                    client_side,
                    connect_timeout,
                    deadline,
                    &config,
                )
                .await
                .map(|resp| (service.clone(), resp))
                .map_err(|e| e.map_or_else(timed_out, refused));
        }

        // A stale kept-alive connection is retried on a fresh one when that is safe: no body to hold, and a
        // request that may be sent twice.
        // meshd's own HTTP/1.1 client gives a stale request back; for any other a copy is kept for it.
        let bodiless = body.is_end_stream();
        let resend = bodiless && safe_to_repeat;
        let again_head =
            (resend && !local.state.pool.keeps_request(&head, 0)).then(|| head.clone());
        let again = move |written: Option<Request<ReqBody>>| {
            if !resend {
                return None;
            }
            written.or_else(|| {
                again_head
                    .map(|h| Request::from_parts(h, Either::Right(Full::new(bytes::Bytes::new()))))
            })
        };
        let (body, watch): (ReqBody, _) = if bodiless {
            (Either::Right(Full::new(bytes::Bytes::new())), None)
        } else {
            let (body, watch) = ClientBody::watched(body);
            (Either::Left(body), Some(watch))
        };
        let opts = SendOpts {
            connect_timeout,
            fresh: false,
        };
        let sent = tokio::time::timeout_at(
            deadline.into(),
            local.state.pool.send_or_resend_stale(
                &self.upstreams,
                Request::from_parts(head, body),
                opts,
                again,
            ),
        )
        .await;
        let (mut resp, lease) = match sent {
            Ok(Ok(ok)) => ok,
            Ok(Err(mut e)) => {
                if watch.as_ref().is_some_and(BodyWatch::failed) {
                    e.kind = FailKind::ClientBody;
                }
                return Err(refused(e));
            }
            Err(_) => return Err(timed_out()),
        };
        strip_hop_by_hop(resp.headers_mut());
        Ok((
            service.clone(),
            resp.map(|b| Either::Left(Observed::new(b, None, Some(lease)))),
        ))
    }

    /// An app's upgrade, relayed by a peer: HTTP/1.1 upgrade toward the container, 200 back to the peer.
    #[allow(clippy::too_many_arguments)]
    async fn upgrade(
        &self,
        mut head: http::request::Parts,
        local: &Endpoint,
        protocol: HeaderValue,
        client_side: hyper::upgrade::OnUpgrade,
        connect_timeout: Duration,
        deadline: Instant,
        config: &Config,
    ) -> Result<Response<ProxyBody>, Option<super::pool::SendError>> {
        if local.state.pool.key().wire != Wire::H1 {
            self.tunnels.count("failed");
            return Ok(error_response(
                MeshError::UpstreamFailed,
                false,
                "upgrades (WebSocket) need an HTTP/1.1 endpoint",
            ));
        }
        head.method = Method::GET;
        restore_upgrade_headers(&mut head.headers, &protocol);
        let req = Request::from_parts(head, Either::Right(Full::new(bytes::Bytes::new())));
        let sent = tokio::time::timeout_at(
            deadline.into(),
            h1::send_upgrade(&self.upstreams, local.addr, req, connect_timeout),
        )
        .await;
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.tunnels.count("failed");
                return Err(Some(e));
            }
            Err(_) => {
                self.tunnels.count("failed");
                return Err(None);
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            self.tunnels.count("declined");
            strip_hop_by_hop(resp.headers_mut());
            return Ok(resp.map(|b| Either::Left(Observed::new(b, None, None))));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        self.tunnels.count("upgraded");
        self.tunnels.spawn(
            client_side,
            upstream_side,
            (),
            config.outbound.upgrade_idle_timeout,
        );
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.status = StatusCode::OK;
        parts.version = Version::HTTP_2;
        Ok(Response::from_parts(
            parts,
            Either::Right(Full::new(bytes::Bytes::new())),
        ))
    }
}

/// Reads the mesh headers a peer agent must send.
fn mesh_target(h: &HeaderMap) -> Result<(String, SocketAddr), String> {
    let get = |name: &http::HeaderName| {
        h.get(name).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            format!("missing or unreadable {name} header: only peer agents may use this port")
        })
    };
    let service = get(&MESH_SERVICE)?.to_ascii_lowercase();
    let endpoint: SocketAddr = get(&MESH_ENDPOINT)?
        .parse()
        .map_err(|_| "mesh-endpoint is not an ip:port".to_string())?;
    Ok((service, endpoint))
}

/// Logs (at most once a minute) when the peer's idea of the endpoint's protocol differs from this host's
/// discovery, which wins.
fn check_orig_proto(h: &HeaderMap, local: &Endpoint, peer: SocketAddr) {
    static LAST_LOG: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let ours = proto_name(if local.protocol.is_h2() {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    });
    let Some(theirs) = h.get(MESH_ORIG_PROTO) else {
        return;
    };
    if theirs.as_bytes() == ours.as_bytes() {
        return;
    }
    let mut last = LAST_LOG.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        *last = Some(Instant::now());
        tracing::info!(%peer, endpoint = %local.addr, peer_says = ?theirs, ours,
            "mesh-orig-proto disagrees with this node's discovery; using this node's");
    }
}
