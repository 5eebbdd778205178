//! `meshd tap SERVICE`: the agent's request summaries for one service as they happen, from `/v1/tap` (a stream
//! of JSON lines), one line each: time, direction, method, path (no query), status, latency, endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// One summary as a line for people.
pub fn line(v: &Value) -> String {
    if let Some(n) = v["skipped"].as_u64() {
        return format!("… {n} requests skipped (this terminal read too slowly)");
    }
    let time = v["time"].as_str().unwrap_or("-");
    // 2026-12-07T01:02:03.456Z → 01:02:03.456
    let clock = time.get(11..23).unwrap_or(time);
    let mut out = format!(
        "{clock} {:<8} {:<6} {:<30} {:>3} {:>9} -> {}",
        v["direction"].as_str().unwrap_or("-"),
        v["method"].as_str().unwrap_or("-"),
        v["path"].as_str().unwrap_or("-"),
        v["status"].as_u64().unwrap_or(0),
        format!("{:.1}ms", v["duration_ms"].as_f64().unwrap_or(0.0)),
        v["endpoint"].as_str().unwrap_or("-"),
    );
    if let Some(g) = v["grpc_status"].as_i64() {
        out.push_str(&format!(" grpc-status={g}"));
    }
    if let Some(r) = v["retries"].as_u64().filter(|r| *r > 0) {
        out.push_str(&format!(" retries={r}"));
    }
    if let Some(e) = v["mesh_error"].as_str() {
        out.push_str(&format!(" mesh-error={e}"));
    }
    out
}

/// Reads a chunked HTTP/1.1 body as it arrives and hands each complete line to `each`; stops when `each`
/// returns false or the body ends.
fn each_line(r: &mut impl BufRead, mut each: impl FnMut(&str) -> bool) -> std::io::Result<()> {
    let mut pending = Vec::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            return Ok(());
        }
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad chunk",
            ));
        };
        if n == 0 {
            return Ok(());
        }
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk)?;
        chunk.truncate(n);
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if !each(String::from_utf8_lossy(&line).trim_end()) {
                return Ok(());
            }
        }
    }
}

pub fn run(
    admin: SocketAddr,
    service: &str,
    direction: Option<&str>,
    json: bool,
    count: Option<u64>,
) -> ExitCode {
    let tap = || -> Result<(), String> {
        let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(3))
            .map_err(|e| format!("cannot reach {admin}: {e}"))?;
        let mut path = format!("/v1/tap?service={}", percent(service));
        if let Some(d) = direction {
            path.push_str(&format!("&direction={}", percent(d)));
        }
        write!(s, "GET {path} HTTP/1.1\r\nHost: {admin}\r\n\r\n")
            .map_err(|e| format!("{admin}: {e}"))?;
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status)
            .map_err(|e| format!("{admin}: {e}"))?;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).map_err(|e| format!("{admin}: {e}"))? <= 2 {
                break;
            }
        }
        if status.split(' ').nth(1) != Some("200") {
            let mut body = String::new();
            let _ = r.take(4096).read_to_string(&mut body);
            return Err(format!("{admin}{path}: {} {}", status.trim(), body.trim()));
        }
        eprintln!("tapping {service} on {admin} (Ctrl-C stops)");
        let mut seen = 0;
        let stdout = std::io::stdout();
        each_line(&mut r, |l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                return true;
            };
            let text = if json { l.to_string() } else { line(&v) };
            let mut out = stdout.lock();
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                return false;
            }
            if v["skipped"].is_null() {
                seen += 1;
            }
            count.is_none_or(|c| seen < c)
        })
        .map_err(|e| format!("{admin}: the stream broke: {e}"))
    };
    match tap() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd tap: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Percent-encodes what a service name or direction could hold that a query string cannot.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_summary_is_one_readable_line() {
        let v = json!({"time": "2026-12-07T01:02:03.456Z", "direction": "outbound", "method": "GET",
            "path": "/users/7", "status": 503, "duration_ms": 12.34, "endpoint": "10.0.0.2:8080",
            "retries": 2, "mesh_error": "upstream-failed"});
        assert_eq!(
            line(&v),
            "01:02:03.456 outbound GET    /users/7                       503    12.3ms -> 10.0.0.2:8080 retries=2 mesh-error=upstream-failed"
        );
        assert!(line(&json!({"skipped": 5})).contains("5 requests skipped"));
    }

    #[test]
    fn chunked_lines_are_split_across_chunks() {
        let body = b"5\r\n{\"a\":\r\n4\r\n1}\n{\r\n6\r\n\"b\":2}\r\n1\r\n\n\r\n0\r\n\r\n";
        let mut got = Vec::new();
        each_line(&mut &body[..], |l| {
            got.push(l.to_string());
            true
        })
        .unwrap();
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(percent("a b/c"), "a%20b%2Fc");
    }
}
