//! The fleet: every miner sluice knows (connected, or parked and away), its
//! group, power estimate, protection and curtailment state; admission of new
//! miners under a budget; and carrying out a park or a resume as effects
//! (a word to the session, a hook run, an event). Pure: fed the time, it
//! writes to an [`Out`].

use super::book::amount_watts;
use super::effect::{Clock, Effect, HookJob, Out};
use super::hooks::{HookAction, HookDone, HookSpec, Probe, Turn};
use super::learn::{self, Sample};
use super::policy::{MinerState, MinerView};
use super::power::{Estimate, FirmwareReading, PowerModel};
use super::schedule::Amount;
use super::scope::Scope;
use super::store::SavedTarget;
use super::targets::{self, Curve, Setting};
use super::{CurtailConfig, FirmwareAddress, GroupConfig, Method};
use crate::api::{Cause, Event, Figures, HashesPerSec, MinerId, MinerRef, MinerRow, PlannedMiner, Watts};
use crate::link::{Member, SessionCmd};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use wildmatch::WildMatch;

/// A miner's hashrate measured from its shares is taken as its own only
/// after it has mined this long: before, a few shares (or none yet) say
/// little, and a J/TH estimate on them would count it at next to nothing.
/// Until then it counts at its model's watts or `curtail.default_watts`.
pub const HASHRATE_SETTLES: Duration = Duration::from_secs(60);

/// How long after a connection registers from the address and worker name
/// of a parked miner still connected that miner's close may still be on
/// its way (its session not yet woken by the close): meanwhile it counts
/// in no budget, and if its close comes it is forgotten, not remembered.
/// Distinct machines behind one address under one worker name are only
/// ever parked the safe way by this: one that leaves within it comes back
/// as a new miner, admitted only if it fits.
pub const RECONNECT_RACE: Duration = Duration::from_secs(10);

/// A power-target miner running steady is read back for the curves this
/// often (and once after every change).
pub const LEARN_EVERY: Duration = Duration::from_secs(600);

/// Parked miners that never came back are forgotten after this long.
const FORGET_AWAY: Duration = Duration::from_secs(86_400);

/// A worker name's rows summed up: when the newest of them connected, and
/// the newest still connected. Whether a row has a newer one of its name is
/// asked of this (one pass over the name's rows), not row against row.
#[derive(Debug, Clone, Copy)]
struct Newest {
    any: Option<Instant>,
    linked: Option<Instant>,
}

/// After a restart, how long at most the trade keeps the room of lowered
/// miners the state file knows for them to come back (a reconnect storm
/// takes seconds; a miner gone for good delays growth this long once).
pub const RESTART_GRACE: Duration = Duration::from_secs(60);

/// The protection rules after `set_protection(pattern, protected)` (the
/// last match wins; pure). `protected`: the pattern's rule, last. Otherwise
/// the pattern's own rule goes, and an exception `(pattern, false)` is kept
/// last where a protection rule could still cover its workers. A
/// `curtailable` with no rule of its own is taken only as such an exception:
/// when a protection rule matches the pattern itself, or `covers_now` (a
/// miner it matches is protected now); else it is refused, nothing changed.
/// An exception no protection rule precedes means nothing and is dropped.
pub fn set_rule(
    rules: &[(String, bool)],
    pattern: &str,
    protected: bool,
    covers_now: bool,
) -> Result<Vec<(String, bool)>, String> {
    let had = rules.iter().any(|(p, _)| p == pattern);
    let mut out: Vec<(String, bool)> = rules.iter().filter(|(p, _)| p != pattern).cloned().collect();
    if protected {
        out.push((pattern.to_owned(), true));
    } else {
        let covered = covers_now || out.iter().any(|(p, prot)| *prot && WildMatch::new(p).matches(pattern));
        if !had && !covered {
            let list: Vec<String> = rules
                .iter()
                .map(|(p, prot)| format!("{p:?} {}", if *prot { "protected" } else { "curtailable" }))
                .collect();
            let list =
                if list.is_empty() { "no rules are set".into() } else { format!("the rules: {}", list.join(", ")) };
            return Err(format!(
                "no protection rule for {pattern:?}, and no rule protects what it matches: nothing changed ({list})"
            ));
        }
        if out.iter().any(|(_, prot)| *prot) {
            out.push((pattern.to_owned(), false));
        }
    }
    let mut protecting = false;
    out.retain(|(_, p)| {
        protecting |= *p;
        protecting
    });
    Ok(out)
}

/// A `set_protection` rule.
#[derive(Debug)]
struct ProtectRule {
    pattern: String,
    matcher: WildMatch,
    protected: bool,
}

#[derive(Debug)]
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
    /// The connected session (none: parked and away).
    link: Option<Arc<Member>>,
    fw: Option<FirmwareReading>,
    /// When `fw` was read.
    fw_at: Option<Instant>,
    /// What the firmware read back asleep (its parked draw), if positive.
    fw_idle: Option<Watts>,
    est: Estimate,
    /// Parked at the network level (the method, or a failed hook's fallback).
    net_parked: bool,
    /// Bumped on every state change; a hook retry for an older one stops.
    generation: u64,
    disconnected_at: Option<Instant>,
    /// When its present connection registered.
    linked_at: Instant,
    /// method = "power-target": its hashrate against power (none for any
    /// other method).
    curve: Option<Arc<Curve>>,
    /// The power target sluice set, in the firmware's watts (none: full,
    /// as before sluice).
    target: Option<Watts>,
    /// When its target last landed (read back), or its row was made.
    target_at: Instant,
    /// When its firmware was last asked for a read-back to learn from.
    learn_asked: Option<Instant>,
    /// Its hashrate read back steady at full power (H/s): what its
    /// read-backs at a target are a fraction of (else its model's).
    full_hs: Option<f64>,
    /// A target asked and not read back yet (`Some(None)`: back to full).
    asking: Option<Option<Watts>>,
    /// While a wake at a target is asked: the target its firmware had
    /// before (counted from the ask at the new one, as it takes it asleep;
    /// if the wake fails, the firmware may still have this one).
    wake_from: Option<Option<Watts>>,
    /// Waiting in the ramp to wake or be raised at this target.
    queued_to: Option<Option<Watts>>,
    /// The firmware refused a target or never read it back: why. It is
    /// planned as one that can only be parked.
    refused: Option<String>,
    /// Its hook jobs' counter: a job's retries stop once a newer one starts.
    hooks: Arc<AtomicU64>,
    /// Its machine's queue of hook actions (shared with the machine's
    /// other rows, at the same address under the same worker name).
    turn: Turn,
    /// What its firmware said of its envelope (none: not asked yet; asked
    /// with its first target).
    probed: Option<Probe>,
    /// The firmware's own target before sluice first changed it (none:
    /// not known; its nameplate is what it goes back to).
    original: Option<Watts>,
    /// Its target came from the state file: the firmware's target now is
    /// sluice's, not its own.
    restored: bool,
}

/// What a miner is counted at drawing (calibrated watts), and its J/TH
/// there: its full power, or its target; a change asked or queued counts at
/// the higher of before and after, so a lower target sheds only once read
/// back and a higher one grows from the ask.
fn counted(m: &Miner, factor: f64) -> (Watts, crate::api::JoulesPerTh) {
    let full = m.est.watts;
    let Some(curve) = &m.curve else { return (full, m.est.j_per_th) };
    let at = |t: Option<Watts>| t.map_or(full, |t| (t * factor).min(full));
    // A parked miner waiting to wake is counted at what it wakes at.
    let mut w = match (m.state, m.queued_to) {
        (MinerState::Resuming, Some(to)) => at(to),
        _ => at(m.target),
    };
    for to in [m.asking, m.queued_to].into_iter().flatten() {
        if m.state == MinerState::Mining || m.queued_to != Some(to) {
            w = w.max(at(to));
        }
    }
    let p = if full.0 > 0.0 { w.0 / full.0 } else { 1.0 };
    let h = curve.hashrate(p).filter(|h| *h > 0.0).unwrap_or(p.max(1e-9));
    (w, crate::api::JoulesPerTh(m.est.j_per_th.0 * p / h))
}

impl Miner {
    fn hashrate(&self) -> HashesPerSec {
        HashesPerSec(self.link.as_ref().map_or(0.0, |l| l.info.hashrate.get()))
    }
}

/// Watts in the budget's scope: drawn (mining or resuming) and in all, as
/// of the last plan plus the miners admitted since.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admission {
    pub drawn_w: Watts,
    pub fleet_w: Watts,
}

#[derive(Debug)]
struct Group {
    name: String,
    pattern: WildMatch,
    spec: Arc<HookSpec>,
    /// power-target: a new target restarts the miner, so it is lowered
    /// only under a lease with at least this long left.
    restarts: Option<Duration>,
}

/// Figures for one group, refreshed once a second for the metrics.
#[derive(Debug, Clone, Default)]
pub struct GroupFigures {
    pub name: String,
    pub mining: usize,
    pub parked: usize,
    /// What the mining miners draw, and the parked ones still draw.
    pub watts: Watts,
    pub parked_watts: Watts,
    pub hashrate_hs: HashesPerSec,
}

/// Take `id` out of the list at `key`, and the list once it is empty.
fn forget<K: std::hash::Hash + Eq>(lists: &mut HashMap<K, Vec<MinerId>>, key: &K, id: MinerId) {
    if let Some(ids) = lists.get_mut(key) {
        ids.retain(|&x| x != id);
        if ids.is_empty() {
            lists.remove(key);
        }
    }
}

/// What registering a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// A parked miner that left came back (same address and worker): it
    /// takes its place again, parked or not as it was.
    Back { miner: MinerId, parked: bool },
    /// A new miner, at this index, mining until admission says otherwise.
    New { miner: MinerId, index: usize },
}

/// Where a miner stands in the site's fleet (cluster reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Connected; `new`: its connection was made within the window, so
    /// another instance may still count it as away.
    Here { new: bool },
    /// Parked, its connection gone within the window.
    Away,
    /// Gone longer.
    Gone,
}

#[derive(Debug)]
pub struct Fleet {
    power: PowerModel,
    groups: Vec<Group>,
    firmware_address: Vec<FirmwareAddress>,
    /// Oldest first; the last that matches wins. One per pattern.
    protect_rules: Vec<ProtectRule>,
    miners: Vec<Miner>,
    index: HashMap<MinerId, usize>,
    /// Parked miners whose connection ended, by source address and worker:
    /// a new connection that matches takes one over (and stays parked).
    away: HashMap<(IpAddr, Arc<str>), Vec<MinerId>>,
    /// Every miner by source address and worker name, and by worker name.
    by_key: HashMap<(IpAddr, Arc<str>), Vec<MinerId>>,
    by_worker: HashMap<Arc<str>, Vec<MinerId>>,
    /// What new connections are admitted against.
    pub admission: Admission,
    /// When a miner last started or stopped drawing (a meter lags it).
    pub last_change: Instant,
    /// The calibration factor of the last views (a target is set in the
    /// firmware's watts, planned in calibrated ones).
    factor: f64,
    /// Power targets from the state file, by address and worker: a miner
    /// that registers takes its own up (its firmware kept it).
    /// From the state file: each miner's target and its firmware's own.
    saved_targets: HashMap<(IpAddr, Arc<str>), (Watts, Option<Watts>)>,
    /// Of those, the miners not back since the start: while any is
    /// awaited (at most [`RESTART_GRACE`]), nobody grows into their room.
    awaited: HashSet<(IpAddr, Arc<str>)>,
    started: Instant,
    /// Bumped whenever a miner's target or its firmware's own changes (what
    /// the state file keeps of them is written again).
    pub targets_changed: u64,
    /// Each model's curve as its miners read it back.
    pub learning: learn::Models,
    /// `curtail.learn_curves`.
    learn_curves: bool,
    /// The time of the input being handled.
    now: Instant,
}

/// The groups of a config, and the default group last.
fn groups(cfg: &CurtailConfig) -> Vec<Group> {
    let group = |g: &GroupConfig| Group {
        name: g.name.clone(),
        pattern: WildMatch::new(&g.pattern),
        spec: Arc::new(HookSpec::from_config(g)),
        restarts: g.target_restarts().then(|| g.restart_min_lease_s.get()),
    };
    let default = GroupConfig { name: "default".into(), pattern: "*".into(), ..GroupConfig::default() };
    cfg.group.iter().chain([&default]).map(group).collect()
}

impl Fleet {
    pub fn new(cfg: &CurtailConfig, now: Instant) -> Result<Fleet, String> {
        Ok(Fleet {
            power: PowerModel::from_config(cfg)?,
            groups: groups(cfg),
            firmware_address: cfg.firmware_address.clone(),
            protect_rules: Vec::new(),
            miners: Vec::new(),
            index: HashMap::new(),
            away: HashMap::new(),
            by_key: HashMap::new(),
            by_worker: HashMap::new(),
            admission: Admission::default(),
            last_change: now,
            factor: 1.0,
            saved_targets: HashMap::new(),
            awaited: HashSet::new(),
            started: now,
            targets_changed: 0,
            learning: learn::Models::default(),
            learn_curves: cfg.learn_curves,
            now,
        })
    }

    /// A reload: new groups, power rules and API addresses; every miner is
    /// matched again, and keeps its state.
    pub fn reconfigure(&mut self, cfg: &CurtailConfig) -> Result<(), String> {
        self.power = PowerModel::from_config(cfg)?;
        self.groups = groups(cfg);
        self.firmware_address = cfg.firmware_address.clone();
        self.learn_curves = cfg.learn_curves;
        for i in 0..self.miners.len() {
            let w = self.miners[i].worker.clone();
            self.miners[i].group = self.group_of(&w);
            self.miners[i].rule = self.power.rule_for(&w);
            self.miners[i].curve = self.curve_of(i);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.miners.len()
    }

    /// An input arrives at `now`.
    pub fn at(&mut self, now: Instant) {
        self.now = now;
    }

    pub fn is_empty(&self) -> bool {
        self.miners.is_empty()
    }

    pub fn index_of(&self, miner: MinerId) -> Option<usize> {
        self.index.get(&miner).copied()
    }

    pub fn generation(&self, i: usize) -> u64 {
        self.miners[i].generation
    }

    fn group_of(&self, worker: &str) -> usize {
        self.groups.iter().position(|g| g.pattern.matches(worker)).unwrap_or(self.groups.len() - 1)
    }

    fn is_protected(&self, worker: &str) -> bool {
        self.protect_rules.iter().rev().find(|r| r.matcher.matches(worker)).is_some_and(|r| r.protected)
    }

    fn method(&self, i: usize) -> Method {
        self.groups[self.miners[i].group].spec.method
    }

    /// A power-target miner's curve: its model's as its miners read it
    /// back ([`learn`]), the table's until then (and for a rule without a
    /// model).
    fn curve_for(&self, group: usize, rule: Option<usize>) -> Option<Arc<Curve>> {
        if self.groups[group].spec.method != Method::PowerTarget {
            return None;
        }
        let prior = self.power.curve_of(rule);
        let model = rule.and_then(|r| self.power.model_of(r)).filter(|_| self.learn_curves);
        Some(model.and_then(|m| self.learning.curve(m, &prior)).unwrap_or_else(|| Arc::new(prior)))
    }

    /// A session authorized. `factor` scales a new miner's estimate.
    pub fn register(&mut self, clock: Clock, member: Arc<Member>, factor: f64) -> Joined {
        let info = &member.info;
        let worker = info.worker.get().cloned().unwrap_or_else(|| Arc::from(""));
        let addr = info.addr;
        if let Some(id) = self.take_away(addr.ip(), &worker) {
            self.silence_old(&worker, addr.ip(), id);
            let m = &mut self.miners[self.index[&id]];
            (m.link, m.addr, m.disconnected_at, m.linked_at) = (Some(member), addr, None, clock.at);
            return Joined::Back { miner: id, parked: m.net_parked };
        }
        let id = MinerId(info.session);
        self.silence_old(&worker, addr.ip(), id);
        self.last_change = clock.at;
        let (group, rule, protected) =
            (self.group_of(&worker), self.power.rule_for(&worker), self.is_protected(&worker));
        let mut est = self.power.estimate(rule, HashesPerSec::ZERO, None, None);
        est.scale(factor);
        let curve = self.curve_for(group, rule);
        let key = (addr.ip(), worker.clone());
        self.awaited.remove(&key);
        let turn = self.by_key.get(&key).and_then(|ids| ids.iter().find_map(|id| self.index.get(id)));
        let turn = turn.map_or_else(Turn::default, |&j| self.miners[j].turn.clone());
        // Taken once: a later connection under this key is a later firmware
        // state, which the file no longer knows (it is counted at full).
        let saved = self.saved_targets.remove(&key).filter(|_| curve.is_some());
        let (target, original) = saved.map_or((None, None), |(t, o)| (Some(t), o));
        let index = self.miners.len();
        self.index.insert(id, index);
        self.by_key.entry(key).or_default().push(id);
        self.by_worker.entry(worker.clone()).or_default().push(id);
        self.miners.push(Miner {
            id,
            worker,
            addr,
            group,
            rule,
            protected,
            state: MinerState::Mining,
            changed_at: clock.at,
            changed_ms: clock.unix_ms,
            link: Some(member),
            fw: None,
            fw_at: None,
            fw_idle: None,
            est,
            net_parked: false,
            generation: 0,
            disconnected_at: None,
            linked_at: clock.at,
            curve,
            target,
            target_at: clock.at,
            learn_asked: None,
            full_hs: None,
            asking: None,
            wake_from: None,
            queued_to: None,
            refused: None,
            hooks: Arc::default(),
            turn,
            probed: None,
            original,
            restored: target.is_some(),
        });
        Joined::New { miner: id, index }
    }

    /// A new miner under a budget gets work only if it fits, so a reconnect
    /// storm never takes the site over the budget, not even until the next
    /// plan. One that does not fit is parked at once. True: parked.
    pub fn admit(&mut self, i: usize, amount: Amount, scope: &Scope, cause: &Cause, out: &mut Out) -> bool {
        if self.miners[i].protected || !self.in_scope(scope, i) {
            return false;
        }
        // At its target if it has one (from the state file: its firmware
        // kept it), else at full power.
        let w = counted(&self.miners[i], self.factor).0;
        // A parked miner of its worker name may be this very machine (its
        // old session not yet heard to end, or it came back from another
        // address): the fleet a fraction is taken of does not grow by it.
        if !self.may_be_known(i) {
            self.admission.fleet_w += self.miners[i].est.watts;
        }
        let budget_w = match amount {
            Amount::Watts(x) => Watts(x),
            Amount::Fraction(f) => self.admission.fleet_w * f,
        };
        if self.admission.drawn_w + w <= budget_w {
            self.admission.drawn_w += w;
            return false;
        }
        self.admission.drawn_w += self.miners[i].est.idle;
        self.set_state(i, MinerState::Parked, out.clock);
        self.miners[i].net_parked = true;
        let method = self.method(i);
        if method != Method::Network {
            self.spawn_hook(i, HookAction::Park, cause, out);
        }
        out.emit(Event::MinerParked { who: self.who(i), watts: w, hook: method, cause: cause.clone() });
        true
    }

    /// Whether new miner `i` may be a parked miner already known, under
    /// its worker name (see [`Fleet::admit`]).
    fn may_be_known(&self, i: usize) -> bool {
        let m = &self.miners[i];
        self.by_worker.get(&m.worker).is_some_and(|ids| {
            ids.iter()
                .filter(|&&id| id != m.id)
                .filter_map(|id| self.index.get(id))
                .any(|&j| self.miners[j].state == MinerState::Parked)
        })
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
        forget(&mut self.by_key, &(m.addr.ip(), m.worker.clone()), m.id);
        forget(&mut self.by_worker, &m.worker, m.id);
        if m.link.is_none() {
            forget(&mut self.away, &(m.addr.ip(), m.worker.clone()), m.id);
        }
        if let Some(moved) = self.miners.get(i) {
            self.index.insert(moved.id, i);
        }
    }

    /// A session ended. A parked miner is remembered (when it reconnects it
    /// must stay parked); any other is forgotten. False: not this session's
    /// miner (any more).
    pub fn deregister(&mut self, now: Instant, miner: MinerId, session: u64) -> bool {
        let Some(i) = self.index_of(miner) else { return false };
        if self.miners[i].link.as_ref().is_none_or(|l| l.info.session != session) {
            return false;
        }
        if self.miners[i].state == MinerState::Parked
            && !self.reconnected_early(i, self.newest_of(&self.miners[i].worker))
        {
            let m = &mut self.miners[i];
            (m.link, m.disconnected_at) = (None, Some(now));
            self.away.entry((m.addr.ip(), m.worker.clone())).or_default().push(m.id);
        } else {
            self.last_change = now;
            self.remove(i);
        }
        true
    }

    /// Whether parked miner `i`, whose connection just ended (or may
    /// have), has already come back as a new miner: a connection under
    /// its worker name (from its address, or another: a new lease, another
    /// NAT) registered in the last [`RECONNECT_RACE`], after this one's,
    /// while this one still looked live (on a loaded machine a miner's
    /// reconnect can register before its old session has noticed the
    /// close). Remembering it as well would count one machine twice: in
    /// the fleet a fraction budget is taken of, and in status. It is
    /// forgotten; the new connection, admitted under the budget as any new
    /// miner, is the machine. (Two machines under one name only ever make
    /// a budget smaller this way, for at most [`RECONNECT_RACE`].)
    fn reconnected_early(&self, i: usize, n: Newest) -> bool {
        let m = &self.miners[i];
        self.linked_since(n, m.linked_at.max(m.changed_at))
    }

    /// Miners of `worker` away, or connected from `ip` (whose close may
    /// not be heard yet), but `except`, are the machine that has just come
    /// back (see [`Fleet::superseded`], [`Fleet::overtaken`]): what their
    /// hooks still try (a wake or a pause retried while the firmware did
    /// not answer) stops, so only the row the machine is now drives its
    /// firmware. (Sim-check seed 105: an old row's wake at full power,
    /// retried, reached the firmware after the new row had woken it at
    /// 2,056 W; tests/curtail under load: an old row's pause, retried,
    /// put a LuxOS miner to sleep after resume_all had woken its new row.)
    /// Its job was taken with the park, whatever its hook does.
    fn silence_old(&self, worker: &Arc<str>, ip: std::net::IpAddr, except: MinerId) {
        let Some(ids) = self.by_worker.get(worker) else { return };
        for &j in ids.iter().filter(|&&id| id != except).filter_map(|id| self.index.get(id)) {
            let m = &self.miners[j];
            if m.link.is_none() || m.addr.ip() == ip {
                m.hooks.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether connected miner `i` may be a machine that has come back on
    /// a newer connection before this one's close was heard (see
    /// [`Fleet::reconnected_early`]), whatever its state: it keeps its
    /// place in every budget (what it may draw counts), but the fleet a
    /// fraction is taken of counts the machine once, at the newer
    /// connection (sim-check seeds 10, 1165: a mining row whose close was
    /// not heard yet, parked with its reconnect by the next plan). Machines
    /// that share a worker name and connect together only make that fleet
    /// the smaller, for at most [`RECONNECT_RACE`].
    fn overtaken(&self, i: usize, n: Newest) -> bool {
        self.miners[i].link.is_some() && self.linked_since(n, self.miners[i].linked_at)
    }

    /// Whether a connection of the worker name `n` sums up (not the row
    /// asking: `since` is at least its own) registered after `since` and
    /// within the last [`RECONNECT_RACE`]. The newest is enough to know.
    fn linked_since(&self, n: Newest, since: Instant) -> bool {
        n.linked.is_some_and(|t| t > since && self.now.saturating_duration_since(t) < RECONNECT_RACE)
    }

    /// The newest rows of `worker`: O(its rows).
    fn newest_of(&self, worker: &Arc<str>) -> Newest {
        let mut n = Newest { any: None, linked: None };
        for m in self.by_worker.get(worker).into_iter().flatten().filter_map(|id| self.index.get(id)) {
            let m = &self.miners[*m];
            n.any = n.any.max(Some(m.linked_at));
            if m.link.is_some() {
                n.linked = n.linked.max(Some(m.linked_at));
            }
        }
        n
    }

    /// The newest rows of every worker name, for a pass over the whole
    /// fleet: O(miners), where asking row by row would be quadratic in a
    /// farm that gives every machine one name.
    fn newest_all(&self) -> HashMap<Arc<str>, Newest> {
        self.by_worker.keys().map(|w| (w.clone(), self.newest_of(w))).collect()
    }

    /// Miner `i`'s worker name summed up, from `all` (see [`Fleet::newest_all`]).
    fn newest_in(&self, all: &HashMap<Arc<str>, Newest>, i: usize) -> Newest {
        all.get(&self.miners[i].worker).copied().unwrap_or(Newest { any: None, linked: None })
    }

    /// Miner `i` is away and its machine is back as another miner (see
    /// [`Fleet::back_elsewhere`]): that one is the machine. Nothing is
    /// woken or raised through this one: its firmware is the other's, and
    /// a wake or a raise here would draw power the other's row does not
    /// count (sim-check seed 1185: resume_all queued an away row's raise,
    /// the ramp sent it after its machine came back elsewhere lowered).
    fn superseded(&self, i: usize, n: Newest) -> bool {
        self.miners[i].link.is_none() && self.back_elsewhere(i, n)
    }

    /// Whether miner `i`, parked and away, may have come back as another
    /// miner: a connection under its worker name (from its address or
    /// another: a new DHCP lease, another NAT) registered after its own did,
    /// connected now or away in turn. It is still remembered (back at its
    /// old address it is parked again), but only the newest of them counts
    /// in a budget: a fraction is never taken of one machine twice.
    /// (Machines that share a worker name only make the budget the smaller,
    /// never the larger.) `n`: its worker name summed up.
    fn back_elsewhere(&self, i: usize, n: Newest) -> bool {
        n.any.is_some_and(|t| t > self.miners[i].linked_at)
    }

    /// Refresh the estimates (scaled by `factor`) and build the policy's
    /// view of every known miner: the connected ones, and parked ones that
    /// are away (they count towards the fleet a fraction is taken of).
    pub fn views(&mut self, scope: Option<&Scope>, factor: f64) -> (Vec<usize>, Vec<MinerView>) {
        let mut idx = Vec::with_capacity(self.miners.len());
        let mut views = Vec::with_capacity(self.miners.len());
        self.factor = factor;
        let now = self.now;
        // A parked connection whose machine has already come back on a new
        // one (see `reconnected_early`) is one machine counted twice until
        // its close is heard: left out of every budget's scope meanwhile,
        // so a fraction is never taken of a fleet larger than the site's.
        let all = self.newest_all();
        let newest: Vec<Newest> = (0..self.miners.len()).map(|i| self.newest_in(&all, i)).collect();
        let doubled: Vec<bool> = (0..self.miners.len())
            .map(|i| {
                let m = &self.miners[i];
                match m.link {
                    Some(_) => m.state == MinerState::Parked && self.reconnected_early(i, newest[i]),
                    // Away and parked, or woken while away (resume_all):
                    // no job either way; the newer connection is the one
                    // that holds or waits for one (sim-check seed 83).
                    None => self.back_elsewhere(i, newest[i]),
                }
            })
            .collect();
        let overtaken: Vec<bool> = (0..self.miners.len()).map(|i| self.overtaken(i, newest[i])).collect();
        for (i, m) in self.miners.iter_mut().enumerate() {
            if m.link.is_some() {
                // A miner with power targets is planned on its nameplate:
                // what it reads back and hashes follow the target.
                // A read-back is the miner's draw only once taken settle_s
                // after it last parked or woke: a waking miner reads low
                // while it climbs (minutes on some firmware).
                let settle = self.groups[m.group].spec.settle;
                let steady =
                    m.fw.filter(|_| m.fw_at.is_some_and(|t| t.saturating_duration_since(m.changed_at) >= settle));
                // Its shares say what it hashes only once it has mined a
                // while (HASHRATE_SETTLES); until then, never less than its
                // model's watts or the default.
                let mined =
                    m.state == MinerState::Mining && now.saturating_duration_since(m.changed_at) >= HASHRATE_SETTLES;
                let measured = if mined { m.hashrate() } else { HashesPerSec::ZERO };
                m.est = match m.curve {
                    Some(_) => self.power.estimate(m.rule, HashesPerSec::ZERO, None, m.fw_idle),
                    None => self.power.estimate(m.rule, measured, steady, m.fw_idle),
                };
                m.est.scale(factor);
            }
            let in_scope = !doubled[i] && scope.is_none_or(|s| s.contains(&self.groups[m.group].name, &m.worker));
            let (watts, j_per_th) = counted(m, factor);
            idx.push(i);
            views.push(MinerView {
                watts,
                idle: m.est.idle,
                j_per_th,
                full: if overtaken[i] { Watts::ZERO } else { m.est.watts },
                state: m.state,
                protected: m.protected,
                in_scope,
                changed_at: m.changed_at,
            });
        }
        (idx, views)
    }

    /// Where miner `i` stands in the site's fleet, over the last `within`
    /// (`lease_s`): a miner parked by closing its connection comes back
    /// within seconds, here or to another instance.
    pub fn presence(&self, i: usize, within: Duration) -> Presence {
        let m = &self.miners[i];
        let lately = |t: Instant| self.now.saturating_duration_since(t) < within;
        match (&m.link, m.disconnected_at) {
            (Some(_), _) => Presence::Here { new: lately(m.linked_at) },
            (None, Some(t)) if lately(t) => Presence::Away,
            (None, _) => Presence::Gone,
        }
    }

    /// Miner `i`'s machine as the site names it: `worker@address`.
    pub fn machine(&self, i: usize) -> String {
        format!("{}@{}", self.miners[i].worker, self.miners[i].addr.ip())
    }

    /// Whether miner `i` takes power targets (it has a curve).
    pub fn lowerable(&self, i: usize) -> bool {
        self.miners[i].curve.is_some()
    }

    /// Whether any miner in `scope` can be given a power target.
    pub fn has_targets(&self, scope: &Scope) -> bool {
        (0..self.miners.len()).any(|i| self.miners[i].curve.is_some() && self.in_scope(scope, i))
    }

    /// Miner `i` for the partial-power planner: full watts, hashrate
    /// (TH/s), idle, and its curve unless it can only be parked (no curve,
    /// refused, or a firmware that restarts on a new target under a lease
    /// shorter than its group allows; `lease_left` none: no lease).
    pub fn unit(&self, i: usize, lease_left: Option<Duration>) -> (Watts, f64, Watts, Option<Arc<Curve>>) {
        let m = &self.miners[i];
        let restarts = self.groups[m.group].restarts;
        let ok = restarts.is_none_or(|min| lease_left.is_some_and(|l| l >= min)) && m.refused.is_none();
        let ths = if m.est.j_per_th.0 > 0.0 { m.est.watts.0 / m.est.j_per_th.0 } else { 0.0 };
        (m.est.watts, ths, m.est.idle, m.curve.clone().filter(|_| ok))
    }

    /// Miner `i`'s curve: its group's and power rule's, its floor raised
    /// to the lowest target its firmware said it takes (worked out when
    /// that is learnt or the config reloads, not at every plan).
    fn curve_of(&self, i: usize) -> Option<Arc<Curve>> {
        let m = &self.miners[i];
        let c = self.curve_for(m.group, m.rule)?;
        let full = self.nameplate(i).0;
        match m.probed.and_then(|p| p.min).filter(|_| full > 0.0) {
            Some(min) if min.0 / full > c.min() => Some(Arc::new(c.floor(min.0 / full))),
            _ => Some(c),
        }
    }

    /// Where miner `i` is now, for the trade (`hold`: how long a parked
    /// miner stays parked).
    pub fn now_of(&self, i: usize, at: Instant, hold: Duration) -> targets::Now {
        let m = &self.miners[i];
        let parked = m.state == MinerState::Parked;
        targets::Now {
            parked,
            at: if parked { m.est.idle } else { counted(m, self.factor).0 },
            busy: m.asking.is_some() || m.queued_to.is_some() || m.state == MinerState::Resuming,
            held: parked && at.saturating_duration_since(m.changed_at) < hold,
        }
    }

    /// A setting as a target in the firmware's watts (none: full).
    fn firmware_target(&self, i: usize, s: Setting) -> Option<Watts> {
        let min = self.miners[i].probed.and_then(|p| p.min).map_or(0.0, |w| w.0);
        match s {
            Setting::Target(w) => Some(Watts((w.0 / self.factor).floor().max(min))),
            Setting::Full | Setting::Park => None,
        }
    }

    /// Ask miner `i`'s firmware for a new target now (`Target`, or `Full`:
    /// back to its nameplate). Counted at the higher of before and after
    /// until it reads back.
    pub fn set_target(&mut self, i: usize, s: Setting, cause: &Cause, out: &mut Out) {
        let to = self.firmware_target(i, s);
        let from = self.miners[i].target;
        self.miners[i].asking = Some(to);
        // The state file keeps the higher of the two until it reads back.
        self.targets_changed += 1;
        // Its draw moves from now: the meter lags it.
        self.last_change = out.clock.at;
        let watts = self.asked_watts(i, to);
        // One still waking (its firmware has not answered the wake yet) is
        // woken at the new target: this job supersedes that one, and the
        // miner must not be left asleep.
        let action = if self.waking(i) { HookAction::Resume } else { HookAction::Target };
        self.spawn_hook_at(i, action, Some(watts), cause, out);
        out.emit(Event::MinerTarget { who: self.who(i), from_w: from, to_w: to, cause: cause.clone() });
    }

    /// A power-target miner counted as mining whose job waits for its
    /// firmware's wake.
    fn waking(&self, i: usize) -> bool {
        let m = &self.miners[i];
        m.state == MinerState::Mining && m.net_parked && self.method(i) == Method::PowerTarget
    }

    /// What a target (none: full, as before sluice: the firmware's own
    /// target where it said, else the nameplate) is asked as, in the
    /// firmware's watts.
    fn asked_watts(&self, i: usize, to: Option<Watts>) -> Watts {
        to.or(self.miners[i].original).unwrap_or_else(|| self.nameplate(i))
    }

    /// Its full power in the firmware's watts.
    fn nameplate(&self, i: usize) -> Watts {
        Watts((self.miners[i].est.watts.0 / self.factor).round())
    }

    /// Queue a raise (or a wake, for a parked miner) at setting `s` for the
    /// ramp: its id and generation. Counted at the new draw from now.
    pub fn mark_raising(&mut self, i: usize, s: Setting, clock: Clock) -> Option<(MinerId, u64)> {
        let to = self.firmware_target(i, s);
        if self.miners[i].state == MinerState::Parked {
            self.set_state(i, MinerState::Resuming, clock);
        }
        let m = &mut self.miners[i];
        m.queued_to = Some(to);
        Some((m.id, m.generation))
    }

    /// Whether a power target asked is not read back yet (the draw is
    /// moving: no reading calibrates meanwhile).
    pub fn targets_in_flight(&self) -> bool {
        self.miners.iter().any(|m| m.asking.is_some())
    }

    /// Miners at a lower target, mining or parked: to bring back to full
    /// when the budget lifts.
    pub fn lowered(&self) -> Vec<usize> {
        let all = self.newest_all();
        (0..self.miners.len())
            .filter(|&i| self.miners[i].target.is_some() && !self.superseded(i, self.newest_in(&all, i)))
            .collect()
    }

    /// Power targets to keep across a restart, with the firmware's own.
    pub fn targets_set(&self) -> Vec<SavedTarget> {
        let all = self.newest_all();
        let mut v: Vec<_> = (0..self.miners.len())
            // One target per machine: its newest row's (an older row of its
            // worker name is the same machine, its target a thing of the
            // past; sim-check seed 2121 restored one at 1,750 W that the
            // machine had left for full power under its new row).
            .filter(|&i| !self.back_elsewhere(i, self.newest_in(&all, i)))
            .map(|i| &self.miners[i])
            .filter_map(|m| {
                // A target asked and not read back may be the firmware's
                // already (a crash before its answer): the higher is kept.
                // So does a wake at a target: the firmware may still have
                // the one from before.
                let target = match m.wake_from {
                    Some(from) => from.zip(m.target).map(|(a, b)| a.max(b)),
                    None => m.target,
                };
                let watts = match (target, m.asking) {
                    (Some(t), None) => t,
                    (Some(t), Some(Some(a))) => t.max(a),
                    _ => return None,
                };
                Some(SavedTarget { address: m.addr.ip(), worker: m.worker.to_string(), watts, original_w: m.original })
            })
            .collect();
        v.sort_by(|a, b| (a.address, &a.worker).cmp(&(b.address, &b.worker)));
        v
    }

    /// Targets from the state file, for the miners as they register.
    pub fn restore_targets(&mut self, t: Vec<SavedTarget>) {
        self.saved_targets =
            t.into_iter().map(|t| ((t.address, Arc::from(t.worker.as_str())), (t.watts, t.original_w))).collect();
        self.awaited = self.saved_targets.keys().cloned().collect();
    }

    /// Whether lowered miners the state file knows are still awaited after
    /// a restart: their firmware holds their target, so the room they take
    /// is theirs until they are back or [`RESTART_GRACE`] has passed.
    pub fn awaiting_lowered(&self, now: Instant) -> bool {
        !self.awaited.is_empty() && now < self.started + RESTART_GRACE
    }

    /// The calibration factor moved by `k`: scale the estimates kept
    /// (those of connected miners are made afresh at every plan).
    pub fn rescale(&mut self, k: f64) {
        for m in &mut self.miners {
            m.est.scale(k);
        }
    }

    /// Which miner `i` is, for plans, rows and events.
    pub fn who(&self, i: usize) -> MinerRef {
        let m = &self.miners[i];
        MinerRef { miner: m.id, worker: m.worker.to_string(), address: m.addr.ip() }
    }

    pub fn planned(&self, i: usize) -> PlannedMiner {
        let m = &self.miners[i];
        PlannedMiner {
            who: self.who(i),
            watts: m.est.watts,
            watts_source: m.est.watts_source,
            j_per_th: m.est.j_per_th,
            efficiency_source: m.est.efficiency_source,
        }
    }

    fn set_state(&mut self, i: usize, s: MinerState, clock: Clock) {
        if s != MinerState::Resuming {
            self.last_change = clock.at;
        }
        let m = &mut self.miners[i];
        (m.state, m.changed_at, m.changed_ms) = (s, clock.at, clock.unix_ms);
        m.generation += 1;
        // Parked, it waits for nothing: a wake or raise it was queued for
        // has left the ramp with the generation (kept, it would mark the
        // miner busy for every trade to come; sim-check seed 2037).
        if s == MinerState::Parked {
            m.queued_to = None;
        }
    }

    /// Every row with a connection: its miner and session (the self-check).
    pub fn linked(&self) -> impl Iterator<Item = (MinerId, u64)> + '_ {
        self.miners.iter().filter_map(|m| m.link.as_ref().map(|l| (m.id, l.info.session)))
    }

    fn signal(&self, i: usize, cmd: SessionCmd, out: &mut Out) {
        if let Some(l) = &self.miners[i].link {
            out.push(Effect::Signal(l.clone(), cmd));
        }
    }

    /// Park a miner now: its hook, or the network.
    pub fn park(&mut self, i: usize, cause: &Cause, out: &mut Out) {
        self.set_state(i, MinerState::Parked, out.clock);
        let method = self.method(i);
        // Its job goes at once, whatever the method: a firmware's pause (or
        // a command, or a webhook) takes seconds or never comes, and the
        // plan counts on the budget met now. The hook then saves what the
        // miner still draws idle.
        self.net_park(i, out);
        if method != Method::Network {
            self.spawn_hook(i, HookAction::Park, cause, out);
        }
        let (who, watts) = (self.who(i), self.miners[i].est.watts);
        out.emit(Event::MinerParked { who, watts, hook: method, cause: cause.clone() });
    }

    /// Where a miner's API answers: `curtail.firmware_address`, else the
    /// source address of its connection.
    fn api_address(&self, i: usize) -> SocketAddr {
        let m = &self.miners[i];
        let mapped = self.firmware_address.iter().find(|f| {
            (f.workers.is_empty() || WildMatch::new(&f.workers).matches(&m.worker))
                && f.cidr.is_none_or(|c| c.contains(&m.addr.ip()))
        });
        match mapped.and_then(|f| f.address) {
            Some(ip) => SocketAddr::new(ip, m.addr.port()),
            None => m.addr,
        }
    }

    /// Run `action` through miner `i`'s group hook.
    pub fn spawn_hook(&self, i: usize, action: HookAction, cause: &Cause, out: &mut Out) {
        self.spawn_hook_at(i, action, None, cause, out)
    }

    fn spawn_hook_at(&self, i: usize, action: HookAction, target: Option<Watts>, cause: &Cause, out: &mut Out) {
        let m = &self.miners[i];
        // A read supersedes nothing; any other job supersedes the last.
        let number = match action {
            HookAction::Read => m.hooks.load(Ordering::Acquire),
            _ => m.hooks.fetch_add(1, Ordering::AcqRel) + 1,
        };
        out.push(Effect::Hook(HookJob {
            latest: m.hooks.clone(),
            number,
            turn: m.turn.clone(),
            probe: target.is_some() && m.probed.is_none(),
            spec: self.groups[m.group].spec.clone(),
            action,
            miner: m.id,
            worker: m.worker.clone(),
            addr: self.api_address(i),
            cause: cause.clone(),
            generation: m.generation,
            target,
        }));
    }

    /// Its job back, if it was parked at the network level.
    fn net_resume(&mut self, i: usize, out: &mut Out) {
        if std::mem::take(&mut self.miners[i].net_parked) {
            self.signal(i, SessionCmd::Resume, out);
        }
    }

    /// The event of a hook that did what it was asked.
    fn hook_ok(&self, i: usize, d: &HookDone, reading: Option<FirmwareReading>) -> Event {
        Event::HookOk {
            who: self.who(i),
            hook: self.method(i),
            action: d.action,
            watts: reading.map(|r| r.watts),
            hashrate_hs: reading.map(|r| r.hashrate_hs),
            cause: d.cause.clone(),
        }
    }

    fn net_park(&mut self, i: usize, out: &mut Out) {
        self.miners[i].net_parked = true;
        self.signal(i, SessionCmd::Park, out);
    }

    /// Resume a miner now (its turn in the ramp has come). One that is
    /// parked and away is forgotten (it registers afresh, as mining),
    /// unless its firmware is woken at a power target.
    pub fn resume(&mut self, i: usize, cause: &Cause, out: &mut Out) {
        self.set_state(i, MinerState::Mining, out.clock);
        let method = self.method(i);
        // A power-target miner gets its job back once its firmware has
        // taken the target and woken (`on_hook`): never a job at the old
        // power.
        if method != Method::PowerTarget {
            self.net_resume(i, out);
        }
        // Woken at a target: the firmware takes it before it wakes.
        let kept = self.miners[i].target;
        let to = self.miners[i].queued_to.take().filter(|&to| to != kept);
        // A lowered miner woken at the target it keeps is told that target
        // again: it is counted at it, and its firmware may hold another (an
        // ask it took after a newer one was sent, a restart of either
        // side; sim-check seed 65 woke one at 3,010 W counted at 2,372 W).
        let to = to.or((method == Method::PowerTarget && kept.is_some()).then_some(kept));
        if let Some(to) = to {
            // It takes the target asleep, before it wakes (a failure leaves
            // it asleep): counted at the target from now.
            let from = self.miners[i].target;
            (self.miners[i].target, self.miners[i].asking) = (to, Some(to));
            self.miners[i].wake_from = Some(from);
            self.targets_changed += 1;
            let watts = self.asked_watts(i, to);
            self.spawn_hook_at(i, HookAction::Resume, Some(watts), cause, out);
            out.emit(Event::MinerTarget { who: self.who(i), from_w: from, to_w: to, cause: cause.clone() });
        } else if method != Method::Network {
            self.spawn_hook(i, HookAction::Resume, cause, out);
        }
        let watts = self.miners[i].est.watts;
        out.emit(Event::MinerResumed { who: self.who(i), watts, hook: method, cause: cause.clone() });
        // A power-target miner away is kept, counted as mining: its firmware
        // wakes it at the target asked, and when it reconnects it is known
        // (its job comes once the wake is answered).
        if self.miners[i].link.is_none() && method != Method::PowerTarget {
            self.remove(i);
        }
    }

    /// Mark a parked miner as resuming (it waits for the ramp): its id and
    /// state generation, to queue. None if it is not parked.
    pub fn mark_resuming(&mut self, i: usize, clock: Clock) -> Option<(MinerId, u64)> {
        if self.miners[i].state != MinerState::Parked {
            return None;
        }
        self.set_state(i, MinerState::Resuming, clock);
        Some((self.miners[i].id, self.miners[i].generation))
    }

    /// The watts a miner still waiting in the ramp as queued (same state
    /// generation) adds: a resume its draw, a raise the difference; None
    /// if it is not waiting.
    pub fn waiting(&self, miner: MinerId, generation: u64) -> Option<Watts> {
        let i = self.index_of(miner)?;
        let m = &self.miners[i];
        if m.generation != generation {
            return None;
        }
        // Its turn is only to be taken out of the queue (`unqueue`).
        if !self.may_grow(i) {
            return Some(Watts::ZERO);
        }
        match (m.state, m.queued_to) {
            (MinerState::Resuming, _) => Some(counted(m, self.factor).0),
            (MinerState::Mining, Some(to)) => {
                let at = |t: Option<Watts>| t.map_or(m.est.watts, |t| (t * self.factor).min(m.est.watts));
                Some((at(to) - at(m.target)).max(Watts::ZERO))
            }
            _ => None,
        }
    }

    /// Whether miner `i` may be woken or raised: not while its machine may
    /// be drawing through another of its rows, newer (it is
    /// [`Fleet::superseded`] or [`Fleet::overtaken`]). Two rows asking one
    /// firmware for different things leave it at neither's count
    /// (sim-check seed 2141: the old row of a reconnect not yet heard to
    /// end raised the machine to 3,645 W as the new one woke it at
    /// 1,823 W). A park or a lower goes through any row.
    pub fn may_grow(&self, i: usize) -> bool {
        let n = self.newest_of(&self.miners[i].worker);
        !self.superseded(i, n) && !self.overtaken(i, n)
    }

    /// Take miner `i` out of the ramp without waking or raising it (see
    /// [`Fleet::may_grow`]): a wake waiting is parked again, a raise
    /// forgotten; the next plan decides afresh.
    pub fn unqueue(&mut self, i: usize, clock: Clock) {
        self.miners[i].queued_to = None;
        if self.miners[i].state == MinerState::Resuming {
            self.set_state(i, MinerState::Parked, clock);
        }
    }

    /// A raise's turn in the ramp came: ask for it.
    pub fn raise(&mut self, i: usize, cause: &Cause, out: &mut Out) {
        let Some(to) = self.miners[i].queued_to.take() else { return };
        let s = to.map_or(Setting::Full, |w| Setting::Target(w * self.factor));
        self.set_target(i, s, cause, out);
    }

    /// Whether miner `i` waits in the ramp for a raise (not a resume).
    pub fn raising(&self, i: usize) -> bool {
        self.miners[i].state == MinerState::Mining && self.miners[i].queued_to.is_some()
    }

    /// Parked miners, most efficient first (the order to resume them in).
    pub fn parked_by_efficiency(&self) -> Vec<usize> {
        let all = self.newest_all();
        let mut parked: Vec<usize> = (0..self.miners.len())
            .filter(|&i| self.miners[i].state == MinerState::Parked && !self.superseded(i, self.newest_in(&all, i)))
            .collect();
        parked.sort_by(|&a, &b| self.miners[a].est.j_per_th.total_cmp(&self.miners[b].est.j_per_th));
        parked
    }

    /// A hook run ended: a read-back is kept; a failed park falls back to
    /// the network, so the miner's revenue stops at least.
    pub fn on_hook(&mut self, d: HookDone, out: &mut Out) {
        let Some(i) = self.index_of(d.miner) else { return };
        let now = out.clock.at;
        if d.action == HookAction::Read {
            // A firmware meter's read: the figure, whatever the state now.
            match d.result {
                Ok(Some(r)) => {
                    (self.miners[i].fw, self.miners[i].fw_at) = (Some(r), Some(now));
                    self.learn(i, r);
                }
                Ok(None) => {}
                Err(e) => debug!(miner = %self.miners[i].id, "firmware read-back failed: {e}"),
            }
            return;
        }
        if let Some(p) = d.probe {
            self.probed(i, p);
        }
        // A target lands whatever happened since (the firmware has it),
        // unless a newer one has been asked since; a wake at a target that
        // will be tried again is still asking. A refusal counts whenever it
        // comes: that firmware is planned as park-only from then on.
        if let Some(w) = d.target.filter(|_| d.result.is_ok() || d.retry_in.is_none()) {
            let m = &self.miners[i];
            if m.asking.is_some_and(|to| w == self.asked_watts(i, to)) {
                self.target_done(i, &d, out);
            } else if let Err(e) = &d.result {
                self.miners[i].refused = Some(e.clone());
            }
        }
        if self.miners[i].generation != d.generation || d.action == HookAction::Target {
            return;
        }
        let method = self.method(i);
        match d.result {
            Ok(reading) => {
                // A reading taken while mining is what the miner draws; one
                // taken asleep is what it draws parked.
                match (d.action, reading) {
                    (HookAction::Resume, Some(r)) => (self.miners[i].fw, self.miners[i].fw_at) = (Some(r), Some(now)),
                    (HookAction::Park, Some(r)) => self.miners[i].fw_idle = Some(r.watts),
                    _ => {}
                }
                if d.action == HookAction::Resume {
                    self.net_resume(i, out);
                }
                if method != Method::Network {
                    out.emit(self.hook_ok(i, &d, reading));
                }
            }
            Err(e) => {
                let m = &self.miners[i];
                warn!(miner = %m.id, worker = %m.worker, address = %m.addr.ip(), action = ?d.action, "curtailment hook failed: {e}");
                out.emit(Event::HookFailed {
                    who: self.who(i),
                    hook: method,
                    action: d.action,
                    error: e,
                    retry_in_s: d.retry_in.map(|r| r.as_secs_f64()),
                    cause: d.cause.clone(),
                });
                if d.action == HookAction::Park && !self.miners[i].net_parked {
                    self.net_park(i, out);
                }
                // Woken at a target its firmware turned down (or never
                // answered): it is asleep, and parked again, planned from
                // now on as one that can only be parked.
                // (Only while it still waits for its wake: a wake answered
                // before has given it its job, and it is awake at the
                // target that one set.)
                if d.action == HookAction::Resume
                    && d.target.is_some()
                    && d.retry_in.is_none()
                    && self.miners[i].net_parked
                {
                    self.set_state(i, MinerState::Parked, out.clock);
                    out.emit(Event::MinerParked {
                        who: self.who(i),
                        watts: self.miners[i].est.watts,
                        hook: method,
                        cause: d.cause,
                    });
                } else if d.action == HookAction::Resume && d.retry_in.is_none() {
                    // A firmware that cannot be woken: its job back anyway
                    // (counted as drawing, as it may be), so it is not stuck.
                    self.net_resume(i, out);
                }
            }
        }
    }

    /// What a firmware said before its first target: its envelope, and its
    /// own target (kept to restore, unless the firmware already had one of
    /// sluice's from before a restart).
    fn probed(&mut self, i: usize, p: Probe) {
        self.miners[i].probed = Some(p);
        self.miners[i].curve = self.curve_of(i);
        let m = &mut self.miners[i];
        if !m.restored && m.original.is_none() {
            m.original = p.target;
            self.targets_changed += 1;
        }
        debug!(miner = %m.id, worker = %m.worker, min = ?p.min, max = ?p.max, own = ?p.target, "firmware power envelope");
    }

    /// Power-target miners to read back for the curves: each once it has
    /// run steady (`settle_s`) at a new target or at full after a wake,
    /// and every [`LEARN_EVERY`] while it stays there.
    pub fn learning_reads(&mut self) -> Vec<usize> {
        let now = self.now;
        let mut ask = Vec::new();
        for i in 0..self.miners.len() {
            let Some(since) = self.steady_since(i) else { continue };
            let m = &mut self.miners[i];
            let due = m.learn_asked.is_none_or(|a| a < since || now.saturating_duration_since(a) >= LEARN_EVERY);
            if now >= since && due {
                m.learn_asked = Some(now);
                ask.push(i);
            }
        }
        ask
    }

    /// When miner `i`'s read-backs say what it keeps at its setting: a
    /// power-target miner of a known model, mining at a setting landed, from
    /// `settle_s` after it last woke or took its target (none: not one to
    /// learn from now).
    fn steady_since(&self, i: usize) -> Option<Instant> {
        let m = &self.miners[i];
        let still = m.state == MinerState::Mining && m.asking.is_none() && m.queued_to.is_none() && !m.net_parked;
        let model = m.rule.and_then(|r| self.power.model_of(r)).filter(|_| self.learn_curves);
        (m.curve.is_some() && m.link.is_some() && still && model.is_some())
            .then(|| m.changed_at.max(m.target_at) + self.groups[m.group].spec.settle)
    }

    /// A read-back of miner `i`: at full, what its later ones are a
    /// fraction of; at a target, a sample of its model's curve. Taken only
    /// steady ([`Fleet::steady_since`]); [`learn`] says what else it must
    /// pass.
    fn learn(&mut self, i: usize, r: FirmwareReading) {
        if self.steady_since(i).is_none_or(|t| self.now < t) {
            return;
        }
        let m = &self.miners[i];
        let rule = m.rule.expect("steady: a model");
        let (full_w, hs) = (self.nameplate(i).0, r.hashrate_hs.0);
        let nameplate_hs = self.power.th_s_of(rule).map(|t| t * 1e12);
        // Within half and one and a half of its model's, or not taken.
        let plausible = |x: f64| nameplate_hs.is_none_or(|n| x > 0.5 * n && x < 1.5 * n);
        let Some(t) = m.target else {
            if plausible(hs) {
                self.miners[i].full_hs = Some(hs);
            }
            return;
        };
        let Some(reference) = m.full_hs.or(nameplate_hs).filter(|_| full_w > 0.0) else { return };
        let s = Sample { target: t.0 / full_w, watts: r.watts.0 / full_w, hashrate: hs / reference };
        let model = self.power.model_of(rule).expect("steady: a model").to_owned();
        let prior = self.power.curve_of(Some(rule));
        match self.learning.observe(&model, &prior, s) {
            Ok(false) => {}
            Ok(true) => {
                // Every miner of the model plans on the curve from now on.
                for j in 0..self.miners.len() {
                    if self.miners[j].rule.and_then(|r| self.power.model_of(r)) == Some(model.as_str()) {
                        self.miners[j].curve = self.curve_of(j);
                    }
                }
                let c = self.learning.curve(&model, &prior).expect("just learnt");
                debug!(model, points = ?c.points(), "curve learnt from read-backs");
            }
            Err(e) => debug!(miner = %m.id, worker = %m.worker, ?s, "read-back not learnt from: {e}"),
        }
    }

    /// The curves learnt so far, for status.
    pub fn curves(&self) -> Vec<crate::api::CurveStatus> {
        self.learning.status()
    }

    /// A power target read back, or refused (the miner is then planned as
    /// one that can only be parked, and the event says why).
    fn target_done(&mut self, i: usize, d: &HookDone, out: &mut Out) {
        let to = self.miners[i].asking.take().flatten();
        let from = self.miners[i].wake_from.take();
        // Read back at or under the target (a raise still climbing), or
        // refused: the meter lags either.
        self.last_change = out.clock.at;
        let method = self.method(i);
        match &d.result {
            Ok(reading) => {
                let m = &mut self.miners[i];
                (m.target, m.target_at) = (to, out.clock.at);
                self.targets_changed += 1;
                if let Some(r) = reading {
                    (m.fw, m.fw_at) = (Some(*r), Some(out.clock.at));
                }
                if d.action == HookAction::Target {
                    out.emit(self.hook_ok(i, d, *reading));
                }
            }
            Err(e) => {
                let under = d.probe.and_then(|p| p.min).zip(d.target).is_some_and(|(min, w)| w.0 < min.0);
                self.targets_changed += 1;
                // Where it is now is not known: counted at the higher.
                let m = &mut self.miners[i];
                m.target = match (from.unwrap_or(m.target), to) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                // Under the envelope it said: planned above it from now on.
                if under {
                    return;
                }
                m.refused = Some(e.clone());
                warn!(miner = %m.id, worker = %m.worker, "power target refused, parked instead when a budget needs it: {e}");
                if d.action == HookAction::Target {
                    out.emit(Event::HookFailed {
                        who: self.who(i),
                        hook: method,
                        action: d.action,
                        error: format!("{e}; planned as a miner that can only be parked from now on"),
                        retry_in_s: None,
                        cause: d.cause.clone(),
                    });
                }
            }
        }
    }

    /// `set_protection`: the rules changed as [`set_rule`] says, applied to
    /// every miner. How many miners the pattern matches now, and those that
    /// are parked and now protected (to resume); an error (nothing changed)
    /// for a `curtailable` that names no rule and covers nothing protected.
    pub fn set_protection(&mut self, pattern: String, protected: bool) -> Result<(usize, Vec<usize>), String> {
        let matcher = WildMatch::new(&pattern);
        let covers_now = self.miners.iter().any(|m| m.protected && matcher.matches(&m.worker));
        let rules = set_rule(&self.protection(), &pattern, protected, covers_now)?;
        self.restore_protection(rules);
        let (mut matched, mut back) = (0, Vec::new());
        for i in 0..self.miners.len() {
            let now = self.is_protected(&self.miners[i].worker);
            let m = &mut self.miners[i];
            matched += usize::from(matcher.matches(&m.worker));
            if now && !m.protected && m.state == MinerState::Parked {
                back.push(i);
            }
            m.protected = now;
        }
        Ok((matched, back))
    }

    /// The protection rules, oldest first: (pattern, protected).
    pub fn protection(&self) -> Vec<(String, bool)> {
        self.protect_rules.iter().map(|r| (r.pattern.clone(), r.protected)).collect()
    }

    /// Rules from the state file (before any miner connects).
    pub fn restore_protection(&mut self, rules: impl IntoIterator<Item = (String, bool)>) {
        self.protect_rules = rules
            .into_iter()
            .map(|(pattern, protected)| ProtectRule { matcher: WildMatch::new(&pattern), pattern, protected })
            .collect();
    }

    /// The miner at `i` is never parked.
    pub fn protected_at(&self, i: usize) -> bool {
        self.miners[i].protected
    }

    /// Cluster mode: the site's rules replace these, and every miner is
    /// protected or not by them (the last match wins).
    pub fn replace_protection(&mut self, rules: Vec<(String, bool)>) {
        self.restore_protection(rules);
        for i in 0..self.miners.len() {
            let p = self.is_protected(&self.miners[i].worker);
            self.miners[i].protected = p;
        }
    }

    /// A budget's scope must name something: a group of the config, and
    /// (for a group or a worker pattern) at least one miner. The site is
    /// always a scope, even with no miner connected yet.
    pub fn check_scope(&self, scope: &Scope) -> Result<(), String> {
        if let Scope::Group(g) = scope {
            if !self.groups.iter().any(|x| x.name == *g) {
                let names: Vec<&str> = self.groups.iter().map(|x| x.name.as_str()).collect();
                return Err(format!("unknown group {g:?} (the groups are: {})", names.join(", ")));
            }
        }
        if *scope != Scope::Site && !(0..self.miners.len()).any(|i| self.in_scope(scope, i)) {
            return Err(format!("scope {} matches no miner: nothing could be parked", scope.name()));
        }
        Ok(())
    }

    /// Forget parked miners that have been away for a day.
    pub fn prune(&mut self, now: Instant) {
        for i in (0..self.miners.len()).rev() {
            if self.miners[i].disconnected_at.is_some_and(|t| now.saturating_duration_since(t) > FORGET_AWAY) {
                self.remove(i);
            }
        }
    }

    /// A firmware meter's figure: the sum of the mining miners' read-backs
    /// if every one has one younger than `fresh_for`, else an error that
    /// says how many lack one; and the mining miners of firmware groups,
    /// to ask for the next.
    pub fn firmware_reading(&self, now: Instant, fresh_for: Duration) -> (Result<Watts, String>, Vec<usize>) {
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
        let ask = mining.into_iter().filter(|&i| self.method(i).is_firmware()).collect();
        (reading, ask)
    }

    /// Per group (config order, default last): mining and parked counts,
    /// watts drawn, and hashrate.
    pub fn group_figures(&self) -> Vec<GroupFigures> {
        let mut out: Vec<GroupFigures> =
            self.groups.iter().map(|g| GroupFigures { name: g.name.clone(), ..GroupFigures::default() }).collect();
        for m in &self.miners {
            let g = &mut out[m.group];
            if m.state == MinerState::Parked {
                g.parked += 1;
                g.parked_watts += m.est.idle;
            } else {
                g.mining += 1;
                g.watts += m.est.watts;
                g.hashrate_hs += m.hashrate();
            }
        }
        out
    }

    /// Watts of an amount over every known miner, as last estimated.
    pub fn amount_watts_now(&self, amount: Amount) -> Watts {
        match amount {
            Amount::Watts(w) => Watts(w),
            Amount::Fraction(f) => self.miners.iter().map(|m| m.est.watts).sum::<Watts>() * f,
        }
    }

    /// Status figures for the site and each group, from fresh estimates.
    pub fn figures(&mut self, factor: f64) -> (Figures, BTreeMap<String, Figures>) {
        let (idx, views) = self.views(None, factor);
        let (mut site, mut groups) = (Figures::default(), BTreeMap::<String, Figures>::new());
        for (&k, v) in idx.iter().zip(&views) {
            let m = &self.miners[k];
            let mining = v.state == MinerState::Mining;
            for f in [&mut site, groups.entry(self.groups[m.group].name.clone()).or_default()] {
                f.connected += u64::from(m.link.is_some());
                // Every miner at full power (a lowered one too).
                f.fleet_watts += m.est.watts;
                if mining {
                    f.mining += 1;
                    f.watts += v.watts;
                    f.hashrate_hs += m.hashrate();
                } else if v.state == MinerState::Parked {
                    f.parked += 1;
                    f.parked_watts += v.idle;
                } else {
                    f.parked += 1;
                }
            }
        }
        (site, groups)
    }

    /// A row per known miner.
    pub fn rows(&self) -> Vec<MinerRow> {
        (0..self.miners.len())
            .map(|i| {
                let m = &self.miners[i];
                MinerRow {
                    who: self.who(i),
                    group: self.groups[m.group].name.clone(),
                    state: m.state,
                    since_ms: m.changed_ms,
                    connected: m.link.is_some(),
                    model: m.rule.and_then(|r| self.power.model_of(r)).map(str::to_owned),
                    protected: m.protected,
                    watts: m.est.watts,
                    watts_source: m.est.watts_source,
                    j_per_th: m.est.j_per_th,
                    efficiency_source: m.est.efficiency_source,
                    idle_watts: m.est.idle,
                    idle_source: m.est.idle_source,
                    hook: self.method(i),
                    target_w: m.target,
                    firmware_w: m.fw.map(|r| r.watts),
                    target_refused: m.refused.clone(),
                    envelope_w: m.probed.map(|p| [p.min, p.max]),
                    original_w: m.original,
                }
            })
            .collect()
    }

    /// Watts drawn (by the miners mining, not resuming, and the parked
    /// ones' idle draw), and mining and not-mining counts, in a scope.
    pub fn achieved(&mut self, scope: Option<&Scope>, factor: f64) -> (Watts, usize, usize) {
        let (_, views) = self.views(scope, factor);
        let idle: Watts = views.iter().filter(|v| v.in_scope && v.state == MinerState::Parked).map(|v| v.idle).sum();
        let mining = views.iter().filter(|v| v.in_scope && v.state == MinerState::Mining);
        let (w, m) = mining.fold((idle, 0), |(w, n), v| (w + v.watts, n + 1));
        let p = views.iter().filter(|v| v.in_scope && v.state != MinerState::Mining).count();
        (w, m, p)
    }

    /// Watts of a budget amount over the miners in `scope`, fresh.
    pub fn budget_watts(&mut self, amount: Amount, scope: &Scope, factor: f64) -> Watts {
        amount_watts(amount, &self.views(Some(scope), factor).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::curtail::fixtures::cfg;
    use crate::curtail::policy;
    use crate::curtail::power::PowerRule;
    use crate::curtail::GroupConfig;

    fn member(session: u64, worker: &str, addr: &str) -> Arc<Member> {
        let info = crate::stats::WorkerInfo::new(session, addr.parse().unwrap());
        info.worker.set(worker.into()).unwrap();
        Arc::new(Member { info, signal: Default::default() })
    }

    fn clock(t0: Instant, secs: u64) -> Clock {
        Clock { at: t0 + Duration::from_secs(secs), unix_ms: 1_000_000 + secs * 1000 }
    }

    /// Admission under a budget: who gets work as miners connect one by
    /// one (1,000 W each), and which are parked at once.
    #[test]
    fn new_miners_get_work_only_while_they_fit() {
        // (budget, scope, workers connecting in order, parked at admission)
        let rows: &[(Amount, &str, &[&str], &[bool])] = &[
            (Amount::Watts(2500.0), "site", &["a.1", "a.2", "a.3", "c.1"], &[false, false, true, true]),
            (Amount::Watts(0.0), "site", &["a.1"], &[true]),
            // Out of scope: admitted whatever the budget.
            (Amount::Watts(0.0), "workers:c.*", &["a.1", "c.1"], &[false, true]),
            // A fraction is taken of the miners seen so far.
            (Amount::Fraction(0.5), "site", &["a.1", "a.2", "a.3", "a.4"], &[true, false, true, false]),
            // The hooked group's miner is parked too (by its hook).
            (Amount::Watts(1000.0), "site", &["a.1", "x.1"], &[false, true]),
        ];
        let t0 = Instant::now();
        for (amount, scope, workers, want) in rows {
            let mut f = Fleet::new(&cfg(), t0).unwrap();
            let scope = Scope::parse(scope).unwrap();
            let mut out = Out::new(clock(t0, 0));
            let got: Vec<bool> = workers
                .iter()
                .enumerate()
                .map(|(n, w)| match f.register(out.clock, member(n as u64 + 1, w, "127.0.0.1:4000"), 1.0) {
                    Joined::New { index, .. } => f.admit(index, *amount, &scope, &Cause::default(), &mut out),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(got, *want, "{amount:?} over {scope:?}: {workers:?}");
            let hooks = out.take().iter().filter(|e| matches!(e, Effect::Hook(_))).count();
            assert_eq!(hooks, usize::from(workers.contains(&"x.1")), "only the hooked group runs a hook");
        }
    }

    /// A parked miner that leaves is remembered by address and worker, and
    /// the next connection that matches takes its place, parked; a mining
    /// miner that leaves is forgotten.
    #[test]
    fn parked_miners_are_remembered_by_address_and_worker() {
        let t0 = Instant::now();
        let mut f = Fleet::new(&cfg(), t0).unwrap();
        let mut out = Out::new(clock(t0, 0));
        let Joined::New { miner: c1, index } = f.register(out.clock, member(1, "c.1", "192.0.2.7:4000"), 1.0) else {
            panic!()
        };
        let Joined::New { miner: a1, .. } = f.register(out.clock, member(2, "a.1", "192.0.2.8:4000"), 1.0) else {
            panic!()
        };
        f.park(index, &Cause::default(), &mut out);
        assert!(!f.deregister(t0, c1, 99), "another session's end is not this miner's");
        assert!(f.deregister(t0, c1, 1) && f.deregister(t0, a1, 2));
        assert_eq!(f.len(), 1, "the parked one is remembered, the mining one forgotten");
        // (session, worker, address, what registering finds)
        let rows: &[(u64, &str, &str, Option<MinerId>)] = &[
            (3, "c.1", "192.0.2.9:4000", None),     // another address: a new miner
            (4, "c.2", "192.0.2.7:4000", None),     // another worker: a new miner
            (5, "c.1", "192.0.2.7:5000", Some(c1)), // the same (any port): back, parked
            (6, "c.1", "192.0.2.7:5001", None),     // taken already: a new miner
        ];
        for &(session, w, a, want) in rows {
            match (f.register(out.clock, member(session, w, a), 1.0), want) {
                (Joined::Back { miner, parked }, Some(m)) => assert!(miner == m && parked, "{w} {a}"),
                (Joined::New { .. }, None) => {}
                (got, _) => panic!("{w} {a}: {got:?}"),
            }
        }
        // Away a day and a second: forgotten.
        let mut g = Fleet::new(&cfg(), t0).unwrap();
        let Joined::New { miner, index } = g.register(out.clock, member(1, "c.1", "192.0.2.7:4000"), 1.0) else {
            panic!()
        };
        g.park(index, &Cause::default(), &mut out);
        g.deregister(t0, miner, 1);
        g.prune(t0 + FORGET_AWAY);
        assert_eq!(g.len(), 1);
        g.prune(t0 + FORGET_AWAY + Duration::from_secs(1));
        assert!(g.is_empty());
    }

    /// Issue 33: a miner known by J/TH alone, whose shares have shown
    /// next to nothing yet, counted as drawing next to nothing and was
    /// admitted under any budget. Until it has mined HASHRATE_SETTLES it
    /// counts at the default watts; then at J/TH times its hashrate.
    #[test]
    fn a_miner_counts_at_the_default_until_its_hashrate_is_measured() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.power.push(PowerRule { pattern: "j.*".into(), j_per_th: Some(25.0), watts: None, model: None });
        let mut f = Fleet::new(&c, t0).unwrap();
        let m = member(1, "j.1", "192.0.2.7:4000");
        m.info.hashrate.set(2e12);
        f.register(clock(t0, 0), m, 1.0);
        // (seconds since it started mining, watts counted)
        for (secs, want) in [(0, 3250.0), (30, 3250.0), (59, 3250.0), (60, 50.0), (600, 50.0)] {
            f.at(t0 + Duration::from_secs(secs));
            let (_, views) = f.views(None, 1.0);
            assert_eq!(views[0].watts, Watts(want), "after {secs} s");
        }
        // Parked and back: measured afresh from its resume.
        let mut out = Out::new(clock(t0, 600));
        f.park(0, &Cause::default(), &mut out);
        f.resume(0, &Cause::default(), &mut Out::new(clock(t0, 700)));
        f.at(t0 + Duration::from_secs(710));
        assert_eq!(f.views(None, 1.0).1[0].watts, Watts(3250.0));
    }

    /// Issue 33: on a loaded machine a parked miner's reconnect can register
    /// before its old session has noticed the close. One machine, two rows:
    /// meanwhile the older counts in no budget (a fraction is never taken of
    /// it twice), and when its close comes it is forgotten, not remembered
    /// as away. Beyond RECONNECT_RACE, a second connection is another
    /// machine (one address, one worker name, behind NAT). The reconnect
    /// may come from another address (a new lease; sim-check seed 28):
    /// the same machine still.
    #[test]
    fn a_reconnect_that_beats_its_old_session_s_close_is_one_machine() {
        let t0 = Instant::now();
        // (seconds since the new connection, old one in scope
        // meanwhile, old one remembered after its close)
        let cases = [(1, false, false), (9, false, false), (10, true, true), (60, true, true)];
        for (new_addr, (gap, in_scope, remembered)) in
            ["192.0.2.7:4001", "192.0.2.99:4001"].into_iter().flat_map(|a| cases.map(|c| (a, c)))
        {
            let mut f = Fleet::new(&cfg(), t0).unwrap();
            let mut out = Out::new(clock(t0, 0));
            let (old, index) = joins(&mut f, out.clock, 1, "c.1", "192.0.2.7:4000");
            f.park(index, &Cause::default(), &mut out);
            // The old session still looks live: a new miner.
            joins(&mut f, clock(t0, 1), 2, "c.1", new_addr);
            f.at(t0 + Duration::from_secs(1 + gap));
            let (_, views) = f.views(None, 1.0);
            let i = f.index_of(old).unwrap();
            assert_eq!(views[i].in_scope, in_scope, "{new_addr} after {gap} s: in scope");
            assert!(f.deregister(t0 + Duration::from_secs(1 + gap), old, 1));
            assert_eq!(f.index_of(old).is_some(), remembered, "{new_addr} after {gap} s: remembered");
        }
    }

    /// Issue 33 (sim-check seeds 10, 1165): a mining miner's reconnect can
    /// register before its close is heard. Both connections may draw, so
    /// both count in what is drawn; the fleet a fraction is taken of counts
    /// the machine once until RECONNECT_RACE has passed (then it is two
    /// machines under one name).
    #[test]
    fn a_mining_miner_s_early_reconnect_is_one_machine_in_the_fleet() {
        let t0 = Instant::now();
        // (seconds after the reconnect, fleet counted)
        for (after, fleet) in [(0, 1000.0), (9, 1000.0), (10, 2000.0)] {
            let mut f = Fleet::new(&cfg(), t0).unwrap();
            joins(&mut f, clock(t0, 0), 1, "c.1", "192.0.2.7:4000");
            joins(&mut f, clock(t0, 5), 2, "c.1", "192.0.2.99:4000");
            f.at(t0 + Duration::from_secs(5 + after));
            let (_, views) = f.views(None, 1.0);
            assert_eq!(policy::total_watts(&views), Watts(fleet), "{after} s after: the fleet");
            assert_eq!(policy::drawn_watts(&views), Watts(2000.0), "{after} s after: drawn");
        }
    }

    /// A parked miner away whose worker name connects again from another
    /// address (a new DHCP lease) is most likely the same machine: it
    /// counts in no budget while that connection lives.
    #[test]
    fn a_parked_miner_back_from_another_address_is_not_counted_twice() {
        let t0 = Instant::now();
        let mut f = Fleet::new(&cfg(), t0).unwrap();
        let mut out = Out::new(clock(t0, 0));
        let (miner, index) = joins(&mut f, out.clock, 1, "c.1", "192.0.2.7:4000");
        f.register(out.clock, member(2, "a.1", "192.0.2.8:4000"), 1.0);
        f.park(index, &Cause::default(), &mut out);
        f.deregister(t0 + Duration::from_secs(1), miner, 1);
        f.at(t0 + Duration::from_secs(2));
        assert_eq!(policy::total_watts(&f.views(None, 1.0).1), Watts(2000.0), "away and parked: still the fleet's");
        f.register(clock(t0, 3), member(3, "c.1", "192.0.2.99:4000"), 1.0);
        f.at(t0 + Duration::from_secs(4));
        assert_eq!(policy::total_watts(&f.views(None, 1.0).1), Watts(2000.0), "c.1 counted once, not twice");
        assert_eq!(f.len(), 3, "still remembered: back at its old address it is parked again");
    }

    /// Issue 33 (sim-check seed 1185): a parked miner away whose machine
    /// came back from another address is that machine's old row. Nothing
    /// wakes or raises its firmware through the old row: not resume_all,
    /// nor a wake the ramp queued before the machine came back.
    #[test]
    fn a_miner_back_elsewhere_is_not_woken_through_its_old_row() {
        let t0 = Instant::now();
        // c.1 parked, then away: its id.
        let away = |f: &mut Fleet| {
            let mut out = Out::new(clock(t0, 0));
            let (old, i) = joins(f, out.clock, 1, "c.1", "192.0.2.7:4000");
            f.park(i, &Cause::default(), &mut out);
            f.deregister(t0 + Duration::from_secs(1), old, 1);
            old
        };
        let back = |f: &mut Fleet| joins(f, clock(t0, 3), 2, "c.1", "192.0.2.99:4000");
        let mut f = Fleet::new(&cfg(), t0).unwrap();
        let old = away(&mut f);
        assert_eq!(f.parked_by_efficiency(), vec![f.index_of(old).unwrap()], "away, not back: resume_all wakes it");
        back(&mut f);
        assert!(f.parked_by_efficiency().is_empty(), "back elsewhere: not through its old row");
        // Queued in the ramp before its machine came back.
        let mut f = Fleet::new(&cfg(), t0).unwrap();
        let old = away(&mut f);
        let (id, generation) = f.mark_raising(f.index_of(old).unwrap(), Setting::Full, clock(t0, 2)).unwrap();
        assert!(f.waiting(id, generation).is_some(), "queued in the ramp");
        back(&mut f);
        let i = f.index_of(old).unwrap();
        assert_eq!(f.waiting(id, generation), Some(Watts::ZERO), "its turn comes at once");
        assert!(!f.may_grow(i), "and is not a wake");
        f.unqueue(i, clock(t0, 4));
        assert_eq!(f.rows()[i].state, MinerState::Parked, "parked again, for the next plan");
    }

    /// Issue 33 (sim-check seed 2141): the old row of a reconnect not yet
    /// heard to end neither wakes nor raises the machine (the new row may
    /// be lowering it); once RECONNECT_RACE has passed, two machines.
    #[test]
    fn a_row_overtaken_by_its_reconnect_does_not_grow() {
        let t0 = Instant::now();
        for (after, grows) in [(0, false), (9, false), (10, true)] {
            let mut f = Fleet::new(&cfg(), t0).unwrap();
            let (old, _) = joins(&mut f, clock(t0, 0), 1, "c.1", "192.0.2.7:4000");
            joins(&mut f, clock(t0, 5), 2, "c.1", "192.0.2.7:4001");
            f.at(t0 + Duration::from_secs(5 + after));
            let (i, new) = (f.index_of(old).unwrap(), f.len() - 1);
            assert_eq!(f.may_grow(i), grows, "{after} s after: the old row");
            assert!(f.may_grow(new), "{after} s after: the new row");
        }
    }

    /// Issue 33 (sim-check seed 65): a lowered miner parked and woken at
    /// the target it keeps is told that target with its wake, never woken
    /// at whatever its firmware holds. (Without one, a plain wake.)
    #[test]
    fn a_lowered_miner_is_woken_at_the_target_it_is_counted_at() {
        let t0 = Instant::now();
        // (target before it was parked, the wake's target)
        for (kept, asked) in [(Some(2000.0), Some(2000.0)), (None, None)] {
            let mut f = power_target_fleet(t0);
            let mut out = Out::new(clock(t0, 0));
            let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
            if let Some(w) = kept {
                f.set_target(i, Setting::Target(Watts(w)), &Cause::default(), &mut out);
                let ask = hook_jobs(&mut out).pop().expect("a target");
                f.on_hook(answer(&ask, Ok(None)), &mut out);
            }
            f.park(i, &Cause::default(), &mut out);
            out.take();
            f.mark_resuming(i, out.clock);
            f.resume(i, &Cause::default(), &mut out);
            let wake = hook_jobs(&mut out).pop().expect("a wake");
            assert_eq!(wake.action, HookAction::Resume);
            assert_eq!(wake.target.map(|w| w.0), asked, "kept {kept:?}");
            assert_eq!(f.rows()[0].target_w.map(|w| w.0), kept, "counted where it was");
        }
    }

    /// Issue 33 (sim-check seed 2121): a machine's reconnect registered
    /// before its old session's end was heard is a new row at full power;
    /// the state file keeps one target per machine, the newest row's, not
    /// the old row's lower one (restored, it would count the machine at a
    /// target it no longer has).
    #[test]
    fn the_state_file_keeps_a_machine_s_newest_target() {
        let t0 = Instant::now();
        let mut f = power_target_fleet(t0);
        let mut out = Out::new(clock(t0, 0));
        let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
        f.set_target(i, Setting::Target(Watts(1750.0)), &Cause::default(), &mut out);
        let ask = hook_jobs(&mut out).pop().expect("a target");
        f.on_hook(answer(&ask, Ok(None)), &mut out);
        assert_eq!(f.targets_set().iter().map(|t| t.watts.0).collect::<Vec<_>>(), [1750.0]);
        joins(&mut f, clock(t0, 5), 2, "t.1", "192.0.2.7:4001");
        assert!(f.targets_set().is_empty(), "its newest row is at full power: {:?}", f.targets_set());
    }

    /// Issue 33 (sim-check seed 105): a wake of a power-target miner away
    /// still being tried (its firmware did not answer) stops once the
    /// machine is back as another row (from another address): that row
    /// alone drives its firmware.
    #[test]
    fn a_machine_back_silences_its_old_row_s_hooks() {
        let t0 = Instant::now();
        // (where it comes back from, its old row's wake still tried)
        for (new_addr, tried_on) in [("192.0.2.7:4001", true), ("192.0.2.99:4000", false)] {
            let mut f = power_target_fleet(t0);
            let mut out = Out::new(clock(t0, 0));
            let (old, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
            f.park(i, &Cause::default(), &mut out);
            f.deregister(t0 + Duration::from_secs(1), old, 1);
            out.take();
            let i = f.index_of(old).unwrap();
            f.mark_resuming(i, out.clock);
            f.resume(i, &Cause::default(), &mut out);
            let wake = hook_jobs(&mut out).pop().expect("a wake, of the miner away");
            let tried = || wake.latest.load(Ordering::Acquire) == wake.number;
            assert!(tried(), "tried again while nothing newer was asked");
            // From its address it takes its old row again: that row is it.
            f.register(clock(t0, 3), member(2, "t.1", new_addr), 1.0);
            assert_eq!(tried(), tried_on, "back from {new_addr}");
        }
    }

    /// Issue 33 (sim-check seed 2037): a miner queued to wake and parked
    /// before its turn leaves the ramp, and the trade may wake it again:
    /// it is not left busy for good (a site held at half its budget).
    #[test]
    fn a_wake_cancelled_by_a_park_leaves_the_miner_free_for_the_trade() {
        let t0 = Instant::now();
        let mut f = power_target_fleet(t0);
        let mut out = Out::new(clock(t0, 0));
        let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
        f.park(i, &Cause::default(), &mut out);
        let (id, generation) = f.mark_raising(i, Setting::Full, clock(t0, 1)).unwrap();
        assert!(f.now_of(i, t0, Duration::ZERO).busy, "waiting in the ramp");
        f.park(i, &Cause::default(), &mut Out::new(clock(t0, 2)));
        assert_eq!(f.waiting(id, generation), None, "out of the ramp");
        assert!(!f.now_of(i, t0 + Duration::from_secs(2), Duration::ZERO).busy, "free for the next trade");
    }

    /// A pause of a connected miner still being tried stops once a newer
    /// connection under its name registers from its address before its
    /// close is heard (that connection is the machine now); one from
    /// another address (another machine, or a NAT) leaves it be.
    #[test]
    fn an_early_reconnect_silences_the_old_row_s_pause() {
        let t0 = Instant::now();
        for (new_addr, tried_on) in [("192.0.2.7:4001", false), ("192.0.2.99:4000", true)] {
            let mut f = power_target_fleet(t0);
            let mut out = Out::new(clock(t0, 0));
            let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
            f.park(i, &Cause::default(), &mut out);
            let pause = hook_jobs(&mut out).pop().expect("a pause");
            let tried = || pause.latest.load(Ordering::Acquire) == pause.number;
            joins(&mut f, clock(t0, 1), 2, "t.1", new_addr);
            assert_eq!(tried(), tried_on, "a new connection from {new_addr}");
        }
    }

    /// Register a connection that must be a new miner: its id and index.
    fn joins(f: &mut Fleet, at: Clock, session: u64, worker: &str, addr: &str) -> (MinerId, usize) {
        match f.register(at, member(session, worker, addr), 1.0) {
            Joined::New { miner, index } => (miner, index),
            other => panic!("{worker} from {addr}: {other:?}"),
        }
    }

    /// One S19k Pro ("t.1") in a Braiins OS power-target group.
    fn power_target_fleet(t0: Instant) -> Fleet {
        let mut c = cfg();
        c.power = vec![PowerRule { pattern: "t.*".into(), model: Some("S19k Pro".into()), ..Default::default() }];
        c.group = vec![GroupConfig {
            name: "pt".into(),
            pattern: "t.*".into(),
            method: Method::PowerTarget,
            firmware: "braiins".into(),
            ..GroupConfig::default()
        }];
        Fleet::new(&c, t0).unwrap()
    }

    fn hook_jobs(out: &mut Out) -> Vec<HookJob> {
        out.take()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Hook(j) => Some(j),
                _ => None,
            })
            .collect()
    }

    fn answer(j: &HookJob, result: Result<Option<FirmwareReading>, String>) -> HookDone {
        HookDone {
            miner: j.miner,
            cause: Cause::default(),
            generation: j.generation,
            action: j.action,
            target: j.target,
            result,
            retry_in: None,
            probe: None,
        }
    }

    /// Issue 33 (found by sim-check, seed 68): a miner woken at one target
    /// and, while it woke, asked another, got its job when the first wake
    /// was answered; the second, refused later, marked it parked again. It
    /// kept its job, uncounted: a parked row drawing 2.76 kW under a 105 W
    /// budget. A wake refused after an earlier one was answered leaves it
    /// mining (the refusal only makes it a miner that can only be parked).
    #[test]
    fn a_refused_second_wake_does_not_park_a_miner_already_awake() {
        let t0 = Instant::now();
        let mut f = power_target_fleet(t0);
        let mut out = Out::new(clock(t0, 0));
        let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
        f.park(i, &Cause::default(), &mut out);
        out.take();
        f.mark_raising(i, Setting::Target(Watts(2000.0)), out.clock);
        f.resume(i, &Cause::default(), &mut out);
        let first = hook_jobs(&mut out).pop().expect("a wake at 2,000 W");
        f.set_target(i, Setting::Target(Watts(1500.0)), &Cause::default(), &mut out);
        let second = hook_jobs(&mut out).pop().expect("a wake at 1,500 W, asked while waking");
        assert_eq!((first.action, second.action), (HookAction::Resume, HookAction::Resume));
        let reading = FirmwareReading { watts: Watts(2000.0), hashrate_hs: HashesPerSec(9e13) };
        f.on_hook(answer(&first, Ok(Some(reading))), &mut out);
        assert!(out.take().iter().any(|e| matches!(e, Effect::Signal(_, SessionCmd::Resume))), "its job, at 2,000 W");
        f.on_hook(answer(&second, Err("refused".into())), &mut out);
        assert_eq!(f.rows()[0].state, MinerState::Mining, "awake with its job: still counted as mining");
        assert!(f.rows()[0].target_refused.is_some(), "planned from now on as one that can only be parked");
    }

    /// A crash between asking a target and its answer: the firmware may
    /// have it already. The state file keeps the higher of the two, so a
    /// restart never counts a miner under what it may draw (sim-check).
    #[test]
    fn the_state_file_keeps_the_higher_of_a_target_and_one_in_flight() {
        let t0 = Instant::now();
        let mut f = power_target_fleet(t0);
        let mut out = Out::new(clock(t0, 0));
        let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
        f.set_target(i, Setting::Target(Watts(1500.0)), &Cause::default(), &mut out);
        let low = hook_jobs(&mut out).pop().unwrap();
        f.on_hook(answer(&low, Ok(None)), &mut out);
        assert_eq!(f.targets_set()[0].watts, Watts(1500.0));
        let before = f.targets_changed;
        f.set_target(i, Setting::Target(Watts(2400.0)), &Cause::default(), &mut out);
        assert!(f.targets_changed > before, "written again at the ask");
        assert_eq!(f.targets_set()[0].watts, Watts(2400.0), "the raise in flight is what a restart counts");
    }

    /// A fraction of the fleet is taken of its miners at full power: a
    /// target that lowers one does not shrink the budget it was set under
    /// (sim-check seed 35: a fraction budget and one lowered miner, raised
    /// and lowered again every tick).
    #[test]
    fn a_lowered_miner_counts_at_full_in_the_fleet_a_fraction_is_taken_of() {
        let t0 = Instant::now();
        let mut f = power_target_fleet(t0);
        let mut out = Out::new(clock(t0, 0));
        let (_, i) = joins(&mut f, out.clock, 1, "t.1", "192.0.2.7:4000");
        let before = f.views(None, 1.0).1;
        f.set_target(i, Setting::Target(Watts(1500.0)), &Cause::default(), &mut out);
        let low = hook_jobs(&mut out).pop().unwrap();
        f.on_hook(answer(&low, Ok(None)), &mut out);
        let after = f.views(None, 1.0).1;
        assert_eq!(after[0].watts, Watts(1500.0), "drawn at its target");
        assert!(before[0].watts > Watts(1500.0));
        assert_eq!(policy::total_watts(&after), policy::total_watts(&before), "{after:?}");
    }

    /// `set_rule` as a table: what each request leaves in the rules.
    #[test]
    fn protection_rules_change_as_asked_and_stay_clean() {
        let r = |v: &[(&str, bool)]| v.iter().map(|(p, b)| (p.to_string(), *b)).collect::<Vec<_>>();
        for (before, pattern, protected, covers_now, after) in [
            // protect: the pattern's rule, last.
            (r(&[]), "a.*", true, false, Some(r(&[("a.*", true)]))),
            (r(&[("a.*", true), ("b.*", true)]), "a.*", true, false, Some(r(&[("b.*", true), ("a.*", true)]))),
            // unprotect of a rule: it goes; no clutter left behind.
            (r(&[("a.*", true)]), "a.*", false, true, Some(r(&[]))),
            // ... beside a broader rule: an exception keeps it curtailable.
            (r(&[("*", true), ("a.*", true)]), "a.*", false, true, Some(r(&[("*", true), ("a.*", false)]))),
            // unprotect with no rule, nothing covered: refused.
            (r(&[]), "a.*", false, false, None),
            (r(&[("b.*", true)]), "a.*", false, false, None),
            // ... but an exception to a rule that covers it is taken.
            (r(&[("rack7.*", true)]), "rack7.3", false, false, Some(r(&[("rack7.*", true), ("rack7.3", false)]))),
            (r(&[("rack7.*", true)]), "r*7.3", false, true, Some(r(&[("rack7.*", true), ("r*7.3", false)]))),
            // An exception left with nothing protecting before it goes.
            (r(&[("a.*", true), ("a.1", false)]), "a.*", false, true, Some(r(&[]))),
            (
                r(&[("a.*", true), ("a.1", false), ("b.*", true)]),
                "a.*",
                false,
                true,
                Some(r(&[("b.*", true), ("a.*", false)])),
            ),
        ] {
            let got = set_rule(&before, pattern, protected, covers_now);
            assert_eq!(got.as_ref().ok(), after.as_ref(), "{before:?} {pattern} {protected} {covers_now}: {got:?}");
        }
        let e = set_rule(&r(&[("b.*", true)]), "a.*", false, false).unwrap_err();
        assert!(e.contains("no protection rule for \"a.*\"") && e.contains("\"b.*\" protected"), "{e}");
    }

    #[test]
    fn protection_rules_match_now_and_later_and_the_last_wins() {
        let t0 = Instant::now();
        let mut f = Fleet::new(&cfg(), t0).unwrap();
        let mut out = Out::new(clock(t0, 0));
        let Joined::New { index, .. } = f.register(out.clock, member(1, "c.1", "192.0.2.7:4000"), 1.0) else {
            panic!()
        };
        f.park(index, &Cause::default(), &mut out);
        assert_eq!(f.set_protection("c.*".into(), true), Ok((1, vec![index])), "parked and now protected: to resume");
        assert_eq!(f.set_protection("c.9".into(), false), Ok((0, vec![])), "an exception to c.*");
        assert!(f.set_protection("d.*".into(), false).is_err(), "no rule, nothing it covers: refused");
        f.register(out.clock, member(2, "c.9", "192.0.2.7:4000"), 1.0);
        f.register(out.clock, member(3, "c.8", "192.0.2.7:4000"), 1.0);
        let protected: Vec<(String, bool)> = f.rows().iter().map(|r| (r.who.worker.clone(), r.protected)).collect();
        let want = [("c.1", true), ("c.9", false), ("c.8", true)].map(|(w, p)| (w.to_owned(), p));
        assert_eq!(protected, want);
        assert_eq!(f.protection(), vec![("c.*".to_owned(), true), ("c.9".to_owned(), false)]);
    }
}
