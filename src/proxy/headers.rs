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

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the old `Proxy-Connection`. `Trailer` is not among them: it
/// announces the trailer fields of this message, end to end (RFC 9110 §6.6.2).
const HOP_BY_HOP: [HeaderName; 8] = [
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

/// Appends the client's address to `X-Forwarded-For`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
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
    push_ip(&mut value, client);
    // `insert` replaces every earlier line; the bytes are handed over without another copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
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

/// Makes sure the request carries a `mesh-request-id`, generating one when absent; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // One hash of the name for both the lookup and the insertion.
    match headers.entry(MESH_REQUEST_ID) {
        http::header::Entry::Occupied(e) => Some(e.get().clone()),
        http::header::Entry::Vacant(e) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut id = [0u8; 32];
            let random = u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..));
            for (i, pair) in id.chunks_exact_mut(2).enumerate() {
                let byte = (random >> (120 - 8 * i)) as u8;
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 0xf)];
            }
            let v = HeaderValue::from_bytes(&id).ok()?;
            Some(e.insert(v).clone())
        }
    }
}

fn unix_ms_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
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
        at.saturating_sub(unix_ms_now()).min(u64::MAX as u128) as u64,
    ))
}

/// Sets `mesh-deadline` to `deadline` as absolute unix milliseconds (toward a local upstream).
pub fn write_deadline(headers: &mut HeaderMap, deadline: Instant) {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_millis();
    headers.insert(
        MESH_DEADLINE,
        HeaderValue::from(unix_ms_now().saturating_add(left) as u64),
    );
}

/// Sets `mesh-deadline` to the time left before `deadline`, as a relative budget (toward a peer agent).
pub fn write_relative_deadline(headers: &mut HeaderMap, deadline: Instant) {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    if let Ok(v) = HeaderValue::from_str(&format!("{left}ms")) {
        headers.insert(MESH_DEADLINE, v);
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
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1");
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        append_forwarded_for(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1, 10.9.9.9, 10.0.0.2");
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
            append_forwarded_for(&mut h, ip);
            assert_eq!(h[X_FORWARDED_FOR], ip.to_string().as_str());
        }
    }

    #[test]
    fn deadlines_round_trip_in_both_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(read_deadline(&h), None);
        write_deadline(&mut h, Instant::now() + Duration::from_secs(5));
        let left = read_deadline(&h).unwrap();
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4));
        write_relative_deadline(&mut h, Instant::now() + Duration::from_secs(5));
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
        ensure_request_id(&mut h);
        let id = h[MESH_REQUEST_ID].clone();
        assert_eq!(id.len(), 32);
        ensure_request_id(&mut h);
        assert_eq!(h[MESH_REQUEST_ID], id);
    }
}
