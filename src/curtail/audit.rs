//! The controller's self-check: its rows against the sessions the proxy
//! holds. Every live session that has registered must be exactly one row
//! with that connection, and no row may keep a connection that has ended.
//! A session's end and its deregister, or a registration and the id the
//! session stores from its answer, cross each other for a moment: a
//! difference is a disagreement only once it has lasted [`GRACE`]. Pure:
//! the caller passes the time, the rows and the sessions, and repairs.

use crate::api::MinerId;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a difference must last to be a disagreement: far longer than a
/// message takes through the controller's queue, short enough that a budget
/// is never judged on lost rows for long.
pub const GRACE: Duration = Duration::from_secs(2);

/// One difference between the rows and the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gap {
    /// A live session registered as this miner that no row holds.
    Missing { session: u64, miner: MinerId },
    /// A row holding a session that has ended.
    Stale { session: u64, miner: MinerId },
}

/// Differences seen, since when.
#[derive(Debug, Default)]
pub struct Audit {
    seen: HashMap<Gap, Instant>,
    /// Disagreements repaired since start (the metric).
    pub repaired: u64,
}

impl Audit {
    /// Compare `rows` (each row with a connection: its miner and session)
    /// with `live` (each live session: its id, and its miner once it has
    /// registered). The disagreements to repair now: differences that have
    /// lasted [`GRACE`]. (They are forgotten: the caller repairs them.)
    pub fn check(
        &mut self,
        now: Instant,
        rows: impl IntoIterator<Item = (MinerId, u64)>,
        live: impl IntoIterator<Item = (u64, Option<MinerId>)>,
    ) -> Vec<Gap> {
        let rows: HashMap<u64, MinerId> = rows.into_iter().map(|(m, s)| (s, m)).collect();
        let mut sessions = HashSet::new();
        let mut gaps = Vec::new();
        for (session, miner) in live {
            sessions.insert(session);
            if let Some(miner) = miner.filter(|m| rows.get(&session) != Some(m)) {
                gaps.push(Gap::Missing { session, miner });
            }
        }
        for (&session, &miner) in &rows {
            if !sessions.contains(&session) {
                gaps.push(Gap::Stale { session, miner });
            }
        }
        let seen = std::mem::take(&mut self.seen);
        let mut due = Vec::new();
        for g in gaps {
            let since = seen.get(&g).copied().unwrap_or(now);
            if now.saturating_duration_since(since) >= GRACE {
                due.push(g);
            } else {
                self.seen.insert(g, since);
            }
        }
        self.repaired += due.len() as u64;
        due.sort_by_key(|g| match *g {
            Gap::Missing { session, .. } | Gap::Stale { session, .. } => session,
        });
        due
    }

    /// Whether a difference is open (seen, not yet repaired): no budget is
    /// judged met meanwhile.
    pub fn open(&self) -> bool {
        !self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1: MinerId = MinerId(1);
    const M2: MinerId = MinerId(2);

    type Rows = &'static [(MinerId, u64)];
    type Live = &'static [(u64, Option<MinerId>)];

    /// (seconds, rows, live sessions, disagreements due, open after)
    #[test]
    fn a_difference_is_a_disagreement_once_it_lasts() {
        let table: &[(u64, Rows, Live, &[Gap], bool)] = &[
            // Agreeing: nothing.
            (0, &[(M1, 10)], &[(10, Some(M1))], &[], false),
            // A session not yet registered (no id stored): nothing.
            (1, &[(M1, 10)], &[(10, Some(M1)), (11, None)], &[], false),
            // Registered, its row gone: seen, not yet due.
            (2, &[], &[(10, Some(M1))], &[], true),
            (3, &[], &[(10, Some(M1))], &[], true),
            // Lasted GRACE: due (and forgotten: repaired).
            (4, &[], &[(10, Some(M1))], &[Gap::Missing { session: 10, miner: M1 }], false),
            // A row whose session ended: its deregister may be in the queue.
            (5, &[(M1, 10), (M2, 11)], &[(10, Some(M1))], &[], true),
            // Heard in time: the difference is gone, nothing due.
            (6, &[(M1, 10)], &[(10, Some(M1))], &[], false),
            // Another, never heard.
            (7, &[(M1, 10), (M2, 12)], &[(10, Some(M1))], &[], true),
            (9, &[(M1, 10), (M2, 12)], &[(10, Some(M1))], &[Gap::Stale { session: 12, miner: M2 }], false),
            // A session held by a row of another miner: missing as itself.
            (10, &[(M2, 10)], &[(10, Some(M1))], &[], true),
            (12, &[(M2, 10)], &[(10, Some(M1))], &[Gap::Missing { session: 10, miner: M1 }], false),
        ];
        let t0 = Instant::now();
        let mut a = Audit::default();
        let mut repaired = 0;
        for &(secs, rows, live, due, open) in table {
            let got = a.check(t0 + Duration::from_secs(secs), rows.iter().copied(), live.iter().copied());
            assert_eq!(got, due, "at {secs} s");
            assert_eq!(a.open(), open, "open at {secs} s");
            repaired += due.len() as u64;
            assert_eq!(a.repaired, repaired, "counted at {secs} s");
        }
    }
}
