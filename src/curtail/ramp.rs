//! The resume ramp: miners chosen to resume wait in a queue and go back to
//! work as a watt allowance accrues at the ramp rate, so a lifted budget
//! brings the load back smoothly, most efficient first (the order they were
//! queued in). Pure: the caller passes the time and says which queued miners
//! are still waiting.

use crate::api::{Cause, MinerId, Watts};
use std::collections::VecDeque;
use std::time::Instant;

/// One queued miner: its id, the state generation it was queued at (a
/// miner whose state changed since is no longer waiting), and the plan that
/// resumes it.
type Queued = (MinerId, u64, Cause);

#[derive(Debug)]
pub struct Ramp {
    queue: VecDeque<Queued>,
    /// Watts that may be resumed now.
    tokens: Watts,
    /// When the queue last went from empty to not: the allowance accrues
    /// from then, not from the tick before.
    from: Instant,
}

impl Ramp {
    pub fn new(now: Instant) -> Ramp {
        Ramp { queue: VecDeque::new(), tokens: Watts::ZERO, from: now }
    }

    /// Miners waiting for their turn.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queue a miner behind those already waiting.
    pub fn push(&mut self, now: Instant, miner: MinerId, generation: u64, cause: Cause) {
        if self.queue.is_empty() {
            self.from = now;
        }
        self.queue.push_back((miner, generation, cause));
    }

    /// Time passes: `dt` seconds since the last call, at `rate` W/s. The
    /// miners whose turn came, in queue order. `waiting(miner, generation)`
    /// is the watts of a miner still waiting, or None for one that is not
    /// (gone, or its state changed): it leaves the queue without using the
    /// allowance. The queue stops at the first miner that does not fit yet,
    /// so the order is kept strictly.
    pub fn due(
        &mut self,
        now: Instant,
        dt: f64,
        rate: f64,
        mut waiting: impl FnMut(MinerId, u64) -> Option<Watts>,
    ) -> Vec<(MinerId, Cause)> {
        if self.queue.is_empty() {
            self.tokens = Watts::ZERO;
            return Vec::new();
        }
        self.tokens += Watts(rate * now.saturating_duration_since(self.from).as_secs_f64().min(dt));
        let mut out = Vec::new();
        while let Some((id, generation, _)) = self.queue.front() {
            let Some(w) = waiting(*id, *generation) else {
                self.queue.pop_front();
                continue;
            };
            if self.tokens < w {
                break;
            }
            self.tokens -= w;
            let (id, _, cause) = self.queue.pop_front().expect("looked at");
            out.push((id, cause));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// (seconds, miners queued then as (id, watts), what the tick at that
    /// second resumes), at 1,000 W/s, ticks whenever a row says.
    type Row = (f64, &'static [(u64, f64)], &'static [u64]);

    fn run(rows: &[Row], gone: &[u64]) {
        let t0 = Instant::now();
        let mut ramp = Ramp::new(t0);
        let mut watts = std::collections::HashMap::new();
        let mut last = 0.0;
        for (n, (secs, queue, want)) in rows.iter().enumerate() {
            let now = t0 + Duration::from_secs_f64(*secs);
            for &(id, w) in *queue {
                watts.insert(id, w);
                ramp.push(now, MinerId(id), 0, Cause::default());
            }
            let got: Vec<u64> = ramp
                .due(now, secs - last, 1000.0, |id, _| (!gone.contains(&id.0)).then(|| Watts(watts[&id.0])))
                .into_iter()
                .map(|(id, _)| id.0)
                .collect();
            last = *secs;
            assert_eq!(got, *want, "row {n} at {secs} s");
        }
    }

    #[test]
    fn the_allowance_accrues_from_when_the_queue_filled_and_the_order_is_kept() {
        let rows: &[(&str, &[Row], &[u64])] = &[
            (
                "one miner a second at 1,000 W each",
                &[(0.0, &[(1, 1000.0), (2, 1000.0)], &[]), (0.5, &[], &[]), (1.0, &[], &[1]), (2.0, &[], &[2])],
                &[],
            ),
            (
                // An idle queue saves nothing up: 10 s of nothing, then a
                // miner queued at 10 s waits its full second.
                "no allowance saved while empty",
                &[(0.0, &[], &[]), (10.0, &[(1, 1000.0)], &[]), (10.5, &[], &[]), (11.0, &[], &[1])],
                &[],
            ),
            (
                // A big miner first holds back a small one behind it.
                "strict order",
                &[(0.0, &[(1, 3000.0), (2, 100.0)], &[]), (2.0, &[], &[]), (3.0, &[], &[1]), (3.5, &[], &[2])],
                &[],
            ),
            (
                "a miner no longer waiting is dropped without using the allowance",
                &[(0.0, &[(1, 1000.0), (2, 1000.0)], &[]), (1.0, &[], &[2])],
                &[1],
            ),
            (
                "a long tick resumes several",
                &[(0.0, &[(1, 500.0), (2, 500.0), (3, 500.0)], &[]), (1.5, &[], &[1, 2, 3])],
                &[],
            ),
        ];
        for (what, rows, gone) in rows {
            eprintln!("{what}");
            run(rows, gone);
        }
    }
}
