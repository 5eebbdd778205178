//! The inbound proxy: requests from peer agents for endpoints on this host.
//!
//! A peer names the service (`mesh-service`), the endpoint it chose (`mesh-endpoint`) and the protocol to use
//! toward the container (`mesh-orig-proto`). The request is forwarded only when this host's own discovery lists
//! that endpoint for that service; anything else is refused with 403 `forbidden` and counted. This stops the
//! inbound port from being used as an open proxy into the host's networks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::sync::watch;

use super::client::Clients;
use super::errors::{MeshError, error_response};
use super::headers::{
    MESH_ENDPOINT, MESH_ORIG_PROTO, MESH_SERVICE, append_forwarded_for, read_deadline,
    strip_hop_by_hop,
};
use super::observe::Observed;
use super::server::{ConnInfo, Handler};
use super::{ProxyBody, is_grpc};
use crate::config::Config;
use crate::routing::Table;
use crate::telemetry::Direction;
use crate::telemetry::metrics::ProxyMetrics;

/// Shared state of the inbound proxy.
pub struct Inbound {
    pub config: watch::Receiver<Arc<Config>>,
    pub table: watch::Receiver<Arc<Table>>,
    pub clients: Clients,
    pub metrics: ProxyMetrics,
}

/// The inbound request handler; one clone per connection.
#[derive(Clone)]
pub struct InboundHandler(pub Arc<Inbound>);

impl Handler for InboundHandler {
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let this = self.0;
        async move {
            let start = Instant::now();
            let grpc = is_grpc(&req);
            let (service, resp) = match this.proxy(req, &conn).await {
                Ok((service, resp)) => (
                    Some(service),
                    resp.map(|b| Either::Left(Observed::new(b, None))),
                ),
                Err((service, error, detail)) => {
                    this.metrics
                        .errors
                        .with_label_values(&[Direction::Inbound.as_str(), error.code()])
                        .inc();
                    tracing::debug!(peer = %conn.peer, error = error.code(), %detail, "inbound request refused");
                    (service, error_response(error, grpc, &detail))
                }
            };
            this.metrics.record(
                Direction::Inbound,
                service.as_deref().unwrap_or(""),
                resp.status(),
                start.elapsed(),
            );
            resp
        }
    }
}

type Refused = (Option<String>, MeshError, String);

impl Inbound {
    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(String, Response<Incoming>), Refused> {
        let forbidden = |why: String| (None, MeshError::Forbidden, why);
        // Without mutual TLS there is no way to tell a peer agent from anyone else who can reach the port.
        if !self.config.borrow().inbound.insecure_plaintext {
            return Err(forbidden(
                "this node accepts peer agents only over mutual TLS, which this version does not provide; \
                 set inbound.insecure_plaintext = true on a trusted test network"
                    .into(),
            ));
        }
        if req.version() != Version::HTTP_2 {
            return Err(forbidden(
                "the inbound port accepts only HTTP/2 from peer agents".into(),
            ));
        }
        let (service, endpoint, version) = mesh_target(req.headers()).map_err(forbidden)?;
        let table = self.table.borrow().clone();
        let Some(local) = table.local_endpoint(&service, endpoint) else {
            return Err(forbidden(format!(
                "{endpoint} is not an endpoint of service {service:?} on this node"
            )));
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(MESH_ENDPOINT);
        parts.headers.remove(MESH_ORIG_PROTO);
        append_forwarded_for(&mut parts.headers, conn.peer.ip());
        let uri = super::upstream_uri(local.addr_authority.clone(), &parts.uri);
        // The sender's deadline bounds this hop too.
        let mut timeout = self.config.borrow().timeout_for(&service);
        if let Some(left) = read_deadline(&parts.headers) {
            if left.is_zero() {
                return Err((
                    Some(service.clone()),
                    MeshError::Timeout,
                    "the request's mesh-deadline has already passed".into(),
                ));
            }
            timeout = timeout.min(left);
        }
        let mut resp = self
            .clients
            .send(
                Request::from_parts(parts, Either::Left(body)),
                uri,
                version,
                timeout,
            )
            .await
            .map_err(|e| {
                (
                    Some(service.clone()),
                    e.mesh_error(),
                    format!("service {service:?}: {}", e.detail),
                )
            })?;
        strip_hop_by_hop(resp.headers_mut());
        Ok((service, resp))
    }
}

/// Reads the mesh headers a peer agent must send.
fn mesh_target(h: &HeaderMap) -> Result<(String, SocketAddr, Version), String> {
    let get = |name: &http::HeaderName| {
        h.get(name).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            format!("missing or unreadable {name} header: only peer agents may use this port")
        })
    };
    let service = get(&MESH_SERVICE)?.to_ascii_lowercase();
    let endpoint: SocketAddr = get(&MESH_ENDPOINT)?
        .parse()
        .map_err(|_| "mesh-endpoint is not an ip:port".to_string())?;
    let version = match get(&MESH_ORIG_PROTO)? {
        "HTTP/1.1" => Version::HTTP_11,
        "HTTP/2" => Version::HTTP_2,
        other => {
            return Err(format!(
                "mesh-orig-proto {other:?} is not HTTP/1.1 or HTTP/2"
            ));
        }
    };
    Ok((service, endpoint, version))
}
