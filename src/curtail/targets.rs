//! Partial power as pure functions: for every miner in a budget's scope,
//! full power, a lower power target, or parked, to keep the most hashrate
//! within the budget.
//!
//! A miner's hashrate against its power is a [`Curve`]. Going down from
//! full power, each step costs hashrate per watt saved; parking is the last
//! step (from the lowest target to the idle draw, all or nothing). On the
//! curve's upper concave hull those costs rise step by step, so taking the
//! cheapest steps of the whole fleet first, in order, is the best split of
//! a budget (a fractional knapsack): a miner is lowered while its hashrate
//! falls less per watt saved than another's would, and parked where even
//! its lowest target keeps less per watt than parking it saves. A miner
//! without a curve (parked by the network, a hook, or firmware without
//! targets) has the one step, parking, and the rule is the parking
//! policy's: least efficient first.

use crate::units::Watts;

/// Hashrate against power, relative to full: points (fraction of full
/// power, fraction of full hashrate), ascending, ending at (1, 1). Between
/// points, straight lines; below the first, no target (the envelope's
/// floor).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    points: Vec<(f64, f64)>,
}

impl Curve {
    /// A curve from measured points (fraction of full power, fraction of
    /// full hashrate); (1, 1) is added. Each must be inside (0, 1], and
    /// hashrate must rise with power.
    pub fn new(points: &[(f64, f64)]) -> Result<Curve, String> {
        let mut p: Vec<(f64, f64)> = points.iter().copied().filter(|&(x, _)| x != 1.0).collect();
        for &(x, h) in &p {
            if !(x > 0.0 && x < 1.0 && h > 0.0 && h <= 1.0) {
                return Err(format!(
                    "point ({x}, {h}): power and hashrate must be fractions of full, power in (0, 1), hashrate in (0, 1]"
                ));
            }
        }
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p.push((1.0, 1.0));
        if p.windows(2).any(|w| w[0].0 == w[1].0 || w[1].1 < w[0].1) {
            return Err("hashrate must rise with power, one point per power".into());
        }
        Ok(Curve { points: p })
    }

    /// Hashrate in proportion to power down to `min` of full: what a miner
    /// of unknown curve is planned on, so a target never looks better than
    /// it is.
    pub fn proportional(min: f64) -> Curve {
        let min = min.clamp(0.01, 1.0);
        let mut points = vec![(min, min)];
        if min < 1.0 {
            points.push((1.0, 1.0));
        }
        Curve { points }
    }

    /// The same curve with its floor raised to `min` (the firmware's
    /// envelope): points below go, and one is put at `min`.
    pub fn floor(&self, min: f64) -> Curve {
        if min <= self.min() {
            return self.clone();
        }
        let min = min.min(1.0);
        let mut points = vec![(min, self.hashrate(min).unwrap_or(min))];
        points.extend(self.points.iter().copied().filter(|&(x, _)| x > min));
        Curve { points }
    }

    /// The lowest power fraction it can be set to.
    pub fn min(&self) -> f64 {
        self.points[0].0
    }

    /// The hashrate fraction at power fraction `p`; none below the floor.
    pub fn hashrate(&self, p: f64) -> Option<f64> {
        if p < self.min() - 1e-12 {
            return None;
        }
        let p = p.min(1.0);
        let i = self.points.iter().position(|&(x, _)| x >= p).unwrap_or(self.points.len() - 1);
        if i == 0 {
            return Some(self.points[0].1);
        }
        let ((x0, h0), (x1, h1)) = (self.points[i - 1], self.points[i]);
        Some(h0 + (h1 - h0) * (p - x0) / (x1 - x0))
    }

    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }
}

/// What the planner knows of one miner.
#[derive(Debug, Clone, Copy)]
pub struct Unit<'a> {
    /// What it draws at full power (the target it had before sluice).
    pub full: Watts,
    /// Its hashrate then (any unit: only ratios matter).
    pub hashrate: f64,
    /// What it draws parked.
    pub idle: Watts,
    /// None: it can only be parked.
    pub curve: Option<&'a Curve>,
}

/// What a miner is set to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Setting {
    Full,
    /// A power target in whole watts, under full and at or above the floor.
    Target(Watts),
    Park,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub settings: Vec<Setting>,
    /// What the miners draw so set, and the hashrate they keep.
    pub drawn: Watts,
    pub hashrate: f64,
    pub met: bool,
}

impl Allocation {
    /// How many are parked, lowered, at full power.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.settings.iter().fold((0, 0, 0), |(p, l, f), s| match s {
            Setting::Park => (p + 1, l, f),
            Setting::Target(_) => (p, l + 1, f),
            Setting::Full => (p, l, f + 1),
        })
    }
}

/// One step down a miner's hull: from `hi` to `lo` (absolute watts and
/// hashrate). `divisible`: both ends are neighbouring points of the real
/// curve, so a target anywhere between keeps what the line says.
#[derive(Debug, Clone, Copy)]
struct Step {
    unit: u32,
    /// Its place on the miner's hull, from the top.
    k: u16,
    hi: (f64, f64),
    lo: (f64, f64),
    divisible: bool,
}

impl Step {
    fn saves(&self) -> f64 {
        self.hi.0 - self.lo.0
    }
    fn cost(&self) -> f64 {
        let s = self.saves();
        if s > 0.0 {
            (self.hi.1 - self.lo.1) / s
        } else {
            f64::INFINITY
        }
    }
}

/// A miner's steps down its upper concave hull, top first. Vertices:
/// (idle, 0) for parked, then the curve's points in absolute figures.
fn steps(n: u32, u: &Unit, out: &mut Vec<Step>) {
    if u.full <= u.idle || u.full.0 <= 0.0 {
        return;
    }
    // (watts, hashrate, index on the curve; None for the park point)
    let mut pts: Vec<(f64, f64, Option<usize>)> = vec![(u.idle.0, 0.0, None)];
    match u.curve {
        // Targets are whole watts: each point below full at the whole watt
        // at or above it (never under the floor), with its hashrate there.
        Some(c) => pts.extend(c.points().iter().enumerate().filter_map(|(i, &(x, h))| {
            let w = if x < 1.0 { (x * u.full.0).ceil().min(u.full.0) } else { u.full.0 };
            let h = if w < u.full.0 { c.hashrate(w / u.full.0).unwrap_or(h) } else { 1.0 };
            (w > u.idle.0).then_some((w, h * u.hashrate, Some(i)))
        })),
        None => pts.push((u.full.0, u.hashrate, Some(0))),
    }
    // Upper hull, by power ascending (monotone chain).
    let mut hull: Vec<(f64, f64, Option<usize>)> = Vec::with_capacity(pts.len());
    for p in pts {
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            // b is under the line from a to p: not on the upper hull.
            if (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0) >= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(p);
    }
    for (k, w) in hull.windows(2).rev().enumerate() {
        let (lo, hi) = (w[0], w[1]);
        let divisible = matches!((lo.2, hi.2), (Some(a), Some(b)) if b == a + 1);
        out.push(Step { unit: n, k: k as u16, hi: (hi.0, hi.1), lo: (lo.0, lo.1), divisible });
    }
}

/// The settings that keep the most hashrate with the miners drawing at
/// most `budget`, targets in whole watts. Steps are taken cheapest first;
/// where one cannot be split (parking) and would overshoot, two ways are
/// tried, taking it and passing over it for dearer steps that can, and
/// others park alone (both ways); each is then topped up from the watts
/// left (steps undone, dearest first, so a parked miner may come back at a
/// target): the one that keeps the most is kept. Not met only when every
/// miner parked still draws more.
pub fn allocate(units: &[Unit], budget: Watts) -> Allocation {
    let (all, order) = sorted_steps(units);
    let full: f64 = units.iter().map(|u| u.full.0.max(u.idle.0)).sum();
    let need = full - budget.0;
    // Parking alone: each miner's one step.
    let parking: Vec<Unit> = units.iter().map(|u| Unit { curve: None, ..*u }).collect();
    let (park_all, park_order) = sorted_steps(&parking);
    // Parking alone both ways, topped up with targets and without: a
    // top-up is greedy, and a target it gives can take the room a whole
    // miner would have used (proptest below: 432.2 TH/s where parking
    // alone kept 439.5). So a fleet with curves never keeps less than
    // parking alone would, by construction.
    let ways = [
        (&all, &order, false, (&all, &order)),
        (&all, &order, true, (&all, &order)),
        (&park_all, &park_order, false, (&all, &order)),
        (&park_all, &park_order, false, (&park_all, &park_order)),
        (&park_all, &park_order, true, (&park_all, &park_order)),
    ];
    ways.into_iter()
        .map(|(steps, by_cost, pass_over, (top, top_order))| {
            let mut at = take(units.len(), steps, by_cost, need, pass_over);
            let drawn = settle(units, &at).drawn;
            top_up(&mut at, units, top, top_order, budget.0 - drawn.0);
            let mut a = settle(units, &at);
            a.met = a.drawn.0 <= budget.0 + 1e-6;
            a
        })
        .max_by(|a, b| a.met.cmp(&b.met).then(a.hashrate.total_cmp(&b.hashrate)))
        .expect("five ways")
}

/// Every miner's steps, and their order: cheapest first (a miner's own in
/// hull order, as their costs rise).
fn sorted_steps(units: &[Unit]) -> (Vec<Step>, Vec<u32>) {
    let mut all = Vec::with_capacity(units.len() * 2);
    for (n, u) in units.iter().enumerate() {
        steps(n as u32, u, &mut all);
    }
    let cost: Vec<f64> = all.iter().map(Step::cost).collect();
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&all[a as usize], &all[b as usize]);
        cost[a as usize].total_cmp(&cost[b as usize]).then(x.unit.cmp(&y.unit)).then(x.k.cmp(&y.k))
    });
    (all, order)
}

/// Where each miner ends (its power; none: full) after taking steps,
/// cheapest first, until `need` watts are saved.
fn take(n: usize, all: &[Step], order: &[u32], mut need: f64, pass_over: bool) -> Vec<Option<f64>> {
    let (mut taken, mut stopped, mut at) = (vec![0u16; n], vec![false; n], vec![None; n]);
    let mut passed = Vec::new();
    for &i in order {
        if need <= 1e-9 {
            break;
        }
        let s = &all[i as usize];
        let u = s.unit as usize;
        if stopped[u] || taken[u] != s.k {
            continue;
        }
        if s.saves() <= need + 1e-9 || (!s.divisible && !pass_over) {
            need -= s.saves();
            taken[u] += 1;
            at[u] = Some(s.lo.0);
        } else if s.divisible {
            // Stop inside the step, at a whole watt at or under.
            let w = (s.hi.0 - need).floor().max(s.lo.0);
            need -= s.hi.0 - w;
            at[u] = Some(w);
            stopped[u] = true;
        } else {
            stopped[u] = true;
            passed.push(s);
        }
    }
    // Nothing dearer could meet it: the steps passed over, cheapest first.
    for s in passed {
        if need <= 1e-9 {
            break;
        }
        need -= s.saves();
        at[s.unit as usize] = Some(s.lo.0);
    }
    at
}

/// Spend `slack` watts undoing steps, dearest first (each miner's lowest
/// taken step is its dearest, so it goes back up in order); a step that
/// can be split is undone in part.
fn top_up(at: &mut [Option<f64>], units: &[Unit], all: &[Step], order: &[u32], mut slack: f64) {
    for &i in order.iter().rev() {
        if slack < 1.0 {
            return;
        }
        let s = &all[i as usize];
        let u = s.unit as usize;
        let Some(cur) = at[u] else { continue };
        if cur >= s.hi.0 - 1e-9 || cur < s.lo.0 - 1e-9 {
            continue;
        }
        let up = s.hi.0 - cur;
        if up <= slack + 1e-9 {
            slack -= up;
            at[u] = (s.hi.0 < units[u].full.0 - 1e-9).then_some(s.hi.0);
        } else if s.divisible {
            let w = (cur + slack).floor();
            slack -= w - cur;
            at[u] = Some(w);
        }
    }
}

/// The allocation where each miner is at `at`.
fn settle(units: &[Unit], at: &[Option<f64>]) -> Allocation {
    let mut out =
        Allocation { settings: Vec::with_capacity(units.len()), drawn: Watts::ZERO, hashrate: 0.0, met: false };
    for (u, a) in units.iter().zip(at) {
        let (setting, w, h) = match *a {
            None => (Setting::Full, u.full.0.max(u.idle.0), u.hashrate),
            Some(w) if w <= u.idle.0 + 1e-9 => (Setting::Park, u.idle.0, 0.0),
            Some(w) => {
                let c = u.curve.expect("only a curve has targets");
                (Setting::Target(Watts(w)), w, u.hashrate * c.hashrate(w / u.full.0).unwrap_or(0.0))
            }
        };
        out.settings.push(setting);
        out.drawn += Watts(w);
        out.hashrate += h;
    }
    out
}

/// Where one miner is now, for [`trade`].
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Parked, or drawing (mining, or waiting in the ramp).
    pub parked: bool,
    /// What it is counted at now (a change asked and not read back is
    /// counted at the higher of before and after).
    pub at: Watts,
    /// A change is in flight (a target asked, a resume or a raise
    /// queued): it is left alone until it lands.
    pub busy: bool,
    /// Parked within the hold time: not woken yet.
    pub held: bool,
}

/// One move of the trade towards an allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Move {
    Park,
    /// A lower target, at once (it only sheds).
    Lower(Watts),
    /// Wake a parked miner at this setting (Full or a target).
    Wake(Setting),
    /// Raise a mining miner to this setting (Full or a target).
    Raise(Setting),
}

/// The moves that take the miners from where they are (`now`) towards
/// `want`, never above the budget: every shed at once (parking, lowering:
/// a lowered miner is counted at its old draw until its firmware reads
/// back the new one), then growth (waking, raising: counted at the new
/// draw from the ask) only into `room`, the budget less what every miner
/// is counted at (and what the miners parked now stop drawing), most
/// hashrate per watt first. A target within
/// `deadband` of where a miner is stays as it is.
pub fn trade(units: &[Unit], now: &[Now], want: &[Setting], mut room: Watts, deadband: f64) -> Vec<(usize, Move)> {
    let watts = |u: &Unit, s: Setting| match s {
        Setting::Full => u.full.0,
        Setting::Target(w) => w.0,
        Setting::Park => u.idle.0,
    };
    let kept = |u: &Unit, w: f64| match u.curve {
        _ if w <= u.idle.0 => 0.0,
        Some(c) => u.hashrate * c.hashrate(w / u.full.0).unwrap_or(0.0),
        None => u.hashrate,
    };
    let mut moves = Vec::new();
    let mut grow: Vec<(f64, f64, usize, Move)> = Vec::new();
    for (i, ((u, n), &w)) in units.iter().zip(now).zip(want).enumerate() {
        if n.busy {
            continue;
        }
        let band = deadband.max(u.full.0 * 0.01);
        match (n.parked, w) {
            (false, Setting::Park) => {
                // Parked at once: what it stops drawing is room now.
                room.0 += n.at.0 - u.idle.0;
                moves.push((i, Move::Park));
            }
            (false, Setting::Target(t)) if t.0 < n.at.0 - band => moves.push((i, Move::Lower(t))),
            (false, _) if watts(u, w) > n.at.0 + band => {
                let cost = watts(u, w) - n.at.0;
                grow.push(((kept(u, watts(u, w)) - kept(u, n.at.0)) / cost, cost, i, Move::Raise(w)));
            }
            (true, Setting::Full | Setting::Target(_)) if !n.held => {
                let cost = watts(u, w) - u.idle.0;
                grow.push((kept(u, watts(u, w)) / cost.max(1e-9), cost, i, Move::Wake(w)));
            }
            _ => {}
        }
    }
    grow.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
    for (_, cost, i, m) in grow {
        if cost <= room.0 + 1e-9 {
            room.0 -= cost;
            moves.push((i, m));
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The S19k Pro on LuxOS's profiles (the built-in table's curve).
    fn s19k() -> Curve {
        Curve::new(&[(0.785, 0.830), (0.593, 0.661), (0.425, 0.491)]).unwrap()
    }

    fn unit(full: f64, hashrate: f64, idle: f64, curve: Option<&Curve>) -> Unit<'_> {
        Unit { full: Watts(full), hashrate, idle: Watts(idle), curve }
    }

    #[test]
    fn curves_refuse_what_cannot_be_and_read_between_points() {
        for bad in
            [&[(0.0, 0.5)][..], &[(0.5, 0.0)], &[(1.2, 0.9)], &[(0.5, 0.6), (0.7, 0.5)], &[(0.5, 0.6), (0.5, 0.7)]]
        {
            assert!(Curve::new(bad).is_err(), "{bad:?}");
        }
        let c = s19k();
        assert_eq!(c.min(), 0.425);
        assert_eq!(c.hashrate(0.4), None, "under the floor");
        assert_eq!(c.hashrate(1.0), Some(1.0));
        assert!((c.hashrate(0.6).unwrap() - (0.661 + 0.169 * 0.007 / 0.192)).abs() < 1e-12);
        let f = c.floor(0.5);
        assert_eq!(f.min(), 0.5);
        assert!((f.hashrate(0.5).unwrap() - c.hashrate(0.5).unwrap()).abs() < 1e-12);
        assert_eq!(f.hashrate(0.7), c.hashrate(0.7));
        assert_eq!(Curve::proportional(0.5).hashrate(0.6), Some(0.6));
    }

    /// Tables: the budget, the miners, and the settings that keep the most.
    #[test]
    fn the_cheapest_watts_go_first() {
        let c = s19k();
        let flat = Curve::proportional(0.5);
        // A curve whose floor keeps little: parking saves more per
        // hashrate lost than its last step.
        let poor = Curve::new(&[(0.3, 0.1), (0.8, 0.85)]).unwrap();
        use Setting::*;
        let rows: Vec<(&str, f64, Vec<Unit>, Vec<Setting>)> = vec![
            ("room for all", 3000.0, vec![unit(1000.0, 100.0, 30.0, Some(&c)); 3], vec![Full; 3]),
            (
                // Each one's first step (to 78.5%) costs 0.79 of full's
                // hashrate per watt, the cheapest: all three take it, then
                // the second step splits.
                "three s19k at 70%",
                2100.0,
                vec![unit(1000.0, 100.0, 30.0, Some(&c)); 3],
                vec![Target(Watts(593.0)), Target(Watts(722.0)), Target(Watts(785.0))],
            ),
            (
                // Lowering the first to 60% would keep 86.7 of 120; parking
                // the inefficient one keeps 100.
                "a park-only miner that overshoots, taken when it keeps more",
                1600.0,
                vec![unit(1000.0, 100.0, 30.0, Some(&c)), unit(1000.0, 20.0, 30.0, None)],
                vec![Full, Park],
            ),
            (
                // Two miners of 1,000 W on the poor curve, budget 1,300 W:
                // its floor keeps too little, so one parks, and the other
                // goes back to full in the watts left.
                "park where even the lowest target is worse",
                1300.0,
                vec![unit(1000.0, 100.0, 30.0, Some(&poor)); 2],
                vec![Park, Full],
            ),
            (
                "below every floor: parked",
                100.0,
                vec![unit(1000.0, 100.0, 30.0, Some(&c)), unit(1000.0, 100.0, 30.0, Some(&flat))],
                vec![Park, Park],
            ),
            (
                // Parking the least efficient of two park-only miners
                // overshoots by 700 W; the lowered one takes the 300 W.
                "an overshooting park is passed over for a cheaper split",
                2700.0,
                vec![unit(1000.0, 50.0, 0.0, None), unit(1000.0, 100.0, 0.0, Some(&c)), unit(1000.0, 100.0, 0.0, None)],
                vec![Full, Target(Watts(700.0)), Full],
            ),
        ];
        for (name, budget, units, want) in rows {
            let a = allocate(&units, Watts(budget));
            assert_eq!(a.settings, want, "{name}");
            assert!(a.met && a.drawn.0 <= budget + 1e-6, "{name}: {:?}", a.drawn);
        }
    }

    /// The parking rule is the special case with no curves: least
    /// efficient first, and what parking saves is the watts less idle.
    #[test]
    fn without_curves_it_parks_as_the_policy_does() {
        let units: Vec<Unit> = [(1000.0, 50.0), (1000.0, 25.0), (1000.0, 40.0), (1000.0, 20.0)]
            .iter()
            .map(|&(w, th)| unit(w, th, 30.0, None))
            .collect();
        let a = allocate(&units, Watts(2100.0));
        use Setting::*;
        assert_eq!(a.settings, vec![Full, Park, Full, Park]);
        assert_eq!(a.drawn, Watts(2060.0));
        // 2,050: a third must go; 2,000 is not enough with its idle draw.
        let a = allocate(&units, Watts(2050.0));
        assert_eq!(a.counts(), (3, 0, 1));
        // Every miner parked still draws 120 W.
        let a = allocate(&units, Watts(100.0));
        assert_eq!((a.counts(), a.met, a.drawn), ((4, 0, 0), false, Watts(120.0)));
    }

    /// The figure: one model at 60% of its power keeps about 1.10x
    /// the hashrate parking keeps (more here: parked miners still draw).
    #[test]
    fn one_model_at_60_percent_keeps_the_curve_s_best() {
        let c = s19k();
        let n = 1000;
        let units = vec![unit(2760.0, 120.0, 2760.0 * 0.03, Some(&c)); n];
        let budget = Watts(2760.0 * n as f64 * 0.6);
        let with = allocate(&units, budget);
        let parked: Vec<Unit> = units.iter().map(|u| Unit { curve: None, ..*u }).collect();
        let without = allocate(&parked, budget);
        let best = 120.0 * n as f64 * c.hashrate(0.6).unwrap();
        assert!(with.met && without.met);
        assert!(with.hashrate >= best * 0.999, "{} of the best {best}", with.hashrate);
        let ratio = with.hashrate / without.hashrate;
        assert!((1.10..1.16).contains(&ratio), "{ratio}");
        assert_eq!(with.counts().0, 0, "no miner parked");
    }

    proptest::proptest! {
        /// Whatever the fleet and budget: met exactly when every miner
        /// parked fits; when met, drawn within the budget; targets in
        /// whole watts inside each miner's envelope; never less hashrate
        /// than parking alone keeps.
        #[test]
        fn allocations_hold_their_promises(
            fleet in proptest::collection::vec((500.0f64..4000.0, 10.0f64..300.0, 0.0f64..0.1, 0usize..3), 1..40),
            fraction in 0.0f64..1.1,
        ) {
            let curves = [None, Some(s19k()), Some(Curve::proportional(0.5))];
            let units: Vec<Unit> = fleet
                .iter()
                .map(|&(w, th, idle, c)| unit(w.round(), th, (w * idle).round(), curves[c].as_ref()))
                .collect();
            let full: f64 = units.iter().map(|u| u.full.0).sum();
            let floor: f64 = units.iter().map(|u| u.idle.0).sum();
            let budget = Watts((full * fraction).round());
            let a = allocate(&units, budget);
            proptest::prop_assert_eq!(a.met, floor <= budget.0);
            if a.met {
                proptest::prop_assert!(a.drawn.0 <= budget.0 + 1e-6, "{:?} over {:?}", a.drawn, budget);
            }
            for (u, s) in units.iter().zip(&a.settings) {
                if let Setting::Target(w) = s {
                    let c = u.curve.expect("a target needs a curve");
                    proptest::prop_assert!(w.0 == w.0.round() && w.0 < u.full.0 && w.0 >= c.min() * u.full.0 - 1e-9, "{w:?} of {u:?}");
                }
            }
            let parking: Vec<Unit> = units.iter().map(|u| Unit { curve: None, ..*u }).collect();
            let p = allocate(&parking, budget);
            proptest::prop_assert!(a.hashrate >= p.hashrate - 1e-9, "{} < parking's {}", a.hashrate, p.hashrate);
        }
    }

    /// The trade: sheds at once, growth only into the room, and a miner
    /// with a change in flight left alone.
    #[test]
    fn the_trade_sheds_at_once_and_grows_into_the_room() {
        let c = s19k();
        let u = unit(1000.0, 100.0, 30.0, Some(&c));
        let units = vec![u; 5];
        let now = |parked: bool, at: f64| Now { parked, at: Watts(at), busy: false, held: false };
        use Move::*;
        use Setting::*;
        // Three mining at full, two parked for the shed; the allocation
        // wants all five at 600 W.
        let state = vec![now(false, 1000.0), now(false, 1000.0), now(false, 1000.0), now(true, 30.0), now(true, 30.0)];
        let want = vec![Target(Watts(600.0)); 5];
        // No room: only the lowering goes out.
        let m = trade(&units, &state, &want, Watts(0.0), 5.0);
        assert_eq!(m, vec![(0, Lower(Watts(600.0))), (1, Lower(Watts(600.0))), (2, Lower(Watts(600.0)))]);
        // Two read back at 600: 800 W of room, one wake costs 570.
        let state = vec![
            now(false, 600.0),
            now(false, 600.0),
            Now { busy: true, ..now(false, 1000.0) },
            now(true, 30.0),
            now(true, 30.0),
        ];
        let m = trade(&units, &state, &want, Watts(800.0), 5.0);
        assert_eq!(m, vec![(3, Wake(Target(Watts(600.0))))]);
        // A held miner is not woken; one within the deadband not moved.
        let state = vec![
            now(false, 604.0),
            now(false, 600.0),
            now(false, 600.0),
            Now { held: true, ..now(true, 30.0) },
            now(true, 30.0),
        ];
        let m = trade(&units, &state, &want, Watts(1200.0), 5.0);
        assert_eq!(m, vec![(4, Wake(Target(Watts(600.0))))]);
        // The budget moves: a miner the allocation parks goes at once, and
        // its 570 W join the room; growth most hashrate per watt first: the
        // wake (100 for 970 W), the raise from the floor (50.9 for 575 W);
        // the other raises do not fit what is left.
        let want = vec![Full, Full, Target(Watts(800.0)), Setting::Park, Full];
        let state = vec![now(false, 600.0), now(false, 425.0), now(false, 600.0), now(false, 600.0), now(true, 30.0)];
        let m = trade(&units, &state, &want, Watts(1000.0), 5.0);
        assert_eq!(m, vec![(3, Move::Park), (4, Wake(Full)), (1, Raise(Full))]);
    }
}
