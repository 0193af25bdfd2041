//! The closed loop on measured power, as pure types fed readings with the
//! time: a feed's freshness ([`Feed`]), the calibration of the estimates
//! against a meter and the correction when the meter stays over the budget
//! ([`Calibration`]), and the budget follow mode derives from the other
//! tenant's load ([`Follow`]). The curtailment state owns one of each that
//! is configured.

use super::feed::SourceConfig;
use crate::units::{Seconds, Watts};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn secs(s: u64) -> Seconds {
    Seconds::from_duration(Duration::from_secs(s))
}

/// `[curtail.meter]`: what the miners sluice controls really draw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MeterConfig {
    #[serde(flatten)]
    pub source: SourceConfig,
    /// Read every this often.
    pub interval_s: Seconds,
    /// No good reading for this long: the meter is stale, and plans and
    /// "met" fall back to estimates.
    pub stale_after_s: Seconds,
    /// Over the budget for this long (with no park or resume meanwhile):
    /// park more. Also how long the fleet must be unchanged before a reading
    /// recalibrates the estimates.
    pub settle_s: Seconds,
    /// Scale every miner's estimate by measured / estimated.
    pub calibrate: bool,
    /// Keys no field took (reported by `validate`; flatten and
    /// deny_unknown_fields do not mix).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            source: SourceConfig::default(),
            interval_s: secs(5),
            stale_after_s: secs(20),
            settle_s: secs(10),
            calibrate: true,
            unknown: BTreeMap::new(),
        }
    }
}

/// What follow mode does when the other load's feed goes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnStale {
    /// Keep the last budget (`stale_budget_w` if there was none yet).
    #[default]
    Hold,
    /// Go to `stale_budget_w`.
    Shed,
}

/// `[curtail.follow]`: the budget is what the site may draw, less the other
/// tenant's load and a margin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FollowConfig {
    pub site_limit_w: Watts,
    pub margin_w: Watts,
    pub interval_s: Seconds,
    pub stale_after_s: Seconds,
    pub on_stale: OnStale,
    pub stale_budget_w: Watts,
    pub other_load: SourceConfig,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig {
            site_limit_w: Watts::ZERO,
            margin_w: Watts::ZERO,
            interval_s: secs(5),
            stale_after_s: secs(20),
            on_stale: OnStale::Hold,
            stale_budget_w: Watts::ZERO,
            other_load: SourceConfig::default(),
        }
    }
}

/// Validate the meter and follow tables, naming the key at fault.
pub fn validate(meter: Option<&MeterConfig>, follow: Option<&FollowConfig>) -> Result<(), (&'static str, String)> {
    let positive = |k: &'static str, s: Seconds| {
        if s.get().is_zero() {
            Err((k, "must be > 0".to_owned()))
        } else {
            Ok(())
        }
    };
    if let Some(m) = meter {
        if let Some(k) = m.unknown.keys().next() {
            return Err(("curtail.meter", format!("unknown key {k:?}")));
        }
        m.source.validate("curtail.meter", true)?;
        positive("curtail.meter.interval_s", m.interval_s)?;
        if m.stale_after_s.get() < m.interval_s.get() {
            return Err(("curtail.meter.stale_after_s", "must be at least interval_s".into()));
        }
    }
    if let Some(f) = follow {
        if !(f.site_limit_w.is_finite() && f.site_limit_w > Watts::ZERO) {
            return Err(("curtail.follow.site_limit_w", format!("must be > 0, got {}", f.site_limit_w.0)));
        }
        for (k, v) in [("curtail.follow.margin_w", f.margin_w), ("curtail.follow.stale_budget_w", f.stale_budget_w)] {
            if !(v.is_finite() && v >= Watts::ZERO) {
                return Err((k, format!("must be >= 0, got {}", v.0)));
            }
        }
        positive("curtail.follow.interval_s", f.interval_s)?;
        if f.stale_after_s.get() < f.interval_s.get() {
            return Err(("curtail.follow.stale_after_s", "must be at least interval_s".into()));
        }
        f.other_load.validate("curtail.follow.other_load", false)?;
    }
    Ok(())
}

/// A reading taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub watts: Watts,
    pub at: Instant,
    pub unix_ms: u64,
}

/// A feed became stale or came back.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedChange {
    Stale { last: Option<Sample>, error: Option<String> },
    Recovered(Sample),
}

/// A feed's last reading, its last error, and whether it is stale.
#[derive(Debug, Clone)]
pub struct Feed {
    stale_after: Duration,
    /// From when a feed that never answered counts as stale.
    since: Instant,
    last: Option<Sample>,
    error: Option<String>,
    stale: bool,
    pub errors: u64,
}

impl Feed {
    pub fn new(stale_after: Duration, now: Instant) -> Feed {
        Feed { stale_after, since: now, last: None, error: None, stale: false, errors: 0 }
    }

    /// A read ended; a good one after a stale spell is a recovery.
    pub fn on_reading(&mut self, r: Result<Sample, String>) -> Option<FeedChange> {
        match r {
            Ok(s) => {
                self.last = Some(s);
                self.error = None;
                std::mem::take(&mut self.stale).then_some(FeedChange::Recovered(s))
            }
            Err(e) => {
                self.errors += 1;
                self.error = Some(e);
                None
            }
        }
    }

    /// Time passes: stale once no good reading is younger than `stale_after`.
    pub fn check(&mut self, now: Instant) -> Option<FeedChange> {
        let from = self.last.map_or(self.since, |s| s.at);
        if self.stale || now.saturating_duration_since(from) < self.stale_after {
            return None;
        }
        self.stale = true;
        Some(FeedChange::Stale { last: self.last, error: self.error.clone() })
    }

    /// The last reading, if the feed is not stale.
    pub fn fresh(&self) -> Option<Sample> {
        self.last.filter(|_| !self.stale)
    }
    pub fn last(&self) -> Option<Sample> {
        self.last
    }
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
    pub fn is_stale(&self) -> bool {
        self.stale
    }
}

/// What a meter reading changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Nothing to do.
    Keep,
    /// The factor moved: plan again with it.
    Recalibrated { factor: f64 },
    /// Over the budget for `settle_s` with nothing changing: the factor was
    /// raised so the next plan parks more.
    Corrected { factor: f64, over_w: Watts },
}

/// measured / estimated, kept within these (a factor outside them is a
/// meter that measures something else, not a fleet drawing off nameplate).
pub const FACTOR_RANGE: (f64, f64) = (0.5, 2.0);

/// The factor that scales every estimate to what the meter says.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub factor: f64,
    pub updated_ms: Option<u64>,
    settle: Duration,
    enabled: bool,
    /// When a miner in the meter's scope last started or stopped drawing.
    last_change: Instant,
    /// Since when the readings have been over the budget.
    over_since: Option<Instant>,
}

impl Calibration {
    pub fn new(settle: Duration, enabled: bool, now: Instant) -> Calibration {
        Calibration { factor: 1.0, updated_ms: None, settle, enabled, last_change: now, over_since: None }
    }

    /// A miner started or stopped drawing: the meter will lag it.
    /// (The latest time given counts: the caller may say it again.)
    pub fn fleet_changed(&mut self, now: Instant) {
        self.last_change = self.last_change.max(now);
    }

    /// A reading: `raw_w` is what the estimates (uncalibrated) say the
    /// miners drawing now draw; `budget_w` the site budget, if any.
    ///
    /// * Over the budget, and no change for `settle` since the first reading
    ///   over it: raise the factor to measured / raw (never lower it here),
    ///   so the next plan parks more; wait `settle` again before the next.
    /// * The fleet unchanged for `settle`: the factor is measured / raw.
    pub fn on_reading(&mut self, s: Sample, raw_w: Watts, budget_w: Option<Watts>) -> Verdict {
        let steady = s.at.saturating_duration_since(self.last_change) >= self.settle;
        let ratio = (raw_w >= Watts(1.0)).then(|| (s.watts / raw_w).clamp(FACTOR_RANGE.0, FACTOR_RANGE.1));
        match budget_w {
            Some(b) if s.watts > b => {
                let from = *self.over_since.get_or_insert(s.at);
                let waited = s.at.saturating_duration_since(from.max(self.last_change)) >= self.settle;
                if waited {
                    self.over_since = Some(s.at);
                    if let Some(r) = ratio.filter(|&r| r > self.factor) {
                        self.set(r, s.unix_ms);
                    }
                    // Raised or not (nothing raw to scale), the plan parks on.
                    return Verdict::Corrected { factor: self.factor, over_w: s.watts - b };
                }
            }
            _ => self.over_since = None,
        }
        match ratio {
            Some(r) if self.enabled && steady && (r - self.factor).abs() > 1e-3 => {
                self.set(r, s.unix_ms);
                Verdict::Recalibrated { factor: r }
            }
            _ => Verdict::Keep,
        }
    }

    fn set(&mut self, f: f64, unix_ms: u64) {
        self.factor = f;
        self.updated_ms = Some(unix_ms);
    }
}

/// Follow mode: the budget from the other tenant's load.
#[derive(Debug, Clone)]
pub struct Follow {
    pub cfg: FollowConfig,
    pub feed: Feed,
    /// The budget it last set (what `hold` keeps).
    pub budget_w: Option<Watts>,
    last_step: Option<Instant>,
}

impl Follow {
    pub fn new(cfg: FollowConfig, now: Instant) -> Follow {
        let feed = Feed::new(cfg.stale_after_s.get(), now);
        Follow { cfg, feed, budget_w: None, last_step: None }
    }

    /// The budget the other load leaves: limit - other - margin, at least 0.
    pub fn target(&self, other_w: Watts) -> Watts {
        (self.cfg.site_limit_w - other_w - self.cfg.margin_w).max(Watts::ZERO)
    }

    /// The budget now (None: none yet, the feed has not answered and is not
    /// yet stale). Down at once; up at most `ramp_w_per_s`.
    pub fn step(&mut self, now: Instant, ramp_w_per_s: f64) -> Option<Watts> {
        let dt = self.last_step.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.last_step = Some(now);
        let want = match self.feed.fresh() {
            Some(s) => self.target(s.watts),
            None if !self.feed.is_stale() => return self.budget_w,
            None => match (self.cfg.on_stale, self.budget_w) {
                (OnStale::Hold, Some(b)) => b,
                _ => self.cfg.stale_budget_w,
            },
        };
        let b = match self.budget_w {
            Some(b) if want > b => want.min(b + Watts(ramp_w_per_s * dt)),
            _ => want,
        };
        self.budget_w = Some(b);
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }
    fn sample(t0: Instant, s: f64, watts: f64) -> Sample {
        Sample { watts: Watts(watts), at: at(t0, s), unix_ms: (s * 1000.0) as u64 }
    }

    #[test]
    fn a_feed_goes_stale_and_recovers_once_each() {
        let t0 = Instant::now();
        let mut f = Feed::new(Duration::from_secs(20), t0);
        // Never answered: stale after stale_after from the start, once.
        assert_eq!(f.check(at(t0, 19.9)), None);
        assert!(matches!(f.check(at(t0, 20.0)), Some(FeedChange::Stale { last: None, .. })));
        assert_eq!(f.check(at(t0, 25.0)), None);
        assert_eq!(f.fresh(), None);
        // An error is kept, and is no recovery.
        assert_eq!(f.on_reading(Err("connection refused".into())), None);
        assert_eq!(f.error(), Some("connection refused"));
        let s = sample(t0, 26.0, 1000.0);
        assert_eq!(f.on_reading(Ok(s)), Some(FeedChange::Recovered(s)));
        assert_eq!(f.fresh(), Some(s));
        assert_eq!(f.on_reading(Ok(sample(t0, 31.0, 990.0))), None);
        // Errors alone do not make it stale before stale_after.
        f.on_reading(Err("timeout".into()));
        assert_eq!(f.check(at(t0, 50.9)), None);
        assert_eq!(f.fresh().map(|s| s.watts), Some(Watts(990.0)));
        match f.check(at(t0, 51.0)) {
            Some(FeedChange::Stale { last: Some(l), error: Some(e) }) => {
                assert_eq!((l.watts, e.as_str()), (Watts(990.0), "timeout"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.errors, 2);
    }

    #[test]
    fn calibration_and_correction() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(10);
        // (time s, fleet changed at this time?, measured W, raw W, budget W, verdict)
        type Row = (f64, bool, f64, f64, Option<f64>, Verdict);
        let table: [Row; 9] = [
            // The fleet changed at 0: no calibration for 10 s.
            (0.0, true, 11_000.0, 10_000.0, None, Verdict::Keep),
            (9.9, false, 11_000.0, 10_000.0, None, Verdict::Keep),
            // Steady: the factor is measured / raw.
            (10.0, false, 11_000.0, 10_000.0, None, Verdict::Recalibrated { factor: 1.1 }),
            (15.0, false, 11_000.0, 10_000.0, None, Verdict::Keep),
            // A plan parked at 20 (budget 6,600 W): the meter lags; over, but
            // not for settle_s since the change.
            (20.0, true, 11_000.0, 6_000.0, Some(6_600.0), Verdict::Keep),
            (25.0, false, 7_200.0, 6_000.0, Some(6_600.0), Verdict::Keep),
            // Still over at 30: settle_s since the change, corrected upward.
            (30.0, false, 7_200.0, 6_000.0, Some(6_600.0), Verdict::Corrected { factor: 1.2, over_w: Watts(600.0) }),
            // Parked more at 31; under now; steady at 41: recalibrated down.
            (31.0, true, 6_500.0, 5_400.0, Some(6_600.0), Verdict::Keep),
            (41.0, false, 5_940.0, 5_400.0, Some(6_600.0), Verdict::Recalibrated { factor: 1.1 }),
        ];
        let mut c = Calibration::new(settle, true, t0);
        for (s, changed, measured, raw, budget, want) in table {
            if changed {
                c.fleet_changed(at(t0, s));
            }
            let got = c.on_reading(sample(t0, s, measured), Watts(raw), budget.map(Watts));
            match (got, want) {
                (Verdict::Recalibrated { factor: a }, Verdict::Recalibrated { factor: b }) => {
                    assert!((a - b).abs() < 1e-9, "at {s}: {a} vs {b}")
                }
                (Verdict::Corrected { factor: a, over_w: x }, Verdict::Corrected { factor: b, over_w: y }) => {
                    assert!((a - b).abs() < 1e-9 && (x.0 - y.0).abs() < 1e-9, "at {s}: {got:?}")
                }
                _ => assert_eq!(got, want, "at {s}"),
            }
        }
        // Out of range, clamped; nothing drawing: left alone.
        let mut c = Calibration::new(settle, true, t0);
        assert_eq!(
            c.on_reading(sample(t0, 10.0, 50_000.0), Watts(10_000.0), None),
            Verdict::Recalibrated { factor: 2.0 }
        );
        assert_eq!(c.on_reading(sample(t0, 20.0, 400.0), Watts::ZERO, None), Verdict::Keep);
        // Disabled: corrections still raise it, steady readings do not move it.
        let mut c = Calibration::new(settle, false, t0);
        assert_eq!(c.on_reading(sample(t0, 10.0, 11_000.0), Watts(10_000.0), None), Verdict::Keep);
        assert_eq!(c.factor, 1.0);
    }

    #[test]
    fn follow_budget_moves_down_at_once_and_up_at_the_ramp() {
        let t0 = Instant::now();
        let cfg = FollowConfig {
            site_limit_w: Watts(100_000.0),
            margin_w: Watts(5_000.0),
            stale_after_s: secs(20),
            stale_budget_w: Watts(10_000.0),
            ..FollowConfig::default()
        };
        let mut f = Follow::new(cfg.clone(), t0);
        let ramp = 1_000.0;
        // No reading yet, not stale: no budget.
        assert_eq!(f.step(at(t0, 1.0), ramp), None);
        // (time, other load reading or None, expected budget)
        let table: [(f64, Option<f64>, f64); 7] = [
            (2.0, Some(20_000.0), 75_000.0),
            // Down at once.
            (7.0, Some(60_000.0), 35_000.0),
            // Up at most 1 kW/s: 5 s later, 40 kW.
            (12.0, Some(20_000.0), 40_000.0),
            (17.0, Some(20_000.0), 45_000.0),
            // Above the site limit: 0, never negative.
            (18.0, Some(120_000.0), 0.0),
            // No reading for 20 s: stale; hold keeps the last budget.
            (38.0, None, 0.0),
            (40.0, None, 0.0),
        ];
        for (s, other, want) in table {
            if let Some(w) = other {
                f.feed.on_reading(Ok(sample(t0, s, w)));
            }
            f.feed.check(at(t0, s));
            assert_eq!(f.step(at(t0, s), ramp), Some(Watts(want)), "at {s}");
        }
        // Shed: the stale budget.
        let mut f = Follow::new(FollowConfig { on_stale: OnStale::Shed, ..cfg.clone() }, t0);
        f.feed.on_reading(Ok(sample(t0, 1.0, 20_000.0)));
        assert_eq!(f.step(at(t0, 1.0), ramp), Some(Watts(75_000.0)));
        f.feed.check(at(t0, 21.0));
        assert_eq!(f.step(at(t0, 21.0), ramp), Some(Watts(10_000.0)));
        // Hold with no budget yet: the stale budget too.
        let mut f = Follow::new(cfg, t0);
        f.feed.check(at(t0, 20.0));
        assert_eq!(f.step(at(t0, 20.0), ramp), Some(Watts(10_000.0)));
    }

    #[test]
    fn config_is_checked() {
        use super::super::feed::SourceKind;
        let prom = SourceConfig {
            kind: Some(SourceKind::Prometheus),
            url: "http://127.0.0.1:9090".into(),
            query: "sum(DCGM_FI_DEV_POWER_USAGE)".into(),
            ..SourceConfig::default()
        };
        let follow = FollowConfig { site_limit_w: Watts(50e6), other_load: prom.clone(), ..FollowConfig::default() };
        let meter = MeterConfig { source: prom, ..MeterConfig::default() };
        assert_eq!(validate(Some(&meter), Some(&follow)), Ok(()));
        let table: [(Option<MeterConfig>, Option<FollowConfig>, &str); 5] = [
            (None, Some(FollowConfig { site_limit_w: Watts::ZERO, ..follow.clone() }), "curtail.follow.site_limit_w"),
            (None, Some(FollowConfig { margin_w: Watts(-1.0), ..follow.clone() }), "curtail.follow.margin_w"),
            (None, Some(FollowConfig { stale_after_s: secs(1), ..follow.clone() }), "curtail.follow.stale_after_s"),
            (Some(MeterConfig { interval_s: secs(0), ..meter.clone() }), None, "curtail.meter.interval_s"),
            (
                Some(MeterConfig { unknown: [("quey".to_owned(), serde::de::IgnoredAny)].into(), ..meter.clone() }),
                None,
                "curtail.meter",
            ),
        ];
        for (m, f, key) in table {
            assert_eq!(validate(m.as_ref(), f.as_ref()).unwrap_err().0, key);
        }
        // With the rest of the curtailment config: one budget source; a
        // firmware meter needs firmware miners; "follow" needs follow mode.
        use super::super::{CurtailConfig, LeaseFallback, ScheduleEntry};
        let sched = ScheduleEntry { from: "17:00".into(), to: "21:00".into(), fraction: Some(0.4), watts: None };
        let fw_meter = MeterConfig {
            source: SourceConfig { kind: Some(SourceKind::Firmware), ..SourceConfig::default() },
            ..MeterConfig::default()
        };
        let table: [(CurtailConfig, &str); 3] = [
            (
                CurtailConfig { follow: Some(follow.clone()), schedule: vec![sched], ..CurtailConfig::default() },
                "curtail.follow",
            ),
            (CurtailConfig { meter: Some(fw_meter), ..CurtailConfig::default() }, "curtail.meter.kind"),
            (
                CurtailConfig { lease_fallback: LeaseFallback::Follow, ..CurtailConfig::default() },
                "curtail.lease_fallback",
            ),
        ];
        for (c, key) in table {
            assert_eq!(c.validate().unwrap_err().0, key);
        }
    }
}
