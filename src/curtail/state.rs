//! The curtailment state machine: every miner's curtailment state, the
//! budget in force and the resume ramp. Pure: fed inputs with the time
//! ([`Clock`]), it answers and queues [`Effect`]s (events, words to sessions,
//! hook runs) that the controller task carries out. Tested with tables of
//! inputs and expected effects, no sockets and no sleeping.

use super::closed_loop::{Calibration, Feed, FeedChange, Follow, Sample, Verdict};
use super::hooks::{HookAction, HookDone, HookSpec};
use super::policy::{self, MinerState, MinerView, PolicyParams};
use super::power::{Estimate, FirmwareReading, PowerModel};
use super::schedule::{self, Amount, Window};
use super::store::{Saved, SavedAmount, SavedBudget, SavedRule};
use super::{CurtailConfig, LeaseFallback, Method};
use crate::control::types::{
    BudgetSource, BudgetStatus, CalibrationStatus, Cause, Event, FeedStatus, Figures, FollowStatus, HashesPerSec,
    JoulesPerTh, Matched, MetBy, MinerId, MinerRef, MinerRow, Plan, PlannedMiner, Reply, Resuming, ScopeFigures,
    Stamped, Status, Watts,
};
use crate::downstream::signal::{Member, SessionCmd};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, info, warn};
use wildmatch::WildMatch;

/// What registering a miner session answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The miner this connection is.
    pub miner: MinerId,
    /// It must stay parked: no work.
    pub parked: bool,
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
    Workers(Glob),
}

/// A worker glob, compiled once (it is matched against every miner at
/// every plan and every admission).
#[derive(Debug, Clone)]
pub struct Glob {
    text: String,
    glob: WildMatch,
}

impl From<&str> for Glob {
    fn from(s: &str) -> Glob {
        Glob { text: s.to_owned(), glob: WildMatch::new(s) }
    }
}

impl PartialEq for Glob {
    fn eq(&self, o: &Glob) -> bool {
        self.text == o.text
    }
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "site" {
            Ok(Scope::Site)
        } else if let Some(g) = s.strip_prefix("group:") {
            Ok(Scope::Group(g.to_owned()))
        } else if let Some(p) = s.strip_prefix("workers:") {
            Ok(Scope::Workers(p.into()))
        } else {
            Err(format!("scope {s:?}: use site, group:NAME or workers:PATTERN"))
        }
    }
    /// Does a miner of this group, under this worker name, fall in it?
    fn contains(&self, group: &str, worker: &str) -> bool {
        match self {
            Scope::Site => true,
            Scope::Group(g) => g == group,
            Scope::Workers(p) => p.glob.matches(worker),
        }
    }
    fn name(&self) -> String {
        match self {
            Scope::Site => "site".into(),
            Scope::Group(g) => format!("group:{g}"),
            Scope::Workers(p) => format!("workers:{}", p.text),
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
    /// The feeds configured: name (`meter`, `other_load`), last good
    /// reading, stale, failed reads so far.
    pub feeds: Vec<FeedFigures>,
    /// What every estimate is scaled by.
    pub calibration: f64,
}

#[derive(Debug, Clone, Default)]
pub struct FeedFigures {
    pub name: &'static str,
    pub watts: Option<f64>,
    pub stale: bool,
    pub errors: u64,
}

/// Which feed a reading comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedId {
    /// `[curtail.meter]`: what the miners draw.
    Meter,
    /// `[curtail.follow.other_load]`: what the other tenant draws.
    OtherLoad,
}

impl FeedId {
    pub fn name(self) -> &'static str {
        match self {
            FeedId::Meter => "meter",
            FeedId::OtherLoad => "other_load",
        }
    }
}

/// The meter and what it reads.
struct Metered {
    feed: Feed,
    source: String,
}

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
}

/// What the state asks the world to do.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Tell subscribers.
    Event(Stamped),
    /// Tell a miner session.
    Signal(Arc<Member>, SessionCmd),
    /// Run a hook (its outcome comes back as [`State::on_hook`]).
    Hook(HookJob),
    /// What must survive a restart changed: write it to the state file
    /// (before a request that changed it is answered).
    Persist(Box<Saved>),
}

/// A `set_protection` rule.
struct ProtectRule {
    pattern: String,
    matcher: WildMatch,
    protected: bool,
}

/// A connected miner's session (its id, command slot and hashrate).
struct Link {
    member: Arc<Member>,
}

impl Link {
    fn session(&self) -> u64 {
        self.member.info.session
    }
    fn hashrate(&self) -> f64 {
        self.member.info.hashrate.get()
    }
}

struct Miner {
    id: MinerId,
    worker: Arc<str>,
    addr: SocketAddr,
    group: usize,
    rule: Option<usize>,
    protected: bool,
    state: MinerState,
    changed_at: Instant,
    /// `changed_at` as Unix milliseconds, for status.
    changed_ms: u64,
    link: Option<Link>,
    fw: Option<FirmwareReading>,
    /// When `fw` was read.
    fw_at: Option<Instant>,
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
    /// The same, as Unix milliseconds (what the state file keeps).
    lease_until_ms: Option<u64>,
    set_at_ms: u64,
    ramp_w_per_s: Option<f64>,
    met: Option<bool>,
    met_by: MetBy,
    /// The last plan applied for it (what its events name).
    plan_id: u64,
}

/// Watts in the budget's scope: drawn (mining or resuming) and in all.
#[derive(Debug, Clone, Copy, Default)]
struct Admission {
    drawn_w: f64,
    fleet_w: f64,
}

struct Group {
    name: String,
    pattern: WildMatch,
    spec: Arc<HookSpec>,
}

pub struct State {
    cfg: CurtailConfig,
    power: PowerModel,
    groups: Vec<Group>,
    /// Oldest first; the last that matches wins. One per pattern.
    protect_rules: Vec<ProtectRule>,
    /// The last plan `set_budget` applied (kept in the state file).
    applied_plan: Option<Plan>,
    schedule: Vec<Window>,
    miners: Vec<Miner>,
    index: HashMap<MinerId, usize>,
    /// Parked miners whose connection ended, by source address and worker:
    /// a new connection that matches takes one over (and stays parked).
    away: HashMap<(IpAddr, Arc<str>), Vec<MinerId>>,
    budget: Option<Budget>,
    /// The budget's scope as of the last plan, plus the miners admitted
    /// since: what new connections are admitted against.
    admission: Admission,
    /// Miners waiting for the ramp: id, state generation, and the plan
    /// that resumes them.
    resume_queue: VecDeque<(MinerId, u64, Cause)>,
    ramp_tokens: f64,
    /// When the resume queue last went from empty to not: the ramp accrues
    /// from then, not from the tick before.
    ramp_from: Instant,
    next_plan_id: u64,
    dirty: bool,
    /// The time of the input being handled.
    clock: Clock,
    last_tick: Instant,
    last_plan: Instant,
    last_prune: Instant,
    /// Effects queued for the controller to carry out.
    out: Vec<Effect>,
    meter: Option<Metered>,
    calibration: Calibration,
    follow: Option<Follow>,
    /// When a firmware meter last asked for read-backs.
    last_fw_read: Instant,
}

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

impl State {
    pub fn new(cfg: CurtailConfig, clock: Clock) -> Result<State, String> {
        let (power, groups, schedule) = build(&cfg)?;
        let mut st = State {
            cfg,
            power,
            groups,
            protect_rules: Vec::new(),
            applied_plan: None,
            schedule,
            miners: Vec::new(),
            index: HashMap::new(),
            away: HashMap::new(),
            budget: None,
            admission: Admission::default(),
            resume_queue: VecDeque::new(),
            ramp_tokens: 0.0,
            ramp_from: clock.at,
            next_plan_id: 1,
            dirty: false,
            clock,
            last_tick: clock.at,
            last_plan: clock.at,
            last_prune: clock.at,
            out: Vec::new(),
            meter: None,
            calibration: Calibration::new(Duration::ZERO, false, clock.at),
            follow: None,
            last_fw_read: clock.at,
        };
        st.set_loop(clock);
        Ok(st)
    }

    /// The meter, calibration and follow mode of the config (a reload keeps
    /// the readings and the factor of a feed whose source is unchanged).
    fn set_loop(&mut self, clock: Clock) {
        let (meter_cfg, follow_cfg) = (self.cfg.meter.clone(), self.cfg.follow.clone());
        let factor = (self.calibration.factor, self.calibration.updated_ms);
        self.meter = meter_cfg.as_ref().map(|m| match self.meter.take() {
            Some(old) if old.source == m.source.describe() => old,
            _ => Metered { feed: Feed::new(m.stale_after_s.get(), clock.at), source: m.source.describe() },
        });
        self.calibration = match &meter_cfg {
            Some(m) => Calibration::new(m.settle_s.get(), m.calibrate, clock.at),
            None => Calibration::new(Duration::ZERO, false, clock.at),
        };
        if meter_cfg.is_some() {
            (self.calibration.factor, self.calibration.updated_ms) = factor;
        }
        self.rescale(factor.0);
        self.follow = follow_cfg.map(|f| {
            let mut new = Follow::new(f, clock.at);
            if let Some(old) = self.follow.take() {
                new.budget_w = old.budget_w;
                if old.cfg.other_load == new.cfg.other_load {
                    new.feed = old.feed;
                }
            }
            new
        });
    }

    /// The factor moved from `old`: scale the estimates kept (those of
    /// connected miners are recomputed at every plan).
    fn rescale(&mut self, old: f64) {
        let k = self.calibration.factor / old;
        if (k - 1.0).abs() > f64::EPSILON {
            for m in &mut self.miners {
                m.est.watts *= k;
            }
            self.dirty = true;
        }
    }

    /// The effects queued since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Effect::Event(Stamped { at_ms: self.clock.unix_ms, event }));
    }

    fn signal(&mut self, i: usize, cmd: SessionCmd) {
        if let Some(l) = &self.miners[i].link {
            self.out.push(Effect::Signal(l.member.clone(), cmd));
        }
    }

    fn group_of(&self, worker: &str) -> usize {
        self.groups.iter().position(|g| g.pattern.matches(worker)).unwrap_or(self.groups.len() - 1)
    }

    fn is_protected(&self, worker: &str) -> bool {
        self.protect_rules.iter().rev().find(|r| r.matcher.matches(worker)).is_some_and(|r| r.protected)
    }

    /// New settings (a reload): budgets and miner states are kept.
    pub fn reconfigure(&mut self, cfg: CurtailConfig) -> Result<(), String> {
        let (power, groups, schedule) = build(&cfg)?;
        self.power = power;
        self.groups = groups;
        self.schedule = schedule;
        self.cfg = cfg;
        self.set_loop(self.clock);
        for i in 0..self.miners.len() {
            let w = self.miners[i].worker.clone();
            self.miners[i].group = self.group_of(&w);
            self.miners[i].rule = self.power.rule_for(&w);
        }
        self.dirty = true;
        Ok(())
    }

    /// A miner session authorized (its worker name is set). A parked miner
    /// that left and comes back from the same address under the same worker
    /// name takes its place again, and stays parked; any other connection is
    /// a new miner.
    pub fn register(&mut self, clock: Clock, member: Arc<Member>) -> Registered {
        self.clock = clock;
        self.dirty = true;
        let info = &member.info;
        let worker = info.worker.get().cloned().unwrap_or_else(|| Arc::from(""));
        let addr = info.addr;
        if let Some(id) = self.take_away(addr.ip(), &worker) {
            let i = self.index[&id];
            let m = &mut self.miners[i];
            m.link = Some(Link { member });
            m.addr = addr;
            m.disconnected_at = None;
            return Registered { miner: id, parked: m.net_parked };
        }
        let id = MinerId(info.session);
        self.calibration.fleet_changed(self.clock.at);
        let group = self.group_of(&worker);
        let rule = self.power.rule_for(&worker);
        let protected = self.is_protected(&worker);
        let mut est = self.power.estimate(rule, 0.0, None);
        est.watts *= self.calibration.factor;
        let i = self.miners.len();
        self.index.insert(id, i);
        self.miners.push(Miner {
            id,
            worker,
            addr,
            group,
            rule,
            protected,
            state: MinerState::Mining,
            changed_at: self.clock.at,
            changed_ms: self.clock.unix_ms,
            link: Some(Link { member }),
            fw: None,
            fw_at: None,
            est,
            net_parked: false,
            generation: 0,
            disconnected_at: None,
        });
        Registered { miner: id, parked: self.admit(i) }
    }

    /// A new miner under a budget: it gets work only if it fits, so a
    /// reconnect storm (a restart, a network blip) never takes the site
    /// over the budget, not even until the next plan. One that does not fit
    /// is parked at once and gets no work.
    fn admit(&mut self, i: usize) -> bool {
        let Some(b) = &self.budget else { return false };
        if self.miners[i].protected || !self.in_scope(&b.scope, i) {
            return false;
        }
        let w = self.miners[i].est.watts;
        self.admission.fleet_w += w;
        let budget_w = match b.amount {
            Amount::Watts(x) => x,
            Amount::Fraction(f) => f * self.admission.fleet_w,
        };
        if self.admission.drawn_w + w <= budget_w {
            self.admission.drawn_w += w;
            return false;
        }
        let cause = self.cause();
        self.set_state(i, MinerState::Parked);
        self.miners[i].net_parked = true;
        let spec = self.groups[self.miners[i].group].spec.clone();
        if spec.method != Method::Network {
            self.spawn_hook(i, HookAction::Park, &cause);
        }
        let (who, watts) = (self.who(i), Watts(w));
        self.emit(Event::MinerParked { who, watts, hook: spec.method, cause });
        true
    }

    fn in_scope(&self, scope: &Scope, i: usize) -> bool {
        let m = &self.miners[i];
        scope.contains(&self.groups[m.group].name, &m.worker)
    }

    /// One parked miner that left from `ip` as `worker`, no longer away.
    fn take_away(&mut self, ip: IpAddr, worker: &Arc<str>) -> Option<MinerId> {
        let k = (ip, worker.clone());
        let ids = self.away.get_mut(&k)?;
        let id = ids.pop();
        if ids.is_empty() {
            self.away.remove(&k);
        }
        id
    }

    fn remove(&mut self, i: usize) {
        let m = self.miners.swap_remove(i);
        self.index.remove(&m.id);
        if m.link.is_none() {
            let k = (m.addr.ip(), m.worker.clone());
            if let Some(ids) = self.away.get_mut(&k) {
                ids.retain(|&id| id != m.id);
                if ids.is_empty() {
                    self.away.remove(&k);
                }
            }
        }
        if let Some(moved) = self.miners.get(i) {
            self.index.insert(moved.id, i);
        }
    }

    /// A miner's session ended.
    pub fn deregister(&mut self, clock: Clock, miner: MinerId, session: u64) {
        self.clock = clock;
        let Some(&i) = self.index.get(&miner) else { return };
        if self.miners[i].link.as_ref().is_none_or(|l| l.session() != session) {
            return; // not this session's (any more)
        }
        self.dirty = true;
        if self.miners[i].state == MinerState::Parked {
            // Remember it: when it reconnects it must stay parked.
            let m = &mut self.miners[i];
            m.link = None;
            m.disconnected_at = Some(self.clock.at);
            self.away.entry((m.addr.ip(), m.worker.clone())).or_default().push(m.id);
        } else {
            self.calibration.fleet_changed(self.clock.at);
            self.remove(i);
        }
    }

    /// Refresh estimates and build the policy's view of the connected miners.
    fn views(&mut self, scope: Option<&Scope>) -> (Vec<usize>, Vec<MinerView>) {
        let mut idx = Vec::with_capacity(self.miners.len());
        let mut views = Vec::with_capacity(self.miners.len());
        // Every known miner: the connected ones, and parked ones that are
        // away (a network-parked miner reconnects, and counts towards the
        // fleet a fraction budget is taken of). Mining miners that leave are
        // forgotten at once, so they never count here.
        for (i, m) in self.miners.iter_mut().enumerate() {
            if let Some(link) = &m.link {
                m.est = self.power.estimate(m.rule, link.hashrate(), m.fw);
                m.est.watts *= self.calibration.factor;
            }
            let in_scope = scope.is_none_or(|s| s.contains(&self.groups[m.group].name, &m.worker));
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

    /// Which miner `i` is, for plans, rows and events.
    fn who(&self, i: usize) -> MinerRef {
        let m = &self.miners[i];
        MinerRef { miner: m.id, worker: m.worker.to_string(), address: m.addr.ip() }
    }

    fn planned(&self, i: usize) -> PlannedMiner {
        let m = &self.miners[i];
        PlannedMiner {
            who: self.who(i),
            watts: Watts(m.est.watts),
            watts_source: m.est.watts_source,
            j_per_th: JoulesPerTh(m.est.j_per_th),
            efficiency_source: m.est.efficiency_source,
        }
    }

    fn set_state(&mut self, i: usize, s: MinerState) {
        if s != MinerState::Resuming {
            self.calibration.fleet_changed(self.clock.at);
        }
        let m = &mut self.miners[i];
        m.state = s;
        m.changed_at = self.clock.at;
        m.changed_ms = self.clock.unix_ms;
        m.generation += 1;
    }

    /// Park a miner now: its hook, or the network.
    fn park(&mut self, i: usize, cause: &Cause) {
        self.set_state(i, MinerState::Parked);
        let m = &self.miners[i];
        let spec = self.groups[m.group].spec.clone();
        if spec.method == Method::Network {
            self.net_park(i);
        } else {
            self.spawn_hook(i, HookAction::Park, cause);
        }
        let (who, watts) = (self.who(i), Watts(self.miners[i].est.watts));
        self.emit(Event::MinerParked { who, watts, hook: spec.method, cause: cause.clone() });
    }

    /// Where a miner's API answers: `curtail.firmware_address`, else the
    /// source address of its connection.
    fn api_address(&self, i: usize) -> SocketAddr {
        let m = &self.miners[i];
        let mapped = self.cfg.firmware_address.iter().find(|f| {
            (f.workers.is_empty() || WildMatch::new(&f.workers).matches(&m.worker))
                && f.cidr.is_none_or(|c| c.contains(&m.addr.ip()))
        });
        match mapped.and_then(|f| f.address) {
            Some(ip) => SocketAddr::new(ip, m.addr.port()),
            None => m.addr,
        }
    }

    fn spawn_hook(&mut self, i: usize, action: HookAction, cause: &Cause) {
        let addr = self.api_address(i);
        let m = &self.miners[i];
        let job = HookJob {
            spec: self.groups[m.group].spec.clone(),
            action,
            miner: m.id,
            worker: m.worker.clone(),
            addr,
            cause: cause.clone(),
            generation: m.generation,
        };
        self.out.push(Effect::Hook(job));
    }

    fn net_park(&mut self, i: usize) {
        self.miners[i].net_parked = true;
        self.signal(i, SessionCmd::Park);
    }

    /// Resume a miner now (its turn in the ramp has come).
    fn resume(&mut self, i: usize, cause: &Cause) {
        self.set_state(i, MinerState::Mining);
        let spec = self.groups[self.miners[i].group].spec.clone();
        if self.miners[i].net_parked {
            self.miners[i].net_parked = false;
            self.signal(i, SessionCmd::Resume);
        }
        if spec.method != Method::Network {
            self.spawn_hook(i, HookAction::Resume, cause);
        }
        let m = &self.miners[i];
        let (ev, gone) = (
            Event::MinerResumed {
                who: self.who(i),
                watts: Watts(m.est.watts),
                hook: spec.method,
                cause: cause.clone(),
            },
            m.link.is_none(),
        );
        self.emit(ev);
        if gone {
            // Parked and gone: it will register afresh, as mining.
            self.remove(i);
        }
    }

    fn queue_resume(&mut self, i: usize, cause: &Cause) {
        if self.miners[i].state == MinerState::Parked {
            if self.resume_queue.is_empty() {
                self.ramp_from = self.clock.at;
            }
            self.set_state(i, MinerState::Resuming);
            self.resume_queue.push_back((self.miners[i].id, self.miners[i].generation, cause.clone()));
        }
    }

    /// The budget in force's plan and reason.
    fn cause(&self) -> Cause {
        self.budget.as_ref().map(|b| Cause { plan_id: b.plan_id, reason: b.reason.clone() }).unwrap_or_default()
    }

    /// A new plan id, for an action no budget plan decided.
    fn new_cause(&mut self, reason: String) -> Cause {
        let plan_id = self.next_plan_id;
        self.next_plan_id += 1;
        Cause { plan_id, reason }
    }

    /// A hook run ended.
    pub fn on_hook(&mut self, clock: Clock, d: HookDone) {
        self.clock = clock;
        let Some(&i) = self.index.get(&d.miner) else { return };
        if d.action == HookAction::Read {
            // A firmware meter's read: the figure, whatever the state now.
            match d.result {
                Ok(Some(r)) => (self.miners[i].fw, self.miners[i].fw_at) = (Some(r), Some(clock.at)),
                Ok(None) => {}
                Err(e) => debug!(miner = %self.miners[i].id, "firmware read-back failed: {e}"),
            }
            return;
        }
        if self.miners[i].generation != d.generation {
            return;
        }
        match d.result {
            Ok(reading) => {
                let m = &mut self.miners[i];
                // A reading taken while mining is what the miner draws; one
                // taken asleep only confirms the park.
                if let (HookAction::Resume, Some(r)) = (d.action, reading) {
                    (m.fw, m.fw_at) = (Some(r), Some(clock.at));
                }
                let m = &self.miners[i];
                let method = self.groups[m.group].spec.method;
                if method != Method::Network {
                    self.emit(Event::HookOk {
                        who: self.who(i),
                        hook: method,
                        action: d.action,
                        watts: reading.map(|r| Watts(r.watts)),
                        hashrate_hs: reading.map(|r| HashesPerSec(r.hashrate_hs)),
                        cause: d.cause.clone(),
                    });
                }
            }
            Err(e) => {
                let m = &self.miners[i];
                warn!(miner = %m.id, worker = %m.worker, address = %m.addr.ip(), action = ?d.action, "curtailment hook failed: {e}");
                let ev = Event::HookFailed {
                    who: self.who(i),
                    hook: self.groups[m.group].spec.method,
                    action: d.action,
                    error: e,
                    retry_in_s: d.retry_in.map(|r| r.as_secs_f64()),
                    cause: d.cause.clone(),
                };
                self.emit(ev);
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

    /// A control request.
    pub fn control(&mut self, clock: Clock, c: ControlReq) -> Result<Reply, ControlError> {
        self.clock = clock;
        match c {
            ControlReq::Status { miners } => Ok(Reply::Status(Box::new(self.status(miners)))),
            ControlReq::SetBudget(b) => {
                self.check_scope(&b.scope)?;
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
                    lease_until: b.lease.map(|l| self.clock.at + l),
                    lease_until_ms: b.lease.map(|l| self.clock.unix_ms + l.as_millis() as u64),
                    set_at_ms: self.clock.unix_ms,
                    ramp_w_per_s: b.ramp_up.map(|r| {
                        (p.resume.iter().map(|&j| views[j].watts).sum::<f64>() / r.as_secs_f64().max(0.001)).max(1.0)
                    }),
                    met: None,
                    met_by: MetBy::Estimated,
                    plan_id: id,
                });
                self.apply(&idx, &views, &p, id, budget_w);
                if let Reply::Plan(plan) = &out {
                    self.applied_plan = Some((**plan).clone());
                }
                self.persist();
                Ok(out)
            }
            ControlReq::ResumeAll { reason } => {
                self.budget = None;
                let cause = self.new_cause(reason);
                let n = self.resume_everything(&cause);
                self.persist();
                info!(plan = cause.plan_id, reason = %cause.reason, resuming = n, "resume_all");
                Ok(Reply::Resuming(Resuming { resuming: n }))
            }
            ControlReq::SetProtection { pattern, protected } => {
                let p = WildMatch::new(&pattern);
                let mut matched = 0;
                let mut back = Vec::new();
                for i in 0..self.miners.len() {
                    if p.matches(&self.miners[i].worker) {
                        matched += 1;
                        self.miners[i].protected = protected;
                        if protected && self.miners[i].state == MinerState::Parked {
                            back.push(i);
                        }
                    }
                }
                if !back.is_empty() {
                    let cause = self.new_cause(format!("protected ({pattern})"));
                    for i in back {
                        self.queue_resume(i, &cause);
                    }
                }
                self.protect_rules.retain(|r| r.pattern != pattern);
                self.protect_rules.push(ProtectRule { pattern, matcher: p, protected });
                self.dirty = true;
                self.persist();
                Ok(Reply::Matched(Matched { matched }))
            }
        }
    }

    /// A budget's scope must name something: a group of the config, and
    /// (for a group or a worker pattern) at least one miner. The site is
    /// always a scope, even with no miner connected yet.
    fn check_scope(&self, scope: &Scope) -> Result<(), ControlError> {
        if let Scope::Group(g) = scope {
            if !self.groups.iter().any(|x| x.name == *g) {
                let names: Vec<&str> = self.groups.iter().map(|x| x.name.as_str()).collect();
                return Err(ControlError::InvalidParams(format!(
                    "unknown group {g:?} (the groups are: {})",
                    names.join(", ")
                )));
            }
        }
        if *scope != Scope::Site && !(0..self.miners.len()).any(|i| self.in_scope(scope, i)) {
            return Err(ControlError::InvalidParams(format!(
                "scope {} matches no miner: nothing could be parked",
                scope.name()
            )));
        }
        Ok(())
    }

    fn resume_everything(&mut self, cause: &Cause) -> usize {
        let mut parked: Vec<usize> =
            (0..self.miners.len()).filter(|&i| self.miners[i].state == MinerState::Parked).collect();
        parked.sort_by(|&a, &b| self.miners[a].est.j_per_th.total_cmp(&self.miners[b].est.j_per_th));
        for &i in &parked {
            self.queue_resume(i, cause);
        }
        parked.len()
    }

    fn policy_params(&self, budget_w: f64) -> PolicyParams {
        PolicyParams {
            budget_w,
            hold: self.cfg.hold_s.get(),
            hysteresis_w: budget_w * self.cfg.hysteresis_fraction,
            now: self.clock.at,
        }
    }

    fn apply(&mut self, idx: &[usize], views: &[MinerView], p: &policy::Plan, id: u64, budget_w: f64) {
        self.admission = Admission { drawn_w: p.expected_w, fleet_w: policy::total_watts(views) };
        if p.park.is_empty() && p.resume.is_empty() {
            return;
        }
        if let Some(b) = self.budget.as_mut() {
            b.plan_id = id;
        }
        let cause = self.cause();
        for &j in &p.park {
            self.park(idx[j], &cause);
        }
        for &j in &p.resume {
            self.queue_resume(idx[j], &cause);
        }
        {
            let reason = cause.reason;
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

    /// Time passes: leases, the schedule, the budget check and the ramp.
    pub fn tick(&mut self, clock: Clock) {
        self.clock = clock;
        let now = clock.at;
        let dt = now.saturating_duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        // Lease expiry.
        if let Some(b) = &self.budget {
            if b.source == BudgetSource::Command && b.lease_until.is_some_and(|t| now >= t) {
                let fallback = if self.follow.is_some() { LeaseFallback::Follow } else { self.cfg.lease_fallback };
                let (amount, scope) = (b.amount, b.scope.clone());
                let fraction = match amount {
                    Amount::Fraction(f) => Some(f),
                    Amount::Watts(_) => None,
                };
                let budget_w = Self::budget_watts(amount, &self.views(Some(&scope)).1);
                let cause = self.cause();
                info!(?fallback, plan = cause.plan_id, reason = %cause.reason, "budget lease expired");
                self.emit(Event::LeaseExpired { budget_w: Watts(budget_w), fraction, fallback, cause: cause.clone() });
                match fallback {
                    LeaseFallback::Hold => {
                        if let Some(b) = self.budget.as_mut() {
                            b.source = BudgetSource::LeaseFallback;
                            b.lease_until = None;
                            b.lease_until_ms = None;
                        }
                    }
                    LeaseFallback::Resume => {
                        self.budget = None;
                        let cause = self.new_cause(format!("lease expired ({})", cause.reason));
                        self.resume_everything(&cause);
                    }
                    // Follow mode takes over below.
                    LeaseFallback::Follow => self.budget = None,
                }
                self.persist();
            }
        }
        // The schedule applies whenever no command (or its fallback) is in force.
        if !self.schedule.is_empty() && !self.budget.as_ref().is_some_and(|b| b.source != BudgetSource::Schedule) {
            let want = schedule::active(&self.schedule, schedule::utc_second_of_day(clock.unix_ms));
            let have = self.budget.as_ref().map(|b| b.amount);
            if want != have {
                self.budget = want.map(|amount| Budget {
                    amount,
                    scope: Scope::Site,
                    source: BudgetSource::Schedule,
                    reason: "schedule".into(),
                    lease_until: None,
                    lease_until_ms: None,
                    set_at_ms: self.clock.unix_ms,
                    ramp_w_per_s: None,
                    met: None,
                    met_by: MetBy::Estimated,
                    plan_id: 0,
                });
                self.dirty = true;
                self.persist();
            }
        }
        self.firmware_meter();
        self.check_feeds();
        self.follow_apply(false);
        // Enforce the budget: on changes at once, otherwise once a second
        // (hashrates, and so watts, drift).
        if self.budget.is_some()
            && (self.dirty || now.saturating_duration_since(self.last_plan) >= Duration::from_secs(1))
        {
            self.last_plan = now;
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
            self.apply(&idx, &views, &p, id, budget_w);
            // Met: on the meter's fresh reading when the budget is the
            // site's (what the meter measures), else on the estimates.
            let measured = self.measured().filter(|_| scope == Some(Scope::Site));
            let (met, met_by) = match measured {
                Some(s) => (s.watts <= budget_w, MetBy::Measured),
                None => (p.budget_met, MetBy::Estimated),
            };
            let changed = self.budget.as_ref().is_some_and(|b| b.met != Some(met) || b.met_by != met_by)
                && self.resume_queue.is_empty();
            if changed {
                if let Some(b) = self.budget.as_mut() {
                    (b.met, b.met_by) = (Some(met), met_by);
                }
                let cause = self.cause();
                let (a, mining, parked) = self.achieved(scope.as_ref());
                let a = measured.map_or(a, |s| s.watts);
                let (budget_w_, achieved_w) = (Watts(budget_w), Watts(a));
                self.emit(if met {
                    Event::BudgetMet { budget_w: budget_w_, achieved_w, met_by, mining, parked, cause }
                } else {
                    let why = match measured {
                        // Expected for a meter interval after every step
                        // down: the plan is made, the meter has not seen it.
                        Some(s) if p.budget_met => {
                            let why = format!(
                                "the meter reads {:.0} W against an estimate of {:.0} W; parking more if it stays over for settle_s",
                                s.watts, p.expected_w
                            );
                            info!(plan = cause.plan_id, budget_w, achieved_w = a, ?met_by, "budget not met yet: {why}");
                            why
                        }
                        _ => {
                            let why = Self::why_not_met(&views, budget_w);
                            warn!(plan = cause.plan_id, budget_w, achieved_w = a, ?met_by, "budget not met: {why}");
                            why
                        }
                    };
                    Event::BudgetNotMet { budget_w: budget_w_, achieved_w, met_by, mining, parked, why, cause }
                });
            }
        }
        // The ramp: resume queued miners as the watt allowance accrues.
        let rate = self.budget.as_ref().and_then(|b| b.ramp_w_per_s).unwrap_or(self.cfg.ramp_up_w_per_s);
        if self.resume_queue.is_empty() {
            self.ramp_tokens = 0.0;
        } else {
            let accrued = now.saturating_duration_since(self.ramp_from).as_secs_f64().min(dt);
            self.ramp_tokens += rate * accrued;
        }
        while let Some((id, gen, _)) = self.resume_queue.front().cloned() {
            let Some(&i) = self.index.get(&id) else {
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
            let (_, _, cause) = self.resume_queue.pop_front().expect("looked at");
            self.resume(i, &cause);
        }
        // Forget parked miners that never came back (checked once a minute).
        if now.saturating_duration_since(self.last_prune) >= Duration::from_secs(60) {
            self.last_prune = now;
            let stale: Vec<usize> = (0..self.miners.len())
                .rev()
                .filter(|&i| {
                    self.miners[i]
                        .disconnected_at
                        .is_some_and(|t| now.saturating_duration_since(t) > Duration::from_secs(86_400))
                })
                .collect();
            for i in stale {
                self.remove(i);
            }
        }
    }

    /// The meter's last reading, if it is fresh.
    fn measured(&self) -> Option<Sample> {
        self.meter.as_ref().and_then(|m| m.feed.fresh())
    }

    /// A feed read (the meter, or follow mode's other load), or failed to.
    pub fn on_feed(&mut self, clock: Clock, id: FeedId, r: Result<f64, String>) {
        self.clock = clock;
        let r = r.map(|watts| Sample { watts, at: clock.at, unix_ms: clock.unix_ms });
        let change = match id {
            FeedId::Meter => self.meter.as_mut().and_then(|m| m.feed.on_reading(r.clone())),
            FeedId::OtherLoad => self.follow.as_mut().and_then(|f| f.feed.on_reading(r.clone())),
        };
        if let Some(c) = change {
            self.feed_event(id, c);
        }
        match (id, r) {
            (FeedId::Meter, Ok(s)) => self.on_meter(s),
            (FeedId::OtherLoad, Ok(_)) => self.follow_apply(true),
            (_, Err(e)) => debug!(feed = id.name(), "read failed: {e}"),
        }
    }

    /// A meter reading: recalibrate, or correct a budget the meter says is
    /// not met.
    fn on_meter(&mut self, s: Sample) {
        // One pass: refresh the estimates, and the views a fraction budget
        // is taken of.
        let (_, views) = self.views(None);
        let old = self.calibration.factor;
        let raw = views.iter().filter(|v| v.state == MinerState::Mining).map(|v| v.watts).sum::<f64>() / old;
        let site_budget = match &self.budget {
            Some(b) if b.scope == Scope::Site => Some(Self::budget_watts(b.amount, &views)),
            _ => None,
        };
        match self.calibration.on_reading(s, raw, site_budget) {
            Verdict::Keep => {}
            Verdict::Recalibrated { factor } => {
                debug!(factor, measured_w = s.watts, estimated_w = raw, "calibrated the estimates on the meter");
                self.rescale(old);
            }
            Verdict::Corrected { factor, over_w } => {
                let budget_w = site_budget.unwrap_or(0.0);
                warn!(
                    measured_w = s.watts,
                    budget_w, factor, "the meter reads {over_w:.0} W over the budget after settle_s: parking more"
                );
                self.rescale(old);
                self.dirty = true;
                self.emit(Event::MeterCorrection { measured_w: Watts(s.watts), budget_w: Watts(budget_w), factor });
            }
        }
    }

    fn feed_source(&self, id: FeedId) -> String {
        match id {
            FeedId::Meter => self.meter.as_ref().map(|m| m.source.clone()),
            FeedId::OtherLoad => self.follow.as_ref().map(|f| f.cfg.other_load.describe()),
        }
        .unwrap_or_default()
    }

    fn feed_event(&mut self, id: FeedId, c: FeedChange) {
        let (feed, source) = (id.name().to_owned(), self.feed_source(id));
        match c {
            FeedChange::Stale { last, error } => {
                let then = match id {
                    FeedId::Meter => "plans and \"met\" use the estimates".to_owned(),
                    FeedId::OtherLoad => {
                        format!("curtail.follow.on_stale = {:?}", self.follow.as_ref().map(|f| f.cfg.on_stale))
                    }
                };
                warn!(feed, source, error = ?error, "no good reading for stale_after_s: {then}");
                self.emit(Event::MeterStale {
                    feed,
                    source,
                    last_w: last.map(|s| Watts(s.watts)),
                    last_at_ms: last.map(|s| s.unix_ms),
                    error,
                });
            }
            FeedChange::Recovered(s) => {
                info!(feed, source, watts = s.watts, "reading again");
                self.emit(Event::MeterRecovered { feed, source, watts: Watts(s.watts) });
            }
        }
        self.dirty = true;
    }

    /// A `kind = "firmware"` meter, every `interval_s`: the sum of the read-
    /// backs of the mining miners, if every one has one younger than
    /// `stale_after_s` (else a failed reading that says how many lack one);
    /// then ask each mining miner of a firmware group for the next.
    fn firmware_meter(&mut self) {
        let Some(m) = self.cfg.meter.as_ref().filter(|m| m.source.kind == Some(super::feed::SourceKind::Firmware))
        else {
            return;
        };
        let (every, fresh_for, now) = (m.interval_s.get(), m.stale_after_s.get(), self.clock.at);
        if now.saturating_duration_since(self.last_fw_read) < every {
            return;
        }
        self.last_fw_read = now;
        let mining: Vec<usize> =
            (0..self.miners.len()).filter(|&i| self.miners[i].state == MinerState::Mining).collect();
        let fresh = |m: &Miner| m.fw.filter(|_| m.fw_at.is_some_and(|t| now.saturating_duration_since(t) < fresh_for));
        let missing = mining.iter().filter(|&&i| fresh(&self.miners[i]).is_none()).count();
        let reading = if missing == 0 {
            Ok(mining.iter().filter_map(|&i| fresh(&self.miners[i])).map(|r| r.watts).sum())
        } else {
            Err(format!(
                "{missing} of {} mining miners have no firmware read-back younger than stale_after_s",
                mining.len()
            ))
        };
        let clock = self.clock;
        self.on_feed(clock, FeedId::Meter, reading);
        for i in mining {
            if self.groups[self.miners[i].group].spec.method == Method::Firmware {
                self.spawn_hook(i, HookAction::Read, &Cause::default());
            }
        }
    }

    fn check_feeds(&mut self) {
        let now = self.clock.at;
        if let Some(c) = self.meter.as_mut().and_then(|m| m.feed.check(now)) {
            self.feed_event(FeedId::Meter, c);
        }
        if let Some(c) = self.follow.as_mut().and_then(|f| f.feed.check(now)) {
            self.feed_event(FeedId::OtherLoad, c);
        }
    }

    /// Follow mode sets the budget, unless a command overrides it. A new
    /// figure from the other load is written to the state file (`persist`);
    /// the ramp's small steps between readings are not.
    fn follow_apply(&mut self, persist: bool) {
        let Some(f) = self.follow.as_mut() else { return };
        let Some(w) = f.step(self.clock.at, self.cfg.ramp_up_w_per_s) else { return };
        let reason = match f.feed.fresh() {
            Some(s) => format!(
                "follow: site limit {:.0} W - other load {:.0} W - margin {:.0} W",
                f.cfg.site_limit_w, s.watts, f.cfg.margin_w
            ),
            None => format!("follow: the other load is stale (on_stale = {:?})", f.cfg.on_stale).to_lowercase(),
        };
        match self.budget.as_mut() {
            Some(b) if b.source == BudgetSource::Command => {}
            Some(b) if b.source == BudgetSource::Follow => {
                let changed = b.amount != Amount::Watts(w);
                b.amount = Amount::Watts(w);
                b.reason = reason;
                self.dirty |= changed;
                if changed && persist {
                    self.persist();
                }
            }
            _ => {
                info!(budget_w = w, "{reason}");
                let plan_id = self.budget.as_ref().map_or(0, |b| b.plan_id);
                self.budget = Some(Budget {
                    amount: Amount::Watts(w),
                    scope: Scope::Site,
                    source: BudgetSource::Follow,
                    reason,
                    lease_until: None,
                    lease_until_ms: None,
                    set_at_ms: self.clock.unix_ms,
                    ramp_w_per_s: None,
                    met: None,
                    met_by: MetBy::Estimated,
                    plan_id,
                });
                self.dirty = true;
                self.persist();
            }
        }
    }

    /// Why a plan leaves the budget not met (the policy parks every
    /// unprotected miner before it gives up).
    fn why_not_met(views: &[MinerView], budget_w: f64) -> String {
        let drawing = |v: &&MinerView| v.in_scope && v.state != MinerState::Parked;
        let protected_w: f64 = views.iter().filter(drawing).filter(|v| v.protected).map(|v| v.watts).sum();
        let (n, w) =
            views.iter().filter(drawing).filter(|v| !v.protected).fold((0, 0.0), |(n, w), v| (n + 1, w + v.watts));
        if protected_w > budget_w {
            format!("protected miners in scope draw {protected_w:.0} W, more than the {budget_w:.0} W budget")
        } else if n > 0 {
            format!("{n} curtailable miners still draw {w:.0} W")
        } else {
            "no curtailable miner left in scope".into()
        }
    }

    /// What the state file keeps, as of now.
    pub fn saved(&self) -> Saved {
        Saved {
            version: super::store::VERSION,
            saved_at_ms: self.clock.unix_ms,
            budget: self.budget.as_ref().map(|b| SavedBudget {
                amount: match b.amount {
                    Amount::Watts(w) => SavedAmount::Watts(w),
                    Amount::Fraction(f) => SavedAmount::Fraction(f),
                },
                scope: b.scope.name(),
                source: b.source,
                reason: b.reason.clone(),
                set_at_ms: b.set_at_ms,
                lease_until_ms: b.lease_until_ms,
                ramp_w_per_s: b.ramp_w_per_s,
                plan_id: b.plan_id,
            }),
            protection: self
                .protect_rules
                .iter()
                .map(|r| SavedRule { pattern: r.pattern.clone(), protected: r.protected })
                .collect(),
            last_plan: self.applied_plan.clone(),
        }
    }

    fn persist(&mut self) {
        let s = self.saved();
        self.out.push(Effect::Persist(Box::new(s)));
    }

    /// Take up what a state file kept (at start, before any miner): the
    /// budget (a lease that ran out meanwhile falls back at the first tick),
    /// the protection rules, the last plan.
    pub fn restore(&mut self, clock: Clock, s: Saved) -> Result<(), String> {
        self.clock = clock;
        if let Some(b) = s.budget {
            let scope = Scope::parse(&b.scope)?;
            let left = b.lease_until_ms.map(|t| Duration::from_millis(t.saturating_sub(clock.unix_ms)));
            info!(scope = %b.scope, source = ?b.source, reason = %b.reason, lease_left_s = ?left.map(|l| l.as_secs_f64()), "budget restored from the state file");
            self.budget = Some(Budget {
                amount: match b.amount {
                    SavedAmount::Watts(w) => Amount::Watts(w),
                    SavedAmount::Fraction(f) => Amount::Fraction(f),
                },
                scope,
                source: b.source,
                reason: b.reason,
                lease_until: left.map(|l| clock.at + l),
                lease_until_ms: b.lease_until_ms,
                set_at_ms: b.set_at_ms,
                ramp_w_per_s: b.ramp_w_per_s,
                met: None,
                met_by: MetBy::Estimated,
                plan_id: b.plan_id,
            });
            self.next_plan_id = self.next_plan_id.max(b.plan_id + 1);
        }
        if let Some(b) = self.budget.as_ref().filter(|b| b.source == BudgetSource::Follow) {
            match (self.follow.as_mut(), b.amount) {
                // Held until the other load is read again (on_stale applies
                // if it is not within stale_after_s).
                (Some(f), Amount::Watts(w)) => f.budget_w = Some(w),
                _ => {
                    warn!("the state file holds a follow-mode budget, and follow mode is not configured: dropped");
                    self.budget = None;
                }
            }
        }
        self.protect_rules = s
            .protection
            .into_iter()
            .map(|r| ProtectRule { matcher: WildMatch::new(&r.pattern), pattern: r.pattern, protected: r.protected })
            .collect();
        if let Some(p) = &s.last_plan {
            self.next_plan_id = self.next_plan_id.max(p.plan_id + 1);
        }
        self.applied_plan = s.last_plan;
        self.dirty = true;
        Ok(())
    }

    /// The state file could not be read and `on_bad_state = "park-all"`:
    /// a budget of 0 W over the site until one is set, so no curtailable
    /// miner gets work (protected ones do).
    pub fn hold_everything(&mut self, clock: Clock, why: &str) {
        self.clock = clock;
        self.budget = Some(Budget {
            amount: Amount::Watts(0.0),
            scope: Scope::Site,
            source: BudgetSource::BadState,
            reason: format!("{why}; no curtailable miner gets work until a budget is set"),
            lease_until: None,
            lease_until_ms: None,
            set_at_ms: clock.unix_ms,
            ramp_w_per_s: None,
            met: None,
            met_by: MetBy::Estimated,
            plan_id: 0,
        });
        self.dirty = true;
    }

    /// Per-group figures for the metrics.
    pub fn snapshot(&self) -> CurtailSnapshot {
        let mut groups: Vec<GroupFigures> =
            self.groups.iter().map(|g| GroupFigures { name: g.name.clone(), ..Default::default() }).collect();
        for m in &self.miners {
            let g = &mut groups[m.group];
            if m.state == MinerState::Parked {
                g.parked += 1;
            } else {
                g.mining += 1;
                g.watts += m.est.watts;
                g.hashrate_hs += m.link.as_ref().map(Link::hashrate).unwrap_or(0.0);
            }
        }
        let budget_w = self.budget.as_ref().map(|b| match b.amount {
            Amount::Watts(w) => w,
            Amount::Fraction(f) => f * self.miners.iter().map(|m| m.est.watts).sum::<f64>(),
        });
        let feed = |name, f: &Feed| FeedFigures {
            name,
            watts: f.fresh().map(|s| s.watts),
            stale: f.is_stale(),
            errors: f.errors,
        };
        let feeds = self
            .meter
            .as_ref()
            .map(|m| feed("meter", &m.feed))
            .into_iter()
            .chain(self.follow.as_ref().map(|f| feed("other_load", &f.feed)))
            .collect();
        CurtailSnapshot { groups, budget_w, feeds, calibration: self.calibration.factor }
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
            let hs = m.link.as_ref().map(Link::hashrate).unwrap_or(0.0);
            let mining = v.state == MinerState::Mining;
            for f in [&mut site, groups.entry(self.groups[m.group].name.clone()).or_default()] {
                f.connected += u64::from(m.link.is_some());
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
        if let Some(s) = self.measured() {
            site.measured_w = Some(Watts(s.watts));
            site.measured_at_ms = Some(s.unix_ms);
            site.measured_source = self.meter.as_ref().map(|m| m.source.clone());
        }
        let scope = self.budget.as_ref().map(|b| b.scope.clone());
        let scoped = scope.map(|s| self.views(Some(&s)).1);
        let budget = match (&self.budget, scoped) {
            (Some(b), Some(v2)) => BudgetStatus {
                source: b.source,
                watts: Some(Watts(Self::budget_watts(b.amount, &v2))),
                scope: Some(b.scope.name()),
                reason: Some(b.reason.clone()),
                lease_expires_in_s: b.lease_until.map(|t| t.saturating_duration_since(self.clock.at).as_secs_f64()),
                met: b.met,
                met_by: b.met.map(|_| b.met_by),
                set_at_ms: Some(b.set_at_ms),
            },
            _ => BudgetStatus::NONE,
        };
        let in_force = self.budget.as_ref().is_some_and(|b| b.source == BudgetSource::Follow);
        let miners = list.then(|| {
            self.miners
                .iter()
                .enumerate()
                .map(|(i, m)| MinerRow {
                    who: self.who(i),
                    group: self.groups[m.group].name.clone(),
                    state: m.state,
                    since_ms: m.changed_ms,
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
        Status {
            site,
            groups,
            budget,
            resuming: self.resume_queue.len(),
            meter: self.meter.as_ref().map(|m| feed_status(&m.feed, &m.source)),
            calibration: CalibrationStatus {
                factor: self.calibration.factor,
                updated_at_ms: self.calibration.updated_ms,
            },
            follow: self.follow.as_ref().map(|f| FollowStatus {
                site_limit_w: Watts(f.cfg.site_limit_w),
                margin_w: Watts(f.cfg.margin_w),
                other_load: feed_status(&f.feed, &f.cfg.other_load.describe()),
                target_w: f.feed.fresh().map(|s| Watts(f.target(s.watts))),
                in_force,
            }),
            miners,
        }
    }
}

fn feed_status(f: &Feed, source: &str) -> FeedStatus {
    FeedStatus {
        source: source.to_owned(),
        watts: f.last().map(|s| Watts(s.watts)),
        at_ms: f.last().map(|s| s.unix_ms),
        stale: f.is_stale(),
        error: f.error().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curtail::power::{FirmwareReading, PowerRule};
    use crate::curtail::GroupConfig;

    /// Budget params: the site, no lease, not a dry run, reason "test".
    fn params(amount: Amount) -> BudgetParams {
        BudgetParams {
            amount,
            scope: Scope::Site,
            lease: None,
            ramp_up: None,
            dry_run: false,
            reason: "test".into(),
            max_listed: 10,
        }
    }

    /// What a test does at a moment.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Connect(&'static str),
        Leave(&'static str),
        /// Watts, and a lease in seconds.
        Budget(f64, Option<f64>),
        ResumeAll,
        Tick,
        HookFailed(&'static str, HookAction),
        /// A meter reading, watts.
        Meter(f64),
        /// Follow mode's other load, watts.
        Other(f64),
        /// A failed read of the other load.
        OtherFailed,
        /// A firmware read-back of a miner, watts.
        FwRead(&'static str, f64),
    }
    use Step::*;

    /// Workers a.* (20 J/TH), b.* (30), c.* (40) and x.* (50, parked by an
    /// exec hook); every miner draws 1,000 W; no hold time, no hysteresis,
    /// a ramp of 1,000 W/s.
    fn cfg() -> CurtailConfig {
        let rule = |p: &str, j| PowerRule { pattern: p.into(), j_per_th: Some(j), watts: Some(1000.0), model: None };
        CurtailConfig {
            power: vec![rule("a.*", 20.0), rule("b.*", 30.0), rule("c.*", 40.0), rule("x.*", 50.0)],
            group: vec![GroupConfig {
                name: "hooked".into(),
                pattern: "x.*".into(),
                method: Method::Exec,
                command: vec!["true".into()],
                ..GroupConfig::default()
            }],
            hold_s: crate::config::Seconds::ZERO,
            hysteresis_fraction: 0.0,
            ramp_up_w_per_s: 1000.0,
            ..CurtailConfig::default()
        }
    }

    struct Rig {
        st: State,
        t0: Instant,
        /// Connected sessions: worker, session id, the session, its miner.
        sessions: Vec<(&'static str, u64, Arc<Member>, MinerId)>,
        next_session: u64,
        /// What register answered last (true: stay parked).
        stay_parked: bool,
        plan: Option<Plan>,
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    impl Rig {
        fn new(cfg: CurtailConfig) -> Rig {
            let t0 = Instant::now();
            let st = State::new(cfg, Clock { at: t0, unix_ms: 1_000_000 }).unwrap();
            Rig { st, t0, sessions: Vec::new(), next_session: 1, stay_parked: false, plan: None }
        }

        fn clock(&self, secs: f64) -> Clock {
            Clock { at: self.t0 + Duration::from_secs_f64(secs), unix_ms: 1_000_000 + (secs * 1e3) as u64 }
        }

        /// Apply a step at `secs`; the effects it queued, one line each.
        fn step(&mut self, secs: f64, s: Step) -> Vec<String> {
            let c = self.clock(secs);
            match s {
                Connect(w) => {
                    let info = crate::stats::WorkerInfo::new(self.next_session, addr());
                    info.worker.set(w.into()).unwrap();
                    let member = Arc::new(Member { info, signal: Default::default() });
                    let session = self.next_session;
                    self.next_session += 1;
                    let r = self.st.register(c, member.clone());
                    self.stay_parked = r.parked;
                    self.sessions.push((w, session, member, r.miner));
                }
                Leave(w) => {
                    let i = self.sessions.iter().position(|s| s.0 == w).expect("connected");
                    let (_, session, _, miner) = self.sessions.remove(i);
                    self.st.deregister(c, miner, session);
                }
                Budget(watts, lease) => {
                    let b = BudgetParams { lease: lease.map(Duration::from_secs_f64), ..params(Amount::Watts(watts)) };
                    match self.st.control(c, ControlReq::SetBudget(b)) {
                        Ok(Reply::Plan(p)) => self.plan = Some(*p),
                        other => panic!("{other:?}"),
                    }
                }
                ResumeAll => {
                    self.st.control(c, ControlReq::ResumeAll { reason: "test".into() }).unwrap();
                }
                Tick => self.st.tick(c),
                Meter(w) => self.st.on_feed(c, FeedId::Meter, Ok(w)),
                Other(w) => self.st.on_feed(c, FeedId::OtherLoad, Ok(w)),
                OtherFailed => self.st.on_feed(c, FeedId::OtherLoad, Err("connection refused".into())),
                FwRead(w, watts) => {
                    let miner = self.sessions.iter().find(|s| s.0 == w).expect("connected").3;
                    let done = HookDone {
                        miner,
                        cause: Cause::default(),
                        generation: 0,
                        action: HookAction::Read,
                        result: Ok(Some(FirmwareReading { watts, hashrate_hs: 100e12 })),
                        retry_in: None,
                    };
                    self.st.on_hook(c, done);
                }
                HookFailed(w, action) => {
                    let miner = self.sessions.iter().find(|s| s.0 == w).expect("connected").3;
                    let generation = self.st.miners[self.st.index[&miner]].generation;
                    let done = HookDone {
                        miner,
                        cause: Cause::default(),
                        generation,
                        action,
                        result: Err("refused".into()),
                        retry_in: None,
                    };
                    self.st.on_hook(c, done);
                }
            }
            // Persistence is checked on its own (`persisted`).
            self.st
                .take_effects()
                .iter()
                .filter(|e| !matches!(e, Effect::Persist(_)))
                .map(|e| self.describe(e))
                .collect()
        }

        fn describe(&self, e: &Effect) -> String {
            match e {
                Effect::Persist(_) => "persist".into(),
                Effect::Signal(sig, cmd) => {
                    let w = self.sessions.iter().find(|s| Arc::ptr_eq(&s.2, sig)).map_or("?", |s| s.0);
                    format!("{cmd:?} {w}")
                }
                Effect::Hook(j) => format!("hook {:?} {}", j.action, j.worker),
                Effect::Event(s) => {
                    let v = serde_json::to_value(s).unwrap();
                    let who = v["worker"].as_str();
                    match who {
                        Some(w) => format!("event {} {w}", v["type"].as_str().unwrap()),
                        None => format!("event {}", v["type"].as_str().unwrap()),
                    }
                }
            }
        }
    }

    /// (seconds, step, the effects it must queue, in order)
    type Script = &'static [(f64, Step, &'static [&'static str])];

    fn run(cfg: CurtailConfig, script: Script) -> Rig {
        let mut rig = Rig::new(cfg);
        for (n, (secs, step, want)) in script.iter().enumerate() {
            let got = rig.step(*secs, *step);
            assert_eq!(got, *want, "step {n}: {step:?} at {secs} s");
        }
        rig
    }

    #[test]
    fn a_budget_parks_least_efficient_at_once_and_the_ramp_resumes_most_efficient_first() {
        let rig = run(
            cfg(),
            &[
                (0.0, Connect("a.1"), &[]),
                (0.0, Connect("b.1"), &[]),
                (0.0, Connect("c.1"), &[]),
                // 3,000 W drawn, 1,500 allowed: c (40 J/TH) then b (30) go at once.
                (
                    0.0,
                    Budget(1500.0, None),
                    &["Park c.1", "event miner_parked c.1", "Park b.1", "event miner_parked b.1", "event plan_applied"],
                ),
                (0.1, Tick, &["event budget_met"]),
                // Resuming waits for the ramp: 1,000 W/s, 1,000 W a miner.
                (1.0, ResumeAll, &[]),
                (1.0, Tick, &[]),
                (1.5, Tick, &[]),
                (2.0, Tick, &["Resume b.1", "event miner_resumed b.1"]),
                (2.5, Tick, &[]),
                (3.0, Tick, &["Resume c.1", "event miner_resumed c.1"]),
            ],
        );
        let plan = rig.plan.unwrap();
        assert_eq!((plan.park_count, plan.budget_met, plan.expected.watts), (2, true, Watts(1000.0)));
    }

    #[test]
    fn a_failed_park_hook_falls_back_to_the_network() {
        run(
            cfg(),
            &[
                (0.0, Connect("x.1"), &[]),
                (0.0, Connect("a.1"), &[]),
                // The hooked group's miner is parked by its hook, not the network.
                (0.0, Budget(1000.0, None), &["hook Park x.1", "event miner_parked x.1", "event plan_applied"]),
                // The hook gives up: sluice stops the miner's work itself.
                (1.0, HookFailed("x.1", HookAction::Park), &["event hook_failed x.1", "Park x.1"]),
            ],
        );
    }

    #[test]
    fn a_parked_miner_that_reconnects_stays_parked_until_the_lease_falls_back() {
        let script: Script = &[
            (0.0, Connect("a.1"), &[]),
            (0.0, Connect("c.1"), &[]),
            (0.0, Budget(1000.0, Some(10.0)), &["Park c.1", "event miner_parked c.1", "event plan_applied"]),
            (1.0, Leave("c.1"), &[]),
            (2.0, Connect("c.1"), &[]),
        ];
        let mut rig = run(cfg(), script);
        assert!(rig.stay_parked, "a network-parked miner that comes back gets no work");
        // Hold (the default): the budget stays after the lease.
        assert_eq!(rig.step(10.0, Tick), ["event lease_expired", "event budget_met"]);
        assert_eq!(rig.step(20.0, Tick), Vec::<String>::new());
        // Resume: the budget goes and the ramp brings the miner back.
        let mut cfg = cfg();
        cfg.lease_fallback = LeaseFallback::Resume;
        let mut rig = run(cfg, script);
        assert_eq!(rig.step(10.0, Tick), ["event lease_expired"]);
        assert_eq!(rig.step(10.5, Tick), Vec::<String>::new());
        assert_eq!(rig.step(11.0, Tick), ["Resume c.1", "event miner_resumed c.1"]);
    }

    /// Connections with one worker name from one address are distinct
    /// miners: a budget parks each, each that comes back stays parked, and
    /// one more is a new miner the budget then parks.
    #[test]
    fn every_connection_is_a_miner_even_under_one_worker_name() {
        let mut rig = run(
            cfg(),
            &[
                (0.0, Connect("a.1"), &[]),
                (0.0, Connect("d.1"), &[]),
                (0.0, Connect("d.1"), &[]),
                (0.0, Connect("d.1"), &[]),
                // 1,000 W + 3 x 3,250 W (the defaults) drawn; 1,000 allowed.
                (
                    0.0,
                    Budget(1000.0, None),
                    &[
                        "Park d.1",
                        "event miner_parked d.1",
                        "Park d.1",
                        "event miner_parked d.1",
                        "Park d.1",
                        "event miner_parked d.1",
                        "event plan_applied",
                    ],
                ),
                (0.5, Tick, &["event budget_met"]),
            ],
        );
        let ids: Vec<MinerId> = rig.sessions.iter().map(|s| s.3).collect();
        assert_eq!(ids.len(), 4);
        assert!(ids.windows(2).all(|w| w[0] != w[1]), "four miners: {ids:?}");
        // The parked sessions close; each that comes back stays parked.
        for _ in 0..3 {
            assert!(rig.step(1.0, Leave("d.1")).is_empty());
        }
        for _ in 0..3 {
            assert!(rig.step(2.0, Connect("d.1")).is_empty());
            assert!(rig.stay_parked, "a parked miner that comes back gets no work");
        }
        let back: Vec<MinerId> = rig.sessions[1..].iter().map(|s| s.3).collect();
        let mut sorted = back.clone();
        sorted.sort();
        assert_eq!(sorted, ids[1..], "each took its miner back");
        let st = rig.st.status(true);
        assert_eq!((st.site.connected, st.site.mining, st.site.parked), (4, 1, 3));
        // A fourth connection is a new miner, and there is no room for it:
        // parked as it registers, never given a job.
        assert_eq!(rig.step(3.0, Connect("d.1")), ["event miner_parked d.1"]);
        assert!(rig.stay_parked);
        assert!(rig.step(3.5, Tick).is_empty(), "the budget was never broken");
        let st = rig.st.status(true);
        assert_eq!((st.site.connected, st.site.parked), (5, 4));
        assert_eq!(st.miners.unwrap().iter().filter(|m| m.who.worker == "d.1").count(), 4);
    }

    /// Under a budget, new connections are admitted while they fit and
    /// parked as they register once they do not: a reconnect storm never
    /// goes over, not even until the next tick. A fraction budget is taken
    /// of the fleet as it arrives.
    #[test]
    fn new_connections_under_a_budget_get_work_only_while_they_fit() {
        let mut rig = run(cfg(), &[(0.0, Budget(2500.0, None), &[])]);
        let mut admitted = Vec::new();
        for w in ["a.1", "a.2", "a.3", "b.1"] {
            rig.step(1.0, Connect(w));
            admitted.push(!rig.stay_parked);
        }
        assert_eq!(admitted, [true, true, false, false], "1,000 W each: two fit in 2,500 W");
        assert_eq!(rig.step(1.5, Tick), ["event budget_met"], "met without parking anyone");
        let st = rig.st.status(false);
        assert_eq!((st.site.mining, st.site.parked, st.site.watts), (2, 2, Watts(2000.0)));
        // 60% of a fleet arriving one by one: never more than 60% of it mining.
        let mut rig = Rig::new(cfg());
        let b = BudgetParams { reason: "dr".into(), max_listed: 0, ..params(Amount::Fraction(0.6)) };
        rig.st.control(rig.clock(0.0), ControlReq::SetBudget(b)).unwrap();
        for (n, w) in ["a.1", "a.2", "a.3", "a.4", "a.5", "b.1", "b.2", "b.3", "b.4", "b.5"].iter().enumerate() {
            rig.step(1.0, Connect(w));
            let st = rig.st.status(false);
            assert!(st.site.mining as f64 <= 0.6 * (n + 1) as f64, "{} of {} mining", st.site.mining, n + 1);
        }
        assert_eq!(rig.st.status(false).site.mining, 6);
    }

    /// A budget whose scope names nothing is refused, not "met".
    #[test]
    fn a_budget_for_a_scope_that_names_nothing_is_refused() {
        let mut rig = run(cfg(), &[(0.0, Connect("a.1"), &[]), (0.0, Connect("x.1"), &[])]);
        let table: &[(Scope, Option<&str>)] = &[
            (Scope::Site, None),
            (Scope::Group("hooked".into()), None),
            (Scope::Group("default".into()), None),
            (Scope::Workers("a.*".into()), None),
            (Scope::Group("hall-z".into()), Some("unknown group \"hall-z\" (the groups are: hooked, default)")),
            (Scope::Workers("zz.*".into()), Some("scope workers:zz.* matches no miner")),
        ];
        for (scope, want) in table {
            let b = BudgetParams {
                scope: scope.clone(),
                dry_run: true,
                reason: String::new(),
                max_listed: 0,
                ..params(Amount::Watts(0.0))
            };
            let got = rig.st.control(rig.clock(1.0), ControlReq::SetBudget(b)).map(|_| ()).map_err(|e| e.to_string());
            match want {
                None => assert_eq!(got, Ok(()), "{scope:?}"),
                Some(w) => assert!(got.as_ref().unwrap_err().contains(w), "{scope:?}: {got:?}"),
            }
        }
        // With no miner at all, the site is still a scope (a budget set
        // before the fleet reconnects).
        let mut rig = Rig::new(cfg());
        let b = BudgetParams { reason: String::new(), max_listed: 0, ..params(Amount::Watts(0.0)) };
        assert!(rig.st.control(rig.clock(0.0), ControlReq::SetBudget(b)).is_ok());
    }

    /// The saved state of the last Persist effect a step queued.
    fn persisted(effects: Vec<Effect>) -> Option<Saved> {
        effects.into_iter().rev().find_map(|e| match e {
            Effect::Persist(s) => Some(*s),
            _ => None,
        })
    }

    /// What a restart takes up from the state file: the budget with the
    /// time its lease has left, the protection rules; new connections are
    /// admitted against the budget from the first one.
    #[test]
    fn a_restart_takes_up_the_budget_its_lease_and_the_protection_rules() {
        let mut rig = run(cfg(), &[(0.0, Connect("a.1"), &[]), (0.0, Connect("b.1"), &[])]);
        let c = rig.clock(0.0);
        rig.st.control(c, ControlReq::SetProtection { pattern: "c.*".into(), protected: true }).unwrap();
        let b = BudgetParams {
            lease: Some(Duration::from_secs(60)),
            reason: "dr-7".into(),
            ..params(Amount::Watts(1000.0))
        };
        rig.st.control(c, ControlReq::SetBudget(b)).unwrap();
        let saved = persisted(rig.st.take_effects()).expect("a budget change is persisted");
        assert_eq!(saved.budget.as_ref().unwrap().lease_until_ms, Some(1_000_000 + 60_000));
        assert_eq!(saved.last_plan.as_ref().unwrap().park_count, 1);
        // The file round-trips (what the controller writes and reads).
        let saved: Saved = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        // A new process 20 s later: same budget, 40 s of lease left.
        let mut rig = Rig::new(cfg());
        rig.st.restore(rig.clock(20.0), saved.clone()).unwrap();
        let st = rig.st.status(false);
        assert_eq!((st.budget.source, st.budget.reason.as_deref()), (BudgetSource::Command, Some("dr-7")));
        assert!((st.budget.lease_expires_in_s.unwrap() - 40.0).abs() < 0.01, "{:?}", st.budget);
        // The miners come back at once: only what fits gets work; the
        // protected one always does.
        let mut got_work = Vec::new();
        for w in ["b.1", "a.1", "c.1"] {
            rig.step(20.0, Connect(w));
            got_work.push((w, !rig.stay_parked));
        }
        assert_eq!(got_work, [("b.1", true), ("a.1", false), ("c.1", true)]);

        // Restarted after the lease ran out: the fallback applies at once.
        let mut rig = Rig::new(cfg());
        rig.st.restore(rig.clock(0.0), saved).unwrap();
        let effects = rig.step(61.0, Tick);
        assert_eq!(effects.first().map(String::as_str), Some("event lease_expired"));
        assert_eq!(rig.st.status(false).budget.source, BudgetSource::LeaseFallback);
    }

    /// A state file that could not be read, with `on_bad_state =
    /// "park-all"`: nobody curtailable gets work until a budget is set.
    #[test]
    fn with_a_bad_state_file_no_curtailable_miner_gets_work_until_a_budget_arrives() {
        let mut rig = Rig::new(cfg());
        rig.st.hold_everything(rig.clock(0.0), "the state file is not valid");
        rig.st.control(rig.clock(0.0), ControlReq::SetProtection { pattern: "b.*".into(), protected: true }).unwrap();
        for (w, works) in [("a.1", false), ("b.1", true), ("c.1", false)] {
            rig.step(1.0, Connect(w));
            assert_eq!(!rig.stay_parked, works, "{w}");
        }
        assert_eq!(rig.st.status(false).budget.source, BudgetSource::BadState);
        // A budget replaces it; the ramp brings miners back.
        rig.step(2.0, Budget(10_000.0, None));
        assert_eq!(rig.st.status(false).budget.source, BudgetSource::Command);
    }

    /// Every event names the plan and the reason it belongs to; a budget
    /// not met says why.
    #[test]
    fn events_carry_their_plan_and_reason_and_a_budget_not_met_says_why() {
        let events = |effects: Vec<Effect>| -> Vec<serde_json::Value> {
            effects
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Event(s) => Some(serde_json::to_value(s).unwrap()),
                    _ => None,
                })
                .collect()
        };
        let mut rig = run(cfg(), &[(0.0, Connect("a.1"), &[]), (0.0, Connect("c.1"), &[])]);
        rig.step(0.0, Budget(1000.0, None));
        rig.step(0.5, Tick);
        let c = rig.clock(1.0);
        rig.st.control(c, ControlReq::ResumeAll { reason: "gpu load fell".into() }).unwrap();
        let mut seen = events(rig.st.take_effects());
        rig.st.tick(rig.clock(1.0));
        rig.st.tick(rig.clock(2.5));
        seen.extend(events(rig.st.take_effects()));
        let resumed = seen.iter().find(|e| e["type"] == "miner_resumed").expect("resumed");
        assert_eq!((resumed["plan_id"].as_u64(), resumed["reason"].as_str()), (Some(2), Some("gpu load fell")));

        // Everything from the budget names plan 1 and its reason.
        let mut rig = run(cfg(), &[(0.0, Connect("a.1"), &[]), (0.0, Connect("c.1"), &[])]);
        let c = rig.clock(0.0);
        rig.st.control(c, ControlReq::SetProtection { pattern: "a.*".into(), protected: true }).unwrap();
        rig.st.take_effects();
        let b = BudgetParams { reason: "dr-1".into(), ..params(Amount::Watts(500.0)) };
        rig.st.control(c, ControlReq::SetBudget(b)).unwrap();
        let mut seen = events(rig.st.take_effects());
        rig.st.tick(rig.clock(1.0));
        seen.extend(events(rig.st.take_effects()));
        let kinds: Vec<&str> = seen.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["miner_parked", "plan_applied", "budget_not_met"]);
        for e in &seen {
            assert_eq!((e["plan_id"].as_u64(), e["reason"].as_str()), (Some(1), Some("dr-1")), "{e}");
        }
        let why = seen[2]["why"].as_str().unwrap();
        assert!(why.contains("protected miners in scope draw 1000 W, more than the 500 W budget"), "{why}");
    }

    /// Hooks reach a miner at the address `curtail.firmware_address` maps
    /// it to (by worker glob and source network), else at its source.
    #[test]
    fn hooks_reach_a_miner_at_its_mapped_api_address() {
        use crate::curtail::FirmwareAddress;
        let mut c = cfg();
        let ip = |s: &str| Some(s.parse().unwrap());
        c.firmware_address = vec![
            FirmwareAddress { workers: "x.1".into(), cidr: None, address: ip("192.0.2.11") },
            FirmwareAddress {
                workers: String::new(),
                cidr: Some("127.0.0.0/8".parse().unwrap()),
                address: ip("192.0.2.99"),
            },
        ];
        let mut rig = Rig::new(c);
        for w in ["x.1", "x.2"] {
            rig.step(0.0, Connect(w));
        }
        let b = BudgetParams { reason: "off".into(), max_listed: 0, ..params(Amount::Watts(0.0)) };
        rig.st.control(rig.clock(0.0), ControlReq::SetBudget(b)).unwrap();
        let mut hooked: Vec<(String, std::net::IpAddr)> = rig
            .st
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Hook(j) => Some((j.worker.to_string(), j.addr.ip())),
                _ => None,
            })
            .collect();
        hooked.sort();
        assert_eq!(
            hooked,
            [("x.1".into(), "192.0.2.11".parse().unwrap()), ("x.2".into(), "192.0.2.99".parse().unwrap())]
        );
        // Unmapped: the source address.
        let mut rig = Rig::new(cfg());
        rig.step(0.0, Connect("x.1"));
        assert_eq!(rig.st.api_address(0), addr());
    }

    fn prometheus(query: &str) -> crate::curtail::feed::SourceConfig {
        crate::curtail::feed::SourceConfig {
            kind: Some(crate::curtail::feed::SourceKind::Prometheus),
            url: "http://127.0.0.1:9090".into(),
            query: query.into(),
            ..Default::default()
        }
    }

    fn metered(calibrate: bool) -> CurtailConfig {
        CurtailConfig {
            meter: Some(crate::curtail::closed_loop::MeterConfig {
                source: prometheus("sum(hall_watts)"),
                calibrate,
                ..Default::default()
            }),
            ..cfg()
        }
    }

    #[test]
    fn a_calibrated_plan_is_right_the_first_time_and_met_is_judged_on_the_meter() {
        let mut rig = run(
            metered(true),
            &[
                (0.0, Connect("a.1"), &[]),
                (0.0, Connect("b.1"), &[]),
                (0.0, Connect("c.1"), &[]),
                // Nothing changed for settle_s (10 s): 3,300 W measured for
                // 3,000 W estimated calibrates every miner to 1,100 W.
                (10.0, Meter(3300.0), &[]),
                // 2,100 W: on nameplate one miner would do (2,000 W); at
                // 1,100 W each it takes two.
                (
                    10.0,
                    Budget(2100.0, None),
                    &["Park c.1", "event miner_parked c.1", "Park b.1", "event miner_parked b.1", "event plan_applied"],
                ),
                // The meter has not seen it yet: not met, on the measured figure.
                (10.1, Tick, &["event budget_not_met"]),
                (15.0, Meter(1100.0), &[]),
                (15.1, Tick, &["event budget_met"]),
            ],
        );
        let st = rig.st.status(true);
        assert_eq!((st.budget.met, st.budget.met_by), (Some(true), Some(MetBy::Measured)));
        assert_eq!(st.site.measured_w, Some(Watts(1100.0)));
        assert_eq!(st.site.measured_source.as_deref(), Some("prometheus http://127.0.0.1:9090 sum(hall_watts)"));
        assert!((st.calibration.factor - 1.1).abs() < 1e-9, "{:?}", st.calibration);
        let a = st.miners.unwrap().into_iter().find(|m| m.who.worker == "a.1").unwrap();
        assert!((a.watts.0 - 1100.0).abs() < 1e-6, "rows show calibrated watts: {a:?}");
        // The meter goes quiet: stale after 20 s, and "met" goes back to estimates.
        assert_eq!(rig.step(35.0, Tick), ["event meter_stale", "event budget_met"]);
        assert_eq!(rig.st.status(false).budget.met_by, Some(MetBy::Estimated));
        assert_eq!(rig.step(36.0, Meter(1100.0)), ["event meter_recovered"]);
    }

    #[test]
    fn a_meter_over_the_budget_for_settle_s_parks_more() {
        let mut rig = run(
            metered(false),
            &[
                (0.0, Connect("a.1"), &[]),
                (0.0, Connect("b.1"), &[]),
                (0.0, Connect("c.1"), &[]),
                (0.0, Budget(2500.0, None), &["Park c.1", "event miner_parked c.1", "event plan_applied"]),
                (0.1, Tick, &["event budget_met"]),
                // The two left draw 1,300 W each, not 1,000: over, but not yet
                // for settle_s since the park.
                (5.0, Meter(2600.0), &[]),
                (5.1, Tick, &["event budget_not_met"]),
                (10.0, Meter(2600.0), &[]),
                // 10 s over since the first reading over it: raise the factor
                // to 1.3 and park the next least efficient.
                (15.0, Meter(2600.0), &["event meter_correction"]),
                (15.1, Tick, &["Park b.1", "event miner_parked b.1", "event plan_applied"]),
                (20.0, Meter(1300.0), &[]),
                (20.1, Tick, &["event budget_met"]),
            ],
        );
        assert!((rig.st.status(false).calibration.factor - 1.3).abs() < 1e-9);
        // Under by more than the hysteresis does not bring b back on a
        // factor that is right: 1,300 + 1,300 > 2,500.
        assert_eq!(rig.step(40.0, Meter(1300.0)), Vec::<String>::new());
        assert_eq!(rig.step(40.1, Tick), Vec::<String>::new());
    }

    #[test]
    fn follow_mode_sets_the_budget_from_the_other_load() {
        let follow = crate::curtail::closed_loop::FollowConfig {
            site_limit_w: 5000.0,
            margin_w: 500.0,
            other_load: prometheus("sum(DCGM_FI_DEV_POWER_USAGE)"),
            ..Default::default()
        };
        let mut rig = run(
            CurtailConfig { follow: Some(follow.clone()), ..cfg() },
            &[
                (0.0, Connect("a.1"), &[]),
                (0.0, Connect("b.1"), &[]),
                (0.0, Connect("c.1"), &[]),
                // No reading yet, not yet stale: no budget.
                (0.1, Tick, &[]),
                // 5,000 - 2,000 - 500 = 2,500 W.
                (1.0, Other(2000.0), &[]),
                (1.1, Tick, &["Park c.1", "event miner_parked c.1", "event plan_applied", "event budget_met"]),
            ],
        );
        let st = rig.st.status(false);
        assert_eq!(st.budget.source, BudgetSource::Follow);
        assert_eq!(st.budget.watts, Some(Watts(2500.0)));
        assert_eq!(st.follow.as_ref().map(|f| (f.target_w, f.in_force)), Some((Some(Watts(2500.0)), true)));
        // The GPUs need more: down at once.
        rig.step(2.0, Other(3000.0));
        let got = rig.step(2.1, Tick);
        assert_eq!(got[..3], ["Park b.1", "event miner_parked b.1", "event plan_applied"]);
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(1500.0)));
        // They need less: the budget climbs at the ramp (1,000 W/s), and the
        // miners come back as it does, most efficient first.
        rig.step(3.0, Other(500.0));
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(1500.0 + 900.0)));
        let mut resumed = Vec::new();
        for k in 0..40 {
            let t = 3.1 + f64::from(k) * 0.1;
            resumed.extend(rig.step(t, Tick).into_iter().filter(|e| e.starts_with("Resume")));
        }
        assert_eq!(resumed, ["Resume b.1", "Resume c.1"]);
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(4000.0)));
        // A command's lease overrides follow while it lasts.
        rig.step(8.0, Budget(1000.0, Some(5.0)));
        let st = rig.st.status(false);
        assert_eq!((st.budget.source, st.follow.unwrap().in_force), (BudgetSource::Command, false));
        rig.step(9.0, Other(500.0));
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(1000.0)));
        let got = rig.step(13.0, Tick);
        assert_eq!(got[0], "event lease_expired");
        let st = rig.st.status(false);
        assert_eq!((st.budget.source, st.budget.watts), (BudgetSource::Follow, Some(Watts(4000.0))));
        for k in 1..=50 {
            rig.step(13.0 + f64::from(k) * 0.1, Tick);
        }
        assert_eq!(rig.st.status(false).site.mining, 3, "back to follow's 4,000 W");
        // The feed fails and goes stale 20 s after its last good reading:
        // hold (the default) keeps the last budget.
        rig.step(20.0, OtherFailed);
        assert_eq!(rig.step(28.9, Tick), Vec::<String>::new());
        assert_eq!(rig.step(29.0, Tick), ["event meter_stale"]);
        let st = rig.st.status(false);
        assert_eq!(st.budget.watts, Some(Watts(4000.0)));
        let other = st.follow.unwrap().other_load;
        assert_eq!((other.stale, other.error.as_deref()), (true, Some("connection refused")));
        // Shed: the stale budget.
        let shed = crate::curtail::closed_loop::FollowConfig {
            on_stale: crate::curtail::closed_loop::OnStale::Shed,
            stale_budget_w: 1000.0,
            ..follow
        };
        let mut rig = run(CurtailConfig { follow: Some(shed), ..cfg() }, &[(0.0, Connect("a.1"), &[])]);
        rig.step(1.0, Other(0.0));
        rig.step(1.1, Tick);
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(4500.0)));
        assert_eq!(rig.step(21.0, Tick), ["event meter_stale"]);
        assert_eq!(rig.st.status(false).budget.watts, Some(Watts(1000.0)));
    }

    #[test]
    fn a_firmware_meter_sums_the_read_backs_only_when_every_mining_miner_has_one() {
        let mut cfg = cfg();
        cfg.group[0].method = Method::Firmware;
        cfg.group[0].firmware = "luxos".into();
        cfg.meter = Some(crate::curtail::closed_loop::MeterConfig {
            source: crate::curtail::feed::SourceConfig {
                kind: Some(crate::curtail::feed::SourceKind::Firmware),
                ..Default::default()
            },
            ..Default::default()
        });
        let mut rig = run(
            cfg,
            &[
                (0.0, Connect("x.1"), &[]),
                (0.0, Connect("x.2"), &[]),
                // Every interval_s (5 s): ask each mining firmware miner.
                (5.0, Tick, &["hook Read x.1", "hook Read x.2"]),
                (6.0, FwRead("x.1", 1200.0), &[]),
                (6.0, FwRead("x.2", 1300.0), &[]),
                (10.0, Tick, &["hook Read x.1", "hook Read x.2"]),
            ],
        );
        let st = rig.st.status(false);
        assert_eq!(st.site.measured_w, Some(Watts(2500.0)));
        assert_eq!(st.site.measured_source.as_deref(), Some("firmware read-backs"));
        // A miner without a firmware API: no figure for the site.
        rig.step(11.0, Connect("a.1"));
        assert_eq!(rig.step(15.0, Tick), ["hook Read x.1", "hook Read x.2"]);
        let meter = rig.st.status(false).meter.unwrap();
        assert_eq!(
            meter.error.as_deref(),
            Some("1 of 3 mining miners have no firmware read-back younger than stale_after_s")
        );
        // Until it goes stale, 20 s after the last sum.
        assert_eq!(rig.step(30.0, Tick), ["hook Read x.1", "hook Read x.2", "event meter_stale"]);
    }
}
