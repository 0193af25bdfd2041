//! Extranonce subdivision.
//!
//! A pool gives each connection an extranonce1 `E1` and `N` bytes of
//! extranonce2. sluice splits those `N` bytes into `pad | prefix | miner`:
//!
//! ```text
//! pool coinbase:  coinb1 | E1 | pad   prefix | miner extranonce2 | coinb2
//! miner sees:    [coinb1 | E1 | pad]  [prefix] [miner extranonce2]  coinb2
//!                 coinb1 as sent       extranonce1
//! ```
//!
//! The miner's extranonce1 is its prefix alone; the pool's extranonce1 and the
//! zero padding travel at the end of the coinb1 we send. The coinbase bytes are
//! identical, so the pool sees ordinary shares, and a pool failover or a pool
//! `mining.set_extranonce` changes only coinb1: miners keep their extranonce1
//! and notice nothing, as long as the new pool's extranonce2 still has room
//! for `prefix + miner`. When the pool's extranonce2 is too small for a prefix
//! (4 bytes or less), the layout is "classic": one miner per connection, with
//! the pool's extranonce1 as its own.

/// Miner extranonce2 size bounds: NiceHash needs at least 4, Whatsminer fails
/// above 8.
pub const MINER_EN2_MIN: usize = 4;
pub const MINER_EN2_MAX: usize = 8;
/// Two prefix bytes give 65,536 miners per upstream connection; more would
/// only take extranonce2 space from the miners.
const PREFERRED_PREFIX: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub prefix_len: usize,
    pub miner_en2_len: usize,
}

impl Layout {
    /// The layout for a pool extranonce2 size.
    pub fn for_pool(pool_en2: usize, passthrough: bool) -> Layout {
        if pool_en2 <= MINER_EN2_MIN {
            return Layout { prefix_len: 0, miner_en2_len: pool_en2 };
        }
        let prefix_len = if passthrough { 1 } else { (pool_en2 - MINER_EN2_MIN).min(PREFERRED_PREFIX) };
        Layout { prefix_len, miner_en2_len: (pool_en2 - prefix_len).min(MINER_EN2_MAX) }
    }

    pub fn is_classic(&self) -> bool {
        self.prefix_len == 0
    }

    /// Miners one connection can hold.
    pub fn capacity(&self, passthrough: bool) -> u32 {
        if passthrough || self.prefix_len == 0 {
            1
        } else {
            1u32 << (8 * self.prefix_len.min(3))
        }
    }

    /// Zero bytes in front of the prefix when the pool offers more extranonce2
    /// than we hand out; `None` when this layout no longer fits.
    pub fn pad_for(&self, pool_en2: usize) -> Option<usize> {
        if self.is_classic() {
            return (pool_en2 == self.miner_en2_len).then_some(0);
        }
        pool_en2.checked_sub(self.prefix_len + self.miner_en2_len)
    }

    /// The extranonce1 a miner with this prefix index is given.
    pub fn miner_extranonce1(&self, prefix: u32, pool_en1: &[u8]) -> Vec<u8> {
        if self.is_classic() {
            pool_en1.to_vec()
        } else {
            prefix.to_be_bytes()[4 - self.prefix_len..].to_vec()
        }
    }
}

/// Hands out prefix indices on one connection; freed ones are reused first.
/// It knows no epoch: the connection's published work does (see
/// `upstream::Work::alloc_epoch`), and the allocator is only used while that
/// work is held, so the two always agree.
#[derive(Debug)]
pub struct PrefixAlloc {
    capacity: u32,
    next: u32,
    free: Vec<u32>,
    in_use: u32,
}

impl PrefixAlloc {
    pub fn new(capacity: u32) -> Self {
        PrefixAlloc { capacity, next: 0, free: Vec::new(), in_use: 0 }
    }
    pub fn allocate(&mut self) -> Option<u32> {
        let p = if let Some(p) = self.free.pop() {
            p
        } else if self.next < self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            return None;
        };
        self.in_use += 1;
        Some(p)
    }
    /// Allocate this exact prefix, if it is in range and free (to move a
    /// miner between connections without changing its extranonce1).
    pub fn allocate_exact(&mut self, p: u32) -> bool {
        if p >= self.capacity {
            return false;
        }
        if p >= self.next {
            self.free.extend(self.next..p);
            self.next = p + 1;
        } else if let Some(i) = self.free.iter().position(|&f| f == p) {
            self.free.swap_remove(i);
        } else {
            return false;
        }
        self.in_use += 1;
        true
    }

    /// Give a prefix back (one allocated since the last reset).
    pub fn release(&mut self, prefix: u32) {
        debug_assert!(prefix < self.next && !self.free.contains(&prefix), "prefix {prefix} released twice");
        self.free.push(prefix);
        self.in_use -= 1;
    }
    /// Void every lease and start again with a new capacity.
    pub fn reset(&mut self, capacity: u32) {
        *self = PrefixAlloc::new(capacity);
    }
    pub fn in_use(&self) -> u32 {
        self.in_use
    }
    pub fn is_full(&self) -> bool {
        self.free.is_empty() && self.next >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miner_extranonce2_stays_between_4_and_8() {
        for n in 1..=16 {
            let l = Layout::for_pool(n, false);
            let pad = l.pad_for(n).unwrap();
            assert_eq!(pad + l.prefix_len + l.miner_en2_len, n, "pool en2 {n}");
            if n >= MINER_EN2_MIN {
                assert!((MINER_EN2_MIN..=MINER_EN2_MAX).contains(&l.miner_en2_len), "pool en2 {n}: {l:?}");
            }
        }
        assert_eq!(Layout::for_pool(8, false), Layout { prefix_len: 2, miner_en2_len: 6 });
        assert_eq!(Layout::for_pool(5, false), Layout { prefix_len: 1, miner_en2_len: 4 });
        assert_eq!(Layout::for_pool(4, false), Layout { prefix_len: 0, miner_en2_len: 4 });
        assert_eq!(Layout::for_pool(16, false), Layout { prefix_len: 2, miner_en2_len: 8 });
        assert_eq!(Layout::for_pool(8, false).capacity(false), 65536);
        assert_eq!(Layout::for_pool(8, true).capacity(true), 1);
    }

    #[test]
    fn a_new_pool_session_keeps_the_layout_if_it_fits() {
        let l = Layout::for_pool(8, false);
        assert_eq!(l.pad_for(8), Some(0));
        assert_eq!(l.pad_for(12), Some(4));
        assert_eq!(l.pad_for(7), None);
        let c = Layout::for_pool(4, false);
        assert_eq!((c.pad_for(4), c.pad_for(5)), (Some(0), None));
        assert_eq!(l.miner_extranonce1(0x0102, &[9, 9]), vec![1, 2]);
        assert_eq!(c.miner_extranonce1(0, &[9, 9]), vec![9, 9]);
    }

    #[test]
    fn exact_allocation_keeps_the_rest_available() {
        let mut a = PrefixAlloc::new(8);
        assert!(a.allocate_exact(5));
        assert!(!a.allocate_exact(5), "taken");
        assert!(!a.allocate_exact(8), "out of range");
        let mut got: Vec<u32> = (0..7).map(|_| a.allocate().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 6, 7]);
        assert!(a.allocate().is_none());
        a.release(3);
        assert!(a.allocate_exact(3));
        assert_eq!(a.in_use(), 8);
    }

    #[test]
    fn prefixes_are_unique_reused_and_cleared_by_reset() {
        let mut a = PrefixAlloc::new(3);
        let (x, y, z) = (a.allocate().unwrap(), a.allocate().unwrap(), a.allocate().unwrap());
        assert!(x != y && y != z && x != z);
        assert!(a.allocate().is_none() && a.is_full());
        a.release(y);
        assert_eq!(a.allocate(), Some(y));
        a.reset(2);
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.allocate(), Some(0));
    }
}
