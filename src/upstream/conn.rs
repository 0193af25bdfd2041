//! One upstream connection: a task that owns the pool socket, walks the
//! failover list, turns pool messages into published [`Work`], and forwards
//! shares. Block solutions are drained before anything else.

use super::extranonce::{Layout, PrefixAlloc};
use super::failover::Failover;
use super::{Cmd, ConnShared, Job, UpstreamSettings, UpstreamSubmit, Work, NEXT_JOB_SEQ};
use crate::config::WorkerMode;
use crate::share::{Difficulty, JobTemplate};
use crate::stats::{ProxyStats, StatsPair};
use crate::stratum::{self, encode, Envelope, LineCodec, Notify, ServerMessage};
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, error, info, warn};

const CMD_QUEUE: usize = 4096;
const BLOCK_QUEUE: usize = 64;

pub(super) fn spawn(
    rt: &tokio::runtime::Handle,
    id: u64,
    keeper: bool,
    settings: Arc<UpstreamSettings>,
    stats: Arc<ProxyStats>,
) -> Arc<ConnShared> {
    let (work_tx, work_rx) = watch::channel(Arc::new(Work::new()));
    let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
    let (block_tx, block_rx) = mpsc::channel(BLOCK_QUEUE);
    let shared = Arc::new(ConnShared {
        id,
        work: work_rx,
        alloc: Mutex::new(PrefixAlloc::new(0)),
        cmd: cmd_tx,
        blocks: block_tx,
        closed: AtomicBool::new(false),
        outstanding: Default::default(),
        retired: AtomicBool::new(false),
    });
    let fo =
        Failover::new(settings.urls.len(), settings.backoff_initial, settings.backoff_max, settings.primary_stable);
    let conn = Conn {
        id,
        keeper,
        settings,
        stats,
        shared: shared.clone(),
        work: Work::new(),
        work_tx,
        cmd_rx,
        block_rx,
        fo,
        next_id: 1,
        pending: HashMap::new(),
        workers: HashMap::new(),
        waiting_auth: Vec::new(),
        unsent_blocks: Vec::new(),
        resume: None,
        out: Vec::with_capacity(4096),
        idle_since: None,
        sent_submits: Default::default(),
        last_rx: Instant::now(),
    };
    rt.spawn(conn.run());
    shared
}

enum Pending {
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

enum End {
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

struct Conn {
    id: u64,
    keeper: bool,
    settings: Arc<UpstreamSettings>,
    stats: Arc<ProxyStats>,
    shared: Arc<ConnShared>,
    work: Work,
    work_tx: watch::Sender<Arc<Work>>,
    cmd_rx: mpsc::Receiver<Cmd>,
    block_rx: mpsc::Receiver<UpstreamSubmit>,
    fo: Failover,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Worker names authorized upstream (per-worker modes) and the answer.
    workers: HashMap<Arc<str>, bool>,
    /// Authorize requests waiting for a session or an answer.
    waiting_auth: Vec<(Arc<str>, oneshot::Sender<bool>)>,
    /// Block solutions whose session ended unanswered: sent again when a
    /// session of the same pool resumes with the same extranonce1, until the
    /// chain moves on. Not capped: each one took a block's worth of work.
    unsent_blocks: Vec<UpstreamSubmit>,
    /// The last session's subscription id and its pool (URL index), sent
    /// with the next subscribe to that pool to keep the extranonce1.
    resume: Option<(usize, String)>,
    out: Vec<u8>,
    idle_since: Option<Instant>,
    /// Submits sent this session, oldest first (answered ones are dropped
    /// lazily), to catch a pool that stopped answering.
    sent_submits: std::collections::VecDeque<(u64, Instant)>,
    /// When the pool last sent a line.
    last_rx: Instant,
}

impl Conn {
    fn publish(&self) {
        self.work_tx.send_replace(Arc::new(self.work.clone()));
    }

    fn request<P: serde::Serialize + ?Sized>(&mut self, method: &str, params: &P, p: Pending) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode::request(&mut self.out, id, method, params);
        self.pending.insert(id, p);
        id
    }

    async fn run(mut self) {
        loop {
            let idx = self.fo.current();
            let end = self.session(idx).await;
            self.session_ended();
            match end {
                End::Idle => break,
                End::ReturnToPrimary => {
                    info!(conn = self.id, "returning to the primary pool {}", self.settings.urls[0]);
                    self.fo.return_to_primary();
                }
                End::Reconnect(wait) => {
                    info!(conn = self.id, "pool asked to reconnect in {wait:?}");
                    if self.wait(wait).await {
                        break;
                    }
                }
                End::Failed(why) => {
                    let url = &self.settings.urls[idx];
                    let delay = self.fo.failed();
                    warn!(conn = self.id, pool = %url, "upstream failed: {why}; next {} in {delay:?}", self.settings.urls[self.fo.current()]);
                    if self.fo.current() != idx {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.wait(delay).await {
                        break;
                    }
                }
                End::Refused(why) => {
                    let url = &self.settings.urls[idx];
                    let delay = self.fo.refused();
                    error!(conn = self.id, pool = %url, "{why}: check the account and password in this pool URL; next {} in {delay:?}", self.settings.urls[self.fo.current()]);
                    if self.fo.current() != idx {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.wait(delay).await {
                        break;
                    }
                }
            }
        }
        self.shared.closed.store(true, Ordering::Relaxed);
        self.work.connected = false;
        self.publish();
        for b in std::mem::take(&mut self.unsent_blocks) {
            error!(conn = self.id, hash = %b.hash, header = %hex::encode(b.header), "upstream connection closing with a held BLOCK SOLUTION; giving up");
            self.finished(&b.stats, true);
            self.stats.metrics.blocks_given_up.inc();
        }
        debug!(conn = self.id, "upstream connection closed");
    }

    /// Tidy up after a session: whatever was in flight will never be answered.
    fn session_ended(&mut self) {
        if self.work.connected {
            self.stats.upstreams_connected.fetch_sub(1, Ordering::Relaxed);
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Pending::Submit { stats, is_block, sub, .. } = p {
                match (is_block, sub) {
                    // Still outstanding: resent on the next session.
                    (true, Some(s)) => self.unsent_blocks.push(*s),
                    _ => self.finished(&stats, true),
                }
            }
        }
        self.work.connected = false;
        self.work.jobs.clear();
        self.publish();
    }

    /// Sleep between sessions while still serving the queues: submits for a
    /// dead session cannot be credited and are counted as unanswered, block
    /// solutions are kept for the next session. Returns true when the
    /// connection should close.
    async fn wait(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                biased;
                Some(b) = self.block_rx.recv() => self.unsent_blocks.push(b),
                Some(c) = self.cmd_rx.recv() => match c {
                    Cmd::Submit(s) => self.finished(&s.stats, true),
                    Cmd::Authorize { worker, reply } => self.waiting_auth.push((worker, reply)),
                },
                _ = tokio::time::sleep_until(until) => return self.idle_expired(),
            }
        }
    }

    fn idle_expired(&mut self) -> bool {
        let retired = self.shared.retired.load(Ordering::Relaxed);
        if (self.keeper && !retired) || self.work.layout.is_none() {
            return false;
        }
        let in_use = self.shared.alloc.lock().in_use();
        if in_use > 0 {
            self.idle_since = None;
            return false;
        }
        if retired {
            return true; // replaced by a reload, and no miner is left
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        since.elapsed() >= self.settings.idle_close
    }

    async fn session(&mut self, idx: usize) -> End {
        let url = self.settings.urls[idx].clone();
        let stream = match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(url.addr())).await {
            Err(_) => return End::Failed(format!("connect to {} timed out", url.addr())),
            Ok(Err(e)) => return End::Failed(format!("connect to {}: {e}", url.addr())),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        // A blackholed path (packets dropped, nothing closed) is noticed by
        // the kernel after 30 s idle + 3 probes 10 s apart.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            warn!(conn = self.id, "cannot enable TCP keepalive: {e}");
        }
        let (r, mut w) = stream.into_split();
        let mut lines = FramedRead::new(r, LineCodec::new(self.settings.max_line));
        self.work.url_index = idx;

        self.out.clear();
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
        if let Err(e) = self.flush(&mut w).await {
            return End::Failed(e);
        }

        self.sent_submits.clear();
        self.last_rx = Instant::now();
        let handshake_deadline = Instant::now() + self.settings.handshake_timeout;
        let mut established = false;
        let mut tick = tokio::time::interval(
            self.settings.probe_interval.min(Duration::from_secs(1)).max(Duration::from_millis(100)),
        );
        let mut next_probe = Instant::now() + self.settings.probe_interval;
        let (probe_tx, mut probe_rx) = mpsc::channel::<bool>(1);
        let mut probing = false;

        loop {
            let end = tokio::select! {
                biased;
                Some(b) = self.block_rx.recv() => { self.send_submit(b); None }
                line = lines.next() => match line {
                    None => Some(End::Failed("pool closed the connection".into())),
                    Some(Err(e)) => Some(End::Failed(format!("read: {e}"))),
                    Some(Ok(l)) => match self.on_line(&l, &mut established) {
                        Ok(e) => e,
                        Err(e) => Some(End::Failed(e)),
                    },
                },
                Some(c) = self.cmd_rx.recv() => { self.on_cmd(c, &url.password); None }
                Some(up) = probe_rx.recv() => {
                    probing = false;
                    self.fo.primary_probe(up, std::time::Instant::now()).then_some(End::ReturnToPrimary)
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if !established && now >= handshake_deadline {
                        Some(End::Failed("pool did not answer subscribe in time".into()))
                    } else if let Some(why) = self.unresponsive() {
                        Some(End::Failed(why))
                    } else if established && !self.fo.on_primary() && !probing && now >= next_probe {
                        next_probe = now + self.settings.probe_interval;
                        probing = true;
                        let (addr, t, tx) = (self.settings.urls[0].addr(), self.settings.connect_timeout, probe_tx.clone());
                        tokio::spawn(async move {
                            let up = matches!(tokio::time::timeout(t, TcpStream::connect(addr)).await, Ok(Ok(_)));
                            let _ = tx.send(up).await;
                        });
                        None
                    } else if self.idle_expired() {
                        Some(End::Idle)
                    } else {
                        None
                    }
                }
            };
            if let Err(e) = self.flush(&mut w).await {
                return End::Failed(e);
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Has the pool stopped answering (`failover.answer_timeout_s`) or gone
    /// silent (`failover.silence_timeout_s`)?
    fn unresponsive(&mut self) -> Option<String> {
        while let Some((id, _)) = self.sent_submits.front() {
            if self.pending.contains_key(id) {
                break;
            }
            self.sent_submits.pop_front();
        }
        if let Some((_, sent)) = self.sent_submits.front() {
            if sent.elapsed() >= self.settings.answer_timeout {
                return Some(format!(
                    "pool left a share unanswered for {:.0?} (failover.answer_timeout_s): taking the path as dead",
                    sent.elapsed()
                ));
            }
        }
        let quiet = self.last_rx.elapsed();
        (quiet >= self.settings.silence_timeout)
            .then(|| format!("pool sent nothing for {quiet:.0?} (failover.silence_timeout_s)"))
    }

    /// Write what is queued. A pool that stops reading would otherwise
    /// stall this task (and, through the bounded queues, the miners
    /// submitting to it): a write that takes longer than
    /// `failover.write_timeout_s` loses the session like a dead path.
    async fn flush(&mut self, w: &mut OwnedWriteHalf) -> Result<(), String> {
        let r = write_within(w, &self.out, self.settings.write_timeout).await;
        self.out.clear();
        r
    }

    fn on_cmd(&mut self, c: Cmd, password: &str) {
        match c {
            Cmd::Submit(s) => self.send_submit(s),
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

    fn send_submit(&mut self, mut s: UpstreamSubmit) {
        if !self.work.connected || s.job.session != self.work.session {
            if !s.is_block {
                self.finished(&s.stats, true);
                return;
            }
            // A block solution of an earlier session: held, and sent at once
            // if this session can take it (see `resend_blocks`).
            error!(conn = self.id, hash = %s.hash, "BLOCK SOLUTION for an ended pool session; held for a session that resumes it");
            self.unsent_blocks.push(s);
            return self.resend_blocks();
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
            error!(conn = self.id, hash = %s.hash, header = %hex::encode(s.header), pool_job = %s.job.pool_job_id,
                extranonce2 = %en2, "BLOCK SOLUTION found; submitting to the pool first");
        }
        let params = (worker, s.job.pool_job_id.clone(), en2, ntime, nonce);
        let is_block = s.is_block;
        let attempt = s.attempt;
        s.attempt += 1;
        let keep = is_block.then(|| Box::new(s));
        let pending =
            Pending::Submit { stats: stats.clone(), is_block, resent: attempt > 0, sub: keep, sent: Instant::now() };
        let id = match rolled {
            Some(v) => {
                let p = (params.0, params.1, params.2, params.3, params.4, format!("{v:08x}"));
                self.request("mining.submit", &p, pending)
            }
            None => self.request("mining.submit", &params, pending),
        };
        self.sent_submits.push_back((id, Instant::now()));
        if attempt == 0 {
            stats.forwarded();
        } else {
            self.stats.metrics.blocks_resent.inc();
        }
    }

    /// A forwarded share reached its end: answered, or (flagged) never will be.
    fn finished(&self, stats: &StatsPair, unanswered: bool) {
        self.shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        if unanswered {
            stats.pool_unanswered();
        }
    }

    fn on_line(&mut self, line: &[u8], established: &mut bool) -> Result<Option<End>, String> {
        self.last_rx = Instant::now();
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
                            return Ok(Some(End::Refused(format!("pool refused the account {worker}: {why}"))));
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
                        self.finished(&stats, false);
                        let m = &self.stats.metrics;
                        m.pool_rtt_seconds.observe(sent.elapsed().as_secs_f64());
                        // A resent block solution the pool calls a duplicate
                        // was taken the first time; only its answer was lost
                        // with the session. It is credited, not refused.
                        let credited_earlier = !ok && resent && error.is_some_and(|e| is_duplicate(e.get()));
                        if credited_earlier {
                            m.blocks_credited_earlier.inc();
                            info!(
                                conn = self.id,
                                "resent BLOCK SOLUTION was credited the first time (pool: duplicate)"
                            );
                        }
                        let ok = ok || credited_earlier;
                        m.pool_answer(&self.settings.urls[self.work.url_index].addr(), ok);
                        if ok {
                            stats.pool_accepted();
                        } else {
                            stats.pool_rejected();
                            debug!(
                                conn = self.id,
                                "pool rejected share: {}",
                                error.map(|e| e.get()).unwrap_or("false")
                            );
                        }
                        if is_block {
                            error!(
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
    fn apply_extranonce(&mut self, en1: Vec<u8>, en2: usize) {
        let en1: Arc<[u8]> = en1.into();
        let passthrough = self.settings.mode == WorkerMode::Passthrough;
        let kept = self.work.layout.and_then(|l| l.pad_for(en2).map(|pad| (l, pad)));
        match kept {
            Some((l, pad)) => {
                self.work.pad_len = pad;
                if l.is_classic() && *en1 != *self.work.pool_en1 {
                    self.work.en1_epoch += 1;
                }
            }
            None => {
                let l = Layout::for_pool(en2, passthrough);
                let mut a = self.shared.alloc.lock();
                a.reset(l.capacity(passthrough));
                self.work.alloc_epoch = a.epoch;
                self.work.layout = Some(l);
                self.work.pad_len = l.pad_for(en2).unwrap_or(0);
                self.work.en1_epoch += 1;
            }
        }
        self.work.pool_en1 = en1;
        self.work.session += 1;
        self.work.connected = true;
        self.work.jobs.clear();
        self.publish();
    }

    fn on_notify(&mut self, n: Notify) {
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
    fn resendable(&self, job: &Job) -> Option<bool> {
        let newest = self.work.jobs.last()?;
        if newest.template.prevhash != job.template.prevhash {
            return Some(false);
        }
        (self.work.connected && job.url_index == self.work.url_index && *job.pool_en1 == *self.work.pool_en1)
            .then_some(true)
    }

    fn give_up_block(&self, b: UpstreamSubmit) {
        error!(conn = self.id, hash = %b.hash, header = %hex::encode(b.header), "held BLOCK SOLUTION is stale (the chain moved on); giving up");
        self.finished(&b.stats, true);
        self.stats.metrics.blocks_given_up.inc();
    }

    /// Every new job decides for the held block solutions: send, drop as
    /// stale, or keep holding.
    fn resend_blocks(&mut self) {
        for mut b in std::mem::take(&mut self.unsent_blocks) {
            match self.resendable(&b.job) {
                Some(true) => {
                    error!(conn = self.id, hash = %b.hash, attempt = b.attempt + 1, "re-submitting held BLOCK SOLUTION on the resumed session");
                    b.job = Arc::new(Job { session: self.work.session, ..(*b.job).clone() });
                    self.send_submit(b);
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
    let v: serde_json::Value = serde_json::from_str(error_json).unwrap_or_default();
    let code = match &v {
        serde_json::Value::Array(a) => a.first().and_then(|c| c.as_i64()),
        serde_json::Value::Object(o) => o.get("code").and_then(|c| c.as_i64()),
        _ => None,
    };
    code == Some(22) || error_json.to_ascii_lowercase().contains("duplicate")
}

/// Write all of `buf` within `limit`, or say why not.
async fn write_within<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, buf: &[u8], limit: Duration) -> Result<(), String> {
    if buf.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(limit, w.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!(
            "pool took none of our last {} bytes for {limit:?} (failover.write_timeout_s): taking it as stuck",
            buf.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A pool that stops reading: the write gives up at the limit (paused
    /// time, so no real waiting) instead of blocking the task forever.
    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_pool_that_stopped_reading_times_out() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let limit = Duration::from_secs(10);
        // Fits the pipe: written at once.
        assert_eq!(write_within(&mut ours, &[b'x'; 64], limit).await, Ok(()));
        let t0 = Instant::now();
        let e = write_within(&mut ours, &[b'y'; 1024], limit).await.unwrap_err();
        assert!(e.contains("failover.write_timeout_s"), "{e}");
        assert_eq!(t0.elapsed(), limit);
        // A pool that reads again is written to again.
        let mut got = vec![0u8; 1024];
        tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut got[..64]).await.unwrap();
        assert_eq!(write_within(&mut ours, b"z\n", limit).await, Ok(()));
    }
}
