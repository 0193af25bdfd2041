//! `sluice bench-curtail`: time from `set_budget` until every targeted miner
//! is parked, on a real proxy with simulated miners in child processes (a
//! process may hold at most 20,000 open files here, so the fleet is spread).

use super::pool::{SimPool, SimPoolConfig};
use crate::app::Proxy;
use crate::config::Config;
use crate::control::client::{Client, Target};
use crate::control::types::{Plan, Status};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Child processes are killed when the bench ends, however it ends.
struct Children(Vec<Child>);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct CurtailBench {
    pub miners: usize,
    pub per_process: usize,
    pub rounds: usize,
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration, String> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(t0.elapsed())
}

async fn mining(c: &mut Client) -> u64 {
    c.call_typed::<Status>("status", serde_json::Value::Null).await.map(|s| s.site.mining).unwrap_or(0)
}

pub async fn curtail(b: CurtailBench) -> Result<(), Box<dyn std::error::Error>> {
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.00001,
        job_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await?;
    // The control socket, its lock and the state file, removed at the end.
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    let mut cfg = Config { upstream: vec![pool.url("bench")], listen: "127.0.0.1:0".parse()?, ..Config::default() };
    cfg.difficulty.start = 1e-7;
    cfg.difficulty.min = 1e-7;
    cfg.curtail.socket = socket.clone();
    cfg.metrics.listen = Default::default();
    cfg.curtail.hold_s = std::time::Duration::from_millis(0).into();
    cfg.curtail.ramp_up_w_per_s = 1e12; // resume everything at once between rounds
    let proxy = Proxy::start(&cfg).await?;
    let exe = std::env::current_exe()?;
    let procs = b.miners.div_ceil(b.per_process);
    let mut children = Children(Vec::new());
    for p in 0..procs {
        let n = b.per_process.min(b.miners - p * b.per_process);
        let child = Command::new(&exe)
            .args(["sim-fleet", "--target", &proxy.addr.to_string(), "--miners", &n.to_string()])
            .args(["--profiles", "cgminer", "--share-interval-ms", "60000", "--worker-prefix", &format!("b{p}")])
            .args(["--duration-s", &(120 + 60 * b.rounds as u64).to_string(), "--quiet"])
            .stdout(Stdio::null())
            .spawn()?;
        children.0.push(child);
    }
    println!("bench-curtail: {} miners in {procs} fleet processes -> proxy {} -> sim-pool", b.miners, proxy.addr);
    let mut c = Client::connect(&Target::Unix(socket.clone())).await?;
    let n = b.miners as u64;
    let t0 = Instant::now();
    while mining(&mut c).await < n {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {} of {n} miners registered in 120 s", mining(&mut c).await).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("all {n} miners connected and authorized in {:.1} s", t0.elapsed().as_secs_f64());
    let mut results = Vec::new();
    for round in 1..=b.rounds {
        let before = proxy.stats.sessions_parked.load(Relaxed);
        let t = Instant::now();
        let plan: Plan = c.call_typed("set_budget", json!({"watts": 0.0, "reason": "bench", "max_listed": 0})).await?;
        let planned = t.elapsed();
        let targeted = plan.park_count as u64;
        let all = wait_for("every targeted session to park", Duration::from_secs(60), || {
            proxy.stats.sessions_parked.load(Relaxed) - before >= targeted
        })
        .await?
            + planned;
        println!(
            "round {round}: {targeted} miners targeted; plan answered in {:.1} ms; every targeted miner parked after {:.1} ms",
            planned.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        );
        results.push(all.as_secs_f64() * 1e3);
        c.call("resume_all", json!({"reason": "bench"})).await?;
        let t = Instant::now();
        while mining(&mut c).await < n {
            if t.elapsed() > Duration::from_secs(60) {
                return Err("miners did not come back after resume_all".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    results.sort_by(f64::total_cmp);
    println!(
        "median over {} rounds: {:.1} ms from set_budget until all {} targeted miners were parked",
        results.len(),
        results[results.len() / 2],
        n
    );
    drop(children);
    drop(dir);
    Ok(())
}
