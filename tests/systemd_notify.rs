//! `meshd run` under systemd's notify protocol, with the real binary and a real notify socket given to it as
//! `$NOTIFY_SOCKET` (what `Type=notify` does): READY=1 once it serves, WATCHDOG=1 at half of `$WATCHDOG_USEC`,
//! RELOADING=1 + MONOTONIC_USEC and READY=1 again around a SIGHUP (applied or refused), STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(agent: &Agent, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &agent.0.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig}");
}

/// Datagrams from the agent, each one notification (several `KEY=VALUE` lines).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification within the timeout: {e}"),
    }
}

/// Reads until a notification other than a watchdog ping arrives; counts the pings on the way.
fn next_state(socket: &UnixDatagram, pings: &mut u32) -> String {
    loop {
        let m = next(socket);
        if m == "WATCHDOG=1\n" {
            *pings += 1;
        } else {
            return m;
        }
    }
}

const CONFIG: &str = "[node]\nname = \"notify-test\"\ndrain_timeout = \"1s\"\n\
[outbound]\nlisten = [\"127.0.0.1:0\"]\n[inbound]\nlisten = \"127.0.0.1:0\"\ninsecure_plaintext = true\n\
[admin]\nlisten = \"127.0.0.1:0\"\n[discovery.docker]\nenabled = false\n\
[[discovery.static]]\nservice = \"hello\"\nendpoints = [\"127.0.0.1:9\"]\n";

#[test]
fn ready_watchdog_reload_and_stop_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = dir.path().join("meshd.toml");
    std::fs::write(&config, CONFIG).unwrap();

    let agent = Agent(
        Command::new(MESHD)
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            // WatchdogSec=1s: pings every 500 ms.
            .env("WATCHDOG_USEC", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut pings = 0;
    let ready = next_state(&socket, &mut pings);
    assert_eq!(ready, "READY=1\nSTATUS=serving\n");

    // Pings keep coming while it serves.
    for _ in 0..3 {
        assert_eq!(next(&socket), "WATCHDOG=1\n", "unexpected notification");
    }

    // A good reload: RELOADING=1 with the time it began, then READY=1 with what changed.
    std::fs::write(&config, CONFIG.replace("127.0.0.1:9", "127.0.0.1:10")).unwrap();
    signal(&agent, "-HUP");
    let reloading = next_state(&socket, &mut pings);
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|r| r.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec > 0);
    let reloaded = next_state(&socket, &mut pings);
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=serving; configuration reloaded"),
        "{reloaded:?}"
    );

    // A refused reload: still READY=1 (the old config serves on), and the status says why.
    std::fs::write(
        &config,
        format!("{CONFIG}\n[defaults]\ntimeout = \"soon\"\n"),
    )
    .unwrap();
    signal(&agent, "-HUP");
    assert!(next_state(&socket, &mut pings).starts_with("RELOADING=1\n"));
    let refused = next_state(&socket, &mut pings);
    assert!(
        refused.starts_with("READY=1\nSTATUS=serving; the last reload was refused")
            && refused.contains("defaults.timeout")
            && refused.matches('\n').count() == 2,
        "{refused:?}"
    );

    signal(&agent, "-TERM");
    assert_eq!(
        next_state(&socket, &mut pings),
        "STOPPING=1\nSTATUS=draining\n"
    );
    let mut agent = agent;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "meshd did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
