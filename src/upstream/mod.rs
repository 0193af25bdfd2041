//! Pool side: upstream connections, failover, extranonce space and jobs.
//!
//! A [`Hub`] per route owns the list of upstream connections. A miner that
//! subscribes takes a [`Lease`]: an extranonce prefix on a connection with
//! room, and a `watch::Receiver<Arc<Work>>` through which that connection
//! publishes its jobs. Dropping the lease frees the prefix. When every
//! connection is full the hub opens another one.

mod conn;
pub mod extranonce;
pub mod failover;
pub mod noise;
mod pool_session;
pub mod router;
mod sv2;

use crate::config::{Config, PoolUrl, WorkerMode};
use crate::share::{Difficulty, Hash256, JobTemplate};
use crate::stats::{ProxyStats, StatsPair};
use bytes::Bytes;
use extranonce::{Layout, PrefixAlloc};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

/// Local job numbers are unique across all connections and sessions, so a job
/// id a miner echoes can never refer to the wrong pool's job.
static NEXT_JOB_SEQ: AtomicU64 = AtomicU64::new(1);

/// One job as miners see it: serialised once, shared by every miner on the
/// connection.
#[derive(Debug, Clone)]
pub struct Job {
    pub seq: u64,
    pub pool_job_id: String,
    pub template: JobTemplate,
    /// The `mining.notify` line with the pool's clean_jobs flag (forced true
    /// for the first job of a session) ...
    pub notify: Bytes,
    /// ... and the same job with clean_jobs=true, for a miner that skipped a
    /// clean job while it was busy.
    pub notify_clean: Bytes,
    pub session: u64,
    /// Zero bytes in front of the miner's prefix in the pool's extranonce2.
    pub pad_len: usize,
    /// The pool's target when the job arrived.
    pub pool_target: crate::share::Target,
    /// The pool (index in the URL list) and the pool extranonce1 the job's
    /// coinbase is built on: a share of this job means something only to
    /// that pool, under that extranonce1.
    pub url_index: usize,
    pub pool_en1: Arc<[u8]>,
}

impl std::fmt::Debug for JobTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobTemplate(ntime {:08x}, nbits {:08x})", self.ntime, self.nbits)
    }
}

/// What one upstream connection publishes to its miners.
#[derive(Debug, Clone)]
pub struct Work {
    /// Bumped for every pool session (connect or pool `set_extranonce`).
    pub session: u64,
    pub connected: bool,
    /// Known after the first subscribe; kept across sessions while it fits.
    pub layout: Option<Layout>,
    pub pool_en1: Arc<[u8]>,
    pub pad_len: usize,
    /// Bumped when a classic-layout miner's extranonce1 changes.
    pub en1_epoch: u64,
    /// Bumped when the prefix space is rebuilt (the allocator reset, in the
    /// same step as this work is published); a lease from another epoch is
    /// void. The only copy of the epoch: the allocator is used only while
    /// this work is held (see `ConnShared::allocate`).
    pub alloc_epoch: u64,
    /// Recent jobs, oldest first.
    pub jobs: Vec<Arc<Job>>,
    /// Seq of the newest job sent with clean_jobs: jobs before it are stale.
    pub clean_seq: u64,
    pub pool_difficulty: Difficulty,
    /// `pool_difficulty` as a target, converted once per change.
    pub pool_target: crate::share::Target,
    /// The version-rolling mask the pool granted, if any.
    pub version_mask: Option<u32>,
    /// The pool URL index in use (0 is the primary).
    pub url_index: usize,
}

impl Work {
    fn new() -> Self {
        Work {
            session: 0,
            connected: false,
            layout: None,
            pool_en1: Arc::from(&[][..]),
            pad_len: 0,
            en1_epoch: 0,
            alloc_epoch: 0,
            jobs: Vec::new(),
            clean_seq: 0,
            pool_difficulty: Difficulty::ONE,
            pool_target: Difficulty::ONE.to_target(),
            version_mask: None,
            url_index: 0,
        }
    }

    pub fn latest(&self) -> Option<&Arc<Job>> {
        self.jobs.last()
    }

    /// Find a job by the id miners were given; the flag says it is stale
    /// (superseded by a clean_jobs notify).
    pub fn job(&self, id: &str) -> Option<(&Arc<Job>, bool)> {
        let seq = u64::from_str_radix(id, 16).ok()?;
        let j = self.jobs.iter().rev().find(|j| j.seq == seq)?;
        Some((j, j.seq < self.clean_seq))
    }
}

/// Extranonce2 as sent to the pool: pad, prefix and the miner's part.
#[derive(Clone, Copy, Debug)]
pub struct PoolExtranonce2 {
    len: u8,
    bytes: [u8; 32],
}
impl PoolExtranonce2 {
    pub fn new(pad: usize, prefix: &[u8], miner: &[u8]) -> Option<Self> {
        let len = pad + prefix.len() + miner.len();
        if len > 32 {
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes[pad..pad + prefix.len()].copy_from_slice(prefix);
        bytes[pad + prefix.len()..len].copy_from_slice(miner);
        Some(PoolExtranonce2 { len: len as u8, bytes })
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// A share on its way to the pool.
#[derive(Debug)]
pub struct UpstreamSubmit {
    pub job: Arc<Job>,
    /// The worker name to submit under; `None` for the route's pool account.
    pub worker: Option<Arc<str>>,
    pub extranonce2: PoolExtranonce2,
    pub ntime: u32,
    pub nonce: u32,
    pub version: u32,
    pub hash: Hash256,
    /// The rebuilt header, kept so a block solution can be logged in full.
    pub header: [u8; 80],
    pub is_block: bool,
    pub stats: StatsPair,
    /// How many times it was sent upstream (a held block solution is sent
    /// again on a resumed session).
    pub attempt: u32,
}

pub enum Cmd {
    Submit(UpstreamSubmit),
    Authorize { worker: Arc<str>, reply: oneshot::Sender<bool> },
}

/// The parts of a connection that miners and the hub share. The allocator
/// sits behind a mutex because leases are dropped from miner tasks; every
/// critical section is a few instructions with no `.await`.
pub struct ConnShared {
    pub id: u64,
    pub work: watch::Receiver<Arc<Work>>,
    alloc: Mutex<PrefixAlloc>,
    cmd: mpsc::Sender<Cmd>,
    blocks: mpsc::Sender<UpstreamSubmit>,
    closed: AtomicBool,
    /// Shares handed to this connection: written by the miners' side only
    /// (`Lease::submit`), once the share is sure to reach the connection.
    handed: AtomicU64,
    /// Shares it answered or gave up: written by the connection only
    /// (`PoolSession::finished`). Outstanding is the difference.
    ended: AtomicU64,
    /// Its hub was replaced by a config reload: close once no miner is left.
    retired: AtomicBool,
    /// The measured hashrate of the miners leasing on it (H/s): what a
    /// Stratum V2 channel tells the pool it carries.
    hashrate: crate::stats::AtomicF64,
}

impl ConnShared {
    /// A prefix (this one, or any free one) under the work `w`, which the
    /// caller holds borrowed from `self.work`: holding it keeps the
    /// allocator and the published epoch in step, as the pool session resets
    /// the allocator only while publishing (see `PoolSession::apply_extranonce`).
    /// Shares handed to this connection and not yet answered or given up.
    /// `ended` is read first: a share ends only after it was handed, so the
    /// difference can be high for an instant, never below the truth.
    pub fn outstanding(&self) -> u64 {
        let ended = self.ended.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(ended)
    }

    fn allocate(self: &Arc<Self>, w: &Work, exact: Option<u32>) -> Option<Lease> {
        let mut a = self.alloc.lock();
        let prefix = match exact {
            Some(p) => a.allocate_exact(p).then_some(p)?,
            None => a.allocate()?,
        };
        Some(Lease { conn: self.clone(), prefix, epoch: w.alloc_epoch, hashrate: Default::default() })
    }
}

/// A miner's claim on an extranonce prefix of one connection.
pub struct Lease {
    pub conn: Arc<ConnShared>,
    pub prefix: u32,
    pub epoch: u64,
    /// The miner's hashrate as counted in its connection's.
    hashrate: crate::stats::AtomicF64,
}

impl Lease {
    /// The miner's measured hashrate now (H/s), counted in its connection's.
    pub fn set_hashrate(&self, hr: f64) {
        let was = self.hashrate.get();
        self.hashrate.set(hr);
        self.conn.hashrate.add(hr - was);
    }
    /// This miner's extranonce1 under the current work.
    pub fn extranonce1(&self, w: &Work) -> Vec<u8> {
        w.layout.map(|l| l.miner_extranonce1(self.prefix, &w.pool_en1)).unwrap_or_default()
    }
    /// The prefix bytes that go into the pool's extranonce2 (empty in the
    /// classic layout).
    pub fn prefix_bytes(&self, w: &Work) -> Vec<u8> {
        match w.layout {
            Some(l) if !l.is_classic() => l.miner_extranonce1(self.prefix, &[]),
            _ => Vec::new(),
        }
    }
    pub fn work(&self) -> watch::Receiver<Arc<Work>> {
        self.conn.work.clone()
    }
    /// Send a share upstream. Block solutions take their own channel, which
    /// the connection drains before anything else; waiting for room is the
    /// backpressure, nothing is dropped here.
    pub async fn submit(&self, s: UpstreamSubmit) {
        // A place in the queue first: once it is held the share cannot fail
        // to reach the connection, so it is counted as handed before it
        // can be answered, and a closed connection never counts it at all.
        enum Place<'a> {
            Block(mpsc::Permit<'a, UpstreamSubmit>),
            Share(mpsc::Permit<'a, Cmd>),
        }
        let place = if s.is_block {
            self.conn.blocks.reserve().await.map(Place::Block)
        } else {
            self.conn.cmd.reserve().await.map(Place::Share)
        };
        match place {
            Ok(place) => {
                self.conn.handed.fetch_add(1, Ordering::Release);
                match place {
                    Place::Block(p) => p.send(s),
                    Place::Share(p) => p.send(Cmd::Submit(s)),
                }
            }
            Err(_) => {
                s.stats.pool_unanswered();
                s.stats.proxy.share_ended.notify_waiters();
                if s.is_block {
                    tracing::error!(target: crate::BLOCK_LOG, hash = %s.hash, header = %hex::encode(s.header), "BLOCK SOLUTION could not be handed to a closed upstream connection");
                }
            }
        }
    }
    /// Authorize a worker name on this connection (per-worker modes).
    pub async fn authorize(&self, worker: Arc<str>) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.conn.cmd.send(Cmd::Authorize { worker, reply }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.hashrate.add(-self.hashrate.get());
        // Held while releasing: the space cannot be rebuilt in between.
        let w = self.conn.work.borrow();
        if w.alloc_epoch == self.epoch {
            self.conn.alloc.lock().release(self.prefix);
        }
    }
}

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("no pool connection became ready in time")]
    NotReady,
    #[error("all {0} upstream connections are full")]
    Full(usize),
}

/// Settings an upstream connection needs, resolved from the config once.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub urls: Vec<PoolUrl>,
    pub mode: WorkerMode,
    pub version_mask: Option<u32>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub primary_stable: Duration,
    pub probe_interval: Duration,
    pub max_connections: usize,
    pub max_line: usize,
    pub job_history: usize,
    /// Close an extra connection after it has held no miner this long.
    pub idle_close: Duration,
    pub answer_timeout: Duration,
    pub write_timeout: Duration,
    pub silence_timeout: Duration,
}

impl UpstreamSettings {
    /// Settings for one route's pool URLs.
    pub fn from_config(c: &Config, urls: Vec<PoolUrl>) -> Result<Self, crate::config::ConfigError> {
        let f = &c.failover;
        Ok(UpstreamSettings {
            urls,
            mode: c.worker_mode,
            version_mask: c.version_rolling.requested(),
            connect_timeout: f.connect_timeout_s.get(),
            handshake_timeout: f.handshake_timeout_s.get(),
            backoff_initial: f.backoff_initial_s.get(),
            backoff_max: f.backoff_max_s.get(),
            primary_stable: f.primary_stable_s.get(),
            probe_interval: f.probe_interval_s.get(),
            max_connections: f.max_connections,
            max_line: c.limits.max_line_bytes,
            job_history: c.shares.job_history,
            answer_timeout: f.answer_timeout_s.get(),
            write_timeout: f.write_timeout_s.get(),
            silence_timeout: f.silence_timeout_s.get(),
            idle_close: if c.worker_mode == WorkerMode::Passthrough {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(60)
            },
        })
    }
}

/// One upstream connection as the metrics see it.
#[derive(Debug, Clone)]
pub struct ConnState {
    pub id: u64,
    pub pool: String,
    /// The URL it is on: its place in the route's failover list.
    pub url_index: usize,
    pub connected: bool,
}

/// The upstream connections of one route.
pub struct Hub {
    settings: Arc<UpstreamSettings>,
    conns: Mutex<Vec<Arc<ConnShared>>>,
    stats: Arc<ProxyStats>,
    /// The runtime the hub was built on. Connections opened for a miner are
    /// spawned there even when the miner's handshake runs on the gate
    /// thread (see `downstream::Gate`).
    /// The runtime its connections run on: the one it was started on (a
    /// passthrough hub opens connections from the gate's thread). None only
    /// where a hub is built outside any runtime (the session tests, whose
    /// hubs open nothing).
    rt: Option<tokio::runtime::Handle>,
}

/// Connection ids are unique across routes, so metrics can tell them apart.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(0);

impl Drop for Hub {
    /// A hub is dropped when a reload replaced its route and its last miner
    /// left: its connections close as they empty.
    fn drop(&mut self) {
        for c in self.conns.lock().iter() {
            c.retired.store(true, Ordering::Relaxed);
        }
    }
}

impl Hub {
    /// Create the hub and open its first connection (except in passthrough,
    /// where connections follow miners).
    pub fn start(settings: UpstreamSettings, stats: Arc<ProxyStats>) -> Arc<Hub> {
        let rt = tokio::runtime::Handle::try_current().ok();
        let hub = Arc::new(Hub { settings: Arc::new(settings), conns: Mutex::new(Vec::new()), stats, rt });
        if hub.settings.mode != WorkerMode::Passthrough {
            let c = hub.open(true);
            hub.conns.lock().push(c);
        }
        hub
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    fn open(&self, keeper: bool) -> Arc<ConnShared> {
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        let rt = self.rt.clone().unwrap_or_else(tokio::runtime::Handle::current);
        conn::spawn(&rt, id, keeper, self.settings.clone(), self.stats.clone())
    }

    /// The open connections, closed ones dropped from the list. The list's
    /// lock is held for this copy only, never while a connection's
    /// allocator or work is locked.
    fn open_conns(&self) -> Vec<Arc<ConnShared>> {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        conns.clone()
    }

    /// Each open connection: its id, the pool it is on, and whether a pool
    /// session is up.
    pub fn conn_states(&self) -> Vec<ConnState> {
        self.open_conns()
            .iter()
            .map(|c| {
                let w = c.work.borrow();
                let pool = self.settings.urls.get(w.url_index).map(|u| u.addr()).unwrap_or_default();
                ConnState { id: c.id, pool, url_index: w.url_index, connected: w.connected }
            })
            .collect()
    }

    /// Shares handed to upstream connections and not yet answered.
    pub fn outstanding(&self) -> u64 {
        self.conns.lock().iter().map(|c| c.outstanding()).sum()
    }

    /// Number of open upstream connections.
    pub fn connections(&self) -> usize {
        self.conns.lock().iter().filter(|c| !c.closed.load(Ordering::Relaxed)).count()
    }

    /// Lease this exact prefix on a connection whose layout matches, so a
    /// miner can move here keeping its extranonce1 and extranonce2 size.
    /// Waits (up to `wait`) for a connection still on its first pool
    /// session; None when no such slot is free.
    pub async fn lease_exact(&self, prefix: u32, layout: extranonce::Layout, wait: Duration) -> Option<Lease> {
        if layout.is_classic() {
            return None; // the extranonce1 is the pool's own there
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut pending = None;
            {
                for c in self.open_conns().iter() {
                    let w = c.work.borrow();
                    if w.layout.is_none() {
                        pending.get_or_insert_with(|| c.work.clone());
                        continue;
                    }
                    if w.layout != Some(layout) {
                        continue;
                    }
                    if let Some(lease) = c.allocate(&w, Some(prefix)) {
                        return Some(lease);
                    }
                }
            }
            let mut rx = pending?;
            if !matches!(tokio::time::timeout_at(deadline, rx.wait_for(|w| w.layout.is_some())).await, Ok(Ok(_))) {
                return None;
            }
        }
    }

    /// Lease an extranonce prefix, opening a connection if all are full, and
    /// waiting (up to `wait`) for a connection's first pool session.
    pub async fn lease(&self, wait: Duration) -> Result<Lease, LeaseError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut pending = None;
            {
                let seen = self.open_conns();
                for c in seen.iter() {
                    let w = c.work.borrow();
                    if w.layout.is_none() {
                        pending.get_or_insert_with(|| c.work.clone());
                        continue;
                    }
                    if let Some(lease) = c.allocate(&w, None) {
                        return Ok(lease);
                    }
                }
                if pending.is_none() {
                    let mut conns = self.conns.lock();
                    if conns.len() != seen.len() {
                        continue; // another miner opened one meanwhile: look again
                    }
                    if conns.len() >= self.settings.max_connections {
                        return Err(LeaseError::Full(conns.len()));
                    }
                    let c = self.open(false);
                    pending = Some(c.work.clone());
                    conns.push(c);
                }
            }
            let mut rx = pending.expect("set above");
            let ready = tokio::time::timeout_at(deadline, rx.wait_for(|w| w.layout.is_some())).await;
            if !matches!(ready, Ok(Ok(_))) {
                return Err(LeaseError::NotReady);
            }
        }
    }
}

/// A Stratum V2 pool session fed decrypted frames, for the `sv2_frames`
/// fuzz target: `data` is a run of frames `[msg_type][len][len bytes]`
/// after an opened channel; every message must be handled or refused
/// without a panic. Returns the jobs published at the end (so a seed can be
/// checked to reach that far).
#[doc(hidden)]
pub fn fuzz_sv2_frames(data: &[u8]) -> usize {
    use stratum_core::framing_sv2::header::Header;
    let url: PoolUrl =
        "stratum2+tcp://a@127.0.0.1:9/9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72".parse().expect("url");
    let settings = Arc::new(UpstreamSettings::from_config(&Config::default(), vec![url]).expect("settings"));
    let (shared, work_tx, _cmd, _blocks) = conn::channels(1);
    let now = tokio::time::Instant::now();
    let mut ps = pool_session::PoolSession::new(1, settings, Default::default(), shared, work_tx, now);
    ps.start(0, now);
    let mut est = false;
    let mut rest = data;
    while let [t, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        // Channel messages carry the channel bit, as pools send them.
        let ext: u16 = if (0x10..0x60).contains(t) { 0x8000 } else { 0 };
        let [e0, e1] = ext.to_le_bytes();
        let Ok(h) = Header::from_bytes(&[e0, e1, *t, n as u8, 0, 0]) else { continue };
        if let Err(_) | Ok(Some(_)) = ps.on_frame(h, payload.to_vec(), &mut est, now) {
            ps.session_ended();
            ps.start(0, now);
        }
        ps.sv2_outbox();
    }
    ps.work.jobs.len()
}

/// Parts of the upstream side for unit tests elsewhere, with no socket: a
/// pool connection fed a pool's lines, a lease on it, a router.
#[cfg(test)]
pub(crate) mod testing {
    use super::pool_session::PoolSession;
    use super::router::{Route, Router};
    use super::*;
    use crate::config::Config;
    use tokio::time::Instant;

    /// A pool connection's protocol state, fed by hand.
    pub(crate) struct FakePool {
        ps: PoolSession,
        established: bool,
    }

    /// The prevhash of tip `n`, as `mining.notify` writes it.
    pub(crate) fn tip(n: u8) -> String {
        format!("{}{n:02x}", "00".repeat(31))
    }

    impl FakePool {
        /// A pool session established with extranonce1 `aabbccdd` and an
        /// 8-byte extranonce2, at share difficulty `difficulty`.
        pub(crate) fn new(difficulty: f64) -> FakePool {
            let url: crate::config::PoolUrl = "stratum+tcp://acct:pw@127.0.0.1:9".parse().unwrap();
            let settings = Arc::new(UpstreamSettings::from_config(&Config::default(), vec![url]).unwrap());
            let (shared, work_tx, _, _) = conn::channels(1);
            let ps = PoolSession::new(1, settings, Arc::new(ProxyStats::default()), shared, work_tx, Instant::now());
            let mut p = FakePool { ps, established: false };
            p.ps.start(0, Instant::now());
            p.ps.out.clear();
            // Ids 1..4: configure, subscribe, extranonce.subscribe, authorize.
            p.feed(r#"{"id":1,"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"error":null}"#);
            p.feed(r#"{"id":2,"result":[[["mining.notify","s1"]],"aabbccdd",8],"error":null}"#);
            p.feed(&format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{difficulty}]}}"#));
            p
        }

        pub(crate) fn feed(&mut self, line: &str) {
            self.ps.on_line(line.as_bytes(), &mut self.established, Instant::now()).unwrap();
        }

        /// A new job on tip `n`.
        pub(crate) fn notify(&mut self, job: &str, n: u8, clean: bool) {
            let prev = tip(n);
            self.feed(&format!(
                r#"{{"id":null,"method":"mining.notify","params":["{job}","{prev}","01000000010000","ffffffff01",[],"20000000","1d00ffff","495fab29",{clean}]}}"#
            ));
        }

        /// Prefixes leased on this connection.
        pub(crate) fn in_use(&self) -> u32 {
            self.ps.shared.alloc.lock().in_use()
        }

        /// A miner's lease on this connection.
        pub(crate) fn lease(&self) -> Lease {
            let conn = self.ps.shared.clone();
            let w = conn.work.borrow().clone();
            conn.allocate(&w, None).expect("room")
        }
    }

    /// Default routes with these names whose hubs open no connection
    /// (passthrough opens them per miner).
    pub(crate) fn router(names: &[&str]) -> Arc<Router> {
        let routes: Vec<(&str, &str)> = names.iter().map(|n| (*n, "")).collect();
        router_with(&routes)
    }

    /// Routes `(name, workers pattern)`, hubs as in `router`.
    pub(crate) fn router_with(routes: &[(&str, &str)]) -> Arc<Router> {
        let cfg = Config { worker_mode: WorkerMode::Passthrough, ..Config::default() };
        let url: crate::config::PoolUrl = "stratum+tcp://a:x@127.0.0.1:9".parse().unwrap();
        let hub = || Hub::start(UpstreamSettings::from_config(&cfg, vec![url.clone()]).unwrap(), Default::default());
        Arc::new(Router::new(routes.iter().map(|(n, w)| Route::new(n.to_string(), hub(), w, &[], 1.0)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakePool;

    /// A pool's new extranonce that no longer fits voids every lease: the
    /// space starts again, and a void lease dropped later gives nothing back
    /// (it would otherwise free a prefix a new miner holds).
    #[test]
    fn a_rebuilt_prefix_space_ignores_leases_from_before() {
        let pool = FakePool::new(1.0);
        let (a, b) = (pool.lease(), pool.lease());
        assert_eq!(pool.in_use(), 2);
        let mut pool = pool;
        pool.feed(r#"{"id":null,"method":"mining.set_extranonce","params":["11223344",2]}"#);
        let w = a.conn.work.borrow().clone();
        assert_ne!(w.alloc_epoch, a.epoch, "the space was rebuilt");
        assert_eq!(pool.in_use(), 0);
        let c = pool.lease();
        assert_eq!((c.prefix, c.epoch), (0, w.alloc_epoch));
        drop((a, b));
        assert_eq!(pool.in_use(), 1, "only the new lease is counted");
        drop(c);
        assert_eq!(pool.in_use(), 0);
    }
}
