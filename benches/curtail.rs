//! Curtailment plan computation for 100,000 miners.
//!
//! Besides criterion's report, prints the median of its own batches for the
//! two directions (shedding to 60 % of the fleet, restoring to 90 %).

use criterion::{black_box, Criterion};
use sluice::curtail::policy::{plan, JoulesPerTh, MinerState, MinerView, PolicyParams, Watts};
use sluice::curtail::power::builtin_models;
use sluice::curtail::targets::{allocate, Curve, Unit};
use std::time::{Duration, Instant};

fn fleet(n: usize, parked_fraction: f64) -> Vec<MinerView> {
    let t = Instant::now() - Duration::from_secs(3600);
    let mut rng = fastrand::Rng::with_seed(7);
    (0..n)
        .map(|_| {
            let watts = Watts(2800.0 + rng.f64() * 900.0);
            MinerView {
                watts,
                idle: watts * 0.03,
                j_per_th: JoulesPerTh(13.0 + rng.f64() * 20.0),
                full: watts,
                state: if rng.f64() < parked_fraction { MinerState::Parked } else { MinerState::Mining },
                protected: rng.f64() < 0.01,
                in_scope: true,
                changed_at: t,
            }
        })
        .collect()
}

fn main() {
    const N: usize = 100_000;
    let shed = fleet(N, 0.0);
    let restore = fleet(N, 0.5);
    let total: Watts = shed.iter().map(|m| m.watts).sum();
    let p = |f: f64| PolicyParams {
        budget_w: total * f,
        hold: Duration::from_secs(60),
        hysteresis_w: total * f * 0.02,
        now: Instant::now(),
    };
    let (p60, p90) = (p(0.6), p(0.9));

    let mut c = Criterion::default().configure_from_args().sample_size(30);
    c.bench_function("plan_100k_shed_to_60pct", |b| b.iter(|| plan(black_box(&shed), &p60)));
    c.bench_function("plan_100k_restore_to_90pct", |b| b.iter(|| plan(black_box(&restore), &p90)));
    c.final_summary();

    let median = |v: &[MinerView], pp: &PolicyParams| {
        let mut t: Vec<f64> = (0..21)
            .map(|_| {
                let s = Instant::now();
                black_box(plan(black_box(v), pp));
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let a = plan(&shed, &p60);
    let b = plan(&restore, &p90);
    println!();
    println!("curtailment plan, {N} miners (21 runs each):");
    println!("  shed to 60 %:     median {:6.2} ms  ({} parked)", median(&shed, &p60), a.park.len());
    println!("  restore to 90 %:  median {:6.2} ms  ({} resumed)", median(&restore, &p90), b.resume.len());

    // Partial power: the split of a 60% budget over 100,000 miners, a third
    // each on the S19k Pro curve, hashrate in proportion to power, and
    // park only.
    let k = builtin_models().into_iter().find(|m| m.name == "S19k Pro").unwrap().curve().unwrap();
    let flat = Curve::proportional(0.5);
    let units: Vec<Unit> = shed
        .iter()
        .enumerate()
        .map(|(i, v)| Unit {
            full: v.watts,
            hashrate: v.watts.0 / v.j_per_th.0,
            idle: v.idle,
            curve: [Some(&k), Some(&flat), None][i % 3],
        })
        .collect();
    let budget = total * 0.6;
    let mut t: Vec<f64> = (0..11)
        .map(|_| {
            let s = Instant::now();
            black_box(allocate(black_box(&units), budget));
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let a = allocate(&units, budget);
    let parking: Vec<Unit> = units.iter().map(|u| Unit { curve: None, ..*u }).collect();
    let p = allocate(&parking, budget);
    let (parked, lowered, full) = a.counts();
    println!(
        "  targets split at 60 %: median {:6.2} ms  ({parked} parked, {lowered} lowered, {full} full; {:.3}x the hashrate parking alone keeps)",
        t[t.len() / 2],
        a.hashrate / p.hashrate
    );
}
