//! Targets and difficulties.
//!
//! A [`Target`] is a 256-bit unsigned integer; a hash meets it when the hash,
//! read as a little-endian number, is less than or equal to it. Difficulty 1 is
//! the target `0x00000000ffff0000…0000` (the "pdiff" convention every SHA-256
//! pool uses), and difficulty `d` is the target `diff1 / d`.

use super::hash::Hash256;
use std::fmt;

/// A 256-bit target stored as four little-endian u64 limbs (limb 3 is the most
/// significant).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Target([u64; 4]);

/// 2^256 / 2^32 expected hashes per difficulty-1 share.
pub const HASHES_PER_DIFF1: f64 = 4_294_967_296.0;

impl Target {
    pub const MAX: Target = Target([u64::MAX; 4]);
    /// 0x00000000ffff0000000000000000000000000000000000000000000000000000
    pub const DIFF1: Target = Target([0, 0, 0, 0x0000_0000_ffff_0000]);

    pub fn from_le_bytes(b: &[u8; 32]) -> Self {
        let mut l = [0u64; 4];
        for (i, limb) in l.iter_mut().enumerate() {
            *limb = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        }
        Target(l)
    }

    pub fn to_le_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        b
    }

    /// Does `hash` meet this target (hash <= target)?
    #[inline]
    pub fn is_met_by(&self, hash: &Hash256) -> bool {
        Target::from_le_bytes(&hash.0) <= *self
    }

    /// Expand a compact `nBits` value. Negative and overflowing encodings give
    /// `None`; consensus never produces them.
    pub fn from_compact(nbits: u32) -> Option<Self> {
        let exp = nbits >> 24;
        let mant = nbits & 0x007f_ffff;
        if nbits & 0x0080_0000 != 0 && mant != 0 {
            return None;
        }
        if exp <= 3 {
            return Some(Target([(mant >> (8 * (3 - exp))) as u64, 0, 0, 0]));
        }
        let shift = 8 * (exp - 3);
        // mantissa occupies bits [shift, shift+23); reject anything past bit 255.
        if mant != 0 && shift + (32 - mant.leading_zeros()) > 256 {
            return None;
        }
        Some(Target::from_u128_shl(mant as u128, shift))
    }

    /// The compact `nBits` encoding, rounding the target down to 23 bits of
    /// mantissa.
    pub fn to_compact_lossy(self) -> u32 {
        let be = {
            let mut b = self.to_le_bytes();
            b.reverse();
            b
        };
        let Some(first) = be.iter().position(|&b| b != 0) else {
            return 0;
        };
        let mut size = 32 - first;
        let take = |i: usize| be.get(i).copied().unwrap_or(0) as u32;
        let mut mant = (take(first) << 16) | (take(first + 1) << 8) | take(first + 2);
        if mant & 0x0080_0000 != 0 {
            mant >>= 8;
            size += 1;
        }
        ((size as u32) << 24) | mant
    }

    fn from_u128_shl(v: u128, shift: u32) -> Self {
        let mut out = [0u64; 4];
        let lo = v as u64;
        let hi = (v >> 64) as u64;
        let limb = (shift / 64) as usize;
        let bits = shift % 64;
        let parts: [u64; 3] =
            if bits == 0 { [lo, hi, 0] } else { [lo << bits, (hi << bits) | (lo >> (64 - bits)), hi >> (64 - bits)] };
        for (i, p) in parts.iter().enumerate() {
            if limb + i < 4 {
                out[limb + i] = *p;
            }
        }
        Target(out)
    }

    /// The target as an f64 (rounded), for difficulty arithmetic.
    pub fn to_f64(self) -> f64 {
        self.0.iter().rev().fold(0.0, |acc, &l| acc * 18_446_744_073_709_551_616.0 + l as f64)
    }

    /// The target from an f64 (which must be finite and >= 0). Values of 2^256
    /// and above saturate to [`Target::MAX`]. Exact for the f64 given: the
    /// precision loss is in the float.
    fn from_f64_lossy(v: f64) -> Self {
        if v.is_nan() || v < 1.0 {
            return Target([0; 4]);
        }
        if v
            >= 115_792_089_237_316_195_423_570_985_008_687_907_853_269_984_665_640_564_039_457_584_007_913_129_639_936.0
        {
            return Target::MAX;
        }
        let bits = v.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
        let mant = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
        if exp < 0 {
            Target([mant >> (-exp) as u32, 0, 0, 0])
        } else {
            Target::from_u128_shl(mant as u128, exp as u32)
        }
    }

    /// The difficulty this target corresponds to (diff1 / target).
    pub fn difficulty(self) -> Difficulty {
        Difficulty(Target::DIFF1.to_f64() / self.to_f64().max(1.0))
    }
}

impl Ord for Target {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.iter().rev().cmp(o.0.iter().rev())
    }
}
impl PartialOrd for Target {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = self.to_le_bytes();
        b.reverse();
        f.write_str(&hex::encode(b))
    }
}
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

/// Share difficulty in pdiff units. Always finite and > 0 once constructed
/// through [`Difficulty::new`].
#[derive(Clone, Copy, PartialEq, PartialOrd, Debug, Default, serde::Serialize)]
pub struct Difficulty(f64);

impl Difficulty {
    pub const ONE: Difficulty = Difficulty(1.0);

    pub fn new(d: f64) -> Option<Self> {
        (d.is_finite() && d > 0.0).then_some(Difficulty(d))
    }
    pub fn get(self) -> f64 {
        self.0
    }
    /// The target for this difficulty, rounded down (never easier than asked).
    pub fn to_target(self) -> Target {
        Target::from_f64_lossy((Target::DIFF1.to_f64() / self.0).floor())
    }
    /// The difficulty a hash achieved.
    pub fn of_hash(h: &Hash256) -> Difficulty {
        Target::from_le_bytes(&h.0).difficulty()
    }
    pub fn min(self, o: Difficulty) -> Difficulty {
        if o.0 < self.0 {
            o
        } else {
            self
        }
    }
    pub fn max(self, o: Difficulty) -> Difficulty {
        if o.0 > self.0 {
            o
        } else {
            self
        }
    }
    pub fn clamp(self, lo: Difficulty, hi: Difficulty) -> Difficulty {
        self.max(lo).min(hi)
    }
}

impl fmt::Display for Difficulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff1_and_compact_agree() {
        // 0x1d00ffff is difficulty 1 in compact form (the genesis nBits).
        assert_eq!(Target::from_compact(0x1d00ffff), Some(Target::DIFF1));
        assert_eq!(Difficulty::ONE.to_target(), Target::DIFF1);
        assert_eq!(Target::DIFF1.to_string(), "00000000ffff0000000000000000000000000000000000000000000000000000");
    }

    #[test]
    fn compact_round_trips() {
        for nbits in [0x1d00ffff, 0x1800eb30, 0x17057e69, 0x207fffff] {
            assert_eq!(Target::from_compact(nbits).unwrap().to_compact_lossy(), nbits);
        }
        // A mantissa with the sign bit set moves up a byte.
        assert_eq!(Target::from_compact(0x02008000).unwrap().to_compact_lossy(), 0x02008000);
    }

    #[test]
    fn compact_examples() {
        // Block 491133's nBits.
        assert_eq!(
            Target::from_compact(0x1800eb30).unwrap().to_string(),
            "000000000000000000eb30000000000000000000000000000000000000000000"
        );
        assert_eq!(Target::from_compact(0x03123456).unwrap().to_string(), format!("{:064x}", 0x123456));
        assert_eq!(Target::from_compact(0x01123456).unwrap().to_string(), format!("{:064x}", 0x12));
        assert_eq!(Target::from_compact(0x04923456), None); // negative
        assert_eq!(Target::from_compact(0x23123456), None); // overflow
    }

    #[test]
    fn difficulty_round_trips() {
        for d in [1e-6, 0.001, 0.5, 1.0, 2.0, 1024.0, 65536.0, 1e12] {
            let back = Difficulty::new(d).unwrap().to_target().difficulty().get();
            assert!((back - d).abs() / d < 1e-9, "{d} -> {back}");
        }
        // Half the difficulty is twice the target.
        let t2 = Difficulty::new(0.5).unwrap().to_target();
        assert_eq!(t2.to_string(), "00000001fffe0000000000000000000000000000000000000000000000000000");
        assert_eq!(Difficulty::new(0.0), None);
        assert_eq!(Difficulty::new(f64::NAN), None);
    }

    #[test]
    fn is_met_by_compares_as_little_endian_number() {
        let t = Target::DIFF1;
        let mut h = [0u8; 32];
        h[27] = 0xff;
        h[26] = 0xff; // 0x00000000ffff00..: exactly the target
        assert!(t.is_met_by(&Hash256(h)));
        h[0] = 1; // one above
        assert!(!t.is_met_by(&Hash256(h)));
        let mut low = [0xffu8; 32];
        low[28..].fill(0);
        low[27] = 0xff;
        low[26] = 0xfe;
        assert!(t.is_met_by(&Hash256(low)));
    }
}
