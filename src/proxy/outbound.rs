//! The outbound proxy: requests from local apps, routed by service name to an endpoint anywhere in the mesh.
//!
//! Reads routing-table snapshots and the config; writes nothing shared. A request for a local endpoint goes
//! straight to it in the endpoint's protocol; one for an endpoint on another node goes over HTTP/2 to that
//! node's inbound listener, naming the service, the endpoint and the protocol to restore.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use std::borrow::Cow;

use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, Version, header};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::sync::watch;

use super::client::Clients;
use super::errors::{MeshError, error_response};
use super::framing::Verdict;
use super::headers::{
    MESH_ENDPOINT, MESH_ORIG_PROTO, MESH_SERVICE, append_forwarded_for, ensure_request_id,
    strip_hop_by_hop,
};
use super::server::{ConnInfo, Handler};
use super::{ProxyBody, is_grpc, proto_name};
use crate::config::Config;
use crate::routing::{Location, Table};
use crate::telemetry::Direction;
use crate::telemetry::metrics::ProxyMetrics;

/// Shared state of the outbound proxy.
pub struct Outbound {
    pub config: Arc<Config>,
    pub table: watch::Receiver<Arc<Table>>,
    pub clients: Clients,
    pub metrics: ProxyMetrics,
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
            let grpc = is_grpc(&req);
            let (service, resp) = match this.proxy(req, &conn).await {
                Ok((service, resp)) => (service, resp.map(Either::Left)),
                Err(Refusal {
                    service,
                    error,
                    detail,
                    close,
                }) => {
                    this.metrics
                        .errors
                        .with_label_values(&[Direction::Outbound.as_str(), error.code()])
                        .inc();
                    tracing::debug!(error = error.code(), %detail, "outbound request refused");
                    let mut resp = error_response(error, grpc, &detail);
                    if close {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    (service, resp)
                }
            };
            this.metrics.record(
                Direction::Outbound,
                service.as_deref().unwrap_or(""),
                resp.status(),
                start.elapsed(),
            );
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
}

impl Refusal {
    fn new(service: Option<&Arc<str>>, error: MeshError, detail: String) -> Self {
        Refusal {
            service: service.cloned(),
            error,
            detail,
            close: false,
        }
    }
}

impl Outbound {
    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(Option<Arc<str>>, Response<Incoming>), Refusal> {
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
        let name = self.service_name(authority.host())?;

        let table = self.table.borrow().clone();
        let service = table.service(&name).ok_or_else(|| {
            Refusal::new(
                None,
                MeshError::NoRoute,
                format!("no service named {name:?} is known to this mesh"),
            )
        })?;
        let name = &service.name;
        let endpoint = service.pick().ok_or_else(|| {
            Refusal::new(
                Some(name),
                MeshError::NoEndpoints,
                format!("service {name:?} has no routable endpoint"),
            )
        })?;

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        parts.headers.remove(MESH_ENDPOINT);
        parts.headers.remove(MESH_ORIG_PROTO);
        append_forwarded_for(&mut parts.headers, conn.peer.ip());
        ensure_request_id(&mut parts.headers);
        parts
            .headers
            .insert(MESH_SERVICE, service.name_header.clone());
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let container_version = if endpoint.protocol.is_h2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let version = match &endpoint.location {
            Location::Local { .. } => container_version,
            Location::Remote { .. } => {
                parts
                    .headers
                    .insert(MESH_ENDPOINT, endpoint.addr_header.clone());
                parts.headers.insert(
                    MESH_ORIG_PROTO,
                    HeaderValue::from_static(proto_name(container_version)),
                );
                Version::HTTP_2
            }
        };
        let uri = super::upstream_uri(endpoint.next_hop.clone(), &parts.uri);
        let timeout = self.config.timeout_for(name);
        tracing::trace!(service = %name, endpoint = %endpoint.addr, via = %endpoint.next_hop, "forwarding");
        let mut resp = self
            .clients
            .send(Request::from_parts(parts, body), uri, version, timeout)
            .await
            .map_err(|(error, detail)| {
                Refusal::new(Some(name), error, format!("service {name:?}: {detail}"))
            })?;
        strip_hop_by_hop(resp.headers_mut());
        Ok((Some(name.clone()), resp))
    }

    /// Host → service name: lowercased, port and configured suffixes removed. Addresses are refused.
    fn service_name<'h>(&self, host: &'h str) -> Result<Cow<'h, str>, Refusal> {
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
        for suffix in &self.config.outbound.strip_suffixes {
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
}

/// The authority a request is for: the absolute-form URI (proxy style) or h2 `:authority`, else `Host`.
fn request_authority(req: &Request<Incoming>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    host.parse().ok()
}
