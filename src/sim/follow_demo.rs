//! `sluice demo --follow`: a day at a site shared by ASIC miners and a GPU
//! cluster, compressed to a minute. A sim-pool, a real proxy in follow mode
//! and a mixed fleet on loopback; a simulated GPU cluster whose draw follows
//! a daily AI curve, and a simulated hall meter, both served as the
//! Prometheus query API. A line per simulated hour, a summary, and an SVG
//! chart of the day.
//!
//! With `--power-target`, two sites live through the same day side by
//! side, each with its own proxy, hall meter and fleet of Braiins OS
//! doubles ([`super::firmware`], driven by asic-rs on port 80 of their own
//! loopback addresses): one meets its budget with power targets
//! (`method = "power-target"`), the other by parking alone (`method =
//! "firmware"`). The chart shows the hashrate each kept.

use super::firmware::{Family, FirmwareDouble, Spec};
use super::fleet::{Fleet, FleetConfig, FleetStats, Profile, MODELS};
use super::gauges::{hall, Gauges, Reading};
use super::load::source_ip;
use super::pool::{SimPool, SimPoolConfig};
use crate::api::Method;
use crate::app::Proxy;
use crate::curtail::closed_loop::{FollowConfig, MeterConfig};
use crate::curtail::feed::{SourceConfig, SourceKind};
use crate::curtail::power::PowerRule;
use crate::curtail::GroupConfig;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct FollowDemo {
    pub miners: usize,
    /// How long a simulated day lasts.
    pub day: Duration,
    /// Where the chart goes (None: the temporary directory).
    pub chart: Option<PathBuf>,
    /// Two sites through the same day: power targets against parking.
    pub power_target: bool,
}

/// Real draw over nameplate, as the simulated hall meter reads it (the
/// network-parked fleet; a firmware double's draw is its own).
const OVER: f64 = 1.07;

/// The `--power-target` fleet: worker prefix, model (built-in, with a
/// curve), the name its firmware reports, its envelope's floor (of
/// nameplate).
const FIRMWARE_MODELS: [(&str, &str, &str, f64); 2] =
    [("s19kpro", "S19k Pro", "Antminer S19k Pro", 0.40), ("s19xp", "S19 XP", "Antminer S19 XP", 0.50)];

/// The loopback blocks of the `--power-target` doubles: two per site.
const BLOCK: u8 = 71;

/// The GPU cluster's draw through the day, as a fraction of its capacity:
/// overnight training, a morning climb, the afternoon inference peak, an
/// evening fall (hour, fraction; linear between).
const GPU_DAY: [(f64, f64); 9] = [
    (0.0, 0.55),
    (4.0, 0.45),
    (7.0, 0.50),
    (10.0, 0.78),
    (14.0, 0.95),
    (17.0, 0.92),
    (20.0, 0.75),
    (22.0, 0.62),
    (24.0, 0.55),
];

fn gpu_fraction(hour: f64) -> f64 {
    let h = hour.rem_euclid(24.0);
    GPU_DAY
        .windows(2)
        .find(|w| h >= w[0].0 && h <= w[1].0)
        .map(|w| w[0].1 + (w[1].1 - w[0].1) * (h - w[0].0) / (w[1].0 - w[0].0))
        .unwrap_or(GPU_DAY[0].1)
}

/// One sample of the day.
#[derive(Debug, Clone, Copy)]
struct Point {
    hour: f64,
    gpu_w: f64,
    budget_w: f64,
    measured_w: f64,
    /// What sluice estimates the miners mining draw.
    estimate_w: f64,
    hashrate_hs: f64,
    parked: u64,
    /// Miners running under their own power target.
    lowered: u64,
}

/// What a hall meter reads now: watts, and the hashrate of the miners
/// mining (H/s); and how many run lowered.
type Meter = Arc<dyn Fn() -> (f64, f64, u64) + Send + Sync>;

/// How a site meets its budget, and so what its fleet is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Simulated miners of the five [`MODELS`], parked by the network; the
    /// meter reads the sessions holding a job at [`OVER`] x nameplate.
    Network,
    /// Braiins OS doubles of [`FIRMWARE_MODELS`] in a group of this method;
    /// the meter reads each double's draw (a miner holding no job idles).
    Firmware(Method),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Network => "the site",
            Kind::Firmware(Method::PowerTarget) => "power targets",
            Kind::Firmware(_) => "parking alone",
        }
    }
}

/// One site of the day.
struct Site {
    kind: Kind,
    proxy: Proxy,
    fleets: Vec<Fleet>,
    miners: u64,
    /// Every miner's hashrate at full power (H/s).
    full_hs: f64,
    meter: Meter,
    points: Vec<Point>,
}

/// The fleet of a site: the models of each kind, and how many of each.
fn fleet_of(kind: Kind, miners: usize) -> (usize, f64, f64) {
    match kind {
        Kind::Network => {
            let per = miners.div_ceil(MODELS.len());
            let w = MODELS.iter().map(|m| m.2 * OVER).sum::<f64>() * per as f64;
            let hs = MODELS.iter().map(|m| m.2 / m.3 * 1e12).sum::<f64>() * per as f64;
            (per, w, hs)
        }
        Kind::Firmware(_) => {
            let per = miners.div_ceil(FIRMWARE_MODELS.len());
            let spec = |m: &(&str, &str, &str, f64)| Spec::builtin(m.1, m.2, m.3, Duration::ZERO).expect("built-in");
            let w = FIRMWARE_MODELS.iter().map(|m| spec(m).nominal_w).sum::<f64>() * per as f64;
            let hs = FIRMWARE_MODELS.iter().map(|m| spec(m).nominal_ths * 1e12).sum::<f64>() * per as f64;
            (per, w, hs)
        }
    }
}

pub async fn run(d: FollowDemo) -> Result<(), Box<dyn std::error::Error>> {
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.0001,
        network_difficulty: 1e9,
        job_interval: Duration::from_secs(3600),
        ..SimPoolConfig::default()
    })
    .await?;
    let kinds = match d.power_target {
        true => vec![Kind::Firmware(Method::PowerTarget), Kind::Firmware(Method::Firmware)],
        false => vec![Kind::Network],
    };
    // The site: the fleet's real draw F; GPUs of 1.4 F; a limit that lets
    // every miner run at the night trough and about a third at the peak.
    // Both sites of --power-target have the same fleet, so the same limit.
    let (per_model, fleet_w, _) = fleet_of(kinds[0], d.miners);
    let gpu_max = 1.4 * fleet_w;
    // The margin absorbs what the GPUs add between two readings of their
    // draw plus the meter's lag: here the morning climb, ~10% of the
    // cluster an hour, over about two tenths of an hour.
    let margin = 0.03 * gpu_max;
    let limit = 0.45 * gpu_max + fleet_w + margin;
    let hour = d.day.as_secs_f64() / 24.0;

    let gpu = Arc::new(AtomicU64::new((gpu_fraction(0.0) * gpu_max) as u64));
    let g = gpu.clone();
    let gpu_read: Reading = Arc::new(move || Some(g.load(Relaxed) as f64));
    // The GPU draw under the name NVIDIA's DCGM exporter gives it; a hall
    // meter per site, with no reading until its proxy and fleet are there.
    let meters: Vec<Arc<OnceLock<Meter>>> = kinds.iter().map(|_| Arc::default()).collect();
    let mut gauges = vec![("DCGM_FI_DEV_POWER_USAGE".to_string(), gpu_read)];
    for (i, slot) in meters.iter().enumerate() {
        let slot = slot.clone();
        gauges.push((format!("hall_watts_{i}"), Arc::new(move || slot.get().map(|m| m().0))));
    }
    let gauges = Gauges::start(gauges).await?;
    let src = |q: &str| SourceConfig {
        kind: Some(SourceKind::Prometheus),
        url: gauges.url(),
        query: q.into(),
        ..SourceConfig::default()
    };
    // A simulated hour is a few seconds: every time constant of the loop is
    // scaled to it (a real site reads every few seconds and settles in ten).
    let secs = |h: f64| Duration::from_secs_f64(h * hour);
    let mut sites = Vec::new();
    for (i, kind) in kinds.iter().copied().enumerate() {
        let mut cfg = super::demo::demo_proxy_config(pool.url("demo.account"));
        cfg.curtail.hold_s = secs(0.25).into();
        cfg.curtail.ramp_up_w_per_s = fleet_w / (1.5 * hour);
        cfg.curtail.meter = Some(MeterConfig {
            source: src(&format!("sum(hall_watts_{i})")),
            interval_s: secs(0.1).into(),
            stale_after_s: secs(1.0).into(),
            settle_s: secs(0.4).into(),
            ..MeterConfig::default()
        });
        cfg.curtail.follow = Some(FollowConfig {
            site_limit_w: crate::units::Watts(limit),
            margin_w: crate::units::Watts(margin),
            interval_s: secs(0.1).into(),
            stale_after_s: secs(1.0).into(),
            other_load: src("sum(DCGM_FI_DEV_POWER_USAGE)"),
            ..FollowConfig::default()
        });
        let site = match kind {
            Kind::Network => network_site(cfg, per_model).await?,
            // A new target settles in three minutes, as a tuner's might;
            // one not read back within half an hour is taken as refused.
            Kind::Firmware(method) => {
                let block = BLOCK + 2 * i as u8;
                firmware_site(cfg, method, per_model, block, secs(0.05), secs(0.5)).await?
            }
        };
        meters[i].set(site.meter.clone()).ok();
        sites.push(site);
    }
    let n = sites[0].miners;
    match d.power_target {
        false => println!(
            "sluice demo --follow: a day in {:.0} s. Site limit {}, GPU cluster up to {}, {n} miners ({} of each of 5 models) drawing {} at {OVER:.2} x nameplate; margin {}.",
            d.day.as_secs_f64(),
            kw(limit),
            kw(gpu_max),
            per_model,
            kw(fleet_w),
            kw(margin)
        ),
        true => println!(
            "sluice demo --follow --power-target: a day in {:.0} s at two sites side by side. Each: site limit {}, GPU cluster up to {}, {n} Braiins OS miners ({per_model} S19k Pro, {per_model} S19 XP; doubles on port 80 of 127.{BLOCK}-{}.0.x, driven by asic-rs) drawing {}; margin {}. One meets its budget with power targets, the other by parking alone.",
            d.day.as_secs_f64(),
            kw(limit),
            kw(gpu_max),
            BLOCK + 3,
            kw(fleet_w),
            kw(margin)
        ),
    }
    println!("The budget is site limit - GPU load - margin (follow mode); the hall meter closes the loop.");
    // Every miner connected and mining, the hall meter read since, the
    // estimates calibrated on it and the first budget met, before the day
    // starts (its first row is then a reading of them, not of an empty hall
    // or of the fleet before its first plan).
    let t0 = Instant::now();
    for site in &sites {
        let mut connected_ms = None;
        loop {
            let st = site.proxy.curtailer.status(false).await?;
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            if st.site.connected >= site.miners && (site.meter)().0 > 0.0 {
                let since = *connected_ms.get_or_insert(now_ms);
                // Calibrated, or needing none (a double draws what sluice
                // estimates).
                let exact = st.site.measured_w.is_some_and(|m| (m.0 - st.site.watts.0).abs() <= 0.01 * m.0);
                let settled = (st.calibration.updated_at_ms.is_some() || exact) && st.budget.met == Some(true);
                if st.site.measured_at_ms.is_some_and(|at| at > since) && settled {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "{}: the simulated fleet did not connect and get read by the meter within 60 s: {}",
                    site.kind.name(),
                    serde_json::to_string(&st).unwrap_or_default()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    match d.power_target {
        false => println!(
            "{:>5} | {:>10} | {:>10} | {:>10} | {:>10} | {:>6} | {:>9} | budget met",
            "hour", "GPU", "budget", "ASIC meter", "estimate", "parked", "kept"
        ),
        true => println!(
            "{:>31} || {:<42} || parking alone\n{:>5} | {:>10} | {:>10} || {:>10} | {:>7} | {:>6} | {:>9} || {:>10} | {:>6} | {:>9}",
            "",
            "power targets",
            "hour",
            "GPU",
            "budget",
            "ASIC meter",
            "lowered",
            "parked",
            "kept",
            "ASIC meter",
            "parked",
            "kept"
        ),
    }
    let start = Instant::now();
    let mut next_hour = 0u32;
    let sample = hour / 6.0;
    loop {
        let h = start.elapsed().as_secs_f64() / hour;
        if h >= 24.0 {
            break;
        }
        let gpu_w = gpu_fraction(h) * gpu_max;
        gpu.store(gpu_w as u64, Relaxed);
        let mut statuses = Vec::new();
        for site in &mut sites {
            let st = site.proxy.curtailer.status(false).await?;
            let (_, hs, lowered) = (site.meter)();
            site.points.push(Point {
                hour: h,
                gpu_w,
                budget_w: st.budget.watts.map_or(f64::NAN, |w| w.0),
                measured_w: st.site.measured_w.map_or(f64::NAN, |w| w.0),
                estimate_w: st.site.watts.0,
                hashrate_hs: hs,
                parked: st.site.parked,
                lowered,
            });
            statuses.push(st);
        }
        if h >= f64::from(next_hour) {
            let met = |st: &crate::api::Status| match (st.budget.met, st.budget.met_by) {
                (Some(true), Some(by)) => format!("yes ({})", wire(&by)),
                (Some(false), Some(by)) => format!("NO ({})", wire(&by)),
                _ => "-".into(),
            };
            let metered = |p: &Point| if p.measured_w.is_finite() { kw(p.measured_w) } else { "no reading".into() };
            let p = sites[0].points[sites[0].points.len() - 1];
            match &sites[..] {
                [_] => println!(
                    "{:>02}:00 | {:>10} | {:>10} | {:>10} | {:>10} | {:>3}/{n:<2} | {:>5.2} PH/s | {}",
                    next_hour,
                    kw(p.gpu_w),
                    kw(p.budget_w),
                    metered(&p),
                    kw(p.estimate_w),
                    p.parked,
                    p.hashrate_hs / 1e15,
                    met(&statuses[0])
                ),
                [_, b, ..] => {
                    let q = b.points[b.points.len() - 1];
                    println!(
                        "{:>02}:00 | {:>10} | {:>10} || {:>10} | {:>3}/{n:<3} | {:>6} | {:>5.2} PH/s || {:>10} | {:>6} | {:>5.2} PH/s",
                        next_hour,
                        kw(p.gpu_w),
                        kw(p.budget_w),
                        metered(&p),
                        p.lowered,
                        p.parked,
                        p.hashrate_hs / 1e15,
                        metered(&q),
                        q.parked,
                        q.hashrate_hs / 1e15,
                    )
                }
                [] => {}
            }
            next_hour += 1;
        }
        tokio::time::sleep(Duration::from_secs_f64(sample)).await;
    }
    for site in &sites {
        for f in &site.fleets {
            f.stop();
        }
    }
    let mut kept = Vec::new();
    for site in &sites {
        if sites.len() > 1 {
            println!("{}:", site.kind.name());
        }
        kept.push(summary(&site.points, hour, limit, site.full_hs));
    }
    if let [t, p] = kept[..] {
        println!(
            "power targets kept {:.3} x the hashing of parking alone over the day ({:.1}% against {:.1}% of a full day), under the same budgets.",
            t / p.max(1e-12),
            100.0 * t,
            100.0 * p
        );
    }
    let path = d.chart.unwrap_or_else(|| std::env::temp_dir().join(format!("sluice-day-{}.svg", std::process::id())));
    chart(&sites, limit, &path).map_err(|e| format!("writing the chart to {}: {e}", path.display()))?;
    println!("chart of the day: {}", path.display());
    Ok(())
}

/// `miners` simulated miners of one model (workers `PREFIX.K`), from
/// loopback block `ip_block` if given.
fn model_fleet(target: std::net::SocketAddr, miners: usize, prefix: &str, ip_block: Option<u8>) -> Fleet {
    Fleet::start(FleetConfig {
        target,
        miners,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_secs(2),
        worker_prefix: prefix.into(),
        ip_block,
        ..FleetConfig::default()
    })
}

/// The classic site: five models of simulated miners, a power rule each.
async fn network_site(mut cfg: crate::config::Config, per_model: usize) -> Result<Site, Box<dyn std::error::Error>> {
    cfg.curtail.power = super::fleet::model_rules();
    let proxy = Proxy::start(&cfg).await?;
    let fleets = MODELS.iter().map(|m| model_fleet(proxy.addr, per_model, m.0, None)).collect();
    let sessions = proxy.sessions();
    let meter: Meter = Arc::new(move || {
        let (w, hs) = hall(&sessions, OVER);
        (w, hs, 0)
    });
    let (_, _, full_hs) = fleet_of(Kind::Network, per_model * MODELS.len());
    Ok(Site {
        kind: Kind::Network,
        proxy,
        fleets,
        miners: (per_model * MODELS.len()) as u64,
        full_hs,
        meter,
        points: Vec::new(),
    })
}

/// A site of Braiins OS doubles in one group of `method`: model j's
/// miners connect from, and answer on port 80 of, loopback block
/// `block + j`.
async fn firmware_site(
    mut cfg: crate::config::Config,
    method: Method,
    per_model: usize,
    block: u8,
    settle: Duration,
    settle_s: Duration,
) -> Result<Site, Box<dyn std::error::Error>> {
    let mut doubles = Vec::new();
    for (j, (prefix, model, firmware_name, floor)) in FIRMWARE_MODELS.iter().enumerate() {
        let spec = Spec::builtin(model, firmware_name, *floor, settle).expect("a built-in model with a curve");
        cfg.curtail.power.push(PowerRule {
            pattern: format!("{prefix}.*"),
            model: Some((*model).into()),
            watts: Some(spec.nominal_w),
            ..Default::default()
        });
        for k in 0..per_model {
            let ip = source_ip(block + j as u8, k).into();
            let double = FirmwareDouble::start(ip, Family::Braiins, spec.clone()).await.map_err(|e| {
                format!("{ip}:80 for a Braiins OS double (asic-rs only looks on port 80: run as root, or lower net.ipv4.ip_unprivileged_port_start): {e}")
            })?;
            doubles.push((format!("{prefix}.{k}"), double));
        }
    }
    cfg.curtail.group = vec![GroupConfig {
        name: "bos".into(),
        pattern: "*".into(),
        method,
        firmware: "braiins".into(),
        username: "root".into(),
        password: "root".into(),
        settle_s: settle_s.into(),
        ..GroupConfig::default()
    }];
    let proxy = Proxy::start(&cfg).await?;
    let fleets: Vec<Fleet> = FIRMWARE_MODELS
        .iter()
        .enumerate()
        .map(|(j, m)| model_fleet(proxy.addr, per_model, m.0, Some(block + j as u8)))
        .collect();
    let stats: Vec<Arc<FleetStats>> = fleets.iter().map(|f| f.stats.clone()).collect();
    let meter: Meter = Arc::new(move || {
        let holders: std::collections::BTreeSet<String> =
            stats.iter().flat_map(|s| s.holders.lock().iter().cloned().collect::<Vec<_>>()).collect();
        doubles.iter().fold((0.0, 0.0, 0), |(w, hs, low), (worker, d)| {
            let lowered = !d.paused() && d.target() < d.nominal_w() - 1.0;
            match holders.contains(worker) {
                true => (w + d.draw(), hs + d.hashrate_ths() * 1e12, low + u64::from(lowered)),
                // No job: its hashboards idle.
                false => (w + d.draw().min(d.idle_w()), hs, low),
            }
        })
    });
    let (_, _, full_hs) = fleet_of(Kind::Firmware(method), per_model * FIRMWARE_MODELS.len());
    Ok(Site {
        kind: Kind::Firmware(method),
        proxy,
        fleets,
        miners: (per_model * FIRMWARE_MODELS.len()) as u64,
        full_hs,
        meter,
        points: Vec::new(),
    })
}

fn kw(w: f64) -> String {
    if w.is_nan() {
        "-".into()
    } else {
        format!("{:.1} kW", w / 1e3)
    }
}

fn wire<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_value(t).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// What the day came to: energy to each tenant, hashing kept, and how
/// often and by how much the measured draw was over the budget.
/// Returns the hashing kept, as a fraction of a full day's.
fn summary(points: &[Point], hour: f64, limit: f64, full_hs: f64) -> f64 {
    let dt = |i: usize| if i + 1 < points.len() { points[i + 1].hour - points[i].hour } else { 0.0 };
    let (mut gpu_kwh, mut asic_kwh, mut eh) = (0.0, 0.0, 0.0);
    let (mut over_budget_h, mut over_limit_h) = (0.0, 0.0);
    // The worst excess over each, and where it was.
    let (mut worst_budget, mut worst_limit) = ((0.0f64, 0), (0.0f64, 0));
    for (i, p) in points.iter().enumerate() {
        gpu_kwh += p.gpu_w / 1e3 * dt(i);
        if p.measured_w.is_finite() {
            asic_kwh += p.measured_w / 1e3 * dt(i);
            if p.measured_w > p.budget_w {
                over_budget_h += dt(i);
                if p.measured_w - p.budget_w > worst_budget.0 {
                    worst_budget = (p.measured_w - p.budget_w, i);
                }
            }
            if p.measured_w + p.gpu_w > limit {
                over_limit_h += dt(i);
                if p.measured_w + p.gpu_w - limit > worst_limit.0 {
                    worst_limit = (p.measured_w + p.gpu_w - limit, i);
                }
            }
        }
        eh += p.hashrate_hs * dt(i);
    }
    let kept = eh / (full_hs * 24.0);
    println!(
        "the day (one simulated hour = {hour:.1} s): GPUs {gpu_kwh:.0} kWh, miners {asic_kwh:.0} kWh measured, hashing kept {:.0}% of a full day.",
        100.0 * kept
    );
    let worst = |(w, i): (f64, usize)| match w > 0.0 {
        true => format!(" (worst {} at {})", kw(w), why_over(points, i)),
        false => String::new(),
    };
    println!("site draw (GPU + measured ASIC) over the site limit: {over_limit_h:.1} h of 24{}.", worst(worst_limit));
    println!("measured ASIC draw over its budget: {over_budget_h:.1} h of 24{}.", worst(worst_budget));
    kept
}

/// "HH:MM".
fn clock(hour: f64) -> String {
    let m = (hour * 60.0).round() as u64;
    format!("{:02}:{:02}", m / 60 % 24, m % 60)
}

/// When, and why from the data, the measured draw was over at `points[i]`:
/// which way the GPUs were going, whether the plan had just parked miners
/// (and the budget stepped down) over the quarter hour before, or whether
/// the meter read more than the estimate.
fn why_over(points: &[Point], i: usize) -> String {
    const WINDOW_H: f64 = 0.25;
    let p = points[i];
    let before: Vec<&Point> = points[..i].iter().rev().take_while(|q| p.hour - q.hour <= WINDOW_H).collect();
    let gpus = match before.last().map(|first| p.gpu_w - first.gpu_w) {
        Some(d) if d > 0.002 * p.gpu_w => "the GPUs climbing",
        Some(d) if d < -0.002 * p.gpu_w => "the GPUs falling",
        Some(_) => "the GPUs steady",
        None => "the day's first reading",
    };
    let drop =
        |f: fn(&Point) -> f64| before.iter().map(|q| f(q)).filter(|w| w.is_finite()).fold(f(&p), f64::max) - f(&p);
    let (budget_step, parked_w) = (drop(|q| q.budget_w), drop(|q| q.estimate_w));
    let over_estimate = p.measured_w / p.estimate_w - 1.0;
    let cause = if parked_w > 0.005 * p.estimate_w {
        let budget = match budget_step > 0.005 * p.budget_w {
            true => format!("the budget had stepped down {}; ", kw(budget_step)),
            false => String::new(),
        };
        format!(
            "{budget}the plan had parked {} of miners in the quarter hour before, and the meter sees them parked a reading later",
            kw(parked_w)
        )
    } else if over_estimate > 0.01 {
        format!("the meter read {:.0}% over the estimate, until the calibration caught up", 100.0 * over_estimate)
    } else {
        format!("the estimate was over the budget too, by {}", kw(p.estimate_w - p.budget_w))
    };
    format!("{}, {gpus}: {cause}", clock(p.hour))
}

/// The day's chart: power above (the limit, the GPUs, the budget and each
/// site's meter), hashrate kept below (a line per site).
fn chart(sites: &[Site], limit: f64, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    let ymax = limit * 1.05 / 1e3;
    let caption = match sites.len() {
        1 => "A day at a shared site: the miners get what the GPUs leave",
        _ => "Two sites, one day: power targets against parking alone",
    };
    let mut c = ChartBuilder::on(&top)
        .caption(caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..24f64, 0f64..ymax)?;
    let hours = |h: &f64| format!("{h:02.0}:00");
    c.configure_mesh()
        .x_desc("hour of the day")
        .y_desc("kW")
        .x_labels(13)
        .x_label_formatter(&hours)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let series = |points: &[Point], f: fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points.iter().filter(|p| f(p).is_finite()).map(|p| (p.hour, f(p) / 1e3)).collect()
    };
    let first = &sites[0].points;
    let mut lines = vec![
        ("site limit".to_string(), BLACK, vec![(0.0, limit / 1e3), (24.0, limit / 1e3)]),
        ("GPU load".into(), RGBColor(214, 39, 40), series(first, |p| p.gpu_w)),
        ("ASIC budget (follow)".into(), RGBColor(31, 119, 180), series(first, |p| p.budget_w)),
    ];
    // A colour per site: the first green, the second orange.
    let colours = [RGBColor(44, 160, 44), RGBColor(255, 127, 14)];
    match sites {
        [one] => {
            lines.insert(
                1,
                (
                    "site draw: GPU + ASIC measured".into(),
                    RGBColor(148, 103, 189),
                    series(&one.points, |p| p.gpu_w + p.measured_w),
                ),
            );
            lines.push(("ASIC measured (hall meter)".into(), colours[0], series(&one.points, |p| p.measured_w)));
        }
        _ => {
            for (site, colour) in sites.iter().zip(colours) {
                lines.push((
                    format!("ASIC measured: {}", site.kind.name()),
                    colour,
                    series(&site.points, |p| p.measured_w),
                ));
            }
        }
    }
    for (name, color, pts) in lines {
        c.draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    let hmax = sites.iter().flat_map(|s| &s.points).map(|p| p.hashrate_hs).fold(0.0, f64::max) * 1.1 / 1e15;
    let mut h = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..24f64, 0f64..hmax.max(0.001))?;
    h.configure_mesh().x_desc("hour of the day").y_desc("PH/s kept").x_labels(13).x_label_formatter(&hours).draw()?;
    // The sites' colours above; the one site's hashrate in orange.
    let colours = match sites.len() {
        1 => [RGBColor(255, 127, 14), RGBColor(255, 127, 14)],
        _ => colours,
    };
    for (site, colour) in sites.iter().zip(colours) {
        let label = match site.kind {
            Kind::Network => "hashrate of the miners mining (nameplate)".to_string(),
            k => format!("hashrate kept: {} (the firmware's)", k.name()),
        };
        h.draw_series(LineSeries::new(
            site.points.iter().map(|p| (p.hour, p.hashrate_hs / 1e15)),
            colour.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2)));
    }
    h.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary's cause is read off the data around the worst point.
    #[test]
    fn the_worst_overshoot_is_explained_by_what_the_data_shows() {
        let pt = |hour: f64, gpu_w: f64, budget_w: f64| Point {
            hour,
            gpu_w,
            budget_w,
            measured_w: budget_w + 1000.0,
            estimate_w: budget_w - 500.0,
            hashrate_hs: 0.0,
            parked: 0,
            lowered: 0,
        };
        let uncalibrated = Point { estimate_w: 45e3, ..pt(0.0, 100e3, 50e3) };
        let exact = Point { estimate_w: 61e3, ..pt(0.0, 100e3, 60e3) };
        for (points, want) in [
            (vec![pt(0.1, 100e3, 50e3)], "00:06, the day's first reading: the meter read 3% over the estimate"),
            (vec![uncalibrated], "00:00, the day's first reading: the meter read 13% over the estimate"),
            (vec![exact], "00:00, the day's first reading: the estimate was over the budget too, by 1.0 kW"),
            // GPUs falling, budget rising: nothing parked.
            (
                vec![pt(0.0, 110e3, 40e3), pt(0.1, 105e3, 45e3), pt(0.2, 100e3, 50e3)],
                "00:12, the GPUs falling: the meter read 3% over",
            ),
            // GPUs climbing, the budget stepped down 10 kW and miners parked.
            (
                vec![pt(9.0, 150e3, 130e3), pt(9.1, 155e3, 125e3), pt(9.2, 160e3, 120e3)],
                "09:12, the GPUs climbing: the budget had stepped down 10.0 kW; the plan had parked 10.0 kW of miners",
            ),
            // A step down longer ago than the window does not count.
            (
                vec![pt(9.0, 150e3, 130e3), pt(9.5, 150e3, 120e3), pt(9.6, 150e3, 120e3)],
                "09:36, the GPUs steady: the meter read 1% over",
            ),
        ] {
            let got = why_over(&points, points.len() - 1);
            assert!(got.starts_with(want), "{got}");
        }
        assert_eq!(clock(23.999), "00:00");
        assert_eq!(clock(13.5), "13:30");
    }

    #[test]
    fn the_gpu_day_is_continuous_and_peaks_in_the_afternoon() {
        let table = [(0.0, 0.55), (4.0, 0.45), (12.0, 0.865), (14.0, 0.95), (24.0, 0.55), (25.0, 0.525)];
        for (h, want) in table {
            assert!((gpu_fraction(h) - want).abs() < 1e-9, "{h}: {}", gpu_fraction(h));
        }
        let peak = (0..240).map(|i| f64::from(i) / 10.0).max_by(|a, b| gpu_fraction(*a).total_cmp(&gpu_fraction(*b)));
        assert_eq!(peak, Some(14.0));
    }
}
