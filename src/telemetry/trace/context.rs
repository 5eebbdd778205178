//! Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (multi-header `X-B3-*` and single `b3`).
//!
//! [`extract`] reads the context a request arrived with, [`child`] makes this hop's span ids, [`inject`] writes
//! the outgoing headers in the format received, and [`decide`] is the sampling decision. Everything here is pure
//! (no I/O, no clock) apart from the random ids. Header values come from the network: every parser returns
//! `None` on anything malformed — the caller then starts a new root — and never panics.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`: `{version}-{trace-id}-{parent-id}-{flags}`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`: vendor entries, propagated as received.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Single-header B3.
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const X_B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const X_B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const X_B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A longer `tracestate` than this is dropped rather than propagated (the W3C spec allows 32 entries; 512 bytes
/// is what it asks vendors to propagate at least).
pub const MAX_TRACESTATE_LEN: usize = 512;

/// Every header this module reads or writes; [`inject`] removes them all before writing, so a request never
/// carries two contexts that contradict each other.
static ALL_HEADERS: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    X_B3_TRACE_ID,
    X_B3_SPAN_ID,
    X_B3_PARENT_SPAN_ID,
    X_B3_SAMPLED,
    X_B3_FLAGS,
];

/// The propagation format of a context, so the next hop gets the format the app sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `traceparent` (+ `tracestate`). Also the format of new roots.
    W3c,
    /// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-ParentSpanId`, `X-B3-Sampled`.
    B3Multi,
    /// `b3: {traceid}-{spanid}-{sampled}-{parentspanid}`.
    B3Single,
}

/// The context a request arrived with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The sender's span id: the parent of the span this hop records.
    pub span_id: [u8; 8],
    /// The sender's sampling decision, if it made one.
    pub sampled: Option<bool>,
    pub format: Format,
    /// W3C `tracestate`, as received (only with [`Format::W3c`], at most [`MAX_TRACESTATE_LEN`] bytes).
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A B3 sampling decision without ids (`b3: 0|1|d`, or `X-B3-Sampled`/`X-B3-Flags` alone): both ids are all
    /// zero — never valid on the wire — and [`child`] starts a new trace that keeps the decision and format.
    pub fn is_sampling_only(&self) -> bool {
        self.trace_id == [0; 16]
    }
}

/// The ids of the span this hop records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None` for a root span.
    pub parent_id: Option<[u8; 8]>,
}

impl SpanIds {
    /// A new trace: random trace and span ids, no parent.
    pub fn root() -> SpanIds {
        SpanIds {
            trace_id: random_trace_id(),
            span_id: random_span_id(),
            parent_id: None,
        }
    }

    /// A child of this span in the same trace (e.g. a client span per attempt under the server span).
    pub fn child(&self) -> SpanIds {
        SpanIds {
            trace_id: self.trace_id,
            span_id: random_span_id(),
            parent_id: Some(self.span_id),
        }
    }
}

/// This hop's span: a child of the incoming context, or a new root when there is none (or it carries only a
/// sampling decision).
pub fn child(incoming: Option<&TraceContext>) -> SpanIds {
    match incoming {
        Some(ctx) if !ctx.is_sampling_only() => SpanIds {
            trace_id: ctx.trace_id,
            span_id: random_span_id(),
            parent_id: Some(ctx.span_id),
        },
        _ => SpanIds::root(),
    }
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// Whether this hop's spans are recorded. Parent-based: a sender's decision is honoured; `force`
/// (`mesh-sample: 1`) samples regardless; otherwise — new roots, and contexts without a decision —
/// `sample_rate` (0.0 ..= 1.0) decides.
pub fn decide(incoming: Option<&TraceContext>, force: bool, sample_rate: f64) -> bool {
    if force {
        return true;
    }
    if let Some(sampled) = incoming.and_then(|ctx| ctx.sampled) {
        return sampled;
    }
    if sample_rate >= 1.0 {
        true
    } else if sample_rate > 0.0 {
        // NaN is neither ≥ 1 nor > 0: never sampled.
        fastrand::f64() < sample_rate
    } else {
        false
    }
}

/// The trace context of a request: W3C, then B3 multi, then B3 single — the first valid one wins. `None` when
/// there is none or every one present is malformed.
pub fn extract(headers: &HeaderMap) -> Option<TraceContext> {
    extract_w3c(headers)
        .or_else(|| extract_b3_multi(headers))
        .or_else(|| extract_b3_single(headers))
}

/// The only value of a header, trimmed; `None` if absent, repeated, or not visible ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok().map(|v| v.trim_matches([' ', '\t']))
}

fn extract_w3c(headers: &HeaderMap) -> Option<TraceContext> {
    let (trace_id, span_id, sampled) = parse_traceparent(single(headers, &TRACEPARENT)?)?;
    Some(TraceContext {
        trace_id,
        span_id,
        sampled: Some(sampled),
        format: Format::W3c,
        tracestate: tracestate(headers),
    })
}

/// `00-{32 hex}-{16 hex}-{2 hex}`, lowercase. A future version (01..fe) is read by its first 55 characters, which
/// must be followed by the end or a `-`.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let b = value.as_bytes();
    if b.len() < 55 {
        return None;
    }
    let version = hex_u8(&b[0..2])?;
    match version {
        0x00 if b.len() != 55 => return None,
        0xff => return None,
        _ if b.len() > 55 && b[55] != b'-' => return None,
        _ => {}
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id: [u8; 16] = hex_bytes(&b[3..35])?;
    let span_id: [u8; 8] = hex_bytes(&b[36..52])?;
    let flags = hex_u8(&b[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 0x01 == 0x01))
}

/// All `tracestate` values joined by commas (the spec allows splitting it across headers), kept only when
/// visible ASCII and at most [`MAX_TRACESTATE_LEN`] bytes.
fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut out = String::new();
    for value in headers.get_all(&TRACESTATE) {
        let value = value.to_str().ok()?.trim_matches([' ', '\t']);
        if value.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(value);
        if out.len() > MAX_TRACESTATE_LEN {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

fn extract_b3_multi(headers: &HeaderMap) -> Option<TraceContext> {
    let trace_id = headers.get(&X_B3_TRACE_ID);
    let span_id = headers.get(&X_B3_SPAN_ID);
    let sampled = headers.get(&X_B3_SAMPLED);
    let flags = headers.get(&X_B3_FLAGS);
    if trace_id.is_none() && span_id.is_none() && sampled.is_none() && flags.is_none() {
        return None;
    }
    let debug = match flags {
        None => false,
        Some(_) => single(headers, &X_B3_FLAGS)? == "1",
    };
    let sampled = match sampled {
        None => None,
        Some(_) => Some(match single(headers, &X_B3_SAMPLED)? {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return None,
        }),
    };
    let sampled = if debug { Some(true) } else { sampled };
    let (trace_id, span_id) = match (trace_id, span_id) {
        (None, None) => {
            // A sampling decision alone.
            sampled?;
            ([0; 16], [0; 8])
        }
        (Some(_), Some(_)) => {
            let trace_id = b3_trace_id(single(headers, &X_B3_TRACE_ID)?)?;
            let span_id = b3_span_id(single(headers, &X_B3_SPAN_ID)?)?;
            if let Some(parent) = headers.get(&X_B3_PARENT_SPAN_ID) {
                b3_span_id(parent.to_str().ok()?.trim())?;
            }
            (trace_id, span_id)
        }
        _ => return None,
    };
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Multi,
        tracestate: None,
    })
}

/// `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or a decision alone: `0`, `1`, `d`.
fn extract_b3_single(headers: &HeaderMap) -> Option<TraceContext> {
    let value = single(headers, &B3)?;
    let sampling_only = |sampled| TraceContext {
        trace_id: [0; 16],
        span_id: [0; 8],
        sampled: Some(sampled),
        format: Format::B3Single,
        tracestate: None,
    };
    match value {
        "0" => return Some(sampling_only(false)),
        "1" | "d" => return Some(sampling_only(true)),
        _ => {}
    }
    let mut parts = value.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1") | Some("d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
        tracestate: None,
    })
}

/// 32 or 16 lower-hex characters; a 64-bit id is left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let id = match s.len() {
        32 => hex_bytes::<16>(s.as_bytes())?,
        16 => {
            let low: [u8; 8] = hex_bytes(s.as_bytes())?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_span_id(s: &str) -> Option<[u8; 8]> {
    let id: [u8; 8] = hex_bytes(s.as_bytes())?;
    (id != [0; 8]).then_some(id)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(b: &[u8]) -> Option<u8> {
    match b {
        [hi, lo] => Some((hex_digit(*hi)? << 4) | hex_digit(*lo)?),
        _ => None,
    }
}

/// Exactly `2 * N` lowercase hex characters.
fn hex_bytes<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = hex_u8(pair)?;
    }
    Some(out)
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        s.push(char::from(HEX_DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Appends the lowercase hex of `bytes` (at most 16) to `out`.
#[inline]
pub fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut buf = [0u8; 32];
    let len = 2 * bytes.len().min(16);
    hex_to(&mut buf[..len], bytes);
    out.extend_from_slice(&buf[..len]);
}

/// The two hex digits of every byte: one lookup per byte on the data path instead of two.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [HEX_DIGITS[i >> 4], HEX_DIGITS[i & 0x0f]];
        i += 1;
    }
    table
};

/// Writes the lowercase hex of `bytes` into `out`, which is twice as long.
#[inline]
fn hex_to(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// Writes the context of the outgoing request: `span` (this hop's client span) in `format` and in each of
/// `also`, after removing every trace header of every format so stale ones cannot contradict it. `tracestate`
/// goes out with W3C only (it is dropped when too long or not a valid header value).
///
/// On the data path of every traced request: the values are built on the stack, and the removal is skipped
/// when the request carries no trace header at all (one pass over the names instead of eight lookups).
pub fn inject(
    headers: &mut HeaderMap,
    format: Format,
    span: &SpanIds,
    sampled: bool,
    tracestate: Option<&str>,
    also: &[Format],
) {
    if headers.keys().any(is_trace_header) {
        for name in &ALL_HEADERS {
            headers.remove(name);
        }
    }
    inject_clean(headers, format, span, sampled, tracestate, also);
}

/// [`inject`] into headers known to hold no trace header (the request arrived without any): skips the search.
pub fn inject_clean(
    headers: &mut HeaderMap,
    format: Format,
    span: &SpanIds,
    sampled: bool,
    tracestate: Option<&str>,
    also: &[Format],
) {
    let flag = if sampled { b'1' } else { b'0' };
    for fmt in std::iter::once(format).chain(also.iter().copied()) {
        match fmt {
            Format::W3c => {
                // 00-{32 hex}-{16 hex}-0{flag}
                let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
                hex_to(&mut v[3..35], &span.trace_id);
                hex_to(&mut v[36..52], &span.span_id);
                v[54] = flag;
                insert(headers, TRACEPARENT, &v);
                if let Some(state) = tracestate.filter(|s| s.len() <= MAX_TRACESTATE_LEN) {
                    insert(headers, TRACESTATE, state.as_bytes());
                }
            }
            Format::B3Multi => {
                let mut trace_id = [0u8; 32];
                hex_to(&mut trace_id, &span.trace_id);
                insert(headers, X_B3_TRACE_ID, &trace_id);
                let mut id = [0u8; 16];
                hex_to(&mut id, &span.span_id);
                insert(headers, X_B3_SPAN_ID, &id);
                if let Some(parent) = span.parent_id {
                    hex_to(&mut id, &parent);
                    insert(headers, X_B3_PARENT_SPAN_ID, &id);
                }
                insert(headers, X_B3_SAMPLED, &[flag]);
            }
            Format::B3Single => {
                // {32 hex}-{16 hex}-{flag}[-{16 hex}]
                let mut v = [b'-'; 68];
                hex_to(&mut v[..32], &span.trace_id);
                hex_to(&mut v[33..49], &span.span_id);
                v[50] = flag;
                let len = match span.parent_id {
                    Some(parent) => {
                        hex_to(&mut v[52..68], &parent);
                        68
                    }
                    None => 51,
                };
                insert(headers, B3, &v[..len]);
            }
        }
    }
}

/// Whether `name` is one of the headers this module reads or writes (or another `x-b3-*`).
pub fn is_trace_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == "traceparent" || n == "tracestate" || n == "b3" || n.starts_with("x-b3-")
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE: [u8; 16] = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    const SPAN: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

    #[test]
    fn w3c_traceparent_and_tracestate() {
        let ctx = extract(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(ctx.trace_id, TRACE);
        assert_eq!(ctx.span_id, SPAN);
        assert_eq!(ctx.sampled, Some(true));
        assert_eq!(ctx.format, Format::W3c);
        assert_eq!(
            ctx.tracestate.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let ctx = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]))
        .unwrap();
        assert_eq!(ctx.sampled, Some(false));
        assert_eq!(ctx.tracestate, None);
    }

    #[test]
    fn w3c_rejects_malformed() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // misplaced dash
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", // v00 too long
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  // too short
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // future, no dash after 55
            "",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
        // Two traceparent headers are not a context.
        assert_eq!(
            extract(&headers(&[("traceparent", TP), ("traceparent", TP)])),
            None
        );
    }

    #[test]
    fn w3c_future_version_reads_the_first_55_characters() {
        for v in [
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        ] {
            let ctx = extract(&headers(&[("traceparent", v)])).unwrap();
            assert_eq!(
                (ctx.trace_id, ctx.span_id, ctx.sampled),
                (TRACE, SPAN, Some(true))
            );
        }
    }

    #[test]
    fn tracestate_too_long_is_dropped_not_the_context() {
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE_LEN));
        let ctx = extract(&headers(&[("traceparent", TP), ("tracestate", &long)])).unwrap();
        assert_eq!(ctx.tracestate, None);
        assert_eq!(ctx.trace_id, TRACE);
    }

    #[test]
    fn b3_multi() {
        let ctx = extract(&headers(&[
            ("X-B3-TraceId", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
            ("X-B3-ParentSpanId", "1111111111111111"),
            ("X-B3-Sampled", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (ctx.trace_id, ctx.span_id, ctx.sampled),
            (TRACE, SPAN, Some(true))
        );
        assert_eq!(ctx.format, Format::B3Multi);
        // 64-bit trace id, left-padded; "false"; flags=1 (debug) wins.
        let ctx = extract(&headers(&[
            ("X-B3-TraceId", "a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
            ("X-B3-Sampled", "false"),
        ]))
        .unwrap();
        assert_eq!(ctx.trace_id[..8], [0; 8]);
        assert_eq!(ctx.trace_id[8..], TRACE[8..]);
        assert_eq!(ctx.sampled, Some(false));
        let ctx = extract(&headers(&[
            ("X-B3-TraceId", "a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
            ("X-B3-Flags", "1"),
        ]))
        .unwrap();
        assert_eq!(ctx.sampled, Some(true));
        let ctx = extract(&headers(&[
            ("X-B3-TraceId", "a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(ctx.sampled, None);
        // A decision alone.
        let ctx = extract(&headers(&[("X-B3-Sampled", "0")])).unwrap();
        assert!(ctx.is_sampling_only());
        assert_eq!(ctx.sampled, Some(false));
    }

    #[test]
    fn b3_multi_rejects_malformed() {
        for pairs in [
            &[
                ("X-B3-TraceId", "a3ce929d0e0e473"),
                ("X-B3-SpanId", "00f067aa0ba902b7"),
            ][..],
            &[
                ("X-B3-TraceId", "A3CE929D0E0E4736"),
                ("X-B3-SpanId", "00f067aa0ba902b7"),
            ],
            &[
                ("X-B3-TraceId", "0000000000000000"),
                ("X-B3-SpanId", "00f067aa0ba902b7"),
            ],
            &[
                ("X-B3-TraceId", "a3ce929d0e0e4736"),
                ("X-B3-SpanId", "0000000000000000"),
            ],
            &[("X-B3-TraceId", "a3ce929d0e0e4736")],
            &[("X-B3-SpanId", "00f067aa0ba902b7")],
            &[
                ("X-B3-TraceId", "a3ce929d0e0e4736"),
                ("X-B3-SpanId", "00f067aa0ba902b7"),
                ("X-B3-Sampled", "yes"),
            ],
            &[
                ("X-B3-TraceId", "a3ce929d0e0e4736"),
                ("X-B3-SpanId", "00f067aa0ba902b7"),
                ("X-B3-ParentSpanId", "zz"),
            ],
        ] {
            assert_eq!(extract(&headers(pairs)), None, "{pairs:?}");
        }
    }

    #[test]
    fn b3_single() {
        let ctx = extract(&headers(&[(
            "b3",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-1111111111111111",
        )]))
        .unwrap();
        assert_eq!(
            (ctx.trace_id, ctx.span_id, ctx.sampled),
            (TRACE, SPAN, Some(true))
        );
        assert_eq!(ctx.format, Format::B3Single);
        let ctx = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")])).unwrap();
        assert_eq!(ctx.sampled, None);
        assert_eq!(ctx.trace_id[8..], TRACE[8..]);
        let ctx = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-d")])).unwrap();
        assert_eq!(ctx.sampled, Some(true));
        for (v, sampled) in [("0", false), ("1", true), ("d", true)] {
            let ctx = extract(&headers(&[("b3", v)])).unwrap();
            assert!(ctx.is_sampling_only());
            assert_eq!(ctx.sampled, Some(sampled));
            // A new root keeps the decision.
            assert_eq!(child(Some(&ctx)).parent_id, None);
            assert_eq!(decide(Some(&ctx), false, 0.5), sampled);
        }
        for bad in [
            "a3ce929d0e0e4736",
            "a3ce929d0e0e4736-00f067aa0ba902b7-2",
            "a3ce929d0e0e4736-00f067aa0ba902b7-1-",
            "a3ce929d0e0e4736-00f067aa0ba902b7-1-1111111111111111-x",
            "a3ce929d0e0e4736--1",
            "true",
            "",
        ] {
            assert_eq!(extract(&headers(&[("b3", bad)])), None, "{bad}");
        }
    }

    #[test]
    fn order_w3c_then_b3_multi_then_b3_single_first_valid_wins() {
        let b3_single = ("b3", "1111111111111111-2222222222222222-1");
        let b3_multi = [
            ("X-B3-TraceId", "3333333333333333"),
            ("X-B3-SpanId", "4444444444444444"),
        ];
        let all = headers(&[("traceparent", TP), b3_multi[0], b3_multi[1], b3_single]);
        assert_eq!(extract(&all).unwrap().format, Format::W3c);
        let bad_w3c = headers(&[
            ("traceparent", "garbage"),
            b3_multi[0],
            b3_multi[1],
            b3_single,
        ]);
        assert_eq!(extract(&bad_w3c).unwrap().format, Format::B3Multi);
        let only_single = headers(&[("traceparent", "garbage"), ("X-B3-SpanId", "zz"), b3_single]);
        assert_eq!(extract(&only_single).unwrap().format, Format::B3Single);
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    #[test]
    fn child_keeps_the_trace_and_points_at_the_sender() {
        let ctx = extract(&headers(&[("traceparent", TP)])).unwrap();
        let ids = child(Some(&ctx));
        assert_eq!(ids.trace_id, TRACE);
        assert_eq!(ids.parent_id, Some(SPAN));
        assert_ne!(ids.span_id, SPAN);
        assert_ne!(ids.span_id, [0; 8]);
        let attempt = ids.child();
        assert_eq!(
            (attempt.trace_id, attempt.parent_id),
            (TRACE, Some(ids.span_id))
        );
        let root = child(None);
        assert_eq!(root.parent_id, None);
        assert_ne!(root.trace_id, [0; 16]);
    }

    #[test]
    fn sampling_is_parent_based_forced_or_by_rate() {
        let mut ctx = extract(&headers(&[("traceparent", TP)])).unwrap();
        assert!(decide(Some(&ctx), false, 0.0));
        ctx.sampled = Some(false);
        assert!(!decide(Some(&ctx), false, 1.0));
        assert!(decide(Some(&ctx), true, 0.0), "mesh-sample: 1 forces");
        ctx.sampled = None;
        assert!(decide(Some(&ctx), false, 1.0));
        assert!(!decide(Some(&ctx), false, 0.0));
        assert!(decide(None, false, 1.0));
        assert!(!decide(None, false, 0.0));
        assert!(!decide(None, false, f64::NAN));
        let n = (0..10_000).filter(|_| decide(None, false, 0.25)).count();
        assert!((2_000..3_000).contains(&n), "{n}");
    }

    #[test]
    fn inject_replaces_stale_headers_of_other_formats() {
        let mut h = headers(&[
            ("traceparent", TP),
            ("tracestate", "a=b"),
            ("b3", "1111111111111111-2222222222222222"),
            ("X-B3-TraceId", "3333333333333333"),
            ("X-B3-SpanId", "4444444444444444"),
            ("X-B3-Flags", "1"),
            ("content-type", "text/plain"),
        ]);
        let ids = SpanIds {
            trace_id: TRACE,
            span_id: [7; 8],
            parent_id: Some(SPAN),
        };
        inject(&mut h, Format::B3Multi, &ids, false, Some("a=b"), &[]);
        assert_eq!(h.len(), 5, "{h:?}");
        assert_eq!(h["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h["x-b3-spanid"], "0707070707070707");
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "0");
        assert_eq!(h["content-type"], "text/plain");

        inject(
            &mut h,
            Format::W3c,
            &ids,
            true,
            Some("a=b"),
            &[Format::B3Single],
        );
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01"
        );
        assert_eq!(h["tracestate"], "a=b");
        assert_eq!(
            h["b3"],
            "4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-1-00f067aa0ba902b7"
        );
        assert!(h.get("x-b3-traceid").is_none());
        assert_eq!(h.len(), 4);
    }

    fn any_format() -> impl Strategy<Value = Format> {
        prop_oneof![
            Just(Format::W3c),
            Just(Format::B3Multi),
            Just(Format::B3Single)
        ]
    }

    proptest! {
        #[test]
        fn extract_never_panics(
            pairs in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("traceparent"), Just("tracestate"), Just("b3"), Just("x-b3-traceid"),
                        Just("x-b3-spanid"), Just("x-b3-parentspanid"), Just("x-b3-sampled"),
                        Just("x-b3-flags"),
                    ],
                    prop_oneof![
                        proptest::collection::vec(any::<u8>(), 0..80),
                        "[0-9a-fA-F\\-]{0,70}".prop_map(String::into_bytes),
                        "0[0-9a-f]-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}.{0,4}".prop_map(String::into_bytes),
                    ],
                ),
                0..6,
            )
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    h.append(HeaderName::from_static(name), value);
                }
            }
            if let Some(ctx) = extract(&h) {
                prop_assert!(ctx.is_sampling_only() || (ctx.trace_id != [0; 16] && ctx.span_id != [0; 8]));
                let ids = child(Some(&ctx));
                prop_assert!(ids.span_id != [0; 8]);
            }
        }

        #[test]
        fn inject_then_extract_round_trips(
            trace in 1u128..,
            span in 1u64..,
            parent in proptest::option::of(1u64..),
            sampled in any::<bool>(),
            format in any_format(),
            state in proptest::option::of("[a-z]{1,8}=[a-z0-9]{1,16}"),
        ) {
            let ids = SpanIds {
                trace_id: trace.to_be_bytes(),
                span_id: span.to_be_bytes(),
                parent_id: parent.map(u64::to_be_bytes),
            };
            let mut h = HeaderMap::new();
            inject(&mut h, format, &ids, sampled, state.as_deref(), &[]);
            let ctx = extract(&h).unwrap();
            prop_assert_eq!(ctx.trace_id, ids.trace_id);
            prop_assert_eq!(ctx.span_id, ids.span_id);
            prop_assert_eq!(ctx.sampled, Some(sampled));
            prop_assert_eq!(ctx.format, format);
            let expected_state = if format == Format::W3c { state } else { None };
            prop_assert_eq!(ctx.tracestate, expected_state);
        }
    }
}
