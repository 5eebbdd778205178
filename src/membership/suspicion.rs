//! Failure detection beyond plain SWIM: suspicion that shortens as independent confirmations arrive
//! (Lifeguard's dynamic suspicion), and the direct checks that produce them.
//!
//! In foca, the member whose probe of X failed (direct ping, then `num_indirect_probes` ping-requests) marks X
//! suspect, tells the cluster, and starts the timer that declares X down after `suspect_to_down_after` unless X
//! refutes first. Everyone else learns of the suspicion, and of the "down" that ends it, from gossip: that
//! one timer decides how fast a crash is seen. Here the prober also asks [`CHECKERS`] random members to check X
//! directly, each with up to [`CHECK_TRIES`] sealed control datagrams. A live X answers and, learning that it
//! is suspected, refutes at once (Lifeguard's "buddy system") and tells the prober so directly. A checker that
//! gets no answer sends the prober a vote, and each vote from a checker it asked shortens the prober's timer:
//!
//! `timeout(C) = max(min, max − (max − min) · ln(C + 1) / ln(K + 1))`, C votes, K = [`CONFIRMATIONS`],
//!
//! with `max = suspect_to_down_after` and `min = 3/8 · max`. On a lossy link a check of a live member fails
//! only when all its round trips are lost (at 10 % loss, under 1 % of checks), so the timer of a false
//! suspicion is rarely shortened, and then by one vote; a crashed member gets every vote and is declared down at
//! the minimum. The price is paid by a member that stops answering altogether — a stalled process: it is
//! declared down after about `probe_period + min` of silence (`lan`: 3 s) instead of `probe_period + max`
//! (5.5 s). One that resumes before then answers the queued checks, and its direct word to the prober refutes
//! in time.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use foca::{Incarnation, Timer};
use serde::{Deserialize, Serialize};

use super::identity::NodeId;

/// Members a prober asks to check a suspect.
pub const CHECKERS: usize = 4;
/// Check datagrams sent before a checker gives up and votes.
pub const CHECK_TRIES: u8 = 3;

/// Time between check datagrams, and when the check expires after the first: half and 1.6 times the profile's
/// `probe_rtt` (`lan`: 250 ms and 800 ms, well above a 500 ms stall of the suspect, whose answer comes when it
/// resumes; `wan`: 1.5 s and 4.8 s).
pub fn check_timing(probe_rtt: Duration) -> (Duration, Duration) {
    (probe_rtt / 2, probe_rtt * 8 / 5)
}
/// Votes after which a suspicion runs for the shortest time.
pub const CONFIRMATIONS: usize = 3;
/// Checks run at once for other members; requests beyond that are ignored.
pub const MAX_CHECKS: usize = 256;
/// Suspicions tracked at once; beyond that, new ones run their full time.
const MAX_TRACKED: usize = 4096;

/// First byte of a sealed payload that is a control message, not a foca message: those start with the
/// length of the sender's node name, never empty.
pub const TAG: u8 = 0;

/// The control messages of a direct check, sealed like every gossip datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// From a prober to a checker: "check `target`, suspected at `incarnation`, and tell me".
    CheckRequest {
        nonce: u64,
        from: NodeId,
        target: NodeId,
        incarnation: Incarnation,
    },
    /// From a checker to the suspect: "`prober` suspects you at `incarnation`", answered to `from`.
    Check {
        nonce: u64,
        from: NodeId,
        prober: NodeId,
        target: NodeId,
        incarnation: Incarnation,
    },
    /// From the suspect to the checker.
    Reply { nonce: u64 },
    /// From the suspect to the prober, after it refuted: alive at `incarnation` (above the suspected one), so
    /// a suspect that was stalled refutes in time even when gossip is slow to carry it.
    Alive {
        from: NodeId,
        incarnation: Incarnation,
    },
    /// From a checker to the prober: `target` did not answer the check the prober asked for with `nonce`.
    Vote {
        nonce: u64,
        from: NodeId,
        target: NodeId,
        incarnation: Incarnation,
    },
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![TAG];
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// `None`: not a control message (no tag).
    pub fn decode(data: &[u8]) -> Option<Result<Control, &'static str>> {
        let rest = data.strip_prefix(&[TAG])?;
        Some(postcard::from_bytes(rest).map_err(|_| "undecodable control message"))
    }
}

/// This agent's suspicion timers, with the votes on them.
#[derive(Debug)]
pub struct Suspicions {
    max: Duration,
    min: Duration,
    entries: HashMap<(NodeId, Incarnation), Entry>,
}

#[derive(Debug)]
struct Entry {
    started: Duration,
    timer: Timer<NodeId>,
    /// The earliest time a copy of the timer is due.
    due: Duration,
    /// Nonces of the check requests sent; a vote must carry one, and counts once.
    asked: Vec<u64>,
    voted: BTreeSet<u64>,
}

impl Suspicions {
    pub fn new(max: Duration) -> Suspicions {
        Suspicions {
            max,
            min: max * 3 / 8,
            entries: HashMap::new(),
        }
    }

    /// How long a suspicion with `votes` distinct votes runs.
    pub fn timeout(&self, votes: usize) -> Duration {
        let c = votes as f64;
        let k = CONFIRMATIONS as f64;
        let cut = (self.max - self.min).as_secs_f64() * ((c + 1.0).ln() / (k + 1.0).ln());
        self.max
            .saturating_sub(Duration::from_secs_f64(cut))
            .max(self.min)
    }

    /// Whether this suspicion is being timed already (foca starts the timer again each time it probes a
    /// member that is still suspect).
    pub fn is_tracked(&self, target: &NodeId, incarnation: Incarnation) -> bool {
        self.entries.contains_key(&(target.clone(), incarnation))
    }

    /// foca started the suspicion timer `timer` (the member failed our probe), due `after` from now, and
    /// checks were requested with the nonces `asked`.
    pub fn started(
        &mut self,
        now: Duration,
        after: Duration,
        timer: &Timer<NodeId>,
        asked: Vec<u64>,
    ) {
        let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = timer
        else {
            return;
        };
        // Finished suspicions go; a flood of them cannot grow the map without bound.
        let horizon = self.max * 2;
        self.entries
            .retain(|_, e| now.saturating_sub(e.started) < horizon);
        if self.entries.len() >= MAX_TRACKED {
            return;
        }
        self.entries
            .entry((member_id.clone(), *incarnation))
            .or_insert(Entry {
                started: now,
                timer: timer.clone(),
                due: now + after,
                asked,
                voted: BTreeSet::new(),
            });
    }

    /// The checker asked with `nonce` found `target` silent at `incarnation`. Returns when to deliver the
    /// suspicion timer instead, if the vote brings it forward.
    pub fn vote(
        &mut self,
        now: Duration,
        nonce: u64,
        target: &NodeId,
        incarnation: Incarnation,
    ) -> Option<(Duration, Timer<NodeId>)> {
        let votes = {
            let e = self.entries.get_mut(&(target.clone(), incarnation))?;
            if !e.asked.contains(&nonce) || !e.voted.insert(nonce) {
                return None;
            }
            e.voted.len()
        };
        let timeout = self.timeout(votes);
        let e = self.entries.get_mut(&(target.clone(), incarnation))?;
        let at = (e.started + timeout).max(now);
        if e.due <= at {
            return None;
        }
        e.due = at;
        Some((at, e.timer.clone()))
    }

    /// Votes on a suspicion so far.
    pub fn votes(&self, target: &NodeId, incarnation: Incarnation) -> usize {
        self.entries
            .get(&(target.clone(), incarnation))
            .map_or(0, |e| e.voted.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn node(name: &str) -> NodeId {
        NodeId {
            name: Arc::from(name),
            addr: "10.0.0.1:4145".parse().unwrap(),
            inbound_port: 4143,
            generation: 7,
        }
    }

    fn timer() -> Timer<NodeId> {
        Timer::ChangeSuspectToDown {
            member_id: node("web-1"),
            incarnation: 2,
            token: 0,
        }
    }

    #[test]
    fn the_timeout_shrinks_with_votes_down_to_the_minimum() {
        let s = Suspicions::new(Duration::from_secs(4));
        let t: Vec<Duration> = (0..6).map(|c| s.timeout(c)).collect();
        assert_eq!(t[0], Duration::from_secs(4));
        assert!(t.windows(2).all(|w| w[1] <= w[0]), "{t:?}");
        assert_eq!(t[3], Duration::from_millis(1500));
        assert_eq!(t[5], Duration::from_millis(1500));
        assert!(t[1] > Duration::from_millis(2700) && t[1] < Duration::from_millis(2800));
    }

    #[test]
    fn votes_bring_the_timer_forward_once_per_asked_checker() {
        let mut s = Suspicions::new(Duration::from_secs(4));
        let t0 = Duration::from_secs(100);
        let web = node("web-1");
        assert!(s.vote(t0, 1, &web, 2).is_none(), "no suspicion yet");
        assert!(!s.is_tracked(&web, 2));
        s.started(t0, Duration::from_secs(4), &timer(), vec![1, 2, 3, 4]);
        assert!(s.is_tracked(&web, 2));
        let (at, fired) = s.vote(t0, 1, &web, 2).unwrap();
        assert_eq!(at, t0 + s.timeout(1));
        assert_eq!(fired, timer());
        assert!(s.vote(t0, 1, &web, 2).is_none(), "the same checker twice");
        assert!(s.vote(t0, 99, &web, 2).is_none(), "a checker nobody asked");
        let (at, _) = s.vote(t0, 2, &web, 2).unwrap();
        assert_eq!(at, t0 + s.timeout(2));
        // foca starting the timer again (it probed the suspect again) changes nothing.
        s.started(
            t0 + Duration::from_secs(1),
            Duration::from_secs(4),
            &timer(),
            vec![5, 6],
        );
        assert_eq!(s.votes(&web, 2), 2);
        // Late votes make the timer due at once, never in the past.
        let late = t0 + Duration::from_millis(1800);
        assert_eq!(s.vote(late, 3, &web, 2).unwrap().0, late);
        assert!(s.vote(late, 4, &web, 2).is_none(), "already due");
        assert_eq!(s.votes(&web, 2), 4);
        // A vote on another incarnation (the member refuted since) counts for nothing.
        assert!(s.vote(late, 1, &web, 3).is_none());
        // Neither does one on another run of the host.
        let mut old = web.clone();
        old.generation = 6;
        assert!(s.vote(late, 2, &old, 2).is_none());
        // Finished suspicions are forgotten once the next one starts.
        let mut next = timer();
        if let Timer::ChangeSuspectToDown { incarnation, .. } = &mut next {
            *incarnation = 5;
        }
        s.started(
            t0 + Duration::from_secs(60),
            Duration::from_secs(4),
            &next,
            vec![7],
        );
        assert!(!s.is_tracked(&web, 2));
    }

    #[test]
    fn control_messages_round_trip_and_junk_is_refused() {
        let c = Control::Check {
            nonce: 9,
            from: node("a"),
            prober: node("b"),
            target: node("web-1"),
            incarnation: 1,
        };
        assert_eq!(Control::decode(&c.encode()), Some(Ok(c)));
        let v = Control::Vote {
            nonce: 3,
            from: node("a"),
            target: node("web-1"),
            incarnation: 1,
        };
        assert_eq!(Control::decode(&v.encode()), Some(Ok(v)));
        assert_eq!(Control::decode(b"\x05hello"), None, "not tagged");
        assert!(matches!(Control::decode(&[TAG, 0x17]), Some(Err(_))));
        assert!(matches!(Control::decode(&[TAG]), Some(Err(_))));
    }
}
