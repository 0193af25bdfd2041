//! `sluice sim-check`: a deterministic simulator of the curtailment
//! controller, in the manner of FoundationDB's and TigerBeetle's testers.
//!
//! One seed gives one run, the same on every machine: the real
//! [`State`] (the controller's pure core, exactly as `sluice run` drives it)
//! fed by a simulated fleet and clock. Nothing here does I/O or reads the
//! time: the shell's work (carrying out effects, running hooks with their
//! retries, sessions coming and going, restarts from the state file) is
//! done by [`World`], and every random choice comes from the seed.
//!
//! The faults, at random:
//! * firmware that answers late, times out, refuses, fails and is tried
//!   again, or pauses / takes a target before its answer, after it, or
//!   never (the answer says nothing of which), in the order it was asked;
//! * sessions that close and come back, from the same or another address,
//!   alone or in storms, sometimes registering before the controller has
//!   heard that the old connection ended (a loaded machine reorders them);
//! * budgets in watts and fractions, leases that run out, resume_all;
//! * the controller killed and started again from its last state file,
//!   while the firmware keeps what it was told.
//!
//! After every step it checks:
//! 1. **the budget**: what the miners holding a job truly draw (their
//!    firmware's state, not sluice's estimate) is at most the budget in
//!    force; a fraction is taken of the fleet that exists;
//! 2. **status agrees with the sessions**: every session the controller
//!    has registered and not yet heard end is one connected row, with its
//!    miner id, and there is no other connected row;
//!
//! and once the faults stop, **liveness**: within a bound the fleet uses
//! its budget (no parked miner would fit in the room left, none waits in
//! the ramp, no power target is in flight for long).
//!
//! A failing seed prints itself, the check that failed and the last lines of
//! its trace; `sluice sim-check --seed S --steps N` replays it exactly.

use super::timeline::{run_seeds, session, status, Tally, Timeline};
use crate::api::{HashesPerSec, MinerId, MinerRow, Reply, Status, Watts};
use crate::curtail::effect::{Effect, HookJob};
use crate::curtail::hooks::{HookAction, HookDone, Probe};
use crate::curtail::power::{builtin_models, FirmwareReading, PowerRule};
use crate::curtail::schedule::Amount;
use crate::curtail::state::{BudgetParams, ControlReq, Scope, State};
use crate::curtail::store::Saved;
use crate::curtail::{CurtailConfig, GroupConfig, Method};
use crate::link::{Member, SessionCmd};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How many trace lines a failure prints.
const TRACE_KEPT: usize = 60;
/// Simulated milliseconds between steps at most (the controller ticks every
/// 100 ms in `sluice run`).
const TICK_MS: u64 = 100;
/// `curtail.default_watts` in the simulated config.
const DEFAULT_W: f64 = 3645.0;
/// Once the faults stop, the fleet must have settled within this long.
const SETTLE_BOUND_MS: u64 = 120_000;

/// What kind of miner a simulated one is (its group's method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PowerTarget,
    Firmware,
    Network,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::PowerTarget => "pt",
            Kind::Firmware => "fw",
            Kind::Network => "net",
        }
    }
}

/// A simulated machine: its firmware's state, and its Stratum connection.
#[derive(Debug)]
struct Machine {
    worker: String,
    ip: IpAddr,
    nameplate: f64,
    idle: f64,
    ths: f64,
    /// The lowest target its firmware takes.
    min_w: f64,
    awake: bool,
    /// The firmware's power target (none: its nameplate).
    target: Option<f64>,
    /// Its live connection, if any.
    session: Option<Sess>,
    /// A reconnect is scheduled.
    reconnecting: bool,
    /// When the pause or wake it carried out last was asked, or done by
    /// hand (its firmware acts on requests late, but in order: an older
    /// one never undoes a newer).
    applied_awake: u64,
    /// The same for its power target.
    applied_target: u64,
}

impl Machine {
    /// What it draws now.
    fn draw(&self) -> f64 {
        if self.awake {
            self.target.map_or(self.nameplate, |t| t.min(self.nameplate))
        } else {
            self.idle
        }
    }
}

#[derive(Debug)]
struct Sess {
    id: u64,
    member: Arc<Member>,
    /// Registered with the controller, as this miner.
    miner: Option<MinerId>,
    has_job: bool,
    /// When it last got its job (for the hashrate its shares show).
    mining_since: Option<u64>,
}

/// A session the controller has registered and not yet heard end.
#[derive(Debug, Clone)]
struct Linked {
    session: u64,
    miner: MinerId,
    machine: usize,
    member: Arc<Member>,
}

/// Something due at a simulated time.
#[derive(Debug)]
enum Ev {
    Tick,
    /// A hook attempt answers.
    Answer {
        job: Box<HookJob>,
        attempt: u32,
        backoff: Duration,
        plan: Outcome,
    },
    /// A hook attempt starts again after its backoff.
    Retry {
        job: Box<HookJob>,
        attempt: u32,
        backoff: Duration,
    },
    /// The firmware carries out what it was asked (before or after its
    /// answer, or never).
    Apply {
        machine: usize,
        change: Change,
        /// When it was asked (the world's sequence then).
        asked: u64,
    },
    Connect {
        machine: usize,
        ip: IpAddr,
    },
    /// The controller hears that a session ended.
    Deregister {
        session: u64,
        miner: MinerId,
    },
    /// A fault or an operator's act.
    Chaos,
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Pause,
    Wake(Option<f64>),
    Target(Option<f64>),
}

/// How a hook attempt ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    /// Fails; worth trying again.
    Fail,
    /// Refused for good.
    Refuse,
}

/// A failure: the seed, what broke, and the trace leading to it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    /// The run's steps (faults stop at three quarters of them).
    pub steps: u64,
    pub step: u64,
    pub at_ms: u64,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {} ({:.1} s simulated): {}",
            self.seed,
            self.step,
            self.at_ms as f64 / 1e3,
            self.what
        )?;
        writeln!(f, "replay: sluice sim-check --seed {} --steps {}", self.seed, self.steps)?;
        writeln!(f, "last {} lines of its trace:", self.trace.len())?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// What one seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub steps: u64,
    pub sim_ms: u64,
    pub machines: usize,
    pub hooks: u64,
    pub restarts: u64,
    pub reconnects: u64,
    /// The most the holders drew as a share of the budget in force.
    pub peak_share: f64,
}

/// The fleet, the controller and the queue of what is due.
struct World {
    tl: Timeline<Ev>,
    rng: fastrand::Rng,
    cfg: CurtailConfig,
    st: State,
    machines: Vec<Machine>,
    linked: Vec<Linked>,
    next_session: u64,
    /// The last state file written.
    saved: Option<Saved>,
    summary: Summary,
    calm_at_ms: Option<u64>,
    /// Rows the controller's self-check repaired (never right here: the
    /// simulated sessions are exactly what it registered).
    rows_repaired: u64,
}

fn models() -> Vec<(String, f64, f64)> {
    builtin_models().into_iter().map(|m| (m.name, m.th_s, m.watts)).collect()
}

impl World {
    fn new(seed: u64, steps: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = rng.usize(4..=40);
        let models = models();
        let kinds: Vec<Kind> = match rng.u8(0..4) {
            0 => vec![Kind::PowerTarget],
            1 => vec![Kind::Firmware],
            2 => vec![Kind::Network],
            _ => vec![Kind::PowerTarget, Kind::Firmware, Kind::Network],
        };
        let by_efficiency_share = if rng.bool() { 0.0 } else { 0.3 };
        let mut machines = Vec::with_capacity(n);
        let mut rules = Vec::new();
        for k in 0..n {
            let kind = kinds[rng.usize(..kinds.len())];
            let (model, ths, watts) = models[rng.usize(..models.len())].clone();
            let worker = format!("{}.{k}", kind.prefix());
            let by_efficiency = kind == Kind::Network && rng.f64() < by_efficiency_share;
            rules.push(match by_efficiency {
                true => PowerRule { pattern: worker.clone(), j_per_th: Some(watts / ths), ..Default::default() },
                false => PowerRule { pattern: worker.clone(), model: Some(model), ..Default::default() },
            });
            // One known by J/TH alone is as large as the default it counts
            // at until measured (see default_watts below).
            let (watts, ths) = if by_efficiency { (DEFAULT_W, DEFAULT_W / (watts / ths)) } else { (watts, ths) };
            machines.push(Machine {
                worker,
                ip: IpAddr::V4(Ipv4Addr::new(127, 77, (k / 250) as u8, (k % 250 + 1) as u8)),
                nameplate: watts,
                idle: (watts * 0.03).round(),
                ths,
                min_w: (watts * (0.4 + 0.1 * rng.f64())).round(),
                awake: true,
                target: None,
                session: None,
                reconnecting: false,
                applied_awake: 0,
                applied_target: 0,
            });
        }
        let group = |kind: Kind, method: Method| GroupConfig {
            name: kind.prefix().into(),
            pattern: format!("{}.*", kind.prefix()),
            method,
            firmware: "braiins".into(),
            username: "root".into(),
            password: "root".into(),
            settle_s: Duration::from_secs(5).into(),
            ..GroupConfig::default()
        };
        let cfg = CurtailConfig {
            power: rules,
            group: vec![group(Kind::PowerTarget, Method::PowerTarget), group(Kind::Firmware, Method::Firmware)],
            // A miner known by J/TH alone counts at the default until its
            // hashrate is measured (the docs' rule): a site sets it to its
            // largest machine.
            default_watts: DEFAULT_W,
            hold_s: Duration::from_secs(if rng.bool() { 0 } else { 5 }).into(),
            ramp_up_w_per_s: if rng.bool() { 1e9 } else { 5_000.0 },
            ..CurtailConfig::default()
        };
        let tl = Timeline::new(seed, steps, TRACE_KEPT);
        let st = State::new(cfg.clone(), tl.clock()).expect("a valid config");
        let mut w = World {
            tl,
            rng,
            cfg,
            st,
            machines,
            linked: Vec::new(),
            next_session: 1,
            saved: None,
            summary: Summary { machines: n, ..Summary::default() },
            calm_at_ms: None,
            rows_repaired: 0,
        };
        for k in 0..n {
            let ip = w.machines[k].ip;
            let at = w.rng.u64(0..2_000);
            w.machines[k].reconnecting = true;
            w.tl.at(at, Ev::Connect { machine: k, ip });
        }
        w.tl.at(TICK_MS, Ev::Tick);
        w.tl.at(1_000, Ev::Chaos);
        w
    }

    /// One thing that is due. False: nothing is.
    fn step(&mut self) -> Result<bool, Failure> {
        let Some(ev) = self.tl.pop() else { return Ok(false) };
        let at = self.tl.now_ms;
        if self.tl.calm() && self.calm_at_ms.is_none() {
            self.calm_at_ms = Some(at);
            self.tl.log("faults stop".into());
        }
        self.handle(ev);
        self.carry_out();
        self.check()?;
        self.tl.step += 1;
        Ok(true)
    }

    fn handle(&mut self, ev: Ev) {
        let clock = self.tl.clock();
        match ev {
            Ev::Tick => {
                self.update_hashrates();
                self.st.tick(clock);
                // The self-check, every second as in the controller, on the
                // sessions a proxy would hold: every one registered whose
                // end the controller has not heard yet.
                if self.tl.now_ms % 1_000 < TICK_MS {
                    let live: Vec<_> = self.linked.iter().map(|l| l.member.clone()).collect();
                    self.st.audit(clock, &live);
                    self.rows_repaired = self.st.snapshot().rows_repaired;
                }
                self.tl.after(TICK_MS, Ev::Tick);
            }
            Ev::Answer { job, attempt, backoff, plan } => self.answer(*job, attempt, backoff, plan),
            Ev::Retry { job, attempt, backoff } => {
                if job.latest.load(Ordering::Acquire) == job.number {
                    self.start_attempt(*job, attempt, backoff);
                }
            }
            Ev::Apply { machine, change, asked } => {
                let m = &mut self.machines[machine];
                // In order, part by part: a pause or wake (asked, or by
                // hand) newer than this one has the last word on whether
                // it mines, a newer target on its target.
                let (awake, target) = match change {
                    Change::Pause => (Some(false), None),
                    Change::Wake(t) => (Some(true), t.map(Some)),
                    Change::Target(t) => (None, Some(t)),
                };
                if let Some(a) = awake.filter(|_| asked >= m.applied_awake) {
                    (m.awake, m.applied_awake) = (a, asked);
                }
                if let Some(t) = target.filter(|_| asked >= m.applied_target) {
                    (m.target, m.applied_target) = (t, asked);
                }
                let line = format!("firmware {} {change:?}: draws {:.0} W", m.worker, m.draw());
                self.tl.log(line);
            }
            Ev::Connect { machine, ip } => self.connect(machine, ip),
            Ev::Deregister { session, miner } => {
                self.linked.retain(|l| l.session != session);
                self.tl.log(format!("deregister session {session} ({miner})"));
                self.st.deregister(clock, miner, session);
            }
            Ev::Chaos => {
                if !self.tl.calm() {
                    self.chaos();
                    let next = self.rng.u64(200..3_000);
                    self.tl.after(next, Ev::Chaos);
                }
            }
        }
    }

    /// Shares show a miner's hashrate: noisy for its first minute of work
    /// (a few shares, or none yet: anything from nothing to twice the
    /// truth), then what it hashes.
    fn update_hashrates(&mut self) {
        let now = self.tl.now_ms;
        for k in 0..self.machines.len() {
            let m = &self.machines[k];
            let Some(s) = &m.session else { continue };
            let truth = m.ths * 1e12 * m.draw() / m.nameplate;
            let hr = match (s.has_job && m.awake, s.mining_since) {
                (true, Some(since)) if now - since >= 60_000 => truth,
                (true, Some(_)) => truth * 2.0 * self.rng.f64(),
                _ => 0.0,
            };
            s.member.info.hashrate.set(hr);
        }
    }

    fn connect(&mut self, k: usize, ip: IpAddr) {
        self.machines[k].reconnecting = false;
        if self.machines[k].session.is_some() {
            return;
        }
        let id = self.next_session;
        self.next_session += 1;
        let member = session(id, ip, &self.machines[k].worker);
        let r = self.st.register(self.tl.clock(), member.clone());
        member.info.miner.store(r.miner.0, Ordering::Relaxed);
        self.linked.push(Linked { session: id, miner: r.miner, machine: k, member: member.clone() });
        self.machines[k].ip = ip;
        let has_job = !r.parked;
        let since = has_job.then_some(self.tl.now_ms);
        self.machines[k].session = Some(Sess { id, member, miner: Some(r.miner), has_job, mining_since: since });
        self.summary.reconnects += 1;
        let w = self.machines[k].worker.clone();
        self.tl.log(format!(
            "connect {w} session {id} from {ip}: {} ({})",
            if r.parked { "parked" } else { "job" },
            r.miner
        ));
    }

    /// Machine `k`'s connection ends; the controller hears of it after
    /// `delay_ms`; the miner reconnects after `back_ms` (none: it stays away).
    fn disconnect(&mut self, k: usize, delay_ms: u64, back_ms: Option<(u64, IpAddr)>) {
        let Some(s) = self.machines[k].session.take() else { return };
        if let Some(miner) = s.miner {
            self.tl.after(delay_ms, Ev::Deregister { session: s.id, miner });
        }
        if let Some((back, ip)) = back_ms {
            self.machines[k].reconnecting = true;
            self.tl.after(back, Ev::Connect { machine: k, ip });
        }
        let w = self.machines[k].worker.clone();
        self.tl.log(format!("disconnect {w} session {}", s.id));
    }

    /// A session's own close (parked by sluice): sluice hears it first, and
    /// the miner, seeing the close, reconnects after.
    fn closed_by_sluice(&mut self, k: usize) {
        let ip = self.machines[k].ip;
        let back = self.rng.u64(50..4_000);
        self.disconnect(k, 0, Some((back, ip)));
    }

    fn carry_out(&mut self) {
        for e in self.st.take_effects() {
            match e {
                Effect::Event(_) => {}
                Effect::Persist(s) => self.saved = Some(*s),
                Effect::Signal(member, cmd) => self.signal(&member, cmd),
                Effect::Hook(job) => {
                    self.summary.hooks += 1;
                    let backoff = job.spec.first_backoff;
                    self.start_attempt(job, 1, backoff);
                }
            }
        }
    }

    fn signal(&mut self, member: &Arc<Member>, cmd: SessionCmd) {
        let found =
            self.machines.iter().position(|m| m.session.as_ref().is_some_and(|s| Arc::ptr_eq(&s.member, member)));
        let Some(k) = found else {
            // A session that has ended: the word is lost with it.
            return;
        };
        let w = self.machines[k].worker.clone();
        self.tl.log(format!("signal {cmd:?} to {w}"));
        match cmd {
            SessionCmd::Park => self.closed_by_sluice(k),
            SessionCmd::Resume => {
                let now = self.tl.now_ms;
                if let Some(s) = &mut self.machines[k].session {
                    if !s.has_job {
                        s.mining_since = Some(now);
                    }
                    s.has_job = true;
                }
            }
            SessionCmd::Shutdown => {}
        }
    }

    fn machine_of(&self, job: &HookJob) -> Option<usize> {
        self.machines.iter().position(|m| *m.worker == *job.worker)
    }

    /// A hook attempt begins: its outcome, its latency, and when (if at
    /// all) the firmware acts on it.
    fn start_attempt(&mut self, job: HookJob, attempt: u32, backoff: Duration) {
        let Some(k) = self.machine_of(&job) else { return };
        let calm = self.tl.calm();
        let latency = match self.rng.u8(0..20) {
            _ if calm => self.rng.u64(20..400),
            0 => self.rng.u64(10_000..30_000),
            1..=3 => self.rng.u64(2_000..8_000),
            _ => self.rng.u64(20..1_500),
        };
        if attempt == 1 {
            let target = job.target.map(|t| t.0);
            self.tl.log(format!("ask {:?} {}({}) target {target:?}", job.action, self.machines[k].worker, job.miner));
        }
        let m = &self.machines[k];
        let below_envelope = job.target.is_some_and(|t| t.0 < m.min_w);
        let plan = if below_envelope {
            Outcome::Refuse
        } else if calm {
            Outcome::Ok
        } else {
            match self.rng.u8(0..20) {
                0..=1 => Outcome::Fail,
                2 => Outcome::Refuse,
                _ => Outcome::Ok,
            }
        };
        let change = match job.action {
            HookAction::Park => Some(Change::Pause),
            HookAction::Resume => Some(Change::Wake(job.target.map(|t| t.0))),
            HookAction::Target => Some(Change::Target(job.target.map(|t| t.0))),
            HookAction::Read => None,
        };
        // An honest firmware acts before it answers yes; one that fails
        // may still act, before or after its answer, or never.
        if let Some(change) = change.filter(|_| !below_envelope) {
            let acts = match plan {
                Outcome::Ok => Some(self.rng.u64(0..=latency)),
                _ if self.rng.u8(0..3) == 0 => Some(self.rng.u64(0..latency + 5_000)),
                _ => None,
            };
            if let Some(ms) = acts {
                let asked = self.tl.seq;
                self.tl.after(ms, Ev::Apply { machine: k, change, asked });
            }
        }
        self.tl.after(latency, Ev::Answer { job: Box::new(job), attempt, backoff, plan });
    }

    fn answer(&mut self, job: HookJob, attempt: u32, backoff: Duration, plan: Outcome) {
        let Some(k) = self.machine_of(&job) else { return };
        let m = &self.machines[k];
        let reading = FirmwareReading {
            watts: Watts(m.draw()),
            hashrate_hs: HashesPerSec(if m.awake { m.ths * 1e12 * m.draw() / m.nameplate } else { 0.0 }),
        };
        let probe = job.probe.then_some(Probe {
            min: Some(Watts(m.min_w)),
            max: Some(Watts(m.nameplate)),
            target: Some(Watts(m.nameplate)),
        });
        let attempts = if matches!(job.action, HookAction::Read | HookAction::Target) { 1 } else { job.spec.attempts };
        let superseded = job.latest.load(Ordering::Acquire) != job.number;
        let (result, again) = match plan {
            Outcome::Ok => (Ok(Some(reading)), false),
            Outcome::Fail => (Err("no braiins miner answered (simulated)".to_owned()), true),
            Outcome::Refuse => (Err("refused (simulated)".to_owned()), false),
        };
        let again = again && attempt < attempts && !superseded;
        let retry_in = again.then_some(backoff);
        let line = format!(
            "hook {:?} {} attempt {attempt} target {:?}: {}",
            job.action,
            job.worker,
            job.target.map(|t| t.0),
            match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("{e}{}", if again { ", again" } else { "" }),
            }
        );
        self.tl.log(line);
        let done = HookDone {
            miner: job.miner,
            cause: job.cause.clone(),
            generation: job.generation,
            action: job.action,
            target: job.target,
            result,
            retry_in,
            probe,
        };
        self.st.on_hook(self.tl.clock(), done);
        if again {
            let next = (backoff * 2).min(Duration::from_secs(60));
            self.tl.after(
                backoff.as_millis() as u64,
                Ev::Retry { job: Box::new(job), attempt: attempt + 1, backoff: next },
            );
        }
    }

    /// A fault or an operator's act, at random.
    fn chaos(&mut self) {
        let clock = self.tl.clock();
        let n = self.machines.len();
        match self.rng.u8(0..100) {
            0..=24 => {
                let budget = self.random_budget();
                let reason = format!("sim {budget:?}");
                self.tl.log(format!("set_budget {budget:?}"));
                let lease = (self.rng.u8(0..4) == 0).then(|| Duration::from_secs(self.rng.u64(1..20)));
                let b = BudgetParams {
                    amount: budget,
                    scope: Scope::Site,
                    lease,
                    ramp_up: None,
                    dry_run: false,
                    reason,
                    max_listed: 10,
                };
                match self.st.control(clock, ControlReq::SetBudget(b)) {
                    Ok(Reply::Plan(p)) => {
                        let who = |v: &[crate::api::PlannedMiner]| {
                            v.iter()
                                .map(|m| format!("{}({})", m.who.worker, m.who.miner.0))
                                .collect::<Vec<_>>()
                                .join(" ")
                        };
                        self.tl.log(format!(
                            "plan {}: park {} [{}], resume {} [{}]; expected {:.0} W",
                            p.plan_id,
                            p.park_count,
                            who(&p.park),
                            p.resume_count,
                            who(&p.resume),
                            p.expected.watts.0
                        ))
                    }
                    other => self.tl.log(format!("set_budget answered {other:?}")),
                }
            }
            25..=27 => {
                self.tl.log("resume_all".into());
                let _ = self.st.control(clock, ControlReq::ResumeAll { reason: "sim".into() });
            }
            28..=59 => {
                // One miner's connection drops (a network blip, a firmware
                // restart); sometimes the controller hears late.
                let k = self.rng.usize(..n);
                let delay = if self.rng.u8(0..3) == 0 { self.rng.u64(0..3_000) } else { self.rng.u64(0..50) };
                let ip = if self.rng.u8(0..5) == 0 { self.other_ip(k) } else { self.machines[k].ip };
                let back = self.rng.u64(20..5_000);
                self.disconnect(k, delay, Some((back, ip)));
            }
            60..=64 => {
                // A storm: a third of the fleet drops at once.
                self.tl.log("reconnect storm".into());
                for k in 0..n {
                    if self.rng.u8(0..3) == 0 {
                        let delay = self.rng.u64(0..2_000);
                        let back = self.rng.u64(20..3_000);
                        let ip = self.machines[k].ip;
                        self.disconnect(k, delay, Some((back, ip)));
                    }
                }
            }
            65..=69 => self.restart(),
            70..=74 => {
                // Firmware with a mind of its own: a miner woken or paused
                // by hand, out of sluice's sight.
                let k = self.rng.usize(..n);
                let wake = self.rng.bool();
                self.tl.log(format!("{} {} by hand", self.machines[k].worker, if wake { "wakes" } else { "pauses" }));
                self.machines[k].awake = wake;
                self.machines[k].applied_awake = self.tl.seq;
            }
            _ => {}
        }
    }

    fn other_ip(&mut self, k: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 78, self.rng.u8(..), (k % 250 + 1) as u8))
    }

    fn random_budget(&mut self) -> Amount {
        let fleet: f64 = self.machines.iter().map(|m| m.nameplate).sum();
        match self.rng.u8(0..3) {
            0 => Amount::Fraction((self.rng.f64() * 1.1).min(1.0)),
            _ => Amount::Watts((fleet * self.rng.f64()).round()),
        }
    }

    /// The controller is killed (every connection with it) and started
    /// again from its state file; the firmware keeps what it was told.
    fn restart(&mut self) {
        self.summary.restarts += 1;
        self.tl.log("controller restarts from its state file".into());
        // Hook tasks die with the process: their answers never come.
        self.tl.queue.retain(|_, ev| !matches!(ev, Ev::Answer { .. } | Ev::Retry { .. } | Ev::Deregister { .. }));
        self.linked.clear();
        for k in 0..self.machines.len() {
            if self.machines[k].session.take().is_some() && !self.machines[k].reconnecting {
                let back = self.rng.u64(100..5_000);
                let ip = self.machines[k].ip;
                self.machines[k].reconnecting = true;
                self.tl.after(back, Ev::Connect { machine: k, ip });
            }
        }
        let clock = self.tl.clock();
        self.st = State::new(self.cfg.clone(), clock).expect("a valid config");
        if let Some(s) = self.saved.clone() {
            if let Err(e) = self.st.restore(clock, s) {
                self.tl.log(format!("restore refused: {e}"));
            }
        }
        self.carry_out();
    }

    fn status(&mut self) -> Status {
        status(&mut self.st, self.tl.clock())
    }

    /// The invariants, after every step.
    fn check(&mut self) -> Result<(), Failure> {
        let status = self.status();
        // Status only: no effects, but take any so none leak into the next
        // step's accounting.
        self.carry_out();
        let rows = status.miners.clone().unwrap_or_default();
        if self.rows_repaired > 0 {
            return Err(self.tl.fail(format!(
                "the controller's self-check repaired {} rows of sessions that agreed with it",
                self.rows_repaired
            )));
        }
        self.check_rows(&status, &rows)?;
        self.check_budget(&status)?;
        self.check_settled(&status, &rows)?;
        Ok(())
    }

    fn check_rows(&self, status: &Status, rows: &[MinerRow]) -> Result<(), Failure> {
        let mut want: HashMap<MinerId, usize> = HashMap::new();
        for l in &self.linked {
            *want.entry(l.miner).or_default() += 1;
        }
        if let Some((m, n)) = want.iter().find(|(_, n)| **n > 1) {
            return Err(self.tl.fail(format!("{n} live sessions were registered as one miner, {m}")));
        }
        let mut got: HashMap<MinerId, usize> = HashMap::new();
        for r in rows.iter().filter(|r| r.connected) {
            *got.entry(r.who.miner).or_default() += 1;
        }
        for l in &self.linked {
            if got.get(&l.miner).copied().unwrap_or(0) != 1 {
                let w = &self.machines[l.machine].worker;
                return Err(self.tl.fail(format!(
                    "live session {} of {w} ({}) is in {} connected rows of status (rows: {}, connected: {})",
                    l.session,
                    l.miner,
                    got.get(&l.miner).copied().unwrap_or(0),
                    rows.len(),
                    status.site.connected
                )));
            }
        }
        if let Some(r) = rows.iter().find(|r| r.connected && !want.contains_key(&r.who.miner)) {
            return Err(self
                .tl
                .fail(format!("status shows {} ({}) connected with no live session", r.who.worker, r.who.miner)));
        }
        if status.site.connected as usize != self.linked.len() {
            return Err(self.tl.fail(format!(
                "status counts {} connected, {} sessions are live",
                status.site.connected,
                self.linked.len()
            )));
        }
        Ok(())
    }

    /// What the budget in force is in watts: a fraction of the fleet that
    /// exists (every machine, connected or not), watts as given.
    fn budget_w(&self, status: &Status) -> Option<f64> {
        status.budget.watts?;
        let fleet: f64 = self.machines.iter().map(|m| m.nameplate).sum();
        Some(match self.fraction_in_force() {
            Some(f) => f * fleet,
            None => status.budget.watts?.0,
        })
    }

    fn fraction_in_force(&self) -> Option<f64> {
        let s = self.st.saved();
        let b = s.budget?;
        match b.amount {
            Amount::Fraction(f) => Some(f),
            Amount::Watts(_) => None,
        }
    }

    fn holders_w(&self) -> f64 {
        self.machines.iter().filter(|m| m.session.as_ref().is_some_and(|s| s.has_job)).map(Machine::draw).sum()
    }

    fn check_budget(&mut self, status: &Status) -> Result<(), Failure> {
        let Some(budget) = self.budget_w(status) else { return Ok(()) };
        let drawn = self.holders_w();
        if budget > 0.0 {
            self.summary.peak_share = self.summary.peak_share.max(drawn / budget);
        }
        if drawn > budget + 0.5 {
            let who: Vec<String> = self
                .machines
                .iter()
                .filter(|m| m.session.as_ref().is_some_and(|s| s.has_job))
                .map(|m| format!("{}={:.0}", m.worker, m.draw()))
                .collect();
            let rows = describe(status.miners.iter().flatten());
            return Err(self.tl.fail(format!(
                "miners holding a job draw {drawn:.0} W, over the {budget:.0} W budget in force (status says {:.0} W of a fleet of {:.0} W, counts {:.0} W mining, met {:?}); holders: {}; rows: {}",
                status.budget.watts.map_or(f64::NAN, |w| w.0),
                status.site.fleet_watts.0,
                status.site.watts.0,
                status.budget.met,
                who.join(" "),
                rows
            )));
        }
        Ok(())
    }

    /// Liveness: once the faults have stopped for SETTLE_BOUND_MS, the
    /// fleet uses its budget: nothing waits in the ramp, and no parked
    /// miner with a connection would fit in the room left.
    fn check_settled(&mut self, status: &Status, rows: &[MinerRow]) -> Result<(), Failure> {
        let Some(calm_at) = self.calm_at_ms else { return Ok(()) };
        if self.tl.now_ms < calm_at + SETTLE_BOUND_MS {
            return Ok(());
        }
        if status.resuming > 0 {
            return Err(self
                .tl
                .fail(format!("{} miners still wait in the ramp long after the faults stopped", status.resuming)));
        }
        let Some(budget) = self.budget_w(status) else { return Ok(()) };
        // Judged on sluice's own count (a miner paused by hand still
        // counts at its estimate: no meter here says otherwise).
        let drawn = status.site.watts.0 + status.site.parked_watts.0;
        let room = budget * (1.0 - self.cfg.hysteresis_fraction) - drawn;
        // A parked miner that would fit; partial power may lower others
        // instead, so only a miner no one is lowered for counts.
        let lowered = rows.iter().any(|r| r.target_w.is_some());
        // The policy resumes the most efficient parked miner first, and
        // none past one that does not fit: that one is what must not fit.
        let saving = |r: &MinerRow| r.j_per_th.0 * (r.watts.0 - r.idle_watts.0) / r.watts.0.max(1e-9);
        let first = rows
            .iter()
            .filter(|r| {
                r.connected && r.state == crate::curtail::policy::MinerState::Parked && r.target_refused.is_none()
            })
            .min_by(|a, b| saving(a).total_cmp(&saving(b)));
        if let Some(r) = first {
            let k = self.machines.iter().position(|m| m.worker == r.who.worker).expect("a machine");
            let (worker, nameplate, idle) =
                (self.machines[k].worker.clone(), self.machines[k].nameplate, self.machines[k].idle);
            if !lowered && nameplate - idle < room - 1.0 {
                let rows = describe(rows.iter());
                let dry = self.st.saved().budget.map(|b| {
                    let p = BudgetParams {
                        amount: b.amount,
                        scope: Scope::Site,
                        lease: None,
                        ramp_up: None,
                        dry_run: true,
                        reason: "why".into(),
                        max_listed: 100,
                    };
                    format!("{:?}", self.st.control(self.tl.clock(), ControlReq::SetBudget(p)))
                });
                self.tl.log(format!("a plan now would be: {dry:?}"));
                return Err(self.tl.fail(format!(
                    "{} stays parked long after the faults stopped though it fits: {:.0} W in {room:.0} W of room ({drawn:.0} W drawn of {budget:.0} W, status says {:?}; sluice counts {:.0} W mining, {} mining, {} parked; rows {})",
                    worker, nameplate, status.budget.watts, status.site.watts.0, status.site.mining, status.site.parked, rows
                )));
            }
        }
        Ok(())
    }
}

/// Status rows in a line: worker, state, away or not, watts counted.
fn describe<'a>(rows: impl Iterator<Item = &'a MinerRow>) -> String {
    let row = |r: &MinerRow| {
        let target = r.target_w.map_or(String::new(), |t| format!("@{:.0}", t.0));
        format!("{}:{:?}{}:{:.0}{target}", r.who.worker, r.state, if r.connected { "" } else { "(away)" }, r.watts.0)
    };
    rows.map(row).collect::<Vec<_>>().join(" ")
}

/// Run one seed for `steps` steps.
pub fn run_seed(seed: u64, steps: u64) -> Result<Summary, Failure> {
    let mut w = World::new(seed, steps);
    while w.tl.step < steps {
        if !w.step()? {
            break;
        }
    }
    w.summary.steps = w.tl.step;
    w.summary.sim_ms = w.tl.now_ms;
    Ok(w.summary)
}

impl Tally for Summary {
    fn add(&mut self, s: &Summary) {
        self.steps += s.steps;
        self.sim_ms += s.sim_ms;
        self.hooks += s.hooks;
        self.restarts += s.restarts;
        self.reconnects += s.reconnects;
        self.peak_share = self.peak_share.max(s.peak_share);
    }

    fn seed_line(&self) -> String {
        format!(
            "{} machines, {} steps, {:.0} s simulated, {} hooks, {} restarts, {} connections; peak {:.3} of the budget",
            self.machines,
            self.steps,
            self.sim_ms as f64 / 1e3,
            self.hooks,
            self.restarts,
            self.reconnects,
            self.peak_share
        )
    }

    fn totals(&self, secs: f64) -> String {
        format!(
            "{} steps, {:.0} h simulated, {} hook runs, {} restarts, {} connections, in {secs:.1} s ({:.0} steps/s); peak draw of holders {:.3} of the budget",
            self.steps,
            self.sim_ms as f64 / 3.6e6,
            self.hooks,
            self.restarts,
            self.reconnects,
            self.steps as f64 / secs.max(1e-9),
            self.peak_share
        )
    }
}

/// `sluice sim-check`: seeds from `first` on, `steps` each; stops at the
/// first failure and prints it. Returns how many seeds passed.
pub fn run(first: u64, seeds: u64, steps: u64, quiet: bool, keep_going: bool) -> Result<u64, String> {
    run_seeds("sim-check", first, seeds, quiet, keep_going, |seed| run_seed(seed, steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed is the same run, step for step.
    #[test]
    fn a_seed_replays_exactly() {
        let a = run_seed(7, 400).map_err(|f| f.to_string());
        let b = run_seed(7, 400).map_err(|f| f.to_string());
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!((a.steps, a.sim_ms, a.hooks, a.reconnects), (b.steps, b.sim_ms, b.hooks, b.reconnects))
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("one seed, two runs: {a:?} / {b:?}"),
        }
    }
}
