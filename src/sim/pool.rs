//! `sluice sim-pool`: a Stratum V1 pool for tests and the demo. It validates
//! every share it receives with the same share module the proxy uses (which
//! the mainnet vectors pin), and can be told to change difficulty, announce a
//! new block, change extranonces and drop connections.

use crate::share::{check_share, Difficulty, JobTemplate, PrevHash, ShareError, ShareRules, Submission, Target};
use crate::stratum::{self, code, encode, ClientRequest, Envelope, LineCodec};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

#[derive(Debug, Clone)]
pub struct SimPoolConfig {
    pub listen: SocketAddr,
    pub extranonce2_size: usize,
    pub difficulty: f64,
    /// Difficulty of the simulated network (sets nBits). Shares meeting it
    /// are blocks.
    pub network_difficulty: f64,
    /// A new (non-clean) job this often.
    pub job_interval: Duration,
    pub merkle_depth: usize,
    pub version_mask: u32,
    /// Seconds a submit's answer is delayed (a slow pool).
    pub answer_delay: Duration,
    /// The chain tip of the first job (random when None): a restarted pool
    /// given its predecessor's tip is on the same block.
    pub start_prevhash: Option<PrevHash>,
    /// Answer a subscribe that names a session (`params[1]`) with an error,
    /// like a pool that does not know the two-parameter form.
    pub refuse_session_ids: bool,
    /// Refuse to authorize this account (a worker name `acct` or `acct.x`),
    /// as a pool answers bad credentials.
    pub refuse_account: Option<String>,
}

impl Default for SimPoolConfig {
    fn default() -> Self {
        SimPoolConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            extranonce2_size: 8,
            difficulty: 0.0001,
            network_difficulty: 1e12,
            job_interval: Duration::from_secs(30),
            merkle_depth: 6,
            version_mask: 0x1fff_e000,
            answer_delay: Duration::ZERO,
            start_prevhash: None,
            refuse_session_ids: false,
            refuse_account: None,
        }
    }
}

/// What the pool saw.
#[derive(Default, Debug)]
pub struct SimPoolStats {
    pub connections: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub blocks: AtomicU64,
    pub jobs: AtomicU64,
    /// Subscribes that resumed an earlier session (same extranonce1).
    pub resumed: AtomicU64,
    /// Authorizations refused (`refuse_account`).
    pub refused: AtomicU64,
    /// Accepted shares per worker name.
    pub per_worker: Mutex<HashMap<String, u64>>,
    /// Rejections by reason.
    pub reasons: Mutex<HashMap<&'static str, u64>>,
    /// The lowest difficulty any accepted share achieved (f64 bits).
    pub min_accepted_difficulty: Mutex<Option<f64>>,
    /// Every (user, password) pair a client authorized with, as received.
    pub credentials: Mutex<Vec<(String, String)>>,
}

#[derive(Debug, Clone)]
enum Event {
    SetDifficulty(f64),
    SetVersionMask(u32),
    SetExtranonce,
    Drop,
}

struct PoolJob {
    id: String,
    template: JobTemplate,
    notify: Bytes,
}

/// The published job: every connection serves the latest.
#[derive(Clone)]
struct JobState {
    job: Arc<PoolJob>,
    clean_seq: u64,
}

struct Shared {
    cfg: SimPoolConfig,
    stats: Arc<SimPoolStats>,
    jobs: watch::Receiver<JobState>,
    events: broadcast::Sender<Event>,
    next_en1: AtomicU64,
    difficulty: Mutex<f64>,
    /// Like a real pool, jobs and the duplicate memory are pool-wide: a
    /// resumed session may still submit to the jobs of its earlier one, and
    /// a share is a duplicate whichever connection brings it.
    recent: Mutex<Vec<Arc<PoolJob>>>,
    seen: Mutex<HashSet<(String, u64)>>,
    /// Extranonce1 of ended sessions by subscription id, for resumption.
    ended: Mutex<HashMap<String, Vec<u8>>>,
}

/// How many ended sessions the pool remembers for resumption.
const RESUMABLE: usize = 4096;
/// Jobs a client may still submit to.
const JOB_HISTORY: usize = 16;

/// A running sim-pool. Dropping it stops the listener and drops every client.
pub struct SimPool {
    pub addr: SocketAddr,
    pub stats: Arc<SimPoolStats>,
    shared: Arc<Shared>,
    jobs_tx: Arc<watch::Sender<JobState>>,
    tasks: Vec<JoinHandle<()>>,
}

fn coinbase_parts(height: u32, en_total: usize) -> (Vec<u8>, Vec<u8>) {
    let tag = b"/sluice-sim/";
    let height_push = {
        let b = height.to_le_bytes();
        let n = 4 - b.iter().rev().take_while(|&&x| x == 0).count().min(3);
        let mut v = vec![n as u8];
        v.extend_from_slice(&b[..n]);
        v
    };
    let script_len = height_push.len() + en_total + 1 + tag.len();
    let mut c1 =
        hex::decode("01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff").expect("hex");
    c1.push(script_len as u8);
    c1.extend_from_slice(&height_push);
    let mut c2 = vec![tag.len() as u8];
    c2.extend_from_slice(tag);
    c2.extend_from_slice(&[0xff; 4]); // sequence
    c2.push(1); // one output
    c2.extend_from_slice(&5_000_000_000u64.to_le_bytes());
    c2.extend_from_slice(&[1, 0x51]); // OP_TRUE
    c2.extend_from_slice(&[0; 4]); // lock time
    (c1, c2)
}

fn make_job(cfg: &SimPoolConfig, seq: u64, prevhash: PrevHash, height: u32, clean: bool) -> PoolJob {
    let (c1, c2) = coinbase_parts(height, 4 + cfg.extranonce2_size);
    let branch: Vec<[u8; 32]> = (0..cfg.merkle_depth).map(|_| std::array::from_fn(|_| fastrand::u8(..))).collect();
    let nbits = Difficulty::new(cfg.network_difficulty).unwrap_or(Difficulty::ONE).to_target().to_compact_lossy();
    let ntime =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0);
    let id = format!("{seq:x}");
    let notify = encode::notify(&encode::NotifyFields {
        job_id: &id,
        prevhash,
        coinb1: &[&c1],
        coinb2: &c2,
        merkle_branch: &branch,
        version: 0x2000_0000,
        nbits,
        ntime,
        clean_jobs: clean,
    });
    PoolJob { id, template: JobTemplate::new(0x2000_0000, prevhash, &[&c1], c2, branch, nbits, ntime), notify }
}

fn random_prevhash() -> PrevHash {
    PrevHash(std::array::from_fn(|_| fastrand::u8(..)))
}

impl SimPool {
    pub async fn start(cfg: SimPoolConfig) -> std::io::Result<SimPool> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let first = make_job(&cfg, 1, cfg.start_prevhash.unwrap_or_else(random_prevhash), 800_000, true);
        let (jobs_tx, jobs_rx) = watch::channel(JobState { job: Arc::new(first), clean_seq: 1 });
        let recent = Mutex::new(vec![jobs_rx.borrow().job.clone()]);
        let (events, _) = broadcast::channel(64);
        let stats = Arc::new(SimPoolStats::default());
        stats.jobs.fetch_add(1, Relaxed);
        let shared = Arc::new(Shared {
            difficulty: Mutex::new(cfg.difficulty),
            cfg,
            stats: stats.clone(),
            jobs: jobs_rx,
            events,
            // Each pool instance its own extranonce1 space, as after a real
            // pool restart: a new session never reuses an old one by chance.
            next_en1: AtomicU64::new(u64::from(fastrand::u32(..))),
            recent,
            seen: Mutex::new(HashSet::new()),
            ended: Mutex::new(HashMap::new()),
        });
        let jobs_tx = Arc::new(jobs_tx);
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    tokio::spawn(serve_client(s, shared.clone()));
                }
            })
        };
        let ticker = {
            let (shared, tx) = (shared.clone(), jobs_tx.clone());
            tokio::spawn(async move {
                let mut t = tokio::time::interval(shared.cfg.job_interval);
                t.tick().await;
                loop {
                    t.tick().await;
                    publish(&shared, &tx, false);
                }
            })
        };
        Ok(SimPool { addr, stats, shared, jobs_tx, tasks: vec![accept, ticker] })
    }

    pub fn url(&self, user: &str) -> crate::config::PoolUrl {
        crate::config::PoolUrl::parse(&format!("stratum+tcp://{user}:x@{}", self.addr))
            .expect("a user name without reserved characters and a socket address make a URL")
    }

    /// Change the share difficulty of every client (sent before the next job).
    pub fn set_difficulty(&self, d: f64) {
        *self.shared.difficulty.lock() = d;
        let _ = self.shared.events.send(Event::SetDifficulty(d));
    }
    /// Narrow (or widen) the version-rolling mask of every client that
    /// negotiated one.
    pub fn set_version_mask(&self, mask: u32) {
        let _ = self.shared.events.send(Event::SetVersionMask(mask));
    }
    /// A new block on the network: new prevhash, clean_jobs.
    pub fn new_block(&self) {
        publish(&self.shared, &self.jobs_tx, true);
    }
    /// A new job on the same block (clean_jobs false).
    pub fn new_job(&self) {
        publish(&self.shared, &self.jobs_tx, false);
    }
    /// Give every client that subscribed to extranonce changes a new extranonce1.
    pub fn change_extranonce(&self) {
        let _ = self.shared.events.send(Event::SetExtranonce);
    }
    /// The prevhash of the current job.
    pub fn tip(&self) -> PrevHash {
        self.jobs_tx.borrow().job.template.prevhash
    }
    /// Close every client connection (the listener stays up).
    pub fn drop_connections(&self) {
        let _ = self.shared.events.send(Event::Drop);
    }
    pub fn accepted_for(&self, worker: &str) -> u64 {
        self.stats.per_worker.lock().get(worker).copied().unwrap_or(0)
    }
}

impl Drop for SimPool {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.shared.events.send(Event::Drop);
    }
}

fn publish(shared: &Shared, tx: &watch::Sender<JobState>, clean: bool) {
    let cur = tx.borrow().clone();
    let seq = u64::from_str_radix(&cur.job.id, 16).unwrap_or(0) + 1;
    let (prev, height) =
        if clean { (random_prevhash(), 800_000 + seq as u32) } else { (cur.job.template.prevhash, 800_000) };
    let job = Arc::new(make_job(&shared.cfg, seq, prev, height, clean));
    shared.stats.jobs.fetch_add(1, Relaxed);
    {
        let mut recent = shared.recent.lock();
        if clean {
            recent.clear();
            shared.seen.lock().clear();
        }
        recent.push(job.clone());
        let n = recent.len();
        recent.drain(..n.saturating_sub(JOB_HISTORY));
    }
    tx.send_replace(JobState { job, clean_seq: if clean { seq } else { cur.clean_seq } });
}

struct Client {
    en1: Vec<u8>,
    mask: u32,
    subscribed: bool,
    authorized: bool,
    extranonce_sub: bool,
    target: Target,
    jobs: Vec<Arc<PoolJob>>,
}

async fn serve_client(stream: TcpStream, shared: Arc<Shared>) {
    shared.stats.connections.fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut lines = FramedRead::new(r, LineCodec::new(64 * 1024));
    let mut jobs = shared.jobs.clone();
    let mut events = shared.events.subscribe();
    let en1 = (shared.next_en1.fetch_add(1, Relaxed) as u32).to_be_bytes().to_vec();
    let mut c = Client {
        en1,
        mask: 0,
        subscribed: false,
        authorized: false,
        extranonce_sub: false,
        target: Difficulty::new(*shared.difficulty.lock()).unwrap_or(Difficulty::ONE).to_target(),
        jobs: Vec::new(),
    };
    let mut out = Vec::new();
    loop {
        tokio::select! {
            line = lines.next() => {
                let Some(Ok(line)) = line else { break };
                let was_live = c.subscribed && c.authorized;
                handle_line(&shared, &mut c, &line, &mut out).await;
                if !was_live && c.subscribed && c.authorized {
                    encode::set_difficulty(&mut out, c.target.difficulty());
                    let j = jobs.borrow_and_update().job.clone();
                    out.extend_from_slice(&j.notify);
                    // A resumed session keeps the recent jobs it was given.
                    if !c.jobs.iter().any(|x| Arc::ptr_eq(x, &j)) {
                        c.jobs.push(j);
                    }
                }
            }
            r = jobs.changed() => {
                if r.is_err() { break; }
                let st = jobs.borrow_and_update().clone();
                if c.subscribed && c.authorized {
                    if st.clean_seq == u64::from_str_radix(&st.job.id, 16).unwrap_or(0) {
                        c.jobs.clear();
                    }
                    out.extend_from_slice(&st.job.notify);
                    c.jobs.push(st.job.clone());
                    let n = c.jobs.len();
                    c.jobs.drain(..n.saturating_sub(JOB_HISTORY));
                }
            }
            ev = events.recv() => match ev {
                Ok(Event::Drop) | Err(broadcast::error::RecvError::Closed) => break,
                Ok(Event::SetDifficulty(d)) => {
                    if let Some(d) = Difficulty::new(d) {
                        c.target = d.to_target();
                        if c.subscribed { encode::set_difficulty(&mut out, d); }
                    }
                }
                Ok(Event::SetVersionMask(m)) => {
                    if c.mask != 0 {
                        c.mask = m;
                        encode::set_version_mask(&mut out, m);
                    }
                }
                Ok(Event::SetExtranonce) => {
                    if c.extranonce_sub {
                        c.en1 = (shared.next_en1.fetch_add(1, Relaxed) as u32).to_be_bytes().to_vec();
                        encode::set_extranonce(&mut out, &c.en1, shared.cfg.extranonce2_size);
                        // Old jobs are void under the new extranonce; resend the latest.
                        let j = jobs.borrow().job.clone();
                        c.jobs = vec![j.clone()];
                        out.extend_from_slice(&j.notify);
                    }
                }
                Err(_) => {}
            }
        }
        if !out.is_empty() {
            if w.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    shared.stats.connections.fetch_sub(1, Relaxed);
    if c.subscribed {
        let mut ended = shared.ended.lock();
        if ended.len() >= RESUMABLE {
            ended.clear(); // crude, but bounded; a test pool needs no LRU
        }
        ended.insert(hex::encode(&c.en1), c.en1);
    }
}

async fn handle_line(shared: &Shared, c: &mut Client, line: &[u8], out: &mut Vec<u8>) {
    let Ok(env) = Envelope::parse(line) else {
        encode::error(out, None, code::OTHER, "parse error");
        return;
    };
    if env.method.is_none() {
        return;
    }
    let req = match ClientRequest::from_envelope(&env) {
        Ok(r) => r,
        Err(e) => return encode::error(out, env.id, code::OTHER, &e.to_string()),
    };
    let id = env.id;
    match req {
        ClientRequest::Configure(cfg) => {
            let mut m = serde_json::Map::new();
            if cfg.extensions.iter().any(|e| e == "version-rolling") {
                c.mask = cfg.version_rolling_mask.unwrap_or(u32::MAX) & shared.cfg.version_mask;
                m.insert("version-rolling".into(), true.into());
                m.insert("version-rolling.mask".into(), format!("{:08x}", c.mask).into());
            }
            encode::result(out, id, &m);
        }
        ClientRequest::Subscribe { session: Some(_), .. } if shared.cfg.refuse_session_ids => {
            encode::error(out, id, code::OTHER, "unexpected subscribe parameters");
        }
        ClientRequest::Subscribe { session, .. } => {
            // A known session id resumes that session: its extranonce1 and
            // the pool's recent jobs (as ckpool does).
            if let Some(en1) = session.and_then(|s| shared.ended.lock().remove(&s)) {
                c.en1 = en1;
                c.jobs = shared.recent.lock().clone();
                shared.stats.resumed.fetch_add(1, Relaxed);
            }
            c.subscribed = true;
            encode::subscribe_result(out, id, &hex::encode(&c.en1), &c.en1, shared.cfg.extranonce2_size);
        }
        ClientRequest::Authorize { .. } => {
            let creds: Vec<String> = env.params.and_then(|p| serde_json::from_str(p.get()).ok()).unwrap_or_default();
            if let [user, password, ..] = creds.as_slice() {
                shared.stats.credentials.lock().push((user.clone(), password.clone()));
            }
            let account = creds.first().map(|u| u.split('.').next().unwrap_or_default());
            if account.is_some_and(|a| shared.cfg.refuse_account.as_deref() == Some(a)) {
                shared.stats.refused.fetch_add(1, Relaxed);
                encode::error(out, id, code::UNAUTHORIZED, "Unauthorized worker");
                return;
            }
            c.authorized = true;
            encode::result(out, id, &true);
        }
        ClientRequest::ExtranonceSubscribe => {
            c.extranonce_sub = true;
            encode::result(out, id, &true);
        }
        ClientRequest::SuggestDifficulty(_) => encode::result(out, id, &true),
        ClientRequest::Ping => encode::result(out, id, "pong"),
        ClientRequest::GetVersion => encode::result(out, id, "sluice-sim-pool"),
        ClientRequest::Unknown(_) => encode::error(out, id, code::OTHER, "unknown method"),
        ClientRequest::Submit(s) => {
            if !shared.cfg.answer_delay.is_zero() {
                tokio::time::sleep(shared.cfg.answer_delay).await;
            }
            let r = check_submit(shared, c, &s);
            match r {
                Ok(()) => encode::result(out, id, &true),
                Err(e) => {
                    shared.stats.rejected.fetch_add(1, Relaxed);
                    *shared.stats.reasons.lock().entry(e.reason()).or_default() += 1;
                    encode::error(out, id, e.code(), &e.to_string());
                }
            }
        }
    }
}

fn check_submit(shared: &Shared, c: &mut Client, s: &stratum::Submit<'_>) -> Result<(), ShareError> {
    if !c.authorized {
        return Err(ShareError::Malformed("unauthorized"));
    }
    let job = c.jobs.iter().find(|j| j.id == s.job_id).cloned().ok_or(ShareError::UnknownJob)?;
    let en2 = hex::decode(s.extranonce2).map_err(|_| ShareError::Malformed("extranonce2"))?;
    let ntime = stratum::hex_u32(s.ntime).ok_or(ShareError::Malformed("ntime"))?;
    let nonce = stratum::hex_u32(s.nonce).ok_or(ShareError::Malformed("nonce"))?;
    let version_bits = match s.version_bits {
        Some(v) => Some(stratum::hex_u32(v).ok_or(ShareError::Malformed("version"))?),
        None => None,
    };
    let rules = ShareRules { target: c.target, version_mask: c.mask, ntime_max_forward: 7000 };
    let sub = Submission { extranonce2: &en2, ntime, nonce, version_bits };
    let v = check_share(&job.template, &c.en1, shared.cfg.extranonce2_size, &sub, &rules)?;
    if !shared.seen.lock().insert((job.id.clone(), v.hash.low_u64())) {
        return Err(ShareError::Duplicate);
    }
    shared.stats.accepted.fetch_add(1, Relaxed);
    if v.is_block {
        shared.stats.blocks.fetch_add(1, Relaxed);
    }
    *shared.stats.per_worker.lock().entry(s.worker.to_string()).or_default() += 1;
    let mut m = shared.stats.min_accepted_difficulty.lock();
    let d = v.achieved.get();
    if m.is_none_or(|x| d < x) {
        *m = Some(d);
    }
    Ok(())
}
