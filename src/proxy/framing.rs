//! Request-smuggling guard for HTTP/1.1 client connections.
//!
//! hyper follows RFC 9112 §6.3 for a request carrying both `Transfer-Encoding` and `Content-Length`: it drops the
//! length, reads the chunked body and closes the connection afterwards, but still hands the request on. It also
//! accepts two equal `Content-Length` fields, `chunked` applied twice, and bare-LF line endings. Upstreams and
//! other proxies disagree on all of these, so a proxy should forward none of them. hyper removes the evidence
//! before the service sees the request, so this module follows the bytes hyper reads: each request's head (found
//! with httparse, the parser hyper uses, so both see the same heads), then its body (fixed-length or chunked), and
//! records one [`Framing`] per request head, in order. The outbound service takes the verdicts in the same order
//! and answers 400, closing the connection, to anything but [`Framing::Ok`].
//!
//! The follower only reads (the server's connection wrapper feeds it); it never changes what hyper sees. When it
//! cannot follow any more (a malformed chunk, an oversized head — both of which hyper rejects too) it *fails
//! closed*: every later request on the connection is [`Framing::Unknown`] and refused.
//!
//! tests/smuggling.rs keeps a corpus of ambiguous requests; with this guard off, hyper alone forwarded 8 of its
//! 21 cases (measured when the guard was rewritten).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// The largest request head followed (hyper refuses larger ones with 431).
const MAX_HEAD: usize = 64 * 1024 + 1024;
/// hyper's limit is lower; parsing more lets the follower stay in step with a head hyper will reject anyway.
const MAX_HEADERS: usize = 128;
/// The longest trailer line followed (hyper's whole head limit).
const MAX_TRAILER_LINE: usize = MAX_HEAD;

/// What the follower concluded about one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Ok,
    /// Both `Transfer-Encoding` and `Content-Length`.
    Conflicting,
    /// Framing that parsers disagree on: duplicate or malformed `Content-Length`, `Transfer-Encoding` without a
    /// single final `chunked`, bare-LF line endings.
    Ambiguous,
    /// The follower lost track of the connection earlier: the request's framing is unknown.
    Unknown,
}

impl Framing {
    /// Why a request with this framing is refused.
    pub fn refusal(self) -> Option<&'static str> {
        match self {
            Framing::Ok => None,
            Framing::Conflicting => Some(
                "both Transfer-Encoding and Content-Length are set; refusing an ambiguous request",
            ),
            Framing::Ambiguous => Some(
                "ambiguous message framing (a duplicate or malformed Content-Length, Transfer-Encoding without a final chunked, or bare-LF line endings)",
            ),
            Framing::Unknown => {
                Some("an earlier request on this connection was malformed; open a new connection")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    verdicts: VecDeque<Framing>,
    lost: bool,
}

/// Verdicts of one connection, shared between the follower and the service.
#[derive(Debug, Default)]
pub struct Framings(Mutex<Queue>);

impl Framings {
    /// The verdict for the next request the service handles.
    pub fn next(&self) -> Framing {
        match self.0.lock() {
            Ok(mut q) => q.verdicts.pop_front().unwrap_or(Framing::Unknown),
            Err(_) => Framing::Unknown,
        }
    }

    fn push(&self, v: Framing) {
        if let Ok(mut q) = self.0.lock() {
            q.verdicts.push_back(v);
        }
    }

    fn lose(&self) {
        if let Ok(mut q) = self.0.lock() {
            q.lost = true;
        }
    }

    /// Whether the follower lost track of the connection.
    pub fn is_lost(&self) -> bool {
        self.0.lock().map_or(true, |q| q.lost)
    }
}

/// Where in a chunk-size line the follower is.
#[derive(Debug, Clone, Copy)]
struct ChunkLine {
    size: u64,
    digits: u8,
    /// Past the size: in whitespace or an extension (`;name=value`), which hyper bounds itself.
    after_size: bool,
    cr: bool,
}

#[derive(Debug)]
enum State {
    /// Bytes of a request head so far.
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(ChunkLine),
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many of its two bytes are still due.
    ChunkEnd(u8),
    /// After the last chunk: trailer lines until an empty one, each ended by CRLF exactly as hyper reads
    /// them. Holds the length of the current line and whether a CR was just seen.
    Trailers(usize, bool),
    /// Lost track (fails closed).
    Lost,
}

/// Follows request framing over a byte stream.
#[derive(Debug)]
pub struct Follower {
    state: State,
    verdicts: Arc<Framings>,
}

impl Follower {
    pub fn new(verdicts: Arc<Framings>) -> Self {
        Follower {
            state: State::Head(Vec::new()),
            verdicts,
        }
    }

    /// Whether it still follows the stream.
    pub fn is_on(&self) -> bool {
        !matches!(self.state, State::Lost)
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.verdicts.lose();
    }

    /// Feeds the next bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Lost => return,
                State::Head(buf) => {
                    if buf.is_empty() {
                        // The usual case: a whole head in one read, followed in place without copying.
                        match parse_head(data) {
                            Parsed::Complete(n, verdict) => {
                                self.state = self.on_head(verdict);
                                data = &data[n..];
                            }
                            Parsed::Partial => {
                                buf.extend_from_slice(data);
                                return self.check_head_size();
                            }
                            Parsed::Invalid => return self.lose(),
                        }
                        continue;
                    }
                    // Parse again only when the new bytes may end the head (a blank line), looking from where the
                    // last read stopped minus what a line end can span: a head trickled in byte by byte is not
                    // parsed from the start at every byte.
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    if !may_end_head(&buf[before.saturating_sub(2)..]) {
                        return self.check_head_size();
                    }
                    match parse_head(buf) {
                        Parsed::Complete(n, verdict) => {
                            buf.clear();
                            self.state = self.on_head(verdict);
                            data = &data[n - before..];
                        }
                        Parsed::Partial => return self.check_head_size(),
                        Parsed::Invalid => return self.lose(),
                    }
                }
                State::Fixed(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let b = data[0];
                    data = &data[1..];
                    match chunk_line_step(line, b) {
                        Step::More => {}
                        Step::Done(0) => self.state = State::Trailers(0, false),
                        Step::Done(n) => self.state = State::ChunkData(n),
                        Step::Bad => return self.lose(),
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let expected = if *left == 2 { b'\r' } else { b'\n' };
                    if data[0] != expected {
                        return self.lose();
                    }
                    data = &data[1..];
                    *left -= 1;
                    if *left == 0 {
                        self.state = State::ChunkSize(ChunkLine::new());
                    }
                }
                State::Trailers(line_len, cr) => {
                    let b = data[0];
                    data = &data[1..];
                    match (b, *cr) {
                        (b'\n', true) if *line_len == 0 => self.state = State::Head(Vec::new()),
                        (b'\n', true) => (*line_len, *cr) = (0, false),
                        // hyper ends a trailer line only at CRLF: a bare LF or a lone CR would make the two of
                        // us disagree on where the next request starts.
                        (b'\n', false) | (_, true) => return self.lose(),
                        (b'\r', false) => *cr = true,
                        _ => {
                            *line_len += 1;
                            if *line_len > MAX_TRAILER_LINE {
                                return self.lose();
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_head_size(&mut self) {
        if matches!(&self.state, State::Head(buf) if buf.len() > MAX_HEAD) {
            // hyper answers 431 and closes.
            self.lose();
        }
    }

    /// Records a complete head's verdict and says what follows it.
    fn on_head(&self, verdict: (Framing, Body)) -> State {
        self.verdicts.push(verdict.0);
        match verdict {
            (Framing::Ok, Body::None) => State::Head(Vec::new()),
            (Framing::Ok, Body::Fixed(n)) => State::Fixed(n),
            (Framing::Ok, Body::Chunked) => State::ChunkSize(ChunkLine::new()),
            // Refused and the connection closed: nothing more to follow.
            _ => {
                self.verdicts.lose();
                State::Lost
            }
        }
    }
}

/// Whether `bytes` hold a line end followed by a blank line (`\n\n` or `\n\r\n`): only then can a head end.
fn may_end_head(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|i| match bytes.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => bytes.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

enum Parsed {
    /// The head's length, and the verdict on it.
    Complete(usize, (Framing, Body)),
    Partial,
    Invalid,
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    None,
    Fixed(u64),
    Chunked,
}

/// Parses the head at the start of `buf` with httparse (the parser hyper uses, so both find the same end) and
/// judges its framing, in one pass.
fn parse_head(buf: &[u8]) -> Parsed {
    match plain_head(buf) {
        Some(n) => Parsed::Complete(n, (Framing::Ok, Body::None)),
        None => parse_head_fully(buf),
    }
}

fn parse_head_fully(buf: &[u8]) -> Parsed {
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    Parsed::Complete(n, judge(&buf[..n], req.headers))
}

/// The length of the complete head at the start of `buf` when judging it needs no full parse: every line ends
/// in CRLF and no header field can be `Content-Length` or `Transfer-Encoding` (a name that merely starts like
/// one counts), so the request has no body and its framing is unambiguous — what [`judge`] would conclude. Most
/// requests (GET, HEAD, DELETE without a body) are such heads; `None` sends the rest to the full parse.
///
/// The head ends at the first blank line, as httparse ends it: with every line feed after a carriage return,
/// the first `\r\n\r\n` is that blank line. A head httparse would reject (a malformed request line or field)
/// may be judged plain here; hyper, which parses it the same way, answers 400 and closes the connection
/// before any handler could act on the verdict. This rests on hyper's server keeping httparse's default request
/// parsing: an option that loosens it (ignoring invalid header lines, say) would need it thought through again.
fn plain_head(buf: &[u8]) -> Option<usize> {
    let mut line_feeds = memchr::memchr_iter(b'\n', buf);
    // A request line that is not `METHOD SP target SP HTTP/1.x` CRLF (empty lines first, garbage, another
    // protocol) is left to the full parse, which skips the empty lines and fails closed on the rest.
    let mut lf = line_feeds.next()?;
    let request_line = &buf[..lf];
    let method_len = request_line.iter().position(|&b| !is_tchar(b))?;
    if method_len == 0
        || request_line[method_len] != b' '
        || !(request_line.ends_with(b" HTTP/1.1\r") || request_line.ends_with(b" HTTP/1.0\r"))
    {
        return None;
    }
    loop {
        // The line after this line feed: the blank line that ends the head, or a field line.
        let line = &buf[lf + 1..];
        if line.starts_with(b"\r\n") {
            return Some(lf + 3);
        }
        let named = |name: &[u8]| {
            line.get(..name.len())
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        };
        // Most fields start with neither letter: one comparison instead of two names.
        let suspect = matches!(line.first(), Some(b'c' | b'C' | b't' | b'T'));
        if suspect && (named(b"content-length") || named(b"transfer-encoding")) {
            return None;
        }
        lf = line_feeds.next()?;
        if buf[lf - 1] != b'\r' {
            return None;
        }
    }
}

/// A byte of a token (RFC 9110 §5.6.2), such as a method.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The verdict on a complete request head, and how its body is framed.
fn judge(head: &[u8], headers: &[httparse::Header<'_>]) -> (Framing, Body) {
    // Every line must end in CRLF: a bare LF is read as a line end by some parsers and not by others. Empty
    // lines before the request line are skipped by everyone (RFC 9112 §2.2) and do not count.
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    if memchr::memchr_iter(b'\n', &head[start..]).any(|i| i == 0 || head[start + i - 1] != b'\r') {
        return (Framing::Ambiguous, Body::None);
    }
    let mut lengths = 0;
    let mut length: Option<u64> = None;
    let mut chunked_count = 0;
    let mut te_fields = 0;
    let mut last_coding: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            // 1*DIGIT, nothing else (RFC 9110 §8.6): no sign, no list, no spaces inside.
            let v = h.value.trim_ascii();
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return (Framing::Ambiguous, Body::None);
            }
            length = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
            if length.is_none() {
                return (Framing::Ambiguous, Body::None);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_fields += 1;
            for c in h
                .value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|c| !c.is_empty())
            {
                if c.eq_ignore_ascii_case(b"chunked") {
                    chunked_count += 1;
                }
                last_coding = Some(c);
            }
        }
    }
    if lengths > 1 {
        return (Framing::Ambiguous, Body::None);
    }
    if te_fields > 0 {
        if length.is_some() {
            return (Framing::Conflicting, Body::None);
        }
        // chunked exactly once, and last (RFC 9112 §6.1, §6.3); an empty Transfer-Encoding is no better.
        let last_is_chunked = last_coding.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        if !last_is_chunked || chunked_count != 1 {
            return (Framing::Ambiguous, Body::None);
        }
        return (Framing::Ok, Body::Chunked);
    }
    match length {
        Some(n) if n > 0 => (Framing::Ok, Body::Fixed(n)),
        _ => (Framing::Ok, Body::None),
    }
}

enum Step {
    More,
    Done(u64),
    Bad,
}

impl ChunkLine {
    fn new() -> Self {
        ChunkLine {
            size: 0,
            digits: 0,
            after_size: false,
            cr: false,
        }
    }
}

/// One byte of a chunk-size line (`1a;ext=x\r\n`). Only the size is kept, so a long extension costs nothing.
fn chunk_line_step(line: &mut ChunkLine, b: u8) -> Step {
    if line.cr {
        return if b == b'\n' && line.digits > 0 {
            Step::Done(line.size)
        } else {
            Step::Bad
        };
    }
    match b {
        b'\r' => {
            line.cr = true;
            Step::More
        }
        // hyper, like this, wants CRLF here.
        b'\n' => Step::Bad,
        _ if line.after_size => Step::More,
        b';' | b' ' | b'\t' => {
            line.after_size = true;
            Step::More
        }
        _ => match (b as char).to_digit(16) {
            // Leading zeros say nothing about the size.
            Some(0) if line.size == 0 => {
                line.digits = line.digits.max(1);
                Step::More
            }
            Some(d) if line.size >> 60 == 0 => {
                line.size = (line.size << 4) | u64::from(d);
                line.digits = line.digits.saturating_add(1);
                Step::More
            }
            _ => Step::Bad,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[&[u8]]) -> (Vec<Framing>, bool) {
        let v = Arc::new(Framings::default());
        let mut t = Follower::new(v.clone());
        for c in chunks {
            t.feed(c);
        }
        let q = v.0.lock().unwrap();
        (q.verdicts.iter().copied().collect(), q.lost)
    }

    #[test]
    fn follows_keep_alive_requests() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let want = vec![Framing::Ok, Framing::Ok, Framing::Ok, Framing::Conflicting];
        assert_eq!(run(&[stream]).0, want);
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes).0, want);
    }

    #[test]
    fn body_bytes_that_look_like_headers_are_not_heads() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(run(&[&stream]), (vec![Framing::Ok], false));
    }

    proptest! {
        /// Whatever the quick path judges plain, the full parse judges the same (head length, no body, Ok) —
        /// or rejects, as hyper then does.
        #[test]
        fn the_quick_path_agrees_with_the_full_parse(
            lines in proptest::collection::vec(
                prop::sample::select(vec![
                    "Host: x", "X: y", "Content-Length: 3", "content-LENGTH: 0", "Content-Length : 3",
                    "Transfer-Encoding: chunked", "transfer-encodinG: gzip", "Content-Lengthy: 1",
                    "Cookie: a=1\r", "X: \ry", "", " folded", "Accept: */*",
                ]),
                0..6,
            ),
            request_line in prop::sample::select(vec!["GET / HTTP/1.1", "POST /p HTTP/1.1", "get /x HTTP/1.0", "\r\nGET / HTTP/1.1", "BAD"]),
            ending in prop::sample::select(vec!["\r\n", "\n", "\r\n\r\n", ""]),
            bare_lf in any::<bool>(),
            tail in prop::sample::select(vec!["", "GET /next HTTP/1.1\r\n\r\n", "hello"]),
        ) {
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let mut head = format!("{request_line}{eol}");
            for l in &lines {
                head.push_str(l);
                head.push_str(eol);
            }
            head.push_str(ending);
            head.push_str(tail);
            let buf = head.as_bytes();
            if let Some(n) = plain_head(buf) {
                match parse_head_fully(buf) {
                    Parsed::Complete(m, verdict) => {
                        prop_assert_eq!(m, n);
                        prop_assert_eq!(verdict, (Framing::Ok, Body::None));
                    }
                    Parsed::Invalid => {}
                    Parsed::Partial => prop_assert!(false, "plain but partial: {head:?}"),
                }
            }
        }
    }

    #[test]
    fn plain_heads_take_the_quick_path() {
        assert_eq!(
            plain_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET"),
            Some(27)
        );
        for not_plain in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"\x00\x01garbage\r\n\r\n",
            b"GET / SSH-2.0\r\n\r\n",
            b" GET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                plain_head(not_plain),
                None,
                "{}",
                String::from_utf8_lossy(not_plain)
            );
        }
    }

    #[test]
    fn ambiguous_heads() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
        ] {
            assert_eq!(
                run(&[head]),
                (vec![Framing::Ambiguous], true),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // gzip then chunked is fine.
        assert_eq!(
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"]),
            (vec![Framing::Ok], false)
        );
    }

    #[test]
    fn trailers_end_only_at_crlf() {
        // A bare LF in the trailers: hyper reads on as trailer text, so the follower must not see a head there.
        let (v, lost) = run(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\r\n\r\n",
        ]);
        assert_eq!((v, lost), (vec![Framing::Ok], true));
        let (v, lost) =
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\rb\r\n\r\n"]);
        assert_eq!((v, lost), (vec![Framing::Ok], true));
        let (v, lost) = run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n"]);
        assert_eq!((v, lost), (vec![Framing::Ok, Framing::Ok], false));
    }

    #[test]
    fn what_hyper_accepts_is_not_refused() {
        for head in [
            // Leading empty lines, CRLF or bare LF.
            &b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            // A Content-Length with many leading zeros.
            b"GET / HTTP/1.1\r\nContent-Length: 0000000000000000000000000\r\n\r\n",
        ] {
            assert_eq!(
                run(&[head]),
                (vec![Framing::Ok], false),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // A chunk size with leading zeros past 16 digits.
        let (v, lost) = run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n000000000000000000005\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"]);
        assert_eq!((v, lost), (vec![Framing::Ok, Framing::Ok], false));
    }

    #[test]
    fn a_long_chunk_extension_split_across_reads_is_followed() {
        let mut stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;".to_vec();
        stream.extend(std::iter::repeat_n(b'e', 6000));
        stream.extend_from_slice(b"\r\nhello\r\n0\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        let pieces: Vec<&[u8]> = stream.chunks(1000).collect();
        assert_eq!(run(&pieces).0, vec![Framing::Ok, Framing::Conflicting]);
    }

    #[test]
    fn loses_track_and_fails_closed() {
        // An oversized chunk size, an oversized head, garbage: later requests are Unknown.
        let (v, lost) =
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\n"]);
        assert_eq!((v, lost), (vec![Framing::Ok], true));
        let huge = vec![b'a'; MAX_HEAD * 2];
        assert!(run(&[b"GET / HTTP/1.1\r\nX: ", &huge]).1);
        assert!(run(&[b"\x00\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n"]).1);
        let f = Framings::default();
        assert_eq!(f.next(), Framing::Unknown, "no verdict: fail closed");
    }

    #[test]
    fn chunk_lines() {
        let step_all = |s: &[u8]| {
            let mut l = ChunkLine::new();
            let mut out = None;
            for &b in s {
                match chunk_line_step(&mut l, b) {
                    Step::More => {}
                    Step::Done(n) => out = Some(Some(n)),
                    Step::Bad => return None,
                }
            }
            out.flatten()
        };
        assert_eq!(step_all(b"1a\r\n"), Some(26));
        assert_eq!(step_all(b"0\r\n"), Some(0));
        assert_eq!(step_all(b"5;a=b\r\n"), Some(5));
        assert_eq!(step_all(b"zz\r\n"), None);
        assert_eq!(step_all(b"\r\n"), None);
        assert_eq!(step_all(b"5\n"), None);
        assert_eq!(step_all(b"ffffffffffffffff\r\n"), Some(u64::MAX));
        assert_eq!(step_all(b"10000000000000000\r\n"), None);
    }

    /// One request of a generated keep-alive stream.
    #[derive(Clone, Debug)]
    enum Req {
        Empty,
        Fixed(Vec<u8>),
        Chunked(Vec<Vec<u8>>, bool, usize),
        /// Both Content-Length and Transfer-Encoding.
        Conflict,
    }

    fn encode(reqs: &[Req]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Empty => out.extend(format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").bytes()),
                Req::Fixed(body) => {
                    out.extend(format!("POST /{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).bytes());
                    out.extend(body);
                }
                Req::Chunked(chunks, trailers, ext) => {
                    out.extend(format!("POST /{i} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").bytes());
                    for c in chunks.iter().filter(|c| !c.is_empty()) {
                        out.extend(format!("{:x};{}\r\n", c.len(), "e".repeat(*ext)).bytes());
                        out.extend(c);
                        out.extend(b"\r\n");
                    }
                    out.extend(b"0\r\n");
                    if *trailers {
                        out.extend(b"X-Check: 1\r\n");
                    }
                    out.extend(b"\r\n");
                }
                Req::Conflict => out.extend(
                    format!("POST /{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").bytes(),
                ),
            }
        }
        out
    }

    fn req() -> impl Strategy<Value = Req> {
        // Bodies may contain anything, including bytes that look like request heads.
        let body = proptest::collection::vec(
            prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(b'G')],
            0..300,
        );
        prop_oneof![
            Just(Req::Empty),
            body.clone().prop_map(Req::Fixed),
            (
                proptest::collection::vec(body, 0..4),
                any::<bool>(),
                0usize..5000
            )
                .prop_map(|(c, t, e)| Req::Chunked(c, t, e)),
            Just(Req::Conflict),
        ]
    }

    proptest! {
        /// However a valid keep-alive stream is cut into reads, the follower gives one verdict per request, in
        /// order, and stops after a conflicting one (the connection is closed there).
        #[test]
        fn one_verdict_per_request(reqs in proptest::collection::vec(req(), 1..12), cuts in proptest::collection::vec(1usize..600, 1..50)) {
            let stream = encode(&reqs);
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + c).min(stream.len());
                pieces.push(&stream[at..end]);
                at = end;
            }
            let (got, _) = run(&pieces);
            let upto = reqs.iter().position(|r| matches!(r, Req::Conflict)).map_or(reqs.len(), |i| i + 1);
            let want: Vec<Framing> = reqs[..upto]
                .iter()
                .map(|r| if matches!(r, Req::Conflict) { Framing::Conflicting } else { Framing::Ok })
                .collect();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic the follower.
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let _ = run(&refs);
        }
    }
}
