//! A job as the share checker sees it: everything needed to rebuild a block
//! header from a miner's submit, with the coinbase prefix already absorbed into
//! a SHA-256 midstate.

use super::hash::{sha256d_continue, sha256d_header, sha256d_pair, Hash256};
use super::target::Target;
use sha2::{Digest, Sha256};

/// A previous-block hash in header byte order.
///
/// `mining.notify` sends it with each 4-byte word byte-swapped (a cgminer
/// legacy); the conversion lives here and nowhere else.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PrevHash(pub [u8; 32]);

impl PrevHash {
    /// From the 32 bytes of the hex string in `mining.notify`.
    pub fn from_stratum_bytes(mut b: [u8; 32]) -> Self {
        for w in b.chunks_exact_mut(4) {
            w.reverse();
        }
        PrevHash(b)
    }
    /// The 32 bytes to hex-encode into `mining.notify`.
    pub fn to_stratum_bytes(self) -> [u8; 32] {
        let mut b = self.0;
        for w in b.chunks_exact_mut(4) {
            w.reverse();
        }
        b
    }
}

/// The parts of a job that share checking needs. Built once per job; shared
/// read-only by every miner working on it.
#[derive(Clone)]
pub struct JobTemplate {
    pub version: u32,
    pub prevhash: PrevHash,
    pub nbits: u32,
    pub ntime: u32,
    /// SHA-256 state after absorbing coinb1 (and anything the proxy appends to
    /// it). Cloning it is a ~100-byte copy; the coinb1 blocks are never
    /// compressed again for this job.
    coinb1_state: Sha256,
    coinb1_len: usize,
    pub coinb2: Vec<u8>,
    pub merkle_branch: Vec<[u8; 32]>,
    /// The network target from nbits; a share meeting it is a block.
    pub network_target: Target,
}

impl JobTemplate {
    pub fn new(
        version: u32,
        prevhash: PrevHash,
        coinb1: &[&[u8]],
        coinb2: Vec<u8>,
        merkle_branch: Vec<[u8; 32]>,
        nbits: u32,
        ntime: u32,
    ) -> Self {
        let mut st = Sha256::new();
        let mut coinb1_len = 0;
        for part in coinb1 {
            st.update(part);
            coinb1_len += part.len();
        }
        JobTemplate {
            version,
            prevhash,
            nbits,
            ntime,
            coinb1_state: st,
            coinb1_len,
            coinb2,
            merkle_branch,
            // An invalid nbits would make every share a "block"; treat it as
            // unreachable instead.
            network_target: Target::from_compact(nbits).unwrap_or_default(),
        }
    }

    /// The merkle root for a coinbase completed with these extranonces.
    #[inline]
    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        let mut node = sha256d_continue(self.coinb1_state.clone(), &[extranonce1, extranonce2, &self.coinb2]);
        for b in &self.merkle_branch {
            node = sha256d_pair(&node, b);
        }
        node
    }

    #[inline]
    pub fn header(&self, merkle_root: &[u8; 32], version: u32, ntime: u32, nonce: u32) -> [u8; 80] {
        build_header(version, &self.prevhash.0, merkle_root, ntime, self.nbits, nonce)
    }

    /// Header and its hash for a submit.
    #[inline]
    pub fn hash(&self, en1: &[u8], en2: &[u8], version: u32, ntime: u32, nonce: u32) -> ([u8; 80], Hash256) {
        let root = self.merkle_root(en1, en2);
        let header = self.header(&root, version, ntime, nonce);
        (header, sha256d_header(&header))
    }

    /// Number of SHA-256 compressions one share check costs with the coinb1
    /// midstate cached: the coinbase tail, its second hash, three per merkle
    /// step and three for the header.
    pub fn compressions_per_share(&self, en1_len: usize, en2_len: usize) -> usize {
        // The midstate still buffers the last partial block of coinb1.
        let tail = self.coinb1_len % 64 + en1_len + en2_len + self.coinb2.len();
        (tail + 9).div_ceil(64) + 1 + 3 * self.merkle_branch.len() + 3
    }
}

/// Serialise an 80-byte header: all integers little-endian, hashes in
/// internal order.
#[inline]
pub fn build_header(
    version: u32,
    prevhash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    nbits: u32,
    nonce: u32,
) -> [u8; 80] {
    let mut h = [0u8; 80];
    h[0..4].copy_from_slice(&version.to_le_bytes());
    h[4..36].copy_from_slice(prevhash);
    h[36..68].copy_from_slice(merkle_root);
    h[68..72].copy_from_slice(&ntime.to_le_bytes());
    h[72..76].copy_from_slice(&nbits.to_le_bytes());
    h[76..80].copy_from_slice(&nonce.to_le_bytes());
    h
}
