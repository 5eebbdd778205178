//! meshd's own HTTP/1.1 client connection, for a request whose body is already in memory.
//!
//! hyper's client runs each connection as a task of its own. A request goes to that task through a channel;
//! the response head and every piece of its body come back through others. That is several task switches per
//! request, and hyper's client was the largest single cost of a one-hop request (docs/benchmarks.md). Here the
//! request's own task does the work: it writes the head and body, reads the response head and parses it with
//! httparse (the parser hyper uses), and the response [`Body`] reads the connection itself. A response whose body
//! arrived whole with its head hands the connection back to the pool before the response is even returned.
//!
//! It reads responses as hyper's client does, with the same limits:
//! - informational responses (1xx but 101) are skipped; 101 ends the connection's use;
//! - no body after HEAD, 204 or 304;
//! - `Transfer-Encoding` ending in `chunked`: chunked (with trailers). Any other transfer coding: read until
//!   the upstream closes. `Transfer-Encoding` in an HTTP/1.0 response is an error;
//!   With `Content-Length` as well, that field is dropped and the connection is not reused afterwards;
//! - `Content-Length`: that many bytes. Several fields or values must agree; an invalid one is an error;
//! - neither: read until the upstream closes;
//! - the connection is reused when the response allows it (HTTP/1.1 without `Connection: close`; HTTP/1.0
//!   only with `Connection: keep-alive`) and its body was read to the end;
//! - a reason phrase other than the status code's usual one is passed on (`hyper::ext::ReasonPhrase`).
//!
//! Unlike hyper, it writes the whole request (at most 64 KiB of body) before it reads: an upstream that answers
//! early and resets the connection while the body is still arriving is a failure here, not its early answer.
//!
//! Requests with a streamed body, HTTP/1.0 requests, `CONNECT` and requests that carry their own
//! `Transfer-Encoding` are left to hyper (see [`eligible`]): the pool turns one of these connections into a
//! hyper connection for them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::net::TcpStream;

use super::h1::Slot;
use super::{FailKind, ReqBody, SendError};

/// The most fields a response head (or a trailer section) may have: hyper's default.
const MAX_HEADERS: usize = 100;
/// The largest response head: hyper's largest read buffer.
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// A read asks for at least this much room.
const READ_CHUNK: usize = 8 * 1024;
/// Response heads with at most this many fields are parsed without a heap allocation.
const FEW_HEADERS: usize = 24;
/// The longest chunk-size line (with its extensions) and the largest trailer section: hyper's limits.
const MAX_CHUNK_LINE: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// A body up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// An HTTP/1.1 connection to an upstream, idle or carrying one request.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used: empty while the connection is idle.
    rbuf: BytesMut,
    /// The request head being written; kept for its allocation.
    wbuf: Vec<u8>,
    /// Counts the connection as open in its pool while it lives.
    slot: Slot,
}

impl Conn {
    pub(super) fn new(io: TcpStream, slot: Slot) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            slot,
        }
    }

    /// Whether an idle connection can carry another request: the upstream has neither closed it nor sent
    /// anything unasked. A read of one byte, which costs a system call whenever tokio has the socket marked
    /// readable — always after a response, because [`Conn::poll_fill`] leaves that mark set — so a close the
    /// kernel already has is seen even before the runtime's I/O driver has noted it. (`try_read` also leaves
    /// the task's cooperative budget and its registered waker alone.)
    pub(super) fn usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The socket and the pool slot, for a hyper connection to take over.
    pub(super) fn into_parts(self) -> (TcpStream, Slot) {
        (self.io, self.slot)
    }

    /// Reads more into `rbuf`: the number of bytes read, 0 at the end of the stream.
    ///
    /// Through `try_read`, which keeps tokio's readiness mark after a short read (`poll_read` would clear it):
    /// [`Conn::usable`] then asks the kernel, not the I/O driver, whether the upstream closed the connection
    /// since. Reading through `poll_read` saved that system call per request, but under load the driver can
    /// note a close dozens of task polls late, and a request that cannot be sent twice would then fail on a
    /// connection the kernel knew was closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            match self.io.try_read_buf(&mut self.rbuf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Writes the encoded head and then `body` (in one write when small). On failure, how many bytes went out.
    // An async block, not an `async fn`: the future of an `async fn` holds each argument twice (as argument
    // and as local), and is copied in full at every move.
    #[allow(clippy::manual_async_fn)]
    fn write_request(
        &mut self,
        body: &[u8],
    ) -> impl Future<Output = Result<(), (usize, io::Error)>> {
        async move {
            let coalesce = body.len() <= COALESCE;
            if coalesce {
                self.wbuf.extend_from_slice(body);
            }
            let Conn { io, wbuf, .. } = self;
            let mut written = write_all(io, wbuf, 0).await?;
            if !coalesce {
                written = write_all(io, body, written).await?;
            }
            let _ = written;
            Ok(())
        }
    }
}

async fn write_all(
    io: &TcpStream,
    data: &[u8],
    before: usize,
) -> Result<usize, (usize, io::Error)> {
    let mut off = 0;
    while off < data.len() {
        match io.try_write(&data[off..]) {
            Ok(0) => return Err((before + off, io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                io.writable().await.map_err(|e| (before + off, e))?;
            }
            Err(e) => return Err((before + off, e)),
        }
    }
    Ok(before + off)
}

/// The body of `req` when this client can send it: a request other than HTTP/1.0 and `CONNECT`, with a body in
/// memory whose `Content-Length` (if the request has one) agrees with it, and no `Transfer-Encoding` of its own.
/// `None` leaves the request as it was, for hyper.
pub fn eligible(req: &mut Request<ReqBody>) -> Option<Bytes> {
    // HTTP/1.0 has other framing and keep-alive rules; an HTTP/2 request's version goes out as HTTP/1.1 (as
    // hyper does).
    if req.version() <= Version::HTTP_10 {
        return None;
    }
    let http_body_util::Either::Right(full) = req.body() else {
        return None;
    };
    let len = full.size_hint().exact()?;
    if !sendable_head(req.method(), req.headers(), len) {
        return None;
    }
    let http_body_util::Either::Right(full) = req.body_mut() else {
        return None;
    };
    let mut cx = Context::from_waker(Waker::noop());
    let bytes = match Pin::new(full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    };
    // A body in memory is exactly one frame (or none): nothing else is left in `full`.
    Some(bytes)
}

/// Whether a request with this head and a body of `len` bytes in memory is one this client sends (its
/// version aside: the pool sends HTTP/1.1).
pub fn sendable(head: &http::request::Parts, len: u64) -> bool {
    sendable_head(&head.method, &head.headers, len)
}

fn sendable_head(method: &Method, headers: &HeaderMap, len: u64) -> bool {
    *method != Method::CONNECT
        && !headers.contains_key(TRANSFER_ENCODING)
        && (len == 0
            || !headers.contains_key(CONTENT_LENGTH)
            || content_length(headers) == Ok(Some(len)))
}

/// Sends a request on `conn` and reads the response head. The response body reads on from the connection and
/// gives it back to its pool when it ends; a body that came with the head has done so already.
// An async block, not an `async fn`: the future of an `async fn` holds each argument twice (as argument
// and as local), and is copied in full at every move.
#[allow(clippy::manual_async_fn)]
pub fn send(
    mut conn: Conn,
    mut head: http::request::Parts,
    body: Bytes,
    reused: bool,
    addr: SocketAddr,
) -> impl Future<Output = Result<Response<Body>, SendError>> {
    async move {
        encode_head(&mut conn.wbuf, &head, body.len());
        if let Err((written, e)) = conn.write_request(&body).await {
            if written == 0 {
                // Nothing went out: the request can go elsewhere as it is. On a kept-alive connection that is the
                // usual race with the upstream's close; on a new one the upstream failed before it saw anything.
                let (kind, detail) = if reused {
                    (
                        FailKind::Stale,
                        format!("{addr} closed a kept-alive connection: {e}"),
                    )
                } else {
                    (FailKind::Connect, format!("could not send to {addr}: {e}"))
                };
                let mut err = SendError::new(kind, detail);
                err.unsent = Some(Box::new(Request::from_parts(
                    head,
                    http_body_util::Either::Right(Full::new(body)),
                )));
                return Err(err);
            }
            return Err(give_back(io_failure(e, reused, addr), head, body));
        }
        let head_request = head.method == Method::HEAD;
        let close_asked = head
            .headers
            .get(CONNECTION)
            .is_some_and(|v| has_token(v, "close"));

        let mut got_any = false;
        let parsed = loop {
            if !conn.rbuf.is_empty() {
                got_any = true;
                // The request's header table becomes the response's once the head is complete.
                match parse_head(&mut conn.rbuf, head_request, &mut head.headers) {
                    Ok(Some(p)) => break p,
                    Ok(None) if conn.rbuf.len() > MAX_HEAD => {
                        return Err(malformed(addr, "a response head larger than 400 KiB"));
                    }
                    Ok(None) => {}
                    Err(what) => return Err(malformed(addr, what)),
                }
            }
            match conn.fill().await {
                Ok(0) if !got_any && reused => {
                    let e = SendError::new(
                        FailKind::Stale,
                        format!("{addr} closed a kept-alive connection before responding"),
                    );
                    return Err(give_back(e, head, body));
                }
                Ok(0) => {
                    return Err(SendError::new(
                        FailKind::Other,
                        format!("{addr} closed the connection before the response head ended"),
                    ));
                }
                Ok(_) => {}
                Err(e) if got_any => return Err(io_failure(e, false, addr)),
                Err(e) => return Err(give_back(io_failure(e, reused, addr), head, body)),
            }
        };
        drop(body);
        let Parsed {
            status,
            version,
            headers,
            framing,
            mut keep_alive,
            reason,
        } = parsed;
        keep_alive &= !close_asked;

        let mut body = Body {
            conn: Some(conn),
            keep_alive,
            state: State::Done,
        };
        body.state = match framing {
            Framing::Empty => {
                body.finish();
                State::Done
            }
            Framing::Length(n) => {
                let buffered = body.conn.as_ref().map_or(0, |c| c.rbuf.len());
                if buffered as u64 >= n {
                    // All of it is here: the connection goes back now.
                    let bytes = body
                        .conn
                        .as_mut()
                        .map(|c| c.rbuf.split_to(n as usize).freeze())
                        .unwrap_or_default();
                    body.finish();
                    State::Whole(Some(bytes).filter(|b| !b.is_empty()))
                } else {
                    State::Length(n)
                }
            }
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Eof => {
                body.keep_alive = false;
                State::Eof
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        if let Some(reason) = reason {
            resp.extensions_mut().insert(reason);
        }
        Ok(resp)
    }
}

/// A stale connection's failure carries the request as it was written (untouched: no response byte came), so
/// that a resend needs no copy of its own.
fn give_back(mut e: SendError, head: http::request::Parts, body: Bytes) -> SendError {
    if e.kind == FailKind::Stale {
        e.written = Some(Box::new(Request::from_parts(
            head,
            http_body_util::Either::Right(Full::new(body)),
        )));
    }
    e
}

fn malformed(addr: SocketAddr, what: impl std::fmt::Display) -> SendError {
    SendError::new(FailKind::Other, format!("{addr} sent {what}"))
}

fn io_failure(e: io::Error, reused: bool, addr: SocketAddr) -> SendError {
    let stale = reused
        && matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        );
    if stale {
        SendError::new(
            FailKind::Stale,
            format!("{addr} closed a kept-alive connection: {e}"),
        )
    } else {
        SendError::new(
            FailKind::Other,
            format!("{addr} failed before responding: {e}"),
        )
    }
}

/// Writes the request line and fields into `out` (cleared first), with a `Content-Length` for a body that
/// needs one and has none.
fn encode_head(out: &mut Vec<u8>, head: &http::request::Parts, body_len: usize) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let uri = &head.uri;
    if uri.scheme().is_none() && uri.authority().is_none() {
        out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    } else {
        use std::io::Write as _;
        let _ = write!(out, "{uri}");
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        out.reserve(name.len() + value.len() + 4);
        out.extend_from_slice(name);
        out.push(b':');
        out.push(b' ');
        out.extend_from_slice(value);
        out.push(b'\r');
        out.push(b'\n');
    }
    if body_len > 0 && !head.headers.contains_key(CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Eof,
}

#[derive(Debug)]
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    reason: Option<hyper::ext::ReasonPhrase>,
}

/// Parses a response head at the start of `buf`, skipping informational responses (consumed from `buf`).
/// `Ok(None)`: more bytes are needed. The fields go into `map` (taken from it): the request's own, cleared,
/// so that a header table with room goes around, as in hyper, instead of a new one growing per request.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    map: &mut HeaderMap,
) -> Result<Option<Parsed>, String> {
    loop {
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err("a response head larger than 400 KiB".into());
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!(
                    "a response head with more than {MAX_HEADERS} fields"
                ));
            }
            Err(e) => return Err(format!("a malformed response head ({e})")),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| format!("the status code {code}, which is not one"))?;
        if status.is_informational() && code != 101 {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // A reason phrase of the upstream's own is passed on, as hyper's client does.
        let reason = res
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        // Where each field lies in the head, so the values can share its memory. Room for a usual head on
        // the stack (one for the most fields would cost a 1.6 KiB memset per response).
        let base = buf.as_ptr() as usize;
        let n = res.headers.len();
        let mut few = [(0u32, 0u32, 0u32, 0u32); FEW_HEADERS];
        let mut many = Vec::new();
        let spans = if n <= FEW_HEADERS {
            &mut few[..n]
        } else {
            many.resize(n, (0u32, 0u32, 0u32, 0u32));
            &mut many[..]
        };
        for (span, f) in spans.iter_mut().zip(res.headers.iter()) {
            let name = f.name.as_ptr() as usize - base;
            let value = f.value.as_ptr() as usize - base;
            *span = (
                name as u32,
                (name + f.name.len()) as u32,
                value as u32,
                (value + f.value.len()) as u32,
            );
        }
        let raw = buf.split_to(len).freeze();
        let mut headers = std::mem::take(map);
        headers.clear();
        headers.reserve(n);
        let mut keep_alive = version == Version::HTTP_11;
        let mut saw_close = false;
        let mut seen = Seen::default();
        for &(ns, ne, vs, ve) in spans.iter() {
            let name = HeaderName::from_bytes(&raw[ns as usize..ne as usize])
                .map_err(|_| "a response field with an invalid name".to_string())?;
            let value = HeaderValue::from_maybe_shared(raw.slice(vs as usize..ve as usize))
                .map_err(|_| "a response field with an invalid value".to_string())?;
            if name == CONTENT_LENGTH {
                seen.lengths += 1;
                seen.length = digits(value.as_bytes());
            } else if name == TRANSFER_ENCODING {
                seen.transfer_encoding = true;
            } else if name == CONNECTION {
                // Once any `Connection` field asks to close, a later `keep-alive` does not undo it.
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, "keep-alive");
                }
            }
            headers.append(name, value);
        }
        let framing = framing(status, version, &headers, head_request, &seen)?;
        if code == 101 {
            // Switching protocols, unasked: the connection carries something else now.
            keep_alive = false;
        }
        if framing == Framing::Chunked && seen.lengths > 0 {
            // Both: read as chunked (RFC 9112 §6.3), the length not passed on (it does not describe the body
            // meshd forwards), and the connection not trusted with another request.
            headers.remove(CONTENT_LENGTH);
            keep_alive = false;
        }
        return Ok(Some(Parsed {
            status,
            version,
            headers,
            framing,
            keep_alive,
            reason,
        }));
    }
}

/// What the parse noted of the framing fields as it went: saves looking them up again.
#[derive(Default)]
struct Seen {
    /// `Content-Length` fields.
    lengths: usize,
    /// The last `Content-Length` field's value, when it is plain digits.
    length: Option<u64>,
    transfer_encoding: bool,
}

/// RFC 9112 §6.3, as hyper's client applies it.
fn framing(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    head_request: bool,
    seen: &Seen,
) -> Result<Framing, String> {
    if matches!(status.as_u16(), 101 | 204 | 304) || head_request {
        return Ok(Framing::Empty);
    }
    if seen.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 response".into());
        }
        let chunked = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Eof
        });
    }
    let length = match (seen.lengths, seen.length) {
        (0, _) => Ok(None),
        // Nearly always: one field of plain digits.
        (1, Some(n)) => Ok(Some(n)),
        _ => content_length(headers),
    };
    match length {
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::Eof),
        Err(()) => Err("an invalid or conflicting Content-Length".into()),
    }
}

/// The `Content-Length` of `headers`: every field and comma-separated value must be the same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    // Nearly always one field of plain digits.
    if let Some(n) = digits(first.as_bytes())
        && values.next().is_none()
    {
        return Ok(Some(n));
    }
    let mut found = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        let s = v.to_str().map_err(|_| ())?;
        for part in s.split(',') {
            let n = digits(part.trim().as_bytes()).ok_or(())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// A non-empty run of ASCII digits as a number (`None` for anything else, or on overflow).
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// Whether a comma-separated field value holds `token` (case-insensitively).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the response body failed: {0}")]
    Io(#[source] io::Error),
    #[error("the upstream closed the connection before the response body ended")]
    Closed,
    #[error("the upstream sent a malformed chunked body ({0})")]
    Chunked(&'static str),
}

enum State {
    /// The whole body, read with the head; the connection is back in its pool.
    Whole(Option<Bytes>),
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Eof,
    Done,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This much chunk data is still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// A response body read from the connection by whoever polls it. The connection goes back to its pool when
/// the body has been read to its end and the response allows reuse; otherwise it closes with the body.
pub struct Body {
    conn: Option<Conn>,
    keep_alive: bool,
    state: State,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").finish_non_exhaustive()
    }
}

impl Body {
    /// The body has ended: the connection goes back to its pool when it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.keep_alive
            && conn.rbuf.is_empty()
            && let Some(pool) = conn.slot.pool()
        {
            pool.park_own(conn);
        }
        // Otherwise dropping it closes it (and a pool that is gone has no use for it).
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    /// One step of the chunked decoder over the bytes read so far.
    fn chunked_step(&mut self, at: Chunk) -> Result<Step, BodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::Done);
        };
        let buf = &mut conn.rbuf;
        match at {
            Chunk::Size => {
                let end = buf.iter().position(|&b| b == b'\n');
                if end.unwrap_or(buf.len()) > MAX_CHUNK_LINE {
                    return Err(BodyError::Chunked("chunk-size line too long"));
                }
                let Some(end) = end else {
                    return Ok(Step::More);
                };
                let size = chunk_size(&buf[..end])?;
                buf.advance(end + 1);
                self.state = State::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
                Ok(Step::Again)
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = left.min(buf.len() as u64);
                let data = buf.split_to(take as usize).freeze();
                self.state = State::Chunked(if take == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take)
                });
                Ok(Step::Frame(Frame::data(data)))
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(BodyError::Chunked("no CRLF after chunk data"));
                }
                buf.advance(2);
                self.state = State::Chunked(Chunk::Size);
                Ok(Step::Again)
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                        Err(BodyError::Chunked("trailer section too large"))
                    }
                    Ok(httparse::Status::Partial) => Ok(Step::More),
                    Ok(httparse::Status::Complete((len, _)))
                        if buf[..len]
                            .iter()
                            .enumerate()
                            .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r')) =>
                    {
                        Err(BodyError::Chunked("a trailer line without CRLF"))
                    }
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| BodyError::Chunked("invalid trailer name"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| BodyError::Chunked("invalid trailer value"))?;
                            trailers.append(name, value);
                        }
                        buf.advance(len);
                        self.finish();
                        if trailers.is_empty() {
                            Ok(Step::Done)
                        } else {
                            Ok(Step::Frame(Frame::trailers(trailers)))
                        }
                    }
                    Err(_) => Err(BodyError::Chunked("malformed trailer section")),
                }
            }
        }
    }
}

enum Step {
    Frame(Frame<Bytes>),
    /// The state moved on: step again.
    Again,
    /// More bytes are needed.
    More,
    Done,
}

/// The size of a chunk-size line (`end` excludes its LF): hex digits, then optional extensions, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(BodyError::Chunked("chunk-size line without CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    // Then optional whitespace, then nothing or extensions (`;…`, without another CR).
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if !rest.is_empty() && (rest[0] != b';' || rest.contains(&b'\r')) {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(BodyError::Chunked("chunk size overflows"))?;
    }
    Ok(size)
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Whole(ref mut data) => {
                    let data = data.take();
                    this.state = State::Done;
                    return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
                }
                State::Length(left) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.rbuf.is_empty() {
                        let take = left.min(conn.rbuf.len() as u64);
                        let data = conn.rbuf.split_to(take as usize).freeze();
                        if take == left {
                            this.finish();
                        } else {
                            this.state = State::Length(left - take);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => return this.fail(BodyError::Closed),
                        Ok(_) => {}
                        Err(e) => return this.fail(BodyError::Io(e)),
                    }
                }
                State::Eof => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(BodyError::Io(e)),
                    }
                }
                State::Chunked(at) => match this.chunked_step(at) {
                    Ok(Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                    Ok(Step::Again) => {}
                    Ok(Step::Done) => return Poll::Ready(None),
                    Ok(Step::More) => {
                        let Some(conn) = this.conn.as_mut() else {
                            return Poll::Ready(None);
                        };
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => return this.fail(BodyError::Closed),
                            Ok(_) => {}
                            Err(e) => return this.fail(BodyError::Io(e)),
                        }
                    }
                    Err(e) => return this.fail(e),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Whole(data) => data.is_none(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done => SizeHint::with_exact(0),
            State::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            State::Length(left) => SizeHint::with_exact(*left),
            State::Chunked(_) | State::Eof => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, head: bool) -> Result<Option<Parsed>, String> {
        parse_head(
            &mut BytesMut::from(text.as_bytes()),
            head,
            &mut HeaderMap::new(),
        )
    }

    #[test]
    fn framing_follows_hyper() {
        let p = |t: &str| parse(t, false).map(|p| p.map(|p| (p.framing, p.keep_alive)));
        assert_eq!(
            p("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            p("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert!(p("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").is_err());
        assert!(p("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n").is_err());
        assert_eq!(
            p("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n"),
            Ok(Some((Framing::Chunked, false)))
        );
        assert_eq!(
            p("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Ok(Some((Framing::Eof, true)))
        );
        assert!(p("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert_eq!(p("HTTP/1.1 200 OK\r\n\r\n"), Ok(Some((Framing::Eof, true))));
        assert_eq!(
            p("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            Ok(Some((Framing::Empty, true)))
        );
        assert_eq!(
            p("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            Ok(Some((Framing::Length(1), false)))
        );
        assert_eq!(
            p("HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n"),
            Ok(Some((Framing::Length(1), true)))
        );
        assert_eq!(
            p(
                "HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n"
            ),
            Ok(Some((Framing::Length(1), false)))
        );
        let head = parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true);
        assert_eq!(head.map(|p| p.map(|p| p.framing)), Ok(Some(Framing::Empty)));
    }

    #[test]
    fn heads_with_more_fields_than_the_stack_holds() {
        // Field positions go on the stack up to FEW_HEADERS fields, in a Vec beyond: both keep every field.
        for n in [
            FEW_HEADERS - 1,
            FEW_HEADERS,
            FEW_HEADERS + 1,
            MAX_HEADERS - 1,
        ] {
            let mut text = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..n {
                text.push_str(&format!("x-f{i}: v{i}\r\n"));
            }
            text.push_str("content-length: 3\r\n\r\n");
            let p = parse(&text, false).ok().flatten();
            let p = p.map(|p| (p.framing, p.headers.len(), p.headers.get("x-f0").cloned()));
            assert_eq!(
                p,
                Some((
                    Framing::Length(3),
                    n + 1,
                    Some(HeaderValue::from_static("v0"))
                )),
                "{n} fields"
            );
        }
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..MAX_HEADERS {
            text.push_str(&format!("x-f{i}: v\r\n"));
        }
        text.push_str("content-length: 3\r\n\r\n");
        assert!(
            parse(&text, false).is_err(),
            "more than {MAX_HEADERS} fields"
        );
    }

    #[test]
    fn informational_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let p = parse_head(&mut buf, false, &mut HeaderMap::new())
            .ok()
            .flatten();
        let p = p.map(|p| (p.status, p.headers.get("x-a").cloned()));
        assert_eq!(
            p,
            Some((StatusCode::CREATED, Some(HeaderValue::from_static("1"))))
        );
        assert!(buf.is_empty());
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nx-a: 1\r\n", false),
            Ok(None)
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).is_err());
        assert!(parse("HTTP/1.1 2000 OK\r\n\r\n", false).is_err());
        let big = "x".repeat(MAX_HEAD);
        assert!(parse(&format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\n\r\n"), false).is_err());
        let odd = parse(
            "HTTP/1.1 299 Fine Thanks\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        let reason = odd.ok().flatten().and_then(|p| p.reason);
        assert_eq!(
            reason.as_ref().map(|r| r.as_bytes()),
            Some(&b"Fine Thanks"[..])
        );
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r").ok(), Some(26));
        assert_eq!(chunk_size(b"0;ext=1\r").ok(), Some(0));
        assert_eq!(chunk_size(b"10 \r").ok(), Some(16));
        assert!(chunk_size(b"1a").is_err());
        assert!(chunk_size(b"\r").is_err());
        assert!(chunk_size(b"x\r").is_err());
        assert!(chunk_size(b"1x\r").is_err());
        assert!(chunk_size(b"11111111111111111\r").is_err());
        assert!(chunk_size(b"5 junk\r").is_err());
        assert!(chunk_size(b"5;a=\rb\r").is_err());
        assert_eq!(chunk_size(b"5 ;a=b\r").ok(), Some(5));
    }

    #[test]
    fn the_head_names_a_missing_length() {
        let (parts, ()) = Request::post("/p?q=1")
            .header("host", "svc")
            .body(())
            .map(|r| r.into_parts())
            .unwrap_or_else(|_| unreachable!());
        let mut out = Vec::new();
        encode_head(&mut out, &parts, 3);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /p?q=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n"
        );
        encode_head(&mut out, &parts, 0);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /p?q=1 HTTP/1.1\r\nhost: svc\r\n\r\n"
        );
    }
}
