//! `sluice sim-check --cluster`: the deterministic simulator for cluster
//! mode. One seed gives one run of several instances, each the real
//! curtailment [`State`], with the real planner and the agent's decisions
//! ([`site`]: the site's book, the next allotments, the allotment taken
//! up), over an in-memory store with etcd's semantics: one revision per
//! write, leases that run out and take their keys with them, keys created
//! at a revision that fences the planner, compare-and-swap on a key's
//! create or mod revision.
//!
//! What the agent does around them is done here in the same order
//! (`agent.rs`: lease, read, report, election, plan, take up), each round
//! of an instance one step. The faults, at random:
//! * an instance killed (its miners reconnect to the others), and started
//!   again later;
//! * etcd frozen (no call answers; on its return the leases that ran out
//!   meanwhile are revoked at once, as etcd does), or losing every lease;
//! * one instance cut off from etcd (only with `on_lost = "shed"`: with
//!   `hold` the docs say it keeps a share the others are given);
//! * rounds late, as on a loaded machine; sessions that close and come
//!   back to the same or another instance;
//! * budgets in watts and fractions set through any instance.
//!
//! Checks, after every step:
//! 1. **the budget**: what the miners holding a job draw, on every
//!    instance together, is at most the site budget (a fraction of the
//!    whole fleet), or the one in force before while a change reaches
//!    every instance (two rounds of the agent, late on a loaded machine),
//!    or, while etcd is frozen, the one in force when it froze (what
//!    `on_lost = "hold"` keeps);
//! 2. **status agrees with the sessions** on every instance alive;
//! 3. **recovery**: once nothing has happened for 3 `lease_s` + 5 s (and
//!    the hold time) after a fault (a kill, etcd's return, a new budget),
//!    the site mines what one
//!    instance holding every miner would (as many miners as the planner's
//!    fill of the budget, the least efficient parked, within one miner per
//!    instance);
//!
//! and once the faults stop, **stability**: the allotments do not change
//! while nothing does.

use super::check::Failure;
use super::timeline::{run_seeds, session, status, Tally, Timeline};
use crate::api::{LeaseFallback, MinerId, Status, Watts};
use crate::curtail::cluster::plan::{self, Report};
use crate::curtail::cluster::{site, Allotments, ClusterConfig, OnLost};
use crate::curtail::effect::Effect;
use crate::curtail::power::{builtin_models, PowerRule};
use crate::curtail::schedule::Amount;
use crate::curtail::state::{BudgetParams, Scope, State};
use crate::curtail::store::Saved;
use crate::curtail::CurtailConfig;
use crate::link::{Member, SessionCmd};
use crate::units::Seconds;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const TICK_MS: u64 = 100;
const ROUND_MS: u64 = 200;
/// A round runs up to this late while the faults last (a loaded machine).
const LATE_MS: u64 = 1_500;
const TRACE_KEPT: usize = 80;
/// After the faults stop, the allotments must be still from this long on.
const SETTLE_MS: u64 = 30_000;

/// What the store holds under a key.
#[derive(Debug, Clone)]
enum Val {
    State(Box<Saved>),
    Report(Box<Report>),
    Planner(String),
    Allotments(Box<Allotments>),
}

#[derive(Debug, Clone)]
struct Kv {
    val: Val,
    create: i64,
    modified: i64,
    lease: i64,
}

/// An in-memory etcd: revisions, leases, compare-and-swap.
#[derive(Debug, Default)]
struct Etcd {
    rev: i64,
    kv: BTreeMap<String, Kv>,
    /// Lease id -> when it runs out (ms).
    leases: BTreeMap<i64, u64>,
    next_lease: i64,
    /// Frozen until then: nothing answers, no lease runs out meanwhile.
    frozen_until: u64,
}

impl Etcd {
    /// Leases past their time are revoked with their keys (as etcd's
    /// lessor does when it runs).
    fn expire(&mut self, now: u64) {
        let gone: Vec<i64> = self.leases.iter().filter(|(_, t)| **t <= now).map(|(id, _)| *id).collect();
        for id in gone {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: i64) {
        self.leases.remove(&id);
        let before = self.kv.len();
        self.kv.retain(|_, kv| kv.lease != id);
        if self.kv.len() != before {
            self.rev += 1;
        }
    }

    fn grant(&mut self, ttl_ms: u64, now: u64) -> i64 {
        self.next_lease += 1;
        self.leases.insert(self.next_lease, now + ttl_ms);
        self.next_lease
    }

    /// False: the lease is not known (it ran out).
    fn keep_alive(&mut self, id: i64, ttl_ms: u64, now: u64) -> bool {
        match self.leases.get_mut(&id) {
            Some(t) => {
                *t = now + ttl_ms;
                true
            }
            None => false,
        }
    }

    /// None: the lease is not known (etcd refuses the write).
    fn put(&mut self, key: &str, val: Val, lease: i64) -> Option<i64> {
        if lease != 0 && !self.leases.contains_key(&lease) {
            return None;
        }
        self.rev += 1;
        let create = self.kv.get(key).map_or(self.rev, |kv| kv.create);
        self.kv.insert(key.to_owned(), Kv { val, create, modified: self.rev, lease });
        Some(self.rev)
    }

    fn create_revision(&self, key: &str) -> i64 {
        self.kv.get(key).map_or(0, |kv| kv.create)
    }

    fn mod_revision(&self, key: &str) -> i64 {
        self.kv.get(key).map_or(0, |kv| kv.modified)
    }
}

/// What an instance read of the site.
#[derive(Default)]
struct SiteView {
    state: Option<(Saved, i64)>,
    reports: Vec<Report>,
    planner: Option<(String, i64, i64)>,
    allotments: Option<Allotments>,
}

/// A simulated machine (parked by withholding work).
#[derive(Debug)]
struct Machine {
    worker: String,
    nameplate: f64,
    j_per_th: f64,
    /// Its live connection: instance, session id, and whether it holds a job.
    session: Option<(usize, u64, bool)>,
    reconnecting: bool,
}

/// A session an instance has registered and not yet heard end.
#[derive(Debug, Clone)]
struct Linked {
    session: u64,
    miner: MinerId,
    member: Arc<Member>,
}

/// One instance: its controller and what its agent keeps.
struct Inst {
    name: String,
    alive: bool,
    /// Bumped at every kill: what was due to the old process is dropped.
    generation: u64,
    st: State,
    linked: Vec<Linked>,
    lease: Option<(i64, u64)>,
    epoch: Option<i64>,
    written: Option<Report>,
    applied: Option<Option<Watts>>,
    /// The `at_ms` of the allotments its grant came from.
    taken_at_ms: Option<u64>,
    /// When it last planned.
    planned_at: Option<u64>,
    ok_at: u64,
    lost: bool,
    /// Cut off from etcd until then.
    cut_until: u64,
    /// Accepts miners (its agent has started).
    accepting: bool,
}

#[derive(Debug)]
enum Ev {
    Tick,
    Round {
        inst: usize,
        generation: u64,
    },
    Connect {
        machine: usize,
    },
    Deregister {
        inst: usize,
        generation: u64,
        session: u64,
        miner: MinerId,
    },
    Restart {
        inst: usize,
    },
    /// agent.rs `start` gave up waiting for etcd: miners are accepted.
    Accept {
        inst: usize,
        generation: u64,
    },
    Chaos,
}

/// What one seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub steps: u64,
    pub sim_ms: u64,
    pub instances: usize,
    pub machines: usize,
    pub kills: u64,
    pub freezes: u64,
    pub recoveries_checked: u64,
    /// With `safety_only`: recoveries and stability checks that failed
    /// (counted, not failed).
    pub recoveries_missed: u64,
    pub peak_share: f64,
}

struct World {
    tl: Timeline<Ev>,
    rng: fastrand::Rng,
    cfg: CurtailConfig,
    lease_ms: u64,
    on_lost: OnLost,
    etcd: Etcd,
    insts: Vec<Inst>,
    machines: Vec<Machine>,
    next_session: u64,
    summary: Summary,
    /// The site budgets in force lately (from, watts): a lowered one
    /// reaches every instance within `lease_s`.
    budgets: VecDeque<(u64, Option<f64>)>,
    /// When the last fault or change happened.
    last_fault_ms: u64,
    /// A recovery to check once the site has been quiet this long.
    recovery_due: bool,
    safety_only: bool,
    /// The grants once settled after the faults stopped.
    settled: Option<plan::Grants>,
}

const PREFIX: &str = "/sluice/sim/";

fn key(k: &str) -> String {
    format!("{PREFIX}{k}")
}

impl World {
    fn new(seed: u64, steps: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n_inst = rng.usize(2..=4);
        let models: Vec<(String, f64, f64)> = builtin_models().into_iter().map(|m| (m.name, m.th_s, m.watts)).collect();
        let per_inst_model = rng.bool();
        let n = rng.usize(n_inst * 2..=n_inst * 10);
        let mut machines = Vec::with_capacity(n);
        let mut rules = Vec::new();
        let inst_models: Vec<usize> = (0..n_inst).map(|_| rng.usize(..models.len())).collect();
        for k in 0..n {
            let m = if per_inst_model { inst_models[k % n_inst] } else { rng.usize(..models.len()) };
            let (model, ths, watts) = models[m].clone();
            let worker = format!("w.{k}");
            rules.push(PowerRule { pattern: worker.clone(), model: Some(model), ..Default::default() });
            machines.push(Machine {
                worker,
                nameplate: watts,
                j_per_th: watts / ths,
                session: None,
                reconnecting: true,
            });
        }
        let lease_s = [2u64, 3, 5][rng.usize(..3)];
        let on_lost = if rng.bool() { OnLost::Hold } else { OnLost::Shed };
        let cfg = CurtailConfig {
            power: rules,
            hold_s: Duration::from_secs(if rng.bool() { 0 } else { 5 }).into(),
            ramp_up_w_per_s: if rng.bool() { 1e9 } else { 20_000.0 },
            lease_fallback: LeaseFallback::Hold,
            ..CurtailConfig::default()
        };
        let mut w = World {
            tl: Timeline::new(seed, steps, TRACE_KEPT),
            rng,
            cfg,
            lease_ms: lease_s * 1000,
            on_lost,
            etcd: Etcd::default(),
            insts: Vec::new(),
            machines,
            next_session: 1,
            summary: Summary { instances: n_inst, machines: n, ..Summary::default() },
            budgets: VecDeque::new(),
            last_fault_ms: 0,
            recovery_due: false,
            safety_only: false,
            settled: None,
        };
        for i in 0..n_inst {
            let st = w.new_state(i);
            w.insts.push(Inst {
                name: format!("i{i}"),
                alive: true,
                generation: 0,
                st,
                linked: Vec::new(),
                lease: None,
                epoch: None,
                written: None,
                applied: None,
                taken_at_ms: None,
                planned_at: None,
                ok_at: 0,
                lost: false,
                cut_until: 0,
                accepting: false,
            });
            let at = w.rng.u64(0..ROUND_MS);
            w.tl.at(at, Ev::Round { inst: i, generation: 0 });
        }
        for k in 0..n {
            let at = w.rng.u64(500..2_500);
            w.tl.at(at, Ev::Connect { machine: k });
        }
        w.tl.at(TICK_MS, Ev::Tick);
        w.tl.at(3_000, Ev::Chaos);
        w
    }

    /// An instance's controller as `sluice run` starts it in cluster mode:
    /// no miner gets work before etcd says how much it may draw.
    fn new_state(&self, i: usize) -> State {
        let cluster = ClusterConfig {
            site: "sim".into(),
            instance: format!("i{i}"),
            lease_s: Seconds::from_duration(Duration::from_millis(self.lease_ms)),
            on_lost: self.on_lost,
            ..ClusterConfig::default()
        };
        let cfg = CurtailConfig { cluster: Some(cluster), ..self.cfg.clone() };
        let mut st = State::new(cfg, self.tl.clock()).expect("a valid config");
        st.allot(self.tl.clock(), Some(Watts::ZERO), "cluster: waiting for etcd".into());
        st
    }

    fn fault(&mut self) {
        self.last_fault_ms = self.last_fault_ms.max(self.tl.now_ms);
        self.recovery_due = true;
        self.settled = None;
    }

    fn step(&mut self) -> Result<bool, Failure> {
        let Some(ev) = self.tl.pop() else { return Ok(false) };
        let at = self.tl.now_ms;
        if self.etcd.frozen_until <= at {
            self.etcd.expire(at);
        }
        self.handle(ev);
        for i in 0..self.insts.len() {
            self.carry_out(i);
        }
        self.check()?;
        self.tl.step += 1;
        Ok(true)
    }

    fn handle(&mut self, ev: Ev) {
        let clock = self.tl.clock();
        match ev {
            Ev::Tick => {
                for i in 0..self.insts.len() {
                    if self.insts[i].alive {
                        self.insts[i].st.tick(clock);
                        if self.tl.now_ms % 1_000 < TICK_MS {
                            let live: Vec<_> = self.insts[i].linked.iter().map(|l| l.member.clone()).collect();
                            self.insts[i].st.audit(clock, &live);
                        }
                    }
                }
                self.tl.after(TICK_MS, Ev::Tick);
            }
            Ev::Round { inst, generation } => {
                if self.insts[inst].generation != generation || !self.insts[inst].alive {
                    return;
                }
                let took = self.round(inst);
                // A loaded machine runs its rounds late (while faults last).
                let late = if !self.tl.calm() && self.rng.u8(0..10) == 0 { self.rng.u64(0..LATE_MS) } else { 0 };
                self.tl.after(took + ROUND_MS + late, Ev::Round { inst, generation });
            }
            Ev::Connect { machine } => self.connect(machine),
            Ev::Deregister { inst, generation, session, miner } => {
                if self.insts[inst].generation == generation {
                    self.insts[inst].linked.retain(|l| l.session != session);
                    self.insts[inst].st.deregister(clock, miner, session);
                }
            }
            Ev::Restart { inst } => self.restart(inst),
            Ev::Accept { inst, generation } => {
                if self.insts[inst].generation == generation && self.insts[inst].alive {
                    self.insts[inst].accepting = true;
                }
            }
            Ev::Chaos => {
                if !self.tl.calm() {
                    self.chaos();
                    // Episodes: a fault, then a quiet spell that may be long
                    // enough for the recovery check.
                    let next = if self.rng.bool() { self.rng.u64(200..3_000) } else { self.rng.u64(5_000..20_000) };
                    self.tl.after(next, Ev::Chaos);
                }
            }
        }
    }

    /// One round of instance `i`'s agent (agent.rs `round`), on the store.
    /// Returns how long it took (a call to an etcd that does not answer
    /// waits for its timeout).
    fn round(&mut self, i: usize) -> u64 {
        let now = self.tl.now_ms;
        let call_timeout = (self.lease_ms / 4).max(500);
        if self.etcd.frozen_until > now || self.insts[i].cut_until > now {
            self.round_failed(i, call_timeout);
            return call_timeout;
        }
        match self.round_on_store(i) {
            Ok(()) => 0,
            Err(e) => {
                let name = self.insts[i].name.clone();
                self.tl.log(format!("{name}: round failed: {e}"));
                self.round_failed(i, 0);
                0
            }
        }
    }

    /// agent.rs `after`: lost once nothing answered for lease_s.
    fn round_failed(&mut self, i: usize, took: u64) {
        let now = self.tl.now_ms;
        let clock = self.tl.clock();
        {
            let inst = &mut self.insts[i];
            if !inst.lost && now + took >= inst.ok_at + self.lease_ms {
                inst.lost = true;
                inst.epoch = None;
                let name = inst.name.clone();
                if self.on_lost == OnLost::Shed {
                    self.insts[i].st.allot(
                        clock,
                        Some(Watts::ZERO),
                        "cluster: etcd unreachable (on_lost = shed)".into(),
                    );
                    self.insts[i].applied = Some(Some(Watts::ZERO));
                }
                self.tl.log(format!("{name}: etcd lost ({:?})", self.on_lost));
            }
        }
    }

    fn round_on_store(&mut self, i: usize) -> Result<(), String> {
        let now = self.tl.now_ms;
        let clock = self.tl.clock();
        // The lease, kept alive a third of lease_s apart.
        let ttl = self.lease_ms;
        let lease = match self.insts[i].lease {
            Some((id, renewed)) if now - renewed < ttl / 3 => id,
            Some((id, _)) if self.etcd.keep_alive(id, ttl, now) => {
                self.insts[i].lease = Some((id, now));
                id
            }
            _ => {
                if self.insts[i].lease.is_some() {
                    let name = self.insts[i].name.clone();
                    self.tl.log(format!("{name}: its lease ran out; a new one"));
                }
                let id = self.etcd.grant(ttl, now);
                let inst = &mut self.insts[i];
                inst.lease = Some((id, now));
                inst.epoch = None;
                inst.written = None;
                id
            }
        };
        let mut site = self.read();
        let name = self.insts[i].name.clone();
        let mut report = self.insts[i].st.report(clock, &name);
        report.taken_at_ms = self.insts[i].taken_at_ms;
        let ours_there = site.reports.iter().any(|r| r.instance == name);
        let same = self.insts[i].written.as_ref().is_some_and(|w| Report { at_ms: w.at_ms, ..report.clone() } == *w);
        if !same || !ours_there {
            self.etcd
                .put(&key(&format!("instances/{name}")), Val::Report(Box::new(report.clone())), lease)
                .ok_or("lease not found")?;
            site.reports.retain(|r| r.instance != name);
            site.reports.push(report.clone());
            self.insts[i].written = Some(report);
        }
        // The election.
        match &site.planner {
            Some((who, l, rev)) if *who == name && *l == lease => self.insts[i].epoch = Some(*rev),
            Some(_) => self.insts[i].epoch = None,
            None => {
                if self.etcd.create_revision(&key("planner")) == 0 {
                    let rev =
                        self.etcd.put(&key("planner"), Val::Planner(name.clone()), lease).ok_or("lease not found")?;
                    self.insts[i].epoch = Some(rev);
                    site.planner = Some((name.clone(), lease, rev));
                    self.tl.log(format!("{name}: elected planner at {rev}"));
                }
            }
        }
        match self.insts[i].epoch {
            Some(epoch) => self.plan(i, &mut site, epoch),
            None => self.insts[i].planned_at = None,
        }
        // Take up the allotment.
        let current = self.insts[i].applied.flatten();
        let (grant, reason) =
            site::take_up(site.state.as_ref().map(|(s, _)| s), site.allotments.as_ref(), &name, current);
        if self.insts[i].applied != Some(grant) {
            self.insts[i].taken_at_ms = site.allotments.as_ref().map(|a| a.at_ms);
            self.tl.log(format!("{name}: allotment {:?}", grant.map(|w| w.0.round())));
            self.insts[i].st.allot(clock, grant, reason);
            self.insts[i].applied = Some(grant);
        }
        if self.insts[i].lost {
            self.tl.log(format!("{name}: etcd answers again"));
        }
        let inst = &mut self.insts[i];
        inst.ok_at = now;
        inst.lost = false;
        inst.accepting = true;
        Ok(())
    }

    fn read(&self) -> SiteView {
        let mut v = SiteView::default();
        for (k, kv) in self.etcd.kv.range(PREFIX.to_owned()..) {
            let Some(rest) = k.strip_prefix(PREFIX) else { break };
            match (&kv.val, rest) {
                (Val::State(s), "state") => v.state = Some(((**s).clone(), kv.modified)),
                (Val::Planner(p), "planner") => v.planner = Some((p.clone(), kv.lease, kv.create)),
                (Val::Allotments(a), "allotments") => v.allotments = Some((**a).clone()),
                (Val::Report(r), _) => v.reports.push((**r).clone()),
                _ => {}
            }
        }
        v
    }

    /// agent.rs `plan`: the book written back when it changed, the next
    /// allotments written while this instance is the planner it was.
    fn plan(&mut self, i: usize, site: &mut SiteView, epoch: i64) {
        let clock = self.tl.clock();
        let state = site.state.as_ref().map(|(s, _)| s);
        let Ok((book, changed)) = site::book(&[], LeaseFallback::Hold, clock, state) else { return };
        if changed && self.etcd.create_revision(&key("planner")) == epoch {
            let rev = site.state.as_ref().map_or(0, |(_, r)| *r);
            if self.etcd.mod_revision(&key("state")) == rev {
                let protection = state.map(|s| s.protection.clone()).unwrap_or_default();
                let _ = self.etcd.put(&key("state"), Val::State(Box::new(site::saved(&book, protection, clock))), 0);
            }
        }
        let name = self.insts[i].name.clone();
        let in_force = book.in_force();
        let continuous = self.insts[i].planned_at.is_some_and(|t| self.tl.now_ms - t < self.lease_ms);
        self.insts[i].planned_at = Some(self.tl.now_ms);
        let next = site::allotments(site::Planning {
            continuous,
            planner: &name,
            epoch,
            clock,
            lease: Duration::from_millis(self.lease_ms),
            reports: &site.reports,
            unreadable: 0,
            prev: site.allotments.as_ref(),
            budget: in_force.map(|b| (b.amount, b.source, b.reason.as_str())),
            factor: 1.0,
            measured_w: None,
            hysteresis: self.cfg.hysteresis_fraction,
        });
        if site.allotments.as_ref().is_some_and(|p| site::same(p, &next)) {
            return;
        }
        if self.etcd.create_revision(&key("planner")) == epoch {
            let grants: Vec<String> =
                next.grants.iter().map(|(k, g)| format!("{k}={:?}", g.map(|w| w.0.round()))).collect();
            self.tl.log(format!(
                "{name} plans: budget {:?} (fleet {:.0}: {}), grants {}, leaving {:?}",
                next.budget_w.map(|w| w.0.round()),
                site::fleet_base_w(&site.reports).0,
                site.reports
                    .iter()
                    .map(|r| format!(
                        "{:.0}/{:.0}/{:.0}",
                        site::fleet_w(r).0,
                        r.away_w.unwrap_or_default().0,
                        r.arrived_w.unwrap_or_default().0
                    ))
                    .collect::<Vec<_>>()
                    .join(" "),
                grants.join(" "),
                next.leaving.keys().collect::<Vec<_>>()
            ));
            let _ = self.etcd.put(&key("allotments"), Val::Allotments(Box::new(next.clone())), 0);
            site.allotments = Some(next);
        } else {
            self.insts[i].epoch = None;
        }
    }

    /// A site request through instance `i` (agent.rs `site_write`).
    fn set_budget(&mut self, i: usize, amount: Amount) {
        let now = self.tl.now_ms;
        if self.etcd.frozen_until > now || self.insts[i].cut_until > now {
            return;
        }
        let clock = self.tl.clock();
        let site = self.read();
        let Ok((mut book, _)) = site::book(&[], LeaseFallback::Hold, clock, site.state.as_ref().map(|(s, _)| s)) else {
            return;
        };
        let b = BudgetParams {
            amount,
            scope: Scope::Site,
            lease: None,
            ramp_up: None,
            dry_run: false,
            reason: format!("sim {amount:?}"),
            max_listed: 0,
        };
        let mut p = site::site_plan(&site.reports, amount, false);
        p.plan_id = book.take_plan_id();
        book.command(clock, b, None, p);
        let protection = site.state.as_ref().map(|(s, _)| s.protection.clone()).unwrap_or_default();
        let rev = site.state.as_ref().map_or(0, |(_, r)| *r);
        if self.etcd.mod_revision(&key("state")) == rev {
            let _ = self.etcd.put(&key("state"), Val::State(Box::new(site::saved(&book, protection, clock))), 0);
            let name = self.insts[i].name.clone();
            self.tl.log(format!("set_budget {amount:?} through {name}"));
        }
    }

    fn alive_accepting(&self) -> Vec<usize> {
        (0..self.insts.len()).filter(|&i| self.insts[i].alive && self.insts[i].accepting).collect()
    }

    /// Machine `k` connects to an instance alive (its balancer's choice).
    fn connect(&mut self, k: usize) {
        if self.machines[k].session.is_some() {
            self.machines[k].reconnecting = false;
            return;
        }
        let alive = self.alive_accepting();
        if alive.is_empty() {
            self.tl.after(1_000, Ev::Connect { machine: k });
            return;
        }
        self.machines[k].reconnecting = false;
        let i = alive[self.rng.usize(..alive.len())];
        let id = self.next_session;
        self.next_session += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 90, (k / 250) as u8, (k % 250 + 1) as u8));
        let member = session(id, ip, &self.machines[k].worker);
        let clock = self.tl.clock();
        let r = self.insts[i].st.register(clock, member.clone());
        member.info.miner.store(r.miner.0, Ordering::Relaxed);
        self.insts[i].linked.push(Linked { session: id, miner: r.miner, member });
        self.machines[k].session = Some((i, id, !r.parked));
        let (w, n) = (self.machines[k].worker.clone(), self.insts[i].name.clone());
        self.tl.log(format!("connect {w} to {n}: {}", if r.parked { "parked" } else { "job" }));
    }

    /// Machine `k`'s connection ends; it comes back after `back_ms`.
    fn disconnect(&mut self, k: usize, delay_ms: u64, back_ms: u64) {
        let Some((i, session, _)) = self.machines[k].session.take() else { return };
        let generation = self.insts[i].generation;
        if let Some(l) = self.insts[i].linked.iter().find(|l| l.session == session) {
            let miner = l.miner;
            self.tl.after(delay_ms, Ev::Deregister { inst: i, generation, session, miner });
        }
        if !self.machines[k].reconnecting {
            self.machines[k].reconnecting = true;
            self.tl.after(back_ms, Ev::Connect { machine: k });
        }
    }

    fn carry_out(&mut self, i: usize) {
        for e in self.insts[i].st.take_effects() {
            if let Effect::Signal(member, cmd) = e {
                let Some(k) = self
                    .machines
                    .iter()
                    .position(|m| m.session.is_some_and(|(mi, s, _)| mi == i && s == member.info.session))
                else {
                    continue;
                };
                let (w, n) = (self.machines[k].worker.clone(), self.insts[i].name.clone());
                self.tl.log(format!("{n}: {cmd:?} {w}"));
                match cmd {
                    SessionCmd::Park => {
                        let back = self.rng.u64(50..2_000);
                        self.disconnect(k, 0, back);
                    }
                    SessionCmd::Resume => {
                        if let Some(s) = &mut self.machines[k].session {
                            s.2 = true;
                        }
                    }
                    SessionCmd::Shutdown => {}
                }
            }
        }
    }

    fn kill(&mut self, i: usize) {
        let name = self.insts[i].name.clone();
        self.tl.log(format!("{name} killed"));
        self.summary.kills += 1;
        let inst = &mut self.insts[i];
        inst.alive = false;
        inst.accepting = false;
        inst.generation += 1;
        inst.linked.clear();
        for k in 0..self.machines.len() {
            if self.machines[k].session.is_some_and(|s| s.0 == i) {
                self.machines[k].session = None;
                if !self.machines[k].reconnecting {
                    self.machines[k].reconnecting = true;
                    let back = self.rng.u64(20..3_000);
                    self.tl.after(back, Ev::Connect { machine: k });
                }
            }
        }
        let back = self.rng.u64(1_000..20_000);
        self.tl.after(back, Ev::Restart { inst: i });
    }

    fn restart(&mut self, i: usize) {
        let st = self.new_state(i);
        let name = self.insts[i].name.clone();
        self.tl.log(format!("{name} starts again"));
        let generation = self.insts[i].generation;
        let inst = &mut self.insts[i];
        (inst.st, inst.alive, inst.accepting) = (st, true, false);
        (inst.lease, inst.epoch, inst.written, inst.applied, inst.lost) = (None, None, None, None, false);
        (inst.taken_at_ms, inst.planned_at) = (None, None);
        inst.ok_at = self.tl.now_ms;
        self.tl.after(0, Ev::Round { inst: i, generation });
        // agent.rs `start`: miners are accepted once etcd answered, or
        // after lease_s whatever it says.
        let late = self.lease_ms;
        self.tl.after(late, Ev::Accept { inst: i, generation });
        self.fault();
    }

    fn chaos(&mut self) {
        let n_inst = self.insts.len();
        let alive: Vec<usize> = (0..n_inst).filter(|&i| self.insts[i].alive).collect();
        match self.rng.u8(0..100) {
            0..=29 => {
                if let Some(&i) = alive.get(self.rng.usize(..alive.len().max(1))) {
                    let fleet: f64 = self.machines.iter().map(|m| m.nameplate).sum();
                    let amount = if self.rng.bool() {
                        Amount::Fraction((self.rng.f64() * 1.1).min(1.0))
                    } else {
                        Amount::Watts((fleet * self.rng.f64()).round())
                    };
                    self.set_budget(i, amount);
                    self.fault();
                }
            }
            // Kill one instance (never the last alive).
            30..=44 if alive.len() > 1 => {
                let i = alive[self.rng.usize(..alive.len())];
                self.kill(i);
                self.fault();
            }
            45..=54 => {
                let ms = self.rng.u64(1_000..20_000);
                self.tl.log(format!("etcd frozen for {:.1} s", ms as f64 / 1e3));
                self.summary.freezes += 1;
                self.etcd.frozen_until = self.tl.now_ms + ms;
                self.fault();
                // Recovery is judged from etcd's return.
                self.last_fault_ms = self.tl.now_ms + ms;
            }
            55..=59 => {
                self.tl.log("etcd loses every lease".into());
                let ids: Vec<i64> = self.etcd.leases.keys().copied().collect();
                for id in ids {
                    self.etcd.revoke(id);
                }
                self.fault();
            }
            60..=66 if self.on_lost == OnLost::Shed => {
                let i = self.rng.usize(..n_inst);
                let ms = self.rng.u64(500..15_000);
                let name = self.insts[i].name.clone();
                self.tl.log(format!("{name} cut off from etcd for {:.1} s", ms as f64 / 1e3));
                self.insts[i].cut_until = self.tl.now_ms + ms;
                self.fault();
                self.last_fault_ms = self.tl.now_ms + ms;
            }
            67..=89 => {
                // Miners drop and reconnect (to any instance).
                let n = self.machines.len();
                let storm = self.rng.u8(0..4) == 0;
                for k in 0..n {
                    if (storm && self.rng.u8(0..3) == 0) || (!storm && k == self.rng.usize(..n)) {
                        let delay = self.rng.u64(0..500);
                        let back = self.rng.u64(20..3_000);
                        self.disconnect(k, delay, back);
                    }
                }
                self.fault();
            }
            _ => {}
        }
    }

    /// The site budget in force (watts): a fraction of every machine.
    fn budget_now(&self) -> Option<f64> {
        let kv = self.etcd.kv.get(&key("state"))?;
        let Val::State(s) = &kv.val else { return None };
        let b = s.budget.as_ref()?;
        let fleet: f64 = self.machines.iter().map(|m| m.nameplate).sum();
        Some(match b.amount {
            Amount::Watts(w) => w,
            Amount::Fraction(f) => f * fleet,
        })
    }

    fn holders_w(&self) -> f64 {
        self.machines.iter().filter(|m| m.session.is_some_and(|s| s.2)).map(|m| m.nameplate).sum()
    }

    fn status(&mut self, i: usize) -> Status {
        status(&mut self.insts[i].st, self.tl.clock())
    }

    fn check(&mut self) -> Result<(), Failure> {
        // 1. The budget, allowing lease_s for a lowered one to reach every
        //    instance.
        let now_budget = self.budget_now();
        if self.budgets.back().map(|b| b.1) != Some(now_budget) {
            self.budgets.push_back((self.tl.now_ms, now_budget));
        }
        // A change reaches the miners in two rounds (the planner's, then
        // each instance's), each up to ROUND_MS + LATE_MS late here.
        let reach = self.lease_ms + 2 * (ROUND_MS + LATE_MS);
        // While etcd is frozen, and until a change can reach the miners
        // after it returns, an instance holds (on_lost = "hold") the
        // allotment it had: a budget written just before the freeze may
        // not have reached it (the docs' rule for hold).
        let thawed = self.etcd.frozen_until + reach <= self.tl.now_ms;
        while thawed && self.budgets.len() > 1 && self.budgets[1].0 + reach <= self.tl.now_ms {
            self.budgets.pop_front();
        }
        let allowed = self.budgets.iter().map(|b| b.1.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
        let drawn = self.holders_w();
        if allowed.is_finite() && allowed > 0.0 {
            self.summary.peak_share = self.summary.peak_share.max(drawn / allowed);
        }
        if drawn > allowed + 0.5 {
            let per: Vec<String> = (0..self.insts.len())
                .map(|i| {
                    let w: f64 = self
                        .machines
                        .iter()
                        .filter(|m| m.session.is_some_and(|s| s.2 && s.0 == i))
                        .map(|m| m.nameplate)
                        .sum();
                    format!("{}={w:.0} (allotted {:?})", self.insts[i].name, self.insts[i].applied)
                })
                .collect();
            return Err(self.tl.fail(format!(
                "miners holding a job draw {drawn:.0} W, over the site budget {allowed:.0} W; per instance: {}",
                per.join(", ")
            )));
        }
        // 2. Status agrees with the sessions.
        for i in 0..self.insts.len() {
            if !self.insts[i].alive {
                continue;
            }
            let status = self.status(i);
            let rows = status.miners.clone().unwrap_or_default();
            let connected = rows.iter().filter(|r| r.connected).count();
            if connected != self.insts[i].linked.len() || status.site.connected as usize != connected {
                return Err(self.tl.fail(format!(
                    "{}: status shows {connected} connected rows (counts {}), {} sessions are live",
                    self.insts[i].name,
                    status.site.connected,
                    self.insts[i].linked.len()
                )));
            }
            if self.insts[i].st.snapshot().rows_repaired > 0 {
                return Err(self.tl.fail(format!("{}: the self-check repaired rows", self.insts[i].name)));
            }
        }
        // 3. Recovery once quiet for lease_s + 5 s.
        // The hold rule (hold_s) delays a swap on purpose: allowed for.
        let hold_ms = self.cfg.hold_s.get().as_millis() as u64;
        if self.recovery_due && self.tl.now_ms >= self.last_fault_ms + 3 * self.lease_ms + 5_000 + hold_ms {
            self.recovery_due = false;
            self.summary.recoveries_checked += 1;
            if let Err(f) = self.check_recovered() {
                match self.safety_only {
                    true => self.summary.recoveries_missed += 1,
                    false => return Err(f),
                }
            }
        }
        // Stability once the faults have stopped.
        if self.tl.calm() && self.tl.now_ms >= self.last_fault_ms + SETTLE_MS {
            let grants = self.read().allotments.map(|a| a.grants);
            match (&self.settled, grants) {
                (None, Some(g)) => self.settled = Some(g),
                (Some(was), Some(g)) if *was != g && self.safety_only => {
                    self.summary.recoveries_missed += 1;
                    self.settled = Some(g);
                }
                (Some(was), Some(g)) if *was != g => {
                    return Err(self.tl.fail(format!("the allotments changed while nothing did: {was:?} -> {g:?}")))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The site mines what one instance holding every miner would: as many
    /// miners as the planner's fill of the budget (less the resume
    /// hysteresis), and no parked miner more efficient than more than one
    /// mining one per instance.
    fn check_recovered(&mut self) -> Result<(), Failure> {
        let Some(budget) = self.budget_now() else { return Ok(()) };
        let clock = self.tl.clock();
        let alive: Vec<usize> = (0..self.insts.len()).filter(|&i| self.insts[i].alive).collect();
        let reports: Vec<Report> = alive
            .iter()
            .map(|&i| {
                let name = self.insts[i].name.clone();
                self.insts[i].st.report(clock, &name)
            })
            .collect();
        let want = plan::fill(Watts(budget * (1.0 - self.cfg.hysteresis_fraction)), &reports).mining;
        let mining = self.machines.iter().filter(|m| m.session.is_some_and(|s| s.2)).count();
        let connected = self.machines.iter().filter(|m| m.session.is_some()).count();
        if connected < self.machines.len() {
            // Some still on their way back: judged at the next quiet spell.
            return Ok(());
        }
        let parked_best = self
            .machines
            .iter()
            .filter(|m| m.session.is_some_and(|s| !s.2))
            .map(|m| m.j_per_th)
            .fold(f64::INFINITY, f64::min);
        let worse_mining =
            self.machines.iter().filter(|m| m.session.is_some_and(|s| s.2) && m.j_per_th > parked_best * 1.05).count();
        if mining + alive.len() <= want || worse_mining > alive.len() {
            let per: Vec<String> = alive
                .iter()
                .map(|&i| {
                    let list: Vec<String> = self
                        .machines
                        .iter()
                        .filter(|m| m.session.is_some_and(|s| s.0 == i))
                        .map(|m| {
                            format!(
                                "{}:{:.1}J{}",
                                m.worker,
                                m.j_per_th,
                                if m.session.unwrap().2 { "" } else { "(parked)" }
                            )
                        })
                        .collect();
                    format!("{} allotted {:?}: {}", self.insts[i].name, self.insts[i].applied, list.join(" "))
                })
                .collect();
            return Err(self.tl.fail(format!(
                "{} s after the last fault the site mines {mining} miners where one instance would mine {want} of the {:.0} W budget ({worse_mining} less efficient than a parked one); {}",
                (self.tl.now_ms - self.last_fault_ms) / 1000,
                budget,
                per.join("; ")
            )));
        }
        Ok(())
    }
}

/// One seed. `safety_only`: a missed recovery or an allotment that moves
/// while nothing did is counted, not failed (the budget and the status
/// rows still fail it).
pub fn run_seed(seed: u64, steps: u64, safety_only: bool) -> Result<Summary, Failure> {
    let mut w = World::new(seed, steps);
    w.safety_only = safety_only;
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
        self.kills += s.kills;
        self.freezes += s.freezes;
        self.recoveries_checked += s.recoveries_checked;
        self.recoveries_missed += s.recoveries_missed;
        self.peak_share = self.peak_share.max(s.peak_share);
    }

    fn seed_line(&self) -> String {
        format!(
            "{} instances, {} machines, {} steps, {:.0} s simulated, {} kills, {} etcd freezes, {} recoveries checked; peak {:.3} of the budget",
            self.instances, self.machines, self.steps, self.sim_ms as f64 / 1e3, self.kills, self.freezes, self.recoveries_checked, self.peak_share
        )
    }

    fn totals(&self, secs: f64) -> String {
        format!(
            "{} steps, {:.1} h simulated, {} kills, {} etcd freezes, {} recoveries checked{}, in {secs:.1} s ({:.0} steps/s); peak draw of holders {:.3} of the budget",
            self.steps,
            self.sim_ms as f64 / 3.6e6,
            self.kills,
            self.freezes,
            self.recoveries_checked,
            match self.recoveries_missed {
                0 => String::new(),
                n => format!(" ({n} missed: counted, not failed)"),
            },
            self.steps as f64 / secs.max(1e-9),
            self.peak_share
        )
    }
}

/// `sluice sim-check --cluster`: seeds from `first` on.
pub fn run(
    first: u64,
    seeds: u64,
    steps: u64,
    quiet: bool,
    keep_going: bool,
    safety_only: bool,
) -> Result<u64, String> {
    run_seeds("sim-check --cluster", first, seeds, quiet, keep_going, |seed| run_seed(seed, steps, safety_only))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_seed_replays_exactly() {
        let a = run_seed(3, 3_000, false).map_err(|f| f.to_string());
        let b = run_seed(3, 3_000, false).map_err(|f| f.to_string());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!((a.steps, a.sim_ms, a.kills), (b.steps, b.sim_ms, b.kills)),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("one seed, two runs: {a:?} / {b:?}"),
        }
    }

    /// The store's semantics the agent relies on.
    #[test]
    fn the_store_revokes_a_lease_with_its_keys_and_fences_by_create_revision() {
        let mut e = Etcd::default();
        let l = e.grant(3_000, 0);
        assert_eq!(e.put("p", Val::Planner("a".into()), 99), None, "no write on a lease etcd does not know");
        let r1 = e.put("p", Val::Planner("a".into()), l).unwrap();
        let r2 = e.put("p", Val::Planner("a".into()), l).unwrap();
        assert_eq!((e.create_revision("p"), e.mod_revision("p")), (r1, r2));
        assert!(e.keep_alive(l, 3_000, 2_000));
        e.expire(4_999);
        assert_eq!(e.create_revision("p"), r1, "kept alive to 5 s");
        e.expire(5_000);
        assert_eq!(e.create_revision("p"), 0, "gone with its lease");
        assert!(!e.keep_alive(l, 3_000, 5_000), "a lease that ran out is not known");
        let r3 = e.put("p", Val::Planner("b".into()), 0).unwrap();
        assert!(r3 > r2, "a new key, a new create revision: the old planner is fenced out");
    }
}
