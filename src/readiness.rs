//! Readiness: a set of tokens, one per subsystem that must finish starting before `/ready` answers 200.
//!
//! A subsystem takes a [`ReadyToken`] while it is being built and drops it (or calls [`ReadyToken::ready`]) once
//! it can serve. Nothing here knows about the admin API: the admin server only reads [`Readiness::is_ready`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Ready once every subsystem has given back its token, and not while draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: AtomicUsize,
    draining: AtomicBool,
    /// Woken when the last token comes back.
    all_back: tokio::sync::Notify,
}

/// Held by a subsystem until it is ready; dropping it (or calling `ready`) marks it ready.
#[derive(Debug)]
pub struct ReadyToken(Arc<Readiness>);

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Readiness::default())
    }

    pub fn token(self: &Arc<Self>) -> ReadyToken {
        self.pending.fetch_add(1, Ordering::SeqCst);
        ReadyToken(self.clone())
    }

    /// Shutdown has begun: not ready from now on, whatever the tokens say.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0 && !self.draining.load(Ordering::SeqCst)
    }

    /// Resolves once every token is back (at once if they are).
    pub async fn wait(&self) {
        loop {
            let back = self.all_back.notified();
            tokio::pin!(back);
            back.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            back.await;
        }
    }
}

impl ReadyToken {
    pub fn ready(self) {}
}

impl Drop for ReadyToken {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_back.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_token_is_back_and_not_draining() {
        let r = Readiness::new();
        let a = r.token();
        let b = r.token();
        assert!(!r.is_ready());
        a.ready();
        assert!(!r.is_ready(), "one token still out");
        drop(b);
        assert!(r.is_ready());
        r.set_draining();
        assert!(!r.is_ready());
    }

    #[tokio::test]
    async fn wait_resolves_when_the_last_token_comes_back() {
        let r = Readiness::new();
        let a = r.token();
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        r.wait().await;
    }
}
