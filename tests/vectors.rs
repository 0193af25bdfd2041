//! Table tests on real mainnet data from proto/vectors/: every byte of the
//! rebuilt header and the hash are checked against the chain.

use serde_json::Value;
use sluice::share::*;
use sluice::stratum::hex_u32;

fn load(name: &str) -> Value {
    let p = format!("{}/proto/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn header_fields(hdr: &[u8]) -> (u32, [u8; 32], [u8; 32], u32, u32, u32) {
    let u = |r: std::ops::Range<usize>| u32::from_le_bytes(hdr[r].try_into().unwrap());
    (u(0..4), hdr[4..36].try_into().unwrap(), hdr[36..68].try_into().unwrap(), u(68..72), u(72..76), u(76..80))
}

#[test]
fn mainnet_headers_rebuild_and_hash_byte_for_byte() {
    let v = load("mainnet-headers.json");
    let mut checked = 0;
    for h in v["headers"].as_array().unwrap() {
        let Some(hex_hdr) = h["header_hex"].as_str() else {
            continue;
        };
        let bytes = hex::decode(hex_hdr).unwrap();
        let (version, prev, root, ntime, nbits, nonce) = header_fields(&bytes);
        assert_eq!(format!("{version:08x}"), h["version"].as_str().unwrap());
        let rebuilt = build_header(version, &prev, &root, ntime, nbits, nonce);
        assert_eq!(&rebuilt[..], &bytes[..]);
        let hash = sha256d_header(&rebuilt);
        assert_eq!(hash.to_string(), h["hash"].as_str().unwrap());
        // A real block meets its own network target, and nothing much harder.
        let target = Target::from_compact(nbits).unwrap();
        assert!(target.is_met_by(&hash));
        assert!(Difficulty::of_hash(&hash).get() >= target.difficulty().get());
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn block_794143_version_rolled_bits_resolve_inside_bip320_mask() {
    let v = load("mainnet-headers.json");
    let h = &v["headers"][2];
    assert_eq!(h["height"], 794143);
    let bytes = hex::decode(h["header_hex"].as_str().unwrap()).unwrap();
    let (version, prev, root, ntime, nbits, nonce) = header_fields(&bytes);
    // The pool sent 0x20000000; the miner rolled bit 23 and submitted only the
    // rolled bits, as BIP310 asks.
    let rolled = resolve_version(0x2000_0000, 0x1fff_e000, Some(0x0080_0000)).unwrap();
    assert_eq!(rolled, version);
    // The same block submitted in full-version form.
    assert_eq!(resolve_version(0x2000_0000, 0x1fff_e000, Some(version)), Ok(version));
    // Bit 23 is outside a mask that only grants the low BIP320 bits.
    assert_eq!(resolve_version(0x2000_0000, 0x0000_e000, Some(0x0080_0000)), Err(ShareError::VersionOutsideMask));
    let hash = sha256d_header(&build_header(rolled, &prev, &root, ntime, nbits, nonce));
    assert_eq!(hash.to_string(), h["hash"].as_str().unwrap());
}

#[test]
fn genesis_as_a_stratum_job_validates_as_a_block() {
    let j = load("genesis-job.json");
    let s = |k: &str| j[k].as_str().unwrap().to_owned();
    let hx = |k: &str| hex::decode(s(k)).unwrap();
    let prev: [u8; 32] = hx("prevhash_stratum").try_into().unwrap();
    let job = JobTemplate::new(
        hex_u32(&s("version")).unwrap(),
        PrevHash::from_stratum_bytes(prev),
        &[&hx("coinb1")],
        hx("coinb2"),
        vec![],
        hex_u32(&s("nbits")).unwrap(),
        hex_u32(&s("ntime")).unwrap(),
    );
    let en1 = hx("extranonce1");
    let en2 = hx("extranonce2");
    let root = job.merkle_root(&en1, &en2);
    assert_eq!(Hash256(root).to_string(), s("merkle_root"));
    let nonce = hex_u32(&s("nonce")).unwrap();
    let rules = ShareRules { target: Difficulty::ONE.to_target(), version_mask: 0, ntime_max_forward: 7000 };
    let sub = Submission { extranonce2: &en2, ntime: job.ntime, nonce, version_bits: None };
    let ok = check_share(&job, &en1, 4, &sub, &rules).unwrap();
    assert_eq!(hex::encode(ok.header), s("header_hex"));
    assert_eq!(ok.hash.to_string(), s("hash"));
    assert!(ok.is_block, "the genesis block meets its own nBits");
    // The same coinbase split differently must give the same root: the
    // proxy's "pool extranonce1 at the end of coinb1" layout relies on it.
    let joined = JobTemplate::new(
        job.version,
        job.prevhash,
        &[&hx("coinb1"), &en1[..2]],
        hx("coinb2"),
        vec![],
        job.nbits,
        job.ntime,
    );
    assert_eq!(joined.merkle_root(&en1[2..], &en2), root);

    // Every rejection path, on a real job.
    let refuse = |s: Submission| check_share(&job, &en1, 4, &s, &rules).unwrap_err();
    assert_eq!(refuse(Submission { nonce: nonce ^ 1, ..sub }), ShareError::LowDifficulty);
    assert_eq!(refuse(Submission { ntime: job.ntime - 1, ..sub }), ShareError::NtimeOutOfRange);
    assert_eq!(refuse(Submission { ntime: job.ntime + 7001, ..sub }), ShareError::NtimeOutOfRange);
    assert_eq!(refuse(Submission { version_bits: Some(0x2000), ..sub }), ShareError::VersionOutsideMask);
    assert_eq!(
        refuse(Submission { extranonce2: &en2[..3], ..sub }),
        ShareError::Extranonce2Length { expected: 4, got: 3 }
    );
    // One compression-count sanity check for the benchmark's floor.
    assert_eq!(
        job.compressions_per_share(4, 4),
        (hx("coinb1").len() % 64 + 8 + hx("coinb2").len() + 9).div_ceil(64) + 1 + 3
    );
}
