//! Cluster mode: one site budget kept across several instances through
//! etcd (`[curtail.cluster]`).
//!
//! * [`plan`]: the planner's rules (pure): allotments by efficiency band,
//!   the giver shedding before the taker grows.
//! * `agent` (feature `cluster`): the task that talks to etcd: the
//!   instance's lease and report, the election of one planner, the site
//!   state (budget, protection rules), the allotments.
//!
//! What etcd holds, under `/sluice/<site>/` (layout in
//! proto/control-v1.md, "Cluster mode"):
//!
//! | key | what | written by |
//! |---|---|---|
//! | `state` | the site's budget, protection rules, last plan (the state file's format) | any instance, on a control request (compare-and-swap on its revision) |
//! | `instances/<name>` | that instance's [`plan::Report`], on its lease | the instance |
//! | `planner` | the planner's name, on its lease; its create revision is the fencing token | whoever wins the create |
//! | `allotments` | [`Allotments`] | the planner, only while it holds `planner` at the revision it won |

#[cfg(feature = "cluster")]
pub mod agent;
pub mod plan;
pub mod site;

use super::controller::{ControlError, ControlReq};
use crate::api::{BudgetSource, ClusterStatus, Reply, Watts};
use crate::units::Seconds;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A site-wide control request and where its answer goes.
pub type SiteReq = (ControlReq, oneshot::Sender<Result<Reply, ControlError>>);

/// What the controller's handle keeps of the agent: where site-wide
/// requests go, and the site as the agent last read it.
#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<SiteReq>,
    pub view: watch::Receiver<Option<ClusterStatus>>,
}

impl Link {
    pub async fn request(&self, r: ControlReq) -> Result<Reply, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((r, tx)).await.map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }
}

/// The agent's end of a [`Link`].
pub struct LinkEnd {
    pub rx: mpsc::Receiver<SiteReq>,
    pub view: watch::Sender<Option<ClusterStatus>>,
}

pub fn link() -> (Link, LinkEnd) {
    let (tx, rx) = mpsc::channel(64);
    let (view_tx, view) = watch::channel(None);
    (Link { tx, view }, LinkEnd { rx, view: view_tx })
}

/// What an instance does when etcd does not answer for `lease_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnLost {
    /// Keep enforcing the last allotment: right when etcd itself is down
    /// (every instance holds its share, the sum stays within the budget).
    #[default]
    Hold,
    /// Park every curtailable miner (an allotment of 0) until etcd answers.
    Shed,
}

/// `[curtail.cluster]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd's client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Instances with the same site share one budget.
    pub site: String,
    /// This instance's name; empty: the host name and the listen port.
    pub instance: String,
    /// An instance silent this long is gone and its share freed.
    pub lease_s: Seconds,
    pub on_lost: OnLost,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            site: String::new(),
            instance: String::new(),
            lease_s: Seconds::from_duration(Duration::from_secs(5)),
            on_lost: OnLost::Hold,
        }
    }
}

impl ClusterConfig {
    /// Validate, naming the key at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err(("curtail.cluster.endpoints", "needs at least one etcd URL".into()));
        }
        for e in &self.endpoints {
            let u = url::Url::parse(e).map_err(|err| ("curtail.cluster.endpoints", format!("{e:?}: {err}")))?;
            if u.scheme() != "http" || u.host_str().is_none() {
                return Err(("curtail.cluster.endpoints", format!("{e:?}: an etcd client URL is http://host:port")));
            }
        }
        let name_ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if self.site.is_empty() || !name_ok(&self.site) {
            return Err(("curtail.cluster.site", format!("{:?}: a name of letters, digits and - _ . :", self.site)));
        }
        if !name_ok(&self.instance) {
            return Err(("curtail.cluster.instance", format!("{:?}: letters, digits and - _ . :", self.instance)));
        }
        let l = self.lease_s.get().as_secs_f64();
        if !(2.0..=600.0).contains(&l) {
            return Err(("curtail.cluster.lease_s", format!("must be between 2 and 600 seconds, got {l}")));
        }
        Ok(())
    }

    /// This instance's name: `instance`, or the host name and the port
    /// miners connect to.
    pub fn instance_name(&self, listen_port: u16) -> String {
        if !self.instance.is_empty() {
            return self.instance.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "sluice".into());
        format!("{host}:{listen_port}")
    }

    /// Every key of this site starts with this.
    pub fn prefix(&self) -> String {
        format!("/sluice/{}/", self.site)
    }
}

/// The planner's word: the site budget it planned for and each instance's
/// allotment. An instance it does not name holds 0 while a budget is in
/// force (it is new: the planner has not seen it yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allotments {
    pub planner: String,
    /// The revision the planner won its election at (its fencing token).
    pub epoch: i64,
    /// The site budget in watts (none: no budget).
    pub budget_w: Option<Watts>,
    pub source: BudgetSource,
    pub reason: String,
    pub grants: plan::Grants,
    /// What every estimate is scaled by: the hall meter's reading over the
    /// instances' estimates (1 without a meter).
    #[serde(default = "one")]
    pub factor: f64,
    /// The hall meter's last fresh reading (none: no meter, or stale).
    #[serde(default)]
    pub measured_w: Option<Watts>,
    /// Instances whose report went away lately: what they were granted
    /// (none: no limit) and since when (Unix milliseconds). Counted as
    /// drawing it for a grace period, so a report that only blinked is not
    /// given away.
    #[serde(default)]
    pub leaving: std::collections::BTreeMap<String, (Option<Watts>, u64)>,
    /// Per instance, the grants published (Unix ms, watts; none: no
    /// limit) since the allotments its report says it took, and the one in
    /// those: it may enforce any of them before its report shows it, and
    /// one that leaves is counted at the largest.
    #[serde(default)]
    pub published: std::collections::BTreeMap<String, Vec<(u64, Option<Watts>)>>,
    /// The site's fleet as a fraction budget takes it ([`site::FleetBase`]).
    #[serde(default)]
    pub base: Option<site::FleetBase>,
    /// When it was written (Unix milliseconds).
    pub at_ms: u64,
}

fn one() -> f64 {
    1.0
}

impl Allotments {
    /// What `instance` may draw (none: no limit). An instance it does not
    /// name keeps what it enforces (`current`; a new one enforces 0) until
    /// the planner has seen its report, unless there is no budget.
    pub fn grant(&self, instance: &str, current: Option<Watts>) -> Option<Watts> {
        match self.grants.get(instance) {
            Some(g) => *g,
            None if self.budget_w.is_none() => None,
            None => Some(current.unwrap_or(Watts::ZERO)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_refused_naming_the_key() {
        let ok = ClusterConfig { site: "hall-a".into(), ..ClusterConfig::default() };
        assert_eq!(ok.validate(), Ok(()));
        let rows: &[(ClusterConfig, &str)] = &[
            (ClusterConfig { endpoints: vec![], ..ok.clone() }, "curtail.cluster.endpoints"),
            (ClusterConfig { endpoints: vec!["127.0.0.1:2379".into()], ..ok.clone() }, "curtail.cluster.endpoints"),
            (ClusterConfig { endpoints: vec!["https://e:2379".into()], ..ok.clone() }, "curtail.cluster.endpoints"),
            (ClusterConfig { site: String::new(), ..ok.clone() }, "curtail.cluster.site"),
            (ClusterConfig { site: "hall a/b".into(), ..ok.clone() }, "curtail.cluster.site"),
            (ClusterConfig { instance: "a b".into(), ..ok.clone() }, "curtail.cluster.instance"),
            (
                ClusterConfig { lease_s: Seconds::from_duration(Duration::from_secs(1)), ..ok.clone() },
                "curtail.cluster.lease_s",
            ),
        ];
        for (c, key) in rows {
            assert_eq!(c.validate().map_err(|e| e.0), Err(*key), "{c:?}");
        }
        assert_eq!(ok.prefix(), "/sluice/hall-a/");
        assert_eq!(ClusterConfig { instance: "x".into(), ..ok }.instance_name(3333), "x");
    }

    #[test]
    fn an_instance_the_planner_has_not_named_holds_what_it_enforces_under_a_budget() {
        let a = Allotments {
            planner: "p".into(),
            epoch: 7,
            budget_w: Some(Watts(1000.0)),
            source: BudgetSource::Command,
            reason: String::new(),
            grants: [("p".to_owned(), Some(Watts(600.0)))].into(),
            factor: 1.0,
            measured_w: None,
            leaving: Default::default(),
            published: Default::default(),
            base: None,
            at_ms: 0,
        };
        assert_eq!(a.grant("p", None), Some(Watts(600.0)));
        assert_eq!(a.grant("new", None), Some(Watts::ZERO), "a new instance starts at 0");
        assert_eq!(a.grant("back", Some(Watts(300.0))), Some(Watts(300.0)), "one that blinked keeps its limit");
        let none = Allotments { budget_w: None, grants: Default::default(), ..a };
        assert_eq!(none.grant("new", Some(Watts::ZERO)), None, "no budget: no limit");
    }
}
