//! SHA-256d on the shapes Bitcoin mining hashes: 80-byte headers, 64-byte merkle
//! nodes, and coinbases continued from a cached midstate.
//!
//! The fixed-size cases call the compression function directly with the padding
//! blocks spelled out, so a merkle step is exactly three compressions and a
//! header exactly three, with no hasher buffer bookkeeping in between.

use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};
use std::fmt;

const H0: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// A 32-byte SHA-256d output in internal byte order (as it sits in a header or
/// merkle branch). Block explorers show it reversed; only `Display` reverses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hash256(pub [u8; 32]);

impl Hash256 {
    /// Parse display order (reversed) hex, as block explorers print hashes.
    pub fn from_display_hex(s: &str) -> Result<Self, hex::FromHexError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b)?;
        b.reverse();
        Ok(Hash256(b))
    }
    /// The low 64 bits of the hash as a little-endian number. For a hash that
    /// met any useful target these bits are still uniformly random, which makes
    /// them a good duplicate-detection key.
    pub fn low_u64(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for Hash256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut r = self.0;
        r.reverse();
        f.write_str(&hex::encode(r))
    }
}
impl fmt::Debug for Hash256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash256({self})")
    }
}

#[inline]
fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

#[inline]
fn state_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// Second SHA-256 of a 32-byte digest: one compression.
#[inline]
fn sha256_of_32(d: &[u8; 32]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(d);
    block[32] = 0x80;
    block[62] = 0x01; // length 256 bits = 0x0100, big-endian in the last 8 bytes
    let mut st = H0;
    compress(&mut st, &block);
    state_bytes(&st)
}

/// SHA-256d of an 80-byte block header: three compressions.
#[inline]
pub fn sha256d_header(h: &[u8; 80]) -> Hash256 {
    let mut st = H0;
    compress(&mut st, h[..64].try_into().expect("64"));
    let mut tail = [0u8; 64];
    tail[..16].copy_from_slice(&h[64..]);
    tail[16] = 0x80;
    tail[62] = 0x02; // 640 bits = 0x0280
    tail[63] = 0x80;
    compress(&mut st, &tail);
    Hash256(sha256_of_32(&state_bytes(&st)))
}

/// SHA-256d of two concatenated 32-byte nodes (one merkle step): three compressions.
#[inline]
pub fn sha256d_pair(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    const PAD: [u8; 64] = {
        let mut p = [0u8; 64];
        p[0] = 0x80;
        p[62] = 0x02; // 512 bits = 0x0200
        p
    };
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(a);
    block[32..].copy_from_slice(b);
    let mut st = H0;
    compress(&mut st, &block);
    compress(&mut st, &PAD);
    sha256_of_32(&state_bytes(&st))
}

/// SHA-256d of arbitrary bytes (cold paths: job setup, tests).
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    let first: [u8; 32] = Sha256::digest(data).into();
    sha256_of_32(&first)
}

/// Finish a coinbase hash from a hasher that already absorbed the prefix
/// (the cached coinb1 midstate), then hash again.
#[inline]
pub fn sha256d_continue(mut prefix: Sha256, parts: &[&[u8]]) -> [u8; 32] {
    for p in parts {
        prefix.update(p);
    }
    let first: [u8; 32] = prefix.finalize().into();
    sha256_of_32(&first)
}

/// Raw SHA-256 compression of one block, exposed so benchmarks can measure the
/// floor that share validation is compared against.
pub fn compress_block(state: &mut [u32; 8], block: &[u8; 64]) {
    compress(state, block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_shapes_agree_with_generic_sha256d() {
        let h: [u8; 80] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        assert_eq!(sha256d_header(&h).0, sha256d(&h));
        let a = [0x11u8; 32];
        let b = [0xeeu8; 32];
        let mut cat = [0u8; 64];
        cat[..32].copy_from_slice(&a);
        cat[32..].copy_from_slice(&b);
        assert_eq!(sha256d_pair(&a, &b), sha256d(&cat));
        let data: Vec<u8> = (0..250u32).map(|i| (i * 13) as u8).collect();
        let mut pre = Sha256::new();
        pre.update(&data[..100]);
        assert_eq!(sha256d_continue(pre, &[&data[100..180], &data[180..]]), sha256d(&data));
    }

    #[test]
    fn display_reverses_bytes() {
        let s = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f";
        let h = Hash256::from_display_hex(s).unwrap();
        assert_eq!(h.0[31], 0);
        assert_eq!(h.0[0], 0x6f);
        assert_eq!(h.to_string(), s);
    }
}
