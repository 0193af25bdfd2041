//! Limits on what a miner controls: each one refuses or closes only the
//! miner at fault, says which limit in its error, and leaves others alone.

mod common;

use common::{err_code, test_config, wait_until, RawMiner};
use serde_json::json;
use sluice::app::Proxy;
use sluice::config::Config;
use sluice::sim::pool::{SimPool, SimPoolConfig};
use std::sync::atomic::Ordering::Relaxed;

async fn setup(f: impl FnOnce(&mut Config)) -> (SimPool, Proxy) {
    let pool = SimPool::start(SimPoolConfig { difficulty: 0.001, ..Default::default() }).await.unwrap();
    let mut cfg = test_config(vec![pool.url("acct")]);
    f(&mut cfg);
    (pool, Proxy::start(&cfg).await.unwrap())
}

/// Miners connected and ready, one per worker name.
async fn miners<const N: usize>(proxy: &Proxy, workers: [&str; N]) -> [RawMiner; N] {
    let mut out = Vec::new();
    for w in workers {
        let mut m = RawMiner::connect(proxy.addr).await;
        m.handshake(w).await;
        out.push(m);
    }
    out.try_into().unwrap_or_else(|_| unreachable!())
}

/// The first line a refused connection gets names the limit.
async fn refused_with(m: &mut RawMiner, limit: &str) {
    let v = m.read_line().await.expect("an error line before the close");
    assert_eq!(err_code(&v), Some(20));
    assert!(v["error"][1].as_str().unwrap().contains(limit), "{v}");
    assert!(m.closed().await);
}

#[tokio::test]
async fn connections_per_address_and_in_total_are_capped() {
    let (_pool, proxy) = setup(|c| {
        c.limits.max_connections_per_ip = 2;
        c.limits.max_connections = 3;
    })
    .await;
    let mut a = RawMiner::connect_from(proxy.addr, [127, 0, 0, 11]).await;
    let mut b = RawMiner::connect_from(proxy.addr, [127, 0, 0, 11]).await;
    a.handshake("w.a").await;
    b.handshake("w.b").await;
    let mut c = RawMiner::connect_from(proxy.addr, [127, 0, 0, 11]).await;
    refused_with(&mut c, "limits.max_connections_per_ip").await;

    let mut d = RawMiner::connect_from(proxy.addr, [127, 0, 0, 12]).await;
    d.handshake("w.d").await;
    let mut e = RawMiner::connect_from(proxy.addr, [127, 0, 0, 13]).await;
    refused_with(&mut e, "limits.max_connections").await;

    // The miners inside the limits did not notice.
    for m in [&mut a, &mut b, &mut d] {
        let r = m.call("mining.ping", json!([])).await;
        assert_eq!(r["result"], "pong");
    }
    // A place freed is a place taken again.
    drop(b);
    assert!(wait_until(5.0, || proxy.stats.miners_connected.load(Relaxed) == 2).await);
    let mut f = RawMiner::connect_from(proxy.addr, [127, 0, 0, 11]).await;
    f.handshake("w.f").await;
}

#[tokio::test]
async fn a_silent_miner_is_closed_after_the_idle_timeout_and_a_talking_one_is_not() {
    let (_pool, proxy) = setup(|c| c.limits.idle_timeout_s = std::time::Duration::from_secs(1).into()).await;
    let [mut quiet, mut talker] = miners(&proxy, ["w.quiet", "w.talker"]).await;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_millis(2500) {
        assert_eq!(talker.call("mining.ping", json!([])).await["result"], "pong");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(quiet.closed().await, "the silent miner was closed");
    assert_eq!(talker.call("mining.ping", json!([])).await["result"], "pong");
}

#[tokio::test]
async fn a_miner_with_only_invalid_shares_is_dropped_after_the_window() {
    let (_pool, proxy) = setup(|c| c.limits.invalid_share_window_s = std::time::Duration::from_secs(1).into()).await;
    let [mut bad, mut good] = miners(&proxy, ["w.bad", "w.good"]).await;
    let t0 = std::time::Instant::now();
    let mut seed = 0;
    let mut closed = false;
    while t0.elapsed() < std::time::Duration::from_secs(4) {
        // Both submit; only the good one's shares meet the target.
        let (job, ntime) = (bad.job_id(), bad.ntime());
        let (en2, nonce) = bad.grind(seed, 0x2000_0000, false);
        bad.send_raw(&format!(
            "{{\"id\":99,\"method\":\"mining.submit\",\"params\":[\"w\",\"{job}\",\"{en2}\",\"{ntime}\",\"{nonce}\"]}}\n"
        ))
        .await;
        let (job, ntime) = (good.job_id(), good.ntime());
        let (en2, nonce) = good.grind(seed, 0x2000_0000, true);
        let r = good.submit(&job, &en2, &ntime, &nonce, None).await;
        assert_eq!(r["result"], true, "{r}");
        seed += 1;
        if proxy.stats.miners_connected.load(Relaxed) == 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed, "the miner with only invalid shares was dropped");
    assert!(t0.elapsed() >= std::time::Duration::from_secs(1), "not before the window");
    assert!(bad.closed().await);
    let (job, ntime) = (good.job_id(), good.ntime());
    let (en2, nonce) = good.grind(seed, 0x2000_0000, true);
    assert_eq!(good.submit(&job, &en2, &ntime, &nonce, None).await["result"], true);
}

#[tokio::test]
async fn the_duplicate_memory_is_capped_and_says_so() {
    let (_pool, proxy) = setup(|c| c.limits.dedup_entries_per_miner = 3).await;
    let mut m = RawMiner::connect(proxy.addr).await;
    m.handshake("w.fast").await;
    let (job, ntime) = (m.job_id(), m.ntime());
    let mut shares = Vec::new();
    for seed in 0..4 {
        shares.push(m.grind(seed, 0x2000_0000, true));
    }
    for (en2, nonce) in &shares[..3] {
        assert_eq!(m.submit(&job, en2, &ntime, nonce, None).await["result"], true);
    }
    let r = m.submit(&job, &shares[3].0, &ntime, &shares[3].1, None).await;
    assert_eq!(err_code(&r), Some(20), "{r}");
    assert!(r["error"][1].as_str().unwrap().contains("too many shares"), "{r}");
    // Duplicates are still caught at the cap.
    let r = m.submit(&job, &shares[0].0, &ntime, &shares[0].1, None).await;
    assert_eq!(err_code(&r), Some(22), "{r}");
}

#[test]
fn every_limit_rejects_zero() {
    for key in [
        "max_connections",
        "max_connections_per_ip",
        "dedup_entries_per_miner",
        "idle_timeout_s",
        "write_timeout_s",
        "invalid_share_window_s",
        "subscribe_timeout_s",
        "handshake_strikes",
        "error_answers_per_s",
    ] {
        let toml = format!("upstream = [\"stratum+tcp://a:x@127.0.0.1:1\"]\n[limits]\n{key} = 0\n");
        let dir = std::env::temp_dir().join(format!("sluice-limits-{}-{key}.toml", std::process::id()));
        std::fs::write(&dir, toml).unwrap();
        let e = Config::load(Some(&dir)).and_then(|c| c.validate()).unwrap_err().to_string();
        let _ = std::fs::remove_file(&dir);
        assert!(e.contains(&format!("limits.{key}")), "{key}: {e}");
    }
}

#[tokio::test]
async fn the_allow_list_admits_only_listed_addresses_and_workers() {
    let (_pool, proxy) = setup(|c| {
        c.access.cidrs = vec!["127.0.0.20/31".parse().unwrap()];
        c.access.workers = vec!["farm1.*".into()];
    })
    .await;
    let mut outsider = RawMiner::connect_from(proxy.addr, [127, 0, 0, 22]).await;
    refused_with(&mut outsider, "access.cidrs").await;

    let mut m = RawMiner::connect_from(proxy.addr, [127, 0, 0, 21]).await;
    m.call("mining.subscribe", json!(["test/1.0"])).await;
    let r = m.call("mining.authorize", json!(["farm2.rig7", "x"])).await;
    assert_eq!(err_code(&r), Some(24), "{r}");
    assert!(r["error"][1].as_str().unwrap().contains("access.workers"), "{r}");
    let r = m.call("mining.authorize", json!(["farm1.rig7", "x"])).await;
    assert_eq!(r["result"], true, "{r}");
    m.wait_job().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miner_that_stops_reading_is_closed_after_the_write_timeout() {
    // Deep merkle branches make big jobs, so the stuck socket fills sooner.
    let pool =
        SimPool::start(SimPoolConfig { difficulty: 0.001, merkle_depth: 100, ..Default::default() }).await.unwrap();
    let mut cfg = test_config(vec![pool.url("acct")]);
    cfg.limits.write_timeout_s = std::time::Duration::from_secs(1).into();
    let proxy = Proxy::start(&cfg).await.unwrap();
    let [mut reader] = miners(&proxy, ["w.reader"]).await;
    // A miner with a tiny receive window that handshakes, then never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stuck = sock.connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stuck
        .write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"w.stuck\",\"x\"]}\n")
        .await
        .unwrap();
    assert!(wait_until(5.0, || proxy.stats.miners_connected.load(Relaxed) == 2).await);
    // Jobs pile up in its socket until a write to it stalls.
    let t0 = std::time::Instant::now();
    while proxy.stats.miners_connected.load(Relaxed) == 2 && t0.elapsed() < std::time::Duration::from_secs(20) {
        pool.new_job();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(proxy.stats.miners_connected.load(Relaxed), 1, "the stuck miner was closed");
    // The reading miner kept up the whole time and is still served.
    assert_eq!(reader.call("mining.ping", json!([])).await["result"], "pong");
    drop(stuck);
}

/// The counter `sluice_miner_connections_closed_total{reason="..."}` in a
/// scrape of the proxy's /metrics.
async fn closed_for(proxy: &Proxy, reason: &str) -> f64 {
    let url = format!("http://{}/metrics", proxy.http.expect("metrics listener"));
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let series = format!("sluice_miner_connections_closed_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The short leash before authorize (issue 15): a garbage line closes the
/// connection with one error line; a silent or trickling connection is
/// closed at `subscribe_timeout_s`, long before `handshake_timeout_s`; a
/// miner that has authorized is answered and kept. Each close is counted by
/// reason in the scrape.
#[tokio::test]
async fn connections_that_have_not_authorized_are_on_a_short_leash() {
    let (_pool, proxy) = setup(|c| {
        c.limits.subscribe_timeout_s = std::time::Duration::from_secs(1).into();
        c.limits.handshake_timeout_s = std::time::Duration::from_secs(60).into();
    })
    .await;
    let [mut honest] = miners(&proxy, ["w.honest"]).await;

    // Garbage before subscribe: one error line, then closed.
    let mut garbage = RawMiner::connect(proxy.addr).await;
    garbage.send_raw("\u{1}\u{2} GET / HTTP/1.1\n").await;
    let v = garbage.read_line().await.expect("one error line before the close");
    assert_eq!(err_code(&v), Some(20), "{v}");
    assert!(garbage.closed().await, "closed after the garbage line");
    assert!(garbage.notes.is_empty(), "nothing after the error line: {:?}", garbage.notes);

    // Silent, and a slowloris trickle of a subscribe that never ends its line.
    let t0 = std::time::Instant::now();
    let mut silent = RawMiner::connect(proxy.addr).await;
    let mut trickle = RawMiner::connect(proxy.addr).await;
    trickle.send_raw("{\"id\":1,\"method\":\"mining.subscribe\"").await;
    assert!(silent.closed().await, "the silent connection was closed");
    assert!(trickle.closed().await, "the trickle was closed");
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(950),
        "not before subscribe_timeout_s: {:?}",
        t0.elapsed()
    );

    // A connection that subscribed in time has the handshake's whole time.
    let mut slow = RawMiner::connect(proxy.addr).await;
    assert!(slow.call("mining.subscribe", json!(["slow/1.0"])).await["result"].is_array());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(slow.call("mining.authorize", json!(["w.slow", "x"])).await["result"], true);

    // An authorized miner's unknown method and garbage line are answered,
    // and it stays.
    let r = honest.call("mining.frobnicate", json!([1])).await;
    assert_eq!(err_code(&r), Some(20), "{r}");
    honest.send_raw("not json\n").await;
    let v = honest.read_line().await.expect("an answer to the garbage line");
    assert_eq!(err_code(&v), Some(20), "{v}");
    assert_eq!(honest.call("mining.ping", json!([])).await["result"], "pong");

    assert!(wait_until(5.0, || proxy.stats.miners_connected.load(Relaxed) == 2).await);
    assert_eq!(closed_for(&proxy, "limits.handshake_strikes").await, 1.0);
    assert_eq!(closed_for(&proxy, "limits.subscribe_timeout_s").await, 2.0);
    assert_eq!(closed_for(&proxy, "limits.handshake_timeout_s").await, 0.0);
}
