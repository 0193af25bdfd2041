//! `sluice bench-curtail`: time from `set_budget` until every targeted miner
//! is parked, on a real proxy with simulated miners in child processes (a
//! process may hold at most 20,000 open files here, so the fleet is spread).
//! Then a crash: a proxy process under a 50% budget is killed with SIGKILL
//! and started again, and the bench reports how soon it accepts miners and
//! the peak watts of miners holding a job while the fleet storms back.
//! Last, the closed loop: a mixed fleet in follow mode with a hall meter
//! that reads 1.10x nameplate, and a step of the GPU load from 20% to 60% of
//! the site limit; the bench reports how soon the measured hall is under the
//! new budget, the overshoot after that, and the miners parked beyond the
//! fewest that would have done.

use super::fleet::MODELS;
use super::pool::{SimPool, SimPoolConfig};
use crate::api::{Amount, Plan, SetBudget, Status};
use crate::app::Proxy;
use crate::config::Config;
use crate::control::client::{Client, Target};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Child processes are killed when the bench ends, however it ends.
pub(crate) struct Children(pub(crate) Vec<Child>);
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
    c.status(false).await.map(|s| s.site.mining).unwrap_or(0)
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
    // The whole fleet comes from 127.0.0.1.
    cfg.limits.max_connections_per_ip = b.miners + 100;
    cfg.curtail.hold_s = std::time::Duration::from_millis(0).into();
    cfg.curtail.ramp_up_w_per_s = 1e12; // resume everything at once between rounds
    let proxy = Proxy::start(&cfg).await?;
    let procs = b.miners.div_ceil(b.per_process);
    let children = fleet(&b, proxy.addr, |p| format!("b{p}"), 120 + 60 * b.rounds as u64)?;
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
        let plan: Plan =
            c.set_budget(&SetBudget { max_listed: Some(0), ..SetBudget::site(Amount::Watts(0.0), "bench") }).await?;
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
        c.resume_all("bench").await?;
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
    drop(proxy);
    restart(&b, &pool, dir.path()).await?;
    drop(dir);
    follow(&b, &pool).await?;
    Ok(())
}

/// Fleet processes of `b.miners` simulated miners against `target`; the
/// workers of process `p` are `prefix(p).N`.
fn fleet(
    b: &CurtailBench,
    target: std::net::SocketAddr,
    prefix: impl Fn(usize) -> String,
    secs: u64,
) -> std::io::Result<Children> {
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    for p in 0..b.miners.div_ceil(b.per_process) {
        let n = b.per_process.min(b.miners - p * b.per_process);
        let child = Command::new(&exe)
            .args(["sim-fleet", "--target", &target.to_string(), "--miners", &n.to_string()])
            .args(["--profiles", "cgminer", "--share-interval-ms", "60000", "--worker-prefix", &prefix(p)])
            .args(["--duration-s", &secs.to_string(), "--quiet"])
            .stdout(Stdio::null())
            .spawn()?;
        children.0.push(child);
    }
    Ok(children)
}

/// A `sluice run` child on `config`, its log in `log`.
fn proxy_process(config: &std::path::Path, log: &std::path::Path) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["run", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
}

/// Poll until the miners' port accepts a connection.
async fn accepting(addr: std::net::SocketAddr, limit: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(format!("the proxy did not accept connections on {addr} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The crash: a proxy process with every miner at a known 1,000 W under a
/// 50% budget is killed with SIGKILL and started again on the same port and
/// state file; the fleet reconnects at once.
async fn restart(b: &CurtailBench, pool: &SimPool, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    const WATTS: f64 = 1000.0;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let socket = dir.join("restart.sock");
    let config = dir.join("restart.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\nupstream = [\"{}\"]\n[difficulty]\nstart = 1e-7\nmin = 1e-7\n[metrics]\nlisten = \"\"\n\
             [limits]\nmax_connections_per_ip = {}\n\
             [curtail]\nsocket = \"{}\"\nhold_s = 0.0\n[[curtail.power]]\npattern = \"*\"\nwatts = {WATTS}\nj_per_th = 30.0\n",
            pool.url("bench"),
            b.miners + 100,
            socket.display()
        ),
    )?;
    let log = dir.join("restart.log");
    let mut first = proxy_process(&config, &log)?;
    accepting(addr, Duration::from_secs(30)).await?;
    let _fleet = fleet(b, addr, |p| format!("r{p}"), 600)?;
    let n = b.miners as u64;
    let mut c = Client::connect(&Target::Unix(socket.clone())).await?;
    let t0 = Instant::now();
    loop {
        let st: Status = c.status(false).await?;
        if st.site.connected == n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(format!("restart phase: only {} of {n} miners connected", st.site.connected).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let plan: Plan = c
        .set_budget(&SetBudget { max_listed: Some(0), ..SetBudget::site(Amount::Fraction(0.5), "bench crash") })
        .await?;
    let budget_w = plan.budget_w.0;
    // Parked miners are closed and come back to be held: wait for all.
    loop {
        let st: Status = c.status(false).await?;
        if st.site.connected == n && st.site.parked == plan.park_count as u64 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(240) {
            return Err("restart phase: the fleet did not settle under the budget".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
    first.kill()?;
    first.wait()?;
    let killed = Instant::now();
    let mut second = Children(vec![proxy_process(&config, &log)?]);
    let up = accepting(addr, Duration::from_secs(30)).await?;
    let mut c = loop {
        match Client::connect(&Target::Unix(socket.clone())).await {
            Ok(c) => break c,
            Err(e) if killed.elapsed() > Duration::from_secs(30) => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    let (mut peak, mut polls) = (0.0f64, 0u64);
    let back = loop {
        let st: Status = c.status(false).await?;
        polls += 1;
        peak = peak.max(st.site.watts.0);
        if st.site.connected == n {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(120) {
            return Err(format!("after the restart only {} of {n} miners came back", st.site.connected).into());
        }
    };
    println!(
        "crash: {n} miners under a 50% budget ({:.0} kW), proxy killed with SIGKILL and started again: accepting miners {:.0} ms after the kill; all {n} back after {:.1} s; peak {:.0} kW of miners holding a job ({polls} status polls): {}",
        budget_w / 1e3,
        up.as_secs_f64() * 1e3,
        back.as_secs_f64(),
        peak / 1e3,
        if peak <= budget_w { "within the budget" } else { "OVER THE BUDGET" }
    );
    second.0[0].kill()?;
    drop(second);
    if peak > budget_w {
        return Err(format!("peak {peak} W over the {budget_w} W budget after the restart").into());
    }
    Ok(())
}

/// Real draw over nameplate, as the bench's hall meter reads it.
const OVER: f64 = 1.10;

/// The fewest miners to park (least efficient first, as the policy does)
/// for the real draw of `counts[k]` miners of `MODELS[k]` to fit `budget`.
fn fewest_to_park(counts: &[usize; 5], budget: f64) -> usize {
    let mut draw: f64 = counts.iter().zip(MODELS).map(|(&n, m)| n as f64 * m.2 * OVER).sum();
    let mut order: Vec<usize> = (0..5).collect();
    order.sort_by(|&a, &b| MODELS[b].3.total_cmp(&MODELS[a].3));
    let mut parked = 0;
    for k in order {
        for _ in 0..counts[k] {
            if draw <= budget {
                return parked;
            }
            draw -= MODELS[k].2 * OVER;
            parked += 1;
        }
    }
    parked
}

/// The closed loop at scale: follow mode with a meter, a GPU step.
async fn follow(b: &CurtailBench, pool: &SimPool) -> Result<(), Box<dyn std::error::Error>> {
    use super::gauges::{hall_watts, Gauges, Reading};
    use crate::api::MetBy;
    use crate::curtail::closed_loop::{FollowConfig, MeterConfig};
    use crate::curtail::feed::{SourceConfig, SourceKind};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    let n = b.miners;
    // One model per fleet process, in turn.
    let per = n.div_ceil(5);
    let mut counts = [0usize; 5];
    for p in 0..n.div_ceil(per) {
        counts[p % 5] += per.min(n - p * per);
    }
    let fleet_real: f64 = counts.iter().zip(MODELS).map(|(&c, m)| c as f64 * m.2 * OVER).sum();
    // At 20% GPU load every miner fits; at 60% about half must go.
    let limit = (fleet_real / 0.75 / 1e3).round() * 1e3;
    let margin = 0.01 * limit;
    let gpu = Arc::new(AtomicU64::new((0.2 * limit) as u64));
    let sessions: Arc<parking_lot::Mutex<Option<Arc<crate::downstream::signal::Sessions>>>> = Default::default();
    let (g, s) = (gpu.clone(), sessions.clone());
    let gpu_read: Reading = Arc::new(move || Some(g.load(Relaxed) as f64));
    let hall_read: Reading = Arc::new(move || Some(s.lock().as_ref().map_or(0.0, |s| hall_watts(s, OVER))));
    let gauges = Gauges::start(vec![("gpu_watts".into(), gpu_read), ("hall_watts".into(), hall_read)]).await?;
    let src = |q: &str| SourceConfig {
        kind: Some(SourceKind::Prometheus),
        url: gauges.url(),
        query: q.into(),
        ..SourceConfig::default()
    };
    let interval = Duration::from_secs(2);
    let mut cfg = Config { upstream: vec![pool.url("bench")], listen: "127.0.0.1:0".parse()?, ..Config::default() };
    cfg.difficulty.start = 1e-7;
    cfg.difficulty.min = 1e-7;
    cfg.curtail.socket = Default::default();
    cfg.metrics.listen = Default::default();
    cfg.limits.max_connections_per_ip = n + 100;
    cfg.curtail.power = super::fleet::model_rules();
    cfg.curtail.meter =
        Some(MeterConfig { source: src("sum(hall_watts)"), interval_s: interval.into(), ..MeterConfig::default() });
    cfg.curtail.follow = Some(FollowConfig {
        site_limit_w: crate::units::Watts(limit),
        margin_w: crate::units::Watts(margin),
        interval_s: interval.into(),
        other_load: src("sum(gpu_watts)"),
        ..FollowConfig::default()
    });
    let proxy = Proxy::start(&cfg).await?;
    *sessions.lock() = Some(proxy.sessions());
    let settle = cfg.curtail.meter.as_ref().map(|m| m.settle_s.get()).unwrap_or_default();
    let _fleet =
        fleet(&CurtailBench { per_process: per, ..*b }, proxy.addr, |p| format!("{}.p{p}", MODELS[p % 5].0), 600)?;
    println!(
        "follow: {n} miners of 5 models, real draw {:.2} MW ({OVER:.2} x nameplate); site limit {:.2} MW, margin {:.2} MW; meter and GPU feed every {} s, settle_s {} s",
        fleet_real / 1e6,
        limit / 1e6,
        margin / 1e6,
        interval.as_secs(),
        settle.as_secs()
    );
    let t0 = Instant::now();
    let st = loop {
        let st = proxy.curtailer.status(false).await?;
        if st.site.mining == n as u64 && (st.calibration.factor - OVER).abs() < 0.01 && st.site.measured_w.is_some() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            return Err(format!("follow phase: not calibrated with every miner mining in 180 s: {:?}", st.site).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "follow: GPU at 20%: all {n} mining, budget {:.2} MW, meter {:.2} MW, calibration x{:.3} (after {:.0} s)",
        st.budget.watts.map_or(0.0, |w| w.0) / 1e6,
        st.site.measured_w.map_or(0.0, |w| w.0) / 1e6,
        st.calibration.factor,
        t0.elapsed().as_secs_f64()
    );
    // The step.
    let budget = limit - 0.6 * limit - margin;
    let step = Instant::now();
    gpu.store((0.6 * limit) as u64, Relaxed);
    let registry = proxy.sessions();
    let (mut first_under, mut last_over, mut peak_after) = (None::<Duration>, Duration::ZERO, 0.0f64);
    let mut met_measured = None::<Duration>;
    let window = Duration::from_secs(45);
    while step.elapsed() < window {
        let h = hall_watts(&registry, OVER);
        let t = step.elapsed();
        if h <= budget {
            first_under.get_or_insert(t);
        } else {
            last_over = t;
        }
        if first_under.is_some() {
            peak_after = peak_after.max(h);
        }
        if met_measured.is_none() {
            let st = proxy.curtailer.status(false).await?;
            let new_budget = st.budget.watts.is_some_and(|w| (w.0 - budget).abs() < 1.0);
            if new_budget && st.budget.met == Some(true) && st.budget.met_by == Some(MetBy::Measured) {
                met_measured = Some(t);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = proxy.curtailer.status(false).await?;
    let fewest = fewest_to_park(&counts, budget);
    let over_shed = st.site.parked as i64 - fewest as i64;
    let under = first_under.ok_or("the measured hall never went under the budget")?;
    println!(
        "follow: GPU 20% -> 60%: budget {:.2} MW; the hall meter under it after {:.1} s (last over at {:.1} s); \
         \"met\" on the measured figure after {}; overshoot after that {:.0} W; parked {} where {fewest} would do: over-shed {over_shed} (goal: under within 15 s, overshoot 0, over-shed <= 1 per group)",
        budget / 1e6,
        under.as_secs_f64(),
        last_over.as_secs_f64(),
        met_measured.map_or("never".to_owned(), |t| format!("{:.1} s", t.as_secs_f64())),
        (peak_after - budget).max(0.0),
        st.site.parked,
    );
    Ok(())
}
