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

/// What an instance's miners draw at full power, connected or away for
/// less than `lease_s`.
pub fn fleet_w(r: &Report) -> Watts {
    r.fleet_w.unwrap_or_else(|| r.protected_w + r.bands.iter().map(|b| b.watts).sum())
}

/// The site's fleet, as the reports show it (a fraction is taken of it):
/// each instance's, less the part away that connected to another meanwhile.
///
/// When every report names its moving machines, a machine away at one and
/// connected anew at another (or coming back) is taken off once, by name;
/// one away and connected nowhere yet is on its way and counts. Otherwise
/// (a report names none) the smaller of the two sums is taken off: never
/// too little, and too much while machines away have not come back (the
/// cluster sim-check's late recoveries: with every park the site's
/// fleet looked smaller for 2 `lease_s`, and so did a fraction of it).
/// A miner parked by closing its connection that comes back to another
/// instance is away at one and new at the other for up to `lease_s`, and
/// with every park one miner is (cluster sim-check seeds 53, 74: miners
/// parked one after another kept a sum 3 kW over the fleet for longer than
/// the base waits, and the site drew over its budget). Machines new to the
/// site meanwhile only make the sum the smaller (they count once their
/// arrival is older than `lease_s`).
pub fn fleet_base_w(reports: &[Report]) -> Watts {
    let all: Watts = reports.iter().map(fleet_w).sum();
    let named: Option<Vec<&super::plan::Moving>> = reports
        .iter()
        .map(|r| r.moving.as_ref())
        .collect::<Option<Vec<_>>>()
        .map(|l| l.into_iter().flatten().collect());
    if let Some(named) = named {
        let mut by: BTreeMap<&str, (Watts, Watts)> = BTreeMap::new();
        for m in named {
            let e = by.entry(&m.machine).or_default();
            if m.away {
                e.0 += m.watts;
            } else {
                e.1 += m.watts;
            }
        }
        return all - by.values().map(|(away, back)| away.min(*back)).sum();
    }
    let part = |f: fn(&Report) -> Option<Watts>| reports.iter().filter_map(f).sum::<Watts>();
    let (away, arrived) = (part(|r| r.away_w), part(|r| r.arrived_w));
    all - away.min(arrived)
}

/// What `set_budget` answers in cluster mode: the site's figures from the
/// instances' reports (the miners of other instances are not listed).
pub fn site_plan(reports: &[Report], amount: Amount, dry_run: bool) -> Plan {
    let total = fleet_base_w(reports);
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
    /// The resume hysteresis (`curtail.hysteresis_fraction`): the miners
    /// planned fit in the budget less it, as on one instance holding them
    /// all, and each instance's last miner then fits under its allotment
    /// less it.
    pub hysteresis: f64,
    /// This planner planned in its previous round too (false: newly
    /// elected, or etcd was out of its reach).
    pub continuous: bool,
}

/// The planner's next allotments.
///
/// An instance whose report went away (its lease ran out, or etcd revoked
/// every lease at once) is counted as drawing its grant for a grace period
/// of `lease_s`, and the fleet base does not fall for that long (the miners
/// of an instance killed reconnect to the others meanwhile). A planner
/// that was not planning just before (newly elected, or back from an etcd
/// it could not reach) saw nothing meanwhile: every grace starts again, and
/// the base does not fall for one grace period either (the instances it
/// does not see yet come back within it; the first instance back after an
/// outage takes the fraction of the site as it was, not of itself alone).
pub fn allotments(p: Planning) -> Allotments {
    let now = p.clock.unix_ms;
    let alive: BTreeSet<&str> = p.reports.iter().map(|r| r.instance.as_str()).collect();
    let granted = p.prev.map(|a| a.grants.clone()).unwrap_or_default();
    // An instance alive whose lease etcd revoked writes its report again
    // within a third of lease_s and a round or two; one cut off from etcd
    // with on_lost = "shed" has shed once it failed for lease_s: its grant
    // is counted that long (cluster sim-check seed 4: with half lease_s, an
    // instance whose lease was revoked still drew its grant, on a loaded
    // machine, when the planner gave it away).
    let grace_ms = (p.lease.as_millis() as u64).max(1000);
    let mut published = p.prev.map(|a| a.published.clone()).unwrap_or_default();
    // What each instance may enforce beyond its report: the grants
    // published since the allotments it says it took (its report shows
    // what it took; none: every grant listed, as for one that left).
    let owed_of = |name: &str, taken: Option<u64>| -> Option<Watts> {
        published.get(name).and_then(|list| {
            list.iter()
                .filter(|(at, _)| taken.is_none_or(|t| *at > t))
                .map(|(_, g)| g.unwrap_or(Watts(f64::INFINITY)))
                .reduce(Watts::max)
        })
    };
    let owed: BTreeMap<String, Watts> =
        p.reports.iter().filter_map(|r| Some((r.instance.clone(), owed_of(&r.instance, r.taken_at_ms)?))).collect();
    let mut leaving = p.prev.map(|a| a.leaving.clone()).unwrap_or_default();
    if !p.continuous {
        leaving.values_mut().for_each(|(_, since)| *since = now);
    }
    let mut newly_leaving = false;
    for (name, g) in &granted {
        if !alive.contains(name.as_str()) {
            // Counted at the most it may enforce.
            let most = match (*g, owed_of(name, None)) {
                (None, _) | (_, Some(Watts(f64::INFINITY))) => None,
                (Some(g), o) => Some(o.map_or(g, |o| o.max(g))),
            };
            if !leaving.contains_key(name) {
                leaving.insert(name.clone(), (most, now));
                newly_leaving = true;
            }
        }
    }
    leaving.retain(|name, (_, since)| !alive.contains(name.as_str()) && now < *since + grace_ms);
    let raw = fleet_base_w(p.reports);
    let mut base = p.prev.and_then(|a| a.base).unwrap_or(FleetBase::new(raw));
    // An instance just gone, or a planner that saw nothing for a while:
    // the base does not fall for a grace period (the miners of an
    // instance killed reconnect to the others within it; an instance
    // blinking reports again).
    if !p.continuous || newly_leaving {
        base.hold_until_ms = Some(now + grace_ms);
    }
    let base = base.next(raw, now, 2 * grace_ms + 1000, grace_ms);
    let budget_w = p.budget.map(|(amount, _, _)| match amount {
        Amount::Watts(w) => Watts(w),
        Amount::Fraction(f) => base.watts * f,
    });
    let leaving_w = match p.unreadable {
        0 => Watts(leaving.values().map(|(g, _)| g.map_or(f64::INFINITY, |w| w.0)).sum()),
        // An instance whose draw is unknown: lower grants only.
        _ => Watts(f64::INFINITY),
    };
    let grants = plan::grants_owing(budget_w, p.hysteresis, p.reports, &granted, leaving_w, &owed);
    // The grants published, per instance, since the allotments its report
    // says it took (a change only; at most MAX_PUBLISHED, the oldest
    // folded into the next at the larger of the two).
    for r in p.reports {
        let list = published.entry(r.instance.clone()).or_default();
        // The grant it took stays listed (the last published at or before
        // it took them): if it leaves, it is counted at least at that
        // (cluster sim-check seed 498: etcd lost every lease, and the
        // new planner counted an instance gone at the lower grant it had
        // not taken, not the one it enforced).
        if let Some(t) = r.taken_at_ms {
            let took = list.iter().rposition(|(at, _)| *at <= t);
            list.drain(..took.unwrap_or(0));
        }
        let g = grants.get(&r.instance).copied().flatten();
        if list.last().is_none_or(|(_, last)| *last != g) {
            list.push((now, g));
        }
        while list.len() > MAX_PUBLISHED {
            let (_, a) = list.remove(0);
            let b = &mut list[0].1;
            *b = match (a, *b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    published.retain(|name, _| alive.contains(name.as_str()) || leaving.contains_key(name));
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
        published,
        base: Some(base),
        at_ms: now,
    }
}

/// Grants kept per instance in [`Allotments::published`].
pub const MAX_PUBLISHED: usize = 16;

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
    /// The sum has been under `watts` since then (Unix ms), at most this.
    #[serde(default)]
    pub falling: Option<(Watts, u64)>,
    /// It does not fall before then (an instance just gone, or a planner
    /// that was not planning just before: the instances it does not see
    /// yet come back, or their miners reconnect elsewhere, meanwhile).
    #[serde(default)]
    pub hold_until_ms: Option<u64>,
}

impl FleetBase {
    pub fn new(watts: Watts) -> FleetBase {
        FleetBase { watts, rising: None, falling: None, hold_until_ms: None }
    }

    /// The base once the sum reads `raw` at `now_ms`: it rises to the
    /// least the sum was over `rise_after_ms` once it stayed above that
    /// long, and falls to the most it was over `fall_after_ms` once it
    /// stayed under that long and no hold is on (a dip while miners
    /// reconnect is not taken: it would park them, then wait to rise).
    pub fn next(self, raw: Watts, now_ms: u64, rise_after_ms: u64, fall_after_ms: u64) -> FleetBase {
        let hold = self.hold_until_ms.filter(|t| now_ms < *t);
        let same = FleetBase { hold_until_ms: hold, ..FleetBase::new(self.watts) };
        if raw == self.watts {
            return same;
        }
        // Held: a fall is counted from the end of the hold (the miners of
        // an instance killed take seconds more to come back to the others;
        // cluster sim-check seed 7).
        if raw < self.watts && hold.is_some() {
            return same;
        }
        if raw < self.watts {
            let (most, since) = match self.falling {
                Some((w, since)) => (w.max(raw), since),
                None => (raw, now_ms),
            };
            return if hold.is_none() && now_ms.saturating_sub(since) >= fall_after_ms {
                FleetBase::new(most)
            } else {
                FleetBase { falling: Some((most, since)), ..same }
            };
        }
        let (least, since) = match self.rising {
            Some((w, since)) => (w.min(raw), since),
            None => (raw, now_ms),
        };
        if now_ms.saturating_sub(since) >= rise_after_ms {
            FleetBase { hold_until_ms: hold, ..FleetBase::new(least) }
        } else {
            FleetBase { rising: Some((least, since)), ..same }
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
            bands: vec![Band {
                j_per_th: JoulesPerTh(20.0),
                watts: Watts(watts),
                idle: Watts::ZERO,
                miners,
                lowerable: false,
            }],
            mining: miners as usize,
            parked: 0,
            fleet_w: None,
            away_w: None,
            arrived_w: None,
            moving: None,
            taken_at_ms: None,
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
            hysteresis: 0.0,
            continuous: true,
        }
    }

    /// Issue 33, case 6: etcd came back from a freeze having revoked every
    /// lease; the first instance back saw only its own report and took the
    /// fraction of its own fleet. A planner that was not planning just
    /// before keeps the base for a grace period.
    #[test]
    fn a_fraction_is_taken_of_the_site_as_it_was_known_after_an_outage() {
        let all = [report("a", 9_000.0, 3), report("b", 9_000.0, 3), report("c", 9_000.0, 3)];
        let before = allotments(planning(&all, None, 1_000));
        assert_eq!(before.budget_w, Some(Watts(13_500.0)));
        // Back after the outage, only a's report is there: b and c are
        // leaving, counted at their grants, and the base holds.
        let back = |r, prev, ms| allotments(Planning { continuous: false, ..planning(r, prev, ms) });
        let alone = back(&all[..1], Some(&before), 20_000);
        assert_eq!(alone.budget_w, Some(Watts(13_500.0)), "the fraction of the site known, not of a alone");
        assert_eq!(alone.leaving.len(), 2);
        // Within the grace (lease_s, 4 s) b and c report again: nothing moved.
        let again = allotments(planning(&all, Some(&alone), 23_900));
        assert_eq!(again.budget_w, Some(Watts(13_500.0)));
        assert!(again.leaving.is_empty());
        // Had they not, past the grace they are gone, and once a alone has
        // been the site for lease_s more (the miners of an instance killed
        // take seconds to come back), a alone is the site.
        let past = allotments(planning(&all[..1], Some(&alone), 24_000));
        assert!(past.leaving.is_empty());
        assert_eq!(past.budget_w, Some(Watts(13_500.0)), "the fall counts from the end of the grace");
        let gone = allotments(planning(&all[..1], Some(&past), 28_000));
        assert_eq!(gone.budget_w, Some(Watts(4_500.0)));
        // And their return counts once it has lasted two lease_s and a
        // second (9 s): a failover counts moved miners twice until then.
        let returned = allotments(planning(&all, Some(&gone), 29_000));
        assert_eq!(returned.budget_w, Some(Watts(4_500.0)));
        let still = allotments(planning(&all, Some(&returned), 37_900));
        assert_eq!(still.budget_w, Some(Watts(4_500.0)));
        let later = allotments(planning(&all, Some(&still), 38_000));
        assert_eq!(later.budget_w, Some(Watts(13_500.0)));
    }

    /// Issue 33 (cluster sim-check seed 79): a giver whose report lags is
    /// counted at the grant it may already enforce, so the taker grows only
    /// once the giver's report says it took its lowered grant.
    #[test]
    fn a_giver_whose_report_lags_counts_at_the_grant_it_may_enforce() {
        let budget = Some((Amount::Watts(9_000.0), BudgetSource::Command, "w"));
        let g = |x: &Allotments, n: &str| x.grants[n].unwrap().0;
        let at = |r: &mut Report, w: f64, taken: u64| {
            (r.limit_w, r.drawn_w, r.taken_at_ms) = (Some(Watts(w)), Watts(w), Some(taken))
        };
        // Each has 2 miners of 3 kW; a's at 10 J/TH, b's at 20: a is given
        // 6 kW, b 3 kW (at 500 ms); their reports show what they took
        // before.
        let mut a = report("a", 6_000.0, 2);
        a.bands[0].j_per_th = JoulesPerTh(10.0);
        let mut b = report("b", 6_000.0, 2);
        at(&mut a, 3_000.0, 400);
        at(&mut b, 3_000.0, 400);
        let plan =
            |r: &[Report], prev: Option<&Allotments>, ms| allotments(Planning { budget, ..planning(r, prev, ms) });
        let p0 = plan(&[a.clone(), b.clone()], None, 500);
        let p1 = plan(&[a.clone(), b.clone()], Some(&p0), 1_000);
        assert_eq!((g(&p1, "a"), g(&p1, "b")), (6_000.0, 3_000.0));
        // a takes its 6 kW, but its report is late: it still says 3 kW,
        // taken at 400 ms. Meanwhile b's miners become the efficient ones:
        // a is lowered to 3 kW at once, and b grows only once a says it took
        // that (counted at the 6 kW it may enforce, not its stale 3 kW).
        b.bands[0].j_per_th = JoulesPerTh(5.0);
        let p2 = plan(&[a.clone(), b.clone()], Some(&p1), 2_000);
        assert_eq!(g(&p2, "a"), 3_000.0);
        assert!(6_000.0 + g(&p2, "b") <= 9_000.0 + 1e-6, "a may draw 6 kW: {:?}", p2.grants);
        // a reports it took p2's grant and is under it: b grows.
        at(&mut a, 3_000.0, p2.at_ms);
        let p3 = plan(&[a, b], Some(&p2), 3_000);
        assert_eq!((g(&p3, "a"), g(&p3, "b")), (3_000.0, 6_000.0));
    }

    /// A miner parked by closing its connection is away at the instance
    /// it left and new at the one it came back to: the site counts it
    /// once (cluster sim-check seeds 53, 74: miners parked one after
    /// another, each counted twice for lease_s, kept the sum over the
    /// fleet and the site over its budget). Table: (fleet, away, arrived)
    /// per instance; the site's fleet.
    #[test]
    fn a_miner_on_its_way_between_instances_is_counted_once() {
        type Parts = &'static [(f64, f64, f64)];
        let rows: &[(Parts, f64)] = &[
            // Nothing moving.
            (&[(9_000.0, 0.0, 0.0), (6_000.0, 0.0, 0.0)], 15_000.0),
            // 3 kW left a (still counted there) for b.
            (&[(9_000.0, 3_000.0, 0.0), (9_000.0, 0.0, 3_000.0)], 15_000.0),
            // Two moves crossing, of different sizes: counted at the least.
            (&[(9_000.0, 3_000.0, 2_000.0), (8_000.0, 2_000.0, 3_000.0)], 12_000.0),
            // New miners, nobody away: all of them.
            (&[(9_000.0, 0.0, 9_000.0), (6_000.0, 0.0, 6_000.0)], 15_000.0),
            // Away, not back yet anywhere: counted (it comes back within
            // seconds).
            (&[(9_000.0, 3_000.0, 0.0), (6_000.0, 0.0, 0.0)], 15_000.0),
        ];
        for (parts, want) in rows {
            let reports: Vec<Report> = parts
                .iter()
                .enumerate()
                .map(|(k, &(fleet, away, arrived))| Report {
                    fleet_w: Some(Watts(fleet)),
                    away_w: Some(Watts(away)),
                    arrived_w: Some(Watts(arrived)),
                    ..report(&format!("i{k}"), fleet, 1)
                })
                .collect();
            assert_eq!(fleet_base_w(&reports), Watts(*want), "{parts:?}");
        }
    }

    /// Named, a machine moving is taken off once by name: one away and
    /// connected nowhere yet counts, and so does one new to the site
    /// while another is away (by the sums alone it would be taken off
    /// against it: the fleet looked 3 kW smaller, and a fraction of it
    /// too). A report that names none: the sums, as before. Table:
    /// (fleet, [(machine, watts, away)]) per instance, named or not; the
    /// site's fleet.
    #[test]
    fn machines_moving_are_counted_once_by_name() {
        type Parts = &'static [(f64, &'static [(&'static str, f64, bool)], bool)];
        let rows: &[(Parts, f64)] = &[
            // w.1 left a (still counted there) for b.
            (&[(9_000.0, &[("w.1", 3_000.0, true)], true), (9_000.0, &[("w.1", 3_000.0, false)], true)], 15_000.0),
            // Crossing: w.1 a to b, w.2 b to a.
            (
                &[
                    (9_000.0, &[("w.1", 3_000.0, true), ("w.2", 2_000.0, false)], true),
                    (8_000.0, &[("w.2", 2_000.0, true), ("w.1", 3_000.0, false)], true),
                ],
                12_000.0,
            ),
            // w.1 on its way from a; w.3 new to the site at b.
            (&[(9_000.0, &[("w.1", 3_000.0, true)], true), (9_000.0, &[("w.3", 3_000.0, false)], true)], 18_000.0),
            // w.1 back to a, where it was parked (its row there), and no
            // one counts it away.
            (&[(9_000.0, &[("w.1", 3_000.0, false)], true), (6_000.0, &[], true)], 15_000.0),
            // The same with b naming none (too many, or an older build):
            // the smaller sum comes off.
            (&[(9_000.0, &[("w.1", 3_000.0, true)], true), (9_000.0, &[("w.3", 3_000.0, false)], false)], 15_000.0),
        ];
        for (parts, want) in rows {
            let reports: Vec<Report> = parts
                .iter()
                .enumerate()
                .map(|(k, &(fleet, moving, named))| {
                    let sum = |away: bool| Watts(moving.iter().filter(|m| m.2 == away).map(|m| m.1).sum());
                    let list = moving.iter().map(|&(machine, w, away)| super::super::plan::Moving {
                        machine: format!("{machine}@127.0.0.1"),
                        watts: Watts(w),
                        away,
                    });
                    Report {
                        fleet_w: Some(Watts(fleet)),
                        away_w: Some(sum(true)),
                        arrived_w: Some(sum(false)),
                        moving: named.then(|| list.collect()),
                        ..report(&format!("i{k}"), fleet, 1)
                    }
                })
                .collect();
            assert_eq!(fleet_base_w(&reports), Watts(*want), "{parts:?}");
        }
    }

    /// Cluster sim-check seed 498: an instance took a grant, was lowered
    /// in allotments it had not taken yet, and left (etcd lost every
    /// lease): it is counted at the grant it took, which it enforces.
    #[test]
    fn an_instance_leaving_is_counted_at_the_grant_it_took() {
        let budget = Some((Amount::Watts(9_000.0), BudgetSource::Command, "w"));
        let plan = |r: &[Report], prev: Option<&Allotments>, ms, continuous| {
            allotments(Planning { budget, continuous, ..planning(r, prev, ms) })
        };
        // a's miners are the efficient ones: a is given 6 kW, b 3 kW.
        let mut a = report("a", 6_000.0, 2);
        a.bands[0].j_per_th = JoulesPerTh(10.0);
        let b = report("b", 6_000.0, 2);
        let (mut a0, mut b0) = (a.clone(), b.clone());
        (a0.limit_w, a0.drawn_w, b0.limit_w, b0.drawn_w) = (Some(Watts(0.0)), Watts(0.0), Some(Watts(0.0)), Watts(0.0));
        let p0 = plan(&[a0.clone(), b0.clone()], None, 500, true);
        let p1 = plan(&[a0, b0], Some(&p0), 700, true);
        assert_eq!(p1.grants["a"], Some(Watts(6_000.0)));
        // a took them and says so.
        let (mut a1, mut b1) = (a.clone(), b.clone());
        (a1.limit_w, a1.drawn_w, a1.taken_at_ms) = (Some(Watts(6_000.0)), Watts(6_000.0), Some(p1.at_ms));
        (b1.limit_w, b1.drawn_w, b1.taken_at_ms) = (Some(Watts(3_000.0)), Watts(3_000.0), Some(p1.at_ms));
        // b's miners become the efficient ones: a is lowered, b is not
        // raised yet (a has not taken it).
        b1.bands[0].j_per_th = JoulesPerTh(5.0);
        let p2 = plan(&[a1.clone(), b1.clone()], Some(&p1), 1_000, true);
        assert_eq!(p2.grants["a"], Some(Watts(3_000.0)));
        // Every lease lost: a new planner (b) sees only itself. a is
        // leaving, counted at the 6 kW it took: b stays at 3 kW.
        let p3 = plan(&[b1], Some(&p2), 2_000, false);
        assert_eq!(p3.leaving.get("a").map(|l| l.0), Some(Some(Watts(6_000.0))));
        assert_eq!(p3.grants["b"], Some(Watts(3_000.0)));
    }

    /// Table: the base after a series of sums (ms, watts), rising after
    /// 10 ms, falling after 5.
    #[test]
    fn the_fleet_base_rises_and_falls_only_to_what_it_stayed_at() {
        let rows: &[(&[(u64, f64)], f64)] = &[
            // A dip shorter than the wait: never taken.
            (&[(0, 100.0), (1, 80.0), (4, 80.0), (5, 100.0), (30, 100.0)], 100.0),
            // A fall: taken after the wait, at the most it stayed.
            (&[(0, 100.0), (1, 80.0), (3, 90.0), (6, 85.0)], 90.0),
            (&[(0, 100.0), (1, 80.0), (5, 80.0)], 100.0),
            (&[(0, 100.0), (1, 80.0), (6, 80.0)], 80.0),
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
                b = b.next(Watts(w), ms, 10, 5);
            }
            assert_eq!(b.watts, Watts(*want), "{sums:?}");
        }
    }
}
