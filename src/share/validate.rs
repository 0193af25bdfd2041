//! The checks every submitted share goes through, in the order that rejects
//! cheap mistakes before paying for hashing.

use super::hash::Hash256;
use super::job::JobTemplate;
use super::target::{Difficulty, Target};
use thiserror::Error;

/// What a miner is allowed to send for one job.
#[derive(Clone, Copy, Debug)]
pub struct ShareRules {
    /// The miner's current target (from its difficulty).
    pub target: Target,
    /// Version bits the miner may roll. Zero when version rolling is off; a
    /// submit that still carries rolled bits is then rejected.
    pub version_mask: u32,
    /// How far past the job's ntime a miner may roll ntime, in seconds.
    pub ntime_max_forward: u32,
}

/// The numeric fields of a submit, already decoded from hex.
#[derive(Clone, Copy, Debug)]
pub struct Submission<'a> {
    pub extranonce2: &'a [u8],
    pub ntime: u32,
    pub nonce: u32,
    pub version_bits: Option<u32>,
}

/// A share that passed every check.
#[derive(Clone, Copy, Debug)]
pub struct ValidShare {
    pub header: [u8; 80],
    pub hash: Hash256,
    pub version: u32,
    /// The difficulty the hash actually achieved.
    pub achieved: Difficulty,
    /// The hash meets the network target: a block solution.
    pub is_block: bool,
}

/// Why a share was refused. Each maps onto the customary Stratum V1 error code.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ShareError {
    #[error("job not found")]
    UnknownJob,
    #[error("stale job")]
    Stale,
    #[error("duplicate share")]
    Duplicate,
    #[error("low difficulty share")]
    LowDifficulty,
    #[error("extranonce2 must be {expected} bytes, got {got}")]
    Extranonce2Length { expected: usize, got: usize },
    #[error("ntime out of range")]
    NtimeOutOfRange,
    #[error("version bits outside the negotiated mask")]
    VersionOutsideMask,
    #[error("malformed field: {0}")]
    Malformed(&'static str),
    /// The miner's duplicate-detection memory is full (limits.dedup_entries_per_miner):
    /// it submits far more shares per job than its difficulty should allow.
    #[error("too many shares on open jobs; raise the difficulty")]
    TooManyShares,
}

impl ShareError {
    /// Stratum V1 error code: 20 other, 21 job not found (stale), 22 duplicate,
    /// 23 low difficulty.
    pub fn code(&self) -> i32 {
        match self {
            ShareError::UnknownJob | ShareError::Stale => 21,
            ShareError::Duplicate => 22,
            ShareError::LowDifficulty => 23,
            _ => 20,
        }
    }
    /// A short stable label, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ShareError::UnknownJob => "unknown-job",
            ShareError::Stale => "stale",
            ShareError::Duplicate => "duplicate",
            ShareError::LowDifficulty => "low-difficulty",
            ShareError::Extranonce2Length { .. } => "bad-extranonce2",
            ShareError::NtimeOutOfRange => "bad-ntime",
            ShareError::VersionOutsideMask => "bad-version",
            ShareError::Malformed(_) => "malformed",
            ShareError::TooManyShares => "too-many-shares",
        }
    }
}

/// The block version a submit asks for.
///
/// BIP310 has the miner send only the rolled bits; some firmware sends the
/// whole version instead. Both are accepted when they agree with the job
/// outside the mask; anything else touches bits the miner was not given.
#[inline]
pub fn resolve_version(job_version: u32, mask: u32, bits: Option<u32>) -> Result<u32, ShareError> {
    let Some(bits) = bits else {
        return Ok(job_version);
    };
    if bits & !mask == 0 {
        Ok((job_version & !mask) | bits)
    } else if bits & !mask == job_version & !mask {
        Ok(bits)
    } else {
        Err(ShareError::VersionOutsideMask)
    }
}

/// Check one share against a job. Duplicate detection and job lookup belong to
/// the caller, which owns the per-miner state.
#[inline]
pub fn check_share(
    job: &JobTemplate,
    extranonce1: &[u8],
    extranonce2_len: usize,
    sub: &Submission<'_>,
    rules: &ShareRules,
) -> Result<ValidShare, ShareError> {
    if sub.extranonce2.len() != extranonce2_len {
        return Err(ShareError::Extranonce2Length { expected: extranonce2_len, got: sub.extranonce2.len() });
    }
    if sub.ntime < job.ntime || sub.ntime - job.ntime > rules.ntime_max_forward {
        return Err(ShareError::NtimeOutOfRange);
    }
    let version = resolve_version(job.version, rules.version_mask, sub.version_bits)?;
    let (header, hash) = job.hash(extranonce1, sub.extranonce2, version, sub.ntime, sub.nonce);
    let is_block = job.network_target.is_met_by(&hash);
    // A block solution is never refused for missing the miner's own target
    // (the target can only be harder than the network's in a test rig).
    if !is_block && !rules.target.is_met_by(&hash) {
        return Err(ShareError::LowDifficulty);
    }
    Ok(ValidShare { header, hash, version, achieved: Difficulty::of_hash(&hash), is_block })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_forms() {
        let m = 0x1fffe000;
        assert_eq!(resolve_version(0x20000000, m, None), Ok(0x20000000));
        assert_eq!(resolve_version(0x20000000, m, Some(0x00800000)), Ok(0x20800000));
        // Full version form, as some firmware sends it.
        assert_eq!(resolve_version(0x20000000, m, Some(0x20800000)), Ok(0x20800000));
        // A bit outside the mask.
        assert_eq!(resolve_version(0x20000000, m, Some(0x00000001)), Err(ShareError::VersionOutsideMask));
        // Rolling without a mask at all.
        assert_eq!(resolve_version(0x20000000, 0, Some(0x00002000)), Err(ShareError::VersionOutsideMask));
    }
}
