//! Pool faults: in each, miners stay connected, nothing panics, and no
//! share the pool accepted is lost or counted twice.

mod common;

use common::{test_config, wait_until};
use sluice::app::Proxy;
use sluice::sim::fleet::{Fleet, FleetConfig, Profile};
use sluice::sim::pool::{SimPool, SimPoolConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pool_cfg() -> SimPoolConfig {
    SimPoolConfig { difficulty: 0.00002, job_interval: Duration::from_secs(3600), ..SimPoolConfig::default() }
}

fn fleet(target: SocketAddr, miners: usize) -> Fleet {
    Fleet::start(FleetConfig {
        target,
        miners,
        profiles: Profile::ALL.to_vec(),
        share_interval: Duration::from_millis(200),
        ..FleetConfig::default()
    })
}

/// A TCP relay in front of a pool that can be cut like a blackholed network
/// path: bytes stop flowing both ways, nothing is closed, and new
/// connections are refused.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Set: the next bytes from the pool are preceded by a garbage line.
    garble: Arc<AtomicBool>,
    /// Set: the relay stops reading what the proxy sends (a pool that
    /// stops reading); its small receive buffer soon fills.
    stall: Arc<AtomicBool>,
    /// Connections relayed so far.
    conns: Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        // Accepted sockets inherit the small receive buffer: a stalled
        // relay pushes back on the proxy after a few kilobytes.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let garble = Arc::new(AtomicBool::new(false));
        let stall = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, g, st, n) = (cut.clone(), garble.clone(), stall.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(to).await else { continue };
                n.fetch_add(1, Relaxed);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, c.clone(), None, Some(st.clone())));
                tokio::spawn(pipe(ur, dw, c.clone(), Some(g.clone()), None));
            }
        });
        Relay { addr, cut, garble, stall, conns, accept }
    }

    /// Stop reading from the proxy, and refuse new connections.
    fn stall(&self) {
        self.stall.store(true, Relaxed);
        self.accept.abort();
    }

    fn cut(&self) {
        self.cut.store(true, Relaxed);
        self.accept.abort(); // the listener goes: connects are refused
    }
}

/// Copy bytes until the relay is cut; after that, swallow them. Once
/// `stall` is set, stop reading (the connection stays open).
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    garble: Option<Arc<AtomicBool>>,
    stall: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if stall.as_ref().is_some_and(|s| s.load(Relaxed)) {
            // Keep both halves open, read nothing more.
            let _hold = (r, w);
            return std::future::pending().await;
        }
        if n == 0 {
            return;
        }
        if garble.as_ref().is_some_and(|g| g.swap(false, Relaxed))
            && w.write_all(b"\x00\xffthis is not {json\n").await.is_err()
        {
            return;
        }
        if !cut.load(Relaxed) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A primary pool behind a relay, a backup pool, and a proxy using both.
async fn behind_relay(tweak: impl FnOnce(&mut sluice::config::Config)) -> (SimPool, SimPool, Relay, Proxy) {
    behind_relay_with(pool_cfg(), tweak).await
}

async fn behind_relay_with(
    pools: SimPoolConfig,
    tweak: impl FnOnce(&mut sluice::config::Config),
) -> (SimPool, SimPool, Relay, Proxy) {
    let primary = SimPool::start(pools.clone()).await.unwrap();
    let backup = SimPool::start(pools).await.unwrap();
    let relay = Relay::start(primary.addr).await;
    let mut cfg =
        test_config(vec![format!("stratum+tcp://farm:x@{}", relay.addr).parse().unwrap(), backup.url("farm")]);
    tweak(&mut cfg);
    let proxy = Proxy::start(&cfg).await.unwrap();
    (primary, backup, relay, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_pool_is_failed_over_by_the_answer_timeout() {
    let (primary, backup, relay, proxy) =
        behind_relay(|c| c.failover.answer_timeout_s = std::time::Duration::from_secs(1).into()).await;
    let fleet = fleet(proxy.addr, 10);
    assert!(wait_until(30.0, || primary.stats.accepted.load(Relaxed) >= 10).await);

    let t0 = std::time::Instant::now();
    relay.cut();
    assert!(wait_until(20.0, || backup.stats.accepted.load(Relaxed) >= 10).await, "shares flow to the backup");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "not before the answer timeout ({took:?})");
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
    assert!(proxy.stats.failovers.load(Relaxed) >= 1);
    // Every forwarded share reaches an end. What sluice reports accepted,
    // a pool accepted. A share can cross the path just before the cut and
    // be accepted while its answer is swallowed: sluice cannot know, and
    // reports it unanswered; so the pools' count lies between the two.
    let s = settled(&proxy, &fleet).await;
    let pools = primary.stats.accepted.load(Relaxed) + backup.stats.accepted.load(Relaxed);
    assert!(s.pool_accepted <= pools && pools <= s.pool_accepted + s.pool_unanswered, "pools {pools}: {s:?}");
    assert_eq!(s.pool_rejected, 0, "{s:?}");
}

/// A pool that stops reading: sluice's writes to it time out, the
/// connection counts as lost, and the miners carry on with the backup.
/// (Answers and silence get ten minutes, so only the write timeout can
/// explain a failover within the test's two.) Shares are nearly free to
/// find here, so the proxy writes fast enough to fill the socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_stops_reading_is_failed_over_by_the_write_timeout() {
    const EASY: f64 = 1e-9;
    let pools = SimPoolConfig { difficulty: EASY, ..pool_cfg() };
    let (primary, backup, relay, proxy) = behind_relay_with(pools, |c| {
        (c.difficulty.start, c.difficulty.min, c.difficulty.max) = (EASY, EASY, EASY);
        c.failover.write_timeout_s = Duration::from_secs(1).into();
        c.failover.answer_timeout_s = Duration::from_secs(600).into();
        c.failover.silence_timeout_s = Duration::from_secs(600).into();
    })
    .await;
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: 20,
        profiles: Profile::ALL.to_vec(),
        share_interval: Duration::from_millis(10),
        ..FleetConfig::default()
    });
    assert!(wait_until(30.0, || primary.stats.accepted.load(Relaxed) >= 10).await);
    relay.stall();
    // The kernel's send buffer (up to 4 MiB) fills first: about 20 s here.
    assert!(
        wait_until(120.0, || backup.stats.accepted.load(Relaxed) >= 10).await,
        "shares flow to the backup: {:?}",
        proxy.stats.shares.snapshot()
    );
    assert!(proxy.stats.failovers.load(Relaxed) >= 1);
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pool_is_failed_over_by_the_silence_timeout() {
    let (_primary, backup, relay, proxy) =
        behind_relay(|c| c.failover.silence_timeout_s = std::time::Duration::from_secs(1).into()).await;
    // Miners connect but submit nothing the pool would see: only silence
    // can reveal the dead path.
    let mut m = common::RawMiner::connect(proxy.addr).await;
    m.handshake("w.1").await;
    relay.cut();
    assert!(wait_until(10.0, || backup.stats.connections.load(Relaxed) >= 1).await, "the backup took over");
    assert!(proxy.stats.failovers.load(Relaxed) >= 1);
    assert_eq!(m.call("mining.ping", serde_json::json!([])).await["result"], "pong", "the miner is still connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_answering_garbage_is_reconnected_and_miners_never_notice() {
    let pool = SimPool::start(pool_cfg()).await.unwrap();
    let relay = Relay::start(pool.addr).await;
    let proxy = Proxy::start(&test_config(vec![format!("stratum+tcp://farm:x@{}", relay.addr).parse().unwrap()]))
        .await
        .unwrap();
    let fleet = fleet(proxy.addr, 10);
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10).await);
    relay.garble.store(true, Relaxed);
    pool.new_job(); // something to carry the garbage
    assert!(wait_until(10.0, || relay.conns.load(Relaxed) >= 2).await, "the session was dropped and made anew");
    let after = pool.stats.accepted.load(Relaxed);
    assert!(wait_until(20.0, || pool.stats.accepted.load(Relaxed) >= after + 10).await, "shares flow again");
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
    // The garbage ends the session with shares in flight: the pool may have
    // taken some whose answers died with it (unanswered at sluice). Nothing
    // is counted twice, and nothing the pool refused.
    let s = settled(&proxy, &fleet).await;
    let took = pool.stats.accepted.load(Relaxed);
    assert!(s.pool_accepted <= took && took <= s.pool_accepted + s.pool_unanswered, "pool {took}: {s:?}");
    assert_eq!(s.pool_rejected, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_clean_jobs_leaves_miners_connected_and_mining() {
    let pool = SimPool::start(pool_cfg()).await.unwrap();
    let proxy = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let fleet = fleet(proxy.addr, 10);
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10).await);
    let jobs = fleet.stats.jobs.load(Relaxed);
    // Storms of 200 blocks until the pool has refused a share that was in
    // flight as its block changed: the comparison of reasons below must
    // have something to compare (bounded: 20 storms).
    for storm in 1.. {
        for _ in 0..200 {
            pool.new_block();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if pool.stats.rejected.load(Relaxed) > 0 {
            break;
        }
        assert!(storm < 20, "20 storms and the pool refused nothing: the reasons would be compared vacuously");
    }
    let after = pool.stats.accepted.load(Relaxed);
    assert!(wait_until(20.0, || pool.stats.accepted.load(Relaxed) >= after + 10).await, "shares flow after the storm");
    assert!(fleet.stats.jobs.load(Relaxed) > jobs + 10, "miners followed the new blocks");
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0);
    fleet.pause();
    assert!(wait_until(5.0, || fleet.in_flight() == 0).await);
    // What the pool refused is only what was in flight as a block changed.
    let reasons = pool.stats.reasons.lock().clone();
    assert!(reasons.keys().all(|r| *r == "unknown-job" || *r == "stale"), "{reasons:?}");
    let s = proxy.stats.shares.snapshot();
    assert!(
        wait_until(5.0, || {
            let s = proxy.stats.shares.snapshot();
            s.pool_accepted == pool.stats.accepted.load(Relaxed) && s.pool_accepted + s.pool_rejected == s.forwarded
        })
        .await,
        "{s:?}"
    );
    // The scrape gives each pool reject its reason, as the pool said it.
    let url = format!("http://{}/metrics", proxy.http.expect("metrics listener"));
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let scraped = |reason: &str| {
        let series =
            format!("sluice_pool_shares_total{{pool=\"{}\",result=\"rejected\",reason=\"{reason}\"}} ", pool.addr);
        text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    let said = |r: &str| reasons.get(r).copied().unwrap_or(0);
    assert!(said("unknown-job") + said("stale") > 0, "{reasons:?}");
    assert_eq!((scraped("job not found"), scraped("stale")), (said("unknown-job"), said("stale")), "{text}");
    assert!(!text.contains("result=\"rejected\",reason=\"other\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_sends_miners_away_and_they_come_back_to_the_new_process() {
    let pool = SimPool::start(pool_cfg()).await.unwrap();
    let first = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let addr = first.addr;
    let fleet = fleet(addr, 10);
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10).await);
    let r = first.shutdown(Duration::from_secs(5)).await;
    assert_eq!((r.miners_at_start, r.miners_left, r.submits_unanswered), (10, 0, 0), "{r:?}");
    let counted_first = first.stats.shares.snapshot().pool_accepted;
    drop(first);

    let mut cfg = test_config(vec![pool.url("farm")]);
    cfg.listen = addr;
    let second = Proxy::start(&cfg).await.unwrap();
    assert!(wait_until(20.0, || second.stats.miners_connected.load(Relaxed) == 10).await, "the fleet came back");
    let after = pool.stats.accepted.load(Relaxed);
    assert!(wait_until(20.0, || pool.stats.accepted.load(Relaxed) >= after + 10).await);
    fleet.pause();
    assert!(wait_until(5.0, || fleet.in_flight() == 0).await);
    assert!(
        wait_until(5.0, || counted_first + second.stats.shares.snapshot().pool_accepted
            == pool.stats.accepted.load(Relaxed))
        .await,
        "no accepted share lost or counted twice across the restart: {counted_first} + {:?} vs pool {}",
        second.stats.shares.snapshot(),
        pool.stats.accepted.load(Relaxed)
    );
    assert_eq!(pool.stats.rejected.load(Relaxed), 0, "{:?}", pool.stats.reasons.lock());
}

/// A pool whose share difficulty is the network's (every share it wants is a
/// block solution) and which answers slower than the fleet submits, so a
/// queue of block solutions is always waiting in its socket.
fn block_pool() -> SimPoolConfig {
    SimPoolConfig { network_difficulty: 0.00002, answer_delay: Duration::from_millis(300), ..pool_cfg() }
}

/// Wait for every share sluice forwarded to reach its end (answered, or
/// given up as unanswered), then return the counters.
async fn settled(proxy: &Proxy, fleet: &Fleet) -> sluice::stats::ShareSnapshot {
    fleet.pause();
    assert!(wait_until(10.0, || fleet.in_flight() == 0).await);
    let ended = |s: sluice::stats::ShareSnapshot| s.forwarded == s.pool_accepted + s.pool_rejected + s.pool_unanswered;
    let s = proxy.stats.shares.snapshot();
    assert!(wait_until(20.0, || ended(proxy.stats.shares.snapshot())).await, "forwarded shares reach an end: {s:?}");
    proxy.stats.shares.snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_dropping_mid_submits_gets_every_block_solution_exactly_once() {
    let pool = SimPool::start(block_pool()).await.unwrap();
    let proxy = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let fleet = fleet(proxy.addr, 10);
    for round in 1..=3u64 {
        let before = pool.stats.blocks.load(Relaxed);
        assert!(wait_until(30.0, || pool.stats.blocks.load(Relaxed) >= before + 5).await, "round {round}");
        // Unread block solutions are in the pool's socket: they die with it.
        pool.drop_connections();
        assert!(wait_until(10.0, || pool.stats.resumed.load(Relaxed) >= round).await, "sluice resumed the session");
    }
    let s = settled(&proxy, &fleet).await;
    let m = &proxy.stats.metrics;
    assert!(
        m.blocks_resent.get() >= 3,
        "block solutions were caught in flight and sent again ({})",
        m.blocks_resent.get()
    );
    assert_eq!(m.blocks_given_up.get(), 0);
    // Each block solution sluice found was credited by the pool exactly
    // once: none lost with a connection, none counted twice. One the pool
    // took just before the drop, whose answer was lost, comes back
    // "duplicate" when resent: sluice reports it credited (earlier), not
    // rejected.
    assert_eq!(pool.stats.blocks.load(Relaxed), s.blocks, "{s:?}");
    assert_eq!(pool.stats.accepted.load(Relaxed), s.pool_accepted, "{s:?}");
    assert_eq!((s.pool_rejected, s.pool_unanswered), (0, 0), "{s:?} {:?}", pool.stats.reasons.lock());
    let duplicates = pool.stats.reasons.lock().get("duplicate").copied().unwrap_or(0);
    assert_eq!(m.blocks_credited_earlier.get(), duplicates, "{:?}", pool.stats.reasons.lock());
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_block_solution_never_goes_out_under_another_extranonce1_and_is_dropped_once_stale() {
    let pool = SimPool::start(block_pool()).await.unwrap();
    let addr = pool.addr;
    let proxy = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let fleet = fleet(proxy.addr, 10);
    assert!(wait_until(30.0, || pool.stats.blocks.load(Relaxed) >= 5).await);
    // The pool restarts on the same tip but remembers no session: sluice's
    // block solutions in flight cannot be credited under the new
    // extranonce1, though their block is still the tip.
    let first = pool.stats.clone(); // it finishes the share in hand as it goes
    let tip = pool.tip();
    drop(pool);
    let mut restarted = None;
    for _ in 0..100 {
        // The old listener closes as its aborted task is dropped.
        let cfg = SimPoolConfig { listen: addr, start_prevhash: Some(tip), ..block_pool() };
        match SimPool::start(cfg).await {
            Ok(p) => restarted = Some(p),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        if restarted.is_some() {
            break;
        }
    }
    let pool = restarted.expect("the pool restarts on its address");
    assert!(wait_until(30.0, || pool.stats.blocks.load(Relaxed) >= 3).await, "mining goes on");
    let m = &proxy.stats.metrics;
    // Held, not sent where they would be refused, and not yet given up.
    assert_eq!((m.blocks_resent.get(), m.blocks_given_up.get()), (0, 0));
    assert_eq!(pool.stats.resumed.load(Relaxed), 0);
    assert_eq!(pool.stats.rejected.load(Relaxed), 0, "{:?}", pool.stats.reasons.lock());
    // The chain moves on: now they are stale.
    pool.new_block();
    assert!(wait_until(10.0, || m.blocks_given_up.get() >= 1).await, "the held block solutions were dropped as stale");
    let s = settled(&proxy, &fleet).await;
    assert_eq!(m.blocks_resent.get(), 0, "none was sent on a session that could not credit it");
    // What the pool refused after the new block is only what was in flight
    // as it came (the pool voids the old jobs).
    assert_eq!(first.rejected.load(Relaxed), 0);
    let reasons = pool.stats.reasons.lock().clone();
    assert!(reasons.keys().all(|r| *r == "unknown-job"), "{reasons:?}");
    assert_eq!(s.pool_rejected, pool.stats.rejected.load(Relaxed), "{s:?}");
    assert_eq!(s.pool_unanswered, m.blocks_given_up.get(), "what was given up is what went unanswered: {s:?}");
    // The first pool may have taken a block solution whose answer died with
    // it: sluice held it, then gave it up. So the pools' count lies between
    // what sluice reports accepted and that plus what it gave up.
    let pools = first.accepted.load(Relaxed) + pool.stats.accepted.load(Relaxed);
    assert!(s.pool_accepted <= pools && pools <= s.pool_accepted + s.pool_unanswered, "pools {pools}: {s:?}");
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_refusing_the_session_id_gets_a_plain_subscribe() {
    let pool = SimPool::start(SimPoolConfig { refuse_session_ids: true, ..pool_cfg() }).await.unwrap();
    let proxy = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let fleet = fleet(proxy.addr, 10);
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10).await);
    pool.drop_connections();
    let after = pool.stats.accepted.load(Relaxed);
    assert!(wait_until(20.0, || pool.stats.accepted.load(Relaxed) >= after + 10).await, "shares flow again");
    assert_eq!(pool.stats.resumed.load(Relaxed), 0);
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
}

/// A primary that refuses the account (bad credentials) is told apart from
/// a blip: miners go to the backup at once, and the primary is not asked
/// again while the backup works. Probes see it up; before, each return to
/// it was refused again and moved every miner twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_refusing_the_account_is_left_alone_while_the_backup_works() {
    let primary = SimPool::start(SimPoolConfig { refuse_account: Some("farm".into()), ..pool_cfg() }).await.unwrap();
    let backup = SimPool::start(pool_cfg()).await.unwrap();
    // test_config probes every 200 ms and returns after 1 s up.
    let cfg = test_config(vec![primary.url("farm"), backup.url("farm")]);
    let proxy = Proxy::start(&cfg).await.unwrap();
    let fleet = fleet(proxy.addr, 10);
    // 30 pool shares (one miner share in ten, 10 miners x 5/s) take 6 s or
    // more: five return periods.
    assert!(wait_until(60.0, || backup.stats.accepted.load(Relaxed) >= 30).await, "the backup serves the miners");
    assert_eq!(primary.stats.refused.load(Relaxed), 1, "the refusing primary was asked once");
    assert_eq!(primary.stats.accepted.load(Relaxed), 0);
    assert_eq!(fleet.stats.disconnects.load(Relaxed), 0, "no miner was disconnected");
}
