//! Curves learnt from the miners (pure): what each model keeps of its
//! hashrate at each power target, read back from its firmware, with the
//! built-in (or configured) curve as the prior.
//!
//! A sample is one steady read-back of one miner: the target it runs at
//! (fraction of its full power) and the hashrate it reads (fraction of its
//! hashrate at full). Samples are kept by target, the newest [`KEEP`] at
//! each, and a target counts once [`TRUST`] samples agree on it.
//!
//! The learnt curve is the prior with its *shortfall* (1 − hashrate
//! fraction) scaled by how far the samples say the prior is off: at each
//! trusted target, the median sample's shortfall over the prior's; between
//! targets, interpolated; beyond them, the nearest. So a few trusted
//! targets move the whole curve, including where no miner has run yet (the
//! trade goes there next, and learns it).
//!
//! A bad reading cannot drag the curve:
//! * it is refused outright when it cannot be true: not finite, a hashrate
//!   of zero or under, more than [`MOST`] of full at a lower target, or
//!   watts more than [`OFF_TARGET`] away from the target (not there yet,
//!   or not at the target it says);
//! * one that passes is one of up to [`KEEP`] at its target, and only their
//!   median counts: a minority of liars moves nothing;
//! * however many agree, the shortfall is scaled by [`SCALE`] at most,
//!   either way (a model more than twice as good or bad as its table is a
//!   misconfigured model, not a curve to learn);
//! * the curve stays a curve: hashrate rises with power, up to full.
//!
//! A curve decides only which miners the trade lowers and how far: what a
//! miner is counted at drawing is its target, so no curve, learnt or not,
//! can let the miners holding a job draw more than the budget.

use super::targets::Curve;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Samples kept at each target (the newest).
pub const KEEP: usize = 15;
/// Samples at a target before it counts.
pub const TRUST: usize = 3;
/// A hashrate over this fraction of full, at a lower target, is not read.
pub const MOST: f64 = 1.2;
/// A reading whose watts are this far from the target (as a fraction of
/// full power) is not at it.
pub const OFF_TARGET: f64 = 0.15;
/// The most the prior's shortfall is scaled, up (×) or down (÷).
pub const SCALE: f64 = 2.0;
/// Samples are kept by target in steps of this fraction of full power
/// (each step's point is at its samples' mean target).
const STEP: f64 = 0.02;

/// Why a reading was not taken as a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a number")]
    NotFinite,
    #[error("at full power or over (nothing to learn of a lower target)")]
    AtFull,
    #[error("no hashrate")]
    NoHashrate,
    #[error("more hashrate than the miner has at full power")]
    TooHigh,
    #[error("its watts are not at the target")]
    OffTarget,
}

/// One steady read-back, relative to the miner's full power.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The target it runs at, fraction of full power.
    pub target: f64,
    /// What it read drawing, fraction of full power.
    pub watts: f64,
    /// What it read hashing, fraction of its hashrate at full.
    pub hashrate: f64,
}

/// What one model's miners have read back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Learnt {
    /// (target, hashrate fraction) by target in [`STEP`]s of full power.
    bins: BTreeMap<u32, VecDeque<(f64, f64)>>,
}

/// One target as status shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub target: f64,
    /// The median sample.
    pub hashrate: f64,
    pub samples: usize,
}

impl Learnt {
    /// Keep a sample, or say why not.
    pub fn observe(&mut self, s: Sample) -> Result<(), Refused> {
        if !(s.target.is_finite() && s.watts.is_finite() && s.hashrate.is_finite()) {
            return Err(Refused::NotFinite);
        }
        let bin = (s.target / STEP).round();
        if !(1.0..1.0 / STEP).contains(&bin) {
            return Err(Refused::AtFull);
        }
        if s.hashrate <= 0.0 {
            return Err(Refused::NoHashrate);
        }
        if s.hashrate > MOST {
            return Err(Refused::TooHigh);
        }
        if (s.watts - s.target).abs() > OFF_TARGET {
            return Err(Refused::OffTarget);
        }
        let q = self.bins.entry(bin as u32).or_default();
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back((s.target, s.hashrate.min(1.0)));
        Ok(())
    }

    /// The targets with enough samples to count.
    pub fn trusted(&self) -> Vec<Point> {
        self.bins
            .iter()
            .filter(|(_, q)| q.len() >= TRUST)
            .map(|(_, q)| Point {
                target: q.iter().map(|s| s.0).sum::<f64>() / q.len() as f64,
                hashrate: median(q.iter().map(|s| s.1)),
                samples: q.len(),
            })
            .collect()
    }

    /// The curve these samples make of `prior` (the prior itself until a
    /// target is trusted). Its floor is the prior's.
    pub fn curve(&self, prior: &Curve) -> Curve {
        // How far the prior's shortfall is off at each trusted target it
        // reaches (one it says keeps everything says nothing of scale).
        let scales: Vec<(f64, f64)> = self
            .trusted()
            .into_iter()
            .filter_map(|p| {
                let h = prior.hashrate(p.target)?;
                (h < 1.0 - 1e-9).then(|| (p.target, ((1.0 - p.hashrate) / (1.0 - h)).clamp(1.0 / SCALE, SCALE)))
            })
            .collect();
        if scales.is_empty() {
            return prior.clone();
        }
        let scale_at = |x: f64| {
            let (first, last) = (scales[0], scales[scales.len() - 1]);
            if x <= first.0 {
                return first.1;
            }
            if x >= last.0 {
                return last.1;
            }
            let i = scales.iter().position(|&(t, _)| t >= x).unwrap_or(scales.len() - 1);
            let ((x0, k0), (x1, k1)) = (scales[i - 1], scales[i]);
            k0 + (k1 - k0) * (x - x0) / (x1 - x0)
        };
        let mut xs: Vec<f64> = prior.points().iter().map(|p| p.0).chain(scales.iter().map(|s| s.0)).collect();
        xs.retain(|&x| x < 1.0 && x >= prior.min() - 1e-12);
        xs.sort_by(f64::total_cmp);
        xs.dedup_by(|a, b| (*a - *b).abs() < 0.005);
        let mut pts: Vec<(f64, f64)> = xs
            .iter()
            .map(|&x| {
                let h = prior.hashrate(x).unwrap_or(x);
                (x, (1.0 - scale_at(x) * (1.0 - h)).clamp(0.01, 1.0))
            })
            .collect();
        // Hashrate rises with power: a point over the next comes down to it.
        let mut next = 1.0f64;
        for p in pts.iter_mut().rev() {
            p.1 = p.1.min(next);
            next = p.1;
        }
        Curve::new(&pts).unwrap_or_else(|_| prior.clone())
    }
}

/// A learnt curve is put to use once a point of it moves this far (a
/// fraction of full hashrate): noise in the median does not move targets.
pub const MOVES: f64 = 0.005;

/// Every model's samples, and the curve in use for each (worked out again
/// only when a sample moves it by [`MOVES`]).
#[derive(Debug, Default)]
pub struct Models {
    models: HashMap<Arc<str>, Model>,
    /// Bumped whenever a curve in use changes.
    pub changed: u64,
    /// Readings refused, for the metric and the log.
    pub refused: u64,
}

#[derive(Debug)]
struct Model {
    learnt: Learnt,
    /// The prior the curve in use was made of, and that curve.
    prior: Curve,
    curve: Arc<Curve>,
}

impl Models {
    /// A sample of `model` (whose curve from config is `prior`); whether
    /// the curve in use moved.
    pub fn observe(&mut self, model: &str, prior: &Curve, s: Sample) -> Result<bool, Refused> {
        let m = self.models.entry(Arc::from(model)).or_insert_with(|| Model {
            learnt: Learnt::default(),
            prior: prior.clone(),
            curve: Arc::new(prior.clone()),
        });
        if let Err(e) = m.learnt.observe(s) {
            self.refused += 1;
            return Err(e);
        }
        let new = m.learnt.curve(prior);
        let moved = m.prior != *prior || !within(&new, &m.curve, MOVES);
        if moved {
            (m.prior, m.curve) = (prior.clone(), Arc::new(new));
            self.changed += 1;
        }
        Ok(moved)
    }

    /// The curve in use for `model` with the prior `prior` (none: nothing
    /// learnt, or learnt of another prior, before a reload).
    pub fn curve(&self, model: &str, prior: &Curve) -> Option<Arc<Curve>> {
        self.models.get(model).filter(|m| m.prior == *prior).map(|m| m.curve.clone())
    }

    /// Each model with a trusted target, by name: what `status` shows.
    pub fn status(&self) -> Vec<crate::api::CurveStatus> {
        let mut v: Vec<crate::api::CurveStatus> = self
            .models
            .iter()
            .map(|(name, m)| crate::api::CurveStatus {
                model: name.to_string(),
                learnt: (m.learnt.trusted().iter())
                    .map(|p| crate::api::CurvePoint {
                        power: p.target,
                        hashrate: p.hashrate,
                        table: m.prior.hashrate(p.target).unwrap_or(f64::NAN),
                        samples: p.samples,
                    })
                    .collect(),
                in_use: m.curve.points().iter().map(|&(x, h)| [x, h]).collect(),
            })
            .filter(|c| !c.learnt.is_empty())
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }
}

/// Whether `a` and `b` agree within `eps` at every point of either.
fn within(a: &Curve, b: &Curve, eps: f64) -> bool {
    a.min() == b.min()
        && a.points().iter().chain(b.points()).all(|&(x, _)| match (a.hashrate(x), b.hashrate(x)) {
            (Some(p), Some(q)) => (p - q).abs() <= eps,
            _ => false,
        })
}

fn median(q: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = q.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(target: f64, hashrate: f64) -> Sample {
        Sample { target, watts: target, hashrate }
    }

    /// The S19k Pro's table (LuxOS presets).
    fn prior() -> Curve {
        Curve::new(&[(0.425, 0.491), (0.593, 0.661), (0.785, 0.830)]).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn readings_that_cannot_be_true_are_refused() {
        let cases = [
            (Sample { target: 0.6, watts: 0.6, hashrate: f64::NAN }, Err(Refused::NotFinite)),
            (Sample { target: f64::INFINITY, watts: 0.6, hashrate: 0.6 }, Err(Refused::NotFinite)),
            (at(1.0, 1.0), Err(Refused::AtFull)),
            (at(0.996, 0.99), Err(Refused::AtFull)),
            (at(0.004, 0.01), Err(Refused::AtFull)),
            (at(0.6, 0.0), Err(Refused::NoHashrate)),
            (at(0.6, -0.3), Err(Refused::NoHashrate)),
            (at(0.6, 1.21), Err(Refused::TooHigh)),
            // Still climbing from idle, or at another target than it says.
            (Sample { target: 0.6, watts: 0.03, hashrate: 0.05 }, Err(Refused::OffTarget)),
            (Sample { target: 0.6, watts: 0.76, hashrate: 0.7 }, Err(Refused::OffTarget)),
            (Sample { target: 0.6, watts: 0.65, hashrate: 0.7 }, Ok(())),
            // A little over full at a lower target is noise: kept as full.
            (at(0.6, 1.1), Ok(())),
        ];
        for (s, want) in cases {
            assert_eq!(Learnt::default().observe(s), want, "{s:?}");
        }
    }

    #[test]
    fn until_a_target_is_trusted_the_prior_stands() {
        let mut l = Learnt::default();
        for _ in 0..TRUST - 1 {
            l.observe(at(0.593, 0.75)).unwrap();
        }
        assert_eq!(l.curve(&prior()), prior());
        l.observe(at(0.593, 0.75)).unwrap();
        assert_ne!(l.curve(&prior()), prior());
    }

    #[test]
    fn one_trusted_target_moves_the_whole_curve_by_its_shortfall() {
        // The fleet keeps 10% more of its shortfall-free hashrate at 59%
        // than the table says: the shortfall there is 0.339 by the table,
        // 0.271 read (scale 0.8), and so it is everywhere else.
        let mut l = Learnt::default();
        for _ in 0..5 {
            l.observe(at(0.59, 1.0 - 0.8 * (1.0 - prior().hashrate(0.59).unwrap()))).unwrap();
        }
        let c = l.curve(&prior());
        assert_eq!(c.min(), prior().min(), "the floor is the prior's");
        for x in [0.425, 0.5, 0.59, 0.7, 0.785, 0.9] {
            let want = 1.0 - 0.8 * (1.0 - prior().hashrate(x).unwrap());
            assert!(close(c.hashrate(x).unwrap(), want), "at {x}: {:?} against {want}", c.hashrate(x));
        }
    }

    #[test]
    fn between_trusted_targets_the_scale_is_interpolated() {
        let p = prior();
        let mut l = Learnt::default();
        for _ in 0..3 {
            // Scale 0.8 at 0.5 and 1.2 at 0.7.
            l.observe(at(0.5, 1.0 - 0.8 * (1.0 - p.hashrate(0.5).unwrap()))).unwrap();
            l.observe(at(0.7, 1.0 - 1.2 * (1.0 - p.hashrate(0.7).unwrap()))).unwrap();
        }
        let c = l.curve(&p);
        // At the prior's points and the trusted targets (the learnt
        // curve's points; between them it is a line).
        let table = [(0.425, 0.8), (0.5, 0.8), (0.593, 0.8 + 0.4 * 0.093 / 0.2), (0.7, 1.2), (0.785, 1.2)];
        for (x, k) in table {
            let want = 1.0 - k * (1.0 - p.hashrate(x).unwrap());
            assert!(close(c.hashrate(x).unwrap(), want), "at {x}: {:?} against {want}", c.hashrate(x));
        }
        assert!(c.points().windows(2).all(|w| w[1].1 >= w[0].1), "rises: {:?}", c.points());
    }

    #[test]
    fn a_minority_of_liars_moves_nothing_and_a_majority_moves_it_only_so_far() {
        let p = prior();
        let truth = 1.0 - 0.8 * (1.0 - p.hashrate(0.6).unwrap());
        let mut l = Learnt::default();
        for k in 0..KEEP {
            // Seven in fifteen read anything they like (within what passes).
            let h = if k % 2 == 1 { [0.01, 1.2, 0.02, 1.19, 0.05, 1.0, 0.011][k / 2] } else { truth };
            l.observe(at(0.6, h)).unwrap();
        }
        assert!(close(l.curve(&p).hashrate(0.6).unwrap(), truth));
        // Every reading a lie, of full hashrate at 43% power: the shortfall
        // halves, no more.
        let mut l = Learnt::default();
        for _ in 0..KEEP {
            l.observe(at(0.43, 1.0)).unwrap();
        }
        let c = l.curve(&p);
        let want = 1.0 - (1.0 - p.hashrate(0.43).unwrap()) / SCALE;
        assert!(close(c.hashrate(0.43).unwrap(), want), "{:?} against {want}", c.hashrate(0.43));
        // And of almost nothing: it doubles, no more.
        let mut l = Learnt::default();
        for _ in 0..KEEP {
            l.observe(at(0.785, 0.01)).unwrap();
        }
        let want = 1.0 - SCALE * (1.0 - p.hashrate(0.785).unwrap());
        assert!(close(l.curve(&p).hashrate(0.785).unwrap(), want));
    }

    #[test]
    fn the_newest_samples_count() {
        let mut l = Learnt::default();
        for _ in 0..KEEP {
            l.observe(at(0.6, 0.5)).unwrap();
        }
        for _ in 0..KEEP / 2 + 1 {
            l.observe(at(0.6, 0.7)).unwrap();
        }
        let p = l.trusted();
        assert_eq!(p.len(), 1);
        assert!(close(p[0].target, 0.6) && p[0].hashrate == 0.7 && p[0].samples == KEEP, "{p:?}");
    }

    #[test]
    fn a_model_s_curve_in_use_moves_in_steps_and_follows_a_new_prior() {
        let p = prior();
        let mut m = Models::default();
        assert_eq!(m.curve("S19k Pro", &p), None, "nothing learnt");
        // Two samples: not trusted, the prior stays in use.
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.72)), Ok(false));
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.72)), Ok(false));
        assert_eq!(m.curve("S19k Pro", &p).as_deref(), Some(&p));
        // The third: it moves.
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.72)), Ok(true));
        let c = m.curve("S19k Pro", &p).unwrap();
        assert!(close(c.hashrate(0.59).unwrap(), 0.72));
        // A median that moves by less than MOVES moves nothing in use.
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.724)), Ok(false));
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.724)), Ok(false));
        // A refused reading is counted, and moves nothing.
        assert_eq!(m.observe("S19k Pro", &p, at(0.59, 0.0)), Err(Refused::NoHashrate));
        assert_eq!((m.refused, m.changed), (1, 1));
        // Another model learns apart.
        assert_eq!(m.curve("S21", &p), None);
        // A reload with another table: nothing in use until a sample
        // works the curve out of the new one.
        let q = Curve::proportional(0.5);
        assert_eq!(m.curve("S19k Pro", &q), None);
        assert_eq!(m.observe("S19k Pro", &q, at(0.59, 0.72)), Ok(true));
        assert!(m.curve("S19k Pro", &q).is_some());
        assert_eq!(m.status().len(), 1);
    }

    #[test]
    fn the_curve_rises_with_power_whatever_the_samples() {
        // A better read low than high: the low point comes down to the high.
        let p = prior();
        let mut l = Learnt::default();
        for _ in 0..3 {
            l.observe(at(0.45, 0.8)).unwrap();
            l.observe(at(0.78, 0.6)).unwrap();
        }
        let c = l.curve(&p);
        assert!(c.points().windows(2).all(|w| w[1].1 >= w[0].1), "rises: {:?}", c.points());
        assert_eq!(c.points().last(), Some(&(1.0, 1.0)));
    }
}
