//! `Connection: Upgrade` requests (WebSocket and the like) from apps.
//!
//! To a local HTTP/1.1 endpoint the upgrade request goes on a connection of its own; after its 101 the two
//! connections are joined byte for byte ([`Tunnels`](crate::proxy::tunnel::Tunnels)). To an endpoint on
//! another node it travels as an HTTP/2 extended CONNECT (RFC 8441) carrying the app's handshake headers; the
//! peer agent makes the HTTP/1.1 upgrade toward its container and answers 200 with the container's 101
//! headers, which this side turns back into the app's 101. A declined upgrade (any other status) is passed back
//! as an ordinary response.

use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};

use super::attempt::{pick_endpoint, prepare_head, request_target, settle};
use super::target::Target;
use super::{Outbound, Refusal, Served};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::errors::MeshError;
use crate::proxy::headers::{
    MESH_ENDPOINT, MESH_ORIG_PROTO, Present, strip_hop_by_hop, write_relative_deadline,
};
use crate::proxy::observe::{Observed, Report};
use crate::proxy::pool::{SendError, SendOpts, Wire, h1};
use crate::proxy::proto_name;
use crate::proxy::server::TunnelHold;
use crate::routing::Location;

/// Whether `headers` has `Connection: upgrade` and an `Upgrade` protocol.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An HTTP/1.1 upgrade request (HTTP/2 has no `Upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && wants_upgrade(req.headers())
}

/// Puts back the two headers an upgrade needs on each hop (hop-by-hop stripping removed them).
pub fn restore_upgrade_headers(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::UPGRADE, protocol.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Proxies an upgrade request to one endpoint of the target (an upgrade is never retried).
pub async fn proxy(
    out: &Outbound,
    ctx: &mut RequestCtx,
    t: Target,
    mut req: Request<Incoming>,
    slot: TunnelHold,
) -> Result<Served, Refusal> {
    let name = Some(&t.service.name);
    if !req.body().is_end_stream() {
        return Err(Refusal::new(
            name,
            MeshError::BadRequest,
            "an upgrade request cannot have a body",
        )
        .closing());
    }
    let Some(protocol) = req.headers().get(header::UPGRADE).cloned() else {
        return Err(Refusal::new(
            name,
            MeshError::BadRequest,
            "no Upgrade header",
        ));
    };
    let client_side = hyper::upgrade::on(&mut req);
    let policy = t.policy();
    let now = Instant::now();
    let (idx, permit) = pick_endpoint(
        policy,
        &t.service,
        now,
        &mut fastrand::Rng::new(),
        Default::default(),
    );
    let endpoint = &t.service.endpoints[idx];
    ctx.endpoint = Some(endpoint.addr);
    ctx.attempt = 1;
    let report = Report::new(
        t.service.clone(),
        idx,
        permit,
        t.config.clone(),
        t.logical.name.clone(),
        out.policy_metrics.breaker_open.clone(),
    );
    let (mut head, _) = req.into_parts();
    prepare_head(&mut head, ctx, &t, slot.conn().peer_value());
    let wire = endpoint.state.pool.key().wire;
    let remote = matches!(endpoint.location, Location::Remote { .. });
    let body = || Either::Right(Full::new(bytes::Bytes::new()));
    let pending = endpoint.state.start();
    let result = if remote {
        // Extended CONNECT to the peer agent, on the pooled HTTP/2 connection.
        head.method = Method::CONNECT;
        head.version = Version::HTTP_2;
        head.uri = request_target(Wire::H2, &t.authority, &head.uri);
        head.headers.remove(header::HOST);
        head.headers
            .insert(MESH_ENDPOINT, endpoint.addr_header.clone());
        head.headers.insert(
            MESH_ORIG_PROTO,
            HeaderValue::from_static(proto_name(Version::HTTP_11)),
        );
        // The protocol travels as `:protocol`; the app's handshake headers (Sec-WebSocket-*) as they are.
        write_relative_deadline(&mut head.headers, t.deadline, Instant::now());
        let mut req = Request::from_parts(head, body());
        if let Ok(p) = protocol.to_str() {
            req.extensions_mut().insert(hyper::ext::Protocol::from(p));
        }
        let opts = SendOpts {
            connect_timeout: policy.connect_timeout,
            fresh: false,
        };
        tokio::time::timeout_at(
            t.deadline.into(),
            endpoint.state.pool.send(&out.upstreams, req, opts),
        )
        .await
        .map(|r| r.map(|(resp, lease)| (resp, Some(lease))))
    } else if wire == Wire::H1 {
        head.version = Version::HTTP_11;
        head.uri = request_target(Wire::H1, &t.authority, &head.uri);
        if let Ok(v) = HeaderValue::from_str(t.authority.as_str()) {
            head.headers.insert(header::HOST, v);
        }
        restore_upgrade_headers(&mut head.headers, &protocol);
        let req = Request::from_parts(head, body());
        tokio::time::timeout_at(
            t.deadline.into(),
            h1::send_upgrade(&out.upstreams, endpoint.addr, req, policy.connect_timeout),
        )
        .await
        .map(|r| r.map(|resp| (resp, None)))
    } else {
        drop(pending);
        report.abandon();
        out.tunnels.count("failed");
        return Err(Refusal::new(
            name,
            MeshError::UpstreamFailed,
            format!(
                "endpoint {} of service {:?} speaks {}: upgrades (WebSocket) need an HTTP/1.1 endpoint",
                endpoint.addr, t.service.name, endpoint.protocol
            ),
        ));
    };
    drop(pending);
    let failure_on = &policy.circuit_breaker.failure_on;
    let (mut resp, lease) = match result {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            settle(report, e.kind, failure_on);
            out.tunnels.count("failed");
            return Err(refusal(&t, e));
        }
        Err(_) => {
            report.finish(!failure_on.timeout);
            out.tunnels.count("failed");
            return Err(Refusal::new(
                name,
                MeshError::Timeout,
                format!(
                    "service {:?}: the upgrade was not answered in time",
                    t.service.name
                ),
            ));
        }
    };
    let accepted = if remote {
        resp.status() == StatusCode::OK
    } else {
        resp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    report.finish(!failure_on.status(resp.status()));
    if !accepted {
        out.tunnels.count("declined");
        strip_hop_by_hop(resp.headers_mut());
        return Ok(Served {
            service: t.service.clone(),
            has: Present::scan(resp.headers()),
            resp: resp.map(|b| Either::Left(Observed::new(b, None, lease))),
        });
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    out.tunnels.count("upgraded");
    out.tunnels.spawn(
        client_side,
        upstream_side,
        (lease, slot),
        t.config.outbound.upgrade_idle_timeout,
    );
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    restore_upgrade_headers(&mut parts.headers, &protocol);
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    parts.version = Version::HTTP_11;
    Ok(Served {
        service: t.service.clone(),
        has: Present::scan(&parts.headers),
        resp: Response::from_parts(parts, Either::Right(Full::new(bytes::Bytes::new()))),
    })
}

fn refusal(t: &Target, e: SendError) -> Refusal {
    Refusal::new(
        Some(&t.service.name),
        MeshError::for_failure(e.kind),
        format!("service {:?}: {}", t.service.name, e.detail),
    )
}
