//! `sluice sim-fleet`: simulated miners that really hash (at tiny
//! difficulty) and speak Stratum the way particular firmware does.

use crate::share::{sha256d_header, Difficulty, JobTemplate, Target};
use crate::stratum::{encode, parse_configure_result, parse_subscribe_result, Envelope, LineCodec, ServerMessage};
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// How a simulated miner behaves on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Plain subscribe/authorize, no extensions, five-param submits.
    Cgminer,
    /// Antminer S21: rolls version bits and sends them without ever sending
    /// mining.configure.
    AntminerS21,
    /// Whatsminer: configures version rolling; refuses extranonce2 above 8.
    Whatsminer,
    /// NiceHash-style: needs extranonce2 of at least 4, subscribes to
    /// extranonce changes.
    NiceHash,
    /// Bitaxe: asks for mask ffffffff and suggests a difficulty.
    Bitaxe,
}

impl Profile {
    pub const ALL: [Profile; 5] =
        [Profile::Cgminer, Profile::AntminerS21, Profile::Whatsminer, Profile::NiceHash, Profile::Bitaxe];
    fn agent(self) -> &'static str {
        match self {
            Profile::Cgminer => "cgminer/4.12.1",
            Profile::AntminerS21 => "Antminer S21/Thu May 9 2024",
            Profile::Whatsminer => "whatsminer/v1.1",
            Profile::NiceHash => "NiceHash/1.0.0",
            Profile::Bitaxe => "bitaxe/BM1368/v2.4.0",
        }
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "cgminer" => Profile::Cgminer,
            "s21" | "antminer-s21" => Profile::AntminerS21,
            "whatsminer" => Profile::Whatsminer,
            "nicehash" => Profile::NiceHash,
            "bitaxe" => Profile::Bitaxe,
            _ => return Err(format!("unknown profile {s:?} (cgminer, s21, whatsminer, nicehash, bitaxe)")),
        })
    }
}

/// A mixed fleet for the curtailment tests and benches: worker prefix,
/// model, nameplate watts, J/TH (least efficient first).
pub const MODELS: [(&str, &str, f64, f64); 5] = [
    ("s19jpro", "S19j Pro", 3068.0, 3068.0 / 104.0),
    ("s19xp", "S19 XP", 3010.0, 3010.0 / 140.0),
    ("m60s", "M60S", 3441.0, 3441.0 / 186.0),
    ("s21", "S21", 3500.0, 3500.0 / 200.0),
    ("s21xp", "S21 XP", 3645.0, 3645.0 / 270.0),
];

/// Power rules naming each model of [`MODELS`] by its worker prefix
/// (`PREFIX.*`), with its nameplate watts (simulated miners hash far too
/// slowly for their measured hashrate to say anything).
pub fn model_rules() -> Vec<crate::curtail::power::PowerRule> {
    MODELS
        .iter()
        .map(|(p, m, w, _)| crate::curtail::power::PowerRule {
            pattern: format!("{p}.*"),
            model: Some((*m).into()),
            watts: Some(*w),
            j_per_th: None,
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub target: SocketAddr,
    pub miners: usize,
    /// Profiles assigned round-robin.
    pub profiles: Vec<Profile>,
    /// Average pause between a miner's shares (the hashing itself is real).
    pub share_interval: Duration,
    pub worker_prefix: String,
    /// Difficulty Bitaxe-profile miners suggest.
    pub suggest_difficulty: f64,
    /// Connect miner `i` from its own loopback address,
    /// [`super::load::source_ip`]`(block, i)`, as a machine with its own
    /// IP (where its firmware API answers); none: the default source.
    pub ip_block: Option<u8>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            target: "127.0.0.1:3333".parse().expect("literal"),
            miners: 10,
            profiles: Profile::ALL.to_vec(),
            share_interval: Duration::from_millis(500),
            worker_prefix: "sim".into(),
            suggest_difficulty: 0.00001,
            ip_block: None,
        }
    }
}

#[derive(Default, Debug)]
pub struct FleetStats {
    pub connected: AtomicU64,
    pub submitted: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub jobs: AtomicU64,
    pub disconnects: AtomicU64,
    pub extranonce_changes: AtomicU64,
    /// Sessions that failed a firmware constraint (e.g. extranonce2 too big).
    pub incompatible: AtomicU64,
    pub rejected_by_code: Mutex<HashMap<i64, u64>>,
    pub hashes: AtomicU64,
    /// Sessions that hold a job now: the miners drawing power, as a hall
    /// meter would see them (a parked miner is connected and gets none).
    pub holding: AtomicU64,
    /// The workers of those sessions.
    pub holders: Mutex<std::collections::BTreeSet<String>>,
}

/// Counts a session in [`FleetStats::holding`] from its first job to its end.
struct Holds<'a> {
    stats: &'a FleetStats,
    worker: &'a str,
    on: bool,
}

impl Holds<'_> {
    fn got_job(&mut self) {
        if !std::mem::replace(&mut self.on, true) {
            self.stats.holding.fetch_add(1, Relaxed);
            self.stats.holders.lock().insert(self.worker.to_owned());
        }
    }
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        if self.on {
            self.stats.holding.fetch_sub(1, Relaxed);
            self.stats.holders.lock().remove(self.worker);
        }
    }
}

pub struct Fleet {
    pub stats: Arc<FleetStats>,
    /// Set by [`Fleet::pause`]: miners stay connected but stop submitting.
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub fn start(cfg: FleetConfig) -> Fleet {
        let stats = Arc::new(FleetStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = Arc::new(cfg);
        let tasks = (0..cfg.miners)
            .map(|i| {
                let profile = cfg.profiles[i % cfg.profiles.len().max(1)];
                tokio::spawn(miner(i, profile, cfg.clone(), stats.clone(), stop.clone()))
            })
            .collect();
        Fleet { stats, stop, tasks }
    }
    /// Stop submitting but keep reading, so every answer in flight is counted.
    pub fn pause(&self) {
        self.stop.store(true, Relaxed);
    }
    /// Submits whose answers have not arrived yet.
    pub fn in_flight(&self) -> u64 {
        let s = &self.stats;
        s.submitted.load(Relaxed).saturating_sub(s.accepted.load(Relaxed) + s.rejected.load(Relaxed))
    }
    /// Disconnect every miner now.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn miner(i: usize, profile: Profile, cfg: Arc<FleetConfig>, stats: Arc<FleetStats>, stop: Arc<AtomicBool>) {
    let worker = format!("{}.{i}", cfg.worker_prefix);
    while !stop.load(Relaxed) {
        let conn = match cfg.ip_block {
            Some(b) => super::load::connect_from(super::load::source_ip(b, i), cfg.target).await,
            None => TcpStream::connect(cfg.target).await,
        };
        if let Ok(s) = conn {
            stats.connected.fetch_add(1, Relaxed);
            let _ = session(s, profile, &worker, &cfg, &stats, &stop).await;
            stats.connected.fetch_sub(1, Relaxed);
            stats.disconnects.fetch_add(1, Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(..400))).await;
    }
}

struct MinerJob {
    id: String,
    template: JobTemplate,
}

struct State {
    en1: Vec<u8>,
    en2_size: usize,
    en2_counter: u64,
    target: Target,
    difficulty: Difficulty,
    mask: u32,
    job: Option<MinerJob>,
}

/// Grind nonces for one extranonce2 until a share is found or the budget
/// runs out. Returns (extranonce2, nonce, version) of a share.
fn find_share(st: &mut State, rolls: bool, budget: u32, stats: &FleetStats) -> Option<(Vec<u8>, u32, u32)> {
    let job = st.job.as_ref()?;
    st.en2_counter += 1;
    let en2_full = st.en2_counter.to_be_bytes();
    let en2 = if st.en2_size >= 8 {
        let mut v = vec![0u8; st.en2_size - 8];
        v.extend_from_slice(&en2_full);
        v
    } else {
        en2_full[8 - st.en2_size..].to_vec()
    };
    let root = job.template.merkle_root(&st.en1, &en2);
    let version = if rolls && st.mask != 0 {
        (job.template.version & !st.mask) | (fastrand::u32(..) & st.mask)
    } else {
        job.template.version
    };
    let start = fastrand::u32(..);
    for k in 0..budget {
        let nonce = start.wrapping_add(k);
        let h = job.template.header(&root, version, job.template.ntime, nonce);
        if st.target.is_met_by(&sha256d_header(&h)) {
            stats.hashes.fetch_add(k as u64 + 1, Relaxed);
            return Some((en2, nonce, version));
        }
    }
    stats.hashes.fetch_add(budget as u64, Relaxed);
    None
}

async fn session(
    stream: TcpStream,
    profile: Profile,
    worker: &str,
    cfg: &FleetConfig,
    stats: &FleetStats,
    paused: &AtomicBool,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut lines = FramedRead::new(r, LineCodec::new(64 * 1024));
    let mut out = Vec::new();
    let configure = matches!(profile, Profile::Whatsminer | Profile::Bitaxe);
    if configure {
        let mask = if profile == Profile::Bitaxe { "ffffffff" } else { "1fffe000" };
        let opts = serde_json::json!({"version-rolling.mask": mask, "version-rolling.min-bit-count": 2});
        encode::request(&mut out, 1, "mining.configure", &(["version-rolling"], opts));
    }
    encode::request(&mut out, 2, "mining.subscribe", &[profile.agent()]);
    encode::request(&mut out, 3, "mining.authorize", &[worker, "x"]);
    if profile == Profile::NiceHash {
        encode::request(&mut out, 4, "mining.extranonce.subscribe", &[(); 0]);
    }
    if profile == Profile::Bitaxe {
        encode::request(&mut out, 5, "mining.suggest_difficulty", &[cfg.suggest_difficulty]);
    }
    w.write_all(&out).await?;
    out.clear();

    let rolls = matches!(profile, Profile::AntminerS21 | Profile::Whatsminer | Profile::Bitaxe);
    let mut st = State {
        en1: Vec::new(),
        en2_size: 0,
        en2_counter: fastrand::u64(..1 << 40),
        target: Difficulty::ONE.to_target(),
        difficulty: Difficulty::ONE,
        // The S21 quirk: rolls the BIP320 bits without having negotiated them.
        mask: if profile == Profile::AntminerS21 { 0x1fff_e000 } else { 0 },
        job: None,
    };
    let mut next_id = 10u64;
    let mut answered = 0u64;
    // Sent away (client.reconnect): submit nothing more, and leave once the
    // shares on the wire are answered, or after 2 s, as careful firmware does.
    let mut leaving: Option<Instant> = None;
    let mut next_share = Instant::now();
    let mut holds = Holds { stats, worker, on: false };
    loop {
        let grind = st.job.is_some() && !paused.load(Relaxed) && leaving.is_none();
        tokio::select! {
            line = lines.next() => {
                let Some(Ok(line)) = line else { return Ok(()) };
                let Ok(env) = Envelope::parse(&line) else { continue };
                let Ok(msg) = ServerMessage::from_envelope(&env) else { continue };
                match msg {
                    ServerMessage::Response { id: Some(2), result: Some(r), .. } => {
                        let Ok(sub) = parse_subscribe_result(r) else { return Ok(()) };
                        let (en1, n) = (sub.extranonce1, sub.extranonce2_size);
                        if (profile == Profile::Whatsminer && n > 8) || (profile == Profile::NiceHash && n < 4) {
                            stats.incompatible.fetch_add(1, Relaxed);
                            return Ok(());
                        }
                        st.en1 = en1;
                        st.en2_size = n;
                    }
                    ServerMessage::Response { id: Some(1), result: Some(r), .. } => {
                        st.mask = parse_configure_result(r).unwrap_or(0);
                    }
                    ServerMessage::Response { id: Some(id), error, .. } if id >= 10 => {
                        answered += 1;
                        if let Some(e) = error {
                            stats.rejected.fetch_add(1, Relaxed);
                            let code = serde_json::from_str::<(i64, serde_json::Value, serde_json::Value)>(e.get()).map(|c| c.0).unwrap_or(-1);
                            *stats.rejected_by_code.lock().entry(code).or_default() += 1;
                        } else {
                            stats.accepted.fetch_add(1, Relaxed);
                        }
                    }
                    ServerMessage::Response { .. } => {}
                    ServerMessage::Notify(n) => {
                        stats.jobs.fetch_add(1, Relaxed);
                        holds.got_job();
                        let template = JobTemplate::new(n.version, n.prevhash, &[&n.coinb1], n.coinb2, n.merkle_branch, n.nbits, n.ntime);
                        st.job = Some(MinerJob { id: n.job_id, template });
                    }
                    ServerMessage::SetDifficulty(d) => {
                        if let Some(d) = Difficulty::new(d) {
                            st.difficulty = d;
                            st.target = d.to_target();
                        }
                    }
                    ServerMessage::SetExtranonce { extranonce1, extranonce2_size } => {
                        stats.extranonce_changes.fetch_add(1, Relaxed);
                        st.en1 = extranonce1;
                        st.en2_size = extranonce2_size;
                    }
                    ServerMessage::SetVersionMask(m) => st.mask = m,
                    ServerMessage::Reconnect { .. } => {
                        leaving.get_or_insert(Instant::now() + Duration::from_secs(2));
                    }
                    ServerMessage::Ping => encode::result(&mut out, env.id, "pong"),
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(leaving.unwrap_or(next_share)), if leaving.is_some() => return Ok(()),
            _ = tokio::time::sleep_until(next_share), if grind => {
                if paused.load(Relaxed) {
                    continue; // paused while this branch was armed
                }
                // A 2^16 nonce budget keeps each grind under a millisecond or so.
                if let Some((en2, nonce, version)) = find_share(&mut st, rolls, 1 << 16, stats) {
                    let job = st.job.as_ref().expect("grinding needs a job");
                    let ntime = format!("{:08x}", job.template.ntime);
                    let (en2, nonce) = (hex::encode(en2), format!("{nonce:08x}"));
                    if rolls {
                        let bits = format!("{:08x}", version & st.mask);
                        encode::request(&mut out, next_id, "mining.submit", &(worker, &job.id, en2, ntime, nonce, bits));
                    } else {
                        encode::request(&mut out, next_id, "mining.submit", &(worker, &job.id, en2, ntime, nonce));
                    }
                    next_id += 1;
                    stats.submitted.fetch_add(1, Relaxed);
                    let jitter = 0.5 + fastrand::f64();
                    next_share = Instant::now() + cfg.share_interval.mul_f64(jitter);
                } else {
                    tokio::task::yield_now().await;
                }
            }
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        if leaving.is_some() && answered == next_id - 10 {
            return Ok(());
        }
    }
}
