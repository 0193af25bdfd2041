//! `sluice bench-targets`: partial power against parking alone, with
//! firmware miners. Each miner is a sim-fleet miner connecting from its own
//! loopback address and a Braiins OS double ([`super::firmware`]) on port 80
//! of that address, which asic-rs finds and drives as a real one; the proxy
//! runs in this process. For each fleet (one model, then three), two runs
//! under the same budget: `method = "power-target"` and `method =
//! "firmware"` (park only). Each prints the time until the miners holding a
//! job draw no more than the budget, the peak they draw while the plan is
//! carried out (polled every 50 ms), the time until the trade is complete
//! (the hashrate kept within 1% of the plan's, nothing waiting in the ramp,
//! no target in flight), and the hashrate kept then, against parking alone
//! and against the best the curves allow (every miner at the budget's share
//! of its power).
//!
//! `--curve-off F`: the doubles keep F more of their hashrate below full
//! power than the built-in curves say (capped at full). The controller
//! plans on the table until its read-backs teach it the fleet's curve
//! ([`crate::curtail::learn`]); the power-target run then lasts until the
//! kept hashrate is within 1% of the aim the controller has *now* (a dry
//! run of the same budget, once a second) for two `settle_s` in a row, and
//! prints the curves it learnt.

use super::firmware::{Family, FirmwareDouble, Spec};
use super::fleet::{Fleet, FleetConfig, Profile};
use super::load::source_ip;
use super::pool::{SimPool, SimPoolConfig};
use crate::api::Method;
use crate::control::client::{Client, Target};
use crate::curtail::power::{builtin_models, PowerRule};
use crate::curtail::targets::Curve;
use crate::curtail::GroupConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The loopback blocks the bench's miners and doubles live in, one per
/// run (a run's listeners may still be closing when the next starts).
const BLOCK: u8 = 61;

/// One model of a bench fleet: its name in sluice's table, the name its
/// firmware reports, its envelope floor (fraction) and how many.
struct Part {
    model: &'static str,
    firmware_name: &'static str,
    floor: f64,
    miners: usize,
}

pub struct TargetsBench {
    pub miners: usize,
    /// The budget as a share of the fleet's nameplate.
    pub fraction: f64,
    /// How long a double takes to reach a new target.
    pub settle: Duration,
    /// How much more hashrate below full the doubles keep than the table.
    pub curve_off: f64,
}

/// What one run measured.
struct Run {
    under_ms: Option<f64>,
    peak_w: f64,
    complete_s: Option<f64>,
    kept_ths: f64,
    plan: Value,
    /// The aim at the end (a dry run), and the curves learnt then.
    aim_ths: Option<f64>,
    curves: Vec<String>,
}

pub async fn run(b: TargetsBench) -> BoxResult<()> {
    rlimit::increase_nofile_limit(u64::MAX).ok();
    let one = [Part { model: "S19k Pro", firmware_name: "Antminer S19k Pro", floor: 0.40, miners: b.miners }];
    let third = b.miners / 3;
    let three = [
        Part { model: "S19k Pro", firmware_name: "Antminer S19k Pro", floor: 0.40, miners: third },
        Part { model: "S19 XP", firmware_name: "Antminer S19 XP", floor: 0.5, miners: third },
        Part { model: "S21", firmware_name: "Antminer S21", floor: 0.5, miners: b.miners - 2 * third },
    ];
    println!(
        "bench-targets: {} Braiins OS doubles (asic-rs, port 80 of 127.{BLOCK}-{}.x.y), settle {:.0} s, budget {:.0}% of nameplate{}; proxy in this process",
        b.miners,
        BLOCK + if b.curve_off == 0.0 { 3 } else { 5 },
        b.settle.as_secs_f64(),
        b.fraction * 100.0,
        match b.curve_off {
            0.0 => String::new(),
            f => format!(", the doubles' curves {:+.0}% off the built-in ones", f * 100.0),
        }
    );
    let runs = [("one model (S19k Pro)", &one[..]), ("three models (S19k Pro, S19 XP, S21)", &three[..])];
    // Control sockets and state files for every run, kept to the end: a
    // run's controller may still write its state file after the run.
    let dir = tempfile::tempdir()?;
    for (r, (name, parts)) in runs.into_iter().enumerate() {
        let block = BLOCK + 2 * r as u8;
        let t = fleet_run(parts, &b, Method::PowerTarget, true, block, dir.path()).await?;
        let p = fleet_run(parts, &b, Method::Firmware, true, block + 1, dir.path()).await?;
        // The doubles off the table: what planning on the table alone keeps.
        let table = match b.curve_off {
            0.0 => None,
            _ => Some(fleet_run(parts, &b, Method::PowerTarget, false, BLOCK + 4 + r as u8, dir.path()).await?),
        };
        let best = best_ths(parts, b.fraction, b.curve_off);

        println!("{name}:");
        let runs = [("power-target", Some(&t)), ("table alone", table.as_ref()), ("parking only", Some(&p))];
        for (label, r) in runs.into_iter().filter_map(|(l, r)| Some((l, r?))) {
            println!(
                "  {label:<13} under the budget after {}, peak {:.1} kW of {:.1} kW budget, trade complete after {}, kept {:.0} TH/s",
                r.under_ms.map_or("never".into(), |ms| format!("{ms:.0} ms")),
                r.peak_w / 1e3,
                budget_w(parts, b.fraction) / 1e3,
                r.complete_s.map_or("(not within the bound)".into(), |s| format!("{s:.1} s")),
                r.kept_ths
            );
        }
        let tp = &t.plan["targets"];
        let best = match best {
            Some(best) => format!(
                "{:.1}% of every miner at {:.0}% power ({best:.0} TH/s)",
                100.0 * t.kept_ths / best,
                b.fraction * 100.0
            ),
            None => "(a model's floor is above that share: no every-miner-at-the-share figure)".into(),
        };
        println!(
            "  kept: {:.3}x parking alone ({:.0} / {:.0} TH/s), {best}; {:.1}% of the plan's aim ({:.0} TH/s, within the budget less the {:.0}% hysteresis): {} lowered, {} parked, {} full",
            t.kept_ths / p.kept_ths.max(1e-9),
            t.kept_ths,
            p.kept_ths,
            100.0 * t.kept_ths / tp["hashrate_ths"].as_f64().unwrap_or(f64::NAN),
            tp["hashrate_ths"].as_f64().unwrap_or(f64::NAN),
            crate::curtail::CurtailConfig::default().hysteresis_fraction * 100.0,
            tp["lowered"],
            tp["parked"],
            tp["full"]
        );
        if let Some(table) = &table {
            println!(
                "  planned on the table alone (learn_curves = false): {:.3}x parking alone ({:.0} TH/s); learnt: {:.3}x the table alone",
                table.kept_ths / p.kept_ths.max(1e-9),
                table.kept_ths,
                t.kept_ths / table.kept_ths.max(1e-9)
            );
        }
        if let Some(aim) = t.aim_ths {
            println!(
                "  learnt: the aim now {aim:.0} TH/s ({:.3}x the first plan's), kept {:.1}% of it",
                aim / tp["hashrate_ths"].as_f64().unwrap_or(f64::NAN),
                100.0 * t.kept_ths / aim
            );
        }
        for c in &t.curves {
            println!("  {c}");
        }
    }
    Ok(())
}

/// The curve of a double that keeps `off` more of its hashrate below full
/// than `c` says (capped at full).
fn off(c: &Curve, off: f64) -> Curve {
    let pts: Vec<(f64, f64)> =
        c.points().iter().filter(|p| p.0 < 1.0).map(|&(x, h)| (x, (h * (1.0 + off)).clamp(0.01, 1.0))).collect();
    Curve::new(&pts).expect("scaled and capped, it still rises")
}

fn budget_w(parts: &[Part], fraction: f64) -> f64 {
    parts.iter().map(|p| nameplate(p.model).0 * p.miners as f64).sum::<f64>() * fraction
}

/// (watts, TH/s) of a built-in model.
fn nameplate(model: &str) -> (f64, f64) {
    let m = builtin_models().into_iter().find(|m| m.name == model).expect("a built-in model");
    (m.watts, m.th_s)
}

/// Every miner at `fraction` of its power, on its curve (none where a
/// curve does not go that low).
fn best_ths(parts: &[Part], fraction: f64, curve_off: f64) -> Option<f64> {
    parts
        .iter()
        .map(|p| {
            let m = builtin_models().into_iter().find(|m| m.name == p.model).expect("a built-in model");
            let c = off(&m.curve().expect("valid"), curve_off);
            c.hashrate(fraction).map(|h| m.th_s * p.miners as f64 * h)
        })
        .sum()
}

async fn fleet_run(
    parts: &[Part],
    b: &TargetsBench,
    method: Method,
    learn: bool,
    block: u8,
    dir: &std::path::Path,
) -> BoxResult<Run> {
    // The doubles and the config: miner k is worker t.k at source_ip(k).
    let mut doubles = Vec::new();
    let mut rules = Vec::new();
    let mut k = 0;
    for p in parts {
        let (w, _) = nameplate(p.model);
        let first = k;
        for _ in 0..p.miners {
            let mut spec = Spec::builtin(p.model, p.firmware_name, p.floor, b.settle).expect("a built-in model");
            spec.curve = off(&spec.curve, b.curve_off);
            let ip = source_ip(block, k).into();
            doubles.push(FirmwareDouble::start(ip, Family::Braiins, spec).await.map_err(|e| {
                format!("{ip}:80 for a Braiins OS double (asic-rs only looks on port 80; run as root): {e}")
            })?);
            k += 1;
        }
        // Worker names t.K, one rule each: the model (its curve) at its
        // nameplate watts (simulated miners hash far too slowly for a
        // J/TH estimate from their shares).
        for i in first..k {
            rules.push(PowerRule {
                pattern: format!("t.{i}"),
                model: Some(p.model.into()),
                watts: Some(w),
                ..Default::default()
            });
        }
    }
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.0001,
        job_interval: Duration::from_secs(3600),
        ..SimPoolConfig::default()
    })
    .await?;
    let socket = dir.join(format!("ctl-{block}-{learn}.sock"));
    let mut cfg = crate::config::Config {
        upstream: vec![pool.url("farm")],
        listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    cfg.difficulty.start = 0.00002;
    cfg.difficulty.min = 0.000001;
    cfg.metrics.listen = crate::config::OptionalAddr(None);
    cfg.curtail.socket = socket.clone();
    cfg.curtail.hold_s = Duration::ZERO.into();
    cfg.curtail.ramp_up_w_per_s = 1e9;
    cfg.curtail.learn_curves = learn;
    cfg.curtail.power = rules;
    cfg.curtail.group = vec![GroupConfig {
        name: "bos".into(),
        pattern: "t.*".into(),
        method,
        firmware: "braiins".into(),
        username: "root".into(),
        password: "root".into(),
        settle_s: (b.settle * 4).into(),
        ..GroupConfig::default()
    }];
    let proxy = crate::app::Proxy::start(&cfg).await?;
    let n = doubles.len();
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: n,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_secs(5),
        worker_prefix: "t".into(),
        ip_block: Some(block),
        ..FleetConfig::default()
    });
    let mut c = Client::connect(&Target::Unix(socket.clone())).await?;
    let up = Instant::now() + Duration::from_secs(60);
    while c.call("status", json!({})).await?["site"]["connected"] != n {
        if Instant::now() > up {
            return Err(format!(
                "only {} of {n} miners connected in 60 s",
                fleet.stats.connected.load(std::sync::atomic::Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let budget = budget_w(parts, b.fraction);
    // A sum over the doubles whose miner holds a job.
    let holding = |doubles: &[FirmwareDouble], f: fn(&FirmwareDouble) -> f64| {
        let holders = fleet.stats.holders.lock().clone();
        doubles.iter().enumerate().filter(|(k, _)| holders.contains(&format!("t.{k}"))).map(|(_, d)| f(d)).sum::<f64>()
    };
    let holding_draw = |d: &[FirmwareDouble]| holding(d, FirmwareDouble::draw);
    let kept = |d: &[FirmwareDouble]| holding(d, FirmwareDouble::hashrate_ths);
    let t0 = Instant::now();
    let plan = c.call("set_budget", json!({"watts": budget, "reason": "bench-targets"})).await?;
    let mut goal = plan["targets"]["hashrate_ths"].as_f64();
    let (mut under_ms, mut peak_w, mut complete_s) = (None, 0.0f64, None);
    // A run whose fleet never held a job measured nothing.
    let mut most_holding = fleet.stats.holders.lock().len();
    // Learning: the aim moves as the curves do; the trade is complete
    // once it has held two settle_s (the read-backs after a move are in).
    let learning = learn && b.curve_off != 0.0 && method == Method::PowerTarget;
    // Runs compared with a learning one have as long.
    let bound = match b.curve_off {
        0.0 => b.settle * 8 + Duration::from_secs(60),
        _ => b.settle * 60 + Duration::from_secs(60),
    };
    let hold = if learning { (2 * b.settle * 4).as_millis() as usize / 50 } else { 3 };
    let mut aimed = Instant::now();
    let mut settled_for = 0;
    while t0.elapsed() < bound {
        if learning && aimed.elapsed() >= Duration::from_secs(1) {
            aimed = Instant::now();
            let dry =
                c.call("set_budget", json!({"watts": budget, "reason": "bench-targets", "dry_run": true})).await?;
            goal = dry["targets"]["hashrate_ths"].as_f64().or(goal);
        }
        let w = holding_draw(&doubles);
        most_holding = most_holding.max(fleet.stats.holders.lock().len());
        // The trade starts once the budget is met: its peak is what counts.
        if under_ms.is_some() {
            peak_w = peak_w.max(w);
        } else if w <= budget {
            under_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        let st = c.call("status", json!({"miners": true})).await?;
        let quiet = st["resuming"] == 0;
        let done = match goal {
            Some(g) => quiet && kept(&doubles) >= 0.99 * g,
            None => quiet && under_ms.is_some() && t0.elapsed() > b.settle,
        };
        settled_for = if done { settled_for + 1 } else { 0 };
        if settled_for >= hold {
            complete_s = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept_ths = kept(&doubles);
    if most_holding == 0 {
        return Err(format!(
            "{method:?}: no miner of the fleet was seen holding a job in any poll: nothing was measured"
        )
        .into());
    }
    if std::env::var_os("SLUICE_BENCH_DEBUG").is_some() {
        let holders = fleet.stats.holders.lock().len();
        let paused = doubles.iter().filter(|d| d.paused()).count();
        let st = c.call("status", json!({"miners": true})).await?;
        eprintln!("{method:?}: holders {holders}, paused {paused}, status {}", st["site"]);
        for d in doubles.iter().take(6) {
            eprintln!(
                "  {} draw {:.0} target {:.0} paused {} hashrate {:.1}",
                d.ip,
                d.draw(),
                d.target(),
                d.paused(),
                d.hashrate_ths()
            );
        }
    }
    let st = c.call("status", json!({})).await?;
    let st: crate::api::Status = serde_json::from_value(st)?;
    let curves = st.curves.iter().map(|c| c.to_string()).collect();
    fleet.stop();
    drop(proxy);
    Ok(Run { under_ms, peak_w, complete_s, kept_ths, plan, aim_ths: goal.filter(|_| learning), curves })
}
