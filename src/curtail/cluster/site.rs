//! What an instance decides from what etcd holds, as pure functions: the
//! site's budget book, the planner's next allotments, the allotment an
//! instance takes up, and the state a site request writes. The agent
//! (`agent.rs`, feature `cluster`) does the I/O around them; the cluster
//! simulator (`sluice sim-check --cluster`) drives them over an in-memory
//! store with etcd's semantics.

use super::plan::{self, Report};
use super::Allotments;
use crate::api::{BudgetSource, LeaseFallback, Plan, ScopeFigures, Watts};
use crate::curtail::book::Book;
use crate::curtail::effect::Clock;
use crate::curtail::schedule::{Amount, Window};
use crate::curtail::store::{Saved, SavedRule, VERSION};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::info;

/// The site's budget book from its state: the lease of a command that ran
/// out falls back, a schedule window starts or ends. True: it changed, and
/// the planner writes it back.
pub fn book(
    schedule: &[Window],
    fallback: LeaseFallback,
    clock: Clock,
    state: Option<&Saved>,
) -> Result<(Book, bool), String> {
    let mut book = Book::new(schedule.to_vec());
    if let Some(s) = state {
        book.restore(clock, s.budget.clone(), s.last_plan.clone())?;
    }
    let mut changed = false;
    if let Some(ex) = book.expire_lease(clock.at, fallback) {
        info!(plan = ex.cause.plan_id, reason = %ex.cause.reason, ?fallback, "cluster: the site budget's lease expired");
        changed = true;
    }
    changed |= book.follow_schedule(clock);
    Ok((book, changed))
}

/// The state to write from a book and the protection rules.
pub fn saved(book: &Book, protection: Vec<SavedRule>, clock: Clock) -> Saved {
    let (budget, last_plan) = book.saved();
    // Power targets are each instance's own (its miners'), not the site's.
    Saved { version: VERSION, saved_at_ms: clock.unix_ms, budget, protection, last_plan, targets: Vec::new() }
}

/// What an instance's connected miners draw at full power (a fraction is
/// taken of the sum).
pub fn fleet_w(r: &Report) -> Watts {
    r.fleet_w.unwrap_or_else(|| r.protected_w + r.bands.iter().map(|b| b.watts).sum())
}

/// What `set_budget` answers in cluster mode: the site's figures from the
/// instances' reports (the miners of other instances are not listed).
pub fn site_plan(reports: &[Report], amount: Amount, dry_run: bool) -> Plan {
    let total: Watts = reports.iter().map(fleet_w).sum();
    let budget_w = match amount {
        Amount::Watts(w) => Watts(w),
        Amount::Fraction(f) => total * f,
    };
    let f = plan::fill(budget_w, reports);
    let (mining, parked) = (reports.iter().map(|r| r.mining).sum::<usize>(), reports.iter().map(|r| r.parked).sum());
    let drawn: Watts = reports.iter().map(|r| r.drawn_w).sum();
    Plan {
        plan_id: 0,
        dry_run,
        scope: "site".into(),
        budget_w,
        before: ScopeFigures { mining, parked, watts: drawn },
        expected: ScopeFigures { mining: f.mining, parked: f.parked, watts: f.expected_w.min(budget_w.max(drawn)) },
        budget_met: f.expected_w <= budget_w,
        park: Vec::new(),
        resume: Vec::new(),
        park_count: mining.saturating_sub(f.mining),
        resume_count: f.mining.saturating_sub(mining),
        lease_expires_in_s: None,
        held: None,
        targets: None,
    }
}

/// What the planner knows when it plans a round.
pub struct Planning<'a> {
    pub planner: &'a str,
    pub epoch: i64,
    pub clock: Clock,
    pub lease: Duration,
    /// The reports of the instances alive (their leases hold).
    pub reports: &'a [Report],
    /// Reports that could not be read: instances of unknown draw.
    pub unreadable: usize,
    /// The allotments published last.
    pub prev: Option<&'a Allotments>,
    /// The site budget in force: its amount, source and reason.
    pub budget: Option<(Amount, BudgetSource, &'a str)>,
    pub factor: f64,
    pub measured_w: Option<Watts>,
}

/// The planner's next allotments.
///
/// An instance whose report went away (its lease ran out, or etcd revoked
/// every lease at once) is counted for a grace period of `lease_s`:
/// its grant as still drawn, and its fleet in the fleet a fraction budget
/// is taken of. So the first instance back after an outage takes the
/// fraction of the site it knew, not of itself alone.
pub fn allotments(p: Planning) -> Allotments {
    let alive: BTreeSet<&str> = p.reports.iter().map(|r| r.instance.as_str()).collect();
    let granted = p.prev.map(|a| a.grants.clone()).unwrap_or_default();
    // An instance alive whose lease etcd revoked writes its report again
    // within a third of lease_s and a round or two; one cut off from etcd
    // with on_lost = "shed" has shed once it failed for lease_s: its grant
    // is counted that long (cluster sim-check seed 4: with half lease_s, an
    // instance whose lease was revoked still drew its grant, on a loaded
    // machine, when the planner gave it away).
    let grace_ms = (p.lease.as_millis() as u64).max(1000);
    let mut leaving = p.prev.map(|a| a.leaving.clone()).unwrap_or_default();
    for (name, g) in &granted {
        if !alive.contains(name.as_str()) {
            leaving.entry(name.clone()).or_insert((*g, p.clock.unix_ms));
        }
    }
    leaving.retain(|name, (_, since)| !alive.contains(name.as_str()) && p.clock.unix_ms < *since + grace_ms);
    // Each instance's fleet: what it reports, or, while it is leaving,
    // what it reported last.
    let known = p.prev.map(|a| &a.fleets);
    let mut fleets: BTreeMap<String, Watts> = p.reports.iter().map(|r| (r.instance.clone(), fleet_w(r))).collect();
    for name in leaving.keys() {
        if let Some(w) = known.and_then(|k| k.get(name)) {
            fleets.insert(name.clone(), *w);
        }
    }
    let raw: Watts = fleets.values().copied().sum();
    let base =
        p.prev.and_then(|a| a.base).unwrap_or(FleetBase::new(raw)).next(raw, p.clock.unix_ms, 2 * grace_ms + 1000);
    let budget_w = p.budget.map(|(amount, _, _)| match amount {
        Amount::Watts(w) => Watts(w),
        Amount::Fraction(f) => base.watts * f,
    });
    let leaving_w = match p.unreadable {
        0 => Watts(leaving.values().map(|(g, _)| g.map_or(f64::INFINITY, |w| w.0)).sum()),
        // An instance whose draw is unknown: lower grants only.
        _ => Watts(f64::INFINITY),
    };
    let grants = plan::grants(budget_w, p.reports, &granted, leaving_w);
    Allotments {
        planner: p.planner.to_owned(),
        epoch: p.epoch,
        budget_w,
        source: p.budget.map_or(BudgetSource::None, |b| b.1),
        reason: p.budget.map(|b| b.2.to_owned()).unwrap_or_default(),
        grants,
        factor: p.factor,
        measured_w: p.measured_w,
        leaving,
        fleets,
        base: Some(base),
        at_ms: p.clock.unix_ms,
    }
}

/// The site's fleet a fraction budget is taken of: the sum of the
/// instances' fleets, but one that grows only once it has stayed grown.
///
/// When an instance dies, its report stays until its lease runs out (and
/// its fleet is counted for a grace period of `lease_s` after), while its
/// miners reconnect to the others and count there too: for up to 2
/// `lease_s` the sum counts them twice, and a fraction of it would grant
/// watts the site does not have. So the base falls at once (a smaller
/// fraction is safe) and rises only to the least the sum was over the last
/// `rise_after` (2 `lease_s` + 1 s), which a double count never lasts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct FleetBase {
    pub watts: Watts,
    /// The sum has been above `watts` since then (Unix ms), at least this.
    pub rising: Option<(Watts, u64)>,
}

impl FleetBase {
    pub fn new(watts: Watts) -> FleetBase {
        FleetBase { watts, rising: None }
    }

    /// The base once the sum reads `raw` at `now_ms`.
    pub fn next(self, raw: Watts, now_ms: u64, rise_after_ms: u64) -> FleetBase {
        if raw <= self.watts {
            return FleetBase::new(raw);
        }
        let (least, since) = match self.rising {
            Some((w, since)) => (w.min(raw), since),
            None => (raw, now_ms),
        };
        if now_ms.saturating_sub(since) >= rise_after_ms {
            FleetBase::new(least)
        } else {
            FleetBase { watts: self.watts, rising: Some((least, since)) }
        }
    }
}

/// Whether two allotments say the same (when written aside): the planner
/// writes only a change.
pub fn same(a: &Allotments, b: &Allotments) -> bool {
    Allotments { at_ms: a.at_ms, ..b.clone() } == *a
}

/// The allotment `name` takes up from the site (outer: what it enforces
/// now), and why.
pub fn take_up(
    state: Option<&Saved>,
    allotments: Option<&Allotments>,
    name: &str,
    current: Option<Watts>,
) -> (Option<Watts>, String) {
    match allotments {
        Some(a) => (
            a.grant(name, current),
            match a.budget_w {
                Some(b) => format!("cluster: allotment of the site budget {:.0} W ({})", b.0, a.reason),
                None => "cluster: no site budget".into(),
            },
        ),
        // No planner has written yet: no limit only if the site has no
        // budget at all.
        None => match state {
            Some(s) if s.budget.is_some() => (Some(Watts::ZERO), "cluster: waiting for the planner".into()),
            _ => (None, "cluster: no site budget".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Watts;
    use crate::curtail::cluster::plan::Band;
    use crate::units::JoulesPerTh;
    use std::time::Instant;

    fn report(name: &str, watts: f64, miners: u32) -> Report {
        Report {
            instance: name.into(),
            limit_w: Some(Watts(watts)),
            drawn_w: Watts(watts),
            protected_w: Watts::ZERO,
            bands: vec![Band { j_per_th: JoulesPerTh(20.0), watts: Watts(watts), idle: Watts::ZERO, miners }],
            mining: miners as usize,
            parked: 0,
            fleet_w: None,
            at_ms: 0,
        }
    }

    fn planning<'a>(reports: &'a [Report], prev: Option<&'a Allotments>, ms: u64) -> Planning<'a> {
        Planning {
            planner: "a",
            epoch: 1,
            clock: Clock { at: Instant::now(), unix_ms: ms },
            lease: Duration::from_secs(4),
            reports,
            unreadable: 0,
            prev,
            budget: Some((Amount::Fraction(0.5), BudgetSource::Command, "half")),
            factor: 1.0,
            measured_w: None,
        }
    }

    /// Issue 33, case 6: etcd came back from a freeze having revoked every
    /// lease; the first instance back saw only its own report and took the
    /// fraction of its own fleet. The fleets of the instances leaving are
    /// counted for their grace period.
    #[test]
    fn a_fraction_is_taken_of_the_site_as_it_was_known_while_instances_blink() {
        let all = [report("a", 9_000.0, 3), report("b", 9_000.0, 3), report("c", 9_000.0, 3)];
        let before = allotments(planning(&all, None, 1_000));
        assert_eq!(before.budget_w, Some(Watts(13_500.0)));
        // Only a's report is there: b and c are leaving, their fleets kept.
        let alone = allotments(planning(&all[..1], Some(&before), 2_000));
        assert_eq!(alone.budget_w, Some(Watts(13_500.0)), "the fraction of the site known, not of a alone");
        assert_eq!(alone.leaving.len(), 2);
        // Past the grace (lease_s, 4 s): they are gone, and their fleet.
        let gone = allotments(planning(&all[..1], Some(&alone), 6_100));
        assert_eq!(gone.budget_w, Some(Watts(4_500.0)));
        assert!(gone.leaving.is_empty() && gone.fleets.len() == 1);
        // b and c back: the base rises once it has stayed risen for two
        // lease_s and a second (9 s).
        let back = allotments(planning(&all, Some(&gone), 7_000));
        assert_eq!(back.budget_w, Some(Watts(4_500.0)));
        let still = allotments(planning(&all, Some(&back), 15_900));
        assert_eq!(still.budget_w, Some(Watts(4_500.0)));
        let later = allotments(planning(&all, Some(&still), 16_000));
        assert_eq!(later.budget_w, Some(Watts(13_500.0)));
    }

    /// Table: the base after a series of sums (ms, watts), rising after 10.
    #[test]
    fn the_fleet_base_falls_at_once_and_rises_to_the_least_it_stayed_at() {
        let rows: &[(&[(u64, f64)], f64)] = &[
            (&[(0, 100.0), (5, 80.0)], 80.0),
            // A double count that lasts less than the wait: never taken.
            (&[(0, 100.0), (1, 150.0), (9, 150.0), (10, 100.0), (30, 100.0)], 100.0),
            // A real growth: taken after the wait, at the least it stayed.
            (&[(0, 100.0), (1, 150.0), (5, 120.0), (11, 130.0)], 120.0),
            (&[(0, 100.0), (1, 150.0), (10, 150.0)], 100.0),
            (&[(0, 100.0), (1, 150.0), (11, 150.0)], 150.0),
        ];
        for (sums, want) in rows {
            let mut b = FleetBase::new(Watts(sums[0].1));
            for &(ms, w) in *sums {
                b = b.next(Watts(w), ms, 10);
            }
            assert_eq!(b.watts, Watts(*want), "{sums:?}");
        }
    }
}
