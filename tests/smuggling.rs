//! Request smuggling: a corpus of ambiguously framed HTTP/1.1 requests sent on raw sockets. For every one the
//! client gets 400 and a closed connection, and an upstream that records every request it receives sees only
//! the requests the client framed unambiguously — never a request hidden in another's body.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Case {
    name: &'static str,
    /// Written with a pause between pieces, so a request can be split across reads.
    pieces: Vec<Vec<u8>>,
    /// The statuses the client gets, in order; the connection is closed after the last.
    statuses: &'static [u16],
    /// What the upstream may see, in order (a request the client framed may reach it even if its body then
    /// turns out malformed).
    upstream: &'static [&'static str],
}

fn case(
    name: &'static str,
    raw: &str,
    statuses: &'static [u16],
    upstream: &'static [&'static str],
) -> Case {
    Case {
        name,
        pieces: vec![raw.as_bytes().to_vec()],
        statuses,
        upstream,
    }
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n";

fn corpus() -> Vec<Case> {
    let mut cases = vec![
        case(
            "CL then TE",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "TE then CL",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n{SMUGGLED}\r\n0\r\n\r\n"
            ),
            &[400],
            &[],
        ),
        case(
            "TE and a lower-case CL",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "two equal Content-Lengths",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "two different Content-Lengths",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "a Content-Length list",
            &format!("POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3, 3\r\n\r\nabc{SMUGGLED}"),
            &[400],
            &[],
        ),
        case(
            "a signed Content-Length",
            "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: +3\r\n\r\nabc",
            &[400],
            &[],
        ),
        case(
            "a negative Content-Length",
            "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: -3\r\n\r\nabc",
            &[400],
            &[],
        ),
        case(
            "a hex Content-Length",
            "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 0x3\r\n\r\nabc",
            &[400],
            &[],
        ),
        case(
            "a Content-Length with a space inside",
            "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1 3\r\n\r\nabc",
            &[400],
            &[],
        ),
        case(
            "an obfuscated Transfer-Encoding (xchunked)",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "chunked not the final coding",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "chunked twice",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "a space before the colon",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "bare-LF line endings, then a CL+TE request",
            &format!(
                "GET /first HTTP/1.1\nHost: svc\n\nPOST /second HTTP/1.1\r\nHost: svc\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "a bare LF inside an otherwise CRLF head",
            &format!(
                "POST /a HTTP/1.1\r\nHost: svc\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
        ),
        case(
            "a chunk size that overflows 64 bits",
            &format!(
                "POST /collect HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &["POST /collect"],
        ),
        case(
            "obs-fold",
            "GET /a HTTP/1.1\r\nHost: svc\r\nX-Folded: a\r\n b\r\n\r\n",
            &[400],
            &[],
        ),
        case(
            "NUL in a value",
            "GET /a HTTP/1.1\r\nHost: svc\r\nX-Nul: a\0b\r\n\r\n",
            &[400],
            &[],
        ),
        case(
            "CR in a value",
            "GET /a HTTP/1.1\r\nHost: svc\r\nX-Cr: a\rb\r\n\r\n",
            &[400],
            &[],
        ),
    ];
    // A chunk line longer than 4 KiB, split across reads, then a CL+TE request on the same connection: the
    // first is served, the second refused.
    let long_ext = format!(
        "POST /collect HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5;{}",
        "e".repeat(6000)
    );
    cases.push(Case {
        name: "a 6 KiB chunk line split across reads, then CL+TE",
        pieces: vec![
            long_ext.as_bytes()[..3000].to_vec(),
            long_ext.as_bytes()[3000..].to_vec(),
            format!("\r\nhello\r\n0\r\n\r\nPOST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}").into_bytes(),
        ],
        statuses: &[200, 400],
        upstream: &["POST /collect"],
    });
    cases
}

/// The statuses of the responses read until the server closes the connection (or 5 s pass).
async fn statuses(agent: &Agent, pieces: &[Vec<u8>]) -> (Vec<u16>, bool) {
    let mut s = TcpStream::connect(agent.outbound).await.unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .is_ok();
    let text = String::from_utf8_lossy(&out);
    let codes = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect();
    (codes, closed)
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_never_reaches_the_upstream() {
    let b = backend("svc").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"svc\"\nendpoints = [\"{}\"]\n",
        b.addr
    ))
    .await;
    let mut failures = Vec::new();
    let mut everything = Vec::new();
    for c in corpus() {
        b.seen.lock().unwrap().clear();
        let (got, closed) = statuses(&agent, &c.pieces).await;
        // Give a request that slipped through time to arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = b.seen.lock().unwrap().clone();
        everything.extend(seen.iter().cloned());
        let upstream_ok = seen.iter().zip(c.upstream).all(|(s, want)| s == want)
            && seen.len() <= c.upstream.len();
        if got != c.statuses || !closed || !upstream_ok {
            failures.push(format!(
                "{}: statuses {got:?} (want {:?}), closed {closed}, upstream saw {seen:?} (may see {:?})",
                c.name, c.statuses, c.upstream
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Across the whole corpus, not just the last case.
    assert!(
        !everything.iter().any(|s| s.contains("smuggled")),
        "a smuggled request reached the upstream: {everything:?}"
    );
    agent.stop().await;
}
