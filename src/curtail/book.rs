//! The budget book: which budget is in force, where it came from (a
//! command and its lease, the schedule, follow mode, a bad state file), and
//! the plan ids that name what was done for it. Which source wins:
//!
//! * a command (`set_budget`) replaces whatever is in force, until its
//!   lease runs out, when `lease_fallback` decides (hold it, resume, or
//!   hand over to follow mode);
//! * the schedule applies whenever no command or its fallback is in force;
//! * follow mode applies whenever no command is in force.
//!
//! Pure: the caller passes the time. The state file keeps what
//! [`Book::saved`] gives.

use super::effect::Clock;
use super::policy::{self, MinerView};
use super::schedule::{self, Amount, Window};
use super::scope::Scope;
use super::store::SavedBudget;
use super::LeaseFallback;
use crate::api::{BudgetSource, BudgetStatus, Cause, MetBy, Plan, Watts};
use std::time::{Duration, Instant};

/// The budget in force.
#[derive(Debug, Clone)]
pub struct Budget {
    pub amount: Amount,
    pub scope: Scope,
    pub source: BudgetSource,
    pub reason: String,
    pub lease_until: Option<Instant>,
    /// The same, as Unix milliseconds (what the state file keeps).
    pub lease_until_ms: Option<u64>,
    pub set_at_ms: u64,
    pub ramp_w_per_s: Option<f64>,
    /// None until judged after a change.
    pub met: Option<bool>,
    pub met_by: MetBy,
    /// The last plan applied for it (what its events name).
    pub plan_id: u64,
    /// The last verdict told by a budget_met / budget_not_met event.
    pub announced: Option<(bool, MetBy)>,
}

impl Budget {
    /// A budget with no lease and no ramp of its own, not judged yet.
    fn new(amount: Amount, scope: Scope, source: BudgetSource, reason: String, clock: Clock, plan_id: u64) -> Budget {
        Budget {
            amount,
            scope,
            source,
            reason,
            lease_until: None,
            lease_until_ms: None,
            set_at_ms: clock.unix_ms,
            ramp_w_per_s: None,
            met: None,
            met_by: MetBy::Estimated,
            plan_id,
            announced: None,
        }
    }
}

/// Watts of an amount over the miners in scope (a fraction is taken of
/// every miner in scope, parked or not).
pub fn amount_watts(amount: Amount, views: &[MinerView]) -> Watts {
    match amount {
        Amount::Watts(w) => Watts(w),
        Amount::Fraction(f) => policy::total_watts(views) * f,
    }
}

/// `set_budget`'s parameters.
#[derive(Debug, Clone)]
pub struct BudgetParams {
    pub amount: Amount,
    pub scope: Scope,
    pub lease: Option<Duration>,
    pub ramp_up: Option<Duration>,
    pub dry_run: bool,
    pub reason: String,
    /// Miners listed in the plan's `park` and `resume` (the counts are whole).
    pub max_listed: usize,
}

/// A command's lease that ran out: what it was, and what now stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub amount: Amount,
    pub scope: Scope,
    pub cause: Cause,
    pub fallback: LeaseFallback,
}

/// What a figure from follow mode did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// A command is in force: follow mode waits.
    Overridden,
    /// Follow mode's budget, unchanged.
    Same,
    /// Follow mode's budget, moved.
    Moved,
    /// Follow mode took over from no budget, the schedule or a fallback.
    Took,
}

#[derive(Debug)]
pub struct Book {
    budget: Option<Budget>,
    schedule: Vec<Window>,
    /// The last plan `set_budget` applied (kept in the state file).
    applied_plan: Option<Plan>,
    next_plan_id: u64,
}

impl Book {
    pub fn new(schedule: Vec<Window>) -> Book {
        Book { budget: None, schedule, applied_plan: None, next_plan_id: 1 }
    }

    /// A reload's schedule (the budget in force stays until the next tick).
    pub fn set_schedule(&mut self, schedule: Vec<Window>) {
        self.schedule = schedule;
    }

    pub fn in_force(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }

    /// The id the next plan gets.
    pub fn next_plan_id(&self) -> u64 {
        self.next_plan_id
    }

    /// Take the next plan id.
    pub fn take_plan_id(&mut self) -> u64 {
        self.next_plan_id += 1;
        self.next_plan_id - 1
    }

    /// The budget in force's plan and reason.
    pub fn cause(&self) -> Cause {
        self.budget.as_ref().map(|b| Cause { plan_id: b.plan_id, reason: b.reason.clone() }).unwrap_or_default()
    }

    /// A new plan id, for an action no budget plan decided.
    pub fn new_cause(&mut self, reason: String) -> Cause {
        Cause { plan_id: self.take_plan_id(), reason }
    }

    /// A plan was applied for the budget in force: its events name it.
    pub fn planned(&mut self, plan_id: u64) {
        if let Some(b) = self.budget.as_mut() {
            b.plan_id = plan_id;
        }
    }

    /// `set_budget` (not a dry run): it is in force from now, its lease
    /// counted from `clock`; `ramp_w_per_s` from its `ramp_up`.
    pub fn command(&mut self, clock: Clock, b: BudgetParams, ramp_w_per_s: Option<f64>, plan: Plan) {
        let mut new = Budget::new(b.amount, b.scope, BudgetSource::Command, b.reason, clock, plan.plan_id);
        new.lease_until = b.lease.map(|l| clock.at + l);
        new.lease_until_ms = b.lease.map(|l| clock.unix_ms + l.as_millis() as u64);
        new.ramp_w_per_s = ramp_w_per_s;
        self.budget = Some(new);
        self.applied_plan = Some(plan);
    }

    /// Cluster mode: this instance's allotment of the site budget (none: no
    /// limit). True when it moved.
    pub fn allot(&mut self, clock: Clock, watts: Option<Watts>, reason: String) -> bool {
        let Some(w) = watts else { return self.budget.take().is_some() };
        match self.budget.as_mut() {
            Some(b) if b.source == BudgetSource::Cluster => {
                let moved = b.amount != Amount::Watts(w.0);
                (b.amount, b.reason) = (Amount::Watts(w.0), reason);
                moved
            }
            _ => {
                let plan_id = self.budget.as_ref().map_or(0, |b| b.plan_id);
                self.budget =
                    Some(Budget::new(Amount::Watts(w.0), Scope::Site, BudgetSource::Cluster, reason, clock, plan_id));
                true
            }
        }
    }

    /// `resume_all`: no budget.
    pub fn clear(&mut self) {
        self.budget = None;
    }

    /// The state file could not be read and `on_bad_state = "park-all"`:
    /// 0 W over the site until a budget is set.
    pub fn bad_state(&mut self, clock: Clock, why: &str) {
        let reason = format!("{why}; no curtailable miner gets work until a budget is set");
        self.budget = Some(Budget::new(Amount::Watts(0.0), Scope::Site, BudgetSource::BadState, reason, clock, 0));
    }

    /// A command whose lease ran out by `now` gives way to `fallback`
    /// (`Hold` keeps it as `lease-fallback`; otherwise no budget stands and
    /// the caller resumes, or follow mode takes over).
    pub fn expire_lease(&mut self, now: Instant, fallback: LeaseFallback) -> Option<Expired> {
        let b = self.budget.as_mut()?;
        if b.source != BudgetSource::Command || b.lease_until.is_none_or(|t| now < t) {
            return None;
        }
        let cause = Cause { plan_id: b.plan_id, reason: b.reason.clone() };
        let expired = Expired { amount: b.amount, scope: b.scope.clone(), cause, fallback };
        match fallback {
            LeaseFallback::Hold => {
                b.source = BudgetSource::LeaseFallback;
                (b.lease_until, b.lease_until_ms) = (None, None);
            }
            LeaseFallback::Resume | LeaseFallback::Follow => self.budget = None,
        }
        Some(expired)
    }

    /// The schedule's budget for this time of day, when no command (or
    /// its fallback) is in force. True when the budget changed.
    pub fn follow_schedule(&mut self, clock: Clock) -> bool {
        if self.schedule.is_empty() || self.budget.as_ref().is_some_and(|b| b.source != BudgetSource::Schedule) {
            return false;
        }
        let want = schedule::active(&self.schedule, schedule::utc_second_of_day(clock.unix_ms));
        if want == self.budget.as_ref().map(|b| b.amount) {
            return false;
        }
        self.budget =
            want.map(|amount| Budget::new(amount, Scope::Site, BudgetSource::Schedule, "schedule".into(), clock, 0));
        true
    }

    /// Follow mode's figure, unless a command overrides it.
    pub fn follow(&mut self, clock: Clock, watts: Watts, reason: String) -> Followed {
        let watts = watts.0;
        match self.budget.as_mut() {
            Some(b) if b.source == BudgetSource::Command => Followed::Overridden,
            Some(b) if b.source == BudgetSource::Follow => {
                let moved = b.amount != Amount::Watts(watts);
                (b.amount, b.reason) = (Amount::Watts(watts), reason);
                if moved {
                    Followed::Moved
                } else {
                    Followed::Same
                }
            }
            _ => {
                let plan_id = self.budget.as_ref().map_or(0, |b| b.plan_id);
                let b = Budget::new(Amount::Watts(watts), Scope::Site, BudgetSource::Follow, reason, clock, plan_id);
                self.budget = Some(b);
                Followed::Took
            }
        }
    }

    /// A follow-mode budget restored without follow mode configured: dropped.
    pub fn drop_follow(&mut self) {
        if self.budget.as_ref().is_some_and(|b| b.source == BudgetSource::Follow) {
            self.budget = None;
        }
    }

    /// The budget judged met or not, as of now (what `status` shows).
    pub fn judge(&mut self, met: bool, met_by: MetBy) {
        if let Some(b) = self.budget.as_mut() {
            (b.met, b.met_by) = (Some(met), met_by);
        }
    }

    /// No verdict for now (status says null, no event is told).
    pub fn unjudge(&mut self) {
        if let Some(b) = self.budget.as_mut() {
            b.met = None;
        }
    }

    /// The verdict is to be told (as an event): true when it is news since
    /// the last one told for this budget.
    pub fn announce(&mut self) -> bool {
        match self.budget.as_mut() {
            Some(b) if b.met.is_some() && b.announced != b.met.map(|m| (m, b.met_by)) => {
                b.announced = b.met.map(|m| (m, b.met_by));
                true
            }
            _ => false,
        }
    }

    /// What the state file keeps of the book.
    pub fn saved(&self) -> (Option<SavedBudget>, Option<Plan>) {
        let budget = self.budget.as_ref().map(|b| SavedBudget {
            amount: b.amount,
            scope: b.scope.name(),
            source: b.source,
            reason: b.reason.clone(),
            set_at_ms: b.set_at_ms,
            lease_until_ms: b.lease_until_ms,
            ramp_w_per_s: b.ramp_w_per_s,
            plan_id: b.plan_id,
        });
        (budget, self.applied_plan.clone())
    }

    /// Take up what the state file kept: the budget (its lease as an
    /// absolute time, so one that ran out meanwhile falls back at the first
    /// tick) and the last plan; plan ids go on from both.
    pub fn restore(
        &mut self,
        clock: Clock,
        budget: Option<SavedBudget>,
        last_plan: Option<Plan>,
    ) -> Result<(), String> {
        if let Some(b) = budget {
            let scope = Scope::parse(&b.scope)?;
            let left = b.lease_until_ms.map(|t| Duration::from_millis(t.saturating_sub(clock.unix_ms)));
            let mut r = Budget::new(b.amount, scope, b.source, b.reason, clock, b.plan_id);
            r.lease_until = left.map(|l| clock.at + l);
            (r.lease_until_ms, r.set_at_ms, r.ramp_w_per_s) = (b.lease_until_ms, b.set_at_ms, b.ramp_w_per_s);
            self.budget = Some(r);
            self.next_plan_id = self.next_plan_id.max(b.plan_id + 1);
        }
        if let Some(p) = &last_plan {
            self.next_plan_id = self.next_plan_id.max(p.plan_id + 1);
        }
        self.applied_plan = last_plan;
        Ok(())
    }

    /// `status`'s budget: `budget_w` is the budget in watts over its scope
    /// now. Every key is there whatever is in force (null for no value).
    pub fn status(&self, now: Instant, budget_w: Option<Watts>) -> BudgetStatus {
        let Some(b) = &self.budget else { return BudgetStatus::NONE };
        BudgetStatus {
            source: b.source,
            watts: budget_w,
            scope: Some(b.scope.name()),
            reason: Some(b.reason.clone()),
            lease_expires_in_s: b.lease_until.map(|t| t.saturating_duration_since(now).as_secs_f64()),
            met: b.met,
            met_by: b.met.map(|_| b.met_by),
            set_at_ms: Some(b.set_at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curtail::ScheduleEntry;

    fn clock(t0: Instant, secs: u64) -> Clock {
        // 00:00 UTC on a day, plus `secs`.
        Clock { at: t0 + Duration::from_secs(secs), unix_ms: 1_796_428_800_000 + secs * 1000 }
    }

    /// A schedule of 40% from 00:00 to 01:00.
    fn book() -> Book {
        let e = ScheduleEntry { from: "00:00".into(), to: "01:00".into(), watts: None, fraction: Some(0.4) };
        Book::new(vec![Window::parse(&e).unwrap()])
    }

    fn plan(id: u64) -> Plan {
        serde_json::from_value(serde_json::json!({
            "plan_id": id, "dry_run": false, "scope": "site", "budget_w": 1000.0,
            "before": {"mining": 0, "parked": 0, "watts": 0.0},
            "expected": {"mining": 0, "parked": 0, "watts": 0.0},
            "budget_met": true, "park": [], "resume": [], "park_count": 0, "resume_count": 0,
            "lease_expires_in_s": null
        }))
        .unwrap()
    }

    fn params(amount: Amount, scope: Scope, lease_s: Option<u64>) -> BudgetParams {
        let lease = lease_s.map(Duration::from_secs);
        BudgetParams { amount, scope, lease, ramp_up: None, dry_run: false, reason: "cmd".into(), max_listed: 10 }
    }

    fn source(b: &Book) -> BudgetSource {
        b.in_force().map_or(BudgetSource::None, |b| b.source)
    }

    /// What a step does to the book.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The schedule at this second.
        Schedule,
        /// A command of this many watts with a lease of this many seconds.
        Command(f64, Option<u64>),
        /// A follow-mode figure.
        Follow(f64),
        /// The lease check, with this fallback.
        Lease(LeaseFallback),
        Clear,
    }
    use Step::*;

    #[test]
    fn which_source_is_in_force() {
        use BudgetSource as S;
        use LeaseFallback as F;
        // Each row: (second, step, source in force after, amount after).
        type Row = (u64, Step, BudgetSource, Option<Amount>);
        let tables: &[(&str, &[Row])] = &[
            (
                "the schedule applies with nothing else, and ends with its window",
                &[(0, Schedule, S::Schedule, Some(Amount::Fraction(0.4))), (3600, Schedule, S::None, None)],
            ),
            (
                "a command overrides the schedule; held after its lease, the schedule still waits",
                &[
                    (0, Schedule, S::Schedule, Some(Amount::Fraction(0.4))),
                    (10, Command(500.0, Some(60)), S::Command, Some(Amount::Watts(500.0))),
                    (20, Schedule, S::Command, Some(Amount::Watts(500.0))),
                    (69, Lease(F::Hold), S::Command, Some(Amount::Watts(500.0))),
                    (70, Lease(F::Hold), S::LeaseFallback, Some(Amount::Watts(500.0))),
                    (80, Schedule, S::LeaseFallback, Some(Amount::Watts(500.0))),
                ],
            ),
            (
                "a lease that falls back to resume leaves the schedule to apply again",
                &[
                    (0, Command(500.0, Some(60)), S::Command, Some(Amount::Watts(500.0))),
                    (60, Lease(F::Resume), S::None, None),
                    (61, Schedule, S::Schedule, Some(Amount::Fraction(0.4))),
                ],
            ),
            (
                "follow mode waits while a command is in force, and takes over after it",
                &[
                    (0, Follow(900.0), S::Follow, Some(Amount::Watts(900.0))),
                    (1, Command(500.0, Some(60)), S::Command, Some(Amount::Watts(500.0))),
                    (2, Follow(800.0), S::Command, Some(Amount::Watts(500.0))),
                    (61, Lease(F::Follow), S::None, None),
                    (62, Follow(800.0), S::Follow, Some(Amount::Watts(800.0))),
                ],
            ),
            (
                "follow mode takes over from the schedule (both configured)",
                &[
                    (0, Schedule, S::Schedule, Some(Amount::Fraction(0.4))),
                    (0, Follow(700.0), S::Follow, Some(Amount::Watts(700.0))),
                    (1, Schedule, S::Follow, Some(Amount::Watts(700.0))),
                ],
            ),
            (
                "resume_all clears a command; a command without a lease never expires",
                &[
                    (0, Command(500.0, None), S::Command, Some(Amount::Watts(500.0))),
                    (86_400, Lease(F::Resume), S::Command, Some(Amount::Watts(500.0))),
                    (86_400, Clear, S::None, None),
                ],
            ),
        ];
        let t0 = Instant::now();
        for (what, rows) in tables {
            let mut b = book();
            for (n, &(secs, step, want_source, want_amount)) in rows.iter().enumerate() {
                let c = clock(t0, secs);
                match step {
                    Schedule => {
                        b.follow_schedule(c);
                    }
                    Command(w, lease) => {
                        let id = b.take_plan_id();
                        b.command(c, params(Amount::Watts(w), Scope::Site, lease), None, plan(id));
                    }
                    Follow(w) => {
                        b.follow(c, Watts(w), "follow".into());
                    }
                    Lease(f) => {
                        b.expire_lease(c.at, f);
                    }
                    Clear => b.clear(),
                }
                let got = (source(&b), b.in_force().map(|x| x.amount));
                assert_eq!(got, (want_source, want_amount), "{what}: row {n} ({step:?} at {secs} s)");
            }
        }
    }

    #[test]
    fn follow_says_what_it_did_and_met_is_news_once() {
        let t0 = Instant::now();
        let mut b = Book::new(Vec::new());
        let c = clock(t0, 0);
        assert_eq!(b.follow(c, Watts(900.0), "f".into()), Followed::Took);
        assert_eq!(b.follow(c, Watts(900.0), "f".into()), Followed::Same);
        assert_eq!(b.follow(c, Watts(800.0), "f".into()), Followed::Moved);
        assert!(b.in_force().unwrap().met.is_none(), "not judged yet");
        b.judge(true, MetBy::Estimated);
        assert!(b.announce());
        b.judge(true, MetBy::Estimated);
        assert!(!b.announce(), "the same verdict is not news");
        b.judge(false, MetBy::Estimated);
        b.judge(true, MetBy::Estimated);
        assert!(!b.announce(), "nor is one that changed and came back before it was told");
        b.judge(true, MetBy::Measured);
        assert!(b.announce(), "judged on something else is");
        let id = b.take_plan_id();
        b.command(c, params(Amount::Watts(1.0), Scope::Site, None), None, plan(id));
        assert_eq!(b.follow(c, Watts(700.0), "f".into()), Followed::Overridden);
        assert!(b.status(c.at, Some(Watts(1.0))).met.is_none(), "a new command is judged afresh");
    }

    #[test]
    fn the_saved_book_restores_with_its_lease_and_plan_ids_go_on() {
        let t0 = Instant::now();
        let mut b = Book::new(Vec::new());
        let c = clock(t0, 0);
        for _ in 0..6 {
            b.take_plan_id();
        }
        let id = b.take_plan_id();
        let scope = Scope::parse("group:hall-a").unwrap();
        let mut p = params(Amount::Fraction(0.5), scope.clone(), Some(600));
        p.reason = "dr".into();
        b.command(c, p, None, plan(id));
        let (budget, last) = b.saved();
        // Restored 100 s later, in another process (another monotonic base).
        let t1 = Instant::now();
        let later = Clock { at: t1, unix_ms: c.unix_ms + 100_000 };
        let mut r = Book::new(Vec::new());
        r.restore(later, budget, last).unwrap();
        let rb = r.in_force().unwrap();
        assert_eq!(
            (rb.amount, &rb.scope, rb.source, rb.plan_id),
            (Amount::Fraction(0.5), &scope, BudgetSource::Command, 7)
        );
        assert_eq!(rb.lease_until, Some(t1 + Duration::from_secs(500)), "the lease keeps its end, not its length");
        assert_eq!(r.take_plan_id(), 8);
        assert_eq!(r.expire_lease(t1 + Duration::from_secs(499), LeaseFallback::Hold), None);
        let ex = r.expire_lease(t1 + Duration::from_secs(500), LeaseFallback::Hold).unwrap();
        assert_eq!((ex.amount, ex.cause.plan_id, ex.cause.reason.as_str()), (Amount::Fraction(0.5), 7, "dr"));
        // A saved scope this build cannot read is refused, not guessed.
        let (mut bad, _) = b.saved();
        bad.as_mut().unwrap().scope = "hall-a".into();
        assert!(Book::new(Vec::new()).restore(later, bad, None).is_err());
    }
}
