//! Curtailment plan computation for 100,000 miners.
//!
//! Besides criterion's report, prints the median of its own batches for the
//! two directions (shedding to 60 % of the fleet, restoring to 90 %).

use criterion::{black_box, Criterion};
use sluice::curtail::policy::{plan, JoulesPerTh, MinerState, MinerView, PolicyParams, Watts};
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
}
