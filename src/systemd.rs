//! systemd's notify protocol for `meshd run` under `Type=notify` (systemd/meshd.service): `READY=1` once the
//! agent can serve, `RELOADING=1` with `MONOTONIC_USEC` around each reload, `STOPPING=1` when the drain
//! begins, `STATUS=` lines for `systemctl status`, and `WATCHDOG=1` pings while the agent's own tasks are alive.
//!
//! Everything here is a no-op when systemd did not start the agent (no `$NOTIFY_SOCKET`): the same binary runs
//! under docker, compose and by hand.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// How long `READY=1` waits for discovery and gossip before it is sent anyway with a degraded status. Below
/// the unit's `TimeoutStartSec` (90 s), so a host whose Docker socket is gone still starts and serves what it
/// knows instead of being killed and restarted in a loop.
pub const READY_NOTIFY_LIMIT: Duration = Duration::from_secs(60);

/// Sends notifications when systemd asked for them. Clones share whether `READY=1` was sent: a reload before
/// that (an early `POST /v1/reload`) must not announce readiness.
#[derive(Clone, Debug)]
pub struct Notifier {
    enabled: bool,
    ready_sent: Arc<AtomicBool>,
}

impl Notifier {
    /// From the environment: enabled when `$NOTIFY_SOCKET` is set.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            ready_sent: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn ready(&self, status: &str) {
        self.ready_sent.store(true, Ordering::SeqCst);
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// A reload begins: systemd shows the unit as `reloading` until [`Notifier::reloaded`].
    pub fn reloading(&self) {
        if !self.ready_sent.load(Ordering::SeqCst) {
            return;
        }
        let mut states = vec![NotifyState::Reloading];
        // systemd 253+ wants the reload's start time with it; without it older ones still accept RELOADING=1.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    /// The reload is over (applied or refused): back to `active`, with the outcome as the status line.
    pub fn reloaded(&self, status: &str) {
        if self.ready_sent.load(Ordering::SeqCst) {
            self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// A status is one line of the protocol: newlines in it (a reload's list of problems) would end it early.
fn one_line(s: &str) -> String {
    let mut line: String = s
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if line.len() > 400 {
        let mut end = 400;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// The ping interval systemd asked for (`WatchdogSec=` → `$WATCHDOG_USEC`): half the timeout, as sd_watchdog_enabled(3) advises.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    // WATCHDOG_PID, when set, names the process the pings are for.
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog every `interval` while `alive` says the agent works. A wedged runtime never gets here
/// to ping; while a subsystem is down (`alive` says why) or the probe hangs, no ping goes out, so a failure
/// that lasts `WatchdogSec` makes systemd restart the agent, and a passing hiccup does not.
pub async fn watchdog<F, Fut>(
    notifier: &Notifier,
    interval: Duration,
    mut alive: F,
    stop: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The probe may not take longer than the interval: a probe that hangs counts as a failure.
        let result = tokio::time::timeout(interval, alive())
            .await
            .unwrap_or_else(|_| Err("the health probe took longer than the ping interval".into()));
        match result {
            Ok(()) => {
                if failing {
                    failing = false;
                    tracing::info!("watchdog: the agent is healthy again");
                    notifier.status("serving");
                }
                notifier.watchdog();
            }
            Err(why) => {
                if !failing {
                    failing = true;
                    tracing::error!(%why, "watchdog: no ping while this lasts; systemd restarts meshd after WatchdogSec");
                    notifier.status(&format!("failing: {why}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The protocol end to end (READY, RELOADING, WATCHDOG, STOPPING from a running agent) is tested with the real
    // binary in tests/systemd_notify.rs, which can give the child its own $NOTIFY_SOCKET.

    #[test]
    fn a_status_is_one_bounded_line() {
        assert_eq!(
            one_line("refused:\n  a.b: bad\n\n  c: worse\n"),
            "refused:; a.b: bad; c: worse"
        );
        let long = "é".repeat(300);
        let cut = one_line(&long);
        assert!(cut.len() <= 404 && cut.ends_with('…'), "{}", cut.len());
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        let n = Notifier {
            enabled: false,
            ready_sent: Arc::new(AtomicBool::new(false)),
        };
        n.ready("serving");
        n.reloading();
        assert!(n.ready_sent.load(Ordering::SeqCst));
    }
}
