//! Header rewriting shared by both directions: hop-by-hop stripping, `X-Forwarded-For`, request ids,
//! deadlines (`mesh-deadline`, `grpc-timeout`) and cookie crumbs.

use std::net::IpAddr;

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, header};

pub const MESH_SERVICE: HeaderName = HeaderName::from_static("mesh-service");
pub const MESH_ENDPOINT: HeaderName = HeaderName::from_static("mesh-endpoint");
pub const MESH_ORIG_PROTO: HeaderName = HeaderName::from_static("mesh-orig-proto");
pub const MESH_REQUEST_ID: HeaderName = HeaderName::from_static("mesh-request-id");
pub const MESH_DEADLINE: HeaderName = HeaderName::from_static("mesh-deadline");
pub const MESH_RETRYABLE: HeaderName = HeaderName::from_static("mesh-retryable");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// Constants rather than `&str` keys: a lookup by string parses the name first, on every request.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Which of the request headers meshd reads were in a request as it arrived. Found in one pass over the names
/// ([`Present::scan`]), so the lookups of absent ones — most of them, on most requests — are skipped: each
/// lookup hashes its name, and the mesh's own names are long. It describes the headers as received; code that
/// later adds or removes a header does not update it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Present(u16);

impl Present {
    pub const NONE: Present = Present(0);
    pub const REQUEST_ID: Present = Present(1);
    pub const TRACEPARENT: Present = Present(1 << 1);
    pub const CONTENT_TYPE: Present = Present(1 << 2);
    pub const CONTENT_LENGTH: Present = Present(1 << 3);
    pub const DEADLINE: Present = Present(1 << 4);
    pub const GRPC_TIMEOUT: Present = Present(1 << 5);
    pub const FORWARDED_FOR: Present = Present(1 << 6);
    pub const COOKIE: Present = Present(1 << 7);
    pub const EXPECT: Present = Present(1 << 8);
    /// Any of [`HOP_BY_HOP`] (`Connection`, `Upgrade` and `TE` among them).
    pub const HOP_BY_HOP: Present = Present(1 << 9);
    /// Any other `mesh-` name than `mesh-request-id`: the per-hop controls between agents
    /// (`mesh-retryable`, `mesh-endpoint`, …) and the fault overrides.
    pub const MESH_CONTROL: Present = Present(1 << 10);
    /// `grpc-status` (a response's, in its head: a trailers-only gRPC response).
    pub const GRPC_STATUS: Present = Present(1 << 11);

    /// The headers of `headers` meshd looks at.
    pub fn scan(headers: &HeaderMap) -> Present {
        let mut found = 0;
        for name in headers.keys() {
            let s = name.as_str();
            found |= match s {
                "mesh-request-id" => Self::REQUEST_ID.0,
                "traceparent" => Self::TRACEPARENT.0,
                "content-type" => Self::CONTENT_TYPE.0,
                "content-length" => Self::CONTENT_LENGTH.0,
                "mesh-deadline" => Self::DEADLINE.0 | Self::MESH_CONTROL.0,
                "grpc-timeout" => Self::GRPC_TIMEOUT.0,
                "x-forwarded-for" => Self::FORWARDED_FOR.0,
                "cookie" => Self::COOKIE.0,
                "expect" => Self::EXPECT.0,
                "grpc-status" => Self::GRPC_STATUS.0,
                // HOP_BY_HOP's names (a test holds the two lists together).
                "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "transfer-encoding"
                | "upgrade" => Self::HOP_BY_HOP.0,
                _ if s.starts_with("mesh-") => Self::MESH_CONTROL.0,
                _ => 0,
            };
        }
        Present(found)
    }

    /// Whether any of `names` was present.
    pub fn any(self, names: Present) -> bool {
        self.0 & names.0 != 0
    }
}

impl std::ops::BitOr for Present {
    type Output = Present;
    fn bitor(self, other: Present) -> Present {
        Present(self.0 | other.0)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the old `Proxy-Connection`. `Trailer` is not among them: it
/// announces the trailer fields of this message, end to end (RFC 9110 §6.6.2).
// A `static`, not a `const`: a `const` array of names is built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including every header the `Connection` header names.
/// `TE: trailers` survives on requests: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (cheap comparisons for standard headers)
    // instead of a hashed removal per name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let keep_te = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    // Remove only what is there: the fixed hop-by-hop names, and every header `Connection` names (except the
    // end-to-end headers meshd itself relies on).
    let mut doomed: Vec<HeaderName> = Vec::with_capacity(4);
    {
        let connection: Vec<&str> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let named = |k: &HeaderName| {
            connection
                .iter()
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(k.as_str()))
        };
        for k in headers.keys() {
            if HOP_BY_HOP.contains(k) || (*k != MESH_SERVICE && *k != MESH_REQUEST_ID && named(k)) {
                doomed.push(k.clone());
            }
        }
    }
    for name in doomed {
        headers.remove(name);
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes every header in `names` that is present, with one pass over the map in the common case where none is.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    if headers.keys().any(|k| names.contains(k)) {
        for n in names {
            headers.remove(n);
        }
    }
}

/// Appends the client's address (`client`, from [`address_value`]) to `X-Forwarded-For`. `had`: the request
/// arrived with an `X-Forwarded-For` ([`Present::FORWARDED_FOR`]); without one the address is the whole value,
/// and a connection's requests share the one the connection made.
pub fn append_forwarded_for(headers: &mut HeaderMap, had: bool, client: &HeaderValue) {
    if !had {
        headers.insert(X_FORWARDED_FOR, client.clone());
        return;
    }
    // Several X-Forwarded-For lines form one list (RFC 9110 §5.3).
    let mut value = Vec::with_capacity(48);
    for prev in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        if !prev.trim().is_empty() {
            value.extend_from_slice(prev.trim().as_bytes());
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(client.as_bytes());
    // `insert` replaces every earlier line; the bytes are handed over without another copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Sets `Host` to `authority`; a request with one `Host` that already says so keeps it (no copy).
pub fn set_host(headers: &mut HeaderMap, authority: &http::uri::Authority) {
    let mut hosts = headers.get_all(header::HOST).iter();
    if let (Some(v), None) = (hosts.next(), hosts.next())
        && v.as_bytes() == authority.as_str().as_bytes()
    {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        headers.insert(header::HOST, v);
    }
}

/// `ip` as a header value (what `X-Forwarded-For` gets for a client at `ip`).
pub fn address_value(ip: IpAddr) -> HeaderValue {
    let mut text = Vec::with_capacity(16);
    push_ip(&mut text, ip);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .unwrap_or_else(|_| unreachable!("digits, dots, colons and hex digits"))
}

/// Writes `ip` as text: IPv4 digit by digit (the formatting machinery costs several times more, on every
/// request), IPv6 through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Makes sure the request carries a `mesh-request-id`, generating one when absent; returns it. `had`: the
/// request arrived with one ([`Present::REQUEST_ID`]).
pub fn ensure_request_id(headers: &mut HeaderMap, had: bool) -> Option<HeaderValue> {
    if had && let Some(v) = headers.get(MESH_REQUEST_ID) {
        return Some(v.clone());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let random = u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..));
    for (i, pair) in id.chunks_exact_mut(2).enumerate() {
        let byte = (random >> (120 - 8 * i)) as u8;
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    let v = HeaderValue::from_bytes(&id).ok()?;
    headers.insert(MESH_REQUEST_ID, v.clone());
    Some(v)
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// Whole milliseconds in `d` (`Duration::as_millis` goes through a 128-bit division).
fn millis(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(d.subsec_millis()))
}

/// Time left before the request's `mesh-deadline`: `None` when absent or unreadable, zero when it has passed.
///
/// Two forms are read: absolute unix milliseconds (`1767225600123`, what apps and upstreams on one host use)
/// and a relative budget in milliseconds (`1500ms`, what agents send each other, so clock skew between hosts
/// can neither stretch nor shrink it).
pub fn read_deadline(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&MESH_DEADLINE)?.to_str().ok()?.trim();
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.trim().parse::<u64>().ok().map(Duration::from_millis);
    }
    let at: u128 = v.parse().ok()?;
    Some(Duration::from_millis(
        at.saturating_sub(u128::from(unix_ms_now()))
            .min(u128::from(u64::MAX)) as u64,
    ))
}

/// Sets `mesh-deadline` to `deadline` as absolute unix milliseconds (toward a local upstream); `now`: a
/// reading of the clock the caller has just taken.
pub fn write_deadline(headers: &mut HeaderMap, deadline: Instant, now: Instant) {
    let left = millis(deadline.saturating_duration_since(now));
    headers.insert(
        MESH_DEADLINE,
        HeaderValue::from(unix_ms_now().saturating_add(left)),
    );
}

/// Sets `mesh-deadline` to the time left before `deadline` (from `now`), as a relative budget (toward a peer
/// agent).
pub fn write_relative_deadline(headers: &mut HeaderMap, deadline: Instant, now: Instant) {
    let left = deadline.saturating_duration_since(now).as_millis() as u64;
    if let Ok(v) = HeaderValue::from_str(&format!("{left}ms")) {
        headers.insert(MESH_DEADLINE, v);
    }
}

/// The time the caller allows: the shorter of its `mesh-deadline` and `grpc-timeout`, each read only when the
/// request arrived with it (`sent`); `None` when it gave neither (or neither was readable).
pub fn caller_budget(headers: &HeaderMap, sent: Present) -> Option<Duration> {
    let deadline = sent
        .any(Present::DEADLINE)
        .then(|| read_deadline(headers))
        .flatten();
    let grpc = sent
        .any(Present::GRPC_TIMEOUT)
        .then(|| read_grpc_timeout(headers))
        .flatten();
    match (deadline, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `grpc-timeout` of a request (gRPC over HTTP/2: up to 8 digits and a unit, H M S m u n).
pub fn read_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Sets `grpc-timeout` to `left`, in the finest unit that fits in 8 digits.
pub fn write_grpc_timeout(headers: &mut HeaderMap, left: Duration) {
    const MAX: u128 = 99_999_999;
    let value = if left.as_millis() <= MAX {
        format!("{}m", left.as_millis())
    } else {
        format!("{}S", left.as_secs().min(MAX as u64))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(GRPC_TIMEOUT, v);
    }
}

/// Joins HTTP/2 cookie crumbs (several `cookie` fields, RFC 9113 §8.2.3) into the single field HTTP/1.1
/// expects (RFC 6265 §5.4).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::TRAILER], "x-checksum", "Trailer is end to end");
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = |s: &str| address_value(s.parse().unwrap());
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, false, &ip("10.0.0.1"));
        append_forwarded_for(&mut h, true, &ip("::1"));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1");
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        append_forwarded_for(&mut h, true, &ip("10.0.0.2"));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1, 10.9.9.9, 10.0.0.2");
    }

    #[test]
    fn scan_finds_what_the_lookups_would() {
        let mut h = HeaderMap::new();
        assert_eq!(Present::scan(&h), Present::NONE);
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert("user-agent", HeaderValue::from_static("curl"));
        h.insert("x-mesh-thing", HeaderValue::from_static("1"));
        assert_eq!(Present::scan(&h), Present::NONE);
        let cases: [(&str, Present); 15] = [
            ("mesh-request-id", Present::REQUEST_ID),
            ("traceparent", Present::TRACEPARENT),
            ("content-type", Present::CONTENT_TYPE),
            ("content-length", Present::CONTENT_LENGTH),
            ("mesh-deadline", Present::DEADLINE | Present::MESH_CONTROL),
            ("grpc-timeout", Present::GRPC_TIMEOUT),
            ("x-forwarded-for", Present::FORWARDED_FOR),
            ("cookie", Present::COOKIE),
            ("expect", Present::EXPECT),
            ("grpc-status", Present::GRPC_STATUS),
            ("connection", Present::HOP_BY_HOP),
            ("proxy-connection", Present::HOP_BY_HOP),
            ("te", Present::HOP_BY_HOP),
            ("mesh-retryable", Present::MESH_CONTROL),
            ("mesh-fault-abort", Present::MESH_CONTROL),
        ];
        for (name, want) in cases {
            let mut one = h.clone();
            one.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
            assert_eq!(Present::scan(&one), want, "{name}");
        }
        for name in &HOP_BY_HOP {
            let mut one = h.clone();
            one.insert(name.clone(), HeaderValue::from_static("1"));
            assert!(Present::scan(&one).any(Present::HOP_BY_HOP), "{name}");
        }
    }

    #[test]
    fn forwarded_for_writes_every_address_as_display_does() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::7",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, false, &address_value(ip));
            assert_eq!(h[X_FORWARDED_FOR], ip.to_string().as_str());
        }
    }

    #[test]
    fn deadlines_round_trip_in_both_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(read_deadline(&h), None);
        write_deadline(
            &mut h,
            Instant::now() + Duration::from_secs(5),
            Instant::now(),
        );
        let left = read_deadline(&h).unwrap();
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4));
        write_relative_deadline(
            &mut h,
            Instant::now() + Duration::from_secs(5),
            Instant::now(),
        );
        let v = h[MESH_DEADLINE].to_str().unwrap().to_string();
        assert!(v.ends_with("ms") && v.len() <= 6, "{v}");
        let left = read_deadline(&h).unwrap();
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4));
        h.insert(MESH_DEADLINE, HeaderValue::from_static("1000"));
        assert_eq!(read_deadline(&h), Some(Duration::ZERO));
        h.insert(MESH_DEADLINE, HeaderValue::from_static("0ms"));
        assert_eq!(read_deadline(&h), Some(Duration::ZERO));
        for bad in ["soon", "-5ms", "ms", "12s"] {
            h.insert(MESH_DEADLINE, HeaderValue::from_static(bad));
            assert_eq!(read_deadline(&h), None, "{bad}");
        }
    }

    #[test]
    fn the_caller_budget_is_the_shorter_of_what_it_sent() {
        let mut h = HeaderMap::new();
        assert_eq!(caller_budget(&h, Present::scan(&h)), None);
        h.insert(MESH_DEADLINE, HeaderValue::from_static("900ms"));
        assert_eq!(
            caller_budget(&h, Present::scan(&h)),
            Some(Duration::from_millis(900))
        );
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        assert_eq!(
            caller_budget(&h, Present::scan(&h)),
            Some(Duration::from_millis(300))
        );
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("2S"));
        assert_eq!(
            caller_budget(&h, Present::scan(&h)),
            Some(Duration::from_millis(900))
        );
        // What the scan did not see is not read.
        assert_eq!(caller_budget(&h, Present::NONE), None);
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ] {
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(v));
            assert_eq!(read_grpc_timeout(&h), Some(d), "{v}");
        }
        for bad in ["", "S", "100", "123456789m", "1x", "-1S", "1.5S"] {
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(bad));
            assert_eq!(read_grpc_timeout(&h), None, "{bad:?}");
        }
        write_grpc_timeout(&mut h, Duration::from_millis(1234));
        assert_eq!(h[GRPC_TIMEOUT], "1234m");
        write_grpc_timeout(&mut h, Duration::from_secs(200_000));
        assert_eq!(h[GRPC_TIMEOUT], "200000S");
    }

    #[test]
    fn host_is_kept_only_when_it_is_the_one_host_and_says_the_same() {
        let web: http::uri::Authority = "web:8080".parse().unwrap();
        let mut h = HeaderMap::new();
        set_host(&mut h, &web);
        assert_eq!(h[header::HOST], "web:8080");
        h.insert(header::HOST, HeaderValue::from_static("other"));
        set_host(&mut h, &web);
        assert_eq!(h[header::HOST], "web:8080");
        h.append(header::HOST, HeaderValue::from_static("web:8080"));
        set_host(&mut h, &web);
        assert_eq!(h.get_all(header::HOST).iter().count(), 1, "{h:?}");
        assert_eq!(h[header::HOST], "web:8080");
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
    }

    #[test]
    fn request_id_generated_once() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h, false).unwrap();
        assert_eq!(h[MESH_REQUEST_ID], id);
        assert_eq!(id.len(), 32);
        assert_eq!(ensure_request_id(&mut h, true), Some(id.clone()));
        assert_eq!(h[MESH_REQUEST_ID], id);
    }
}
