//! `meshd status`: members and services as aligned tables, read from the admin API.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::Value;

/// Lays out rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 || then_ms > now_ms {
        return "-".into();
    }
    let s = (now_ms - then_ms) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The whole report from `/v1/members` and `/v1/services`.
pub fn render(members: &Value, services: &Value, now_ms: u64) -> String {
    let mut out = String::new();
    let node = s(&members["node"]);
    if members["gossip"] == Value::Bool(true) {
        let joined = if members["joined"] == Value::Bool(true) {
            "joined"
        } else {
            "not joined"
        };
        out.push_str(&format!(
            "node {node} ({joined}), gossip {}, inbound {}\n\n",
            s(&members["self"]["gossip_addr"]),
            s(&members["self"]["inbound_addr"])
        ));
        let rows: Vec<Vec<String>> = members["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        vec![
                            s(&m["name"]),
                            s(&m["state"]),
                            s(&m["gossip_addr"]),
                            s(&m["inbound_addr"]),
                            s(&m["endpoints"]),
                            s(&m["generation"]),
                            ago(now_ms, m["last_change_ms"].as_u64().unwrap_or(0)),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        if rows.is_empty() {
            out.push_str("no other members\n");
        } else {
            out.push_str(&table(
                &[
                    "MEMBER",
                    "STATE",
                    "GOSSIP",
                    "INBOUND",
                    "ENDPOINTS",
                    "GENERATION",
                    "CHANGED",
                ],
                &rows,
            ));
        }
    } else {
        out.push_str(&format!("node {node} (no [gossip]: a one-host mesh)\n"));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = services["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|svc| {
                    let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
                    let local = eps
                        .iter()
                        .filter(|e| e["local"] == Value::Bool(true))
                        .count();
                    let ejected = eps.iter().filter(|e| e["health"] == "ejected").count();
                    let mut nodes: Vec<String> = eps.iter().map(|e| s(&e["node"])).collect();
                    nodes.sort();
                    nodes.dedup();
                    vec![
                        s(&svc["name"]),
                        eps.len().to_string(),
                        local.to_string(),
                        (eps.len() - local).to_string(),
                        ejected.to_string(),
                        s(&svc["load_balancer"]),
                        if nodes.is_empty() {
                            "-".into()
                        } else {
                            nodes.join(",")
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        out.push_str("no services\n");
    } else {
        out.push_str(&table(
            &[
                "SERVICE",
                "ENDPOINTS",
                "LOCAL",
                "REMOTE",
                "EJECTED",
                "BALANCER",
                "NODES",
            ],
            &rows,
        ));
    }
    out
}

pub fn run(admin: SocketAddr) -> ExitCode {
    let fetch = |path: &str| -> Result<Value, String> {
        let (status, body) =
            super::admin_get(admin, path).map_err(|e| format!("cannot reach {admin}: {e}"))?;
        if status != 200 {
            return Err(format!("{admin}{path} answered {status}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{admin}{path}: not JSON: {e}"))
    };
    match (fetch("/v1/members"), fetch("/v1/services")) {
        (Ok(m), Ok(s)) => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            print!("{}", render(&m, &s, now_ms));
            ExitCode::SUCCESS
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("meshd status: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_aligned_tables() {
        let members = json!({
            "node": "a", "gossip": true, "joined": true,
            "self": {"gossip_addr": "10.0.0.1:4145", "inbound_addr": "10.0.0.1:4143"},
            "members": [
                {"name": "b", "state": "alive", "gossip_addr": "10.0.0.2:4145", "inbound_addr": "10.0.0.2:4143",
                 "endpoints": 3, "generation": 17, "last_change_ms": 95_000},
                {"name": "longer-name", "state": "down", "gossip_addr": "10.0.0.3:4145",
                 "inbound_addr": "10.0.0.3:4143", "endpoints": 0, "generation": 5, "last_change_ms": 0},
            ]
        });
        let services = json!({"services": [
            {"name": "users", "load_balancer": "p2c-ewma", "endpoints": [
                {"node": "a", "local": true, "health": "healthy"},
                {"node": "b", "local": false, "health": "ejected"}]},
        ]});
        let out = render(&members, &services, 100_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "node a (joined), gossip 10.0.0.1:4145, inbound 10.0.0.1:4143"
        );
        assert!(lines[2].starts_with("MEMBER       STATE  GOSSIP"), "{out}");
        assert!(
            lines[3].starts_with("b            alive  10.0.0.2:4145"),
            "{out}"
        );
        assert!(lines[3].ends_with("5s ago"), "{out}");
        assert!(lines[4].starts_with("longer-name  down "), "{out}");
        assert!(
            out.contains("users    2          1      1       1        p2c-ewma  a,b"),
            "{out}"
        );
    }
}
