//! A Stratum V2 pool behind sluice, end to end over real sockets: simulated
//! SV1 miners, sluice, and the reference implementation's own pool,
//! `pool_sv2` 0.7.0 from the Rust crate registry, a real process. `.ci/test`
//! installs it (`cargo install --locked`, with Debian's capnproto and
//! libcapnp-dev for its build) once per machine into
//! `~/.cache/sluice-ci/pool_sv2-0.7.0`; `SLUICE_POOL_SV2` names another
//! binary. The pool builds its jobs from sluice's Template Distribution
//! server (`sluice::sim::template_provider`, what `sluice sim-tp` runs), and
//! checks and credits every share sluice forwards with its own code.

mod common;

use common::{free_port, steady_pool, test_config, wait_async, wait_until, Running};
use sluice::app::Proxy;
use sluice::config::{AuthorityKey, PoolUrl};
use sluice::sim::fleet::{Fleet, FleetConfig, Profile};
use sluice::sim::template_provider::{TemplateProvider, TemplateProviderConfig};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// The reference implementation's published example key pair (its pool
/// config examples).
const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";
const SECRET: &str = "mkDLTBBRxdBv998612qipDYoTK3YUrqLe8uWw7gu3iXbSrn2n";

fn pool_sv2_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_POOL_SV2") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    let cached = std::path::Path::new(&home).join(".cache/sluice-ci/pool_sv2-0.7.0/bin/pool_sv2");
    assert!(
        cached.exists(),
        "pool_sv2 is not installed at {}: run .ci/test (the README's test command), which installs it",
        cached.display()
    );
    cached
}

/// A `pool_sv2` process on loopback, fed by the template provider at `tp`,
/// acknowledging shares in batches of `batch`.
struct PoolSv2 {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    monitor: u16,
}

impl PoolSv2 {
    async fn start(tp: std::net::SocketAddr, batch: usize) -> PoolSv2 {
        let dir = tempfile::tempdir().unwrap();
        let (port, monitor) = (free_port(), free_port());
        let config = format!(
            "authority_public_key = \"{KEY}\"\nauthority_secret_key = \"{SECRET}\"\ncert_validity_sec = 3600\n\
             listen_address = \"127.0.0.1:{port}\"\n\
             coinbase_reward_script = \"addr(tb1qa0sm0hxzj0x25rh8gw5xlzwlsfvvyz8u96w3p8)\"\nserver_id = 1\n\
             pool_signature = \"sluice test\"\nshares_per_minute = 60.0\nshare_batch_size = {batch}\n\
             monitoring_address = \"127.0.0.1:{monitor}\"\nmonitoring_cache_refresh_secs = 1\n\
             [template_provider_type.Sv2Tp]\naddress = \"{tp}\"\n"
        );
        std::fs::write(dir.path().join("pool.toml"), config).unwrap();
        let child = Self::spawn(&dir);
        let mut p = PoolSv2 { child, dir, port, monitor };
        p.wait_listening().await;
        p
    }

    fn spawn(dir: &tempfile::TempDir) -> Child {
        Command::new(pool_sv2_binary())
            .arg("-c")
            .arg(dir.path().join("pool.toml"))
            .stdout(std::fs::File::create(dir.path().join("pool.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    async fn wait_listening(&mut self) {
        let addr = format!("127.0.0.1:{}", self.port);
        let up = wait_async(60.0, || async { tokio::net::TcpStream::connect(&addr).await.is_ok() }).await;
        assert!(up, "pool_sv2 did not listen; its log:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pool.log")).unwrap_or_default()
    }

    /// Killed (SIGKILL) and started again on the same ports.
    async fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.dir);
        self.wait_listening().await;
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn url(&self, key: &str) -> PoolUrl {
        format!("stratum2+tcp://sluice.test@127.0.0.1:{}/{key}", self.port).parse().unwrap()
    }

    /// The pool's own count of accepted shares, from its monitoring
    /// endpoint (`sv2_client_shares_accepted_total`, summed over channels).
    async fn accepted(&self) -> Option<u64> {
        let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.monitor)).await.ok()?.text().await.ok()?;
        let lines = body.lines().filter(|l| l.starts_with("sv2_client_shares_accepted_total{"));
        Some(lines.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as u64)
    }
}

impl Drop for PoolSv2 {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn template_provider(nbits: u32) -> TemplateProvider {
    let listen = "127.0.0.1:0".parse().unwrap();
    TemplateProvider::start(TemplateProviderConfig { listen, nbits, block_interval: None }).await.unwrap()
}

/// Miners of every simulated firmware (cgminer, S21, Whatsminer, NiceHash,
/// Bitaxe), one of each per five.
fn fleet(target: std::net::SocketAddr, miners: usize) -> Fleet {
    Fleet::start(FleetConfig {
        target,
        miners,
        profiles: vec![Profile::Cgminer, Profile::AntminerS21, Profile::Whatsminer, Profile::NiceHash, Profile::Bitaxe],
        share_interval: Duration::from_millis(100),
        ..FleetConfig::default()
    })
}

/// The URL index the first upstream connection has a session on, if any.
fn session_on(proxy: &Proxy) -> Option<usize> {
    proxy.hub().conn_states().iter().find(|c| c.connected).map(|c| c.url_index)
}

/// Every share sluice forwarded is one the pool's own code checked and
/// credited: its count of accepted shares equals sluice's count of
/// forwarded shares, nothing refused, with miners of every firmware sluice
/// simulates (version rolling with and without `mining.configure`, 8-byte
/// extranonce2 limits, suggested difficulties). The pool acknowledges in
/// batches of 10: sluice credits every batch, and only the last partial one
/// is left waiting.
#[tokio::test]
async fn the_pool_s_count_of_accepted_shares_matches_what_sluice_forwarded() {
    let tp = template_provider(0x1d00ffff).await;
    let pool = PoolSv2::start(tp.addr, 10).await;
    let proxy = Proxy::start(&test_config(vec![pool.url(KEY)])).await.unwrap();
    assert!(wait_until(30.0, || session_on(&proxy) == Some(0)).await, "no SV2 session; pool log:\n{}", pool.log());
    let f = fleet(proxy.addr, 10);
    let fwd = || proxy.stats.shares.snapshot().forwarded;
    assert!(wait_until(60.0, || fwd() >= 200).await, "forwarded only {}", fwd());
    f.pause();
    assert!(wait_until(30.0, || f.in_flight() == 0).await);
    let forwarded = fwd();
    let matched = wait_async(30.0, || async { pool.accepted().await == Some(forwarded) }).await;
    assert!(matched, "pool accepted {:?} of the {forwarded} shares sluice forwarded", pool.accepted().await);
    let s = proxy.stats.shares.snapshot();
    assert_eq!((s.pool_rejected, s.pool_unanswered), (0, 0), "{s:?}");
    assert!(s.pool_accepted <= forwarded && forwarded - s.pool_accepted < 10, "{s:?}");
    let fs = &f.stats;
    assert_eq!((fs.rejected.load(Relaxed), fs.incompatible.load(Relaxed), fs.disconnects.load(Relaxed)), (0, 0, 0));
}

/// A share that meets the network target is a block: sluice sends it to
/// the pool first, the pool builds the block and sends SubmitSolution to
/// the template provider, which checks the header's hash against the
/// target. Every block sluice's miners found arrives there, valid.
#[tokio::test]
async fn a_block_found_reaches_the_template_provider_s_submit_solution() {
    // About one share in eight at the proxy's test difficulty is a block.
    let tp = template_provider(0x1f00ffff).await;
    let pool = PoolSv2::start(tp.addr, 1).await;
    let proxy = Proxy::start(&test_config(vec![pool.url(KEY)])).await.unwrap();
    assert!(wait_until(30.0, || session_on(&proxy) == Some(0)).await);
    let f = fleet(proxy.addr, 5);
    let blocks = || proxy.stats.shares.snapshot().blocks;
    assert!(wait_until(60.0, || blocks() >= 3).await, "blocks {}", blocks());
    f.pause();
    assert!(wait_until(30.0, || f.in_flight() == 0).await);
    let found = blocks();
    assert!(wait_until(30.0, || tp.solutions().len() as u64 >= found).await, "{} of {found}", tp.solutions().len());
    let sols = tp.solutions();
    assert_eq!(sols.len() as u64, found, "one SubmitSolution per block found");
    assert!(sols.iter().all(|s| s.valid), "{sols:?}");
}

/// A pool whose Noise certificate is not signed by the key in its URL is
/// refused with an error that says so, and sluice fails over to the next
/// pool (an SV1 pool) with every miner kept.
#[tokio::test]
async fn a_wrong_authority_key_is_refused_and_sluice_fails_over_with_miners_kept() {
    let tp = template_provider(0x1d00ffff).await;
    let pool = PoolSv2::start(tp.addr, 1).await;
    let backup = steady_pool().await;
    let secret = secp256k1::SecretKey::from_slice(&[7u8; 32]).unwrap();
    let kp = secp256k1::Keypair::from_secret_key(&secp256k1::Secp256k1::new(), &secret);
    let wrong = AuthorityKey(kp.x_only_public_key().0.serialize()).to_string();
    let config = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum2+tcp://sluice.test@127.0.0.1:{}/{wrong}\", \"stratum+tcp://acct@{}\"]\n\
         [difficulty]\nstart = 0.000002\nmin = 0.000001\n[failover]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.2\n\
         [metrics]\nlisten = \"\"\n[curtail]\nsocket = \"\"\n",
        pool.port,
        backup.addr
    );
    let (run, addr) = Running::listening("sluice.toml", config).await;
    let refused = tokio::task::spawn_blocking(move || {
        let l = run.wait_for("not signed by the authority key in its URL");
        (run, l)
    })
    .await
    .unwrap();
    assert!(refused.1.contains("next stratum+tcp://acct@"), "{}", refused.1);
    let f = fleet(addr, 5);
    let accepted = || backup.stats.accepted.load(Relaxed);
    assert!(wait_until(60.0, || accepted() >= 50).await, "backup accepted {}", accepted());
    assert_eq!(pool.accepted().await, Some(0), "nothing went to the pool with the wrong key");
    let fs = &f.stats;
    assert_eq!((fs.connected.load(Relaxed), fs.disconnects.load(Relaxed), fs.rejected.load(Relaxed)), (5, 0, 0));
    drop(refused);
}

/// The pool killed and started again: sluice opens a new channel on the
/// new process and its miners, kept connected throughout, go on mining
/// for it.
#[tokio::test]
async fn the_pool_restarted_miners_kept() {
    let tp = template_provider(0x1d00ffff).await;
    let mut pool = PoolSv2::start(tp.addr, 1).await;
    let proxy = Proxy::start(&test_config(vec![pool.url(KEY)])).await.unwrap();
    let f = fleet(proxy.addr, 5);
    assert!(wait_async(60.0, || async { pool.accepted().await.unwrap_or(0) >= 20 }).await);
    pool.restart().await;
    let back = wait_async(60.0, || async { pool.accepted().await.unwrap_or(0) >= 20 }).await;
    assert!(back, "the restarted pool credited {:?}; its log:\n{}", pool.accepted().await, pool.log());
    let fs = &f.stats;
    assert_eq!((fs.connected.load(Relaxed), fs.disconnects.load(Relaxed)), (5, 0));
    assert!(proxy.stats.failovers.load(Relaxed) == 0, "one pool: no failover, a reconnect");
}

/// An SV2 primary with an SV1 backup: the primary killed, miners move to
/// the backup and keep their extranonce1 (the channel's layout leaves room
/// for an SV1 pool's 8 bytes); the primary back, they return to it.
#[tokio::test]
async fn an_sv2_primary_with_an_sv1_backup() {
    let tp = template_provider(0x1d00ffff).await;
    let mut pool = PoolSv2::start(tp.addr, 1).await;
    let backup = steady_pool().await;
    let sv1: PoolUrl = format!("stratum+tcp://acct@{}", backup.addr).parse().unwrap();
    let proxy = Proxy::start(&test_config(vec![pool.url(KEY), sv1])).await.unwrap();
    let f = fleet(proxy.addr, 5);
    assert!(wait_async(60.0, || async { pool.accepted().await.unwrap_or(0) >= 20 }).await);
    pool.kill();
    let on_backup = || backup.stats.accepted.load(Relaxed);
    assert!(wait_until(60.0, || session_on(&proxy) == Some(1) && on_backup() >= 20).await, "{}", on_backup());
    let before = f.stats.extranonce_changes.load(Relaxed);
    pool.restart().await;
    assert!(wait_until(60.0, || session_on(&proxy) == Some(0)).await, "did not return to the primary");
    assert!(wait_async(60.0, || async { pool.accepted().await.unwrap_or(0) >= 20 }).await);
    let fs = &f.stats;
    assert_eq!((fs.connected.load(Relaxed), fs.disconnects.load(Relaxed)), (5, 0));
    assert_eq!(fs.extranonce_changes.load(Relaxed), before, "miners kept their extranonce1");
    assert!(proxy.stats.failovers.load(Relaxed) >= 1 && proxy.stats.returns_to_primary.load(Relaxed) >= 1);
    // The metrics name each pool's protocol.
    let metrics = reqwest::get(format!("http://{}/metrics", proxy.http.unwrap())).await.unwrap().text().await.unwrap();
    let up: Vec<&str> = metrics.lines().filter(|l| l.starts_with("sluice_pool_up{")).collect();
    assert!(up.iter().any(|l| l.contains(r#"role="primary",protocol="sv2"} 1"#)), "{up:?}");
    assert!(up.iter().any(|l| l.contains(r#"role="backup",protocol="sv1"} 0"#)), "{up:?}");
}
