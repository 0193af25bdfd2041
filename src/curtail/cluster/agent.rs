//! The cluster agent: the task that keeps this instance in its site through
//! etcd. Every round (a few a second) it keeps its lease alive, publishes
//! its fleet's report when it changed, reads the site (state, reports,
//! planner, allotments), stands for planner when there is none, plans if it
//! is the planner, and hands its own allotment to the controller. The
//! site-wide control requests (`set_budget`, `resume_all`,
//! `set_protection`) come here and are written to the site state with a
//! compare-and-swap. The rules are in [`super::plan`]; this file is I/O.

use super::plan::Report;
use super::site;
use super::{Allotments, ClusterConfig, LinkEnd, OnLost, SiteReq};
use crate::api::{BudgetSource, ClusterStatus, Event, InstanceRow, Matched, Reply, Resuming, Watts};
use crate::curtail::book::{Book, Followed};
use crate::curtail::closed_loop::{Sample, Verdict};
use crate::curtail::controller::{ControlError, ControlReq, Curtailer};
use crate::curtail::effect::Clock;
use crate::curtail::measure::{FeedId, Measured};
use crate::curtail::schedule::Window;
use crate::curtail::scope::Scope;
use crate::curtail::store::{Saved, SavedRule};
use crate::curtail::CurtailConfig;
use crate::curtail::LeaseFallback;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// How often the agent reads the site.
const ROUND: Duration = Duration::from_millis(200);

/// A site request that loses its compare-and-swap this many times in a row
/// fails (another instance writes the state as fast as this one reads it).
const CAS_TRIES: usize = 8;

/// What the site's keys held at one revision.
#[derive(Default)]
struct Site {
    state: Option<(Saved, i64)>,
    reports: Vec<Report>,
    /// Reports that could not be read: instances of unknown draw.
    unreadable: usize,
    /// The planner key: its value, lease and create revision.
    planner: Option<(String, i64, i64)>,
    allotments: Option<Allotments>,
}

struct Lease {
    id: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    renewed: Instant,
}

pub struct Agent {
    cfg: ClusterConfig,
    name: String,
    prefix: String,
    curtailer: Curtailer,
    end: LinkEnd,
    schedule: Vec<Window>,
    fallback: LeaseFallback,
    client: Option<Client>,
    lease: Option<Lease>,
    /// The revision this instance won the planner's election at.
    epoch: Option<i64>,
    written: Option<Report>,
    /// The allotment handed to the controller (outer none: nothing yet).
    applied: Option<Option<Watts>>,
    protection: Option<Vec<(String, bool)>>,
    ok_at: Instant,
    lost: Option<Instant>,
    last_error: String,
    seen: BTreeSet<String>,
    planner_seen: Option<String>,
    /// A site request's write has gone to etcd: if no answer comes, etcd may
    /// still apply it (a frozen etcd reads its socket when it runs again).
    write_sent: bool,
    /// The site's meter and follow mode, read by the planner only.
    measured: Measured,
    feeds_cfg: crate::curtail::controller::FeedConfigs,
    feed_tasks: Vec<JoinHandle<()>>,
    feed_tx: mpsc::Sender<(FeedId, Result<f64, String>)>,
    feed_rx: mpsc::Receiver<(FeedId, Result<f64, String>)>,
    ramp_w_per_s: f64,
    /// The resume hysteresis, planned with (see `site::Planning`).
    hysteresis: f64,
    /// What the last plan saw: the instances' draw, the site budget, and
    /// when the fleet last changed (for the calibration's settle time).
    drawn_w: Watts,
    budget_w: Option<Watts>,
    fleet_sig: (usize, usize, u64),
    fleet_changed: Instant,
    /// The factor handed to the controller.
    factor_applied: f64,
    /// The `at_ms` of the allotments the grant it enforces came from.
    taken_at_ms: Option<u64>,
    /// When this instance last planned (as the planner).
    planned_at: Option<Instant>,
}

fn now_clock() -> Clock {
    Clock::now()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Agent {
    pub fn new(
        cfg: ClusterConfig,
        name: String,
        curtail: &CurtailConfig,
        curtailer: Curtailer,
        end: LinkEnd,
    ) -> Result<Agent, String> {
        let schedule = curtail.schedule.iter().map(Window::parse).collect::<Result<Vec<_>, _>>()?;
        let fallback = curtail.lease_fallback;
        let now = Instant::now();
        let mut measured = Measured::new(now);
        measured.configure(curtail.meter.as_ref(), curtail.follow.as_ref(), now);
        let (feed_tx, feed_rx) = mpsc::channel(16);
        Ok(Agent {
            measured,
            feeds_cfg: (curtail.meter.clone(), curtail.follow.clone()),
            feed_tasks: Vec::new(),
            feed_tx,
            feed_rx,
            ramp_w_per_s: curtail.ramp_up_w_per_s,
            hysteresis: curtail.hysteresis_fraction,
            drawn_w: Watts::ZERO,
            budget_w: None,
            fleet_sig: (0, 0, 0),
            fleet_changed: now,
            factor_applied: 1.0,
            taken_at_ms: None,
            planned_at: None,
            prefix: cfg.prefix(),
            cfg,
            name,
            curtailer,
            end,
            schedule,
            fallback,
            client: None,
            lease: None,
            epoch: None,
            written: None,
            applied: None,
            protection: None,
            ok_at: Instant::now(),
            lost: None,
            last_error: String::new(),
            seen: BTreeSet::new(),
            planner_seen: None,
            write_sent: false,
        })
    }

    fn lease_s(&self) -> Duration {
        self.cfg.lease_s.get()
    }

    /// Each etcd call's deadline: an etcd that hangs is noticed well
    /// within `lease_s`.
    fn call_timeout(&self) -> Duration {
        (self.lease_s() / 4).max(Duration::from_millis(500))
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Reach etcd and take up the site's allotment for this instance
    /// before any miner is accepted (for at most `lease_s`), then run.
    pub async fn start(mut self) -> JoinHandle<()> {
        let deadline = Instant::now() + self.lease_s();
        loop {
            match tokio::time::timeout(self.lease_s(), self.round()).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => self.last_error = e,
                Err(_) => self.last_error = "etcd did not answer".into(),
            }
            if Instant::now() >= deadline {
                error!(endpoints = ?self.cfg.endpoints, error = %self.last_error, "cluster: cannot reach etcd at start: no curtailable miner gets work until it answers");
                // Status says so meanwhile (`etcd_reachable: false`).
                self.publish_view(None);
                break;
            }
            tokio::time::sleep(ROUND).await;
        }
        tokio::spawn(self.run())
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                req = self.end.rx.recv() => match req {
                    None => return,
                    Some(r) => self.site_request(r).await,
                },
                Some((id, r)) = self.feed_rx.recv() => self.on_feed(id, r),
                _ = tick.tick() => {
                    let r = match tokio::time::timeout(self.lease_s(), self.round()).await {
                        Ok(r) => r,
                        Err(_) => Err("etcd did not answer".into()),
                    };
                    self.after(r).await;
                }
            }
        }
    }

    /// Book-keeping after a round: etcd lost or back.
    async fn after(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.ok_at = Instant::now();
                if let Some(since) = self.lost.take() {
                    let down_s = since.elapsed().as_secs_f64() + self.lease_s().as_secs_f64();
                    info!(down_s, "cluster: etcd answers again; rejoined the site");
                    self.curtailer.emit(Event::EtcdBack { down_s }).await;
                }
            }
            Err(e) => {
                debug!(error = %e, "cluster: round failed");
                // The next round starts from a fresh connection.
                self.client = None;
                if let Some(l) = self.lease.as_mut() {
                    l.keeper = None;
                }
                self.last_error = e;
                if self.lost.is_none() && self.ok_at.elapsed() >= self.lease_s() {
                    self.lost = Some(Instant::now());
                    self.epoch = None;
                    let on_lost = match self.cfg.on_lost {
                        OnLost::Hold => "hold",
                        OnLost::Shed => "shed",
                    };
                    if self.cfg.on_lost == OnLost::Shed {
                        self.apply(Some(Watts::ZERO), "cluster: etcd unreachable (on_lost = shed)".into()).await;
                    }
                    let allotment_w = self.applied.flatten();
                    warn!(error = %self.last_error, on_lost, allotment_w = ?allotment_w.map(|w| w.0), "cluster: etcd has not answered for lease_s");
                    self.curtailer
                        .emit(Event::EtcdLost { on_lost: on_lost.into(), allotment_w, error: self.last_error.clone() })
                        .await;
                    self.publish_view(None);
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.call_timeout())
            .with_timeout(self.call_timeout())
            .with_keep_alive(Duration::from_secs(1), self.call_timeout());
        let c = Client::connect(&self.cfg.endpoints, Some(opts)).await.map_err(err)?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// This instance's lease, granted or kept alive (a third of `lease_s`
    /// apart). A lease etcd no longer knows (it ran out while this
    /// instance could not reach it) is replaced, and everything on it
    /// written again.
    async fn keep_lease(&mut self, c: &mut Client) -> Result<i64, String> {
        let every = self.lease_s() / 3;
        if let Some(l) = self.lease.as_mut() {
            if l.renewed.elapsed() < every {
                return Ok(l.id);
            }
            // etcd says a lease it no longer knows either with a TTL of 0
            // or with an error of its own, at any of the three steps.
            let answer = async {
                if l.keeper.is_none() {
                    l.keeper = Some(c.lease_keep_alive(l.id).await?);
                }
                let (keeper, stream) = l.keeper.as_mut().expect("set above");
                keeper.keep_alive().await?;
                stream.message().await
            }
            .await;
            let answer = match answer {
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => None,
                r => r.map_err(err)?,
            };
            match answer {
                Some(r) if r.ttl() > 0 => {
                    l.renewed = Instant::now();
                    return Ok(l.id);
                }
                _ => {
                    warn!(lease = l.id, "cluster: this instance's lease ran out; taking a new one");
                    self.lease = None;
                    self.epoch = None;
                    self.written = None;
                }
            }
        }
        let ttl = self.lease_s().as_secs_f64().ceil() as i64;
        let id = c.lease_grant(ttl, None).await.map_err(err)?.id();
        self.lease = Some(Lease { id, keeper: None, renewed: Instant::now() });
        self.written = None;
        Ok(id)
    }

    async fn read(&self, c: &mut Client) -> Result<Site, String> {
        let r = c.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(err)?;
        let mut site = Site::default();
        for kv in r.kvs() {
            let key = kv.key_str().map_err(err)?;
            let Some(rest) = key.strip_prefix(&self.prefix) else { continue };
            let parse = |what: &str| format!("{key}: not a valid {what}");
            match rest {
                "state" => {
                    let s: Saved =
                        serde_json::from_slice(kv.value()).map_err(|e| format!("{}: {e}", parse("state")))?;
                    site.state = Some((s, kv.mod_revision()));
                }
                "planner" => {
                    site.planner = Some((kv.value_str().map_err(err)?.to_owned(), kv.lease(), kv.create_revision()))
                }
                "allotments" => {
                    site.allotments =
                        Some(serde_json::from_slice(kv.value()).map_err(|e| format!("{}: {e}", parse("allotment")))?)
                }
                r if r.starts_with("instances/") => {
                    match serde_json::from_slice::<Report>(kv.value()).map_err(|e| e.to_string()).and_then(|rep| {
                        rep.check()?;
                        Ok(rep)
                    }) {
                        Ok(rep) => site.reports.push(rep),
                        Err(e) => {
                            warn!(
                                key,
                                "cluster: a report the planner cannot use ({e}): no allotment grows while it is there"
                            );
                            site.unreadable += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(site)
    }

    /// One round: lease, report, read, election, plan, allotment.
    async fn round(&mut self) -> Result<(), String> {
        let mut c = self.connect().await?;
        let lease = self.keep_lease(&mut c).await?;
        let mut site = self.read(&mut c).await?;
        // Our report, when it changed or is not there (a new lease, or
        // etcd revoked it).
        let Some(mut report) = self.curtailer.report(&self.name).await else { return Ok(()) };
        report.taken_at_ms = self.taken_at_ms;
        let ours_there = site.reports.iter().any(|r| r.instance == self.name);
        let same = self.written.as_ref().is_some_and(|w| Report { at_ms: w.at_ms, ..report.clone() } == *w);
        if !same || !ours_there {
            let v = serde_json::to_vec(&report).map_err(err)?;
            c.put(self.key(&format!("instances/{}", self.name)), v, Some(PutOptions::new().with_lease(lease)))
                .await
                .map_err(err)?;
            site.reports.retain(|r| r.instance != self.name);
            site.reports.push(report.clone());
            self.written = Some(report);
        }
        self.elect(&mut c, &mut site, lease).await?;
        self.feeds_for_role(&site);
        match self.epoch {
            Some(epoch) => self.plan(&mut c, &mut site, epoch).await?,
            None => self.planned_at = None,
        }
        self.take_up(&site).await;
        self.events(&site).await;
        self.publish_view(Some(&site));
        Ok(())
    }

    /// Stand for planner when there is none.
    async fn elect(&mut self, c: &mut Client, site: &mut Site, lease: i64) -> Result<(), String> {
        let key = self.key("planner");
        match &site.planner {
            Some((who, l, rev)) if *who == self.name && *l == lease => self.epoch = Some(*rev),
            Some(_) => self.epoch = None,
            None => {
                let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([
                    TxnOp::put(key.as_str(), self.name.as_str(), Some(PutOptions::new().with_lease(lease))),
                ]);
                let r = c.txn(txn).await.map_err(err)?;
                if r.succeeded() {
                    let rev = r.header().map_or(0, |h| h.revision());
                    info!(epoch = rev, "cluster: elected planner of site {}", self.cfg.site);
                    self.epoch = Some(rev);
                    site.planner = Some((self.name.clone(), lease, rev));
                    self.curtailer.emit(Event::ClusterPlanner { instance: self.name.clone(), epoch: rev }).await;
                }
            }
        }
        Ok(())
    }

    /// The budget in force for the site, from its state and this
    /// instance's schedule ([`site::book`]); in follow mode a lease that
    /// runs out falls back to following.
    fn book(&self, clock: Clock, state: Option<&Saved>) -> Result<(Book, bool), String> {
        let fallback = match self.fallback {
            _ if self.measured.follow.is_some() => LeaseFallback::Follow,
            LeaseFallback::Follow => LeaseFallback::Resume,
            f => f,
        };
        site::book(&self.schedule, fallback, clock, state)
    }

    /// Plan for the site (this instance is the planner, fenced by `epoch`).
    async fn plan(&mut self, c: &mut Client, site: &mut Site, epoch: i64) -> Result<(), String> {
        let clock = now_clock();
        let state = site.state.as_ref().map(|(s, _)| s);
        let (mut book, mut changed) = self.book(clock, state)?;
        for (id, c) in self.measured.check(clock.at) {
            warn!(feed = id.name(), change = ?c, "cluster: a site feed went stale or recovered");
        }
        if let Some(f) = self.measured.follow.as_mut() {
            if let Some(w) = f.step(clock.at, self.ramp_w_per_s) {
                let reason = match f.feed.fresh() {
                    Some(s) => format!(
                        "follow: site limit {:.0} W - other load {:.0} W - margin {:.0} W",
                        f.cfg.site_limit_w.0, s.watts.0, f.cfg.margin_w.0
                    ),
                    None => format!("follow: the other load is stale (on_stale = {:?})", f.cfg.on_stale).to_lowercase(),
                };
                changed |= book.follow(clock, w, reason) == Followed::Took;
            }
        }
        if changed {
            let protection = state.map(|s| s.protection.clone()).unwrap_or_default();
            let rev = site.state.as_ref().map(|(_, r)| *r);
            let saved = site::saved(&book, protection, clock);
            self.cas_state(c, rev, &saved, epoch).await?;
        }
        let in_force = book.in_force();
        let prev = site.allotments.clone();
        // Planned within lease_s (a loaded machine runs its rounds late),
        // not newly elected or back from an etcd out of reach.
        let continuous = self.planned_at.is_some_and(|t| t.elapsed() < self.lease_s());
        self.planned_at = Some(Instant::now());
        let next = site::allotments(site::Planning {
            continuous,
            planner: &self.name,
            epoch,
            clock,
            lease: self.lease_s(),
            reports: &site.reports,
            unreadable: site.unreadable,
            prev: prev.as_ref(),
            budget: in_force.map(|b| (b.amount, b.source, b.reason.as_str())),
            factor: self.measured.calibration.factor,
            measured_w: self.measured.measured().map(|s| s.watts),
            hysteresis: self.hysteresis,
        });
        // What the calibration needs of the site: its draw, its budget,
        // and when the fleet last changed.
        self.drawn_w = site.reports.iter().map(|r| r.drawn_w).sum();
        self.budget_w = next.budget_w;
        let sig = (
            site.reports.iter().map(|r| r.mining).sum::<usize>(),
            site.reports.len(),
            site.reports.iter().map(|r| r.limit_w.map_or(u64::MAX, |w| w.0 as u64)).fold(0u64, u64::wrapping_add),
        );
        if sig != self.fleet_sig {
            (self.fleet_sig, self.fleet_changed) = (sig, clock.at);
        }
        if prev.as_ref().is_some_and(|p| site::same(p, &next)) {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(self.key("planner"), CompareOp::Equal, epoch)])
            .and_then([TxnOp::put(self.key("allotments"), serde_json::to_vec(&next).map_err(err)?, None)]);
        if c.txn(txn).await.map_err(err)?.succeeded() {
            site.allotments = Some(next);
        } else {
            warn!(epoch, "cluster: no longer the planner (fenced out)");
            self.epoch = None;
        }
        Ok(())
    }

    /// The planner reads the site's feeds; the others do not.
    fn feeds_for_role(&mut self, site: &Site) {
        let planner = self.epoch.is_some();
        if planner && self.feed_tasks.is_empty() {
            // Follow mode goes on from the budget the last planner
            // published until the other load is read again.
            if let (Some(f), Some(a)) = (self.measured.follow.as_mut(), &site.allotments) {
                if a.source == BudgetSource::Follow {
                    f.budget_w = a.budget_w;
                }
                self.measured.calibration.factor = a.factor;
            }
            self.feed_tasks = crate::curtail::controller::spawn_feeds(&self.feeds_cfg, &self.feed_tx, |id, r| (id, r));
        } else if !planner && !self.feed_tasks.is_empty() {
            for t in self.feed_tasks.drain(..) {
                t.abort();
            }
        }
    }

    /// A reading of the site's meter or other load (the planner's).
    fn on_feed(&mut self, id: FeedId, r: Result<f64, String>) {
        if self.epoch.is_none() {
            return;
        }
        let clock = now_clock();
        let r = r.map(|w| Sample { watts: Watts(w), at: clock.at, unix_ms: clock.unix_ms });
        if let Some(c) = self.measured.reading(id, r.clone()) {
            info!(feed = id.name(), change = ?c, "cluster: a site feed");
        }
        let (FeedId::Meter, Ok(s)) = (id, r) else { return };
        let factor = self.measured.calibration.factor;
        let raw = self.drawn_w / factor;
        self.measured.calibration.fleet_changed(self.fleet_changed);
        match self.measured.calibration.on_reading(s, raw, self.budget_w) {
            Verdict::Keep => {}
            Verdict::Recalibrated { factor } => {
                info!(
                    factor,
                    measured_w = s.watts.0,
                    estimated_w = raw.0,
                    "cluster: calibrated the site's estimates on the meter"
                )
            }
            Verdict::Corrected { factor, over_w } => {
                warn!(
                    factor,
                    over_w = over_w.0,
                    measured_w = s.watts.0,
                    "cluster: the hall meter reads over the site budget after settle_s: parking more"
                )
            }
        }
    }

    /// Write the site state if it is still at `rev` (none: absent); with
    /// `fence`, only while this instance is the planner it was elected.
    async fn cas_state(&self, c: &mut Client, rev: Option<i64>, s: &Saved, fence: i64) -> Result<bool, String> {
        let key = self.key("state");
        let mut when = vec![match rev {
            Some(r) => Compare::mod_revision(key.as_str(), CompareOp::Equal, r),
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        }];
        if fence > 0 {
            when.push(Compare::create_revision(self.key("planner"), CompareOp::Equal, fence));
        }
        let txn = Txn::new().when(when).and_then([TxnOp::put(key, serde_json::to_vec(s).map_err(err)?, None)]);
        Ok(c.txn(txn).await.map_err(err)?.succeeded())
    }

    /// Hand this instance's allotment and the site's protection rules to
    /// the controller.
    async fn take_up(&mut self, site: &Site) {
        if let Some((s, _)) = &site.state {
            let rules: Vec<(String, bool)> = s.protection.iter().map(|r| (r.pattern.clone(), r.protected)).collect();
            if self.protection.as_ref() != Some(&rules) {
                self.curtailer.protection(rules.clone()).await;
                self.protection = Some(rules);
            }
        }
        if let Some(a) = &site.allotments {
            if (a.factor - self.factor_applied).abs() > 1e-9 {
                self.curtailer.calibrate(a.factor).await;
                self.factor_applied = a.factor;
            }
        }
        if self.lost.is_some() && self.cfg.on_lost == OnLost::Shed {
            return;
        }
        let current = self.applied.flatten();
        let (grant, reason) =
            site::take_up(site.state.as_ref().map(|(s, _)| s), site.allotments.as_ref(), &self.name, current);
        if self.applied != Some(grant) {
            self.taken_at_ms = site.allotments.as_ref().map(|a| a.at_ms);
            self.apply(grant, reason).await;
            let site_budget_w = site.allotments.as_ref().and_then(|a| a.budget_w);
            self.curtailer.emit(Event::ClusterAllotment { allotment_w: grant, site_budget_w }).await;
        }
    }

    async fn apply(&mut self, grant: Option<Watts>, reason: String) {
        self.curtailer.allot(grant, reason).await;
        self.applied = Some(grant);
    }

    /// Instances joining and leaving, a new planner.
    async fn events(&mut self, site: &Site) {
        let now: BTreeSet<String> = site.reports.iter().map(|r| r.instance.clone()).collect();
        for n in now.difference(&self.seen) {
            info!(instance = %n, "cluster: instance joined the site");
            self.curtailer.emit(Event::ClusterJoined { instance: n.clone() }).await;
        }
        for n in self.seen.difference(&now) {
            info!(instance = %n, "cluster: instance left the site");
            self.curtailer.emit(Event::ClusterLeft { instance: n.clone() }).await;
        }
        self.seen = now;
        let planner = site.planner.as_ref().map(|p| p.0.clone());
        if planner != self.planner_seen {
            if let (Some(p), Some(a)) = (&planner, &site.allotments) {
                if *p != self.name {
                    info!(planner = %p, "cluster: planner of the site");
                    self.curtailer.emit(Event::ClusterPlanner { instance: p.clone(), epoch: a.epoch }).await;
                }
            }
            self.planner_seen = planner;
        }
    }

    fn publish_view(&mut self, site: Option<&Site>) {
        let reachable = site.is_some();
        let on_lost = match self.cfg.on_lost {
            OnLost::Hold => "hold",
            OnLost::Shed => "shed",
        };
        let mut v = self.end.view.borrow().clone().unwrap_or_else(|| ClusterStatus {
            site: self.cfg.site.clone(),
            instance: self.name.clone(),
            role: "member".into(),
            planner: None,
            etcd_reachable: false,
            on_lost: on_lost.into(),
            budget_w: None,
            budget_source: BudgetSource::None,
            budget_reason: None,
            met: None,
            measured_w: None,
            calibration_factor: 1.0,
            mining: 0,
            parked: 0,
            drawn_w: Watts::ZERO,
            allotment_w: None,
            instances: Vec::new(),
        });
        v.etcd_reachable = reachable;
        v.role = if self.epoch.is_some() { "planner" } else { "member" }.into();
        v.allotment_w = self.applied.flatten();
        if let Some(site) = site {
            let now_ms = now_clock().unix_ms;
            let a = site.allotments.as_ref();
            v.planner = site.planner.as_ref().map(|p| p.0.clone());
            v.budget_w = a.and_then(|a| a.budget_w);
            v.budget_source = a.map_or(BudgetSource::None, |a| a.source);
            v.budget_reason = a.filter(|a| a.budget_w.is_some()).map(|a| a.reason.clone());
            v.mining = site.reports.iter().map(|r| r.mining).sum();
            v.parked = site.reports.iter().map(|r| r.parked).sum();
            v.drawn_w = site.reports.iter().map(|r| r.drawn_w).sum();
            v.measured_w = a.and_then(|a| a.measured_w);
            v.calibration_factor = a.map_or(1.0, |a| a.factor);
            v.met = v.budget_w.map(|b| v.measured_w.unwrap_or(v.drawn_w) <= b);
            let mut rows: Vec<InstanceRow> = site
                .reports
                .iter()
                .map(|r| InstanceRow {
                    instance: r.instance.clone(),
                    planner: v.planner.as_deref() == Some(r.instance.as_str()),
                    allotment_w: a.and_then(|a| a.grants.get(&r.instance).copied().flatten()),
                    limit_w: r.limit_w,
                    drawn_w: r.drawn_w,
                    mining: r.mining,
                    parked: r.parked,
                    seen_s_ago: now_ms.saturating_sub(r.at_ms) as f64 / 1e3,
                })
                .collect();
            rows.sort_by(|x, y| x.instance.cmp(&y.instance));
            v.instances = rows;
        }
        self.end.view.send_replace(Some(v));
    }

    /// What an operator is told when etcd did not answer a site request
    /// (the client's error is in the log).
    fn not_answered(&self) -> String {
        format!(
            "cluster: etcd ({}) did not answer within lease_s ({} s); nothing was changed",
            self.cfg.endpoints.join(", "),
            self.lease_s().as_secs_f64()
        )
    }

    /// A control request for the site: written to the site state.
    async fn site_request(&mut self, (req, reply): SiteReq) {
        self.write_sent = false;
        let r = match tokio::time::timeout(self.lease_s(), self.site_write(req)).await {
            Ok(r) => r,
            // Said only when it is so: a write etcd did not answer may still
            // be applied when etcd runs again.
            Err(_) if self.write_sent => Err(ControlError::Unavailable(
                "cluster: etcd did not answer the write within lease_s; it may still be applied when etcd answers: see status".into(),
            )),
            Err(_) => Err(ControlError::Unavailable(self.not_answered())),
        };
        let _ = reply.send(r);
    }

    async fn site_write(&mut self, req: ControlReq) -> Result<Reply, ControlError> {
        // What the operator is told; the client's error goes to the log.
        let said = self.not_answered();
        let unreachable = |e: String| {
            warn!(error = %e, "cluster: a site request failed on etcd");
            ControlError::Unavailable(said.clone())
        };
        let mut c = self.connect().await.map_err(unreachable)?;
        if let ControlReq::SetProtection { pattern, protected } = &req {
            // Counted here (the rules reach every instance through etcd).
            let local = self
                .curtailer
                .local(ControlReq::SetProtection { pattern: pattern.clone(), protected: *protected })
                .await?;
            let matched = match local {
                Reply::Matched(m) => m.matched,
                _ => 0,
            };
            return self.write_protection(&mut c, pattern, *protected, matched).await.map_err(unreachable);
        }
        for _ in 0..CAS_TRIES {
            let site = self.read(&mut c).await.map_err(unreachable)?;
            let clock = now_clock();
            let (mut book, _) = self.book(clock, site.state.as_ref().map(|(s, _)| s)).map_err(|e| {
                ControlError::Unavailable(format!(
                    "cluster: the site state in etcd cannot be used: {e}; nothing was changed"
                ))
            })?;
            let protection = site.state.as_ref().map(|(s, _)| s.protection.clone()).unwrap_or_default();
            let reply = match &req {
                ControlReq::SetBudget(b) => {
                    if b.scope != Scope::Site {
                        return Err(ControlError::InvalidParams(format!(
                            "cluster mode keeps one budget for the whole site: scope {:?} is not taken (use scope \"site\")",
                            b.scope.name()
                        )));
                    }
                    let mut plan = site::site_plan(&site.reports, b.amount, b.dry_run);
                    if b.dry_run {
                        return Ok(Reply::Plan(Box::new(plan)));
                    }
                    plan.plan_id = book.take_plan_id();
                    plan.lease_expires_in_s = b.lease.map(|l| l.as_secs_f64());
                    book.command(clock, b.clone(), None, plan.clone());
                    Reply::Plan(Box::new(plan))
                }
                ControlReq::ResumeAll { reason } => {
                    book.clear();
                    let _ = book.new_cause(reason.clone());
                    Reply::Resuming(Resuming { resuming: site.reports.iter().map(|r| r.parked).sum() })
                }
                ControlReq::Status { .. } | ControlReq::SetProtection { .. } => unreachable!("handled above"),
            };
            let s = site::saved(&book, protection, clock);
            self.write_sent = true;
            if self.cas_state(&mut c, site.state.as_ref().map(|(_, r)| *r), &s, 0).await.map_err(unreachable)? {
                info!(request = ?req, "cluster: site state written");
                return Ok(reply);
            }
        }
        Err(ControlError::Unavailable("cluster: the site state kept changing under this request; try again".into()))
    }

    async fn write_protection(
        &mut self,
        c: &mut Client,
        pattern: &str,
        protected: bool,
        matched: usize,
    ) -> Result<Reply, String> {
        for _ in 0..CAS_TRIES {
            let site = self.read(c).await?;
            let mut s = match &site.state {
                Some((s, _)) => s.clone(),
                None => site::saved(&Book::new(Vec::new()), Vec::new(), now_clock()),
            };
            // This instance's own rules (the site's) took it already.
            let rules: Vec<(String, bool)> = s.protection.iter().map(|r| (r.pattern.clone(), r.protected)).collect();
            s.protection = crate::curtail::fleet::set_rule(&rules, pattern, protected, true)?
                .into_iter()
                .map(|(pattern, protected)| SavedRule { pattern, protected })
                .collect();
            s.saved_at_ms = now_clock().unix_ms;
            self.write_sent = true;
            if self.cas_state(c, site.state.as_ref().map(|(_, r)| *r), &s, 0).await? {
                return Ok(Reply::Matched(Matched { matched }));
            }
        }
        Err("the site state kept changing under this request; try again".into())
    }
}

/// Start the agent for `curtailer` (which must carry the other end of
/// `end`'s link): it reaches etcd and takes up this instance's allotment
/// before it returns (for at most `lease_s`).
pub async fn start(
    cfg: ClusterConfig,
    name: String,
    curtail: &CurtailConfig,
    curtailer: Curtailer,
    end: LinkEnd,
) -> Result<JoinHandle<()>, String> {
    info!(site = %cfg.site, instance = %name, endpoints = ?cfg.endpoints, "cluster: joining the site");
    Ok(Agent::new(cfg, name, curtail, curtailer, end)?.start().await)
}
