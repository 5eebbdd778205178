//! Upgraded connections (WebSocket and other `Connection: Upgrade` protocols): bytes copied both ways until
//! either side closes, nothing moves for the idle timeout, or the drain deadline passes on shutdown.
//!
//! Once hyper hands over an upgraded connection it no longer tracks it, so [`Tunnels`] does: every tunnel is a
//! task in its tracker, counted in `meshd_upgraded_connections`, and shutdown waits for them like for any
//! in-flight request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::metrics::TunnelMetrics;

/// Buffer per direction.
const BUF: usize = 16 * 1024;

/// The tunnels of one listener.
#[derive(Clone)]
pub struct Tunnels {
    tracker: TaskTracker,
    force: CancellationToken,
    metrics: TunnelMetrics,
    direction: &'static str,
}

/// Why a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// The drain deadline passed.
    Shutdown,
    /// Reading or writing failed.
    Error,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::Shutdown => "shutdown",
            End::Error => "error",
        }
    }
}

impl Tunnels {
    pub fn new(metrics: TunnelMetrics, direction: &'static str) -> Self {
        Tunnels {
            tracker: TaskTracker::new(),
            force: CancellationToken::new(),
            metrics,
            direction,
        }
    }

    /// The result of an upgrade request, for `meshd_upgrades_total`.
    pub fn count(&self, result: &str) {
        self.metrics.attempted(self.direction, result);
    }

    /// Joins `client` and `upstream` once both upgrades complete. `hold` (a pooled HTTP/2 stream's lease) is
    /// kept until the tunnel ends.
    pub fn spawn<H: Send + 'static>(
        &self,
        client: OnUpgrade,
        upstream: OnUpgrade,
        hold: H,
        idle: Duration,
    ) {
        let force = self.force.clone();
        let metrics = self.metrics.clone();
        let direction = self.direction;
        self.tracker.spawn(async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    metrics.ended(direction, End::Error.as_str());
                    return;
                }
            };
            let open = metrics.open(direction);
            let end = pipe(TokioIo::new(client), TokioIo::new(upstream), idle, &force).await;
            drop(open);
            drop(hold);
            tracing::debug!(end = end.as_str(), "upgraded connection ended");
            metrics.ended(direction, end.as_str());
        });
    }

    /// Open tunnels.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Lets open tunnels carry on until `deadline`, then closes them; returns once all are gone.
    pub async fn drain(&self, deadline: Instant) {
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tracker.len(),
                "drain deadline passed with upgraded connections open; closing them"
            );
            self.force.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Copies both ways until both sides have closed, neither has sent anything for `idle`, or `stop` fires.
pub async fn pipe<A, B>(a: A, b: B, idle: Duration, stop: &CancellationToken) -> End
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte either way.
    let last = Arc::new(AtomicU64::new(0));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let copy = async {
        let (x, y) = tokio::join!(one_way(ar, bw, &last, start), one_way(br, aw, &last, start));
        if x.is_ok() && y.is_ok() {
            End::Closed
        } else {
            End::Error
        }
    };
    let watchdog = async {
        loop {
            let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    tokio::select! {
        end = copy => end,
        _ = watchdog => End::Idle,
        _ = stop.cancelled() => End::Shutdown,
    }
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on: the other side may still send.
            to.shutdown().await?;
            return Ok(());
        }
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move { pipe(a, b, Duration::from_secs(5), &stop).await });
        a_peer.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b_peer.write_all(b"pong").await.unwrap();
        a_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        a_peer.shutdown().await.unwrap();
        assert_eq!(
            b_peer.read(&mut got).await.unwrap(),
            0,
            "half-close passed on"
        );
        b_peer.write_all(b"late").await.unwrap();
        a_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"late");
        b_peer.shutdown().await.unwrap();
        assert_eq!(task.await.unwrap(), End::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_are_closed() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move { pipe(a, b, Duration::from_secs(30), &stop).await });
        tokio::time::sleep(Duration::from_secs(20)).await;
        a_peer.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!task.is_finished(), "activity 20 s ago keeps it open");
        assert_eq!(task.await.unwrap(), End::Idle);
    }
}
