//! One miner connection: a task that owns the socket and every piece of this
//! miner's state (extranonce lease, difficulty, duplicate sets, counters).
//!
//! `Session` is the state machine: `on_line`, `on_work`, `on_signal` and
//! `on_tick` are fed what happened and when, queue what the miner is sent,
//! and return what the task must do (`Next`). It never awaits, never reads
//! the clock and holds no handle to the rest of the proxy: a handshake step
//! that needs one (a route and a prefix on a pool connection, the route a
//! worker belongs on, the pool's answer about a worker, the curtailment
//! controller's word) comes back as `Next::Wait`; the task `fetch`es it with
//! the router and the controller it holds, and hands it back with `resume`.
//! `run`/`serve` are the I/O shell. Its tests are plain tables.

use super::dedup::{Insert, Seen};
use super::difficulty::MinerDifficulty;
use super::outbox::Outbox;
use super::signal::{Member, Membership, SessionCmd, Sessions};
use super::vardiff::Vardiff;
use super::DownstreamSettings;
use crate::api::MinerId;
use crate::config::WorkerMode;
use crate::curtail::{Curtailer, Registered};
use crate::share::{check_share, Difficulty, ShareError, ShareRules, Submission};
use crate::stats::{unix_ms, ProxyStats, StatsPair, WorkerInfo};
use crate::stratum::{self, code, encode, ClientRequest, Configure, Envelope, FrameError, LineCodec, Submit};
use crate::upstream::extranonce::Layout;
use crate::upstream::router::{Router, Seat};
use crate::upstream::{Lease, LeaseError, PoolExtranonce2, UpstreamSubmit, Work};
use bytes::BytesMut;
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tracing::{debug, error, info, warn};

/// What a line asks of the session's task, once its answer (if any) is in
/// the outbox. Returned by value, never stored: its size costs nothing per
/// miner, and a forwarded share is not boxed (no allocation per share).
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Nothing more.
    Done,
    /// A share, answered; nothing for the pool.
    Share,
    /// A share worth the pool's difficulty, answered: hand it to the lease.
    Forward(UpstreamSubmit),
    /// A handshake step that waits for something only the task can get:
    /// the task gets it (`fetch`) and hands it back (`Session::resume`).
    Wait(Box<Pending>),
}

/// A handshake request half done. Handshakes are rare, so this is boxed:
/// an idle miner's task does not carry its space.
struct Pending {
    /// The request's id, for its answer.
    id: Option<Box<RawValue>>,
    step: Step,
}

/// Where a handshake request is, and so what it waits for.
enum Step {
    /// Subscribe: waits for a route for the miner's address and a prefix
    /// there (the shell takes its seat on the route first).
    Subscribe { user_agent: Option<String> },
    /// A first authorize: waits for the route the worker belongs on
    /// (`here` is where it is).
    Route { name: Arc<str>, here: usize },
    /// Authorize found the worker belongs to route `to`: waits for the same
    /// prefix there (a move the miner does not see).
    MoveSame { name: Arc<str>, to: usize, prefix: u32, layout: Layout },
    /// ... or for any prefix there (the miner is sent a new extranonce).
    MoveAny { name: Arc<str>, to: usize },
    /// Waits for the pool's answer to this worker (per-worker modes).
    PoolAuthorize { name: Arc<str>, moved: bool },
    /// A first authorize: waits for the curtailment controller's word
    /// (parked or not).
    Register,
}

/// What a step waited for.
enum Got {
    /// The route for the address (None: none takes it), and a prefix there.
    Subscribe(Option<(usize, Result<Lease, LeaseError>)>),
    /// The route for the worker (None: none takes it).
    Route(Option<usize>),
    Lease(Result<Lease, LeaseError>),
    LeaseExact(Option<Lease>),
    PoolAuthorize(bool),
    /// Which miner it is and whether it is parked (None: the controller
    /// has stopped).
    Register(Option<Registered>),
}

/// What this miner was last sent, so work updates send only the difference.
#[derive(Default)]
struct Sent {
    session: u64,
    en1_epoch: u64,
    job_seq: u64,
    version_mask: Option<u32>,
    difficulty: Option<Difficulty>,
}

/// A prefix held on a pool connection, and what the miner was told of it.
struct Held {
    lease: Lease,
    /// The work of the lease's connection.
    work_rx: watch::Receiver<Arc<Work>>,
    extranonce1: Vec<u8>,
    /// The miner's prefix bytes inside the pool's extranonce2.
    prefix: Vec<u8>,
    en2_len: usize,
}

/// How far the handshake is. Subscribe and authorize come in either order
/// (some firmware authorizes first), so both halfway points exist; a miner
/// works once it has both. A prefix is held exactly while subscribed, so
/// no state holds work without a prefix or a prefix without its work.
enum Phase {
    Fresh,
    Subscribed(Held),
    /// Authorized as this worker, not subscribed yet.
    Named(Arc<str>),
    Working(Held, Arc<str>),
}

impl Phase {
    fn held(&self) -> Option<&Held> {
        match self {
            Phase::Subscribed(h) | Phase::Working(h, _) => Some(h),
            Phase::Fresh | Phase::Named(_) => None,
        }
    }
    fn held_mut(&mut self) -> Option<&mut Held> {
        match self {
            Phase::Subscribed(h) | Phase::Working(h, _) => Some(h),
            Phase::Fresh | Phase::Named(_) => None,
        }
    }
    fn worker(&self) -> Option<&Arc<str>> {
        match self {
            Phase::Named(w) | Phase::Working(_, w) => Some(w),
            Phase::Fresh | Phase::Subscribed(_) => None,
        }
    }
    fn authorized(&self) -> bool {
        self.worker().is_some()
    }
    /// Hold `h` (subscribed, or a new prefix); the one it replaces, if any.
    fn hold(&mut self, h: Held) -> Option<Held> {
        let (next, old) = match std::mem::replace(self, Phase::Fresh) {
            Phase::Fresh => (Phase::Subscribed(h), None),
            Phase::Named(w) => (Phase::Working(h, w), None),
            Phase::Subscribed(old) => (Phase::Subscribed(h), Some(old)),
            Phase::Working(old, w) => (Phase::Working(h, w), Some(old)),
        };
        *self = next;
        old
    }
    /// Authorized as `w` (again, perhaps under another name).
    fn name(&mut self, w: Arc<str>) {
        *self = match std::mem::replace(self, Phase::Fresh) {
            Phase::Fresh | Phase::Named(_) => Phase::Named(w),
            Phase::Subscribed(h) | Phase::Working(h, _) => Phase::Working(h, w),
        };
    }
}

pub struct Session {
    peer: SocketAddr,
    settings: Arc<DownstreamSettings>,
    phase: Phase,
    /// The miner's seat on its route (counted in its miners and hashrate),
    /// taken by the shell when the miner subscribes.
    seat: Option<Seat>,
    /// After a move between routes, the prefix held on the old connection.
    reserved: Option<Lease>,
    out: Outbox,
    extranonce_subscribed: bool,
    /// The name submitted upstream for this miner; None means the pool account.
    upstream_worker: Option<Arc<str>>,
    /// The mask the miner asked for in mining.configure.
    requested_mask: Option<u32>,
    /// Floors the miner asked for (minimum-difficulty, suggest_difficulty).
    miner_floor: Option<Difficulty>,
    /// The difficulty vardiff wants, before the pool cap and floors.
    desired: Difficulty,
    /// The difficulty in force, and what each open job's shares must meet.
    difficulty: MinerDifficulty,
    vardiff: Vardiff,
    sent: Sent,
    /// Per job seq: low 64 bits of each accepted share's hash.
    seen: Seen,
    pub stats: StatsPair,
    connected_at: Instant,
    /// Since when, and from what total of work, the hashrate is measured:
    /// from the connection, and again from each resume (time parked with
    /// no work would read as a slow miner).
    measured_from: (Instant, f64),
    closing: bool,
    /// Parked by curtailment: connected, answered, but given no work.
    parked: bool,
    session_id: u64,
    /// When the miner last sent a line.
    last_line: Instant,
    /// When the miner last had a share accepted (or authorized).
    last_valid: Instant,
    /// Shares refused since the last accepted one.
    invalid_run: u32,
    /// Has sent a request sluice knows (`limits.subscribe_timeout_s`).
    greeted: bool,
    /// Unparseable lines before authorize (`limits.handshake_strikes`).
    strikes: u32,
    /// Error answers in the current second since connecting
    /// (`limits.error_answers_per_s`): the second, and the count.
    error_second: u32,
    errors_answered: u32,
    /// Why sluice closes this connection, once it has decided to.
    close_reason: Option<&'static str>,
    dedup_warned: bool,
    /// Sent away by a stopping proxy: answering until the miner leaves.
    drain_until: Option<Instant>,
    /// What the workers API shows of this miner (the session writes it),
    /// and its command slot (the shell reads it).
    member: Arc<Member>,
}

static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A new session id (unique in this process).
pub fn next_id() -> u64 {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

impl Session {
    /// A new session for the miner `member` shows (the shell has it join
    /// the live sessions).
    pub fn new(
        peer: SocketAddr,
        settings: Arc<DownstreamSettings>,
        proxy: Arc<ProxyStats>,
        member: Arc<Member>,
        now: Instant,
    ) -> Self {
        let start = settings.start;
        member.info.difficulty.set(start.get());
        Session {
            peer,
            phase: Phase::Fresh,
            seat: None,
            reserved: None,
            out: Outbox::default(),
            extranonce_subscribed: false,
            upstream_worker: None,
            requested_mask: None,
            miner_floor: None,
            desired: start,
            difficulty: MinerDifficulty::new(start),
            vardiff: Vardiff::new(settings.vardiff, now.into_std()),
            sent: Sent::default(),
            seen: Seen::new(settings.dedup_entries),
            stats: StatsPair { worker: member.info.counters.clone(), proxy },
            connected_at: now,
            measured_from: (now, 0.0),
            closing: false,
            parked: false,
            session_id: member.info.session,
            last_line: now,
            last_valid: now,
            invalid_run: 0,
            greeted: false,
            strikes: 0,
            error_second: 0,
            errors_answered: 0,
            close_reason: None,
            dedup_warned: false,
            drain_until: None,
            settings,
            member,
        }
    }

    /// What the workers API shows of this miner.
    fn info(&self) -> &WorkerInfo {
        &self.member.info
    }

    fn worker(&self) -> Option<&Arc<str>> {
        self.phase.worker()
    }

    /// The route the miner is on (the first until it is placed).
    fn route(&self) -> usize {
        self.seat.as_ref().map_or(0, Seat::route)
    }

    fn live(&self) -> bool {
        matches!(self.phase, Phase::Working(..))
    }

    /// The version mask this miner may roll under the current work: what it
    /// asked for (or everything, if it never configured, as some Antminer
    /// S21 firmware does) intersected with what the pool granted.
    fn version_mask(&self, w: &Work) -> u32 {
        let pool = w.version_mask.unwrap_or(0);
        self.requested_mask.map_or(pool, |m| m & pool)
    }

    /// Handle one line, read at `now`: answer it in the outbox and say what
    /// is next (a share to forward, or a handshake step that waits).
    fn on_line(&mut self, line: &[u8], now: Instant) -> Next {
        // A whole line, not a trickle of bytes, counts as activity.
        self.last_line = now;
        let env = match Envelope::parse(line) {
            Ok(e) => e,
            Err(e) => {
                debug!(peer = %self.peer, "unparseable line: {e}");
                // Before authorize, garbage is a strike: scanners and
                // attackers are closed at once (one by default), with one
                // error line saying why.
                if !self.phase.authorized() {
                    self.strikes += 1;
                    if self.strikes >= self.settings.handshake_strikes {
                        encode::error(self.out.buf(), None, code::OTHER, "parse error; closing");
                        self.close("limits.handshake_strikes");
                        return Next::Done;
                    }
                }
                self.protocol_error(None, "parse error", now);
                return Next::Done;
            }
        };
        // A line without a method is a response to something we sent.
        if env.method.is_none() {
            return Next::Done;
        }
        let req = match ClientRequest::from_envelope(&env) {
            Ok(r) => r,
            Err(e) => {
                self.protocol_error(env.id, &e.to_string(), now);
                return Next::Done;
            }
        };
        let id = env.id;
        if !matches!(req, ClientRequest::Unknown(_)) {
            self.greeted = true;
        }
        match req {
            ClientRequest::Submit(s) => return self.on_submit(id, &s).map_or(Next::Share, Next::Forward),
            ClientRequest::Configure(c) => self.on_configure(id, &c),
            ClientRequest::Subscribe { user_agent, .. } => return self.on_subscribe(id, user_agent),
            ClientRequest::Authorize { user } => return self.on_authorize(id, user),
            ClientRequest::ExtranonceSubscribe => {
                self.extranonce_subscribed = true;
                encode::result(self.out.buf(), id, &true);
            }
            ClientRequest::SuggestDifficulty(d) => {
                encode::result(self.out.buf(), id, &true);
                if let Some(d) = Difficulty::new(d) {
                    self.miner_floor = Some(d);
                    self.desired = d;
                    self.update_difficulty();
                }
            }
            ClientRequest::Ping => encode::result(self.out.buf(), id, "pong"),
            ClientRequest::GetVersion => encode::result(self.out.buf(), id, stratum::USER_AGENT),
            ClientRequest::Unknown(m) => {
                debug!(peer = %self.peer, "unknown method {m}");
                self.protocol_error(id, "unknown method", now);
            }
        }
        Next::Done
    }

    /// Answer a request sluice cannot serve with an error, at most
    /// `limits.error_answers_per_s` a second to this connection; past it
    /// the line is dropped unanswered (a flood costs a read, not a write).
    fn protocol_error(&mut self, id: Option<&RawValue>, msg: &str, now: Instant) {
        let second = u32::try_from((now - self.connected_at).as_secs()).unwrap_or(u32::MAX);
        if second != self.error_second {
            self.error_second = second;
            self.errors_answered = 0;
        }
        if self.errors_answered >= self.settings.error_answers_per_s {
            return;
        }
        self.errors_answered += 1;
        encode::error(self.out.buf(), id, code::OTHER, msg);
    }

    /// Close this connection once its queued answers are out, for `reason`
    /// (a limit's key, or what ended it).
    fn close(&mut self, reason: &'static str) {
        self.closing = true;
        self.close_reason.get_or_insert(reason);
    }

    fn on_configure(&mut self, id: Option<&RawValue>, c: &Configure) {
        let mut result = serde_json::Map::new();
        for ext in &c.extensions {
            match ext.as_str() {
                "version-rolling" => {
                    let requested = c.version_rolling_mask.unwrap_or(0xffff_ffff);
                    self.requested_mask = Some(requested);
                    // Until a pool session says otherwise, grant what we ask pools for.
                    let held = self.phase.held();
                    let pool = held.and_then(|h| h.work_rx.borrow().version_mask).or(self.settings.version_mask);
                    let mask = requested & pool.unwrap_or(0);
                    result.insert("version-rolling".into(), (mask != 0).into());
                    result.insert("version-rolling.mask".into(), format!("{mask:08x}").into());
                    self.sent.version_mask = Some(mask);
                }
                "minimum-difficulty" => {
                    if let Some(d) = c.minimum_difficulty.and_then(Difficulty::new) {
                        self.miner_floor = Some(d);
                        self.desired = self.desired.max(d);
                        self.update_difficulty();
                    }
                    result.insert("minimum-difficulty".into(), true.into());
                }
                "subscribe-extranonce" => {
                    self.extranonce_subscribed = true;
                    result.insert("subscribe-extranonce".into(), true.into());
                }
                other => {
                    result.insert(other.into(), false.into());
                }
            }
        }
        encode::result(self.out.buf(), id, &result);
    }

    fn on_subscribe(&mut self, id: Option<&RawValue>, user_agent: Option<String>) -> Next {
        if let Some(h) = self.phase.held() {
            // A repeated subscribe gets the same answer.
            let sid = session_id(h);
            encode::subscribe_result(self.out.buf(), id, &sid, &h.extranonce1, h.en2_len);
            return Next::Done;
        }
        wait(id, Step::Subscribe { user_agent })
    }

    fn subscribed_with(&mut self, id: Option<&RawValue>, user_agent: Option<String>, lease: Lease, route: usize) {
        self.adopt_lease(lease, route);
        if let Some(a) = user_agent.clone() {
            let _ = self.info().user_agent.set(a);
        }
        let h = self.phase.held().expect("a prefix was just adopted");
        let sid = session_id(h);
        encode::subscribe_result(self.out.buf(), id, &sid, &h.extranonce1, h.en2_len);
        debug!(peer = %self.peer, agent = ?user_agent, extranonce1 = %hex::encode(&h.extranonce1), "subscribed");
    }

    /// No prefix could be had: tell the miner to try again, and close.
    fn no_lease(&mut self, id: Option<&RawValue>, route: usize, e: &LeaseError) {
        warn!(peer = %self.peer, route, "cannot take miner: {e}");
        encode::error(self.out.buf(), id, code::OTHER, "no pool available, try again");
        self.closing = true;
    }

    /// Carry on with a handshake request once its step has what it waited
    /// for; a further step to wait for, if any.
    fn resume(&mut self, p: Pending, got: Got) -> Option<Box<Pending>> {
        let id = p.id.as_deref();
        let next = match (p.step, got) {
            (Step::Subscribe { .. }, Got::Subscribe(None)) => {
                encode::error(self.out.buf(), id, code::OTHER, "no pool route for this address");
                self.closing = true;
                Next::Done
            }
            (Step::Subscribe { user_agent }, Got::Subscribe(Some((route, r)))) => {
                match r {
                    Ok(lease) => self.subscribed_with(id, user_agent, lease, route),
                    Err(e) => self.no_lease(id, route, &e),
                }
                Next::Done
            }
            (Step::Route { .. }, Got::Route(None)) => {
                encode::error(self.out.buf(), id, code::UNAUTHORIZED, "no pool route for this worker");
                self.closing = true;
                Next::Done
            }
            (Step::Route { name, here }, Got::Route(Some(to))) if to != here => {
                // Best: the same prefix on the other route, nothing to tell the miner.
                let at = self.phase.held().and_then(|h| Some((h.lease.prefix, h.work_rx.borrow().layout?)));
                match at {
                    Some((prefix, layout)) => wait(id, Step::MoveSame { name, to, prefix, layout }),
                    None => self.move_with_new_prefix(id, name, to),
                }
            }
            (Step::Route { name, .. }, Got::Route(Some(_))) => self.authorize_pool(id, name, false),
            (Step::MoveSame { name, to, .. }, Got::LeaseExact(Some(lease))) => {
                info!(peer = %self.peer, worker = %name, route = to, "miner moved to its route");
                // Keep the prefix on the old connection too, so it is not
                // handed to a miner that may follow this one here.
                self.reserved = self.adopt_lease(lease, to);
                self.authorize_pool(id, name, false)
            }
            (Step::MoveSame { name, to, .. }, Got::LeaseExact(None)) => self.move_with_new_prefix(id, name, to),
            (Step::MoveAny { to, .. }, Got::Lease(Err(e))) => {
                self.no_lease(id, to, &e);
                Next::Done
            }
            (Step::MoveAny { name, to }, Got::Lease(Ok(lease))) => {
                self.adopt_lease(lease, to);
                self.authorize_pool(id, name, true)
            }
            (Step::PoolAuthorize { name, moved }, Got::PoolAuthorize(ok)) => {
                if ok {
                    self.upstream_worker = Some(name.clone());
                }
                self.authorized_as(id, name, ok, moved)
            }
            (Step::Register, Got::Register(parked)) => {
                self.registered_as(parked);
                Next::Done
            }
            (_, _) => unreachable!("a handshake step resumed with what another step waits for"),
        };
        match next {
            Next::Wait(p) => Some(p),
            _ => None,
        }
    }

    /// Take `lease` (on route `route`) as this miner's prefix; the prefix
    /// it held before, if any.
    fn adopt_lease(&mut self, lease: Lease, route: usize) -> Option<Lease> {
        let work_rx = lease.work();
        let held = {
            let w = work_rx.borrow();
            let layout = w.layout.expect("a lease is only given on a connection with a layout");
            self.sent.session = w.session;
            self.sent.en1_epoch = w.en1_epoch;
            Held {
                extranonce1: lease.extranonce1(&w),
                prefix: lease.prefix_bytes(&w),
                en2_len: layout.miner_en2_len,
                lease,
                work_rx: work_rx.clone(),
            }
        };
        self.info().upstream.store(held.lease.conn.id, Ordering::Relaxed);
        self.seen.clear();
        // This miner's count and hashrate go with it.
        if let Some(seat) = &mut self.seat {
            seat.move_to(route);
        }
        self.phase.hold(held).map(|old| old.lease)
    }

    fn on_authorize(&mut self, id: Option<&RawValue>, user: String) -> Next {
        if !self.settings.worker_allowed(&user) {
            warn!(peer = %self.peer, worker = %user, limit = "access.workers", "worker not on the allow-list");
            encode::error(self.out.buf(), id, code::UNAUTHORIZED, "worker not allowed (access.workers)");
            return Next::Done;
        }
        let name: Arc<str> = user.into();
        // Now that the worker is known: is the miner on the right route?
        if let Phase::Subscribed(_) = self.phase {
            return wait(id, Step::Route { name, here: self.route() });
        }
        self.authorize_pool(id, name, false)
    }

    /// The miner belongs on route `to` and its prefix is taken there.
    fn move_with_new_prefix(&mut self, id: Option<&RawValue>, name: Arc<str>, to: usize) -> Next {
        if self.extranonce_subscribed {
            return wait(id, Step::MoveAny { name, to });
        }
        // It cannot be told a new extranonce: answer, and ask it to come
        // back; its address now maps to the route.
        info!(peer = %self.peer, worker = %name, route = to, "miner belongs to another route; asking it to reconnect");
        encode::result(self.out.buf(), id, &true);
        self.send_away();
        Next::Done
    }

    /// Ask the pool about this worker, where the mode says so.
    fn authorize_pool(&mut self, id: Option<&RawValue>, name: Arc<str>, moved: bool) -> Next {
        match self.settings.mode {
            WorkerMode::PoolAccount => self.authorized_as(id, name, true, moved),
            WorkerMode::PerWorker | WorkerMode::Passthrough if self.phase.held().is_some() => {
                wait(id, Step::PoolAuthorize { name, moved })
            }
            WorkerMode::PerWorker | WorkerMode::Passthrough => {
                encode::error(self.out.buf(), id, code::NOT_SUBSCRIBED, "subscribe first");
                Next::Done
            }
        }
    }

    /// Answer an authorize; a first one then waits for the curtailment
    /// controller's word.
    fn authorized_as(&mut self, id: Option<&RawValue>, name: Arc<str>, ok: bool, moved: bool) -> Next {
        encode::result(self.out.buf(), id, &ok);
        if !ok {
            info!(peer = %self.peer, worker = %name, "pool refused worker");
            return Next::Done;
        }
        if let (true, Some(h)) = (moved, self.phase.held()) {
            encode::set_extranonce(self.out.buf(), &h.extranonce1, h.en2_len);
        }
        let first = !self.phase.authorized();
        let _ = self.info().worker.set(name.clone());
        self.phase.name(name);
        if first {
            return wait(None, Step::Register);
        }
        Next::Done
    }

    /// The curtailment miner id, once registered.
    fn miner(&self) -> Option<MinerId> {
        match self.info().miner.load(Ordering::Relaxed) {
            0 => None,
            id => Some(MinerId(id)),
        }
    }

    fn registered_as(&mut self, r: Option<Registered>) {
        let parked = r.is_some_and(|r| r.parked);
        if let Some(r) = r {
            self.info().miner.store(r.miner.0, Ordering::Relaxed);
        }
        self.parked = parked;
        self.info().parked.store(parked, Ordering::Relaxed);
        if parked {
            info!(peer = %self.peer, worker = ?self.worker(), "miner is parked by curtailment: connected, no work");
        }
        if self.live() {
            debug!(peer = %self.peer, worker = ?self.worker(), "miner ready");
            self.on_work();
        }
    }

    /// Apply the pool's cap and the floors to what vardiff wants, and send a
    /// new difficulty if it changed.
    fn update_difficulty(&mut self) {
        let pool = self.phase.held().map(|h| h.work_rx.borrow().pool_difficulty);
        let floor = self.miner_floor.map_or(self.settings.vardiff.min, |f| f.max(self.settings.vardiff.min));
        let mut d = self.desired.min(self.settings.vardiff.max);
        // Never ask more of a miner than the pool does: a share between the
        // two would be worth credit at the pool and be refused here.
        if let Some(p) = pool {
            d = d.min(p);
        }
        let d = d.max(floor);
        if self.difficulty.set(d, self.sent.job_seq) {
            self.info().difficulty.set(d.get());
        }
        if self.live() && self.sent.difficulty != Some(d) {
            encode::set_difficulty(self.out.buf(), d);
            self.sent.difficulty = Some(d);
        }
    }

    /// The pool connection published new work: send this miner what changed.
    fn on_work(&mut self) {
        let Some(h) = self.phase.held_mut() else {
            return;
        };
        let w = h.work_rx.borrow_and_update().clone();
        if !self.live() || self.parked {
            return;
        }
        let Phase::Working(h, _) = &mut self.phase else { return };
        if w.alloc_epoch != h.lease.epoch {
            // The pool's extranonce space no longer fits this miner's prefix.
            info!(peer = %self.peer, "pool extranonce changed shape; asking the miner to reconnect");
            return self.send_away();
        }
        if w.en1_epoch != self.sent.en1_epoch {
            let en1 = h.lease.extranonce1(&w);
            if !self.extranonce_subscribed {
                return self.send_away();
            }
            encode::set_extranonce(self.out.buf(), &en1, h.en2_len);
            h.extranonce1 = en1;
            self.sent.en1_epoch = w.en1_epoch;
        }
        if self.requested_mask.is_some() {
            let m = self.version_mask(&w);
            if w.version_mask.is_some() && self.sent.version_mask != Some(m) {
                encode::set_version_mask(self.out.buf(), m);
                self.sent.version_mask = Some(m);
            }
        }
        self.update_difficulty();
        if self.sent.difficulty.is_none() {
            let d = self.difficulty.current();
            encode::set_difficulty(self.out.buf(), d);
            self.sent.difficulty = Some(d);
        }
        if let Some(job) = w.latest() {
            if job.seq != self.sent.job_seq {
                // A clean job we never sent means the miner must drop its work.
                let line = if w.clean_seq > self.sent.job_seq { &job.notify_clean } else { &job.notify };
                self.out.push_shared(line);
                self.sent.job_seq = job.seq;
            }
        }
        self.sent.session = w.session;
        if self.seen.jobs() > w.jobs.len() {
            self.seen.retain_jobs(|seq| w.jobs.iter().any(|j| j.seq == seq));
        }
        if let Some(oldest) = w.jobs.iter().map(|j| j.seq).min() {
            self.difficulty.forget_before(oldest);
        }
    }

    fn send_away(&mut self) {
        encode::notification(self.out.buf(), "client.reconnect", &[(); 0]);
        self.closing = true;
    }

    /// Check a share and answer the miner. A share for the pool is returned,
    /// so the run loop can flush the answer before waiting on the upstream
    /// queue.
    fn on_submit(&mut self, id: Option<&RawValue>, s: &Submit<'_>) -> Option<UpstreamSubmit> {
        // A refusal: counted, answered, logged. Fields by name, not a
        // method, so the borrow of the held prefix below stays valid.
        macro_rules! reject {
            ($e:expr) => {{
                let e: &ShareError = &$e;
                self.stats.rejected();
                self.invalid_run = self.invalid_run.saturating_add(1);
                self.stats.proxy.metrics.share(self.phase.worker().map(|w| &**w), false, e.reason());
                encode::error(self.out.buf(), id, e.code(), &e.to_string());
                debug!(peer = %self.peer, worker = ?self.phase.worker(), reason = e.reason(), "share rejected");
                return None;
            }};
        }
        let h = match &self.phase {
            Phase::Working(h, _) => h,
            Phase::Fresh | Phase::Named(_) => {
                self.stats.rejected();
                self.stats.proxy.metrics.share(None, false, "not-subscribed");
                encode::error(self.out.buf(), id, code::NOT_SUBSCRIBED, "not subscribed");
                return None;
            }
            Phase::Subscribed(_) => {
                self.stats.rejected();
                self.stats.proxy.metrics.share(None, false, "unauthorized");
                encode::error(self.out.buf(), id, code::UNAUTHORIZED, "unauthorized worker");
                return None;
            }
        };
        let w = h.work_rx.borrow().clone();
        let Some((job, stale)) = w.job(&s.job_id) else { reject!(ShareError::UnknownJob) };
        let job = job.clone();
        let mut en2 = [0u8; 32];
        let en2_len = s.extranonce2.len() / 2;
        if !s.extranonce2.len().is_multiple_of(2)
            || en2_len > 32
            || hex::decode_to_slice(s.extranonce2, &mut en2[..en2_len]).is_err()
        {
            reject!(ShareError::Malformed("extranonce2"));
        }
        let (Some(ntime), Some(nonce)) = (stratum::hex_u32(s.ntime), stratum::hex_u32(s.nonce)) else {
            reject!(ShareError::Malformed("ntime or nonce"))
        };
        let version_bits = match s.version_bits.map(stratum::hex_u32) {
            Some(None) => reject!(ShareError::Malformed("version bits")),
            Some(Some(v)) => Some(v),
            None => None,
        };
        let (target, credited) = self.difficulty.for_job(job.seq);
        let rules = ShareRules {
            target,
            version_mask: self.version_mask(&w),
            ntime_max_forward: self.settings.ntime_max_forward,
        };
        let sub = Submission { extranonce2: &en2[..en2_len], ntime, nonce, version_bits };
        let v = match check_share(&job.template, &h.extranonce1, h.en2_len, &sub, &rules) {
            Ok(v) => v,
            Err(e) => reject!(e),
        };
        // A share on a job superseded by clean_jobs is stale, unless it
        // solves a block on the tip the pool is still mining on.
        let on_tip = w.latest().is_some_and(|l| l.template.prevhash == job.template.prevhash);
        if stale && !(v.is_block && on_tip) {
            reject!(ShareError::Stale);
        }
        match self.seen.insert(job.seq, v.hash.low_u64()) {
            Insert::New => {}
            Insert::Duplicate => reject!(ShareError::Duplicate),
            Insert::Full => {
                if !self.dedup_warned {
                    self.dedup_warned = true;
                    warn!(peer = %self.peer, worker = ?self.phase.worker(), limit = "limits.dedup_entries_per_miner",
                        "too many shares on open jobs; refusing shares until a job closes or the difficulty rises");
                }
                reject!(ShareError::TooManyShares);
            }
        }
        encode::result(self.out.buf(), id, &true);
        self.stats.valid();
        self.invalid_run = 0;
        // The time the line was read: no second clock read per share.
        self.last_valid = self.last_line;
        self.stats.proxy.metrics.share(self.phase.worker().map(|w| &**w), true, "");
        self.info().last_share_ms.store(unix_ms(), Ordering::Relaxed);
        self.stats.work(credited.get());
        if v.is_block {
            self.stats.blocks();
            self.stats.proxy.metrics.blocks.inc();
            error!(target: crate::BLOCK_LOG, peer = %self.peer, worker = ?self.phase.worker(), hash = %v.hash, header = %hex::encode(v.header),
                coinbase_extranonce1 = %hex::encode(&h.extranonce1), extranonce2 = %s.extranonce2, "BLOCK SOLUTION from miner");
        }
        // The easier of the pool's targets when the job came and now (both
        // computed once, not per share).
        let pool_target = job.pool_target.max(w.pool_target);
        let forward = (v.is_block || pool_target.is_met_by(&v.hash)).then(|| {
            PoolExtranonce2::new(job.pad_len, &h.prefix, &en2[..en2_len]).expect("sizes bounded by the layout")
        });
        // The time the line was read: no clock read per share.
        if let Some(d) = self.vardiff.on_share(self.last_line.into_std(), credited, self.difficulty.current()) {
            self.desired = d;
            self.update_difficulty();
        }
        let extranonce2 = forward?;
        // Counted here, before the miner's answer goes out, so that
        // `forwarded` never lags what a miner has seen accepted: every
        // forwarded share then ends accepted, rejected or unanswered.
        self.stats.forwarded();
        Some(UpstreamSubmit {
            job,
            worker: self.upstream_worker.clone(),
            extranonce2,
            ntime,
            nonce,
            version: v.version,
            hash: v.hash,
            header: v.header,
            is_block: v.is_block,
            stats: self.stats.clone(),
            attempt: 0,
        })
    }

    /// A command from the curtailment controller, or the proxy stopping.
    fn on_signal(&mut self, cmd: SessionCmd, now: Instant) {
        match cmd {
            // Graceful shutdown: ask the miner to reconnect (to another
            // instance, behind a balancer) after its queued answers go out.
            // Keep answering what the miner sent before it reads this, so no
            // share in flight is dropped; it closes, or DRAIN runs out.
            SessionCmd::Shutdown => {
                encode::notification(self.out.buf(), "client.reconnect", &[(); 0]);
                self.drain_until = Some(now + DRAIN);
            }
            SessionCmd::Park => {
                info!(peer = %self.peer, worker = ?self.worker(), "parked by curtailment; closing the session");
                self.parked = true;
                self.info().parked.store(true, Ordering::Relaxed);
                self.closing = true;
                self.stats.proxy.sessions_parked.fetch_add(1, Ordering::Relaxed);
            }
            SessionCmd::Resume => {
                if self.parked {
                    self.measured_from = (now, self.stats.worker.work.get());
                }
                self.parked = false;
                self.info().parked.store(false, Ordering::Relaxed);
                // Send difficulty and a clean job as to a new miner.
                self.sent.job_seq = 0;
                self.sent.difficulty = None;
                self.on_work();
            }
        }
    }

    /// Every few seconds: measure, retarget, and enforce the time limits.
    /// Returns the limit broken, if any.
    fn on_tick(&mut self, now: Instant) -> Result<(), &'static str> {
        if !self.live() {
            let since = now - self.connected_at;
            if !self.greeted && since >= self.settings.subscribe_timeout {
                return Err("limits.subscribe_timeout_s");
            }
            if since >= self.settings.handshake_timeout {
                return Err("limits.handshake_timeout_s");
            }
            return Ok(());
        }
        // A parked miner gets no work, so silence is expected of it.
        if !self.parked && now - self.last_line >= self.settings.idle_timeout {
            return Err("limits.idle_timeout_s");
        }
        if self.invalid_run > 0 && now - self.last_valid >= self.settings.invalid_window {
            return Err("limits.invalid_share_window_s");
        }
        let (from, work_then) = self.measured_from;
        let secs = (now - from).as_secs_f64();
        if secs > 0.0 {
            let hr = (self.stats.worker.work.get() - work_then).max(0.0) * crate::share::HASHES_PER_DIFF1 / secs;
            self.info().hashrate.set(hr);
            if let Some(seat) = &mut self.seat {
                seat.set_hashrate(hr);
            }
            if let Some(h) = self.phase.held() {
                h.lease.set_hashrate(hr);
            }
        }
        if let Some(d) = self.vardiff.on_tick(now.into_std(), self.difficulty.current()) {
            self.desired = d;
            self.update_difficulty();
        }
        Ok(())
    }

    /// When to call `on_tick` next: the handshake's deadlines while the
    /// miner is not subscribed and authorized (one timer each, so a silent
    /// connection costs no wake-ups until its deadline), then every tick.
    fn next_tick(&self, now: Instant) -> Instant {
        if let Some(t) = self.drain_until {
            return t;
        }
        if !self.live() {
            let limit = if self.greeted {
                self.settings.handshake_timeout
            } else {
                self.settings.subscribe_timeout.min(self.settings.handshake_timeout)
            };
            return self.connected_at + limit;
        }
        now + self.settings.tick
    }
}

/// The subscription id a miner is given: its connection and prefix.
fn session_id(h: &Held) -> String {
    format!("{:x}{:08x}", h.lease.conn.id, h.lease.prefix)
}

/// A handshake step to wait for.
fn wait(id: Option<&RawValue>, step: Step) -> Next {
    Next::Wait(Box::new(Pending { id: id.map(RawValue::to_owned), step }))
}

/// The handles a session's task holds for it: the proxy's routes, the
/// curtailment controller, its place among the live sessions and under the
/// connection limits. The session itself holds none of them.
struct Handles {
    router: Arc<Router>,
    curtailer: Curtailer,
    membership: Membership,
    _permit: super::ConnPermit,
}

/// Get what a handshake step waits for: the only awaits of a handshake.
async fn fetch(s: &mut Session, with: &Handles, step: &Step) -> Got {
    let wait = s.settings.lease_wait;
    let router = &with.router;
    match step {
        Step::Subscribe { .. } => {
            let Some(route) = router.for_connect(s.peer.ip()) else { return Got::Subscribe(None) };
            // Count the miner on its route now, not once the pool
            // connection is up: a fleet connecting at once is then split by
            // the weights rather than sent wholesale to whichever route
            // looked emptiest first.
            s.seat.get_or_insert_with(|| router.seat(route));
            let lease = router.routes[route].hub.lease(wait).await;
            if let Err(e) = &lease {
                warn!(peer = %s.peer, route = %router.routes[route].name, "no prefix for a subscribing miner: {e}");
            }
            Got::Subscribe(Some((route, lease)))
        }
        Step::Route { name, here } => Got::Route(router.for_worker(s.peer.ip(), name, *here)),
        Step::MoveAny { to, .. } => Got::Lease(router.routes[*to].hub.lease(wait).await),
        Step::MoveSame { to, prefix, layout, .. } => {
            Got::LeaseExact(router.routes[*to].hub.lease_exact(*prefix, *layout, wait).await)
        }
        Step::PoolAuthorize { name, .. } => Got::PoolAuthorize(match s.phase.held() {
            Some(h) => h.lease.authorize(name.clone()).await,
            None => false,
        }),
        Step::Register => Got::Register(with.curtailer.register(s.member.clone()).await),
    }
}

/// Carry a handshake request through every step it waits for.
async fn handshake(s: &mut Session, with: &Handles, mut p: Box<Pending>) {
    loop {
        let got = fetch(s, with, &p.step).await;
        match s.resume(*p, got) {
            Some(next) => p = next,
            None => return,
        }
    }
}

/// The held prefix's connection published new work (false: it has gone).
async fn changed(phase: &mut Phase) -> bool {
    match phase.held_mut() {
        Some(h) => h.work_rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// A miner's connection and everything its task carries between wake-ups.
struct Conn {
    stream: TcpStream,
    codec: LineCodec,
    /// Read buffer: exists only while bytes are waiting.
    rbuf: BytesMut,
    s: Session,
    with: Handles,
}

/// Serve one miner until it leaves, breaks a limit, or is sent away.
///
/// The task starts on the gate thread (see `downstream::Gate`): it runs
/// there until the miner has authorized, then moves, socket and state, to
/// `main`, the runtime that serves working miners. Connections that never
/// authorize (scanners, garbage, slowloris) never share a worker with
/// working miners.
///
/// The read buffer exists only while bytes are waiting: an idle miner holds
/// none, and a job reaches it straight from the shared notify bytes.
///
/// Not an `async fn`: its arguments would be stored twice in the task, and
/// every byte here is paid once per connected miner.
#[allow(clippy::too_many_arguments)]
pub fn run(
    stream: TcpStream,
    permit: super::ConnPermit,
    peer: SocketAddr,
    settings: Arc<DownstreamSettings>,
    router: Arc<Router>,
    proxy: Arc<ProxyStats>,
    curtailer: Curtailer,
    sessions: Arc<Sessions>,
    main: tokio::runtime::Handle,
) -> impl std::future::Future<Output = ()> + Send {
    let _ = stream.set_nodelay(true);
    proxy.miners_connected.fetch_add(1, Ordering::Relaxed);
    let codec = LineCodec::new(settings.max_line);
    let membership = sessions.join(WorkerInfo::new(next_id(), peer));
    let s = Session::new(peer, settings, proxy, membership.member.clone(), Instant::now());
    let with = Handles { router, curtailer, membership, _permit: permit };
    let mut c = Conn { stream, codec, rbuf: BytesMut::new(), s, with };
    async move {
        if !serve(&mut c, true).await {
            return finish(&c.s, &c.with).await;
        }
        // Authorized: re-register the socket with the main runtime's reactor
        // (two epoll_ctl calls) and carry on there. The new task is built
        // here so that it holds the session once, not a captured copy and a
        // rebuilt one.
        let Conn { stream, codec, rbuf, s, with } = c;
        let stream = stream.into_std().and_then(|std| {
            let _in_main = main.enter();
            TcpStream::from_std(std)
        });
        match stream {
            Ok(stream) => {
                let mut c = Conn { stream, codec, rbuf, s, with };
                main.spawn(async move {
                    serve(&mut c, false).await;
                    finish(&c.s, &c.with).await;
                });
            }
            Err(e) => {
                warn!(peer = %s.peer, "cannot move an authorized miner to the main runtime: {e}");
                finish(&s, &with).await;
            }
        }
    }
}

/// The session loop. On the gate (`gate` set) it returns true once the
/// miner has authorized (the caller moves it); otherwise, and on the main
/// runtime, it returns false when the connection is over.
async fn serve(c: &mut Conn, gate: bool) -> bool {
    let Conn { stream, codec, rbuf, s, with } = c;
    let peer = s.peer;
    let mut tick = Box::pin(tokio::time::sleep_until(s.next_tick(Instant::now())));
    'conn: loop {
        let mut forward = Vec::new();
        tokio::select! {
            r = stream.readable() => {
                if r.is_err() {
                    break;
                }
                // A long partial line (up to the limit) is read in
                // growing chunks, not 512 bytes at a time.
                rbuf.reserve(READ_CHUNK.max(rbuf.len()));
                match stream.try_read_buf(rbuf) {
                    Ok(0) => {
                        s.close_reason.get_or_insert(LEFT);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        debug!(peer = %peer, "read error: {e}");
                        s.close_reason.get_or_insert(LEFT);
                        break;
                    }
                }
                loop {
                    match codec.decode(rbuf) {
                        Ok(Some(line)) => {
                            let now = Instant::now();
                            let next = s.on_line(&line, now);
                            if matches!(next, Next::Share | Next::Forward(_)) {
                                s.stats.proxy.metrics.submit_answer_seconds.observe(now.elapsed().as_secs_f64());
                            }
                            match next {
                                Next::Done | Next::Share => {}
                                Next::Forward(up) => forward.push(up),
                                // Boxed: rare, and its future is large.
                                Next::Wait(p) => Box::pin(handshake(s, with, p)).await,
                            }
                        }
                        Ok(None) => break,
                        Err(FrameError::LineTooLong(_)) => {
                            s.close_reason.get_or_insert("limits.max_line_bytes");
                            break 'conn;
                        }
                        Err(e) => {
                            debug!(peer = %peer, "read error: {e}");
                            s.close_reason.get_or_insert(LEFT);
                            break 'conn;
                        }
                    }
                    if s.closing {
                        break;
                    }
                }
                if rbuf.is_empty() {
                    *rbuf = BytesMut::new();
                }
            }
            cmd = with.membership.member.signal.recv() => s.on_signal(cmd, Instant::now()),
            ok = changed(&mut s.phase) => {
                if !ok { s.send_away(); } else { s.on_work(); }
            }
            _ = &mut tick => {
                let now = Instant::now();
                if s.drain_until.is_some_and(|t| now >= t) {
                    s.close_reason.get_or_insert(DRAINED);
                    break;
                }
                if let Err(limit) = s.on_tick(now) {
                    s.close_reason.get_or_insert(limit);
                    break;
                }
                tick.as_mut().reset(s.next_tick(now));
            }
        }
        let mut gone = false;
        if !s.out.is_empty() {
            match tokio::time::timeout(s.settings.write_timeout, s.out.flush(stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    s.close_reason.get_or_insert(LEFT);
                    gone = true;
                }
                Err(_) => {
                    s.close_reason.get_or_insert("limits.write_timeout_s");
                    gone = true;
                }
            }
        }
        // Valid work goes to the pool even when its miner has gone: it is
        // worth credit, and it is already counted as forwarded.
        if let Some(h) = s.phase.held() {
            let lease = &h.lease;
            for up in forward {
                // Boxed: rare (shares worth the pool's difficulty), and large.
                Box::pin(lease.submit(up)).await;
            }
        }
        if gone || s.closing {
            break;
        }
        if let Some(t) = s.drain_until {
            tick.as_mut().reset(t);
        }
        if gate && s.phase.authorized() {
            return true;
        }
    }
    closed(s);
    false
}

/// Why a connection ended, when sluice did not close it for a limit.
const LEFT: &str = "miner";
const DRAINED: &str = "drained";
/// Closed by sluice for another reason: no pool, a refused worker, parked
/// by curtailment with no firmware control, sent away (see the log above it).
const PROXY: &str = "proxy";

/// Count why a connection ended (`sluice_miner_connections_closed_total`)
/// and say so: at warn for a miner that had authorized, one line per
/// connection; connections that never authorized (scanners, garbage,
/// attackers: the gate's business) are summed into one line a second at
/// most, so a flood of them cannot flood the log.
fn closed(s: &Session) {
    let reason = s.close_reason.unwrap_or(PROXY);
    s.stats.proxy.metrics.closed(reason);
    let what = match reason {
        "limits.handshake_strikes" => "sent lines that are not JSON-RPC before authorizing",
        "limits.subscribe_timeout_s" => "sent no request sluice knows in time",
        "limits.handshake_timeout_s" => "did not subscribe and authorize in time",
        "limits.idle_timeout_s" => "sent nothing for too long",
        "limits.invalid_share_window_s" => "submitted only invalid shares for too long",
        "limits.max_line_bytes" => "sent a line longer than the limit",
        "limits.write_timeout_s" => "stopped reading",
        _ => return,
    };
    if s.phase.authorized() {
        warn!(peer = %s.peer, worker = ?s.worker(), limit = reason, "{what}; closing this miner");
    } else {
        debug!(peer = %s.peer, limit = reason, "{what}; closing this connection");
        s.stats.proxy.gate_closes.count(reason);
    }
}

/// The miner has gone: leave the registries it was counted in.
async fn finish(s: &Session, with: &Handles) {
    let peer = s.peer;
    if let Some(miner) = s.miner() {
        Box::pin(with.curtailer.deregister(miner, s.session_id)).await;
    }
    s.stats.proxy.miners_connected.fetch_sub(1, Ordering::Relaxed);
    debug!(peer = %peer, "miner disconnected");
}

/// How long a session sent away at shutdown keeps answering its miner.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes read per readiness event (more wait for the next one). A Stratum
/// line from a miner is 100 to 300 bytes; a longer one grows the buffer.
const READ_CHUNK: usize = 512;

#[cfg(test)]
mod tests {
    //! The session fed lines, work and what its handshake steps waited for,
    //! no socket, no runtime and no clock: a pool connection fed by hand
    //! (`upstream::testing`), and the bytes the session queues for its
    //! miner. Plain `#[test]` tables.

    use super::*;
    use crate::config::Config;
    use crate::share::sha256d_header;
    use crate::upstream::testing::{router_with, FakePool};
    use serde_json::{json, Value};

    struct Rig {
        s: Session,
        pool: FakePool,
        next_id: u64,
        /// Lines other than answers, as `call` met them.
        notes: Vec<Value>,
    }

    /// A subscribed, authorized miner at difficulty `start`, its pool at
    /// `pool_diff`, sent job j1.
    /// A session as a new connection has it (id 1).
    fn session(settings: DownstreamSettings) -> Session {
        let peer = "127.0.0.1:5000".parse().unwrap();
        let member = Arc::new(Member { info: WorkerInfo::new(1, peer), signal: Default::default() });
        Session::new(peer, Arc::new(settings), Arc::new(ProxyStats::default()), member, Instant::now())
    }

    fn rig(start: f64, pool_diff: f64) -> Rig {
        let mut cfg = Config::default();
        cfg.difficulty.start = start;
        cfg.difficulty.min = start / 1000.0;
        let mut pool = FakePool::new(pool_diff);
        pool.notify("j1", 1, true);
        let mut s = session(DownstreamSettings::from_config(&cfg));
        s.adopt_lease(pool.lease(), 0);
        s.phase.name("w".into());
        s.greeted = true;
        s.on_work();
        let mut r = Rig { s, pool, next_id: 1, notes: Vec::new() };
        r.sent();
        r
    }

    impl Rig {
        /// The lines queued for the miner since the last call.
        fn sent(&mut self) -> Vec<Value> {
            let bytes = std::mem::take(self.s.out.buf());
            bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
        }

        /// Send a request line; its answer, and whether a share was forwarded.
        fn call(&mut self, method: &str, params: Value) -> (Value, bool) {
            let id = self.next_id;
            self.next_id += 1;
            let line = json!({"id": id, "method": method, "params": params}).to_string();
            let forwarded = matches!(self.s.on_line(line.as_bytes(), Instant::now()), Next::Forward(_));
            let (mut answer, notes): (Vec<Value>, Vec<Value>) = self.sent().into_iter().partition(|v| v["id"] == id);
            self.notes.extend(notes);
            (answer.pop().expect("an answer"), forwarded)
        }

        /// An extranonce2 and nonce for the newest job whose hash meets
        /// difficulty `meet` and, if given, not `fail`.
        fn grind(&self, seed: u64, meet: f64, fail: Option<f64>) -> (String, String) {
            let h = self.s.phase.held().unwrap();
            let w = h.work_rx.borrow().clone();
            let job = &w.latest().unwrap().template;
            let (meet, fail) =
                (Difficulty::new(meet).unwrap().to_target(), fail.map(|f| Difficulty::new(f).unwrap().to_target()));
            let mut en2 = vec![0u8; h.en2_len];
            en2[..8.min(h.en2_len)].copy_from_slice(&seed.to_be_bytes()[8 - 8.min(h.en2_len)..]);
            let root = job.merkle_root(&h.extranonce1, &en2);
            for nonce in 0u32.. {
                let h = sha256d_header(&job.header(&root, job.version, job.ntime, nonce));
                if meet.is_met_by(&h) && !fail.is_some_and(|f| f.is_met_by(&h)) {
                    return (hex::encode(&en2), format!("{nonce:08x}"));
                }
            }
            unreachable!()
        }

        fn job_id(&self) -> String {
            let w = self.s.phase.held().unwrap().work_rx.borrow().clone();
            format!("{:x}", w.latest().unwrap().seq)
        }
    }

    fn code(v: &Value) -> Option<i64> {
        v["error"][0].as_i64()
    }

    /// The share checks as a miner meets them: one table, one session.
    #[test]
    fn every_share_gets_the_answer_its_fault_deserves() {
        let mut r = rig(1e-6, 1e-6);
        let job = r.job_id();
        let (en2, nonce) = r.grind(1, 1e-6, None);
        let (low_en2, low_nonce) = r.grind(2, 1e-9, Some(1e-6));
        let ntime = "495fab29";
        // (params, expected: Ok(forwarded) = accepted, Err(code) = refused)
        let table: Vec<(Value, Result<bool, i64>)> = vec![
            (json!(["w", job, en2, ntime, nonce]), Ok(true)),
            (json!(["w", job, en2, ntime, nonce]), Err(22)),
            (json!(["w", "ffff", en2, ntime, nonce]), Err(21)),
            (json!(["w", job, "zz", ntime, nonce]), Err(20)),
            (json!(["w", job, "00", ntime, nonce]), Err(20)),
            (json!(["w", job, low_en2, ntime, low_nonce]), Err(23)),
            (json!(["w", job, en2, "ffffffff", nonce]), Err(20)),
            (json!(["w", job, en2, ntime, nonce, "e0000000"]), Err(20)),
        ];
        for (n, (params, want)) in table.into_iter().enumerate() {
            let (answer, forwarded) = r.call("mining.submit", params.clone());
            match want {
                Ok(fwd) => {
                    assert_eq!(answer["result"], true, "row {n}: {params} -> {answer}");
                    assert_eq!(forwarded, fwd, "row {n}");
                }
                Err(c) => {
                    assert_eq!(code(&answer), Some(c), "row {n}: {params} -> {answer}");
                    assert!(!forwarded, "row {n}");
                }
            }
        }
        // A clean job makes the old one stale.
        r.pool.notify("j2", 2, true);
        r.s.on_work();
        let (en2b, nonceb) = (en2.clone(), nonce.clone());
        let (answer, _) = r.call("mining.submit", json!(["w", job, en2b, ntime, nonceb]));
        assert_eq!(code(&answer), Some(21), "{answer}");
    }

    /// Two raises before the next job: a share on the job sent before them
    /// is held to the first difficulty, not the middle one.
    #[test]
    fn a_share_found_before_two_raises_is_held_to_the_first_difficulty() {
        let mut r = rig(1e-6, 1.0);
        let job = r.job_id();
        for d in [2e-6, 4e-6] {
            let (answer, _) = r.call("mining.suggest_difficulty", json!([d]));
            assert_eq!(answer["result"], true);
        }
        let diffs: Vec<f64> = r
            .notes
            .iter()
            .filter(|v| v["method"] == "mining.set_difficulty")
            .map(|v| v["params"][0].as_f64().unwrap())
            .collect();
        assert_eq!(diffs, [2e-6, 4e-6]);
        // Meets 1e-6, not 2e-6.
        let (en2, nonce) = r.grind(3, 1e-6, Some(2e-6));
        let (answer, _) = r.call("mining.submit", json!(["w", job, en2, "495fab29", nonce]));
        assert_eq!(answer["result"], true, "{answer}");
        // On a job sent after the raises, 4e-6 is the bar.
        r.pool.notify("j2", 1, false);
        r.s.on_work();
        let job2 = r.job_id();
        let (en2, nonce) = r.grind(4, 1e-6, Some(4e-6));
        let (answer, _) = r.call("mining.submit", json!(["w", job2, en2, "495fab29", nonce]));
        assert_eq!(code(&answer), Some(23), "{answer}");
    }

    /// Before subscribe and authorize a share is refused with the right code.
    #[test]
    fn shares_before_the_handshake_are_refused() {
        let mut r = rig(1e-6, 1.0);
        unauthorized(&mut r);
        assert_eq!(code(&r.call("mining.submit", json!(["w", "1", "00", "00", "00"])).0), Some(24));
        r.s.phase = Phase::Named("w".into());
        assert_eq!(code(&r.call("mining.submit", json!(["w", "1", "00", "00", "00"])).0), Some(25), "authorized first");
        r.s.phase = Phase::Fresh;
        assert_eq!(code(&r.call("mining.submit", json!(["w", "1", "00", "00", "00"])).0), Some(25));
        assert_eq!(r.call("mining.ping", json!([])).0["result"], "pong");
        assert_eq!(code(&r.call("mining.bogus", json!([])).0), Some(20), "an unknown method is answered");
    }

    /// An input to a session in a handshake script: a miner's line, or what
    /// the step it waits for got (leases come from the route's pool).
    enum In {
        Line(&'static str, Value),
        /// A prefix on this route (for a subscribe: the route its address
        /// maps to, as the shell's router says).
        Lease(usize),
        /// The route the worker belongs on (the shell's router).
        Route(usize),
        NoLease,
        SameLease(usize),
        NoSameLease,
        Pool(bool),
        Registered {
            parked: bool,
        },
    }

    /// What a session waits for, in a word.
    fn waits(p: &Option<Box<Pending>>) -> String {
        match p.as_deref().map(|p| &p.step) {
            None => "-".into(),
            Some(Step::Subscribe { .. }) => "route and lease".into(),
            Some(Step::Route { name, .. }) => format!("route {name}"),
            Some(Step::MoveSame { to, .. }) => format!("same prefix {to}"),
            Some(Step::MoveAny { to, .. }) => format!("lease {to}"),
            Some(Step::PoolAuthorize { name, .. }) => format!("pool {name}"),
            Some(Step::Register) => "register".into(),
        }
    }

    /// A line to its miner, in a word: an answer's result or error code, or
    /// a notification's method.
    fn word(v: &Value) -> String {
        if let Some(m) = v["method"].as_str() {
            return m.to_string();
        }
        match (&v["error"], &v["result"]) {
            (Value::Array(e), _) => format!("error {}", e[0]),
            (_, Value::Array(_)) => "subscribed".into(),
            (_, r) => r.to_string(),
        }
    }

    /// A session before subscribe, its routes (hubs that open nothing) and
    /// their pools, and the script so far.
    struct Shake {
        s: Session,
        router: Arc<Router>,
        pools: Vec<FakePool>,
        pending: Option<Box<Pending>>,
    }

    /// Routes `(name, workers)`, each with a pool (one job sent), under `mode`.
    fn shake(mode: WorkerMode, routes: &[(&str, &str)]) -> Shake {
        let cfg = Config { worker_mode: mode, ..Config::default() };
        let pools = routes
            .iter()
            .map(|_| {
                let mut p = FakePool::new(1.0);
                p.notify("j1", 1, true);
                p
            })
            .collect();
        let s = session(DownstreamSettings::from_config(&cfg));
        Shake { s, router: router_with(routes), pools, pending: None }
    }

    impl Shake {
        /// Run `script`: after each input, what the session waits for and
        /// the words of what it sent its miner.
        fn run(&mut self, script: &[(In, &str, &[&str])]) {
            for (n, (input, want_wait, want_sent)) in script.iter().enumerate() {
                let got = match input {
                    In::Line(method, params) => {
                        assert!(self.pending.is_none(), "row {n}: a line while a step waits");
                        let line = json!({"id": n, "method": method, "params": params}).to_string();
                        match self.s.on_line(line.as_bytes(), Instant::now()) {
                            Next::Wait(p) => self.pending = Some(p),
                            _ => self.pending = None,
                        }
                        None
                    }
                    // A subscribe's route and prefix, as the shell gets them:
                    // the seat on the route first.
                    In::Lease(_) | In::NoLease if self.subscribing() => {
                        let r = match input {
                            In::Lease(r) => *r,
                            _ => 0,
                        };
                        self.s.seat.get_or_insert_with(|| self.router.seat(r));
                        let lease = match input {
                            In::Lease(_) => Ok(self.pools[r].lease()),
                            _ => Err(LeaseError::NotReady),
                        };
                        Some(Got::Subscribe(Some((r, lease))))
                    }
                    In::Lease(r) => Some(Got::Lease(Ok(self.pools[*r].lease()))),
                    In::NoLease => Some(Got::Lease(Err(LeaseError::NotReady))),
                    In::Route(r) => Some(Got::Route(Some(*r))),
                    In::SameLease(r) => Some(Got::LeaseExact(Some(self.pools[*r].lease()))),
                    In::NoSameLease => Some(Got::LeaseExact(None)),
                    In::Pool(ok) => Some(Got::PoolAuthorize(*ok)),
                    In::Registered { parked } => {
                        Some(Got::Register(Some(Registered { miner: MinerId(self.s.session_id), parked: *parked })))
                    }
                };
                if let Some(got) = got {
                    let p = self.pending.take().unwrap_or_else(|| panic!("row {n}: nothing waits"));
                    self.pending = self.s.resume(*p, got);
                }
                assert_eq!(waits(&self.pending), *want_wait, "row {n}: waits for");
                let bytes = std::mem::take(self.s.out.buf());
                let sent: Vec<String> = bytes
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| word(&serde_json::from_slice(l).unwrap()))
                    .collect();
                assert_eq!(sent, *want_sent, "row {n}: sent");
            }
        }

        fn miners_on(&self, route: usize) -> usize {
            self.router.routes[route].miners.load(Ordering::Relaxed) as usize
        }

        fn subscribing(&self) -> bool {
            matches!(self.pending.as_deref().map(|p| &p.step), Some(Step::Subscribe { .. }))
        }
    }

    fn subscribe() -> In {
        In::Line("mining.subscribe", json!(["cgminer/4.10"]))
    }
    fn authorize(w: &str) -> In {
        In::Line("mining.authorize", json!([w, "x"]))
    }

    /// A miner that works: subscribe, authorize, then work, each step
    /// waiting for what it needs and nothing else.
    #[test]
    fn a_handshake_waits_for_each_thing_it_needs_in_turn() {
        let mut h = shake(WorkerMode::PoolAccount, &[("default", "")]);
        h.run(&[
            (subscribe(), "route and lease", &[]),
            (In::Lease(0), "-", &["subscribed"]),
            (authorize("w1"), "route w1", &[]),
            (In::Route(0), "register", &["true"]),
            (In::Registered { parked: false }, "-", &["mining.set_difficulty", "mining.notify"]),
            // A second authorize is answered, nothing more.
            (authorize("w1"), "-", &["true"]),
            (subscribe(), "-", &["subscribed"]),
        ]);
        assert!(h.s.live() && h.s.miner() == Some(MinerId(h.s.session_id)) && !h.s.closing);
        assert_eq!(h.miners_on(0), 1);
        assert_eq!(h.s.info().worker.get().map(|w| &**w), Some("w1"));
    }

    /// Every way a handshake step can end, one script each.
    #[test]
    fn handshake_steps_end_as_their_outcome_says() {
        type Script = Vec<(In, &'static str, &'static [&'static str])>;
        // (mode, routes, script, closing after, miners on route 1 after)
        type Row = (WorkerMode, &'static [(&'static str, &'static str)], Script, bool, usize);
        let one: &[(&str, &str)] = &[("default", "")];
        let two: &[(&str, &str)] = &[("default", ""), ("big", "big*")];
        // Subscribed on route 0 first, then `rest`.
        let subscribed = |rest: Script| -> Script {
            let mut v: Script = vec![(subscribe(), "route and lease", &[]), (In::Lease(0), "-", &["subscribed"])];
            v.extend(rest);
            v
        };
        let xsub = || (In::Line("mining.extranonce.subscribe", json!([])), "-", &["true"] as &[&str]);
        let table: Vec<Row> = vec![
            // No pool connection ready in time: try again later.
            (
                WorkerMode::PoolAccount,
                one,
                vec![(subscribe(), "route and lease", &[]), (In::NoLease, "-", &["error 20"])],
                true,
                0,
            ),
            // Parked by curtailment: authorized, sent no work.
            (
                WorkerMode::PoolAccount,
                one,
                subscribed(vec![
                    (authorize("w1"), "route w1", &[]),
                    (In::Route(0), "register", &["true"]),
                    (In::Registered { parked: true }, "-", &[]),
                ]),
                false,
                0,
            ),
            // Per-worker: the pool decides; a refusal leaves it unauthorized.
            (
                WorkerMode::PerWorker,
                one,
                subscribed(vec![
                    (authorize("w1"), "route w1", &[]),
                    (In::Route(0), "pool w1", &[]),
                    (In::Pool(false), "-", &["false"]),
                    (authorize("w1"), "route w1", &[]),
                    (In::Route(0), "pool w1", &[]),
                    (In::Pool(true), "register", &["true"]),
                ]),
                false,
                0,
            ),
            // Per-worker before subscribe: refused, no pool asked.
            (WorkerMode::PerWorker, one, vec![(authorize("w1"), "-", &["error 25"])], false, 0),
            // Moved to its route under the same prefix: the miner sees nothing.
            (
                WorkerMode::PoolAccount,
                two,
                subscribed(vec![
                    (authorize("big.1"), "route big.1", &[]),
                    (In::Route(1), "same prefix 1", &[]),
                    (In::SameLease(1), "register", &["true"]),
                ]),
                false,
                1,
            ),
            // Same prefix taken there, and the miner cannot be told a new
            // extranonce: answered, then asked to reconnect (it comes back
            // to its route: its address is placed there).
            (
                WorkerMode::PoolAccount,
                two,
                subscribed(vec![
                    (authorize("big.1"), "route big.1", &[]),
                    (In::Route(1), "same prefix 1", &[]),
                    (In::NoSameLease, "-", &["true", "client.reconnect"]),
                ]),
                true,
                0,
            ),
            // ... it can (extranonce.subscribe): a new prefix, and it is told.
            (
                WorkerMode::PoolAccount,
                two,
                subscribed(vec![
                    xsub(),
                    (authorize("big.1"), "route big.1", &[]),
                    (In::Route(1), "same prefix 1", &[]),
                    (In::NoSameLease, "lease 1", &[]),
                    (In::Lease(1), "register", &["true", "mining.set_extranonce"]),
                ]),
                false,
                1,
            ),
            // ... and no room there either.
            (
                WorkerMode::PoolAccount,
                two,
                subscribed(vec![
                    xsub(),
                    (authorize("big.1"), "route big.1", &[]),
                    (In::Route(1), "same prefix 1", &[]),
                    (In::NoSameLease, "lease 1", &[]),
                    (In::NoLease, "-", &["error 20"]),
                ]),
                true,
                0,
            ),
            // Per-worker after a move: the pool of the new route is asked.
            (
                WorkerMode::PerWorker,
                two,
                subscribed(vec![
                    (authorize("big.1"), "route big.1", &[]),
                    (In::Route(1), "same prefix 1", &[]),
                    (In::SameLease(1), "pool big.1", &[]),
                    (In::Pool(true), "register", &["true"]),
                ]),
                false,
                1,
            ),
        ];
        for (n, (mode, routes, script, closing, on_big)) in table.into_iter().enumerate() {
            let mut h = shake(mode, routes);
            h.run(&script);
            assert_eq!(h.s.closing, closing, "case {n}: closing");
            if routes.len() > 1 {
                assert_eq!((h.miners_on(0), h.miners_on(1)), (1 - on_big, on_big), "case {n}: seats");
            }
        }
    }

    /// A move under the same prefix keeps the prefix held on the old route
    /// too, so no later miner there is given this one's extranonce1.
    #[test]
    fn a_miner_moved_under_its_prefix_keeps_it_reserved_where_it_came_from() {
        let mut h = shake(WorkerMode::PoolAccount, &[("default", ""), ("big", "big*")]);
        h.run(&[
            (subscribe(), "route and lease", &[]),
            (In::Lease(0), "-", &["subscribed"]),
            (authorize("big.1"), "route big.1", &[]),
            (In::Route(1), "same prefix 1", &[]),
        ]);
        let en1 = h.s.phase.held().unwrap().extranonce1.clone();
        h.run(&[(In::SameLease(1), "register", &["true"])]);
        assert_eq!(h.s.phase.held().unwrap().extranonce1, en1, "the miner keeps its extranonce1");
        assert_eq!(h.pools[0].in_use(), 1, "the old prefix stays held");
        assert_eq!(h.pools[1].in_use(), 1);
        drop(h.s);
        assert_eq!((h.pools[0].in_use(), h.pools[1].in_use()), (0, 0), "both given back when it leaves");
    }

    /// The time limits, each just before and at its end. The session is
    /// given the time: nothing here waits.
    /// The short leash before authorize, and error answers rate-limited:
    /// (case, authorized, limits.handshake_strikes, lines each at a second
    /// since connecting, error answers sent, closed for).
    #[test]
    fn garbage_closes_before_authorize_and_errors_are_rate_limited() {
        const JUNK: &str = "\u{0}\u{ff} garbage";
        const UNKNOWN: &str = r#"{"id":7,"method":"mining.frobnicate","params":[]}"#;
        type Row = (&'static str, bool, u32, Vec<(u64, &'static str)>, usize, Option<&'static str>);
        let table: Vec<Row> = vec![
            ("garbage first", false, 1, vec![(0, JUNK)], 1, Some("limits.handshake_strikes")),
            (
                "broken JSON first",
                false,
                1,
                vec![(0, r#"{"id":1,"method":"mining.subscribe","params":["#)],
                1,
                Some("limits.handshake_strikes"),
            ),
            ("a JSON array", false, 1, vec![(0, "[1,2,3]")], 1, Some("limits.handshake_strikes")),
            ("two strikes allowed", false, 2, vec![(0, JUNK)], 1, None),
            ("two strikes allowed", false, 2, vec![(0, JUNK), (0, JUNK)], 2, Some("limits.handshake_strikes")),
            // Parseable requests sluice does not know are answered, not
            // strikes (firmware sends its own methods): the subscribe
            // timeout bounds a connection that sends nothing else.
            ("unknown method before authorize", false, 1, vec![(0, UNKNOWN); 3], 3, None),
            ("garbage after authorize", true, 1, vec![(0, JUNK)], 1, None),
            ("unknown method after authorize", true, 1, vec![(0, UNKNOWN)], 1, None),
            ("a flood in one second", true, 1, vec![(0, UNKNOWN); 25], 10, None),
            (
                "a flood over three seconds",
                true,
                1,
                [vec![(0, JUNK); 12], vec![(1, JUNK); 12], vec![(2, UNKNOWN); 3]].concat(),
                23,
                None,
            ),
        ];
        for (what, authorized, strikes, lines, answers, closed) in table {
            let mut r = rig(1e-6, 1.0);
            if !authorized {
                silent(&mut r);
            }
            let mut settings = (*r.s.settings).clone();
            settings.handshake_strikes = strikes;
            r.s.settings = Arc::new(settings);
            let t0 = r.s.connected_at;
            let mut sent = Vec::new();
            for (at, line) in &lines {
                r.s.on_line(line.as_bytes(), t0 + std::time::Duration::from_secs(*at));
                sent.extend(r.sent());
            }
            assert_eq!(sent.len(), answers, "{what}: {sent:?}");
            assert!(sent.iter().all(|v| code(v).is_some()), "{what}: every answer is an error: {sent:?}");
            assert_eq!(r.s.close_reason, closed, "{what}");
            assert_eq!(r.s.closing, closed.is_some(), "{what}");
        }
    }

    /// A connection that has sent nothing at all.
    fn silent(r: &mut Rig) {
        r.s.phase = Phase::Fresh;
        r.s.greeted = false;
    }

    /// Subscribed, not authorized.
    fn unauthorized(r: &mut Rig) {
        if let Phase::Working(h, _) = std::mem::replace(&mut r.s.phase, Phase::Fresh) {
            r.s.phase = Phase::Subscribed(h);
        }
    }

    #[test]
    fn time_limits_close_a_miner_when_they_run_out() {
        use std::time::Duration;
        const MS: Duration = Duration::from_millis(1);
        // (what the miner did, how long after it the tick comes, the limit broken)
        type Row = (&'static str, fn(&mut Rig), fn(&DownstreamSettings) -> Duration, Result<(), &'static str>);
        let table: Vec<Row> = vec![
            ("working", |_| {}, |c| c.idle_timeout - MS, Ok(())),
            ("silent", |_| {}, |c| c.idle_timeout, Err("limits.idle_timeout_s")),
            ("parked and silent", |r| r.s.parked = true, |c| c.idle_timeout * 2, Ok(())),
            ("silent since connecting", silent, |c| c.subscribe_timeout - MS, Ok(())),
            ("silent since connecting", silent, |c| c.subscribe_timeout, Err("limits.subscribe_timeout_s")),
            (
                "only unknown methods",
                |r| {
                    silent(r);
                    r.call("mining.frobnicate", json!([]));
                },
                |c| c.subscribe_timeout,
                Err("limits.subscribe_timeout_s"),
            ),
            ("subscribed, never authorized", unauthorized, |c| c.subscribe_timeout * 2, Ok(())),
            ("never authorized", unauthorized, |c| c.handshake_timeout - MS, Ok(())),
            ("never authorized", unauthorized, |c| c.handshake_timeout, Err("limits.handshake_timeout_s")),
            (
                "only bad shares",
                |r| {
                    r.call("mining.submit", json!(["w", "ffff", "00", "00", "00"]));
                },
                |c| c.invalid_window - MS,
                Ok(()),
            ),
            (
                "only bad shares",
                |r| {
                    r.call("mining.submit", json!(["w", "ffff", "00", "00", "00"]));
                },
                |c| c.invalid_window,
                Err("limits.invalid_share_window_s"),
            ),
        ];
        for (what, setup, after, want) in table {
            let mut r = rig(1e-6, 1.0);
            setup(&mut r);
            // The latest of connecting and the miner's last line.
            let since = r.s.last_line.max(r.s.connected_at);
            let at = after(&r.s.settings);
            assert_eq!(r.s.on_tick(since + at), want, "{what}, {at:?} later");
        }
    }

    /// The handshake's deadlines through the whole task (socket, timer,
    /// close, counters), in paused time over loopback: a silent connection
    /// and a trickle that never ends its line are closed at
    /// `limits.subscribe_timeout_s` exactly, not a moment before. No
    /// sleeping: the runtime's clock jumps to each deadline.
    #[tokio::test(start_paused = true)]
    async fn silent_and_trickling_connections_end_at_the_subscribe_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
        let mut cfg = Config::default();
        cfg.limits.subscribe_timeout_s = LIMIT.into();
        let settings = Arc::new(DownstreamSettings::from_config(&cfg));
        let proxy = Arc::new(ProxyStats::default());
        let curtail = crate::curtail::CurtailConfig { socket: Default::default(), ..Default::default() };
        let curtailer = crate::curtail::controller::spawn(curtail, None).unwrap();
        let (sessions, conns) = (Arc::new(Sessions::default()), Arc::new(super::super::Conns::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t0 = Instant::now();
        let mut clients = Vec::new();
        for trickle in [false, true] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let permit = conns.acquire(peer.ip(), 10).unwrap();
            let (router, stats) = (router_with(&[("default", "")]), proxy.clone());
            let main = tokio::runtime::Handle::current();
            tokio::spawn(run(
                stream,
                permit,
                peer,
                settings.clone(),
                router,
                stats,
                curtailer.clone(),
                sessions.clone(),
                main,
            ));
            if trickle {
                client.write_all(b"{\"id\":1,\"method\":\"mining.subscribe\"").await.unwrap();
            }
            clients.push(client);
        }
        let mut buf = [0u8; 256];
        for c in &mut clients {
            let early =
                tokio::time::timeout_at(t0 + LIMIT - std::time::Duration::from_millis(1), c.read(&mut buf)).await;
            assert!(early.is_err(), "open until the deadline: {early:?}");
        }
        for c in &mut clients {
            assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed, without a word");
            assert_eq!(t0.elapsed(), LIMIT, "at the deadline");
        }
        // Counted by the limit, and summed for the gate's log line.
        // (The session counts its close before its socket goes.)
        assert_eq!(proxy.gate_closes.take(), [("limits.subscribe_timeout_s", 2)]);
    }
}
