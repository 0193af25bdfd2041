//! Arbitrary submits against a real job (the genesis block as a Stratum job):
//! the checker must answer, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::share::{check_share, Difficulty, JobTemplate, PrevHash, ShareRules, Submission};
use sluice::stratum::hex_u32;

const COINB1: &str = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d0104455468";
const COINB2: &str = "6f72206f6e206272696e6b206f66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b8d578a4c702b6bf11d5fac00000000";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let f: Vec<&str> = text.splitn(5, ',').collect();
    if f.len() < 4 {
        return;
    }
    let job = JobTemplate::new(1, PrevHash([0; 32]), &[&hex::decode(COINB1).unwrap()], hex::decode(COINB2).unwrap(), vec![[7; 32]], 0x1d00ffff, 0x495fab29);
    let Ok(en2) = hex::decode(f[0]) else { return };
    let (Some(ntime), Some(nonce)) = (hex_u32(f[1]), hex_u32(f[2])) else { return };
    let version_bits = hex_u32(f[3]);
    let mask = f.get(4).and_then(|m| hex_u32(m)).unwrap_or(0x1fffe000);
    let rules = ShareRules { target: Difficulty::new(1e-9).unwrap().to_target(), version_mask: mask, ntime_max_forward: 7000 };
    let _ = check_share(&job, &[0x65, 0x20, 0x54, 0x69], 4, &Submission { extranonce2: &en2, ntime, nonce, version_bits }, &rules);
});
