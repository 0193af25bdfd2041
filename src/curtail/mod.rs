//! Curtailment: power budgets from a scheduler, met by parking the least
//! efficient miners and restored, most efficient first, at a ramp rate.
//!
//! * [`power`]: watts and J/TH per miner, each with its source (pure).
//! * [`policy`]: which miners to park or resume for a budget (pure).
//! * [`state`]: the curtailment state (pure), a coordinator of its parts:
//!   [`book`] (the budget in force and its source), [`fleet`] (the miners,
//!   admission, parking and resuming), [`ramp`] (resuming at the ramp rate),
//!   [`measure`] (meter, calibration and follow mode, on [`closed_loop`]'s
//!   rules), [`audit`] (its rows against the live sessions); [`effect`] is
//!   what they ask the world to do.
//! * [`controller`]: the one task that owns the state and carries out its
//!   effects.
//! * [`hooks`]: how a miner is parked: network, firmware (asic-rs), exec, webhook.
//! * [`schedule`]: time-of-day budgets (pure); [`scope`]: what a budget covers.

pub mod audit;
pub mod book;
pub mod closed_loop;
pub mod cluster;
pub mod controller;
pub mod effect;
pub mod feed;
pub mod fleet;
pub mod hooks;
pub mod learn;
pub mod measure;
pub mod policy;
pub mod power;
pub mod ramp;
pub mod schedule;
pub mod scope;
pub mod state;
pub mod store;
pub mod targets;

pub use controller::{ControlError, ControlReq, Curtailer, Registered};

use crate::units::{FileMode, Seconds};
use power::{ModelSpec, PowerRule};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a miner's API (its firmware) answers, when that is not the source
/// address of its Stratum connection (NAT, a load balancer in front of
/// sluice). The first entry whose worker glob and source network both match
/// (an empty one matches anything) gives the address hooks use.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FirmwareAddress {
    /// Glob on worker names ("" = any).
    pub workers: String,
    /// The Stratum source network (none = any).
    pub cidr: Option<ipnet::IpNet>,
    /// The miner's API address.
    pub address: Option<std::net::IpAddr>,
}

/// What sluice does at start when its state file cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadState {
    /// Give no curtailable miner work until a budget is set (a budget of 0
    /// W, source `bad-state`): a commitment is never broken by a lost file.
    #[default]
    ParkAll,
    /// Start as if there had been no budget.
    NoBudget,
}

pub use crate::api::{LeaseFallback, Method};

/// A group of miners that share a curtailment method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// Glob on worker names; the first matching group wins.
    pub pattern: String,
    pub method: Method,
    /// exec: the program and its arguments.
    pub command: Vec<String>,
    /// webhook: where to POST (http://host:port/path).
    pub url: String,
    /// firmware: which API to speak: luxos, braiins, whatsminer, vnish,
    /// antminer, or auto (let asic-rs identify it).
    pub firmware: String,
    pub username: String,
    pub password: String,
    /// power-target: whether a new target restarts the miner (minutes of
    /// no hashing). None: as the firmware is known to (whatsminer yes,
    /// braiins and vnish no; auto: yes, to be safe).
    pub restarts: Option<bool>,
    /// power-target: how long a new target may take to read back at or
    /// under what was asked; longer, and the firmware is taken to refuse
    /// it (the miner is parked instead).
    pub settle_s: Seconds,
    /// power-target: a firmware that restarts on a new target is lowered
    /// only under a budget whose lease has at least this long left (never
    /// under one without a lease); otherwise it is parked.
    pub restart_min_lease_s: Seconds,
}

impl GroupConfig {
    /// Whether a new power target restarts its miners.
    pub fn target_restarts(&self) -> bool {
        self.restarts.unwrap_or(!matches!(self.firmware.as_str(), "braiins" | "vnish"))
    }
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            name: "default".into(),
            pattern: "*".into(),
            method: Method::Network,
            command: Vec::new(),
            url: String::new(),
            firmware: "auto".into(),
            username: String::new(),
            password: String::new(),
            restarts: None,
            settle_s: Seconds::from_duration(std::time::Duration::from_secs(120)),
            restart_min_lease_s: Seconds::from_duration(std::time::Duration::from_secs(3600)),
        }
    }
}

/// A time-of-day budget (UTC).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleEntry {
    /// "HH:MM", inclusive.
    pub from: String,
    /// "HH:MM", exclusive; a window may wrap past midnight.
    pub to: String,
    pub watts: Option<f64>,
    pub fraction: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CurtailConfig {
    /// The control socket (Unix domain). Empty disables it.
    pub socket: PathBuf,
    /// Octal file mode of the socket.
    pub socket_mode: FileMode,
    /// Optional TCP control listener; needs `token`.
    pub tcp_listen: Option<SocketAddr>,
    /// Bearer token for the TCP listener (or SLUICE_CONTROL_TOKEN).
    pub token: String,
    /// Watts of a miner nothing else is known of.
    pub default_watts: f64,
    /// J/TH of a miner nothing else is known of.
    pub default_j_per_th: f64,
    /// What a parked miner still draws (fans, control board, idle
    /// hashboards), as a fraction of its watts, where neither its firmware
    /// (read back asleep) nor its model (`idle_watts`) says. Every plan
    /// counts it: parking saves a miner's watts less this.
    pub idle_fraction: f64,
    /// A parked miner stays parked this long; a miner drawing for less is
    /// parked only when a budget needs it. Never delays shedding.
    pub hold_s: Seconds,
    /// Fraction of the budget kept free when resuming (hysteresis).
    pub hysteresis_fraction: f64,
    /// Resume at most this many watts per second.
    pub ramp_up_w_per_s: f64,
    /// Power-target groups: learn each model's curve from its miners'
    /// read-backs (the table as the prior); false: plan on the table alone.
    pub learn_curves: bool,
    pub lease_fallback: LeaseFallback,
    /// Where the budget, protection rules and last plan are kept across
    /// restarts. Empty: beside the control socket (`<socket>.state.json`).
    pub state_file: PathBuf,
    /// When the state file exists but cannot be read.
    pub on_bad_state: OnBadState,
    /// Hook (firmware API) addresses that differ from the Stratum source.
    pub firmware_address: Vec<FirmwareAddress>,
    /// Extra or overriding models: `{ name, th_s, watts }`.
    pub model: Vec<ModelSpec>,
    /// Power rules by worker pattern: `{ pattern, model | j_per_th | watts }`.
    pub power: Vec<PowerRule>,
    pub group: Vec<GroupConfig>,
    pub schedule: Vec<ScheduleEntry>,
    /// A meter of what the miners draw: closes the loop on measured watts.
    pub meter: Option<closed_loop::MeterConfig>,
    /// Follow mode: the budget is the site limit less the other load.
    pub follow: Option<closed_loop::FollowConfig>,
    /// Cluster mode: one site budget across instances, kept in etcd.
    pub cluster: Option<cluster::ClusterConfig>,
}

impl Default for CurtailConfig {
    fn default() -> Self {
        CurtailConfig {
            socket: PathBuf::from("./sluice.sock"),
            socket_mode: FileMode(0o660),
            tcp_listen: None,
            token: String::new(),
            default_watts: 3250.0,
            default_j_per_th: 30.0,
            idle_fraction: 0.03,
            hold_s: Seconds::from_duration(std::time::Duration::from_secs(60)),
            hysteresis_fraction: 0.02,
            ramp_up_w_per_s: 10_000.0,
            learn_curves: true,
            lease_fallback: LeaseFallback::Hold,
            state_file: PathBuf::new(),
            on_bad_state: OnBadState::ParkAll,
            firmware_address: Vec::new(),
            model: Vec::new(),
            power: Vec::new(),
            group: Vec::new(),
            schedule: Vec::new(),
            meter: None,
            follow: None,
            cluster: None,
        }
    }
}

impl CurtailConfig {
    /// The meter and follow mode this instance reads itself: none in
    /// cluster mode, where the planner reads them for the site.
    pub fn own_feeds(&self) -> (Option<&closed_loop::MeterConfig>, Option<&closed_loop::FollowConfig>) {
        match self.cluster {
            Some(_) => (None, None),
            None => (self.meter.as_ref(), self.follow.as_ref()),
        }
    }

    /// Validate, naming the key at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let pos = |k: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err((k, format!("must be >= 0, got {v}")))
            }
        };
        pos("curtail.default_watts", self.default_watts)?;
        pos("curtail.default_j_per_th", self.default_j_per_th)?;
        pos("curtail.hysteresis_fraction", self.hysteresis_fraction)?;
        if !(0.0..1.0).contains(&self.idle_fraction) {
            return Err((
                "curtail.idle_fraction",
                format!(
                    "must be at least 0 and under 1 (a parked miner draws less than mining), got {}",
                    self.idle_fraction
                ),
            ));
        }
        if self.ramp_up_w_per_s.is_nan() || self.ramp_up_w_per_s <= 0.0 {
            return Err(("curtail.ramp_up_w_per_s", "must be > 0".into()));
        }
        if let Some(c) = &self.cluster {
            if !cfg!(feature = "cluster") {
                return Err((
                    "curtail.cluster",
                    "this build of sluice has no cluster mode: build it with --features cluster".into(),
                ));
            }
            c.validate()?;
            if self.meter.as_ref().is_some_and(|m| m.source.kind == Some(feed::SourceKind::Firmware)) {
                return Err((
                    "curtail.meter.kind",
                    "\"firmware\" sums one instance's read-backs; in cluster mode the planner reads the site's meter: use a Prometheus or Modbus meter".into(),
                ));
            }
        }
        if self.tcp_listen.is_some() && self.token().is_none() {
            return Err(("curtail.token", "a TCP control listener needs a token (or SLUICE_CONTROL_TOKEN)".into()));
        }
        power::PowerModel::from_config(self).map_err(|e| ("curtail.power", e))?;
        for g in &self.group {
            match g.method {
                Method::Exec if g.command.is_empty() => {
                    return Err(("curtail.group.command", format!("group {:?} uses exec without a command", g.name)))
                }
                Method::Webhook if !g.url.starts_with("http://") => {
                    return Err((
                        "curtail.group.url",
                        format!("group {:?}: webhook url must be http://host:port/path", g.name),
                    ))
                }
                Method::Firmware => hooks::firmware_supported(&g.firmware)
                    .map_err(|e| ("curtail.group.firmware", format!("group {:?}: {e}", g.name)))?,
                Method::PowerTarget => {
                    hooks::firmware_supported(&g.firmware)
                        .map_err(|e| ("curtail.group.firmware", format!("group {:?}: {e}", g.name)))?;
                    if matches!(g.firmware.as_str(), "luxos" | "antminer") {
                        return Err((
                            "curtail.group.firmware",
                            format!(
                                "group {:?}: sluice sets power targets on braiins, vnish and whatsminer firmware (asic-rs has none for {}): use method = \"firmware\" for {} miners",
                                g.name, g.firmware, g.firmware
                            ),
                        ));
                    }
                    if g.settle_s.get().is_zero() {
                        return Err(("curtail.group.settle_s", format!("group {:?}: must be above 0", g.name)));
                    }
                }
                _ => {}
            }
        }
        for (n, f) in self.firmware_address.iter().enumerate() {
            if f.address.is_none() {
                return Err(("curtail.firmware_address.address", format!("entry {}: no address", n + 1)));
            }
            if f.workers.is_empty() && f.cidr.is_none() {
                return Err((
                    "curtail.firmware_address",
                    format!("entry {}: give workers (a glob) or cidr, else it matches every miner", n + 1),
                ));
            }
        }
        for s in &self.schedule {
            schedule::Window::parse(s).map_err(|e| ("curtail.schedule", e))?;
        }
        closed_loop::validate(self.meter.as_ref(), self.follow.as_ref())?;
        if self.follow.is_some() && !self.schedule.is_empty() {
            return Err((
                "curtail.follow",
                "a schedule and follow mode both set the budget: keep one ([[curtail.schedule]] or [curtail.follow])"
                    .into(),
            ));
        }
        if self.meter.as_ref().and_then(|m| m.source.kind) == Some(feed::SourceKind::Firmware)
            && !self.group.iter().any(|g| g.method.is_firmware())
        {
            return Err((
                "curtail.meter.kind",
                "\"firmware\" sums what the miners' firmware reports, and no group uses method = \"firmware\" or \"power-target\"".into(),
            ));
        }
        if self.follow.is_none() && self.lease_fallback == LeaseFallback::Follow {
            return Err(("curtail.lease_fallback", "\"follow\" needs a [curtail.follow] table".into()));
        }
        Ok(())
    }

    /// The TCP token from the config or the environment.
    pub fn token(&self) -> Option<String> {
        if !self.token.is_empty() {
            return Some(self.token.clone());
        }
        std::env::var("SLUICE_CONTROL_TOKEN").ok().filter(|t| !t.is_empty())
    }
}

/// What the curtailment parts' tests share.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::power::PowerRule;
    use super::{CurtailConfig, GroupConfig, Method};

    /// Workers a.* (20 J/TH), b.* (30), c.* (40) and x.* (50, parked by an
    /// exec hook); every miner draws 1,000 W, and nothing parked (a test of
    /// the idle draw sets it); no hold time, no hysteresis, a ramp of
    /// 1,000 W/s.
    pub(crate) fn cfg() -> CurtailConfig {
        let rule = |p: &str, j| PowerRule { pattern: p.into(), j_per_th: Some(j), watts: Some(1000.0), model: None };
        CurtailConfig {
            power: vec![rule("a.*", 20.0), rule("b.*", 30.0), rule("c.*", 40.0), rule("x.*", 50.0)],
            group: vec![GroupConfig {
                name: "hooked".into(),
                pattern: "x.*".into(),
                method: Method::Exec,
                command: vec!["true".into()],
                ..GroupConfig::default()
            }],
            hold_s: crate::units::Seconds::ZERO,
            hysteresis_fraction: 0.0,
            idle_fraction: 0.0,
            ramp_up_w_per_s: 1000.0,
            ..CurtailConfig::default()
        }
    }
}
