//! A Stratum V2 pool's messages, as the Noise layer hands them over:
//! arbitrary frames (type, length, payload) to a pool session that opened
//! a channel, through the reference implementation's parsers and sluice's
//! handling of every message (jobs, tips, targets, acknowledgements).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice::upstream::fuzz_sv2_frames(data);
});
