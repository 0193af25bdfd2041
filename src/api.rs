//! What the control protocol carries, as types: the controller builds them,
//! the server serialises them at the edge, `sluice ctl`, the benches and the
//! workers API read them back. Units live in the types (`Watts`,
//! `JoulesPerTh`, `HashesPerSec`); the field names are the wire names of
//! proto/control-v1.md.

pub use crate::units::{HashesPerSec, JoulesPerTh, Watts};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A budget: watts, or a fraction of the watts of every miner in its
/// scope. One type for the protocol, the client, the state file and the
/// schedule, made only through [`Amount::new`] (serde calls it too), so
/// every amount anywhere is finite, at least 0, and a fraction at most 1.
/// On the wire: `{"watts": W}` or `{"fraction": F}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Watts(f64),
    Fraction(f64),
}

impl Amount {
    /// The rule, as errors say it.
    pub const RULE: &'static str = "give exactly one of watts (>= 0) or fraction (0..1)";

    pub fn new(watts: Option<f64>, fraction: Option<f64>) -> Result<Amount, String> {
        match (watts, fraction) {
            (Some(w), None) if w.is_finite() && w >= 0.0 => Ok(Amount::Watts(w)),
            (None, Some(f)) if (0.0..=1.0).contains(&f) => Ok(Amount::Fraction(f)),
            (Some(w), None) => Err(format!("watts must be a finite number >= 0, not {w}")),
            (None, Some(f)) => Err(format!("fraction must be from 0 to 1, not {f}")),
            _ => Err(Self::RULE.into()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Amount, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            watts: Option<f64>,
            fraction: Option<f64>,
        }
        let f = Fields::deserialize(d)?;
        Amount::new(f.watts, f.fraction).map_err(serde::de::Error::custom)
    }
}

/// `version`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub protocol: String,
    pub sluice: String,
}

/// `status`'s params.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusParams {
    /// List every miner (off by default: it can be 100k long).
    #[serde(default)]
    pub miners: bool,
}

/// The shortest lease a budget may have, in seconds: a plan is carried out
/// at the controller's next tick and reaches the miners with their next
/// word, so a lease must outlive that with room to spare. `set_budget`
/// refuses a shorter one and `sluice ctl budget --lease` says so.
pub const MIN_LEASE_S: f64 = 1.0;

/// The longest lease a budget may have, in seconds (30 days): a longer one
/// is a typing slip (`30M` is 30 months to a span parser), and a budget
/// meant to hold until changed takes no lease.
pub const MAX_LEASE_S: f64 = 30.0 * 86_400.0;

/// `set_budget`'s params: the amount (`watts` or `fraction`) beside the
/// other keys on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetBudget {
    #[serde(flatten)]
    pub amount: Amount,
    /// `site`, `group:NAME` or `workers:PATTERN`.
    pub scope: String,
    pub lease_s: Option<f64>,
    pub ramp_up_s: Option<f64>,
    pub dry_run: bool,
    pub reason: String,
    pub max_listed: Option<usize>,
}

impl SetBudget {
    /// A budget over the site, no lease, no ramp of its own, not a dry run.
    pub fn site(amount: Amount, reason: impl Into<String>) -> SetBudget {
        SetBudget {
            amount,
            scope: "site".into(),
            lease_s: None,
            ramp_up_s: None,
            dry_run: false,
            reason: reason.into(),
            max_listed: None,
        }
    }
}

impl<'de> Deserialize<'de> for SetBudget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SetBudget, D::Error> {
        // The amount's keys and the others in one object, every key known
        // (flatten and deny_unknown_fields do not mix in serde).
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            watts: Option<f64>,
            fraction: Option<f64>,
            scope: Option<String>,
            lease_s: Option<f64>,
            ramp_up_s: Option<f64>,
            #[serde(default)]
            dry_run: bool,
            #[serde(default)]
            reason: String,
            max_listed: Option<usize>,
        }
        let w = Wire::deserialize(d)?;
        Ok(SetBudget {
            amount: Amount::new(w.watts, w.fraction).map_err(serde::de::Error::custom)?,
            scope: w.scope.unwrap_or_else(|| "site".into()),
            lease_s: w.lease_s,
            ramp_up_s: w.ramp_up_s,
            dry_run: w.dry_run,
            reason: w.reason,
            max_listed: w.max_listed,
        })
    }
}

/// `resume_all`'s params.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeAll {
    #[serde(default)]
    pub reason: String,
}

/// What `set_protection` makes the workers a pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Never parked.
    Protected,
    /// Parked like any other miner.
    Curtailable,
}

/// `set_protection`'s params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetProtection {
    /// A worker-name glob.
    pub pattern: String,
    pub state: Protection,
}

/// What a hook is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookAction {
    Park,
    Resume,
    /// Only read what the firmware reports (a `kind = "firmware"` meter):
    /// one attempt, and never an event.
    Read,
    /// Set a power target (`method = "power-target"`), and wait until the
    /// firmware reads back at or under it.
    Target,
}

/// Where a miner's watts figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WattsSource {
    Firmware,
    ConfigFixed,
    ConfigEfficiency,
    ConfigModel,
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
/// Where a miner's J/TH figure comes from.
pub enum EfficiencySource {
    Firmware,
    Config,
    ConfigModel,
    Default,
}

/// Where a parked miner's draw figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleSource {
    /// Its firmware's read-back while asleep.
    Firmware,
    /// Its model's `idle_watts`.
    ConfigModel,
    /// `curtail.idle_fraction` of its watts.
    Fraction,
}

/// A miner's curtailment state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MinerState {
    Mining,
    /// Chosen for resumption, waiting for its turn in the ramp. Counts as
    /// drawing power, so a new plan does not resume more than fits.
    Resuming,
    Parked,
}

/// What happens when a `set_budget` lease runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseFallback {
    /// Keep the last budget in force (the safe choice for a site whose GPU
    /// load may still be high).
    #[default]
    Hold,
    /// Drop the budget and resume every parked miner at the ramp rate.
    Resume,
    /// Return to follow mode: what a lease that runs out does whenever
    /// `[curtail.follow]` is set, whatever this key says.
    Follow,
}

/// How a group's miners are parked and woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    #[default]
    Network,
    Firmware,
    Exec,
    Webhook,
    /// Firmware that also lowers its power target (partial power): parked
    /// and woken as `firmware`, and lowered where that keeps more hashrate.
    PowerTarget,
}

impl Method {
    /// Whether it speaks to the miner's own API (asic-rs).
    pub fn is_firmware(self) -> bool {
        matches!(self, Method::Firmware | Method::PowerTarget)
    }
}

/// A miner, as curtailment knows it: one per connection (two machines behind
/// one address with one worker name are two miners). The id is the proxy
/// session id of the connection it was first seen on; a parked miner that
/// reconnects keeps it. Unique within one run of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MinerId(pub u64);

impl std::fmt::Display for MinerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The plan and reason an event belongs to. `plan_id` is that of the plan
/// that decided it (a `set_budget`, a budget check that parked or resumed,
/// a `resume_all`, a `set_protection`); 0 for what no plan decided (a
/// state file that could not be read).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cause {
    pub plan_id: u64,
    pub reason: String,
}

/// Which miner: its id, and its worker name and source address as
/// attributes. Flattened into plans, rows and events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinerRef {
    pub miner: MinerId,
    pub worker: String,
    pub address: IpAddr,
}

impl std::fmt::Display for MinerRef {
    /// `#17 rig.0@192.0.2.5`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{} {}@{}", self.miner, self.worker, self.address)
    }
}

/// A miner as a plan lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedMiner {
    #[serde(flatten)]
    pub who: MinerRef,
    pub watts: Watts,
    pub watts_source: WattsSource,
    pub j_per_th: JoulesPerTh,
    pub efficiency_source: EfficiencySource,
}

/// Miners and watts in a budget's scope.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScopeFigures {
    pub mining: usize,
    pub parked: usize,
    pub watts: Watts,
}

/// The answer to `set_budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub plan_id: u64,
    pub dry_run: bool,
    pub scope: String,
    pub budget_w: Watts,
    pub before: ScopeFigures,
    pub expected: ScopeFigures,
    pub budget_met: bool,
    /// At most `max_listed` of each.
    pub park: Vec<PlannedMiner>,
    pub resume: Vec<PlannedMiner>,
    pub park_count: usize,
    pub resume_count: usize,
    pub lease_expires_in_s: Option<f64>,
    /// Parked miners the budget has room for that stay parked because of
    /// `curtail.hold_s` (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// With power-target miners in scope: how the budget is split between
    /// parking and lower targets (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<TargetsPlan>,
}

/// The split a plan aims at once its trade is done: miners parked, at a
/// lower power target and at full power, the hashrate they keep, and what
/// parking alone would keep (both from the models' curves, TH/s).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TargetsPlan {
    pub parked: usize,
    pub lowered: usize,
    pub full: usize,
    pub hashrate_ths: f64,
    pub parking_only_ths: f64,
}

/// Parked miners kept back by the hold time: how many, and when the last of
/// them may resume (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub miners: usize,
    pub until_ms: u64,
}

/// Counts and power of a set of miners (the site, a group).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Figures {
    pub connected: u64,
    pub mining: u64,
    pub parked: u64,
    /// What the mining miners draw.
    pub watts: Watts,
    /// What the parked ones still draw (fans, control boards, idle
    /// hashboards): the site draws `watts` + `parked_watts`.
    #[serde(default)]
    pub parked_watts: Watts,
    pub hashrate_hs: HashesPerSec,
    /// What every miner would draw mining.
    pub fleet_watts: Watts,
    /// The meter's last fresh reading (site only, with `[curtail.meter]`).
    #[serde(default)]
    pub measured_w: Option<Watts>,
    #[serde(default)]
    pub measured_at_ms: Option<u64>,
    #[serde(default)]
    pub measured_source: Option<String>,
}

/// What "met" was judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetBy {
    /// A fresh meter reading, over the site.
    Measured,
    /// The miners' estimates (no meter, a stale one, or a scope narrower
    /// than the meter's).
    Estimated,
}

/// A feed of measured watts (the meter, follow mode's other load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedStatus {
    pub source: String,
    /// The last good reading, and when it was taken.
    pub watts: Option<Watts>,
    pub at_ms: Option<u64>,
    /// No good reading for `stale_after_s`: not used.
    pub stale: bool,
    /// The last read's error, if it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// The factor every estimate is scaled by (measured / estimated).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStatus {
    pub factor: f64,
    /// When the meter last set it (none: never, the factor is 1).
    pub updated_at_ms: Option<u64>,
}

/// Follow mode's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowStatus {
    pub site_limit_w: Watts,
    pub margin_w: Watts,
    pub other_load: FeedStatus,
    /// site_limit - other load - margin, at least 0 (none while the feed is stale).
    pub target_w: Option<Watts>,
    /// Whether follow sets the budget now (false while a command overrides it).
    pub in_force: bool,
    /// `curtail.follow.on_stale`: what the budget does while the feed is
    /// stale (`hold` or `shed`).
    #[serde(default)]
    pub on_stale: String,
}

/// Where the budget in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetSource {
    /// No budget.
    None,
    Command,
    Schedule,
    /// A command's lease ran out and `lease_fallback = "hold"` kept it.
    LeaseFallback,
    /// The state file could not be read at start and `on_bad_state =
    /// "park-all"`: no curtailable miner gets work until a budget is set.
    BadState,
    /// Follow mode: site limit less the other load and the margin.
    Follow,
    /// Cluster mode: this instance's allotment of the site budget (the
    /// site's own budget is in `cluster.budget`).
    Cluster,
}

/// The budget in force (`source: none` and every other key null when there
/// is none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    pub source: BudgetSource,
    #[serde(default)]
    pub watts: Option<Watts>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub lease_expires_in_s: Option<f64>,
    /// None until the first check after a change.
    #[serde(default)]
    pub met: Option<bool>,
    #[serde(default)]
    pub met_by: Option<MetBy>,
    #[serde(default)]
    pub set_at_ms: Option<u64>,
}

impl BudgetStatus {
    pub const NONE: BudgetStatus = BudgetStatus {
        source: BudgetSource::None,
        watts: None,
        scope: None,
        reason: None,
        lease_expires_in_s: None,
        met: None,
        met_by: None,
        set_at_ms: None,
    };
}

/// One miner in `status` with `miners: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinerRow {
    #[serde(flatten)]
    pub who: MinerRef,
    pub group: String,
    pub state: MinerState,
    /// Since when it has been in `state` (Unix milliseconds).
    pub since_ms: u64,
    /// Connected now (a parked miner that left is remembered, so it stays
    /// parked when it comes back).
    pub connected: bool,
    pub model: Option<String>,
    pub protected: bool,
    pub watts: Watts,
    pub watts_source: WattsSource,
    pub j_per_th: JoulesPerTh,
    pub efficiency_source: EfficiencySource,
    /// What it draws parked, and where that figure comes from.
    pub idle_watts: Watts,
    pub idle_source: IdleSource,
    pub hook: Method,
    /// method = "power-target": the target sluice set (none: full power,
    /// as it was), what the firmware last read back, and why the firmware
    /// is no longer given targets (it refused one).
    #[serde(default)]
    pub target_w: Option<Watts>,
    #[serde(default)]
    pub firmware_w: Option<Watts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refused: Option<String>,
    /// method = "power-target": the envelope its firmware reported before
    /// its first target ([min, max] W, either null where it did not say),
    /// and its own target then (what it goes back to); absent until asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_w: Option<[Option<Watts>; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_w: Option<Watts>,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub site: Figures,
    pub groups: BTreeMap<String, Figures>,
    pub budget: BudgetStatus,
    /// Miners waiting for the ramp to resume them.
    pub resuming: usize,
    #[serde(default)]
    pub meter: Option<FeedStatus>,
    pub calibration: CalibrationStatus,
    #[serde(default)]
    pub follow: Option<FollowStatus>,
    #[serde(default)]
    pub miners: Option<Vec<MinerRow>>,
    /// Cluster mode: the site and a row per instance (null when standalone).
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
    /// Power-target models whose curve is learnt from read-backs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curves: Vec<CurveStatus>,
}

/// One model's curve as its miners read it back (`status.curves`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurveStatus {
    pub model: String,
    /// Each target read back often enough to count.
    pub learnt: Vec<CurvePoint>,
    /// The curve the trade plans on: [power, hashrate], fractions of full.
    pub in_use: Vec<[f64; 2]>,
}

/// As `ctl status` prints it.
impl std::fmt::Display for CurveStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "curve {} learnt:", self.model)?;
        for (k, p) in self.learnt.iter().enumerate() {
            write!(
                f,
                "{} {:.0}% power keeps {:.1}% (table {:.1}%, {} read-backs)",
                if k == 0 { "" } else { ";" },
                p.power * 100.0,
                p.hashrate * 100.0,
                p.table * 100.0,
                p.samples
            )?;
        }
        Ok(())
    }
}

/// A target the curve is learnt at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Fraction of full power.
    pub power: f64,
    /// The median read-back, fraction of full hashrate.
    pub hashrate: f64,
    /// What the model's table says there.
    pub table: f64,
    pub samples: usize,
}

/// `status`'s `cluster`: the site as this instance last read it from etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub site: String,
    pub instance: String,
    /// `planner` or `member`.
    pub role: String,
    pub planner: Option<String>,
    /// etcd answered within `lease_s`.
    pub etcd_reachable: bool,
    pub on_lost: String,
    /// The site budget (watts over the whole site; none: no budget).
    pub budget_w: Option<Watts>,
    pub budget_source: BudgetSource,
    pub budget_reason: Option<String>,
    /// Judged on the hall meter's fresh reading when there is one, else on
    /// the instances' reported draw.
    pub met: Option<bool>,
    /// The hall meter's last fresh reading, as the planner read it.
    pub measured_w: Option<Watts>,
    /// The site's calibration factor (the planner's; 1 without a meter).
    pub calibration_factor: f64,
    pub mining: usize,
    pub parked: usize,
    pub drawn_w: Watts,
    /// This instance's allotment (none: no limit).
    pub allotment_w: Option<Watts>,
    pub instances: Vec<InstanceRow>,
}

/// One instance of the site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub instance: String,
    pub planner: bool,
    /// What the planner granted it (none: no limit).
    pub allotment_w: Option<Watts>,
    /// What it enforces now.
    pub limit_w: Option<Watts>,
    pub drawn_w: Watts,
    pub mining: usize,
    pub parked: usize,
    /// Seconds since its report was written.
    pub seen_s_ago: f64,
}

/// The answer to `resume_all`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resuming {
    pub resuming: usize,
}

/// The answer to `set_protection`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Matched {
    pub matched: usize,
}

/// What the controller answers a request with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    Plan(Box<Plan>),
    Resuming(Resuming),
    Matched(Matched),
}

/// Something that happened, for `subscribe`rs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    PlanApplied {
        plan_id: u64,
        budget_w: Watts,
        scope: String,
        park_count: usize,
        resume_count: usize,
        expected_w: Watts,
        reason: String,
    },
    MinerParked {
        #[serde(flatten)]
        who: MinerRef,
        watts: Watts,
        hook: Method,
        #[serde(flatten)]
        cause: Cause,
    },
    MinerResumed {
        #[serde(flatten)]
        who: MinerRef,
        watts: Watts,
        hook: Method,
        #[serde(flatten)]
        cause: Cause,
    },
    /// A power target asked (none: back to full power, as it was).
    MinerTarget {
        #[serde(flatten)]
        who: MinerRef,
        from_w: Option<Watts>,
        to_w: Option<Watts>,
        #[serde(flatten)]
        cause: Cause,
    },
    HookOk {
        #[serde(flatten)]
        who: MinerRef,
        hook: Method,
        action: HookAction,
        /// The firmware's read-back, when it reports one.
        watts: Option<Watts>,
        hashrate_hs: Option<HashesPerSec>,
        #[serde(flatten)]
        cause: Cause,
    },
    HookFailed {
        #[serde(flatten)]
        who: MinerRef,
        hook: Method,
        action: HookAction,
        error: String,
        retry_in_s: Option<f64>,
        #[serde(flatten)]
        cause: Cause,
    },
    LeaseExpired {
        /// The budget when the lease ran out, in watts (a fraction budget
        /// resolved against its scope's fleet).
        budget_w: Watts,
        /// The fraction, when the budget was given as one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fraction: Option<f64>,
        fallback: LeaseFallback,
        #[serde(flatten)]
        cause: Cause,
    },
    BudgetMet {
        budget_w: Watts,
        achieved_w: Watts,
        met_by: MetBy,
        mining: usize,
        parked: usize,
        #[serde(flatten)]
        cause: Cause,
    },
    BudgetNotMet {
        budget_w: Watts,
        achieved_w: Watts,
        met_by: MetBy,
        mining: usize,
        parked: usize,
        /// Why: protected miners alone draw more, no miner left to park, ...
        why: String,
        #[serde(flatten)]
        cause: Cause,
    },
    /// A feed (`meter`, `other_load`) had no good reading for its
    /// `stale_after_s`: it is not used until it recovers.
    MeterStale {
        feed: String,
        source: String,
        last_w: Option<Watts>,
        last_at_ms: Option<u64>,
        error: Option<String>,
    },
    MeterRecovered {
        feed: String,
        source: String,
        watts: Watts,
    },
    /// The meter stayed over the budget for `settle_s`: the calibration
    /// factor was raised, and the next plan parks more.
    MeterCorrection {
        measured_w: Watts,
        budget_w: Watts,
        factor: f64,
    },
    /// Cluster mode: an instance won the planner's election (the revision
    /// it won at fences what it writes).
    ClusterPlanner {
        instance: String,
        epoch: i64,
    },
    /// Cluster mode: an instance appeared in the site, or its lease ran out.
    ClusterJoined {
        instance: String,
    },
    ClusterLeft {
        instance: String,
    },
    /// Cluster mode: this instance's allotment moved.
    ClusterAllotment {
        allotment_w: Option<Watts>,
        site_budget_w: Option<Watts>,
    },
    /// Cluster mode: etcd did not answer for `lease_s`; `on_lost` says
    /// what this instance does meanwhile (`hold` its last allotment, or
    /// `shed` to 0).
    EtcdLost {
        on_lost: String,
        allotment_w: Option<Watts>,
        error: String,
    },
    EtcdBack {
        down_s: f64,
    },
    /// The controller's self-check found its rows and the live sessions
    /// disagreeing for longer than a message takes, and repaired the rows:
    /// `missing` live sessions without a row were registered again, `stale`
    /// rows of ended sessions dropped; `workers` names up to 20 of them.
    RowsRepaired {
        missing: usize,
        stale: usize,
        workers: Vec<String>,
        #[serde(flatten)]
        cause: Cause,
    },
    /// This subscriber fell behind and missed `count` events.
    EventsLost {
        count: u64,
    },
}

/// An event and when it happened (Unix milliseconds): the `params` of an
/// `event` notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The wire shapes of proto/control-v1.md, both ways.
    /// The one rule for a budget amount, wherever it is written: the
    /// protocol, the state file and the schedule all parse through it.
    #[test]
    fn an_amount_is_finite_not_negative_and_one_of_watts_or_fraction() {
        // (watts, fraction, the amount, or words of the error)
        type Row = (Option<f64>, Option<f64>, Result<Amount, &'static str>);
        let rows: &[Row] = &[
            (Some(2.4e6), None, Ok(Amount::Watts(2.4e6))),
            (Some(0.0), None, Ok(Amount::Watts(0.0))),
            (None, Some(0.6), Ok(Amount::Fraction(0.6))),
            (None, Some(1.0), Ok(Amount::Fraction(1.0))),
            (Some(f64::INFINITY), None, Err("finite number >= 0, not inf")),
            (Some(f64::NAN), None, Err("finite number >= 0, not NaN")),
            (Some(-5.0), None, Err("finite number >= 0, not -5")),
            (None, Some(1.5), Err("from 0 to 1, not 1.5")),
            (None, Some(f64::NAN), Err("from 0 to 1, not NaN")),
            (Some(1.0), Some(0.5), Err("exactly one of watts")),
            (None, None, Err("exactly one of watts")),
        ];
        for (w, f, want) in rows {
            match (Amount::new(*w, *f), want) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, *b);
                    let wire = serde_json::to_value(a).unwrap();
                    assert_eq!(serde_json::from_value::<Amount>(wire).unwrap(), a, "round trip");
                }
                (Err(e), Err(words)) => assert!(e.contains(words), "{w:?} {f:?}: {e}"),
                (got, _) => panic!("{w:?} {f:?}: {got:?}, want {want:?}"),
            }
        }
        assert_eq!(serde_json::to_value(Amount::Fraction(0.5)).unwrap(), json!({"fraction": 0.5}));
        let e = serde_json::from_value::<Amount>(json!({"watts": -1.0})).unwrap_err().to_string();
        assert!(e.contains("finite number >= 0"), "{e}");
    }

    /// The requests' params as the client writes them and the server reads
    /// them, and what the server refuses.
    #[test]
    fn requests_read_back_as_written() {
        let mut b = SetBudget::site(Amount::Watts(2.4e6), "dr");
        b.lease_s = Some(1800.0);
        let wire = serde_json::to_value(&b).unwrap();
        assert_eq!(
            wire,
            json!({"watts": 2.4e6, "scope": "site", "lease_s": 1800.0, "ramp_up_s": null, "dry_run": false,
                   "reason": "dr", "max_listed": null})
        );
        assert_eq!(serde_json::from_value::<SetBudget>(wire).unwrap(), b);
        let short: SetBudget = serde_json::from_value(json!({"fraction": 0.6})).unwrap();
        assert_eq!(short, SetBudget::site(Amount::Fraction(0.6), ""));
        for (bad, words) in [
            (json!({"watts": 1, "bogus": 1}), "unknown field `bogus`"),
            (json!({"watts": 1, "fraction": 0.5}), "exactly one"),
            (json!({"scope": "site"}), "exactly one"),
        ] {
            let e = serde_json::from_value::<SetBudget>(bad.clone()).unwrap_err().to_string();
            assert!(e.contains(words), "{bad}: {e}");
        }
        let p = SetProtection { pattern: "s19*".into(), state: Protection::Curtailable };
        assert_eq!(serde_json::to_value(&p).unwrap(), json!({"pattern": "s19*", "state": "curtailable"}));
        assert!(serde_json::from_value::<SetProtection>(json!({"pattern": "x", "state": "maybe"})).is_err());
    }

    #[test]
    fn events_and_answers_have_the_documented_shape() {
        let table = [
            (
                Stamped {
                    at_ms: 1795000000123,
                    event: Event::MinerParked {
                        who: MinerRef { miner: MinerId(17), worker: "rig.0".into(), address: [127, 0, 0, 1].into() },
                        watts: Watts(3068.0),
                        hook: Method::Network,
                        cause: Cause { plan_id: 3, reason: "dr-event-42".into() },
                    },
                },
                json!({"type": "miner_parked", "at_ms": 1795000000123u64, "miner": 17, "worker": "rig.0", "address": "127.0.0.1", "watts": 3068.0, "hook": "network", "plan_id": 3, "reason": "dr-event-42"}),
            ),
            (
                Stamped {
                    at_ms: 5,
                    event: Event::LeaseExpired {
                        budget_w: Watts(12_000.0),
                        fraction: Some(0.6),
                        fallback: LeaseFallback::Hold,
                        cause: Cause { plan_id: 2, reason: "dr".into() },
                    },
                },
                json!({"type": "lease_expired", "at_ms": 5, "budget_w": 12000.0, "fraction": 0.6, "fallback": "hold", "plan_id": 2, "reason": "dr"}),
            ),
        ];
        for (typed, wire) in table {
            assert_eq!(serde_json::to_value(&typed).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Stamped>(wire).unwrap(), typed);
        }
        let none = serde_json::to_value(&BudgetStatus::NONE).unwrap();
        // Every key, null, so a client reads one shape (proto/control-v1.md).
        let null = Value::Null;
        assert_eq!(
            none,
            json!({"source": "none", "watts": null, "scope": null, "reason": null, "lease_expires_in_s": null,
                   "met": null, "met_by": null, "set_at_ms": null})
        );
        assert!(none.as_object().unwrap().iter().all(|(k, v)| k == "source" || *v == null));
        assert_eq!(serde_json::from_value::<BudgetStatus>(none).unwrap(), BudgetStatus::NONE);
    }
}
