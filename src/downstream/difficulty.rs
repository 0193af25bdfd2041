//! The difficulty a miner's shares must meet, per job. Pure.
//!
//! `mining.set_difficulty` takes effect at the miner's next job on most
//! firmware (cgminer and its descendants) and at once on some; either way a
//! share for a job sent before a change may have been found at an earlier
//! difficulty. So a share on job `s` is held to the easiest difficulty the
//! miner could have been using for it: the one in force when `s` was sent,
//! and every one set since. Several changes before the next job (a vardiff
//! step then a `suggest_difficulty`, say) all count, not only the last.

use crate::share::{Difficulty, Target};

/// The changes made while the same job was the last one sent.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    /// The last job seq sent before these changes: jobs up to it may be
    /// worked at any of them, jobs after it were sent under `last`.
    since: u64,
    /// The easiest of the changes.
    easiest: Difficulty,
    /// The last of them: what jobs sent after `since` carry.
    last: Difficulty,
}

/// Kept per connected miner, so it is small: the oldest step inline, later
/// ones in a vector that is empty (and holds no memory) unless a change is
/// still pending for an open job. At most one step per job sent since the
/// oldest open job, so bounded by the job history, whatever the miner sends.
#[derive(Debug, Clone)]
pub struct MinerDifficulty {
    first: Step,
    later: Vec<Step>,
    /// The target of the difficulty in force, converted once (not per share).
    current_target: Target,
}

impl MinerDifficulty {
    pub fn new(start: Difficulty) -> MinerDifficulty {
        MinerDifficulty {
            first: Step { since: 0, easiest: start, last: start },
            later: Vec::new(),
            current_target: start.to_target(),
        }
    }

    fn back(&self) -> &Step {
        self.later.last().unwrap_or(&self.first)
    }

    fn steps(&self) -> impl Iterator<Item = &Step> {
        std::iter::once(&self.first).chain(&self.later)
    }

    /// The difficulty in force: what jobs sent from now on carry.
    pub fn current(&self) -> Difficulty {
        self.back().last
    }

    /// Set a new difficulty while `last_sent` is the last job seq sent to
    /// the miner. Returns whether it changed.
    pub fn set(&mut self, d: Difficulty, last_sent: u64) -> bool {
        if d == self.current() {
            return false;
        }
        self.current_target = d.to_target();
        let back = self.later.last_mut().unwrap_or(&mut self.first);
        // A job seq resent (a resumed miner) never moves a step backwards.
        let since = last_sent.max(back.since);
        if since == back.since {
            back.last = d;
            if d < back.easiest {
                back.easiest = d;
            }
        } else {
            self.later.push(Step { since, easiest: d, last: d });
        }
        true
    }

    /// What a share on job `seq` must meet, and the difficulty it is
    /// credited at.
    pub fn for_job(&self, seq: u64) -> (Target, Difficulty) {
        // The common case: no change since the job was sent.
        if self.later.is_empty() && self.first.since < seq {
            return (self.current_target, self.first.last);
        }
        let mut best: Option<Difficulty> = None;
        let mut easier = |d: Difficulty| {
            if best.is_none_or(|b| d < b) {
                best = Some(d);
            }
        };
        let mut steps = self.steps().peekable();
        while let Some(s) = steps.next() {
            if s.since >= seq {
                // Set after the job was sent.
                easier(s.easiest);
            } else if steps.peek().is_none_or(|n| n.since >= seq) {
                // In force when the job was sent.
                easier(s.last);
            }
        }
        let d = best.expect("there is always a step");
        let target = if d == self.current() { self.current_target } else { d.to_target() };
        (target, d)
    }

    /// Jobs before `oldest_open` are closed: forget the steps only they used.
    pub fn forget_before(&mut self, oldest_open: u64) {
        if self.later.is_empty() || self.later[0].since >= oldest_open {
            return;
        }
        let keep = self.later.iter().position(|s| s.since >= oldest_open).unwrap_or(self.later.len());
        self.first = self.later[keep - 1];
        self.later.drain(..keep);
        if self.later.is_empty() {
            self.later = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(v: f64) -> Difficulty {
        Difficulty::new(v).unwrap()
    }

    /// Events, then per job seq the difficulty a share on it must meet.
    enum Ev {
        Set(f64, u64),
        Forget(u64),
    }

    /// (start, events, [(job seq, expected difficulty)], current)
    type Row = (f64, &'static [Ev], &'static [(u64, f64)], f64);

    #[test]
    fn a_share_meets_the_easiest_difficulty_the_miner_could_have_used() {
        use Ev::*;
        let table: &[Row] = &[
            // No change: every job at the start difficulty.
            (8.0, &[], &[(1, 8.0), (5, 8.0)], 8.0),
            // Set before any job was sent: jobs carry the new one only.
            (8.0, &[Set(16.0, 0)], &[(1, 16.0)], 16.0),
            // A raise after job 3: job 3 still at 8, job 4 at 16.
            (8.0, &[Set(16.0, 3)], &[(3, 8.0), (4, 16.0)], 16.0),
            // Two raises before the next job (the bug this type fixes):
            // job 3 keeps the first difficulty, not the middle one.
            (8.0, &[Set(16.0, 3), Set(32.0, 3)], &[(3, 8.0), (4, 32.0)], 32.0),
            // A drop: the miner may apply it at once, so job 3 gets 4 too.
            (8.0, &[Set(4.0, 3)], &[(3, 4.0), (4, 4.0)], 4.0),
            // Up then down then up before the next job: the dip counts for
            // open jobs, the last for new ones.
            (8.0, &[Set(16.0, 3), Set(2.0, 3), Set(32.0, 3)], &[(2, 2.0), (3, 2.0), (4, 32.0)], 32.0),
            // Raises over several jobs: each job keeps what it was sent with.
            (8.0, &[Set(16.0, 3), Set(32.0, 5)], &[(2, 8.0), (3, 8.0), (4, 16.0), (5, 16.0), (6, 32.0)], 32.0),
            // Forgetting closed jobs keeps the answers for open ones.
            (8.0, &[Set(16.0, 3), Set(32.0, 5), Forget(5)], &[(5, 16.0), (6, 32.0)], 32.0),
            (8.0, &[Set(16.0, 3), Set(32.0, 5), Forget(6)], &[(6, 32.0), (7, 32.0)], 32.0),
            // A resent job seq (a resumed miner) never moves a step backwards.
            (8.0, &[Set(16.0, 5), Set(32.0, 0)], &[(5, 8.0), (6, 32.0)], 32.0),
            // Setting the difficulty in force changes nothing.
            (8.0, &[Set(8.0, 3)], &[(3, 8.0), (4, 8.0)], 8.0),
        ];
        for (n, (start, events, expect, current)) in table.iter().enumerate() {
            let mut m = MinerDifficulty::new(d(*start));
            for e in *events {
                match e {
                    Set(v, seq) => {
                        m.set(d(*v), *seq);
                    }
                    Forget(seq) => m.forget_before(*seq),
                }
            }
            for (seq, want) in *expect {
                let (target, credit) = m.for_job(*seq);
                assert_eq!(credit, d(*want), "row {n}: job {seq}");
                assert_eq!(target, d(*want).to_target(), "row {n}: job {seq}");
            }
            assert_eq!(m.current(), d(*current), "row {n}");
        }
    }

    #[test]
    fn steps_stay_bounded_by_jobs_not_by_what_the_miner_sends() {
        let mut m = MinerDifficulty::new(d(8.0));
        for i in 0..10_000 {
            m.set(d(1.0 + (i % 7) as f64), 3);
        }
        assert_eq!(m.later.len(), 1);
        for seq in 4..20 {
            m.set(d(seq as f64), seq);
            m.forget_before(seq.saturating_sub(4));
        }
        assert!(m.later.len() <= 5, "{}", m.later.len());
        m.forget_before(u64::MAX);
        assert_eq!((m.later.len(), m.later.capacity()), (0, 0), "no memory held once nothing is pending");
    }
}
