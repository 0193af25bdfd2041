//! The curtailment controller: one task owns every miner's curtailment state,
//! the budget in force and the resume ramp. Sessions register with it; the
//! control server sends it requests; hooks report back to it. The policy it
//! applies is in [`super::policy`].

use super::hooks::{self, HookAction, HookDone, HookSpec};
use super::policy::{self, MinerState, MinerView, PolicyParams};
use super::power::{Estimate, FirmwareReading, PowerModel};
use super::schedule::{self, Amount, Window};
use super::{CurtailConfig, LeaseFallback, Method};
use crate::control::types::{
    BudgetSource, BudgetStatus, Event, Figures, HashesPerSec, JoulesPerTh, Matched, MinerRow, Plan, PlannedMiner,
    Reply, Resuming, ScopeFigures, Stamped, Status, Watts,
};
pub use crate::downstream::signal::{SessionCmd, SessionSignal};
use crate::stats::AtomicF64;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};
use wildmatch::WildMatch;

/// A miner session's registration.
pub struct MinerLink {
    pub worker: Arc<str>,
    pub addr: SocketAddr,
    pub session: u64,
    pub cmd: Arc<SessionSignal>,
    /// Hashrate measured from the miner's shares, in H/s.
    pub hashrate: Arc<AtomicF64>,
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("invalid params: {0}")]
    InvalidParams(String),
    #[error("the controller has stopped")]
    Stopped,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    Site,
    Group(String),
    Workers(String),
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "site" {
            Ok(Scope::Site)
        } else if let Some(g) = s.strip_prefix("group:") {
            Ok(Scope::Group(g.to_owned()))
        } else if let Some(p) = s.strip_prefix("workers:") {
            Ok(Scope::Workers(p.to_owned()))
        } else {
            Err(format!("scope {s:?}: use site, group:NAME or workers:PATTERN"))
        }
    }
    fn name(&self) -> String {
        match self {
            Scope::Site => "site".into(),
            Scope::Group(g) => format!("group:{g}"),
            Scope::Workers(p) => format!("workers:{p}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BudgetParams {
    pub amount: Amount,
    pub scope: Scope,
    pub lease: Option<Duration>,
    pub ramp_up: Option<Duration>,
    pub dry_run: bool,
    pub reason: String,
    pub max_listed: usize,
}

/// A request from the control protocol.
#[derive(Debug)]
pub enum ControlReq {
    Status { miners: bool },
    SetBudget(BudgetParams),
    ResumeAll { reason: String },
    SetProtection { pattern: String, protected: bool },
}

enum Req {
    Reconfigure(Box<CurtailConfig>, oneshot::Sender<Result<(), String>>),
    Register(MinerLink, oneshot::Sender<bool>),
    Deregister { key: String, session: u64 },
    Control(ControlReq, oneshot::Sender<Result<Reply, ControlError>>),
    Hook(HookDone),
}

/// Figures for one group, refreshed once a second for the metrics.
#[derive(Debug, Clone, Default)]
pub struct GroupFigures {
    pub name: String,
    pub mining: usize,
    pub parked: usize,
    pub watts: f64,
    pub hashrate_hs: f64,
}

#[derive(Debug, Clone, Default)]
pub struct CurtailSnapshot {
    pub groups: Vec<GroupFigures>,
    pub budget_w: Option<f64>,
}

/// A handle on the controller task.
#[derive(Clone)]
pub struct Curtailer {
    tx: mpsc::Sender<Req>,
    events: broadcast::Sender<Arc<Stamped>>,
    snapshot: Arc<parking_lot::Mutex<Arc<CurtailSnapshot>>>,
}

impl Curtailer {
    /// Register a miner that has authorized. Returns true when it must stay
    /// parked (no work).
    pub async fn register(&self, link: MinerLink) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Req::Register(link, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
    pub async fn deregister(&self, worker: &str, addr: SocketAddr, session: u64) {
        let _ = self.tx.send(Req::Deregister { key: key(worker, addr), session }).await;
    }
    pub async fn request(&self, r: ControlReq) -> Result<Reply, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Req::Control(r, tx)).await.map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }
    /// `status`, typed.
    pub async fn status(&self, miners: bool) -> Result<Status, ControlError> {
        match self.request(ControlReq::Status { miners }).await? {
            Reply::Status(s) => Ok(*s),
            other => unreachable!("status answered with {other:?}"),
        }
    }
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Stamped>> {
        self.events.subscribe()
    }
    /// Apply new curtailment settings (a config reload): power model,
    /// groups, schedule, ramp, hold and fallback. Budgets and miner states
    /// are kept.
    pub async fn reconfigure(&self, cfg: CurtailConfig) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Req::Reconfigure(Box::new(cfg), tx)).await.map_err(|_| "controller stopped".to_owned())?;
        rx.await.map_err(|_| "controller stopped".to_owned())?
    }

    /// The latest per-group figures (at most a second old).
    pub fn snapshot(&self) -> Arc<CurtailSnapshot> {
        self.snapshot.lock().clone()
    }
}

fn key(worker: &str, addr: SocketAddr) -> String {
    format!("{}/{}", addr.ip(), worker)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Link {
    session: u64,
    cmd: Arc<SessionSignal>,
    hashrate: Arc<AtomicF64>,
}

struct Miner {
    key: String,
    worker: Arc<str>,
    addr: SocketAddr,
    group: usize,
    rule: Option<usize>,
    protected: bool,
    state: MinerState,
    changed_at: Instant,
    link: Option<Link>,
    fw: Option<FirmwareReading>,
    est: Estimate,
    /// Parked at the network level (the method, or a failed hook's fallback).
    net_parked: bool,
    /// Bumped on every state change; a hook retry for an older one stops.
    generation: u64,
    disconnected_at: Option<Instant>,
}

struct Budget {
    amount: Amount,
    scope: Scope,
    source: BudgetSource,
    reason: String,
    lease_until: Option<Instant>,
    set_at_ms: u64,
    ramp_w_per_s: Option<f64>,
    met: Option<bool>,
}

struct Group {
    name: String,
    pattern: WildMatch,
    spec: Arc<HookSpec>,
}

struct State {
    cfg: CurtailConfig,
    power: PowerModel,
    groups: Vec<Group>,
    protect_rules: Vec<(WildMatch, bool)>,
    schedule: Vec<Window>,
    miners: Vec<Miner>,
    index: HashMap<String, usize>,
    budget: Option<Budget>,
    resume_queue: VecDeque<(String, u64)>,
    ramp_tokens: f64,
    next_plan_id: u64,
    events: broadcast::Sender<Arc<Stamped>>,
    hooks_tx: mpsc::Sender<Req>,
    dirty: bool,
    last_prune: Instant,
    last_snapshot: Instant,
    /// Shared with [`Curtailer::snapshot`]; the lock only swaps an Arc.
    snapshot: Arc<parking_lot::Mutex<Arc<CurtailSnapshot>>>,
}

/// Start the controller task.
type Built = (PowerModel, Vec<Group>, Vec<Window>);

/// The parts of the state a config determines.
fn build(cfg: &CurtailConfig) -> Result<Built, String> {
    let power = PowerModel::new(&cfg.power, &cfg.model, cfg.default_watts, cfg.default_j_per_th)?;
    let mut groups: Vec<Group> = cfg
        .group
        .iter()
        .map(|g| Group {
            name: g.name.clone(),
            pattern: WildMatch::new(&g.pattern),
            spec: Arc::new(HookSpec::from_config(g)),
        })
        .collect();
    groups.push(Group {
        name: "default".into(),
        pattern: WildMatch::new("*"),
        spec: Arc::new(HookSpec::from_config(&super::GroupConfig::default())),
    });
    let schedule = cfg.schedule.iter().map(Window::parse).collect::<Result<Vec<_>, _>>()?;
    Ok((power, groups, schedule))
}

/// Start the controller task.
pub fn spawn(cfg: CurtailConfig) -> Result<Curtailer, String> {
    let (power, groups, schedule) = build(&cfg)?;
    let (tx, rx) = mpsc::channel(4096);
    let (events, _) = broadcast::channel(4096);
    let snapshot = Arc::new(parking_lot::Mutex::new(Arc::new(CurtailSnapshot::default())));
    let st = State {
        cfg,
        power,
        groups,
        protect_rules: Vec::new(),
        schedule,
        miners: Vec::new(),
        index: HashMap::new(),
        budget: None,
        resume_queue: VecDeque::new(),
        ramp_tokens: 0.0,
        next_plan_id: 1,
        events: events.clone(),
        hooks_tx: tx.clone(),
        dirty: false,
        last_prune: Instant::now(),
        last_snapshot: Instant::now(),
        snapshot: snapshot.clone(),
    };
    tokio::spawn(run(st, rx));
    Ok(Curtailer { tx, events, snapshot })
}

const TICK: Duration = Duration::from_millis(100);

async fn run(mut st: State, mut rx: mpsc::Receiver<Req>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    let mut last_plan = Instant::now();
    loop {
        tokio::select! {
            req = rx.recv() => match req {
                None => break,
                Some(r) => st.handle(r),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let dt = now.duration_since(last_tick).as_secs_f64();
                last_tick = now;
                st.on_tick(now, dt, &mut last_plan);
            }
        }
    }
}

impl State {
    fn emit(&self, event: Event) {
        let _ = self.events.send(Arc::new(Stamped { at_ms: now_ms(), event }));
    }

    fn group_of(&self, worker: &str) -> usize {
        self.groups.iter().position(|g| g.pattern.matches(worker)).unwrap_or(self.groups.len() - 1)
    }

    fn is_protected(&self, worker: &str) -> bool {
        self.protect_rules.iter().rev().find(|(p, _)| p.matches(worker)).is_some_and(|(_, prot)| *prot)
    }

    fn handle(&mut self, r: Req) {
        match r {
            Req::Reconfigure(cfg, reply) => {
                let _ = reply.send(self.reconfigure(*cfg));
            }
            Req::Register(link, reply) => {
                let _ = reply.send(self.register(link));
            }
            Req::Deregister { key, session } => self.deregister(&key, session),
            Req::Control(c, reply) => {
                let _ = reply.send(self.control(c));
            }
            Req::Hook(done) => self.on_hook(done),
        }
    }

    fn reconfigure(&mut self, cfg: CurtailConfig) -> Result<(), String> {
        let (power, groups, schedule) = build(&cfg)?;
        self.power = power;
        self.groups = groups;
        self.schedule = schedule;
        self.cfg = cfg;
        for i in 0..self.miners.len() {
            let w = self.miners[i].worker.clone();
            self.miners[i].group = self.group_of(&w);
            self.miners[i].rule = self.power.rule_for(&w);
        }
        self.dirty = true;
        Ok(())
    }

    fn register(&mut self, l: MinerLink) -> bool {
        let k = key(&l.worker, l.addr);
        let link = Link { session: l.session, cmd: l.cmd, hashrate: l.hashrate };
        self.dirty = true;
        if let Some(&i) = self.index.get(&k) {
            let m = &mut self.miners[i];
            m.link = Some(link);
            m.addr = l.addr;
            m.disconnected_at = None;
            return m.state == MinerState::Parked && m.net_parked;
        }
        let group = self.group_of(&l.worker);
        let rule = self.power.rule_for(&l.worker);
        let protected = self.is_protected(&l.worker);
        let est = self.power.estimate(rule, 0.0, None);
        self.index.insert(k.clone(), self.miners.len());
        self.miners.push(Miner {
            key: k,
            worker: l.worker,
            addr: l.addr,
            group,
            rule,
            protected,
            state: MinerState::Mining,
            changed_at: Instant::now(),
            link: Some(link),
            fw: None,
            est,
            net_parked: false,
            generation: 0,
            disconnected_at: None,
        });
        false
    }

    fn remove(&mut self, i: usize) {
        let m = self.miners.swap_remove(i);
        self.index.remove(&m.key);
        if let Some(moved) = self.miners.get(i) {
            self.index.insert(moved.key.clone(), i);
        }
    }

    fn deregister(&mut self, key: &str, session: u64) {
        let Some(&i) = self.index.get(key) else { return };
        if self.miners[i].link.as_ref().is_some_and(|l| l.session != session) {
            return; // a newer session of the same miner took over
        }
        self.dirty = true;
        if self.miners[i].state == MinerState::Parked {
            // Remember it: when it reconnects it must stay parked.
            self.miners[i].link = None;
            self.miners[i].disconnected_at = Some(Instant::now());
        } else {
            self.remove(i);
        }
    }

    /// Refresh estimates and build the policy's view of the connected miners.
    fn views(&mut self, scope: Option<&Scope>) -> (Vec<usize>, Vec<MinerView>) {
        let mut idx = Vec::with_capacity(self.miners.len());
        let mut views = Vec::with_capacity(self.miners.len());
        let scope_pattern = match scope {
            Some(Scope::Workers(p)) => Some(WildMatch::new(p)),
            _ => None,
        };
        // Every known miner: the connected ones, and parked ones that are
        // away (a network-parked miner reconnects, and counts towards the
        // fleet a fraction budget is taken of). Mining miners that leave are
        // forgotten at once, so they never count here.
        for (i, m) in self.miners.iter_mut().enumerate() {
            if let Some(link) = &m.link {
                m.est = self.power.estimate(m.rule, link.hashrate.get(), m.fw);
            }
            let in_scope = match scope {
                None | Some(Scope::Site) => true,
                Some(Scope::Group(g)) => self.groups[m.group].name == *g,
                Some(Scope::Workers(_)) => scope_pattern.as_ref().is_some_and(|p| p.matches(&m.worker)),
            };
            idx.push(i);
            views.push(MinerView {
                watts: m.est.watts,
                j_per_th: m.est.j_per_th,
                state: m.state,
                protected: m.protected,
                in_scope,
                changed_at: m.changed_at,
            });
        }
        (idx, views)
    }

    fn budget_watts(amount: Amount, views: &[MinerView]) -> f64 {
        match amount {
            Amount::Watts(w) => w,
            Amount::Fraction(f) => f * policy::total_watts(views),
        }
    }

    fn planned(&self, i: usize) -> PlannedMiner {
        let m = &self.miners[i];
        PlannedMiner {
            miner: m.key.clone(),
            worker: m.worker.to_string(),
            watts: Watts(m.est.watts),
            watts_source: m.est.watts_source,
            j_per_th: JoulesPerTh(m.est.j_per_th),
            efficiency_source: m.est.efficiency_source,
        }
    }

    fn set_state(&mut self, i: usize, s: MinerState) {
        let m = &mut self.miners[i];
        m.state = s;
        m.changed_at = Instant::now();
        m.generation += 1;
    }

    /// Park a miner now: its hook, or the network.
    fn park(&mut self, i: usize, reason: &str) {
        self.set_state(i, MinerState::Parked);
        let m = &self.miners[i];
        let spec = self.groups[m.group].spec.clone();
        if spec.method == Method::Network {
            self.net_park(i);
        } else {
            self.spawn_hook(i, HookAction::Park, reason);
        }
        let m = &self.miners[i];
        self.emit(Event::MinerParked {
            miner: m.key.clone(),
            watts: Watts(m.est.watts),
            hook: spec.method,
            reason: reason.to_owned(),
        });
    }

    fn spawn_hook(&self, i: usize, action: HookAction, reason: &str) {
        let m = &self.miners[i];
        let spec = self.groups[m.group].spec.clone();
        let tx = self.hooks_tx.clone();
        hooks::spawn(
            spec,
            action,
            m.key.clone(),
            m.worker.clone(),
            m.addr,
            reason.to_owned(),
            m.generation,
            tx,
            Req::Hook,
        );
    }

    fn net_park(&mut self, i: usize) {
        let m = &mut self.miners[i];
        m.net_parked = true;
        if let Some(l) = &m.link {
            l.cmd.send(SessionCmd::Park);
        }
    }

    /// Resume a miner now (its turn in the ramp has come).
    fn resume(&mut self, i: usize, reason: &str) {
        self.set_state(i, MinerState::Mining);
        let m = &mut self.miners[i];
        let spec = self.groups[m.group].spec.clone();
        if m.net_parked {
            m.net_parked = false;
            if let Some(l) = &m.link {
                l.cmd.send(SessionCmd::Resume);
            }
        }
        if spec.method != Method::Network {
            self.spawn_hook(i, HookAction::Resume, reason);
        }
        let m = &self.miners[i];
        self.emit(Event::MinerResumed {
            miner: m.key.clone(),
            watts: Watts(m.est.watts),
            hook: spec.method,
            reason: reason.to_owned(),
        });
        if m.link.is_none() {
            // Parked and gone: it will register afresh, as mining.
            self.remove(i);
        }
    }

    fn queue_resume(&mut self, i: usize) {
        if self.miners[i].state == MinerState::Parked {
            self.set_state(i, MinerState::Resuming);
            self.resume_queue.push_back((self.miners[i].key.clone(), self.miners[i].generation));
        }
    }

    fn reason(&self) -> String {
        self.budget.as_ref().map(|b| b.reason.clone()).unwrap_or_default()
    }

    fn on_hook(&mut self, d: HookDone) {
        let Some(&i) = self.index.get(&d.key) else { return };
        if self.miners[i].generation != d.generation {
            return;
        }
        match d.result {
            Ok(reading) => {
                let m = &mut self.miners[i];
                // A reading taken while mining is what the miner draws; one
                // taken asleep only confirms the park.
                if let (HookAction::Resume, Some(r)) = (d.action, reading) {
                    m.fw = Some(r);
                }
                let m = &self.miners[i];
                let method = self.groups[m.group].spec.method;
                if method != Method::Network {
                    self.emit(Event::HookOk {
                        miner: m.key.clone(),
                        hook: method,
                        action: d.action,
                        watts: reading.map(|r| Watts(r.watts)),
                        hashrate_hs: reading.map(|r| HashesPerSec(r.hashrate_hs)),
                    });
                }
            }
            Err(e) => {
                let m = &self.miners[i];
                self.emit(Event::HookFailed {
                    miner: m.key.clone(),
                    hook: self.groups[m.group].spec.method,
                    action: d.action,
                    error: e.clone(),
                    retry_in_s: d.retry_in.map(|r| r.as_secs_f64()),
                });
                warn!(miner = %m.key, action = ?d.action, "curtailment hook failed: {e}");
                // Until the hook succeeds, stop the miner's revenue at least.
                if d.action == HookAction::Park && !self.miners[i].net_parked {
                    self.net_park(i);
                }
            }
        }
    }

    fn plan_reply(
        &self,
        id: u64,
        b: &BudgetParams,
        budget_w: f64,
        idx: &[usize],
        views: &[MinerView],
        p: &policy::Plan,
    ) -> Plan {
        let mining_before = views.iter().filter(|v| v.in_scope && v.state != MinerState::Parked).count();
        let parked_before = views.iter().filter(|v| v.in_scope && v.state == MinerState::Parked).count();
        let mining_after = mining_before - p.park.len() + p.resume.len();
        let list = |v: &[usize]| v.iter().take(b.max_listed).map(|&j| self.planned(idx[j])).collect::<Vec<_>>();
        Plan {
            plan_id: id,
            dry_run: b.dry_run,
            scope: b.scope.name(),
            budget_w: Watts(budget_w),
            before: ScopeFigures { mining: mining_before, parked: parked_before, watts: Watts(p.before_w) },
            expected: ScopeFigures {
                mining: mining_after,
                parked: parked_before + p.park.len() - p.resume.len(),
                watts: Watts(p.expected_w),
            },
            budget_met: p.budget_met,
            park: list(&p.park),
            resume: list(&p.resume),
            park_count: p.park.len(),
            resume_count: p.resume.len(),
            lease_expires_in_s: b.lease.map(|l| l.as_secs_f64()),
        }
    }

    fn control(&mut self, c: ControlReq) -> Result<Reply, ControlError> {
        match c {
            ControlReq::Status { miners } => Ok(Reply::Status(Box::new(self.status(miners)))),
            ControlReq::SetBudget(b) => {
                let (idx, views) = self.views(Some(&b.scope));
                let budget_w = Self::budget_watts(b.amount, &views);
                let params = self.policy_params(budget_w);
                let p = policy::plan(&views, &params);
                let id = self.next_plan_id;
                self.next_plan_id += 1;
                let out = Reply::Plan(Box::new(self.plan_reply(id, &b, budget_w, &idx, &views, &p)));
                if b.dry_run {
                    return Ok(out);
                }
                info!(plan = id, budget_w, scope = %b.scope.name(), reason = %b.reason, park = p.park.len(), resume = p.resume.len(), "budget set");
                self.budget = Some(Budget {
                    amount: b.amount,
                    scope: b.scope.clone(),
                    source: BudgetSource::Command,
                    reason: b.reason.clone(),
                    lease_until: b.lease.map(|l| Instant::now() + l),
                    set_at_ms: now_ms(),
                    ramp_w_per_s: b.ramp_up.map(|r| {
                        (p.resume.iter().map(|&j| views[j].watts).sum::<f64>() / r.as_secs_f64().max(0.001)).max(1.0)
                    }),
                    met: None,
                });
                self.apply(&idx, &p, id, budget_w);
                Ok(out)
            }
            ControlReq::ResumeAll { reason } => {
                self.budget = None;
                let n = self.resume_everything();
                info!(reason = %reason, resuming = n, "resume_all");
                Ok(Reply::Resuming(Resuming { resuming: n }))
            }
            ControlReq::SetProtection { pattern, protected } => {
                let p = WildMatch::new(&pattern);
                let mut matched = 0;
                for i in 0..self.miners.len() {
                    if p.matches(&self.miners[i].worker) {
                        matched += 1;
                        self.miners[i].protected = protected;
                        if protected && self.miners[i].state == MinerState::Parked {
                            self.queue_resume(i);
                        }
                    }
                }
                self.protect_rules.push((p, protected));
                self.dirty = true;
                Ok(Reply::Matched(Matched { matched }))
            }
        }
    }

    fn resume_everything(&mut self) -> usize {
        let mut parked: Vec<usize> =
            (0..self.miners.len()).filter(|&i| self.miners[i].state == MinerState::Parked).collect();
        parked.sort_by(|&a, &b| self.miners[a].est.j_per_th.total_cmp(&self.miners[b].est.j_per_th));
        for &i in &parked {
            self.queue_resume(i);
        }
        parked.len()
    }

    fn policy_params(&self, budget_w: f64) -> PolicyParams {
        PolicyParams {
            budget_w,
            hold: self.cfg.hold_s.get(),
            hysteresis_w: budget_w * self.cfg.hysteresis_fraction,
            now: Instant::now(),
        }
    }

    fn apply(&mut self, idx: &[usize], p: &policy::Plan, id: u64, budget_w: f64) {
        let reason = self.reason();
        for &j in &p.park {
            self.park(idx[j], &reason);
        }
        for &j in &p.resume {
            self.queue_resume(idx[j]);
        }
        if !p.park.is_empty() || !p.resume.is_empty() {
            let scope = self.budget.as_ref().map(|b| b.scope.name()).unwrap_or_default();
            self.emit(Event::PlanApplied {
                plan_id: id,
                budget_w: Watts(budget_w),
                scope,
                park_count: p.park.len(),
                resume_count: p.resume.len(),
                expected_w: Watts(p.expected_w),
                reason,
            });
        }
    }

    fn on_tick(&mut self, now: Instant, dt: f64, last_plan: &mut Instant) {
        // Lease expiry.
        if let Some(b) = &self.budget {
            if b.source == BudgetSource::Command && b.lease_until.is_some_and(|t| now >= t) {
                let fallback = self.cfg.lease_fallback;
                let (amount, scope) = (b.amount, b.scope.clone());
                let fraction = match amount {
                    Amount::Fraction(f) => Some(f),
                    Amount::Watts(_) => None,
                };
                let budget_w = Self::budget_watts(amount, &self.views(Some(&scope)).1);
                self.emit(Event::LeaseExpired { budget_w: Watts(budget_w), fraction, fallback });
                info!(?fallback, "budget lease expired");
                match fallback {
                    LeaseFallback::Hold => {
                        if let Some(b) = self.budget.as_mut() {
                            b.source = BudgetSource::LeaseFallback;
                            b.lease_until = None;
                        }
                    }
                    LeaseFallback::Resume => {
                        self.budget = None;
                        self.resume_everything();
                    }
                }
            }
        }
        // The schedule applies whenever no command (or its fallback) is in force.
        if !self.schedule.is_empty() && !self.budget.as_ref().is_some_and(|b| b.source != BudgetSource::Schedule) {
            let want = schedule::active(&self.schedule, schedule::utc_second_of_day());
            let have = self.budget.as_ref().map(|b| b.amount);
            if want != have {
                self.budget = want.map(|amount| Budget {
                    amount,
                    scope: Scope::Site,
                    source: BudgetSource::Schedule,
                    reason: "schedule".into(),
                    lease_until: None,
                    set_at_ms: now_ms(),
                    ramp_w_per_s: None,
                    met: None,
                });
                self.dirty = true;
            }
        }
        // Enforce the budget: on changes at once, otherwise once a second
        // (hashrates, and so watts, drift).
        if self.budget.is_some() && (self.dirty || now.duration_since(*last_plan) >= Duration::from_secs(1)) {
            *last_plan = now;
            self.dirty = false;
            let scope = self.budget.as_ref().map(|b| b.scope.clone());
            let (idx, views) = self.views(scope.as_ref());
            let amount = self.budget.as_ref().map(|b| b.amount).expect("checked");
            let budget_w = Self::budget_watts(amount, &views);
            let p = policy::plan(&views, &self.policy_params(budget_w));
            let id = self.next_plan_id;
            if !p.park.is_empty() || !p.resume.is_empty() {
                self.next_plan_id += 1;
            }
            self.apply(&idx, &p, id, budget_w);
            let met = p.budget_met;
            if let Some(b) = self.budget.as_mut() {
                if b.met != Some(met) && self.resume_queue.is_empty() {
                    b.met = Some(met);
                    let (a, mining, parked) = self.achieved(scope.as_ref());
                    let (budget_w, achieved_w) = (Watts(budget_w), Watts(a));
                    self.emit(if met {
                        Event::BudgetMet { budget_w, achieved_w, mining, parked }
                    } else {
                        Event::BudgetNotMet { budget_w, achieved_w, mining, parked }
                    });
                }
            }
        }
        // The ramp: resume queued miners as the watt allowance accrues.
        let rate = self.budget.as_ref().and_then(|b| b.ramp_w_per_s).unwrap_or(self.cfg.ramp_up_w_per_s);
        if self.resume_queue.is_empty() {
            self.ramp_tokens = 0.0;
        } else {
            self.ramp_tokens += rate * dt;
        }
        let reason = self.reason();
        while let Some((k, gen)) = self.resume_queue.front().cloned() {
            let Some(&i) = self.index.get(&k) else {
                self.resume_queue.pop_front();
                continue;
            };
            if self.miners[i].generation != gen || self.miners[i].state != MinerState::Resuming {
                self.resume_queue.pop_front();
                continue;
            }
            let w = self.miners[i].est.watts;
            if self.ramp_tokens < w {
                break;
            }
            self.ramp_tokens -= w;
            self.resume_queue.pop_front();
            self.resume(i, &reason);
        }
        if now.duration_since(self.last_snapshot) >= Duration::from_secs(1) {
            self.last_snapshot = now;
            self.publish_snapshot();
        }
        // Forget parked miners that never came back (checked once a minute).
        if now.duration_since(self.last_prune) >= Duration::from_secs(60) {
            self.last_prune = now;
            let stale: Vec<usize> = (0..self.miners.len())
                .rev()
                .filter(|&i| {
                    self.miners[i].disconnected_at.is_some_and(|t| now.duration_since(t) > Duration::from_secs(86_400))
                })
                .collect();
            for i in stale {
                self.remove(i);
            }
        }
    }

    fn publish_snapshot(&mut self) {
        let mut groups: Vec<GroupFigures> =
            self.groups.iter().map(|g| GroupFigures { name: g.name.clone(), ..Default::default() }).collect();
        for m in &self.miners {
            let g = &mut groups[m.group];
            if m.state == MinerState::Parked {
                g.parked += 1;
            } else {
                g.mining += 1;
                g.watts += m.est.watts;
                g.hashrate_hs += m.link.as_ref().map(|l| l.hashrate.get()).unwrap_or(0.0);
            }
        }
        let budget_w = self.budget.as_ref().map(|b| match b.amount {
            Amount::Watts(w) => w,
            Amount::Fraction(f) => f * self.miners.iter().map(|m| m.est.watts).sum::<f64>(),
        });
        *self.snapshot.lock() = Arc::new(CurtailSnapshot { groups, budget_w });
    }

    /// Achieved watts, mining and parked counts in a scope.
    fn achieved(&mut self, scope: Option<&Scope>) -> (f64, usize, usize) {
        let (_, views) = self.views(scope);
        let m = views.iter().filter(|v| v.in_scope && v.state == MinerState::Mining).count();
        let p = views.iter().filter(|v| v.in_scope && v.state != MinerState::Mining).count();
        let w = views.iter().filter(|v| v.in_scope && v.state == MinerState::Mining).map(|v| v.watts).sum();
        (w, m, p)
    }

    fn status(&mut self, list: bool) -> Status {
        let (idx, views) = self.views(None);
        let mut groups: std::collections::BTreeMap<String, Figures> = Default::default();
        let mut site = Figures::default();
        for (k, v) in idx.iter().zip(&views) {
            let m = &self.miners[*k];
            let hs = m.link.as_ref().map(|l| l.hashrate.get()).unwrap_or(0.0);
            let mining = v.state == MinerState::Mining;
            for f in [&mut site, groups.entry(self.groups[m.group].name.clone()).or_default()] {
                f.connected += 1;
                f.fleet_watts.0 += v.watts;
                if mining {
                    f.mining += 1;
                    f.watts.0 += v.watts;
                    f.hashrate_hs.0 += hs;
                } else {
                    f.parked += 1;
                }
            }
        }
        let scope = self.budget.as_ref().map(|b| b.scope.clone());
        let scoped = scope.map(|s| self.views(Some(&s)).1);
        let budget = match (&self.budget, scoped) {
            (Some(b), Some(v2)) => BudgetStatus {
                source: b.source,
                watts: Some(Watts(Self::budget_watts(b.amount, &v2))),
                scope: Some(b.scope.name()),
                reason: Some(b.reason.clone()),
                lease_expires_in_s: b.lease_until.map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64()),
                met: b.met,
                set_at_ms: Some(b.set_at_ms),
            },
            _ => BudgetStatus::NONE,
        };
        let miners = list.then(|| {
            self.miners
                .iter()
                .map(|m| MinerRow {
                    miner: m.key.clone(),
                    worker: m.worker.to_string(),
                    group: self.groups[m.group].name.clone(),
                    state: m.state,
                    connected: m.link.is_some(),
                    model: m.rule.and_then(|r| self.power.model_of(r)).map(str::to_owned),
                    protected: m.protected,
                    watts: Watts(m.est.watts),
                    watts_source: m.est.watts_source,
                    j_per_th: JoulesPerTh(m.est.j_per_th),
                    efficiency_source: m.est.efficiency_source,
                    hook: self.groups[m.group].spec.method,
                })
                .collect()
        });
        Status { site, groups, budget, resuming: self.resume_queue.len(), miners }
    }
}
