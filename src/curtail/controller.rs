//! The curtailment controller: the one task that owns the curtailment
//! [`State`]. Sessions register with it, the control server sends it
//! requests, hooks report back to it; it feeds each to the state with the
//! time, then carries out the effects the state queued (events to
//! subscribers, words to sessions, hook runs). The logic is all in
//! [`super::state`].

use super::feed::{Reader, SourceConfig, SourceKind};
use super::hooks::{self, HookDone};
pub use super::state::{BudgetParams, ControlError, ControlReq, CurtailSnapshot, GroupFigures, Registered, Scope};
use super::state::{Clock, Effect, FeedId, State};
use super::CurtailConfig;
use crate::api::{MinerId, Reply, Stamped, Status};
use crate::link::Member;
use crate::link::Roster;
pub use crate::link::{SessionCmd, SessionSignal};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::error;

enum Req {
    Reconfigure(Box<CurtailConfig>, oneshot::Sender<Result<(), String>>),
    Register(Arc<Member>, oneshot::Sender<Registered>),
    Deregister {
        miner: MinerId,
        session: u64,
    },
    Control(ControlReq, oneshot::Sender<Result<Reply, ControlError>>),
    Hook(HookDone),
    Feed(FeedId, Result<f64, String>),
    /// Cluster mode's agent: the allotment, the site's protection rules,
    /// this fleet's report, an event.
    Allot(Option<crate::api::Watts>, String),
    Protection(Vec<(String, bool)>),
    Report(String, oneshot::Sender<super::cluster::plan::Report>),
    Emit(crate::api::Event),
    Calibrate(f64),
    /// The live sessions, for the self-check: taken as this is queued, so
    /// every deregister queued before (a session's, before it leaves) is
    /// heard first.
    Audit(Vec<Arc<crate::link::Member>>),
}

/// A handle on the controller task. Every miner session holds one, so it
/// is two words: the queue, and what the handles share.
#[derive(Clone)]
pub struct Curtailer {
    tx: mpsc::Sender<Req>,
    shared: Arc<Shared>,
}

struct Shared {
    events: broadcast::Sender<Arc<Stamped>>,
    snapshot: watch::Receiver<Arc<CurtailSnapshot>>,
    /// Cluster mode: where site-wide requests go (the agent).
    cluster: Option<super::cluster::Link>,
    /// Stops the controller with the last handle on it (its own queue
    /// keeps a sender, so it would not stop by itself).
    _task: Arc<TaskGuard>,
}

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Curtailer {
    /// Cluster mode: `set_budget`, `resume_all` and `set_protection` go to
    /// the site (through the agent), and `status` carries the site's rows.
    pub fn with_cluster(self, link: super::cluster::Link) -> Curtailer {
        let s = &self.shared;
        let shared = Shared {
            events: s.events.clone(),
            snapshot: s.snapshot.clone(),
            cluster: Some(link),
            _task: s._task.clone(),
        };
        Curtailer { tx: self.tx, shared: Arc::new(shared) }
    }

    /// Cluster mode: the site as the agent last read it.
    pub fn cluster_view(&self) -> Option<crate::api::ClusterStatus> {
        self.shared.cluster.as_ref().and_then(|l| l.view.borrow().clone())
    }

    /// Cluster mode's agent: this instance's allotment (none: no limit).
    pub async fn allot(&self, watts: Option<crate::api::Watts>, reason: String) {
        let _ = self.tx.send(Req::Allot(watts, reason)).await;
    }
    /// Cluster mode's agent: the site's calibration factor.
    pub async fn calibrate(&self, factor: f64) {
        let _ = self.tx.send(Req::Calibrate(factor)).await;
    }
    /// Cluster mode's agent: the site's protection rules.
    pub async fn protection(&self, rules: Vec<(String, bool)>) {
        let _ = self.tx.send(Req::Protection(rules)).await;
    }
    /// Cluster mode's agent: what the planner needs of this fleet.
    pub async fn report(&self, instance: &str) -> Option<super::cluster::plan::Report> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Req::Report(instance.to_owned(), tx)).await.ok()?;
        rx.await.ok()
    }
    /// An event on this instance's stream, stamped by the controller.
    pub async fn emit(&self, e: crate::api::Event) {
        let _ = self.tx.send(Req::Emit(e)).await;
    }

    /// Register a miner session that has authorized: which miner it is,
    /// and whether it must stay parked (no work). None: the controller has
    /// stopped (the proxy is stopping).
    pub async fn register(&self, member: Arc<Member>) -> Option<Registered> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Req::Register(member, tx)).await.ok()?;
        rx.await.ok()
    }
    pub async fn deregister(&self, miner: MinerId, session: u64) {
        let _ = self.tx.send(Req::Deregister { miner, session }).await;
    }
    pub async fn request(&self, r: ControlReq) -> Result<Reply, ControlError> {
        if let Some(link) = &self.shared.cluster {
            match r {
                ControlReq::Status { miners } => {
                    let mut s = self.local(ControlReq::Status { miners }).await?;
                    if let Reply::Status(st) = &mut s {
                        st.cluster = self.cluster_view();
                    }
                    return Ok(s);
                }
                site => return link.request(site).await,
            }
        }
        self.local(r).await
    }

    /// A request to this instance's own state.
    pub(crate) async fn local(&self, r: ControlReq) -> Result<Reply, ControlError> {
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
        self.shared.events.subscribe()
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
        self.shared.snapshot.borrow().clone()
    }
}

/// Start the controller task, with what the state file kept (read here,
/// before the proxy accepts a miner). A state file that cannot be read is
/// logged with its path and what is wrong, and `curtail.on_bad_state` says
/// what happens then. `roster`: the live sessions its rows are checked
/// against every second (none: no self-check), in order with the queue.
pub fn spawn(cfg: CurtailConfig, roster: Option<Arc<dyn Roster>>) -> Result<Curtailer, String> {
    // In cluster mode etcd keeps the site's state; the file keeps only this
    // instance's own: the power targets set on its miners.
    let state_file = super::store::path_for(&cfg.state_file, &cfg.socket);
    let clustered = cfg.cluster.is_some();
    let on_bad = cfg.on_bad_state;
    let cfg_feeds = own_feeds(&cfg);
    let mut st = State::new(cfg, Clock::now())?;
    if let (Some(path), true) = (&state_file, clustered) {
        match super::store::load(path) {
            Ok(Some(s)) => st.restore_targets(s.targets),
            Ok(None) => {}
            Err(e) => {
                error!(path = %path.display(), "cannot read this instance's power targets: {e}; starting without them (miners lowered before are restored to full power only once given a target again)")
            }
        }
    } else if let Some(path) = &state_file {
        let restored = super::store::load(path).map_err(|e| e.to_string()).and_then(|saved| match saved {
            Some(s) => st.restore(Clock::now(), s).map_err(|e| format!("the state file {}: {e}", path.display())),
            None => Ok(()),
        });
        if let Err(why) = restored {
            match on_bad {
                super::OnBadState::ParkAll => {
                    error!("{why}; curtail.on_bad_state = \"park-all\": no curtailable miner gets work until a budget is set (to start afresh: stop sluice, remove {})", path.display());
                    st.hold_everything(Clock::now(), &why);
                }
                super::OnBadState::NoBudget => {
                    error!("{why}; curtail.on_bad_state = \"no-budget\": starting with no budget");
                }
            }
        }
    }
    if clustered {
        // No miner gets work before the planner (or etcd's site state)
        // says how much this instance may draw.
        st.allot(Clock::now(), Some(crate::api::Watts::ZERO), "cluster: waiting for etcd".into());
    }
    let (tx, rx) = mpsc::channel(4096);
    let (events, _) = broadcast::channel(4096);
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(CurtailSnapshot::default()));
    let feeds = spawn_feeds(&cfg_feeds, &tx, Req::Feed);
    if let Some(roster) = roster {
        tokio::spawn(audit_sessions(roster, tx.clone()));
    }
    let shell =
        Shell { st, events: events.clone(), hooks_tx: tx.clone(), snapshot: snapshot_tx, state_file, clustered, feeds };
    let task = Arc::new(TaskGuard(tokio::spawn(shell.run(rx)).abort_handle()));
    Ok(Curtailer { tx, shared: Arc::new(Shared { events, snapshot, cluster: None, _task: task }) })
}

const TICK: Duration = Duration::from_millis(100);
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// The task around the state: inputs in, effects out.
struct Shell {
    st: State,
    events: broadcast::Sender<Arc<Stamped>>,
    /// Where hook outcomes come back (the controller's own queue).
    hooks_tx: mpsc::Sender<Req>,
    snapshot: watch::Sender<Arc<CurtailSnapshot>>,
    state_file: Option<std::path::PathBuf>,
    /// Cluster mode: the state file keeps only the power targets.
    clustered: bool,
    /// The tasks reading the meter and the other load.
    feeds: Vec<tokio::task::JoinHandle<()>>,
}

/// Every second, the live sessions to the controller's self-check, through
/// its queue (in order with the sessions' own registers and deregisters).
/// Ends with the controller.
async fn audit_sessions(roster: Arc<dyn Roster>, tx: mpsc::Sender<Req>) {
    let mut every = tokio::time::interval(SNAPSHOT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if tx.send(Req::Audit(roster.members())).await.is_err() {
            return;
        }
    }
}

fn own_feeds(cfg: &CurtailConfig) -> FeedConfigs {
    let (m, f) = cfg.own_feeds();
    (m.cloned(), f.cloned())
}

pub(crate) type FeedConfigs = (Option<super::closed_loop::MeterConfig>, Option<super::closed_loop::FollowConfig>);

/// One task per polled feed: read every interval, report to `tx` (the
/// controller's queue, or in cluster mode the planner's).
pub(crate) fn spawn_feeds<T: Send + 'static>(
    (meter, follow): &FeedConfigs,
    tx: &mpsc::Sender<T>,
    wrap: fn(FeedId, Result<f64, String>) -> T,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut v = Vec::new();
    if let Some(m) = meter {
        v.push(spawn_feed(FeedId::Meter, m.source.clone(), m.interval_s.get(), tx.clone(), wrap));
    }
    if let Some(f) = follow {
        v.push(spawn_feed(FeedId::OtherLoad, f.other_load.clone(), f.interval_s.get(), tx.clone(), wrap));
    }
    v
}

fn spawn_feed<T: Send + 'static>(
    id: FeedId,
    src: SourceConfig,
    every: Duration,
    tx: mpsc::Sender<T>,
    wrap: fn(FeedId, Result<f64, String>) -> T,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !matches!(src.kind, Some(SourceKind::Prometheus | SourceKind::Modbus)) {
            return;
        }
        let reader = Reader::new(src);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = reader.read().await;
            if tx.send(wrap(id, r)).await.is_err() {
                return;
            }
        }
    })
}

impl Drop for Shell {
    fn drop(&mut self) {
        for f in &self.feeds {
            f.abort();
        }
    }
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot = tokio::time::interval(SNAPSHOT_EVERY);
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    None => break,
                    Some(r) => self.handle(r),
                },
                _ = tick.tick() => self.st.tick(Clock::now()),
                _ = snapshot.tick() => {
                    self.snapshot.send_replace(Arc::new(self.st.snapshot()));
                }
            }
            self.carry_out();
        }
    }

    fn handle(&mut self, r: Req) {
        let now = Clock::now();
        match r {
            Req::Reconfigure(cfg, reply) => {
                let feeds = own_feeds(&cfg);
                let r = self.st.reconfigure(*cfg);
                if r.is_ok() {
                    for f in self.feeds.drain(..) {
                        f.abort();
                    }
                    self.feeds = spawn_feeds(&feeds, &self.hooks_tx, Req::Feed);
                }
                let _ = reply.send(r);
            }
            Req::Register(member, reply) => {
                let r = self.st.register(now, member);
                // Park first, then give the job: the miners this one
                // displaces get their word before it gets its answer.
                self.carry_out();
                let _ = reply.send(r);
            }
            Req::Deregister { miner, session } => self.st.deregister(now, miner, session),
            Req::Control(c, reply) => {
                let r = self.st.control(now, c);
                // Written to the state file before the answer goes out: a
                // budget acknowledged is a budget a restart keeps.
                self.carry_out();
                let _ = reply.send(r);
            }
            Req::Hook(done) => self.st.on_hook(now, done),
            Req::Feed(id, r) => self.st.on_feed(now, id, r.map(crate::units::Watts)),
            Req::Allot(w, reason) => self.st.allot(now, w, reason),
            Req::Protection(rules) => self.st.replace_protection(now, rules),
            Req::Report(name, reply) => {
                let _ = reply.send(self.st.report(now, &name));
            }
            Req::Emit(e) => self.st.emit(now, e),
            Req::Calibrate(f) => self.st.calibrate(now, f),
            Req::Audit(live) => self.st.audit(now, &live),
        }
    }

    fn carry_out(&mut self) {
        for e in self.st.take_effects() {
            match e {
                Effect::Event(ev) => {
                    let _ = self.events.send(Arc::new(ev));
                }
                Effect::Signal(session, cmd) => session.signal.send(cmd),
                Effect::Hook(job) => hooks::spawn(job, self.hooks_tx.clone(), Req::Hook),
                Effect::Persist(saved) => {
                    if let Some(p) = &self.state_file {
                        if let Err(e) = super::store::save(p, &super::store::kept_on_disk(*saved, self.clustered)) {
                            error!(path = %p.display(), "cannot write the curtailment state file: {e}; a restart would not know the budget in force");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller keeps a sender on its own queue (hook outcomes come
    /// back through it), so it stops with the last handle on it, not when
    /// its queue closes: a dropped proxy leaves no controller ticking,
    /// writing its state file or driving firmware.
    #[tokio::test]
    async fn the_controller_stops_with_its_last_handle() {
        let cfg = CurtailConfig { socket: std::path::PathBuf::new(), ..CurtailConfig::default() };
        let first = spawn(cfg, None).unwrap();
        let mut events = first.subscribe();
        let second = first.clone();
        drop(first);
        assert!(second.status(false).await.is_ok(), "running while a handle is left");
        drop(second);
        // Both senders of its events are gone once the task has stopped.
        let closed = async {
            loop {
                if let Err(broadcast::error::RecvError::Closed) = events.recv().await {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), closed).await.expect("the controller stopped");
    }
}
