//! Helpers for tests over real sockets on 127.0.0.1.
#![allow(dead_code)]

use serde_json::Value;
use sluice::app::Proxy;
use sluice::config::Config;
use sluice::share::{sha256d_header, Difficulty, JobTemplate, Target};
use sluice::stratum::{Envelope, ServerMessage};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

#[allow(unused_imports)]
pub use sluice::sim::fleet::{model_rules, MODELS};

/// Two miners of each model of [`MODELS`], one fleet per model (same order).
pub fn model_fleets(target: std::net::SocketAddr) -> Vec<sluice::sim::fleet::Fleet> {
    use sluice::sim::fleet::{Fleet, FleetConfig, Profile};
    MODELS
        .iter()
        .map(|(p, ..)| {
            Fleet::start(FleetConfig {
                target,
                miners: 2,
                profiles: vec![Profile::Cgminer],
                share_interval: Duration::from_millis(200),
                worker_prefix: (*p).into(),
                ..FleetConfig::default()
            })
        })
        .collect()
}

/// A sim-pool that sends one job and no more (its difficulty low enough
/// for the simulated miners' shares to reach it often).
pub async fn steady_pool() -> sluice::sim::pool::SimPool {
    use sluice::sim::pool::{SimPool, SimPoolConfig};
    SimPool::start(SimPoolConfig {
        difficulty: 0.00002,
        job_interval: Duration::from_secs(3600),
        ..SimPoolConfig::default()
    })
    .await
    .unwrap()
}

/// Poll `cond` every 20 ms until it holds or `secs` pass.
pub async fn wait_until(secs: f64, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// A proxy config for tests: loopback listener, tiny difficulties, fast failover.
pub fn test_config(upstream: Vec<sluice::config::PoolUrl>) -> Config {
    let mut c = Config { upstream, listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
    c.difficulty.start = 0.000002;
    c.difficulty.min = 0.000001;
    c.difficulty.target_shares_per_min = 60.0;
    c.difficulty.retarget_s = std::time::Duration::from_secs(30).into();
    c.failover.connect_timeout_s = std::time::Duration::from_secs(1).into();
    c.failover.backoff_initial_s = std::time::Duration::from_millis(50).into();
    c.failover.backoff_max_s = std::time::Duration::from_millis(200).into();
    c.failover.probe_interval_s = std::time::Duration::from_millis(200).into();
    c.failover.primary_stable_s = std::time::Duration::from_secs(1).into();
    c.curtail.socket = std::path::PathBuf::new(); // tests that need it set their own
    c.metrics.listen = sluice::config::OptionalAddr(Some(([127, 0, 0, 1], 0).into()));
    c
}

pub async fn proxy(upstream: Vec<sluice::config::PoolUrl>) -> Proxy {
    Proxy::start(&test_config(upstream)).await.unwrap()
}

/// A hand-driven miner: send lines, read what comes back.
pub struct RawMiner {
    r: BufReader<OwnedReadHalf>,
    pub w: OwnedWriteHalf,
    next_id: u64,
    pub notes: Vec<Value>,
    pub en1: Vec<u8>,
    pub en2_size: usize,
    pub target: Target,
    pub job: Option<(String, JobTemplate)>,
}

impl RawMiner {
    pub async fn connect(addr: std::net::SocketAddr) -> RawMiner {
        Self::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    /// Connect from another loopback source address (127.x.y.z).
    pub async fn connect_from(addr: std::net::SocketAddr, src: [u8; 4]) -> RawMiner {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((std::net::Ipv4Addr::from(src), 0).into()).unwrap();
        Self::from_stream(sock.connect(addr).await.unwrap())
    }

    fn from_stream(s: TcpStream) -> RawMiner {
        let (r, w) = s.into_split();
        RawMiner {
            r: BufReader::new(r),
            w,
            next_id: 1,
            notes: vec![],
            en1: vec![],
            en2_size: 0,
            target: Difficulty::ONE.to_target(),
            job: None,
        }
    }

    /// True once the proxy has closed the connection (within 5 s), reading
    /// past anything it sent first.
    pub async fn closed(&mut self) -> bool {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut l = String::new();
        while tokio::time::Instant::now() < end {
            l.clear();
            match tokio::time::timeout_at(end, self.r.read_line(&mut l)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.notes.push(serde_json::from_str(&l).unwrap_or(Value::Null)),
                Err(_) => return false,
            }
        }
        false
    }

    pub async fn send_raw(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
    }

    /// Read one line (None on EOF or after 5 s) and apply notifications.
    pub async fn read_line(&mut self) -> Option<Value> {
        let mut l = String::new();
        match tokio::time::timeout(Duration::from_secs(5), self.r.read_line(&mut l)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
        if let Ok(env) = Envelope::parse(l.as_bytes()) {
            match ServerMessage::from_envelope(&env) {
                Ok(ServerMessage::Notify(n)) => {
                    let t = JobTemplate::new(
                        n.version,
                        n.prevhash,
                        &[&n.coinb1],
                        n.coinb2,
                        n.merkle_branch,
                        n.nbits,
                        n.ntime,
                    );
                    self.job = Some((n.job_id, t));
                }
                Ok(ServerMessage::SetDifficulty(d)) => self.target = Difficulty::new(d).unwrap().to_target(),
                Ok(ServerMessage::SetExtranonce { extranonce1, extranonce2_size }) => {
                    self.en1 = extranonce1;
                    self.en2_size = extranonce2_size;
                }
                _ => {}
            }
        }
        Some(v)
    }

    /// Send a request and return its response; notifications seen meanwhile
    /// are kept in `notes`.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let line = serde_json::json!({"id": id, "method": method, "params": params}).to_string() + "\n";
        self.send_raw(&line).await;
        loop {
            let v = self.read_line().await.unwrap_or_else(|| panic!("no answer to {method}"));
            if v["id"] == id {
                return v;
            }
            self.notes.push(v);
        }
    }

    /// Read until a mining.notify arrives.
    pub async fn wait_job(&mut self) {
        loop {
            let v = self.read_line().await.expect("a job");
            let is_notify = v["method"] == "mining.notify";
            self.notes.push(v);
            if is_notify {
                return;
            }
        }
    }

    pub async fn handshake(&mut self, worker: &str) {
        let r = self.call("mining.subscribe", serde_json::json!(["test/1.0"])).await;
        self.en1 = hex::decode(r["result"][1].as_str().unwrap()).unwrap();
        self.en2_size = r["result"][2].as_u64().unwrap() as usize;
        let r = self.call("mining.authorize", serde_json::json!([worker, "x"])).await;
        assert_eq!(r["result"], true);
        self.wait_job().await;
    }

    /// Find (extranonce2, nonce) whose hash meets (or, with `meet` false,
    /// misses) the current target.
    pub fn grind(&self, en2_seed: u64, version: u32, meet: bool) -> (String, String) {
        let (_, job) = self.job.as_ref().expect("job");
        let en2 = &en2_seed.to_be_bytes()[8 - self.en2_size.min(8)..];
        let mut en2 = en2.to_vec();
        en2.resize(self.en2_size, 0);
        let root = job.merkle_root(&self.en1, &en2);
        for nonce in 0u32.. {
            let h = sha256d_header(&job.header(&root, version, job.ntime, nonce));
            if self.target.is_met_by(&h) == meet {
                return (hex::encode(&en2), format!("{nonce:08x}"));
            }
        }
        unreachable!()
    }

    pub fn job_id(&self) -> String {
        self.job.as_ref().unwrap().0.clone()
    }
    pub fn ntime(&self) -> String {
        format!("{:08x}", self.job.as_ref().unwrap().1.ntime)
    }

    pub async fn submit(&mut self, job: &str, en2: &str, ntime: &str, nonce: &str, version: Option<&str>) -> Value {
        let mut p = vec!["w", job, en2, ntime, nonce];
        if let Some(v) = version {
            p.push(v);
        }
        self.call("mining.submit", serde_json::json!(p)).await
    }
}

/// The error code of a response, or None when it succeeded.
pub fn err_code(v: &Value) -> Option<i64> {
    v["error"].as_array().map(|e| e[0].as_i64().unwrap())
}

/// `text` written to a file `name` in a directory removed with the guard.
pub fn temp(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

/// A running `sluice run`, its stderr read line by line on a thread.
pub struct Running {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// The config file it runs on (its directory goes with it).
    pub config: (tempfile::TempDir, std::path::PathBuf),
}

impl Running {
    pub fn start(config: (tempfile::TempDir, std::path::PathBuf)) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--log-format", "json", "run", "-c"])
            .arg(&config.1)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, config }
    }

    /// Write `config`, run the proxy on it, and wait until it listens.
    pub async fn listening(name: &str, config: String) -> (Running, std::net::SocketAddr) {
        let file = temp(name, &config);
        tokio::task::spawn_blocking(move || {
            let run = Running::start(file);
            let line = run.wait_for("sluice listening for miners");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            (run, v["fields"]["addr"].as_str().unwrap().parse().unwrap())
        })
        .await
        .unwrap()
    }

    /// The first log line containing `needle` (waits up to 60 s).
    pub fn wait_for(&self, needle: &str) -> String {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no log line with {needle:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A one-member etcd on loopback (Debian's `etcd-server`, which `.ci/test`
/// installs), killed with the guard; its data in a temporary directory.
pub struct Etcd {
    pub child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Started on two free ports; a start that fails (another process
    /// took a port between its probe and etcd's bind) is tried again on
    /// new ports, up to three times, and etcd's own words are in the panic.
    pub async fn start() -> Etcd {
        let mut why = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = dir.path().join("etcd.log");
            let child = Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--name", "t", "--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("t={peer_url}"), "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("etcd (Debian etcd-server; .ci/test installs it)");
            let mut e = Etcd { child, url, _dir: dir };
            let ok = wait_async(30.0, || async {
                Command::new("etcdctl")
                    .args(["--endpoints", &e.url, "--dial-timeout", "1s", "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .await;
            if ok {
                return e;
            }
            let _ = e.child.kill();
            why = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("etcd did not come up in three tries; its log: {why}");
    }

    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll an async condition every 50 ms until it holds or `secs` pass.
pub async fn wait_async<F: std::future::Future<Output = bool>>(secs: f64, mut cond: impl FnMut() -> F) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
    while std::time::Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The S19k Pro on LuxOS's profiles (the built-in table's curve).
pub fn s19k_curve() -> sluice::curtail::targets::Curve {
    sluice::curtail::targets::Curve::new(&[(0.785, 0.830), (0.593, 0.661), (0.425, 0.491)]).unwrap()
}

/// An S19k Pro double: its envelope from `min_w`, running at `own_w`
/// before sluice, settling over 2 s.
pub fn s19k_double(min_w: f64, own_w: f64, presets: Vec<(f64, bool)>) -> sluice::sim::firmware::Spec {
    sluice::sim::firmware::Spec {
        own_w,
        model: "Antminer S19k Pro".into(),
        nominal_w: 2760.0,
        nominal_ths: 120.0,
        idle_w: 82.8,
        min_w,
        max_w: 3000.0,
        settle: Duration::from_secs(2),
        curve: s19k_curve(),
        presets,
        retune: Duration::from_secs(3),
    }
}

pub fn loopback_ips(first: u8, n: usize) -> Vec<std::net::IpAddr> {
    (0..n).map(|k| std::net::IpAddr::from([127, 0, 0, first + k as u8])).collect()
}

/// What the doubles of miners holding a job draw (worker `PREFIX.K` is
/// double K): those the fleet says hold one, less those the proxy had parked
/// (closed the session of) in `st`, a status taken just before (a parked
/// one's job is withdrawn at once, its firmware's pause follows, and the
/// simulated miner may read the close a moment later).
pub fn holding_draw(
    doubles: &[sluice::sim::firmware::FirmwareDouble],
    prefix: &str,
    fleet: &sluice::sim::fleet::Fleet,
    st: &Value,
) -> f64 {
    let parked: Vec<&str> = st["miners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "parked")
        .filter_map(|m| m["worker"].as_str())
        .collect();
    let holders = fleet.stats.holders.lock().clone();
    doubles
        .iter()
        .enumerate()
        .map(|(k, d)| (format!("{prefix}.{k}"), d))
        .filter(|(w, _)| holders.contains(w) && !parked.contains(&w.as_str()))
        .map(|(_, d)| d.draw())
        .sum()
}
