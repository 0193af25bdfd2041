//! The power model: how many watts a miner draws and how efficient it is,
//! each figure with where it came from.

use super::targets::Curve;
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

pub use crate::units::{HashesPerSec, JoulesPerTh, Watts};

/// A miner model's nameplate figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// Nominal hashrate in TH/s.
    pub th_s: f64,
    /// Nominal power in watts.
    pub watts: f64,
    /// What it draws parked (fans, control board, idle hashboards), where
    /// its firmware reports nothing asleep. None: `curtail.idle_fraction`
    /// of its watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_watts: Option<f64>,
    /// Measured points under full power, `[watts, th_s]` each: how its
    /// hashrate falls with a lower power target (`method = "power-target"`).
    /// None: the built-in table's, else hashrate in proportion to power.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<[f64; 2]>,
    /// The lowest power target its firmware takes. None: the curve's
    /// lowest point, else half its watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_watts: Option<f64>,
}

impl ModelSpec {
    pub fn efficiency(&self) -> JoulesPerTh {
        JoulesPerTh(self.watts / self.th_s)
    }

    /// Its hashrate against power (relative to full), floored at its
    /// envelope: the config's points, else the built-in table's, else in
    /// proportion to power down to half.
    pub fn curve(&self) -> Result<Curve, String> {
        let name = &self.name;
        let curve = if !self.curve.is_empty() {
            let rel: Vec<(f64, f64)> = self.curve.iter().map(|&[w, th]| (w / self.watts, th / self.th_s)).collect();
            Curve::new(&rel).map_err(|e| format!("model {name:?}: curve: {e}"))?
        } else if let Some(rel) = builtin_curve(name) {
            Curve::new(rel).expect("the built-in curves are valid")
        } else {
            Curve::proportional(DEFAULT_FLOOR)
        };
        Ok(match self.min_watts {
            Some(w) if !(w > 0.0 && w <= self.watts) => {
                return Err(format!("model {name:?}: min_watts {w} must be above 0 and at most its watts"))
            }
            Some(w) if w / self.watts < curve.min() => {
                // Lower than the points go: hashrate in proportion to power
                // from the lowest point (never better than it is).
                let (x, h) = curve.points()[0];
                let mut pts = vec![(w / self.watts, h * (w / self.watts) / x)];
                pts.extend(curve.points().iter().copied().filter(|p| p.0 < 1.0));
                Curve::new(&pts).map_err(|e| format!("model {name:?}: {e}"))?
            }
            Some(w) => curve.floor(w / self.watts),
            None => curve,
        })
    }
}

/// The lowest target of a model that says nothing of its envelope, as a
/// fraction of its watts.
pub const DEFAULT_FLOOR: f64 = 0.5;

/// Published hashrate against power, relative to full, for models whose
/// firmware sets a power target.
fn builtin_curve(model: &str) -> Option<&'static [(f64, f64)]> {
    const TABLE: &[(&str, &[(f64, f64)])] = &[
        // LuxOS preset profiles on the S19k Pro (Luxor's profile table as
        // quoted in sluice issue 23): 78.5% power keeps 83.0% hashrate,
        // 59.3% keeps 66.1%, 42.5% keeps 49.1% (22.9 -> 19.9 J/TH).
        ("S19k Pro", &[(0.785, 0.830), (0.593, 0.661), (0.425, 0.491)]),
        // Braiins OS autotuning on the S19 XP (as quoted in issue 23):
        // 78.8% power keeps 84.0%. Its floor is that point unless a
        // `[[curtail.model]]` gives min_watts.
        ("S19 XP", &[(0.788, 0.840)]),
    ];
    TABLE.iter().find(|(n, _)| n.eq_ignore_ascii_case(model)).map(|(_, c)| *c)
}

/// Common models, overridable by `[[curtail.model]]` entries of the same name.
pub fn builtin_models() -> Vec<ModelSpec> {
    [
        ("S19j Pro", 104.0, 3068.0),
        ("S19k Pro", 120.0, 2760.0),
        ("S19 XP", 140.0, 3010.0),
        ("S21", 200.0, 3500.0),
        ("S21 Pro", 234.0, 3510.0),
        ("S21 XP", 270.0, 3645.0),
        ("M60S", 186.0, 3441.0),
    ]
    .into_iter()
    // No idle figures: no maker publishes what these draw paused, so
    // their parked draw is `curtail.idle_fraction` of their watts unless a
    // `[[curtail.model]]` of the same name gives `idle_watts`.
    .map(|(n, th, w)| ModelSpec {
        name: n.into(),
        th_s: th,
        watts: w,
        idle_watts: None,
        curve: Vec::new(),
        min_watts: None,
    })
    .collect()
}

pub use crate::api::{EfficiencySource, IdleSource, WattsSource};

/// One `[[curtail.power]]` rule: which workers, and what we know of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRule {
    /// Glob on the worker name (`*` and `?`).
    pub pattern: String,
    /// A model from the table (built-in or `[[curtail.model]]`).
    pub model: Option<String>,
    /// J/TH, multiplied by the hashrate measured from the miner's shares.
    pub j_per_th: Option<f64>,
    /// Fixed watts, whatever the hashrate.
    pub watts: Option<f64>,
}

/// What a firmware hook read back from the miner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirmwareReading {
    pub watts: Watts,
    pub hashrate_hs: HashesPerSec,
}

/// A miner's estimated power and efficiency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub watts: Watts,
    pub watts_source: WattsSource,
    pub j_per_th: JoulesPerTh,
    pub efficiency_source: EfficiencySource,
    /// What it draws parked (never more than `watts`).
    pub idle: Watts,
    pub idle_source: IdleSource,
}

impl Estimate {
    /// Scale the watts, drawn and parked (the meter's calibration).
    pub fn scale(&mut self, k: f64) {
        self.watts *= k;
        self.idle *= k;
    }
}

/// The resolved power model. Matching is done once per miner (on connect),
/// so [`PowerModel::rule_for`] returns an index the caller keeps.
#[derive(Debug, Clone)]
pub struct PowerModel {
    rules: Vec<(WildMatch, PowerRule, Option<ModelSpec>)>,
    pub default_watts: Watts,
    pub default_j_per_th: JoulesPerTh,
    /// A parked miner's draw as a fraction of its watts, where neither
    /// its firmware nor its model says.
    pub idle_fraction: f64,
}

impl PowerModel {
    /// The model of a `[curtail]` table.
    pub fn from_config(c: &super::CurtailConfig) -> Result<Self, String> {
        Self::new(&c.power, &c.model, c.default_watts, c.default_j_per_th, c.idle_fraction)
    }

    pub fn new(
        rules: &[PowerRule],
        extra_models: &[ModelSpec],
        default_watts: f64,
        default_j_per_th: f64,
        idle_fraction: f64,
    ) -> Result<Self, String> {
        let mut table = builtin_models();
        for m in extra_models {
            if !(m.watts > 0.0 && m.th_s > 0.0) {
                return Err(format!("model {:?}: watts and th_s must be above 0", m.name));
            }
            m.curve()?;
            table.retain(|t| !t.name.eq_ignore_ascii_case(&m.name));
            table.push(m.clone());
        }
        let mut out = Vec::new();
        for r in rules {
            let model = match &r.model {
                Some(name) => {
                    Some(table.iter().find(|t| t.name.eq_ignore_ascii_case(name)).cloned().ok_or_else(|| {
                        let known: Vec<&str> = table.iter().map(|t| t.name.as_str()).collect();
                        format!(
                            "unknown model {name:?} in rule {:?}; the models are {} (or add a [[curtail.model]])",
                            r.pattern,
                            known.join(", ")
                        )
                    })?)
                }
                None => None,
            };
            out.push((WildMatch::new(&r.pattern), r.clone(), model));
        }
        Ok(PowerModel {
            rules: out,
            default_watts: Watts(default_watts),
            default_j_per_th: JoulesPerTh(default_j_per_th),
            idle_fraction,
        })
    }

    /// The model name a rule names, if any.
    pub fn model_of(&self, rule: usize) -> Option<&str> {
        self.rules.get(rule).and_then(|(_, _, m)| m.as_ref()).map(|m| m.name.as_str())
    }

    /// The nameplate hashrate (TH/s) of the model a rule names, if any.
    pub fn th_s_of(&self, rule: usize) -> Option<f64> {
        self.rules.get(rule).and_then(|(_, _, m)| m.as_ref()).map(|m| m.th_s)
    }

    /// A miner's hashrate against power: its model's curve, else in
    /// proportion to power down to half.
    pub fn curve_of(&self, rule: Option<usize>) -> Curve {
        let model = rule.and_then(|r| self.rules.get(r)).and_then(|(_, _, m)| m.as_ref());
        model.and_then(|m| m.curve().ok()).unwrap_or_else(|| Curve::proportional(DEFAULT_FLOOR))
    }

    /// Index of the first rule matching this worker.
    pub fn rule_for(&self, worker: &str) -> Option<usize> {
        self.rules.iter().position(|(p, _, _)| p.matches(worker))
    }

    /// Estimate watts and efficiency: firmware first, then the config rule,
    /// then the defaults. The parked draw: what the firmware read back
    /// asleep (`fw_idle`), else the model's `idle_watts`, else
    /// `idle_fraction` of the watts; never more than the watts.
    /// A mining miner's firmware read-back is what it draws, from this
    /// share of what its rule says on: one under it is a miner not hashing
    /// (paused or throttled by hand, a firmware that reads wrong) that may
    /// be woken at any moment. It counts at its rule (sim-check seed 1146:
    /// a miner paused by hand read 109 W, counted so, and woken by hand drew
    /// 3,645 W uncounted).
    pub fn estimate(
        &self,
        rule: Option<usize>,
        measured: HashesPerSec,
        fw: Option<FirmwareReading>,
        fw_idle: Option<Watts>,
    ) -> Estimate {
        let rule = rule.and_then(|i| self.rules.get(i));
        let mut e = self.drawing(rule, measured, fw);
        let model_idle = rule.and_then(|(_, _, m)| m.as_ref()).and_then(|m| m.idle_watts);
        (e.idle, e.idle_source) = match (fw_idle.filter(|w| *w > Watts::ZERO), model_idle) {
            (Some(w), _) => (w, IdleSource::Firmware),
            (None, Some(w)) => (Watts(w), IdleSource::ConfigModel),
            (None, None) => (e.watts * self.idle_fraction, IdleSource::Fraction),
        };
        e.idle = e.idle.min(e.watts);
        e
    }

    fn drawing(
        &self,
        rule: Option<&(WildMatch, PowerRule, Option<ModelSpec>)>,
        measured: HashesPerSec,
        fw: Option<FirmwareReading>,
    ) -> Estimate {
        let blank = |watts, watts_source, j_per_th, efficiency_source| Estimate {
            watts,
            watts_source,
            j_per_th,
            efficiency_source,
            idle: Watts::ZERO,
            idle_source: IdleSource::Fraction,
        };
        let cfg_eff = rule.and_then(|(_, r, m)| {
            r.j_per_th
                .map(|j| (JoulesPerTh(j), EfficiencySource::Config))
                .or(m.as_ref().map(|m| (m.efficiency(), EfficiencySource::ConfigModel)))
        });
        let (j, esrc) = cfg_eff.unwrap_or((self.default_j_per_th, EfficiencySource::Default));
        let (watts, wsrc) = match rule {
            Some((_, r, _)) if r.watts.is_some() => (Watts(r.watts.unwrap_or_default()), WattsSource::ConfigFixed),
            Some(_) if cfg_eff.is_some() && measured > HashesPerSec::ZERO => {
                (j * measured, WattsSource::ConfigEfficiency)
            }
            Some((_, _, Some(m))) => (Watts(m.watts), WattsSource::ConfigModel),
            _ => (self.default_watts, WattsSource::Default),
        };
        if let Some(f) = fw.filter(|f| f.watts > Watts::ZERO && f.watts >= watts * FW_TRUSTED_FROM) {
            let (j, src) = if f.hashrate_hs > HashesPerSec::ZERO {
                (f.watts / f.hashrate_hs, EfficiencySource::Firmware)
            } else {
                (j, esrc)
            };
            return blank(f.watts, WattsSource::Firmware, j, src);
        }
        blank(watts, wsrc, j, esrc)
    }
}

/// See [`PowerModel::estimate`].
const FW_TRUSTED_FROM: f64 = 0.5;

#[cfg(test)]
mod tests {
    use super::*;

    /// (read-back watts, watts counted, their source) for an S19j Pro
    /// (3,068 W by its model).
    #[test]
    fn a_read_back_far_under_the_rule_is_not_trusted() {
        let m = model();
        let table = [
            (3300.0, 3300.0, WattsSource::Firmware),
            (2900.0, 2900.0, WattsSource::Firmware),
            (1534.0, 1534.0, WattsSource::Firmware),
            (1533.0, 3068.0, WattsSource::ConfigModel),
            (109.0, 3068.0, WattsSource::ConfigModel),
        ];
        for (read, counted, source) in table {
            let fw = FirmwareReading { watts: Watts(read), hashrate_hs: HashesPerSec(1e12) };
            let e = m.estimate(m.rule_for("s19.1"), HashesPerSec::ZERO, Some(fw), None);
            assert_eq!((e.watts, e.watts_source), (Watts(counted), source), "read {read} W");
        }
    }

    fn model() -> PowerModel {
        let rules = vec![
            PowerRule { pattern: "s19.*".into(), model: Some("S19j Pro".into()), ..Default::default() },
            PowerRule { pattern: "fixed.*".into(), watts: Some(1234.0), j_per_th: Some(20.0), ..Default::default() },
            PowerRule { pattern: "eff.*".into(), j_per_th: Some(25.0), ..Default::default() },
        ];
        PowerModel::new(
            &rules,
            &[ModelSpec { name: "S21".into(), th_s: 100.0, watts: 3000.0, idle_watts: None, ..Default::default() }],
            3250.0,
            30.0,
            0.03,
        )
        .unwrap()
    }

    /// A model the table does not have: the error lists those it has.
    #[test]
    fn an_unknown_model_lists_the_known_ones() {
        let rule =
            |model: &str| vec![PowerRule { pattern: "x.*".into(), model: Some(model.into()), ..Default::default() }];
        let e = PowerModel::new(&rule("S19XP"), &[], 3250.0, 30.0, 0.03).unwrap_err();
        assert!(e.starts_with("unknown model \"S19XP\" in rule \"x.*\"; the models are S19j Pro, "), "{e}");
        assert!(e.contains("S19 XP") && e.contains("M60S"), "{e}");
        assert!(PowerModel::new(&rule("s19 xp"), &[], 3250.0, 30.0, 0.03).is_ok(), "any case");
    }

    #[test]
    fn sources_in_order() {
        let m = model();
        let fw = FirmwareReading { watts: Watts(3300.0), hashrate_hs: HashesPerSec(110e12) };
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec::ZERO, Some(fw), None);
        assert_eq!(
            (e.watts, e.watts_source, e.efficiency_source),
            (Watts(3300.0), WattsSource::Firmware, EfficiencySource::Firmware)
        );
        assert!((e.j_per_th.0 - 30.0).abs() < 1e-9);
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec::ZERO, None, None);
        assert_eq!((e.watts, e.watts_source), (Watts(3068.0), WattsSource::ConfigModel));
        assert!((e.j_per_th.0 - 3068.0 / 104.0).abs() < 1e-9);
        // Measured 104 TH/s at the model's efficiency: its nameplate watts.
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec(104e12), None, None);
        assert_eq!(e.watts_source, WattsSource::ConfigEfficiency);
        assert!((e.watts.0 - 3068.0).abs() < 1e-6);
        let e = m.estimate(m.rule_for("fixed.1"), HashesPerSec(5e12), None, None);
        assert_eq!((e.watts, e.watts_source, e.j_per_th), (Watts(1234.0), WattsSource::ConfigFixed, JoulesPerTh(20.0)));
        let e = m.estimate(m.rule_for("eff.1"), HashesPerSec(2e12), None, None);
        assert_eq!((e.watts, e.watts_source), (Watts(50.0), WattsSource::ConfigEfficiency));
        let e = m.estimate(m.rule_for("other"), HashesPerSec(2e12), None, None);
        assert_eq!(
            (e.watts, e.watts_source, e.efficiency_source),
            (Watts(3250.0), WattsSource::Default, EfficiencySource::Default)
        );
    }

    #[test]
    fn builtin_table_and_overrides() {
        let t = builtin_models();
        assert_eq!(t.len(), 7);
        let best = t.iter().min_by(|a, b| a.efficiency().0.total_cmp(&b.efficiency().0)).unwrap();
        assert_eq!(best.name, "S21 XP");
        let rule = [PowerRule { pattern: "*".into(), model: Some("s21".into()), ..Default::default() }];
        let r = PowerModel::new(&rule, &[], 1.0, 1.0, 0.0).unwrap();
        assert_eq!(r.estimate(Some(0), HashesPerSec::ZERO, None, None).watts, Watts(3500.0));
        let over =
            [ModelSpec { name: "S21".into(), th_s: 100.0, watts: 3000.0, idle_watts: None, ..Default::default() }];
        let r = PowerModel::new(&rule, &over, 1.0, 1.0, 0.0).unwrap();
        assert_eq!(
            r.estimate(Some(0), HashesPerSec::ZERO, None, None).watts,
            Watts(3000.0),
            "a config model overrides the built-in one"
        );
        assert!(PowerModel::new(
            &[PowerRule { pattern: "*".into(), model: Some("S9".into()), ..Default::default() }],
            &[],
            1.0,
            1.0,
            0.0
        )
        .is_err());
    }

    /// Where a parked miner's draw comes from: the firmware's read-back
    /// asleep, else its model's `idle_watts`, else the fraction; never
    /// more than it draws mining, and scaled with it by the calibration.
    #[test]
    fn idle_draw_sources_in_order() {
        let rules = vec![
            PowerRule { pattern: "xp.*".into(), model: Some("S19 XP".into()), ..Default::default() },
            PowerRule { pattern: "quiet.*".into(), model: Some("Quiet".into()), ..Default::default() },
            PowerRule { pattern: "tiny.*".into(), watts: Some(40.0), ..Default::default() },
        ];
        let quiet = ModelSpec {
            name: "Quiet".into(),
            th_s: 100.0,
            watts: 2000.0,
            idle_watts: Some(25.0),
            ..Default::default()
        };
        let m = PowerModel::new(
            &rules,
            &[
                quiet.clone(),
                ModelSpec {
                    idle_watts: Some(500.0),
                    watts: 45.0,
                    name: "Tiny".into(),
                    th_s: 1.0,
                    ..Default::default()
                },
            ],
            3250.0,
            30.0,
            0.03,
        )
        .unwrap();
        let e = |w: &str, fw_idle: Option<f64>| {
            let e = m.estimate(m.rule_for(w), HashesPerSec::ZERO, None, fw_idle.map(Watts));
            (e.idle.0, e.idle_source)
        };
        // (worker, read back asleep) -> (idle watts, source)
        let rows: &[(&str, Option<f64>, (f64, IdleSource))] = &[
            ("xp.1", None, (3010.0 * 0.03, IdleSource::Fraction)),
            ("xp.1", Some(120.0), (120.0, IdleSource::Firmware)),
            // A firmware that reads 0 W asleep reports its hashboards, not
            // the wall: not evidence.
            ("xp.1", Some(0.0), (3010.0 * 0.03, IdleSource::Fraction)),
            ("quiet.1", None, (25.0, IdleSource::ConfigModel)),
            ("quiet.1", Some(60.0), (60.0, IdleSource::Firmware)),
            ("other", None, (3250.0 * 0.03, IdleSource::Fraction)),
            ("tiny.1", Some(90.0), (40.0, IdleSource::Firmware)),
        ];
        for &(w, fw, want) in rows {
            let got = e(w, fw);
            assert!((got.0 - want.0).abs() < 1e-9 && got.1 == want.1, "{w} {fw:?}: {got:?} != {want:?}");
        }
        let mut est = m.estimate(m.rule_for("quiet.1"), HashesPerSec::ZERO, None, None);
        est.scale(1.1);
        assert!((est.watts.0 - 2200.0).abs() < 1e-9 && (est.idle.0 - 27.5).abs() < 1e-9);
    }

    /// A model's curve: its config points (absolute, read against its
    /// nameplate), else the built-in table's, else proportional to half;
    /// `min_watts` floors it, or extends it in proportion below its points.
    #[test]
    fn curves_from_config_the_table_or_the_default() {
        let spec = |curve: Vec<[f64; 2]>, min: Option<f64>| ModelSpec {
            name: "Rig".into(),
            th_s: 100.0,
            watts: 3000.0,
            curve,
            min_watts: min,
            ..Default::default()
        };
        let c = spec(vec![[2400.0, 88.0], [1800.0, 70.0]], None).curve().unwrap();
        assert_eq!(c.points(), &[(0.6, 0.7), (0.8, 0.88), (1.0, 1.0)]);
        let c = spec(vec![[2400.0, 88.0], [1800.0, 70.0]], Some(2100.0)).curve().unwrap();
        assert_eq!((c.min(), c.hashrate(0.7).map(|h| (h * 1e9).round() / 1e9)), (0.7, Some(0.79)));
        // Below its lowest point: in proportion from there.
        let c = spec(vec![[2400.0, 88.0], [1800.0, 70.0]], Some(1200.0)).curve().unwrap();
        assert_eq!(c.min(), 0.4);
        assert!((c.hashrate(0.4).unwrap() - 0.7 * 0.4 / 0.6).abs() < 1e-12);
        assert_eq!(spec(vec![], None).curve().unwrap(), Curve::proportional(DEFAULT_FLOOR));
        let k = builtin_models().into_iter().find(|m| m.name == "S19k Pro").unwrap().curve().unwrap();
        assert_eq!((k.min(), k.hashrate(0.593)), (0.425, Some(0.661)));
        // Errors name the model and the fault.
        for (bad, why) in [
            (spec(vec![[2400.0, 80.0], [1800.0, 90.0]], None), "rise"),
            (spec(vec![[3600.0, 110.0]], None), "fractions"),
            (spec(vec![], Some(4000.0)), "min_watts"),
        ] {
            let e = PowerModel::new(&[], &[bad], 1.0, 1.0, 0.0).unwrap_err();
            assert!(e.contains("\"Rig\"") && e.contains(why), "{e}");
        }
    }
}
