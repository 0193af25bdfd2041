//! Share validation cost against the SHA-256 floor.
//!
//! The job has a 12-deep merkle branch and a 250-byte coinbase, the shape
//! the issue asks for. Besides criterion's report, the bench prints the
//! medians of its own timing batches and the ratio
//!   validation time / (compressions per share × one compression).

use criterion::{black_box, Criterion};
use sluice::share::{check_share, compress_block, Difficulty, JobTemplate, PrevHash, ShareRules, Submission, Target};
use std::time::Instant;

const EN1: [u8; 2] = [0x00, 0x2a];
const EN2_LEN: usize = 6;

fn job() -> JobTemplate {
    // 250 bytes in all: coinb1 (with the pool's extranonce1 appended, as the
    // proxy sends it) + 2 + 6 + coinb2.
    let coinb1: Vec<u8> = (0..110u32).map(|i| (i * 7) as u8).collect();
    let coinb2: Vec<u8> = (0..132u32).map(|i| (i * 11) as u8).collect();
    let branch: Vec<[u8; 32]> = (0..12u8).map(|i| [i; 32]).collect();
    JobTemplate::new(0x2000_0000, PrevHash([7; 32]), &[&coinb1], coinb2, branch, 0x1703_4219, 0x6700_0000)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median ns per call over `batches` batches of `n` calls.
fn time_it(batches: usize, n: u32, mut f: impl FnMut(u32)) -> f64 {
    let samples = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    median(samples)
}

fn main() {
    let job = job();
    // Every share passes (MAX target), so the full path is measured: coinbase,
    // merkle, header, target comparison and the achieved difficulty.
    let rules = ShareRules { target: Target::MAX, version_mask: 0x1fff_e000, ntime_max_forward: 7000 };
    let validate = |nonce: u32| {
        let en2 = (nonce as u64).to_be_bytes();
        let sub = Submission { extranonce2: &en2[2..], ntime: 0x6700_0001, nonce, version_bits: Some(0x0000_4000) };
        check_share(black_box(&job), &EN1, EN2_LEN, black_box(&sub), &rules).unwrap()
    };
    let block = [0x5au8; 64];
    let compress = |i: u32| {
        let mut st = [i, 1, 2, 3, 4, 5, 6, 7];
        compress_block(black_box(&mut st), black_box(&block));
        black_box(st);
    };

    let mut c = Criterion::default().configure_from_args();
    c.bench_function("sha256_compress_one_block", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            compress(i)
        })
    });
    c.bench_function("validate_share_12_branch_250b_coinbase", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            validate(i)
        })
    });
    c.final_summary();

    let compressions = job.compressions_per_share(EN1.len(), EN2_LEN);
    let t_comp = time_it(31, 200_000, compress);
    let t_val = time_it(31, 20_000, |i| {
        black_box(validate(i));
    });
    let floor = compressions as f64 * t_comp;
    println!();
    println!("share validation, 12-deep merkle branch, 250-byte coinbase (coinb1 midstate cached):");
    println!("  one SHA-256 compression        median {t_comp:8.1} ns");
    println!("  compressions per share         {compressions}");
    println!("  floor = compressions x time    {floor:8.1} ns");
    println!("  validation per share           median {t_val:8.1} ns");
    println!("  ratio validation / floor       {:.2}  (goal <= 1.50)", t_val / floor);
    println!("  = {:.0} shares/s on one core", 1e9 / t_val);
    let _ = Difficulty::ONE;
}
