//! Header rewriting shared by both directions: hop-by-hop stripping, `X-Forwarded-For`, request ids.

use std::net::IpAddr;

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

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the old `Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
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
    use std::fmt::Write;
    // Several X-Forwarded-For lines form one list (RFC 9110 §5.3).
    let mut value = String::with_capacity(48);
    for prev in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        if !prev.trim().is_empty() {
            value.push_str(prev.trim());
            value.push_str(", ");
        }
    }
    let _ = write!(value, "{client}");
    // `insert` replaces every earlier line; the bytes are handed over without another copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Makes sure the request carries a `mesh-request-id`, generating one when absent; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> Option<HeaderValue> {
    if let Some(v) = headers.get(&MESH_REQUEST_ID) {
        return Some(v.clone());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, byte) in id.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        *byte = HEX[((word >> ((15 - (i % 16)) * 4)) & 0xf) as usize];
    }
    let v = HeaderValue::from_bytes(&id).ok()?;
    headers.insert(MESH_REQUEST_ID, v.clone());
    Some(v)
}

fn unix_ms_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Time left before the request's `mesh-deadline` (absolute unix milliseconds): `None` when absent or
/// unreadable, zero when it has passed.
pub fn read_deadline(headers: &HeaderMap) -> Option<std::time::Duration> {
    let at: u128 = headers
        .get(&MESH_DEADLINE)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(
        at.saturating_sub(unix_ms_now()).min(u64::MAX as u128) as u64,
    ))
}

/// Sets `mesh-deadline` to `deadline`, so every later hop is bounded by the time left.
pub fn write_deadline(headers: &mut HeaderMap, deadline: std::time::Instant) {
    let left = deadline
        .saturating_duration_since(std::time::Instant::now())
        .as_millis();
    headers.insert(
        MESH_DEADLINE,
        HeaderValue::from(unix_ms_now().saturating_add(left) as u64),
    );
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
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h[header::TE], "trailers");
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
    fn deadlines_round_trip() {
        let mut h = HeaderMap::new();
        assert_eq!(read_deadline(&h), None);
        write_deadline(
            &mut h,
            std::time::Instant::now() + std::time::Duration::from_secs(5),
        );
        let left = read_deadline(&h).unwrap();
        assert!(
            left <= std::time::Duration::from_secs(5) && left > std::time::Duration::from_secs(4)
        );
        h.insert(MESH_DEADLINE, HeaderValue::from_static("1000"));
        assert_eq!(read_deadline(&h), Some(std::time::Duration::ZERO));
        h.insert(MESH_DEADLINE, HeaderValue::from_static("soon"));
        assert_eq!(read_deadline(&h), None);
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
