//! Per-miner variable difficulty. Pure: the session feeds it shares and
//! ticks with the time, and applies what it returns.

use crate::share::Difficulty;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct VardiffConfig {
    pub target_shares_per_min: f64,
    pub retarget: Duration,
    pub min: Difficulty,
    pub max: Difficulty,
}

/// Retargets only when the measured rate is off by more than this factor, so
/// Poisson noise does not make the difficulty wander.
const HYSTERESIS: f64 = 1.5;
/// A window with this many times the expected share count retargets at once
/// (a fast miner starting far below its difficulty).
const BURST: f64 = 4.0;

#[derive(Debug, Clone)]
pub struct Vardiff {
    cfg: VardiffConfig,
    window_start: Instant,
    shares: u32,
    /// Sum of the difficulty of the window's shares: work in diff-1 units.
    work: f64,
}

impl Vardiff {
    pub fn new(cfg: VardiffConfig, now: Instant) -> Self {
        Vardiff { cfg, window_start: now, shares: 0, work: 0.0 }
    }

    fn expected_per_window(&self) -> f64 {
        self.cfg.target_shares_per_min * self.cfg.retarget.as_secs_f64() / 60.0
    }

    /// Hashrate estimate in H/s from the current window.
    pub fn hashrate(&self, now: Instant) -> f64 {
        let t = now.duration_since(self.window_start).as_secs_f64();
        if t <= 0.0 {
            0.0
        } else {
            self.work * crate::share::HASHES_PER_DIFF1 / t
        }
    }

    /// A valid share at difficulty `d`. Returns a new difficulty when one is due.
    pub fn on_share(&mut self, now: Instant, d: Difficulty, current: Difficulty) -> Option<Difficulty> {
        self.shares += 1;
        self.work += d.get();
        let elapsed = now.duration_since(self.window_start);
        let burst = self.shares as f64 >= BURST * self.expected_per_window() && self.shares >= 8;
        if elapsed >= self.cfg.retarget || burst {
            self.retarget(now, current)
        } else {
            None
        }
    }

    /// Called periodically: lowers the difficulty of a miner that went quiet.
    pub fn on_tick(&mut self, now: Instant, current: Difficulty) -> Option<Difficulty> {
        if now.duration_since(self.window_start) >= self.cfg.retarget * 2 {
            self.retarget(now, current)
        } else {
            None
        }
    }

    fn retarget(&mut self, now: Instant, current: Difficulty) -> Option<Difficulty> {
        let elapsed = now.duration_since(self.window_start).as_secs_f64().max(1e-3);
        let ideal = if self.shares == 0 {
            current.get() / 4.0
        } else {
            // diff-1 shares per second, times 60, over shares per minute wanted.
            (self.work / elapsed) * 60.0 / self.cfg.target_shares_per_min
        };
        self.window_start = now;
        self.shares = 0;
        self.work = 0.0;
        let ratio = ideal / current.get();
        if (1.0 / HYSTERESIS..=HYSTERESIS).contains(&ratio) {
            return None;
        }
        let new = Difficulty::new(ideal)?.clamp(self.cfg.min, self.cfg.max);
        (new != current).then_some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VardiffConfig {
        VardiffConfig {
            target_shares_per_min: 20.0,
            retarget: Duration::from_secs(60),
            min: Difficulty::new(0.001).unwrap(),
            max: Difficulty::new(1e6).unwrap(),
        }
    }

    #[test]
    fn converges_to_the_target_rate() {
        // A miner doing 100 diff-1 shares per second: at 20 shares/min the
        // right difficulty is 300.
        let t0 = Instant::now();
        let mut v = Vardiff::new(cfg(), t0);
        let mut d = Difficulty::new(1.0).unwrap();
        let mut t = t0;
        for _ in 0..2000 {
            // Shares arrive at rate (100 / d) per second.
            t += Duration::from_secs_f64(d.get() / 100.0);
            if let Some(n) = v.on_share(t, d, d) {
                d = n;
            }
        }
        assert!((200.0..=450.0).contains(&d.get()), "settled at {d}");
    }

    #[test]
    fn holds_within_hysteresis_and_respects_bounds() {
        let t0 = Instant::now();
        let mut v = Vardiff::new(cfg(), t0);
        let d = Difficulty::new(10.0).unwrap();
        // 24 shares in 60 s: 1.2x the target rate, inside the band.
        let mut out = None;
        for i in 1..=24 {
            out = v.on_share(t0 + Duration::from_millis(2500 * i), d, d);
        }
        assert_eq!(out, None);
        // A silent miner is lowered, but never below min.
        let mut v = Vardiff::new(cfg(), t0);
        let low = Difficulty::new(0.002).unwrap();
        assert_eq!(v.on_tick(t0 + Duration::from_secs(119), low), None);
        assert_eq!(v.on_tick(t0 + Duration::from_secs(120), low), Some(Difficulty::new(0.001).unwrap()));
    }
}
