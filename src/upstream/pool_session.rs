//! One pool session's protocol state, apart from the connection loop
//! (`conn.rs`) that does its I/O: the requests in flight and their answers,
//! the jobs the pool sends (published to miners as [`Work`]), the shares and
//! block solutions forwarded, and the solutions held across a lost session.
//! Fed lines and commands; what it has to send accumulates in `out`.
//! Tested below by feeding it a pool's lines, without sockets.

use super::extranonce::Layout;
use super::failover::Failover;
use super::{Cmd, ConnShared, Job, UpstreamSettings, UpstreamSubmit, Work, NEXT_JOB_SEQ};
use crate::config::WorkerMode;
use crate::share::{Difficulty, JobTemplate};
use crate::stats::{ProxyStats, StatsPair};
use crate::stratum::{self, encode, Envelope, Notify, ServerMessage};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub(super) enum Pending {
    Ignored,
    Configure,
    /// `resuming`: sent with the previous session's id.
    Subscribe {
        resuming: bool,
    },
    Authorize {
        worker: Arc<str>,
        account: bool,
    },
    Submit {
        stats: StatsPair,
        is_block: bool,
        /// Sent before, on a session that ended unanswered.
        resent: bool,
        sub: Option<Box<UpstreamSubmit>>,
        sent: Instant,
    },
}

/// How a forwarded share ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Accepted,
    Rejected,
    /// Its session ended before the pool answered (or it never got there).
    Unanswered,
}

pub(super) enum End {
    /// The session failed or was lost; move on per the failover policy.
    Failed(String),
    /// The pool refused the account: a retry gets the same answer until the
    /// operator fixes the URL.
    Refused(String),
    /// The pool asked us to reconnect: same URL, after a pause.
    Reconnect(Duration),
    /// The primary is back and stable.
    ReturnToPrimary,
    /// No miner needs this connection any more.
    Idle,
}

pub(super) struct PoolSession {
    pub(super) id: u64,
    pub(super) settings: Arc<UpstreamSettings>,
    pub(super) stats: Arc<ProxyStats>,
    pub(super) shared: Arc<ConnShared>,
    pub(super) work: Work,
    pub(super) work_tx: watch::Sender<Arc<Work>>,
    pub(super) fo: Failover,
    pub(super) next_id: u64,
    pub(super) pending: HashMap<u64, Pending>,
    /// Worker names authorized upstream (per-worker modes) and the answer.
    pub(super) workers: HashMap<Arc<str>, bool>,
    /// Authorize requests waiting for a session or an answer.
    pub(super) waiting_auth: Vec<(Arc<str>, oneshot::Sender<bool>)>,
    /// Block solutions whose session ended unanswered: sent again when a
    /// session of the same pool resumes with the same extranonce1, until the
    /// chain moves on. Not capped: each one took a block's worth of work.
    pub(super) unsent_blocks: Vec<UpstreamSubmit>,
    /// The last session's subscription id and its pool (URL index), sent
    /// with the next subscribe to that pool to keep the extranonce1.
    pub(super) resume: Option<(usize, String)>,
    pub(super) out: Vec<u8>,
    /// Submits sent this session, oldest first (answered ones are dropped
    /// lazily), to catch a pool that stopped answering.
    pub(super) sent_submits: std::collections::VecDeque<(u64, Instant)>,
    /// When the pool last sent a line.
    pub(super) last_rx: Instant,
    /// Rejects, logged at most once per 10 s.
    pub(super) rejects: RejectLog,
    /// The time of the input being handled: every entry point is given it
    /// (the connection task reads the clock; tests pass their own).
    pub(super) now: Instant,
    /// The Stratum V2 state, while the session is on a `stratum2+tcp` pool.
    pub(super) sv2: Option<super::sv2::Sv2>,
}

impl PoolSession {
    /// A new session on URL `idx` begins: queue the handshake (configure,
    /// subscribe, resuming the last session on the same pool, extranonce
    /// subscription, the account's and known workers' authorizes).
    pub(super) fn start(&mut self, idx: usize, now: Instant) {
        self.now = now;
        self.work.url_index = idx;
        self.out.clear();
        self.sent_submits.clear();
        self.last_rx = now;
        let url = self.settings.urls[idx].clone();
        self.sv2 = None;
        if url.sv2.is_some() {
            return self.sv2_start(now);
        }
        if let Some(mask) = self.settings.version_mask {
            let opts =
                serde_json::json!({"version-rolling.mask": format!("{mask:08x}"), "version-rolling.min-bit-count": 2});
            self.request("mining.configure", &(["version-rolling"], opts), Pending::Configure);
        }
        // Back to the same pool: ask to resume the last session, which keeps
        // the extranonce1 (so held block solutions stay valid). A pool that
        // does not know the id gives a new one; one that refuses the form is
        // asked again without it.
        match self.resume.clone().filter(|(i, _)| *i == idx) {
            Some((_, sid)) => {
                let p = [stratum::USER_AGENT, sid.as_str()];
                self.request("mining.subscribe", &p, Pending::Subscribe { resuming: true })
            }
            None => self.request("mining.subscribe", &[stratum::USER_AGENT], Pending::Subscribe { resuming: false }),
        };
        // Ask to be told of extranonce changes instead of being disconnected;
        // pools that do not know the method answer with an error, ignored.
        self.request("mining.extranonce.subscribe", &[(); 0], Pending::Ignored);
        if !url.user.is_empty() {
            let p = (url.user.as_str(), url.password.as_str());
            self.request(
                "mining.authorize",
                &p,
                Pending::Authorize { worker: url.user.as_str().into(), account: true },
            );
        }
        // Workers known from earlier sessions, and those that asked meanwhile.
        let mut names: Vec<Arc<str>> = self.workers.keys().cloned().collect();
        names.extend(self.waiting_auth.iter().map(|(w, _)| w.clone()));
        names.sort();
        names.dedup();
        for w in names {
            self.request(
                "mining.authorize",
                &(&*w, url.password.as_str()),
                Pending::Authorize { worker: w.clone(), account: false },
            );
        }
    }

    pub(super) fn new(
        id: u64,
        settings: Arc<UpstreamSettings>,
        stats: Arc<ProxyStats>,
        shared: Arc<ConnShared>,
        work_tx: watch::Sender<Arc<Work>>,
        now: Instant,
    ) -> PoolSession {
        let fo =
            Failover::new(settings.urls.len(), settings.backoff_initial, settings.backoff_max, settings.primary_stable);
        PoolSession {
            id,
            settings,
            stats,
            shared,
            work: Work::new(),
            work_tx,
            fo,
            next_id: 1,
            pending: HashMap::new(),
            workers: HashMap::new(),
            waiting_auth: Vec::new(),
            unsent_blocks: Vec::new(),
            resume: None,
            out: Vec::with_capacity(4096),
            sent_submits: Default::default(),
            last_rx: now,
            rejects: RejectLog::default(),
            now,
            sv2: None,
        }
    }

    /// The SV2 messages queued to send (none on an SV1 session).
    pub(super) fn sv2_outbox(&mut self) -> Vec<super::sv2::Out> {
        self.sv2.as_mut().map(|s| std::mem::take(&mut s.out)).unwrap_or_default()
    }

    /// Every connection tick (at most a second apart).
    pub(super) fn tick(&mut self, now: Instant) {
        if self.sv2.is_some() {
            self.sv2_tick(now);
        }
    }

    pub(super) fn publish(&self) {
        self.work_tx.send_replace(Arc::new(self.work.clone()));
    }

    pub(super) fn request<P: serde::Serialize + ?Sized>(&mut self, method: &str, params: &P, p: Pending) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode::request(&mut self.out, id, method, params);
        self.pending.insert(id, p);
        id
    }

    /// Tidy up after a session: whatever was in flight will never be answered.
    pub(super) fn session_ended(&mut self) {
        if self.work.connected {
            self.stats.upstreams_connected.fetch_sub(1, Ordering::Relaxed);
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Pending::Submit { stats, is_block, sub, .. } = p {
                match (is_block, sub) {
                    // Still outstanding: resent on the next session.
                    (true, Some(s)) => self.unsent_blocks.push(*s),
                    _ => self.finished(&stats, Outcome::Unanswered),
                }
            }
        }
        self.work.connected = false;
        self.work.jobs.clear();
        self.publish();
    }

    /// Has the pool stopped answering (`failover.answer_timeout_s`) or gone
    /// silent (`failover.silence_timeout_s`)?
    pub(super) fn unresponsive(&mut self, now: Instant) -> Option<String> {
        self.now = now;
        while let Some((id, _)) = self.sent_submits.front() {
            if self.pending.contains_key(id) {
                break;
            }
            self.sent_submits.pop_front();
        }
        if let Some((_, sent)) = self.sent_submits.front() {
            let waited = now.saturating_duration_since(*sent);
            if waited >= self.settings.answer_timeout {
                return Some(format!(
                    "pool left a share unanswered for {waited:.0?} (failover.answer_timeout_s): taking the path as dead"
                ));
            }
        }
        let quiet = now.saturating_duration_since(self.last_rx);
        (quiet >= self.settings.silence_timeout)
            .then(|| format!("pool sent nothing for {quiet:.0?} (failover.silence_timeout_s)"))
    }

    pub(super) fn on_cmd(&mut self, c: Cmd, password: &str, now: Instant) {
        self.now = now;
        match c {
            Cmd::Submit(s) => self.send_submit(s, now),
            Cmd::Authorize { worker: _, reply } if self.sv2.is_some() => {
                // An SV2 channel credits its one user identity (the URL's
                // account); check-config allows SV2 pools only in
                // pool-account mode.
                let _ = reply.send(true);
            }
            Cmd::Authorize { worker, reply } => {
                if let Some(&ok) = self.workers.get(&worker) {
                    let _ = reply.send(ok);
                } else if self.work.connected {
                    let already = self.waiting_auth.iter().any(|(w, _)| *w == worker);
                    if !already {
                        self.request(
                            "mining.authorize",
                            &(&*worker, password),
                            Pending::Authorize { worker: worker.clone(), account: false },
                        );
                    }
                    self.waiting_auth.push((worker, reply));
                } else {
                    self.waiting_auth.push((worker, reply));
                }
            }
        }
    }

    pub(super) fn send_submit(&mut self, mut s: UpstreamSubmit, now: Instant) {
        self.now = now;
        if !self.work.connected || s.job.session != self.work.session {
            if !s.is_block {
                self.finished(&s.stats, Outcome::Unanswered);
                return;
            }
            // A block solution of an earlier session: held, and sent at once
            // if this session can take it (see `resend_blocks`).
            error!(target: crate::BLOCK_LOG, conn = self.id, hash = %s.hash, "BLOCK SOLUTION for an ended pool session; held for a session that resumes it");
            self.unsent_blocks.push(s);
            return self.resend_blocks();
        }
        if self.sv2.is_some() {
            return self.sv2_submit(s, now);
        }
        let en2 = hex::encode(s.extranonce2.as_bytes());
        let ntime = format!("{:08x}", s.ntime);
        let nonce = format!("{:08x}", s.nonce);
        let worker: &str = match &s.worker {
            Some(w) => w,
            None => &self.settings.urls[self.work.url_index].user,
        };
        let rolled = self.work.version_mask.map(|m| s.version & m).filter(|_| s.version != s.job.template.version);
        let worker = worker.to_owned();
        let stats = s.stats.clone();
        if s.is_block {
            error!(target: crate::BLOCK_LOG, conn = self.id, hash = %s.hash, header = %hex::encode(s.header), pool_job = %s.job.pool_job_id,
                extranonce2 = %en2, "BLOCK SOLUTION found; submitting to the pool first");
        }
        let params = (worker, s.job.pool_job_id.clone(), en2, ntime, nonce);
        let is_block = s.is_block;
        let attempt = s.attempt;
        s.attempt += 1;
        let keep = is_block.then(|| Box::new(s));
        let pending = Pending::Submit { stats: stats.clone(), is_block, resent: attempt > 0, sub: keep, sent: now };
        let id = match rolled {
            Some(v) => {
                let p = (params.0, params.1, params.2, params.3, params.4, format!("{v:08x}"));
                self.request("mining.submit", &p, pending)
            }
            None => self.request("mining.submit", &params, pending),
        };
        self.sent_submits.push_back((id, now));
        if attempt > 0 {
            self.stats.metrics.blocks_resent.inc();
        }
    }

    /// A forwarded share reached its end: answered, or (flagged) never will be.
    /// A forwarded share reached its end. Its outcome is counted before
    /// it leaves `outstanding`, so whoever sees nothing outstanding (a
    /// stopping proxy, woken here) sees every outcome counted.
    pub(super) fn finished(&self, stats: &StatsPair, outcome: Outcome) {
        match outcome {
            Outcome::Accepted => stats.pool_accepted(),
            Outcome::Rejected => stats.pool_rejected(),
            Outcome::Unanswered => stats.pool_unanswered(),
        }
        self.shared.ended.fetch_add(1, Ordering::Release);
        self.stats.share_ended.notify_waiters();
    }

    pub(super) fn on_line(&mut self, line: &[u8], established: &mut bool, now: Instant) -> Result<Option<End>, String> {
        self.now = now;
        self.last_rx = now;
        let env = Envelope::parse(line).map_err(|e| format!("pool sent garbage: {e}"))?;
        let msg = match ServerMessage::from_envelope(&env) {
            Ok(m) => m,
            Err(e) => {
                // One malformed notification is logged and skipped; a pool
                // that only sends garbage never completes the handshake.
                warn!(conn = self.id, "ignoring malformed pool message: {e}");
                return Ok(None);
            }
        };
        match msg {
            ServerMessage::Response { id, result, error } => {
                let ok = error.is_none() && result.is_some_and(|r| r.get() != "false" && r.get() != "null");
                match id.and_then(|i| self.pending.remove(&i)) {
                    Some(Pending::Subscribe { resuming }) => {
                        let Some(r) = result.filter(|_| error.is_none()) else {
                            if !resuming {
                                return Err("pool refused subscribe".into());
                            }
                            info!(conn = self.id, "pool refused to resume the session; subscribing afresh");
                            self.resume = None;
                            let p = [stratum::USER_AGENT];
                            self.request("mining.subscribe", &p, Pending::Subscribe { resuming: false });
                            return Ok(None);
                        };
                        let sub = stratum::parse_subscribe_result(r).map_err(|e| e.to_string())?;
                        let idx = self.work.url_index;
                        let resumed = resuming && *self.work.pool_en1 == *sub.extranonce1;
                        self.resume = sub.session_id.map(|sid| (idx, sid));
                        let en2 = sub.extranonce2_size;
                        self.apply_extranonce(sub.extranonce1, en2);
                        *established = true;
                        self.fo.established();
                        self.stats.upstreams_connected.fetch_add(1, Ordering::Relaxed);
                        info!(conn = self.id, pool = %self.settings.urls[idx], extranonce2_size = en2, resumed, "pool session established");
                    }
                    Some(Pending::Configure) => {
                        self.work.version_mask =
                            result.filter(|_| error.is_none()).and_then(stratum::parse_configure_result);
                        self.publish();
                    }
                    Some(Pending::Authorize { worker, account }) => {
                        if account && !ok {
                            let why = error.map(|e| e.get()).unwrap_or("false");
                            return Ok(Some(End::Refused(format!(
                                "pool refused the account {worker}: {why}: check the account and password in this pool URL"
                            ))));
                        }
                        if !account {
                            self.workers.insert(worker.clone(), ok);
                        }
                        let (done, rest): (Vec<_>, Vec<_>) =
                            std::mem::take(&mut self.waiting_auth).into_iter().partition(|(w, _)| *w == worker);
                        self.waiting_auth = rest;
                        for (_, reply) in done {
                            let _ = reply.send(ok);
                        }
                    }
                    Some(Pending::Submit { stats, is_block, resent, sent, .. }) => {
                        let m = &self.stats.metrics;
                        m.pool_rtt_seconds.observe(self.now.saturating_duration_since(sent).as_secs_f64());
                        // A resent block solution the pool calls a duplicate
                        // was taken the first time; only its answer was lost
                        // with the session. It is credited, not refused.
                        let credited_earlier = !ok && resent && error.is_some_and(|e| is_duplicate(e.get()));
                        if credited_earlier {
                            m.blocks_credited_earlier.inc();
                            info!(target: crate::BLOCK_LOG,
                                conn = self.id,
                                "resent BLOCK SOLUTION was credited the first time (pool: duplicate)"
                            );
                        }
                        let ok = ok || credited_earlier;
                        let pool = self.settings.urls[self.work.url_index].addr();
                        let reason = if ok { "" } else { reject_reason(error.map(|e| e.get())) };
                        m.pool_answer(&pool, ok, reason);
                        self.finished(&stats, if ok { Outcome::Accepted } else { Outcome::Rejected });
                        if !ok {
                            self.rejects.rejected(
                                self.id,
                                &pool,
                                reason,
                                error.map(|e| e.get()).unwrap_or("false"),
                                self.now,
                            );
                        }
                        if is_block {
                            error!(target: crate::BLOCK_LOG,
                                conn = self.id,
                                accepted = ok,
                                "BLOCK SOLUTION answered by the pool: {}",
                                error.map(|e| e.get()).unwrap_or("accepted")
                            );
                        }
                    }
                    Some(Pending::Ignored) => {}
                    None => debug!(conn = self.id, "response to an unknown request id {id:?}"),
                }
            }
            ServerMessage::Notify(n) => {
                if *established {
                    self.on_notify(n);
                }
            }
            ServerMessage::SetDifficulty(d) => match Difficulty::new(d) {
                Some(d) => {
                    self.work.pool_difficulty = d;
                    self.work.pool_target = d.to_target();
                    self.publish();
                }
                None => warn!(conn = self.id, "ignoring pool difficulty {d}"),
            },
            ServerMessage::SetExtranonce { extranonce1, extranonce2_size } => {
                info!(conn = self.id, extranonce2_size, "pool changed extranonce");
                self.apply_extranonce(extranonce1, extranonce2_size);
            }
            ServerMessage::SetVersionMask(m) => {
                self.work.version_mask = Some(m);
                self.publish();
            }
            ServerMessage::Reconnect { wait_s, .. } => {
                // Redirects to another host are not followed: the operator
                // chose the pool list.
                return Ok(Some(End::Reconnect(Duration::from_secs(wait_s.unwrap_or(0).min(60)))));
            }
            ServerMessage::Ping => encode::result(&mut self.out, env.id, "pong"),
            ServerMessage::GetVersion => encode::result(&mut self.out, env.id, stratum::USER_AGENT),
            ServerMessage::ShowMessage(m) => info!(conn = self.id, "pool says: {m}"),
            ServerMessage::Unknown(m) => {
                if env.id.is_some_and(|i| i.get() != "null") {
                    encode::error(&mut self.out, env.id, stratum::code::OTHER, "unsupported method");
                }
                debug!(conn = self.id, "pool sent unknown method {m}");
            }
        }
        Ok(None)
    }

    /// A new pool extranonce (subscribe or set_extranonce): keep the layout
    /// if the new extranonce2 still fits it, otherwise rebuild the prefix
    /// space (every miner on it is sent away to reconnect).
    pub(super) fn apply_extranonce(&mut self, en1: Vec<u8>, en2: usize) {
        let en1: Arc<[u8]> = en1.into();
        let passthrough = self.settings.mode == WorkerMode::Passthrough;
        let kept = self.work.layout.and_then(|l| l.pad_for(en2).map(|pad| (l, pad)));
        let mut rebuilt = None;
        match kept {
            Some((l, pad)) => {
                self.work.pad_len = pad;
                if l.is_classic() && *en1 != *self.work.pool_en1 {
                    self.work.en1_epoch += 1;
                }
            }
            None => {
                // An SV2 channel offers more extranonce than SV1 pools do
                // (pool_sv2: 16 bytes): the layout is cut from as many as
                // SV1 pools commonly give, the rest padded, so a failover to
                // an SV1 backup keeps every miner's extranonce1.
                let basis = if self.sv2.is_some() { en2.min(super::sv2::SV1_COMMON_EN2) } else { en2 };
                let l = Layout::for_pool(basis, passthrough);
                rebuilt = Some(l.capacity(passthrough));
                self.work.alloc_epoch += 1;
                self.work.layout = Some(l);
                self.work.pad_len = l.pad_for(en2).unwrap_or(0);
                self.work.en1_epoch += 1;
            }
        }
        self.work.pool_en1 = en1;
        self.work.session += 1;
        self.work.connected = true;
        self.work.jobs.clear();
        match rebuilt {
            // The allocator is reset while the new work is being published
            // (the watch's write lock held): whoever holds the work to
            // allocate or release sees the allocator of that work's epoch.
            Some(capacity) => {
                let w = Arc::new(self.work.clone());
                self.work_tx.send_modify(|cur| {
                    self.shared.alloc.lock().reset(capacity);
                    *cur = w;
                });
            }
            None => self.publish(),
        }
    }

    pub(super) fn on_notify(&mut self, n: Notify) {
        let Some(layout) = self.work.layout else {
            return;
        };
        let clean = n.clean_jobs || self.work.jobs.is_empty();
        let pad = vec![0u8; self.work.pad_len];
        let parts: Vec<&[u8]> =
            if layout.is_classic() { vec![&n.coinb1] } else { vec![&n.coinb1, &self.work.pool_en1, &pad] };
        let seq = NEXT_JOB_SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{seq:x}");
        let fields = |clean_jobs| encode::NotifyFields {
            job_id: &id,
            prevhash: n.prevhash,
            coinb1: &parts,
            coinb2: &n.coinb2,
            merkle_branch: &n.merkle_branch,
            version: n.version,
            nbits: n.nbits,
            ntime: n.ntime,
            clean_jobs,
        };
        let notify = encode::notify(&fields(clean));
        let notify_clean = if clean { notify.clone() } else { encode::notify(&fields(true)) };
        let template = JobTemplate::new(
            n.version,
            n.prevhash,
            &parts,
            n.coinb2.clone(),
            n.merkle_branch.clone(),
            n.nbits,
            n.ntime,
        );
        let job = Arc::new(Job {
            seq,
            pool_job_id: n.job_id,
            template,
            notify,
            notify_clean,
            session: self.work.session,
            pad_len: self.work.pad_len,
            pool_target: self.work.pool_target,
            url_index: self.work.url_index,
            pool_en1: self.work.pool_en1.clone(),
        });
        if clean {
            self.work.clean_seq = seq;
        }
        self.work.jobs.push(job.clone());
        self.resend_blocks();
        let excess = self.work.jobs.len().saturating_sub(self.settings.job_history);
        self.work.jobs.drain(..excess);
        self.publish();
    }

    /// Can a block solution of an earlier session's job go out now? Only the
    /// pool that issued the job can credit it, and only under the
    /// extranonce1 its coinbase was built on, so it waits for a session of
    /// that pool that resumed with that extranonce1. `Some(false)`: the
    /// chain has moved on (the newest job builds on another block), it is
    /// stale. `None`: keep holding it.
    pub(super) fn resendable(&self, job: &Job) -> Option<bool> {
        let newest = self.work.jobs.last()?;
        if newest.template.prevhash != job.template.prevhash {
            return Some(false);
        }
        // An SV2 job id means something only on its channel, which ended
        // with its connection.
        if self.sv2.is_some() && job.session != self.work.session {
            return Some(false);
        }
        (self.work.connected && job.url_index == self.work.url_index && *job.pool_en1 == *self.work.pool_en1)
            .then_some(true)
    }

    pub(super) fn give_up_block(&self, b: UpstreamSubmit) {
        error!(target: crate::BLOCK_LOG, conn = self.id, hash = %b.hash, header = %hex::encode(b.header), "held BLOCK SOLUTION can no longer be credited (the chain moved on, or its Stratum V2 channel ended with its connection); giving up");
        self.finished(&b.stats, Outcome::Unanswered);
        self.stats.metrics.blocks_given_up.inc();
    }

    /// Every new job decides for the held block solutions: send, drop as
    /// stale, or keep holding.
    pub(super) fn resend_blocks(&mut self) {
        for mut b in std::mem::take(&mut self.unsent_blocks) {
            match self.resendable(&b.job) {
                Some(true) => {
                    error!(target: crate::BLOCK_LOG, conn = self.id, hash = %b.hash, attempt = b.attempt + 1, "re-submitting held BLOCK SOLUTION on the resumed session");
                    b.job = Arc::new(Job { session: self.work.session, ..(*b.job).clone() });
                    self.send_submit(b, self.now);
                }
                Some(false) => self.give_up_block(b),
                None => self.unsent_blocks.push(b),
            }
        }
    }
}

/// Does a pool's error (`[22, "Duplicate share", null]`, or an object or
/// string saying so) mean "duplicate"? Code 22 is the Stratum convention;
/// the wording covers pools that use 20 for everything.
fn is_duplicate(error_json: &str) -> bool {
    reject_reason(Some(error_json)) == "duplicate"
}

/// A pool's reject sorted into the bounded set of the `reason` label of
/// `sluice_pool_shares_total`: by the words pools use (ckpool "Stale",
/// "Duplicate", "Above target"; public-pool "Difficulty too low"; DATUM
/// "high-hash"...), else by the conventional codes (21 job not found, 22
/// duplicate, 23 low difficulty).
pub fn reject_reason(error_json: Option<&str>) -> &'static str {
    let Some(e) = error_json else { return "other" };
    let v: serde_json::Value = serde_json::from_str(e).unwrap_or_default();
    let (code, text) = match &v {
        serde_json::Value::Array(a) => (a.first().and_then(|c| c.as_i64()), a.get(1).and_then(|m| m.as_str())),
        serde_json::Value::Object(o) => {
            (o.get("code").and_then(|c| c.as_i64()), o.get("message").and_then(|m| m.as_str()))
        }
        serde_json::Value::String(s) => (None, Some(s.as_str())),
        _ => (None, None),
    };
    // SV2 error codes are kebab-case (`difficulty-too-low`).
    let text = text.unwrap_or(e).to_ascii_lowercase().replace('-', " ");
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["duplicate"]) {
        "duplicate"
    } else if has(&["stale", "old job", "prev-hash", "prevhash"]) {
        "stale"
    } else if has(&["job not found", "unknown job", "invalid job", "job id"]) {
        "job not found"
    } else if has(&["low difficulty", "difficulty too low", "above target", "high hash", "low diff", "too low"]) {
        "low difficulty"
    } else {
        match code {
            Some(21) => "job not found",
            Some(22) => "duplicate",
            Some(23) => "low difficulty",
            _ => "other",
        }
    }
}

/// Pool rejects logged at warn with the pool's words, at most once per
/// [`RejectLog::EVERY`] per pool connection, with the count since.
#[derive(Default)]
pub struct RejectLog {
    last: Option<Instant>,
    since: u64,
}

impl RejectLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub(super) fn rejected(&mut self, conn: u64, pool: &str, reason: &'static str, said: &str, now: Instant) {
        self.since += 1;
        if self.last.is_none_or(|t| now.saturating_duration_since(t) >= Self::EVERY) {
            warn!(conn, pool, reason, rejected = self.since, "pool rejected a share: {said} (at most one line per 10 s per pool connection; rejected counts since the last)");
            self.last = Some(now);
            self.since = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::share::Hash256;
    use crate::stats::ShareCounters;
    use crate::upstream::PoolExtranonce2;
    use serde_json::Value;

    /// A pool session on one URL, as its connection task holds it.
    fn session() -> (PoolSession, Arc<ProxyStats>) {
        let url: crate::config::PoolUrl = "stratum+tcp://acct:pw@127.0.0.1:9".parse().unwrap();
        let settings = Arc::new(UpstreamSettings::from_config(&Config::default(), vec![url]).unwrap());
        let stats = Arc::new(ProxyStats::default());
        let (shared, work_tx, _, _) = super::super::conn::channels(1);
        (PoolSession::new(1, settings, stats.clone(), shared, work_tx, Instant::now()), stats)
    }

    /// What the session queued to send: (id, method, params), and clear it.
    fn sent(ps: &mut PoolSession) -> Vec<(Value, String, Value)> {
        let out = std::mem::take(&mut ps.out);
        out.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: Value = serde_json::from_slice(l).unwrap();
                (v["id"].clone(), v["method"].as_str().unwrap_or("").to_owned(), v["params"].clone())
            })
            .collect()
    }

    fn feed(ps: &mut PoolSession, established: &mut bool, line: &str) -> Option<End> {
        ps.on_line(line.as_bytes(), established, Instant::now()).unwrap()
    }

    fn subscribe_answer(id: &Value, en1: &str) -> String {
        format!(
            r#"{{"id":{id},"result":[[["mining.set_difficulty","d"],["mining.notify","sid-{en1}"]],"{en1}",8],"error":null}}"#
        )
    }

    /// A job on `tip` (the last byte of the prevhash).
    fn notify(job: &str, tip: u8) -> String {
        let prev = format!("{}{tip:02x}", "00".repeat(31));
        format!(
            r#"{{"id":null,"method":"mining.notify","params":["{job}","{prev}","01000000010000","ffffffff01",[],"20000000","1d00ffff","495fab29",true]}}"#
        )
    }

    /// A block solution on the newest job, as a miner session hands it over.
    fn block(ps: &PoolSession, stats: &Arc<ProxyStats>) -> UpstreamSubmit {
        let job = ps.work.jobs.last().unwrap().clone();
        ps.shared.handed.fetch_add(1, Ordering::Relaxed);
        UpstreamSubmit {
            extranonce2: PoolExtranonce2::new(job.pad_len, &[], &[0; 4]).unwrap(),
            job,
            worker: None,
            ntime: 0x495fab29,
            nonce: 7,
            version: 0x2000_0000,
            hash: Hash256::default(),
            header: [0; 80],
            is_block: true,
            stats: StatsPair { worker: Arc::new(ShareCounters::default()), proxy: stats.clone() },
            attempt: 0,
        }
    }

    /// Open a session and answer its subscribe with extranonce1 `en1`.
    fn subscribed(ps: &mut PoolSession, en1: &str) -> bool {
        let mut est = false;
        ps.start(0, Instant::now());
        let sub = sent(ps).into_iter().find(|(_, m, _)| m == "mining.subscribe").unwrap();
        feed(ps, &mut est, &subscribe_answer(&sub.0, en1));
        est
    }

    /// A block solution on job j1 of a session with extranonce1 `aabbccdd`,
    /// in flight when the session ended.
    fn held_block() -> (PoolSession, Arc<ProxyStats>) {
        let (mut ps, stats) = session();
        let mut est = subscribed(&mut ps, "aabbccdd");
        feed(&mut ps, &mut est, &notify("j1", 1));
        let b = block(&ps, &stats);
        ps.send_submit(b, Instant::now());
        let first = sent(&mut ps).pop().unwrap();
        assert_eq!((first.1.as_str(), &first.2[1]), ("mining.submit", &Value::from("j1")));
        ps.session_ended();
        assert_eq!(ps.unsent_blocks.len(), 1, "held, not counted as lost");
        assert_eq!(stats.shares.snapshot().pool_unanswered, 0);
        (ps, stats)
    }

    /// A pool gone quiet, or a share left unanswered, is judged on the
    /// times the session is given, not on the clock: no sleeping to test it.
    #[test]
    fn silence_and_an_unanswered_share_are_judged_on_the_times_given() {
        let (mut ps, stats) = session();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!((ps.settings.answer_timeout, ps.settings.silence_timeout), (at(30) - t0, at(300) - t0));
        let mut est = false;
        ps.start(0, t0);
        let sub = sent(&mut ps).into_iter().find(|(_, m, _)| m == "mining.subscribe").unwrap();
        ps.on_line(subscribe_answer(&sub.0, "aabbccdd").as_bytes(), &mut est, t0).unwrap();
        ps.on_line(notify("j1", 1).as_bytes(), &mut est, t0).unwrap();
        let b = block(&ps, &stats);
        ps.send_submit(b, at(10));
        let id = sent(&mut ps).pop().unwrap().0;
        // (seconds, a line from the pool then, what `unresponsive` says)
        let answer = format!(r#"{{"id":{id},"result":true,"error":null}}"#);
        let rows: &[(u64, Option<&str>, Option<&str>)] = &[
            (39, None, None),
            (
                40,
                None,
                Some("pool left a share unanswered for 30s (failover.answer_timeout_s): taking the path as dead"),
            ),
            (41, Some(&answer), None),
            (340, None, None),
            (341, None, Some("pool sent nothing for 300s (failover.silence_timeout_s)")),
        ];
        for (secs, line, want) in rows {
            if let Some(l) = line {
                ps.on_line(l.as_bytes(), &mut est, at(*secs)).unwrap();
            }
            assert_eq!(ps.unresponsive(at(*secs)).as_deref(), *want, "at {secs} s");
        }
        assert_eq!(stats.shares.snapshot().pool_accepted, 1);
    }

    /// A session starts: configure, subscribe, extranonce subscription, the
    /// account's authorize, in that order.
    #[test]
    fn a_session_opens_with_the_handshake_and_resumes_its_subscription() {
        let (mut ps, _) = session();
        ps.start(0, Instant::now());
        let methods: Vec<String> = sent(&mut ps).into_iter().map(|(_, m, _)| m).collect();
        assert_eq!(
            methods,
            ["mining.configure", "mining.subscribe", "mining.extranonce.subscribe", "mining.authorize"]
        );
        sent(&mut ps);
        assert!(subscribed(&mut ps, "aabbccdd") && ps.work.connected);
        ps.session_ended();
        ps.start(0, Instant::now());
        let sub = sent(&mut ps).into_iter().find(|(_, m, _)| m == "mining.subscribe").unwrap();
        assert_eq!(sub.2[1], "sid-aabbccdd", "the next subscribe asks to resume the session");
    }

    /// A block solution whose answer died with the session is held, resent
    /// on the resumed session (same pool, same extranonce1, same tip), and
    /// a "duplicate" answer to the resend is a credit, not a rejection.
    #[test]
    fn a_held_block_solution_is_resent_on_the_resumed_session_and_a_duplicate_is_credited() {
        let (mut ps, stats) = held_block();
        // The pool resumes the session: same extranonce1, a job on the same tip.
        let mut est = subscribed(&mut ps, "aabbccdd");
        feed(&mut ps, &mut est, &notify("j2", 1));
        let resent = sent(&mut ps).pop().unwrap();
        assert_eq!((resent.1.as_str(), &resent.2[1]), ("mining.submit", &Value::from("j1")), "its own job id");
        assert_eq!(stats.metrics.blocks_resent.get(), 1);
        feed(&mut ps, &mut est, &format!(r#"{{"id":{},"result":null,"error":[22,"Duplicate share",null]}}"#, resent.0));
        let s = stats.shares.snapshot();
        assert_eq!((s.pool_accepted, s.pool_rejected, s.pool_unanswered), (1, 0, 0), "{s:?}");
        assert_eq!(stats.metrics.blocks_credited_earlier.get(), 1);
        assert_eq!(ps.shared.outstanding(), 0);
    }

    /// Under another extranonce1 a held solution could not be credited: it
    /// waits, and is given up (counted unanswered) once the chain moves on.
    #[test]
    fn a_held_block_solution_is_never_sent_under_another_extranonce1_and_is_dropped_when_stale() {
        let (mut ps, stats) = held_block();
        let mut est = subscribed(&mut ps, "11223344");
        feed(&mut ps, &mut est, &notify("j2", 1));
        assert!(sent(&mut ps).iter().all(|(_, m, _)| m != "mining.submit"), "not under another extranonce1");
        assert_eq!(ps.unsent_blocks.len(), 1);
        feed(&mut ps, &mut est, &notify("j3", 2));
        assert!(ps.unsent_blocks.is_empty());
        assert_eq!(stats.metrics.blocks_given_up.get(), 1);
        assert_eq!(stats.shares.snapshot().pool_unanswered, 1);
    }

    /// A refused account ends the session as a refusal, not a blip.
    #[test]
    fn a_refused_account_is_told_apart_from_a_failure() {
        let (mut ps, _) = session();
        let mut est = false;
        ps.start(0, Instant::now());
        let auth = sent(&mut ps).into_iter().find(|(_, m, _)| m == "mining.authorize").unwrap();
        let end = feed(
            &mut ps,
            &mut est,
            &format!(r#"{{"id":{},"result":null,"error":[24,"Unauthorized worker",null]}}"#, auth.0),
        );
        assert!(
            matches!(end, Some(End::Refused(ref why)) if why.contains("Unauthorized worker")),
            "{:?}",
            end.is_some()
        );
    }

    #[test]
    fn duplicate_answers_are_recognised_in_the_forms_pools_send() {
        for (error, dup) in [
            (r#"[22, "Duplicate share", null]"#, true),
            (r#"[20, "duplicate", null]"#, true),
            (r#"{"code": 22, "message": "dup"}"#, true),
            (r#""Share is a DUPLICATE""#, true),
            (r#"[21, "Job not found", null]"#, false),
            (r#"[23, "Low difficulty share", null]"#, false),
            ("null", false),
        ] {
            assert_eq!(is_duplicate(error), dup, "{error}");
        }
    }

    /// Pools' reject answers sorted into the `reason` label's bounded set.
    #[test]
    fn pool_rejects_are_sorted_into_a_few_reasons() {
        for (error, want) in [
            (Some(r#"[21, "Stale", null]"#), "stale"),
            (Some(r#"[21, "Job not found (=stale)", null]"#), "stale"),
            (Some(r#"[21, "Job not found", null]"#), "job not found"),
            (Some(r#"[20, "unknown job id", null]"#), "job not found"),
            (Some(r#"[21, null, null]"#), "job not found"),
            (Some(r#"[22, "Duplicate share", null]"#), "duplicate"),
            (Some(r#"[23, "Low difficulty share", null]"#), "low difficulty"),
            (Some(r#"[20, "Above target", null]"#), "low difficulty"),
            (Some(r#"{"code": 23, "message": "Difficulty too low"}"#), "low difficulty"),
            (Some(r#""high-hash""#), "low difficulty"),
            (Some(r#"[23, null, null]"#), "low difficulty"),
            (Some(r#"[20, "Other/Unknown", null]"#), "other"),
            (Some(r#"[24, "Unauthorized worker", null]"#), "other"),
            (Some("null"), "other"),
            (None, "other"),
        ] {
            assert_eq!(reject_reason(error), want, "{error:?}");
        }
    }
}
