//! Target resolution: which service a request is for, under which policy and deadline.
//!
//! In order: the authority the app named (absolute-form URI or h2 `:authority`, else `Host`, checked per
//! RFC 9110 §7.2, RFC 9112 §3.2 and RFC 9113 §8.3.1) → service name → rate limit → fault → deadline (the
//! service's timeout, the caller's `mesh-deadline` and `grpc-timeout`) → route/split → endpoints.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::uri::{Authority, Scheme};
use http::{Request, Version, header};
use hyper::body::Incoming;

use super::{Outbound, Refusal};
use crate::config::{Config, ServicePolicy};
use crate::policy::{fault, route};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::errors::MeshError;
use crate::proxy::headers::caller_budget;
use crate::routing::{Service, Table};

/// A resolved request: where it goes and under which rules.
pub struct Target {
    pub config: Arc<Config>,
    /// The service the app asked for: its policy applies.
    pub logical: Arc<Service>,
    /// The service whose endpoints are used (the same, unless a route or split chose another).
    pub service: Arc<Service>,
    /// The authority as the app named the service (`users`, `users.mesh:8080`): every hop sees this one.
    pub authority: Authority,
    /// When meshd stops waiting for response headers.
    pub deadline: Instant,
}

impl Target {
    pub fn policy(&self) -> &ServicePolicy {
        self.config.policy_for(&self.logical.name)
    }
}

/// The first half of target resolution: the service, its rate limit and the fault decision. The caller waits
/// out [`Admitted::delay`], if any, then calls [`finish`]. (Two plain functions rather than one `async fn`:
/// most requests have no delay, and a future of its own would be built, moved and polled for each.)
pub struct Admitted {
    config: Arc<Config>,
    table: Arc<Table>,
    logical: Arc<Service>,
    authority: Authority,
    rng: fastrand::Rng,
    /// A fault delay to wait before [`finish`].
    pub delay: Option<std::time::Duration>,
    abort: Option<http::StatusCode>,
}

/// Authority → service → rate limit → fault decision.
pub fn admit(
    out: &Outbound,
    ctx: &mut RequestCtx,
    req: &Request<Incoming>,
) -> Result<Admitted, Refusal> {
    let authority = routed_authority(req)?;
    let config = out.config.borrow().clone();
    let name = service_name(&config, host_of(&authority))?;
    let table = out.table.borrow().clone();
    let logical = table.service(&name).cloned().ok_or_else(|| {
        Refusal::new(
            None,
            MeshError::NoRoute,
            format!("no service named {name:?} is known to this mesh"),
        )
    })?;
    ctx.service = Some(logical.name.clone());
    let policy = config.policy_for(&logical.name);
    let mut rng = fastrand::Rng::new();

    if let Some(rl) = &policy.rate_limit
        && let Err(wait) = logical.state.rate_limit(&rl.config(), Instant::now())
    {
        out.policy_metrics
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

    let (mut delay, mut abort) = (None, None);
    if let Some(f) = &policy.fault {
        let decision = fault::decide(f, req.headers(), rng.f64(), rng.f64());
        ctx.fault = match (decision.delay, decision.abort) {
            (Some(_), Some(_)) => Some("delay+abort"),
            (Some(_), None) => Some("delay"),
            (None, Some(_)) => Some("abort"),
            (None, None) => None,
        };
        if decision.delay.is_some() {
            out.policy_metrics
                .faults
                .with_label_values(&[&logical.name, "delay"])
                .inc();
        }
        (delay, abort) = (decision.delay, decision.abort);
    }
    Ok(Admitted {
        config,
        table,
        logical,
        authority,
        rng,
        delay,
        abort,
    })
}

/// After the fault delay: abort → deadline → route/split → endpoints.
pub fn finish(
    out: &Outbound,
    ctx: &mut RequestCtx,
    req: &Request<Incoming>,
    admitted: Admitted,
) -> Result<Target, Refusal> {
    let Admitted {
        config,
        table,
        logical,
        authority,
        mut rng,
        abort,
        ..
    } = admitted;
    let policy = config.policy_for(&logical.name);
    if let Some(status) = abort {
        out.policy_metrics
            .faults
            .with_label_values(&[&logical.name, "abort"])
            .inc();
        return Err(Refusal::new(
            Some(&logical.name),
            MeshError::FaultInjected(status),
            format!("fault injected for service {:?}", logical.name),
        ));
    }

    // The service's timeout, or sooner if the caller's mesh-deadline or grpc-timeout says so.
    let start = Instant::now();
    let mut deadline = start + policy.timeout;
    if let Some(left) = caller_budget(req.headers(), ctx.sent) {
        deadline = deadline.min(start + left);
    }
    if deadline <= start {
        return Err(Refusal::new(
            Some(&logical.name),
            MeshError::Timeout,
            "the request's deadline has already passed",
        ));
    }
    ctx.deadline = Some(deadline);

    let service = match route::target(
        &policy.routes,
        &policy.split,
        req.uri().path(),
        req.headers(),
        rng.f64(),
    ) {
        None => logical.clone(),
        Some(t) if t == &*logical.name => logical.clone(),
        Some(t) => table.service(t).cloned().ok_or_else(|| {
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
    if service.endpoints.is_empty() {
        return Err(Refusal::new(
            Some(&service.name),
            MeshError::NoEndpoints,
            format!("service {:?} has no routable endpoint", service.name),
        ));
    }
    ctx.service = Some(service.name.clone());
    Ok(Target {
        config,
        logical,
        service,
        authority,
        deadline,
    })
}

fn bad_request(detail: impl Into<String>) -> Refusal {
    Refusal::new(None, MeshError::BadRequest, detail)
}

/// The authority the request is for. An absolute-form URI (proxy style) or the h2 `:authority` wins over
/// `Host`, which is then replaced on every hop (RFC 9112 §3.2.2). Refused: several `Host` fields (RFC 9112
/// §3.2), userinfo in either (RFC 9110 §4.2.4), an h2 `Host` that names another authority than `:authority`
/// (RFC 9113 §8.3.1), and `https://` URIs — meshd does not originate TLS to services, and sending such a
/// request as plain HTTP would silently drop the protection its sender asked for.
pub fn routed_authority<B>(req: &Request<B>) -> Result<Authority, Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_request("more than one Host header").closing());
    }
    let host = match host {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|h| h.parse::<Authority>().ok())
                .ok_or_else(|| bad_request("the Host header is not a valid authority"))?,
        ),
        None => None,
    };
    if let Some(scheme) = req.uri().scheme()
        && *scheme != Scheme::HTTP
    {
        return Err(bad_request(format!(
            "{scheme}:// requests are not proxied: meshd would send them as plain HTTP; send http:// and let the mesh encrypt between hosts"
        )));
    }
    let authority = match (req.uri().authority(), host) {
        (Some(uri), host) => {
            if req.version() == Version::HTTP_2
                && let Some(h) = &host
                && !h.as_str().eq_ignore_ascii_case(uri.as_str())
            {
                return Err(bad_request(format!(
                    "the Host header {:?} names another authority than :authority {:?}",
                    h.as_str(),
                    uri.as_str()
                )));
            }
            uri.clone()
        }
        (None, Some(h)) => h,
        (None, None) => {
            return Err(bad_request(
                "no Host header or absolute URI: cannot tell which service is wanted",
            ));
        }
    };
    if authority.as_str().contains('@') {
        return Err(bad_request(format!(
            "{:?}: an authority with userinfo is not a service name",
            authority.as_str()
        )));
    }
    Ok(authority)
}

/// The host part of an authority without userinfo (`routed_authority` refuses userinfo): what
/// `Authority::host` returns, an IPv6 address with its brackets, at a fraction of its cost.
fn host_of(authority: &Authority) -> &str {
    let s = authority.as_str();
    let end = if s.starts_with('[') {
        s.bytes().position(|b| b == b']').map(|i| i + 1)
    } else {
        s.bytes().position(|b| b == b':')
    };
    &s[..end.unwrap_or(s.len())]
}

/// Host → service name: lowercased, port and configured suffixes removed. Addresses are refused.
fn service_name<'h>(config: &Config, host: &'h str) -> Result<Cow<'h, str>, Refusal> {
    let host = host.trim_end_matches('.');
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // Only something made of digits and dots (IPv4) or holding a colon (IPv6) can be an address: a name is
    // not sent through the address parser (which reads `bench` as the start of an IPv6 address).
    let maybe_address = bare.contains(':') || bare.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if maybe_address && bare.parse::<IpAddr>().is_ok() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn refused(r: Result<Authority, Refusal>) -> String {
        match r {
            Ok(a) => panic!("accepted {a}"),
            Err(r) => {
                assert_eq!(r.error, MeshError::BadRequest);
                r.detail
            }
        }
    }

    #[test]
    fn absolute_form_and_h2_authority_win_over_host() {
        let r = req(Version::HTTP_11, "http://web/x", &["evil"]);
        assert_eq!(routed_authority(&r).unwrap(), "web");
        let r = req(Version::HTTP_11, "/x", &["users.mesh:8080"]);
        assert_eq!(routed_authority(&r).unwrap(), "users.mesh:8080");
        let r = req(Version::HTTP_2, "http://web/x", &[]);
        assert_eq!(routed_authority(&r).unwrap(), "web");
        let r = req(Version::HTTP_2, "http://web/x", &["WEB"]);
        assert_eq!(routed_authority(&r).unwrap(), "web");
    }

    #[test]
    fn host_of_agrees_with_http() {
        for a in [
            "web",
            "web:8080",
            "users.mesh",
            "users.mesh:80",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::7]:1",
            "10.0.0.1:9",
            "a",
        ] {
            let auth: Authority = a.parse().unwrap();
            assert_eq!(host_of(&auth), auth.host(), "{a}");
        }
    }

    #[test]
    fn ambiguous_authorities_are_refused() {
        assert!(
            refused(routed_authority(&req(
                Version::HTTP_11,
                "/",
                &["web", "web"]
            )))
            .contains("more than one")
        );
        assert!(
            refused(routed_authority(&req(Version::HTTP_11, "/", &["evil@web"])))
                .contains("userinfo")
        );
        assert!(
            refused(routed_authority(&req(
                Version::HTTP_11,
                "http://evil@web/",
                &[]
            )))
            .contains("userinfo")
        );
        assert!(
            refused(routed_authority(&req(
                Version::HTTP_2,
                "http://web/",
                &["evil"]
            )))
            .contains("another authority")
        );
        assert!(
            refused(routed_authority(&req(
                Version::HTTP_11,
                "https://web/",
                &["web"]
            )))
            .contains("https://")
        );
        assert!(refused(routed_authority(&req(Version::HTTP_11, "/", &[]))).contains("no Host"));
        assert!(
            refused(routed_authority(&req(Version::HTTP_11, "/", &["a b"])))
                .contains("not a valid")
        );
    }
}
