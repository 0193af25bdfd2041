//! `sluice demo`: a sim-pool, a real proxy and a mixed fleet on loopback,
//! with a live summary of both ends.

use super::fleet::{Fleet, FleetConfig, Profile};
use super::pool::{SimPool, SimPoolConfig};
use crate::app::Proxy;
use crate::config::Config;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub miners: usize,
    /// Zero runs until interrupted.
    pub duration: Duration,
    pub report_every: Duration,
}

/// The proxy configuration the demo runs with (also a worked example of the
/// keys a test rig changes).
pub fn demo_proxy_config(pool_url: crate::config::PoolUrl) -> Config {
    let mut c =
        Config { upstream: vec![pool_url], listen: "127.0.0.1:0".parse().expect("literal"), ..Config::default() };
    c.difficulty.start = 0.00002;
    c.difficulty.min = 0.000001;
    c.difficulty.target_shares_per_min = 60.0;
    c.difficulty.retarget_s = std::time::Duration::from_secs(20).into();
    c.curtail.socket = std::path::PathBuf::new(); // the demo leaves no files behind
    c.metrics.listen = Default::default();
    c
}

pub async fn run(cfg: DemoConfig) -> Result<(), Box<dyn std::error::Error>> {
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.0001,
        network_difficulty: 0.001,
        job_interval: Duration::from_secs(10),
        ..SimPoolConfig::default()
    })
    .await?;
    let proxy = Proxy::start(&demo_proxy_config(pool.url("demo.account"))).await?;
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: cfg.miners,
        profiles: Profile::ALL.to_vec(),
        share_interval: Duration::from_secs(1),
        worker_prefix: "rig".into(),
        ..FleetConfig::default()
    });
    println!("sluice demo: sim-pool on {}, proxy on {}, {} simulated miners (cgminer, Antminer S21, Whatsminer, NiceHash, Bitaxe)", pool.addr, proxy.addr, cfg.miners);
    println!("pool difficulty 0.0001, miners start at 0.00002: about one share in five is worth forwarding.");
    let started = Instant::now();
    let mut tick = tokio::time::interval(cfg.report_every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let t = started.elapsed().as_secs_f64();
        let f = &fleet.stats;
        let s = proxy.stats.shares.snapshot();
        println!(
            "[{t:5.1}s] miners {:>3} | fleet {:>5} sent {:>5} ok {:>3} rej {:>6.1} MH/s | sluice {:>5} valid {:>3} rej {:>4} fwd, pool said {:>4} ok {:>2} rej, est {:>6.1} MH/s | pool {:>4} accepted {:>2} blocks",
            proxy.stats.miners_connected.load(Relaxed),
            f.submitted.load(Relaxed),
            f.accepted.load(Relaxed),
            f.rejected.load(Relaxed),
            f.hashes.load(Relaxed) as f64 / t / 1e6,
            s.valid,
            s.rejected,
            s.forwarded,
            s.pool_accepted,
            s.pool_rejected,
            s.work * crate::share::HASHES_PER_DIFF1 / t / 1e6,
            pool.stats.accepted.load(Relaxed),
            pool.stats.blocks.load(Relaxed),
        );
        if !cfg.duration.is_zero() && started.elapsed() >= cfg.duration {
            break;
        }
    }
    fleet.stop();
    let s = proxy.stats.shares.snapshot();
    let p = pool.stats.accepted.load(Relaxed);
    println!(
        "done: sluice validated {} shares and forwarded {}; the pool accepted {} of them ({} blocks found).",
        s.valid, s.forwarded, p, s.blocks
    );
    Ok(())
}
