//! Shutdown: the first SIGTERM/SIGINT starts a graceful drain (stop accepting, let in-flight requests finish
//! until `node.drain_timeout`), a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};

/// Exit status when a second signal cuts the drain short.
pub const EXIT_FORCED: i32 = 130;

/// Waits for SIGTERM or SIGINT and returns its name.
pub async fn signal_received() -> &'static str {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The shutdown trigger for `meshd run`: resolves on the first signal, and arranges for a second signal to
/// end the process immediately.
pub async fn on_signal() {
    let name = signal_received().await;
    tracing::info!(
        signal = name,
        "shutting down: draining in-flight requests (send again to exit now)"
    );
    tokio::spawn(async {
        let name = signal_received().await;
        tracing::warn!(
            signal = name,
            "second signal: exiting without waiting for the drain"
        );
        std::process::exit(EXIT_FORCED);
    });
}
