//! The measured-power loop's parts as the curtailment state holds them:
//! the meter and its source, the calibration factor, follow mode and its
//! feed, and when a firmware meter last asked for read-backs. The pure
//! rules are in [`super::closed_loop`]; this is what a reload keeps and
//! what status and the metrics show of them.

use super::closed_loop::{Calibration, Feed, FeedChange, Follow, FollowConfig, MeterConfig, Sample};
use super::feed::SourceKind;
use crate::api::{CalibrationStatus, FeedStatus, FollowStatus, Watts};
use std::time::{Duration, Instant};

/// Which feed a reading comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedId {
    /// `[curtail.meter]`: what the miners draw.
    Meter,
    /// `[curtail.follow.other_load]`: what the other tenant draws.
    OtherLoad,
}

impl FeedId {
    pub fn name(self) -> &'static str {
        match self {
            FeedId::Meter => "meter",
            FeedId::OtherLoad => "other_load",
        }
    }
}

/// A feed's figures for the metrics.
#[derive(Debug, Clone, Default)]
pub struct FeedFigures {
    pub name: &'static str,
    pub watts: Option<Watts>,
    pub stale: bool,
    pub errors: u64,
}

/// The meter and what it reads.
#[derive(Debug)]
struct Metered {
    feed: Feed,
    source: String,
    /// `kind = "firmware"`: the sum of the miners' read-backs, every
    /// `interval_s`; none for a meter that is read by its own task.
    firmware: Option<(Duration, Duration)>,
}

#[derive(Debug)]
pub struct Measured {
    meter: Option<Metered>,
    pub calibration: Calibration,
    pub follow: Option<Follow>,
    /// When a firmware meter last asked for read-backs.
    last_fw_read: Instant,
}

impl Measured {
    pub fn new(now: Instant) -> Measured {
        Measured {
            meter: None,
            calibration: Calibration::new(Duration::ZERO, false, now),
            follow: None,
            last_fw_read: now,
        }
    }

    /// The meter and follow mode of a config. A feed whose source is
    /// unchanged keeps its readings, the factor is kept while there is a
    /// meter (it goes back to 1 without one), and follow mode keeps the
    /// budget it set. The factor before, for the caller to rescale from.
    pub fn configure(&mut self, meter: Option<&MeterConfig>, follow: Option<&FollowConfig>, now: Instant) -> f64 {
        let factor = (self.calibration.factor, self.calibration.updated_ms);
        self.meter = meter.map(|m| {
            let source = m.source.describe();
            let firmware =
                (m.source.kind == Some(SourceKind::Firmware)).then(|| (m.interval_s.get(), m.stale_after_s.get()));
            let feed = match self.meter.take() {
                Some(old) if old.source == source => old.feed,
                _ => Feed::new(m.stale_after_s.get(), now),
            };
            Metered { feed, source, firmware }
        });
        self.calibration = match meter {
            Some(m) => Calibration::new(m.settle_s.get(), m.calibrate, now),
            None => Calibration::new(Duration::ZERO, false, now),
        };
        if meter.is_some() {
            (self.calibration.factor, self.calibration.updated_ms) = factor;
        }
        self.follow = follow.map(|f| {
            let mut new = Follow::new(f.clone(), now);
            if let Some(old) = self.follow.take() {
                new.budget_w = old.budget_w;
                if old.cfg.other_load == new.cfg.other_load {
                    new.feed = old.feed;
                }
            }
            new
        });
        factor.0
    }

    /// A read ended: what it changed of the feed's freshness.
    pub fn reading(&mut self, id: FeedId, r: Result<Sample, String>) -> Option<FeedChange> {
        match id {
            FeedId::Meter => self.meter.as_mut().and_then(|m| m.feed.on_reading(r)),
            FeedId::OtherLoad => self.follow.as_mut().and_then(|f| f.feed.on_reading(r)),
        }
    }

    /// Time passes: the feeds that went stale.
    pub fn check(&mut self, now: Instant) -> Vec<(FeedId, FeedChange)> {
        let meter = self.meter.as_mut().and_then(|m| m.feed.check(now)).map(|c| (FeedId::Meter, c));
        let other = self.follow.as_mut().and_then(|f| f.feed.check(now)).map(|c| (FeedId::OtherLoad, c));
        meter.into_iter().chain(other).collect()
    }

    /// The meter's last reading, if it is fresh.
    pub fn measured(&self) -> Option<Sample> {
        self.meter.as_ref().and_then(|m| m.feed.fresh())
    }

    /// What a feed reads, as configured ("" when it is not).
    pub fn source(&self, id: FeedId) -> String {
        match id {
            FeedId::Meter => self.meter.as_ref().map(|m| m.source.clone()),
            FeedId::OtherLoad => self.follow.as_ref().map(|f| f.cfg.other_load.describe()),
        }
        .unwrap_or_default()
    }

    /// A firmware meter whose interval has come: how young a read-back
    /// must be to count. None: no firmware meter, or not yet.
    pub fn firmware_due(&mut self, now: Instant) -> Option<Duration> {
        let (every, fresh_for) = self.meter.as_ref()?.firmware?;
        if now.saturating_duration_since(self.last_fw_read) < every {
            return None;
        }
        self.last_fw_read = now;
        Some(fresh_for)
    }

    /// The feeds configured, for the metrics.
    pub fn feeds(&self) -> Vec<FeedFigures> {
        let feed = |name, f: &Feed| FeedFigures {
            name,
            watts: f.fresh().map(|s| s.watts),
            stale: f.is_stale(),
            errors: f.errors,
        };
        let meter = self.meter.as_ref().map(|m| feed(FeedId::Meter.name(), &m.feed));
        meter.into_iter().chain(self.follow.as_ref().map(|f| feed(FeedId::OtherLoad.name(), &f.feed))).collect()
    }

    pub fn meter_status(&self) -> Option<FeedStatus> {
        self.meter.as_ref().map(|m| feed_status(&m.feed, &m.source))
    }

    pub fn calibration_status(&self) -> CalibrationStatus {
        CalibrationStatus { factor: self.calibration.factor, updated_at_ms: self.calibration.updated_ms }
    }

    /// `in_force`: follow mode sets the budget now.
    pub fn follow_status(&self, in_force: bool) -> Option<FollowStatus> {
        self.follow.as_ref().map(|f| FollowStatus {
            site_limit_w: f.cfg.site_limit_w,
            margin_w: f.cfg.margin_w,
            other_load: feed_status(&f.feed, &f.cfg.other_load.describe()),
            target_w: f.feed.fresh().map(|s| f.target(s.watts)),
            in_force,
            on_stale: match f.cfg.on_stale {
                super::closed_loop::OnStale::Hold => "hold".into(),
                super::closed_loop::OnStale::Shed => "shed".into(),
            },
        })
    }
}

fn feed_status(f: &Feed, source: &str) -> FeedStatus {
    FeedStatus {
        source: source.to_owned(),
        watts: f.last().map(|s| s.watts),
        at_ms: f.last().map(|s| s.unix_ms),
        stale: f.is_stale(),
        error: f.error().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curtail::feed::SourceConfig;

    fn prometheus(query: &str) -> SourceConfig {
        SourceConfig {
            kind: Some(SourceKind::Prometheus),
            url: "http://127.0.0.1:9090".into(),
            query: query.into(),
            ..SourceConfig::default()
        }
    }

    fn sample(t: Instant, watts: f64) -> Sample {
        Sample { watts: Watts(watts), at: t, unix_ms: 1 }
    }

    /// A reload keeps what still applies: a feed's readings while its source
    /// is the same, the factor while there is a meter, follow's budget.
    #[test]
    fn a_reload_keeps_what_still_applies() {
        let t0 = Instant::now();
        let meter = MeterConfig { source: prometheus("sum(hall)"), ..MeterConfig::default() };
        let follow =
            FollowConfig { site_limit_w: Watts(1e5), other_load: prometheus("sum(gpu)"), ..FollowConfig::default() };
        // (meter after the reload, follow after, meter reading kept,
        //  factor after, follow's budget kept, other load kept)
        let moved = MeterConfig { source: prometheus("sum(hall_b)"), ..MeterConfig::default() };
        let follow_moved = FollowConfig { other_load: prometheus("sum(gpu_b)"), ..follow.clone() };
        type Row<'a> = (Option<&'a MeterConfig>, Option<&'a FollowConfig>, bool, f64, bool, bool);
        let rows: &[Row] = &[
            (Some(&meter), Some(&follow), true, 1.2, true, true),
            (Some(&moved), Some(&follow_moved), false, 1.2, true, false),
            (None, None, false, 1.0, false, false),
        ];
        for (n, &(m2, f2, meter_kept, factor, budget_kept, other_kept)) in rows.iter().enumerate() {
            let mut s = Measured::new(t0);
            s.configure(Some(&meter), Some(&follow), t0);
            s.reading(FeedId::Meter, Ok(sample(t0, 50_000.0)));
            s.reading(FeedId::OtherLoad, Ok(sample(t0, 20_000.0)));
            s.calibration.factor = 1.2;
            s.follow.as_mut().unwrap().budget_w = Some(Watts(80_000.0));
            assert_eq!(s.configure(m2, f2, t0), 1.2, "row {n}: the factor before");
            assert_eq!(s.measured().is_some(), meter_kept, "row {n}");
            assert_eq!(s.calibration.factor, factor, "row {n}");
            let f = s.follow.as_ref();
            assert_eq!(f.is_some_and(|f| f.budget_w == Some(Watts(80_000.0))), budget_kept, "row {n}");
            assert_eq!(f.is_some_and(|f| f.feed.fresh().is_some()), other_kept, "row {n}");
        }
    }

    #[test]
    fn a_firmware_meter_is_due_every_interval_and_feeds_go_stale() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut m = Measured::new(t0);
        let fw = MeterConfig {
            source: SourceConfig { kind: Some(SourceKind::Firmware), ..SourceConfig::default() },
            interval_s: Duration::from_secs(5).into(),
            stale_after_s: Duration::from_secs(20).into(),
            ..MeterConfig::default()
        };
        m.configure(Some(&fw), None, t0);
        let due: Vec<bool> = [4, 5, 6, 9, 10].iter().map(|&t| m.firmware_due(s(t)).is_some()).collect();
        assert_eq!(due, [false, true, false, false, true]);
        assert_eq!(m.check(s(19)), vec![]);
        assert!(matches!(m.check(s(20)).as_slice(), [(FeedId::Meter, FeedChange::Stale { .. })]));
        assert_eq!(m.check(s(21)), vec![], "stale once, not at every check");
        let back = m.reading(FeedId::Meter, Ok(sample(s(22), 1.0)));
        assert!(matches!(back, Some(FeedChange::Recovered(_))));
        // A meter read by its own task is never due here.
        let mut p = Measured::new(t0);
        p.configure(Some(&MeterConfig { source: prometheus("x"), ..MeterConfig::default() }), None, t0);
        assert_eq!(p.firmware_due(s(60)), None);
    }
}
