//! What the seeded simulators (`sim-check`, `sim-check --cluster`) share:
//! the simulated clock and the queue of what is due, the trace a failure
//! prints, a simulated session, and status read from a controller.

use super::check::Failure;
use crate::api::{Reply, Status};
use crate::curtail::effect::Clock;
use crate::curtail::state::{ControlReq, State};
use crate::link::Member;
use crate::stats::WorkerInfo;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The run's clock, its queue of events `E` due at simulated times, its
/// steps, and its trace.
pub struct Timeline<E> {
    pub seed: u64,
    /// The run's steps; faults stop at three quarters of them.
    pub steps: u64,
    pub step: u64,
    calm_from: u64,
    t0: Instant,
    pub now_ms: u64,
    /// Bumped by every event queued: orders events due at one time, and
    /// says which of two requests was asked first.
    pub seq: u64,
    pub queue: BTreeMap<(u64, u64), E>,
    trace: VecDeque<String>,
    /// Trace lines a failure prints (`SLUICE_SIM_TRACE`, else `kept`).
    trace_kept: usize,
}

impl<E> Timeline<E> {
    pub fn new(seed: u64, steps: u64, kept: usize) -> Timeline<E> {
        Timeline {
            seed,
            steps,
            step: 0,
            calm_from: steps * 3 / 4,
            t0: Instant::now(),
            now_ms: 0,
            seq: 0,
            queue: BTreeMap::new(),
            trace: VecDeque::new(),
            trace_kept: std::env::var("SLUICE_SIM_TRACE").ok().and_then(|v| v.parse().ok()).unwrap_or(kept),
        }
    }

    pub fn clock(&self) -> Clock {
        Clock { at: self.t0 + Duration::from_millis(self.now_ms), unix_ms: 1_700_000_000_000 + self.now_ms }
    }

    pub fn at(&mut self, at_ms: u64, ev: E) {
        self.seq += 1;
        self.queue.insert((at_ms, self.seq), ev);
    }

    pub fn after(&mut self, ms: u64, ev: E) {
        self.at(self.now_ms + ms, ev);
    }

    /// The next event due; the clock moves to its time.
    pub fn pop(&mut self) -> Option<E> {
        let ((at, _), ev) = self.queue.pop_first()?;
        self.now_ms = at;
        Some(ev)
    }

    /// The faults have stopped.
    pub fn calm(&self) -> bool {
        self.step >= self.calm_from
    }

    pub fn log(&mut self, line: String) {
        if self.trace.len() == self.trace_kept {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>9.3} s  {line}", self.now_ms as f64 / 1e3));
    }

    pub fn fail(&self, what: String) -> Failure {
        Failure {
            seed: self.seed,
            steps: self.steps,
            step: self.step,
            at_ms: self.now_ms,
            what,
            trace: self.trace.iter().cloned().collect(),
        }
    }
}

/// A simulated miner's session `id` from `ip`, as `worker`.
pub fn session(id: u64, ip: IpAddr, worker: &str) -> Arc<Member> {
    let info = WorkerInfo::new(id, SocketAddr::new(ip, 40_000 + (id % 20_000) as u16));
    let _ = info.worker.set(Arc::from(worker));
    Arc::new(Member { info, signal: Default::default() })
}

/// `status` with its miners, from a controller.
pub fn status(st: &mut State, clock: Clock) -> Status {
    match st.control(clock, ControlReq::Status { miners: true }) {
        Ok(Reply::Status(s)) => *s,
        other => panic!("status answered {other:?}"),
    }
}

/// What a simulator sums over its seeds.
pub trait Tally: Default {
    /// Add one seed's figures.
    fn add(&mut self, seed: &Self);
    /// One seed's line, after "seed S: ".
    fn seed_line(&self) -> String;
    /// The totals, after "N seeds run (A to B), " (`steps_per_s` measured).
    fn totals(&self, secs: f64) -> String;
}

/// Run seeds from `first` on with `one`; stop at the first failure and
/// print it (with `keep_going`, list each failing seed and fail at the
/// end). `cmd` is what replays a seed. Returns how many seeds passed.
pub fn run_seeds<T: Tally>(
    cmd: &str,
    first: u64,
    seeds: u64,
    quiet: bool,
    keep_going: bool,
    one: impl Fn(u64) -> Result<T, Failure>,
) -> Result<u64, String> {
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut total = T::default();
    for seed in first..first + seeds {
        match one(seed) {
            Ok(s) => {
                total.add(&s);
                if !quiet {
                    println!("seed {seed}: {}", s.seed_line());
                }
            }
            Err(f) => {
                if keep_going {
                    println!("seed {seed} FAILED at step {}: {}", f.step, f.what.chars().take(300).collect::<String>());
                    failed.push(seed);
                    continue;
                }
                print!("{}", f.to_string().replace("sluice sim-check", &format!("sluice {cmd}")));
                return Err(format!("seed {seed} failed: {}", f.what));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{cmd}: {seeds} seeds run ({first} to {}), {}", first + seeds - 1, total.totals(secs));
    if !failed.is_empty() {
        return Err(format!("{} of {seeds} seeds failed: {failed:?}", failed.len()));
    }
    Ok(seeds)
}
