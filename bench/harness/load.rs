//! The load generator: `oha`, run on the load cores, open-loop at a fixed rate (its latency correction counts
//! a request from when it was due, not from when it could be sent) or closed-loop for maximum throughput.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::targets::Proto;

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Requests answered per second over the run.
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Requests answered with a 2xx.
    pub ok: u64,
    /// Requests that failed or were answered with anything else.
    pub failed: u64,
}

pub struct Oha {
    pub bin: PathBuf,
    /// The gRPC request body: one length-prefixed message.
    pub grpc_body: PathBuf,
    pub cores: String,
}

pub enum Shape {
    /// Open loop: `rate` requests per second.
    Rate(u32),
    /// Closed loop: as fast as the connections allow.
    Max,
    /// `n` requests one after another on one connection (for callgrind).
    Sequential(u64),
}

impl Oha {
    /// Runs one load against `addr` with the `proto`'s service name as the authority.
    pub fn run(
        &self,
        addr: SocketAddr,
        proto: Proto,
        shape: Shape,
        duration: Duration,
    ) -> Result<Figures, String> {
        let url = format!("http://{}:{}/", proto.service(), addr.port());
        let connect_to = format!(
            "{}:{}:{}:{}",
            proto.service(),
            addr.port(),
            addr.ip(),
            addr.port()
        );
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(&self.cores).arg(&self.bin);
        cmd.args([
            "--no-tui",
            "--output-format",
            "json",
            "--connect-to",
            &connect_to,
        ]);
        // Connections: enough that a slow answer never holds back the next request at 20k/s.
        let (conns, streams) = match (proto, &shape) {
            (_, Shape::Sequential(_)) => (1, 1),
            (Proto::H1, _) => (32, 1),
            (Proto::H2c | Proto::Grpc, _) => (4, 16),
        };
        // Requests still in flight at the deadline are waited for, not counted as errors.
        cmd.arg("-w");
        match shape {
            Shape::Rate(rate) => {
                cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
                cmd.args(["-z", &format!("{}ms", duration.as_millis())]);
                cmd.args(["-c", &conns.to_string()]);
            }
            Shape::Max => {
                cmd.args(["-z", &format!("{}ms", duration.as_millis())]);
                cmd.args(["-c", &(conns * 2).to_string()]);
            }
            Shape::Sequential(n) => {
                cmd.args(["-n", &n.to_string(), "-c", "1"]);
            }
        }
        match proto {
            Proto::H1 => {}
            Proto::H2c => {
                cmd.args(["--http2", "-p", &streams.to_string()]);
            }
            Proto::Grpc => {
                cmd.args(["--http2", "-p", &streams.to_string(), "-m", "POST"]);
                cmd.args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
                cmd.arg("-D").arg(&self.grpc_body);
            }
        }
        cmd.arg(&url);
        let out = cmd.output().map_err(|e| format!("running oha: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "oha failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse(&out.stdout)
    }
}

/// Reads oha's JSON summary.
fn parse(json: &[u8]) -> Result<Figures, String> {
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("oha's output: {e}"))?;
    let us = |p: &str| -> f64 { v["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1e6 };
    let codes = v["statusCodeDistribution"].as_object();
    let mut ok = 0u64;
    let mut failed = 0u64;
    for (code, n) in codes.into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if code.starts_with('2') {
            ok += n;
        } else {
            failed += n;
        }
    }
    // On HTTP/2 oha cuts the requests in flight at the deadline: those are not failures.
    if let Some(errors) = v["errorDistribution"].as_object() {
        failed += errors
            .iter()
            .filter(|(what, _)| what.as_str() != "aborted due to deadline")
            .filter_map(|(_, n)| n.as_u64())
            .sum::<u64>();
    }
    let seconds = v["summary"]["total"].as_f64().unwrap_or(0.0);
    Ok(Figures {
        rps: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_us: us("p50"),
        p99_us: us("p99"),
        p999_us: us("p99.9"),
        ok,
        failed,
    })
}

pub fn grpc_body(dir: &Path) -> Result<PathBuf, String> {
    // A message of 16 bytes behind gRPC's 5-byte prefix (not compressed, length 16).
    let mut body = vec![0u8, 0, 0, 0, 16];
    body.extend_from_slice(b"bench-request-16");
    let path = dir.join("grpc-request.bin");
    std::fs::write(&path, body).map_err(|e| e.to_string())?;
    Ok(path)
}
