//! The attempt loop: pick an endpoint, send, and retry when the policy, the budget and the deadline allow.
//!
//! A request is sent again only when that is safe: an idempotent method (or `mesh-retryable: true`) whose body
//! meshd holds in full (none, or at most [`MAX_REPLAY_BODY`] buffered before the first attempt). A connection
//! that turns out stale is a separate case, handled inside the pool: the request goes once more on a fresh
//! connection, under the same rule, and no breaker or budget hears of it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};

use super::target::Target;
use super::{Outbound, Refusal, Served};
use crate::config::ServicePolicy;
use crate::config::policy::Conditions;
use crate::policy::balance::{self, Tried};
use crate::policy::breaker::Permit;
use crate::policy::fault;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::errors::MeshError;
use crate::proxy::headers::{
    GRPC_TIMEOUT, MESH_ENDPOINT, MESH_ORIG_PROTO, MESH_RETRYABLE, MESH_SERVICE, Present,
    append_forwarded_for, join_cookies, remove_all, set_host, strip_hop_by_hop, write_deadline,
    write_grpc_timeout, write_relative_deadline,
};
use crate::proxy::observe::{Observed, Report};
use crate::proxy::pool::{
    BodyWatch, ClientBody, FailKind, Lease, ReqBody, SendError, SendOpts, UpBody, Wire,
};
use crate::proxy::proto_name;
use crate::proxy::spans::Outcome;
use crate::routing::{Endpoint, Location, Service};

/// Request bodies up to this size are buffered so the request can be retried.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Retry backoff: full jitter over an exponential from this base…
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// …up to this cap.
const RETRY_BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
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
    /// The response, and which of the headers meshd reads it has.
    Response(http::Response<Observed>, Present),
    Failed(SendError),
}

/// The request body as the attempts see it.
enum Payload {
    /// Held in full (possibly empty): every attempt sends a copy.
    Replay(Bytes),
    /// Streamed from the client: one attempt only. The watch says whether the client is done with it.
    Stream(Option<ClientBody>, BodyWatch),
}

impl Payload {
    fn take(&mut self) -> ReqBody {
        match self {
            Payload::Replay(b) => Either::Right(Full::new(b.clone())),
            Payload::Stream(s, _) => match s.take() {
                Some(b) => Either::Left(b),
                None => Either::Right(Full::new(Bytes::new())),
            },
        }
    }
}

/// Runs the attempts for `t` (`client`: the app's address, for `X-Forwarded-For`), and returns the response to give the client or the reason meshd answers itself.
// An async block, not an `async fn`: the future of an `async fn` holds each argument twice (as argument
// and as local), and is copied in full at every move.
#[allow(clippy::manual_async_fn)]
pub fn run(
    out: &Outbound,
    ctx: &mut RequestCtx,
    t: super::target::Target,
    req: Request<Incoming>,
    client: &HeaderValue,
) -> impl Future<Output = Result<Served, Refusal>> {
    async move {
        let policy = t.policy();
        let marked_retryable = ctx.sent.any(Present::MESH_CONTROL)
            && req
                .headers()
                .get(MESH_RETRYABLE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let safe_to_repeat = idempotent(req.method()) || marked_retryable;
        let hop = Hop {
            grpc: ctx.grpc,
            retryable: marked_retryable,
            sent: ctx.sent,
        };
        let (mut head, body) = req.into_parts();
        prepare_head(&mut head, ctx, &t, client);
        let wanted_attempts = if safe_to_repeat {
            policy.retry.max_attempts.max(1)
        } else {
            1
        };
        // A request that is safe to repeat has its small body held even without retries: a stale connection
        // may still need a second send.
        let mut payload = if body.is_end_stream() {
            // Most requests: no body, and no future to build for reading one.
            Payload::Replay(Bytes::new())
        } else {
            payload(&head, body, safe_to_repeat, &t).await?
        };
        let replayable = matches!(payload, Payload::Replay(_));
        let watch = match &payload {
            Payload::Stream(_, w) => Some(w.clone()),
            Payload::Replay(_) => None,
        };
        let max_attempts = if replayable { wanted_attempts } else { 1 };
        // A stale connection may be retried under the same rule as any retry, whatever max_attempts says.
        let resend_if_stale = replayable && safe_to_repeat;

        let budget = policy.retry.budget();
        // One reading of the clock serves the deposit and the first attempt; a retry reads it after its backoff.
        let mut now = Instant::now();
        t.logical.state.budget_deposit(&budget, now);
        let mut rng = fastrand::Rng::new();
        let mut tried = Tried::default();
        loop {
            ctx.attempt += 1;
            let attempt = ctx.attempt;
            if now >= t.deadline {
                return Err(Refusal::new(
                    Some(&t.service.name),
                    MeshError::Timeout,
                    format!(
                        "service {:?}: no response within {}",
                        t.service.name,
                        crate::util::duration::format(policy.timeout)
                    ),
                ));
            }
            let (idx, permit) = pick_endpoint(policy, &t.service, now, &mut rng, tried);
            tried.add(idx);
            let endpoint = &t.service.endpoints[idx];
            ctx.endpoint = Some(endpoint.addr);
            let try_deadline = policy
                .per_try_timeout
                .map_or(t.deadline, |p| (now + p).min(t.deadline));
            // Copy the head only when another send may need it. The copy is the spare: this attempt takes the
            // original, whose header table has room for what `for_endpoint` adds (a copy's has none).
            let last = attempt >= max_attempts && !resend_if_stale;
            // meshd's own HTTP/1.1 client gives the request back when it failed before it could have been processed:
            // a failed connect (the only failure retried here unless the policy also retries timeouts or statuses,
            // after which the request is gone) and a stale connection. Then it needs no copy.
            let given_back = !last
                && matches!(&payload, Payload::Replay(b) if endpoint.state.pool.keeps_request(&head, b.len()))
                && !policy.retry.on.timeout
                && !policy.retry.on.any_response();
            let this_head = if last || given_back {
                std::mem::replace(&mut head, Request::new(()).into_parts().0)
            } else {
                let spare = head.clone();
                std::mem::replace(&mut head, spare)
            };
            let mut req = for_endpoint(
                this_head,
                payload.take(),
                endpoint,
                &t,
                try_deadline,
                now,
                hop,
            );
            // A client span per attempt, its context in the attempt's headers (a stale resend is the same attempt).
            let client = ctx.hop.as_ref().map(|h| {
                let ids = h.attempt(req.headers_mut());
                // The clock is read only for a span that will be recorded.
                (ids, h.sampled.then(std::time::SystemTime::now))
            });
            let trace = ctx.hop.as_ref();
            let again = |written: Option<Request<ReqBody>>| {
                if written.is_some() || given_back {
                    // As written: the same trace context and deadline (a stale resend is the same attempt), with a
                    // `grpc-timeout` for the time left now.
                    let mut req = written.filter(|_| resend_if_stale)?;
                    if req.headers().contains_key(GRPC_TIMEOUT) {
                        write_grpc_timeout(
                            req.headers_mut(),
                            try_deadline.saturating_duration_since(Instant::now()),
                        );
                    }
                    return Some(req);
                }
                resend_if_stale.then(|| {
                    let body = payload.take();
                    let mut req = for_endpoint(
                        head.clone(),
                        body,
                        endpoint,
                        &t,
                        try_deadline,
                        Instant::now(),
                        hop,
                    );
                    if let (Some(h), Some((ids, _))) = (trace, &client) {
                        h.write(req.headers_mut(), ids);
                    }
                    req
                })
            };
            // The send is awaited here rather than in a function of its own: one layer less of future to build
            // and copy on every request.
            let report = Report::new(
                t.service.clone(),
                idx,
                permit,
                t.config.clone(),
                t.logical.name.clone(),
                out.policy_metrics.breaker_open.clone(),
            );
            let opts = SendOpts {
                connect_timeout: policy.connect_timeout,
                fresh: false,
            };
            let pending = endpoint.state.start();
            // The attempt's latency counts from `now`: building the request takes well under a microsecond.
            let sent = now;
            let sending =
                endpoint
                    .state
                    .pool
                    .send_or_resend_stale(&out.upstreams, req, opts, again);
            let outcome = tokio::time::timeout_at(try_deadline.into(), sending).await;
            drop(pending);
            let mut result = judge(&t, idx, report, outcome, sent, ctx.grpc, watch.as_ref());

            if let (Some(h), Some((ids, Some(start)))) = (&ctx.hop, &client) {
                let (status, grpc_status, mesh_error, response_bytes) = match &result {
                    Attempt::Response(r, _) => (
                        Some(r.status().as_u16()),
                        // Only a gRPC request's response means anything by it.
                        ctx.grpc
                            .then(|| crate::proxy::grpc_status_of(r.headers()))
                            .flatten(),
                        None,
                        crate::proxy::content_length(r.headers()),
                    ),
                    Attempt::Failed(e) => (
                        None,
                        None,
                        Some(MeshError::for_failure(e.kind).code()),
                        None,
                    ),
                };
                // A gRPC status that is not in the head comes in the trailers: the span ends with the body.
                let pending =
                    ctx.grpc && grpc_status.is_none() && matches!(result, Attempt::Response(..));
                let outcome = Outcome {
                    service: Some(t.service.name.clone()),
                    endpoint: Some(endpoint.addr),
                    peer_node: match &endpoint.location {
                        Location::Remote { node, .. } => Some(node.as_str()),
                        Location::Local { .. } => None,
                    },
                    method: Some(&ctx.method),
                    status,
                    grpc_status,
                    attempt: Some(attempt),
                    mesh_error,
                    breaker: Some(endpoint.state.breaker_state(Instant::now()).as_str()),
                    fault: None,
                    request_bytes: ctx.request_bytes,
                    response_bytes,
                };
                match &mut result {
                    Attempt::Response(r, _) if pending => {
                        if let Some(span) =
                            out.observers.tracer.client_pending(h, ids, *start, outcome)
                        {
                            r.body_mut().end_span_with_body(span);
                        }
                    }
                    _ => out.observers.tracer.client(
                        h,
                        ids,
                        *start,
                        start.elapsed().unwrap_or_default(),
                        outcome,
                    ),
                }
            }

            // Decide on a retry.
            let (retry_wanted, failed) = match &result {
                Attempt::Response(r, _) => (
                    policy.retry.on.status(r.status()),
                    r.status().is_server_error(),
                ),
                Attempt::Failed(e) => (
                    match e.kind {
                        FailKind::Connect => policy.retry.on.connect_failure,
                        FailKind::RefusedStream => policy.retry.on.refused_stream,
                        FailKind::Timeout => policy.retry.on.timeout,
                        FailKind::Stale
                        | FailKind::ClientBody
                        | FailKind::ClientTimeout
                        | FailKind::Other => false,
                    },
                    true,
                ),
            };
            if attempt > 1 {
                let outcome = if failed { "failure" } else { "success" };
                out.policy_metrics
                    .retries
                    .with_label_values(&[&t.logical.name, outcome])
                    .inc();
            }
            let backoff = retry_backoff(attempt - 1, rng.f64());
            // Without a copy, a retry sends the request the failed attempt gave back.
            let recovered = match &mut result {
                Attempt::Failed(e) if given_back && retry_wanted => {
                    e.take_request().map(|r| r.into_parts().0)
                }
                _ => None,
            };
            let can_retry = retry_wanted
                && (!given_back || recovered.is_some())
                && attempt < max_attempts
                && Instant::now() + backoff < t.deadline
                && {
                    let granted = t.logical.state.budget_withdraw(&budget, Instant::now());
                    if !granted {
                        out.policy_metrics
                            .budget_exhausted
                            .with_label_values(&[&t.logical.name])
                            .inc();
                    }
                    granted
                };
            if can_retry {
                if let Some(h) = recovered {
                    head = h;
                    // It asked for trailers for its HTTP/1.1 hop; the next endpoint's may be HTTP/2.
                    head.headers.remove(header::TE);
                }
                tracing::debug!(service = %t.service.name, endpoint = %endpoint.addr, attempt, "retrying");
                // The discarded attempt ends now, not after the backoff: its connection, breaker report and span.
                drop(result);
                tokio::time::sleep(backoff).await;
                now = Instant::now();
                continue;
            }
            return match result {
                Attempt::Response(resp, has) => Ok(Served {
                    service: t.service.clone(),
                    resp: resp.map(Either::Left),
                    has,
                }),
                Attempt::Failed(e) if e.kind == FailKind::ClientBody => {
                    Err(
                        Refusal::new(Some(&t.service.name), MeshError::BadRequest, e.detail)
                            .closing(),
                    )
                }
                Attempt::Failed(e) => Err(Refusal::new(
                    Some(&t.service.name),
                    MeshError::for_failure(e.kind),
                    format!("service {:?}: {}", t.service.name, e.detail),
                )),
            };
        }
    }
}

/// The headers every attempt shares: hop-by-hop and meshd's per-hop controls removed, `X-Forwarded-For`
/// extended, the service named.
pub(super) fn prepare_head(head: &mut Parts, ctx: &RequestCtx, t: &Target, client: &HeaderValue) {
    if ctx.sent.any(Present::HOP_BY_HOP) {
        strip_hop_by_hop(&mut head.headers);
    }
    if ctx.sent.any(Present::EXPECT | Present::MESH_CONTROL) {
        remove_all(&mut head.headers, &NOT_FORWARDED);
    }
    append_forwarded_for(
        &mut head.headers,
        ctx.sent.any(Present::FORWARDED_FOR),
        client,
    );
    head.headers
        .insert(MESH_SERVICE, t.service.name_header.clone());
    // Room for what an attempt adds (Host, TE, deadlines, a peer's controls, trace context): the attempt sends
    // this head, so it does not grow and rehash the table (the spare copy kept for a resend has no room).
    head.headers.reserve(8);
}

/// Headers meshd consumes itself, whatever an app sends: `Expect` (answered by meshd's own server), the
/// per-hop controls between agents and the fault-injection overrides. One list, so a request without any of
/// them costs one pass. (A `static`: a `const` array is built and dropped again at every use.)
static NOT_FORWARDED: [HeaderName; 6] = [
    header::EXPECT,
    MESH_ENDPOINT,
    MESH_ORIG_PROTO,
    MESH_RETRYABLE,
    fault::MESH_FAULT_DELAY,
    fault::MESH_FAULT_ABORT,
];

/// Holds the body when it is empty, or when another send may need it and it is known to be small
/// (Content-Length ≤ [`MAX_REPLAY_BODY`]). Bodies of unknown length are streamed and never retried: waiting
/// for their end could stall a streaming client. Buffering ends at the request's deadline: a client that
/// trickles its body is answered 408 instead of holding the request forever.
async fn payload(
    head: &Parts,
    body: Incoming,
    retries_possible: bool,
    t: &Target,
) -> Result<Payload, Refusal> {
    if body.is_end_stream() {
        return Ok(Payload::Replay(Bytes::new()));
    }
    let declared = head
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !retries_possible || declared.is_none_or(|n| n > MAX_REPLAY_BODY as u64) {
        let (body, watch) = ClientBody::watched(body);
        return Ok(Payload::Stream(Some(body), watch));
    }
    let name = Some(&t.service.name);
    match tokio::time::timeout_at(
        t.deadline.into(),
        Limited::new(ClientBody::new(body), MAX_REPLAY_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => Ok(Payload::Replay(collected.to_bytes())),
        Ok(Err(e)) => Err(Refusal::new(
            name,
            MeshError::BadRequest,
            format!("reading the request body: {e}"),
        )
        .closing()),
        Err(_) => Err(Refusal::new(
            name,
            MeshError::RequestTimeout,
            "the request body did not arrive before the request's deadline",
        )
        .closing()),
    }
}

/// Picks an endpoint of `svc` by the service's balancer and takes its breaker's permit (the single probe, for
/// an endpoint whose backoff has just passed). When every endpoint is ejected, the one that failed longest
/// ago gets the request anyway: meshd never fails a request locally while endpoints exist.
pub(super) fn pick_endpoint(
    policy: &ServicePolicy,
    svc: &Service,
    now: Instant,
    rng: &mut fastrand::Rng,
    mut tried: Tried,
) -> (usize, Permit) {
    let first_tried = tried;
    // Another request may take a probe between the pick and the acquire: try a few times.
    for _ in 0..4 {
        let Some(idx) = balance::pick(
            policy.load_balancer,
            &svc.endpoints,
            now,
            rng,
            &svc.state.rr,
            tried,
        ) else {
            break;
        };
        if let Some(permit) = svc.endpoints[idx].state.breaker_acquire(now) {
            return (idx, permit);
        }
        tried.add(idx);
    }
    let oldest_failure = |skip: Tried| {
        svc.endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(*i))
            .min_by_key(|(_, e)| e.state.last_failure())
            .map(|(i, _)| i)
    };
    let idx = oldest_failure(first_tried)
        .or_else(|| oldest_failure(Tried::default()))
        .unwrap_or(0);
    (idx, svc.endpoints[idx].state.breaker_forced())
}

/// What the next hop needs to know about the request beyond its head.
#[derive(Clone, Copy)]
struct Hop {
    grpc: bool,
    /// The app sent `mesh-retryable: true`: a peer agent may send it again too.
    retryable: bool,
    /// The headers the app sent.
    sent: Present,
}

/// `head` + `body` as `endpoint` must receive them: the request target and `Host`/`:authority` in the form
/// its protocol uses, the deadline in the form its hop uses, and for an endpoint on another node the headers
/// its agent needs.
fn for_endpoint(
    mut head: Parts,
    body: ReqBody,
    endpoint: &Endpoint,
    t: &Target,
    try_deadline: Instant,
    now: Instant,
    hop: Hop,
) -> Request<ReqBody> {
    let wire = endpoint.state.pool.key().wire;
    head.uri = request_target(wire, &t.authority, &head.uri);
    match wire {
        Wire::H1 => {
            head.version = Version::HTTP_11;
            set_host(&mut head.headers, &t.authority);
            if hop.sent.any(Present::COOKIE) {
                join_cookies(&mut head.headers);
            }
            // meshd can pass trailers on whatever the client is (an HTTP/1.1 client gets them when it asked
            // with `TE: trailers`): without this an HTTP/1.1 upstream leaves them out.
            head.headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        Wire::H2 => {
            head.version = Version::HTTP_2;
            // `:authority` carries it.
            head.headers.remove(header::HOST);
        }
    }
    match &endpoint.location {
        Location::Local { .. } => write_deadline(&mut head.headers, try_deadline, now),
        Location::Remote { .. } => {
            head.headers
                .insert(MESH_ENDPOINT, endpoint.addr_header.clone());
            let proto = if endpoint.protocol.is_h2() {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            head.headers
                .insert(MESH_ORIG_PROTO, HeaderValue::from_static(proto_name(proto)));
            if hop.retryable {
                head.headers
                    .insert(MESH_RETRYABLE, HeaderValue::from_static("true"));
            }
            write_relative_deadline(&mut head.headers, try_deadline, now);
        }
    }
    // The flag only saves the lookup when the app sent none: `Connection` may have named it for removal.
    if hop.grpc || (hop.sent.any(Present::GRPC_TIMEOUT) && head.headers.contains_key(GRPC_TIMEOUT))
    {
        write_grpc_timeout(
            &mut head.headers,
            try_deadline.saturating_duration_since(now),
        );
    }
    Request::from_parts(head, body)
}

/// Origin-form (`/path?query`) for HTTP/1.1; `http://<authority>/path?query` for HTTP/2, whose `:authority`
/// it becomes.
pub fn request_target(wire: Wire, authority: &http::uri::Authority, original: &Uri) -> Uri {
    let path = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    if wire == Wire::H2 {
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority.clone());
    }
    parts.path_and_query = Some(path);
    Uri::from_parts(parts)
        .unwrap_or_else(|_| unreachable!("a path, with or without scheme and authority"))
}

/// One attempt's send to endpoint `idx` of `t.service`, sent at `sent`, as the attempt loop sees it; feeds the
/// endpoint's latency estimate and circuit breaker (`report`). `watch` follows a body streamed from the
/// client: when it broke off, or was still arriving at the deadline, the failure is the client's.
fn judge(
    t: &Target,
    idx: usize,
    report: Report,
    result: Result<Result<(http::Response<UpBody>, Lease), SendError>, tokio::time::error::Elapsed>,
    sent: Instant,
    grpc: bool,
    watch: Option<&BodyWatch>,
) -> Attempt {
    let endpoint = &t.service.endpoints[idx];
    let policy = t.policy();
    let now = Instant::now();
    let failure_on = &policy.circuit_breaker.failure_on;
    match result {
        Ok(Ok((resp, lease))) => {
            endpoint.state.observe_latency(now - sent, now);
            let has = Present::scan(resp.headers());
            let trailers_only_grpc = has
                .any(Present::GRPC_STATUS)
                .then(|| resp.headers().get(crate::proxy::headers::GRPC_STATUS))
                .flatten()
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
            let mut resp = resp.map(|b| Observed::new(b, report, Some(lease)));
            if has.any(Present::HOP_BY_HOP) {
                strip_hop_by_hop(resp.headers_mut());
            }
            Attempt::Response(resp, has)
        }
        Ok(Err(mut e)) => {
            if watch.is_some_and(BodyWatch::failed) {
                // An HTTP/2 upstream only reports its stream reset: the watch knows the client's body broke.
                e.kind = FailKind::ClientBody;
                e.detail = "the request body from the client failed".into();
            }
            settle(report, e.kind, failure_on);
            Attempt::Failed(e)
        }
        Err(_elapsed) if watch.is_some_and(|w| !w.finished()) => {
            // The upstream may well have been waiting for the rest of the body.
            report.abandon();
            Attempt::Failed(SendError {
                kind: FailKind::ClientTimeout,
                detail: "the request body did not arrive before the request's deadline".into(),
                unsent: None,
                written: None,
            })
        }
        Err(_elapsed) => {
            endpoint.state.observe_latency(now - sent, now);
            report.finish(!failure_on.timeout);
            let waited = now.saturating_duration_since(sent);
            Attempt::Failed(SendError {
                kind: FailKind::Timeout,
                detail: format!(
                    "no response from {} within {}",
                    endpoint.addr,
                    crate::util::duration::format(Duration::from_millis(waited.as_millis() as u64))
                ),
                unsent: None,
                written: None,
            })
        }
    }
}

/// Tells the breaker about a failed attempt, as far as `failure_on` counts it.
pub(super) fn settle(report: Report, kind: FailKind, failure_on: &Conditions) {
    let counts = match kind {
        FailKind::Connect => failure_on.connect_failure,
        FailKind::RefusedStream => failure_on.refused_stream,
        FailKind::Timeout => failure_on.timeout,
        FailKind::Other => true,
        // Not the endpoint's doing: the client's body failed or came too slowly, or a kept-alive connection
        // raced its close.
        FailKind::ClientBody | FailKind::ClientTimeout | FailKind::Stale => {
            return report.abandon();
        }
    };
    report.finish(!counts);
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
    fn the_scan_flags_every_header_meshd_consumes() {
        for name in &NOT_FORWARDED {
            let mut h = http::HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("1"));
            assert!(
                Present::scan(&h).any(Present::EXPECT | Present::MESH_CONTROL),
                "{name}"
            );
        }
    }

    #[test]
    fn idempotent_methods() {
        assert!(
            idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE)
        );
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    #[test]
    fn request_targets_by_protocol() {
        let a: http::uri::Authority = "users.mesh:8080".parse().unwrap();
        let orig: Uri = "http://users.mesh:8080/a?b=1".parse().unwrap();
        assert_eq!(request_target(Wire::H1, &a, &orig), "/a?b=1");
        assert_eq!(
            request_target(Wire::H2, &a, &orig),
            "http://users.mesh:8080/a?b=1"
        );
        // `OPTIONS *` keeps its asterisk.
        let star: Uri = "*".parse().unwrap();
        assert_eq!(request_target(Wire::H1, &a, &star), "*");
    }
}
