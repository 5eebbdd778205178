//! Request-smuggling guard for HTTP/1.1 client connections.
//!
//! hyper follows RFC 9112 §6.3 for a request carrying both `Transfer-Encoding` and `Content-Length`: it drops the
//! length, reads the chunked body and closes the connection afterwards, but still hands the request on. A proxy
//! should not forward such a request at all (upstreams disagree on which header wins). hyper removes the evidence
//! before the service sees it, so this module watches the bytes hyper reads: it follows each request's framing
//! (head, fixed-length or chunked body) and records one [`Framing`] per request head, in order. The outbound
//! service takes the verdicts in the same order, and answers 400 and closes the connection on a conflict.
//!
//! The follower only reads (the server's connection wrapper feeds it); it never changes what hyper sees. On anything it cannot follow (an HTTP/2 preface, an
//! oversized head, a framing error) it stops tracking: hyper rejects those requests itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// The largest request head followed (hyper refuses larger ones with 431).
const MAX_HEAD: usize = 64 * 1024 + 1024;
/// The longest chunk-size line followed.
const MAX_CHUNK_LINE: usize = 4096;
/// hyper's limit is lower; parsing more lets the tracker stay in step with a head hyper will reject anyway.
const MAX_HEADERS: usize = 128;

/// What the tracker concluded about one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Ok,
    /// Both `Transfer-Encoding` and `Content-Length`: refuse with 400 and close.
    Conflicting,
}

/// Framings of one connection, shared between the I/O wrapper and the service.
#[derive(Debug, Default)]
pub struct Framings(Mutex<VecDeque<Framing>>);

impl Framings {
    /// The verdict for the next request the service handles (`Ok` when the tracker stopped following).
    pub fn next(&self) -> Framing {
        match self.0.lock() {
            Ok(mut q) => q.pop_front().unwrap_or(Framing::Ok),
            Err(_) => Framing::Ok,
        }
    }

    fn push(&self, v: Framing) {
        if let Ok(mut q) = self.0.lock() {
            q.push_back(v);
        }
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkCrlf(u8),
    /// After the last chunk: trailer lines until an empty one. Holds the length of the current line.
    Trailers(usize),
    Off,
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
        !matches!(self.state, State::Off)
    }

    /// Feeds the next bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    // The usual case: a whole head in one read. Follow it in place, without copying.
                    if buf.is_empty()
                        && let Some(pos) = find(data, b"\r\n\r\n")
                    {
                        let end = pos + 4;
                        self.state = self.on_head(&data[..end]);
                        data = &data[end..];
                        continue;
                    }
                    let search_from = buf.len().saturating_sub(3);
                    let take = data.len().min(MAX_HEAD + 1 - buf.len().min(MAX_HEAD));
                    buf.extend_from_slice(&data[..take]);
                    match find(&buf[search_from..], b"\r\n\r\n") {
                        Some(pos) => {
                            let end = search_from + pos + 4;
                            let consumed_from_data = take - (buf.len() - end);
                            let head = std::mem::take(buf);
                            self.state = self.on_head(&head[..end]);
                            data = &data[consumed_from_data..];
                        }
                        None if buf.len() > MAX_HEAD => self.state = State::Off,
                        None => return,
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
                State::ChunkSize(line) => match data.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        line.extend_from_slice(&data[..pos]);
                        data = &data[pos + 1..];
                        self.state = match chunk_size(line) {
                            Some(0) => State::Trailers(0),
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        };
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > MAX_CHUNK_LINE {
                            self.state = State::Off;
                        }
                        return;
                    }
                },
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkCrlf(2);
                    }
                }
                State::ChunkCrlf(left) => {
                    let expected: &[u8] = if *left == 2 { b"\r" } else { b"\n" };
                    if data[0] != expected[0] {
                        self.state = State::Off;
                        return;
                    }
                    data = &data[1..];
                    *left -= 1;
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line_len) => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        b'\n' if *line_len == 0 => self.state = State::Head(Vec::new()),
                        b'\n' => *line_len = 0,
                        b'\r' => {}
                        _ => {
                            *line_len += 1;
                            if *line_len > MAX_HEAD {
                                self.state = State::Off;
                            }
                        }
                    }
                }
            }
        }
    }

    fn on_head(&self, head: &[u8]) -> State {
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return State::Off,
        }
        if req.method == Some("PRI") || req.method == Some("CONNECT") {
            return State::Off;
        }
        let mut content_length: Option<u64> = None;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
            if h.name.eq_ignore_ascii_case("content-length") {
                match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                {
                    Some(n) => content_length = Some(n),
                    None => return State::Off,
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
        }
        if te && content_length.is_some() {
            self.verdicts.push(Framing::Conflicting);
            // hyper closes the connection after this request: nothing more to follow.
            return State::Off;
        }
        self.verdicts.push(Framing::Ok);
        // After an upgrade request the connection may carry another protocol: nothing more to follow (if the
        // upgrade is declined, hyper still checks the framing of what follows).
        if upgrade || (te && !chunked) {
            State::Off
        } else if chunked {
            State::ChunkSize(Vec::new())
        } else {
            match content_length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head(Vec::new()),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let hex = line.split(|&b| b == b';').next()?.trim_ascii();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[&[u8]]) -> Vec<Framing> {
        let v = Arc::new(Framings::default());
        let mut t = Follower::new(v.clone());
        for c in chunks {
            t.feed(c);
        }
        let q = v.0.lock().unwrap();
        q.iter().copied().collect()
    }

    #[test]
    fn follows_keep_alive_requests() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            run(&[stream]),
            vec![Framing::Ok, Framing::Ok, Framing::Ok, Framing::Conflicting]
        );
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes).len(), 4);
        assert_eq!(run(&bytes)[3], Framing::Conflicting);
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
        assert_eq!(run(&[&stream]), vec![Framing::Ok]);
    }

    #[test]
    fn stops_on_h2_preface_and_garbage() {
        assert!(run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
        assert!(run(&[b"\x00\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n"]).is_empty());
        let huge = vec![b'a'; MAX_HEAD * 2];
        assert!(run(&[b"GET / HTTP/1.1\r\nX: ", &huge]).is_empty());
    }

    /// One request of a generated keep-alive stream.
    #[derive(Clone, Debug)]
    enum Req {
        Empty,
        Fixed(Vec<u8>),
        Chunked(Vec<Vec<u8>>, bool),
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
                Req::Chunked(chunks, trailers) => {
                    out.extend(format!("POST /{i} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").bytes());
                    for c in chunks.iter().filter(|c| !c.is_empty()) {
                        out.extend(format!("{:x}\r\n", c.len()).bytes());
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
            (proptest::collection::vec(body, 0..4), any::<bool>())
                .prop_map(|(c, t)| Req::Chunked(c, t)),
            Just(Req::Conflict),
        ]
    }

    proptest! {
        /// However a valid keep-alive stream is cut into reads, the tracker gives one verdict per request, in
        /// order, and stops after a conflicting one (hyper closes the connection there).
        #[test]
        fn one_verdict_per_request(reqs in proptest::collection::vec(req(), 1..12), cuts in proptest::collection::vec(1usize..64, 1..50)) {
            let stream = encode(&reqs);
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + c).min(stream.len());
                pieces.push(&stream[at..end]);
                at = end;
            }
            let got = run(&pieces);
            let upto = reqs.iter().position(|r| matches!(r, Req::Conflict)).map_or(reqs.len(), |i| i + 1);
            let want: Vec<Framing> = reqs[..upto]
                .iter()
                .map(|r| if matches!(r, Req::Conflict) { Framing::Conflicting } else { Framing::Ok })
                .collect();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic the tracker.
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let _ = run(&refs);
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"zz\r"), None);
        assert_eq!(chunk_size(b"\r"), None);
    }
}
