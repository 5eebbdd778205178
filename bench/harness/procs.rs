//! Processes the harness starts: each is pinned with taskset, killed when dropped, and read from /proc for its
//! CPU time and resident memory.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which cores a process may run on: the proxies get core 0, the load generator and the backend the others.
#[derive(Clone, Copy, Debug)]
pub enum Cores {
    Proxy,
    Load,
    All,
}

impl Cores {
    pub fn list(self) -> String {
        let n = cores();
        match self {
            Cores::Proxy => "0".to_string(),
            Cores::Load if n > 1 => format!("1-{}", n - 1),
            Cores::Load => "0".to_string(),
            Cores::All => format!("0-{}", n - 1),
        }
    }
}

/// The machine's online cores (not this process's affinity: bench/run keeps the harness off core 0).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .map(|list| {
                // "0-1", "0-3,6,8-9"
                list.trim()
                    .split(',')
                    .map(|part| match part.split_once('-') {
                        Some((a, b)) => (b.parse::<usize>().unwrap_or(0) + 1)
                            .saturating_sub(a.parse::<usize>().unwrap_or(0)),
                        None => 1,
                    })
                    .sum::<usize>()
            })
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// A running process, killed (SIGTERM, then SIGKILL after 5 s) when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `program args` on `cores`, with `env` added, its output to `log`.
    pub fn start(
        name: &str,
        cores: Cores,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(cores.list()).arg(program).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", program.display()))?;
        Ok(Proc { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, and waits for the exit (SIGKILL after `grace`).
    pub fn stop(mut self, grace: Duration) {
        self.terminate(grace);
    }

    fn terminate(&mut self, grace: Duration) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

/// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / clock_ticks()
}

pub fn rss_mib(pid: u32) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_listening(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr} after {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
