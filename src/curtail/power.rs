//! The power model: how many watts a miner draws and how efficient it is,
//! each figure with where it came from.

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

pub use crate::units::{HashesPerSec, JoulesPerTh, Watts};

/// A miner model's nameplate figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// Nominal hashrate in TH/s.
    pub th_s: f64,
    /// Nominal power in watts.
    pub watts: f64,
}

impl ModelSpec {
    pub fn efficiency(&self) -> JoulesPerTh {
        JoulesPerTh(self.watts / self.th_s)
    }
}

/// Common models, overridable by `[[curtail.model]]` entries of the same name.
pub fn builtin_models() -> Vec<ModelSpec> {
    [
        ("S19j Pro", 104.0, 3068.0),
        ("S19 XP", 140.0, 3010.0),
        ("S21", 200.0, 3500.0),
        ("S21 Pro", 234.0, 3510.0),
        ("S21 XP", 270.0, 3645.0),
        ("M60S", 186.0, 3441.0),
    ]
    .into_iter()
    .map(|(n, th, w)| ModelSpec { name: n.into(), th_s: th, watts: w })
    .collect()
}

pub use crate::api::{EfficiencySource, WattsSource};

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
}

/// The resolved power model. Matching is done once per miner (on connect),
/// so [`PowerModel::rule_for`] returns an index the caller keeps.
#[derive(Debug, Clone)]
pub struct PowerModel {
    rules: Vec<(WildMatch, PowerRule, Option<ModelSpec>)>,
    pub default_watts: Watts,
    pub default_j_per_th: JoulesPerTh,
}

impl PowerModel {
    pub fn new(
        rules: &[PowerRule],
        extra_models: &[ModelSpec],
        default_watts: f64,
        default_j_per_th: f64,
    ) -> Result<Self, String> {
        let mut table = builtin_models();
        for m in extra_models {
            table.retain(|t| !t.name.eq_ignore_ascii_case(&m.name));
            table.push(m.clone());
        }
        let mut out = Vec::new();
        for r in rules {
            let model = match &r.model {
                Some(name) => Some(
                    table
                        .iter()
                        .find(|t| t.name.eq_ignore_ascii_case(name))
                        .cloned()
                        .ok_or_else(|| format!("unknown model {name:?} in rule {:?}", r.pattern))?,
                ),
                None => None,
            };
            out.push((WildMatch::new(&r.pattern), r.clone(), model));
        }
        Ok(PowerModel {
            rules: out,
            default_watts: Watts(default_watts),
            default_j_per_th: JoulesPerTh(default_j_per_th),
        })
    }

    /// The model name a rule names, if any.
    pub fn model_of(&self, rule: usize) -> Option<&str> {
        self.rules.get(rule).and_then(|(_, _, m)| m.as_ref()).map(|m| m.name.as_str())
    }

    /// Index of the first rule matching this worker.
    pub fn rule_for(&self, worker: &str) -> Option<usize> {
        self.rules.iter().position(|(p, _, _)| p.matches(worker))
    }

    /// Estimate watts and efficiency: firmware first, then the config rule,
    /// then the defaults.
    pub fn estimate(&self, rule: Option<usize>, measured: HashesPerSec, fw: Option<FirmwareReading>) -> Estimate {
        let rule = rule.and_then(|i| self.rules.get(i));
        let cfg_eff = rule.and_then(|(_, r, m)| {
            r.j_per_th
                .map(|j| (JoulesPerTh(j), EfficiencySource::Config))
                .or(m.as_ref().map(|m| (m.efficiency(), EfficiencySource::ConfigModel)))
        });
        if let Some(f) = fw.filter(|f| f.watts > Watts::ZERO) {
            let (j, src) = if f.hashrate_hs > HashesPerSec::ZERO {
                (f.watts / f.hashrate_hs, EfficiencySource::Firmware)
            } else {
                cfg_eff.unwrap_or((self.default_j_per_th, EfficiencySource::Default))
            };
            return Estimate {
                watts: f.watts,
                watts_source: WattsSource::Firmware,
                j_per_th: j,
                efficiency_source: src,
            };
        }
        let (j, esrc) = cfg_eff.unwrap_or((self.default_j_per_th, EfficiencySource::Default));
        let (watts, wsrc) = match rule {
            Some((_, r, _)) if r.watts.is_some() => (Watts(r.watts.unwrap_or_default()), WattsSource::ConfigFixed),
            Some(_) if cfg_eff.is_some() && measured > HashesPerSec::ZERO => {
                (j * measured, WattsSource::ConfigEfficiency)
            }
            Some((_, _, Some(m))) => (Watts(m.watts), WattsSource::ConfigModel),
            _ => (self.default_watts, WattsSource::Default),
        };
        Estimate { watts, watts_source: wsrc, j_per_th: j, efficiency_source: esrc }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> PowerModel {
        let rules = vec![
            PowerRule { pattern: "s19.*".into(), model: Some("S19j Pro".into()), ..Default::default() },
            PowerRule { pattern: "fixed.*".into(), watts: Some(1234.0), j_per_th: Some(20.0), ..Default::default() },
            PowerRule { pattern: "eff.*".into(), j_per_th: Some(25.0), ..Default::default() },
        ];
        PowerModel::new(&rules, &[ModelSpec { name: "S21".into(), th_s: 100.0, watts: 3000.0 }], 3250.0, 30.0).unwrap()
    }

    #[test]
    fn sources_in_order() {
        let m = model();
        let fw = FirmwareReading { watts: Watts(3300.0), hashrate_hs: HashesPerSec(110e12) };
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec::ZERO, Some(fw));
        assert_eq!(
            (e.watts, e.watts_source, e.efficiency_source),
            (Watts(3300.0), WattsSource::Firmware, EfficiencySource::Firmware)
        );
        assert!((e.j_per_th.0 - 30.0).abs() < 1e-9);
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec::ZERO, None);
        assert_eq!((e.watts, e.watts_source), (Watts(3068.0), WattsSource::ConfigModel));
        assert!((e.j_per_th.0 - 3068.0 / 104.0).abs() < 1e-9);
        // Measured 104 TH/s at the model's efficiency: its nameplate watts.
        let e = m.estimate(m.rule_for("s19.1"), HashesPerSec(104e12), None);
        assert_eq!(e.watts_source, WattsSource::ConfigEfficiency);
        assert!((e.watts.0 - 3068.0).abs() < 1e-6);
        let e = m.estimate(m.rule_for("fixed.1"), HashesPerSec(5e12), None);
        assert_eq!((e.watts, e.watts_source, e.j_per_th), (Watts(1234.0), WattsSource::ConfigFixed, JoulesPerTh(20.0)));
        let e = m.estimate(m.rule_for("eff.1"), HashesPerSec(2e12), None);
        assert_eq!((e.watts, e.watts_source), (Watts(50.0), WattsSource::ConfigEfficiency));
        let e = m.estimate(m.rule_for("other"), HashesPerSec(2e12), None);
        assert_eq!(
            (e.watts, e.watts_source, e.efficiency_source),
            (Watts(3250.0), WattsSource::Default, EfficiencySource::Default)
        );
    }

    #[test]
    fn builtin_table_and_overrides() {
        let t = builtin_models();
        assert_eq!(t.len(), 6);
        let best = t.iter().min_by(|a, b| a.efficiency().0.total_cmp(&b.efficiency().0)).unwrap();
        assert_eq!(best.name, "S21 XP");
        let rule = [PowerRule { pattern: "*".into(), model: Some("s21".into()), ..Default::default() }];
        let r = PowerModel::new(&rule, &[], 1.0, 1.0).unwrap();
        assert_eq!(r.estimate(Some(0), HashesPerSec::ZERO, None).watts, Watts(3500.0));
        let over = [ModelSpec { name: "S21".into(), th_s: 100.0, watts: 3000.0 }];
        let r = PowerModel::new(&rule, &over, 1.0, 1.0).unwrap();
        assert_eq!(
            r.estimate(Some(0), HashesPerSec::ZERO, None).watts,
            Watts(3000.0),
            "a config model overrides the built-in one"
        );
        assert!(PowerModel::new(
            &[PowerRule { pattern: "*".into(), model: Some("S9".into()), ..Default::default() }],
            &[],
            1.0,
            1.0
        )
        .is_err());
    }
}
