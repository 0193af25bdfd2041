//! What the pure curtailment parts ask the world to do ([`Effect`]), and the
//! queue they write it to with the time of the input being handled
//! ([`Out`]). The controller task takes the queue after every input and
//! carries it out in order.

use super::hooks::{HookAction, HookSpec};
use super::store::Saved;
use crate::api::{Cause, Event, MinerId, Stamped};
use crate::link::{Member, SessionCmd};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

/// The time an input arrives: monotonic for durations, wall clock (Unix
/// milliseconds) for what is reported and for the time-of-day schedule.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub at: Instant,
    pub unix_ms: u64,
}

impl Clock {
    pub fn now() -> Clock {
        Clock { at: Instant::now(), unix_ms: crate::stats::unix_ms() }
    }
}

/// A park or resume to carry out through a group's hook.
#[derive(Debug, Clone)]
pub struct HookJob {
    pub spec: Arc<HookSpec>,
    pub action: HookAction,
    pub miner: MinerId,
    pub worker: Arc<str>,
    pub addr: SocketAddr,
    pub cause: Cause,
    pub generation: u64,
    /// Target: the power target; Resume: wake at this target (set first).
    pub target: Option<crate::api::Watts>,
    /// The miner's hook counter and this job's number on it: a newer job
    /// for the same miner supersedes this one, whose retries then stop.
    pub latest: Arc<AtomicU64>,
    pub number: u64,
    /// Its machine's queue: actions reach it one at a time, in order.
    pub turn: super::hooks::Turn,
    /// Read the firmware's power envelope and own target before setting
    /// one (its first target).
    pub probe: bool,
}

/// What the state asks the world to do.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Tell subscribers.
    Event(Stamped),
    /// Tell a miner session.
    Signal(Arc<Member>, SessionCmd),
    /// Run a hook (its outcome comes back as `State::on_hook`).
    Hook(HookJob),
    /// What must survive a restart changed: write it to the state file
    /// (before a request that changed it is answered).
    Persist(Box<Saved>),
}

/// The effects queued while an input is handled, and its time.
#[derive(Debug)]
pub struct Out {
    pub clock: Clock,
    effects: Vec<Effect>,
}

impl Out {
    pub fn new(clock: Clock) -> Out {
        Out { clock, effects: Vec::new() }
    }

    pub fn push(&mut self, e: Effect) {
        self.effects.push(e);
    }

    /// An event, stamped with the input's wall-clock time.
    pub fn emit(&mut self, event: Event) {
        self.effects.push(Effect::Event(Stamped { at_ms: self.clock.unix_ms, event }));
    }

    /// The effects queued since the last call, oldest first.
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}
