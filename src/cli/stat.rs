//! `meshd stat`: per-service golden signals from a running agent's `/v1/stats`, as a table that refreshes in
//! place (like `linkerd viz stat`), once (`--once`), or as the raw JSON (`--json`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::status::table;

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x < 10.0 => format!("{x:.1}ms"),
        Some(x) if x < 10_000.0 => format!("{x:.0}ms"),
        Some(x) => format!("{:.1}s", x / 1000.0),
        None => "-".into(),
    }
}

/// The table for one `/v1/stats` answer.
pub fn render(stats: &Value) -> String {
    let rows: Vec<Vec<String>> = stats["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    vec![
                        f["service"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .unwrap_or("(none)")
                            .to_string(),
                        f["direction"].as_str().unwrap_or("-").to_string(),
                        format!("{:.1}", f["rps"].as_f64().unwrap_or(0.0)),
                        f["success_rate"]
                            .as_f64()
                            .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
                        ms(&f["p50_ms"]),
                        ms(&f["p95_ms"]),
                        ms(&f["p99_ms"]),
                        match (f["breakers_open"].as_u64(), f["endpoints"].as_u64()) {
                            (Some(open), Some(all)) => format!("{open}/{all}"),
                            _ => "-".into(),
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!(
        "node {} — last {}s\n",
        stats["node"].as_str().unwrap_or("-"),
        stats["window_seconds"].as_u64().unwrap_or(0)
    );
    if rows.is_empty() {
        out.push_str("no requests yet\n");
    } else {
        out.push_str(&table(
            &[
                "SERVICE",
                "DIRECTION",
                "RPS",
                "SUCCESS",
                "P50",
                "P95",
                "P99",
                "BREAKERS",
            ],
            &rows,
        ));
    }
    out
}

fn fetch(admin: SocketAddr, window: &str) -> Result<Value, String> {
    let path = format!("/v1/stats?window={window}");
    let (status, body) =
        super::admin_get(admin, &path).map_err(|e| format!("cannot reach {admin}: {e}"))?;
    if status != 200 {
        return Err(format!("{admin}{path} answered {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("{admin}{path}: not JSON: {e}"))
}

pub fn run(admin: SocketAddr, window: &str, once: bool, json: bool, every: Duration) -> ExitCode {
    loop {
        match fetch(admin, window) {
            Ok(v) if json => {
                println!("{v}");
                return ExitCode::SUCCESS;
            }
            Ok(v) if once => {
                print!("{}", render(&v));
                return ExitCode::SUCCESS;
            }
            // Clear the screen and draw again in place.
            Ok(v) => print!("\x1b[2J\x1b[H{}", render(&v)),
            Err(e) => {
                eprintln!("meshd stat: {e}");
                return ExitCode::FAILURE;
            }
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_rates_percentages_and_breakers() {
        let v = json!({"node": "a", "window_seconds": 30, "services": [
            {"service": "users", "direction": "outbound", "rps": 12.345, "success_rate": 0.9876,
             "p50_ms": 1.234, "p95_ms": 45.6, "p99_ms": 12345.0, "breakers_open": 1, "endpoints": 3},
            {"service": "", "direction": "outbound", "rps": 0.1, "success_rate": null,
             "p50_ms": null, "p95_ms": null, "p99_ms": null},
        ]});
        let out = render(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "node a — last 30s");
        assert!(
            lines[1].starts_with("SERVICE  DIRECTION  RPS   SUCCESS"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("users    outbound   12.3  98.76%   1.2ms  46ms  12.3s  1/3"),
            "{out}"
        );
        assert!(
            lines[3].starts_with("(none)   outbound   0.1   -        -      -     -      -"),
            "{out}"
        );
        assert_eq!(
            render(&json!({"node": "a", "window_seconds": 5, "services": []}))
                .lines()
                .nth(1),
            Some("no requests yet")
        );
    }
}
