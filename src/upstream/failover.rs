//! Which pool URL to use next. A pure state machine: the connection task
//! feeds it events and sleeps for the delays it returns.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Failover {
    urls: usize,
    current: usize,
    /// Consecutive failures since the last established session.
    failures: usize,
    backoff_initial: Duration,
    backoff_max: Duration,
    primary_stable: Duration,
    /// While on a fallback: since when the primary has answered every probe.
    primary_up_since: Option<Instant>,
    /// URLs that refused the account (bad credentials), until a session is
    /// established on that URL: a fallback's session does not clear the
    /// primary's refusal, so probes do not bring miners back to a pool that
    /// will refuse them again.
    refused: Vec<bool>,
}

impl Failover {
    pub fn new(urls: usize, backoff_initial: Duration, backoff_max: Duration, primary_stable: Duration) -> Self {
        Failover {
            urls: urls.max(1),
            current: 0,
            failures: 0,
            backoff_initial,
            backoff_max,
            primary_stable,
            primary_up_since: None,
            refused: vec![false; urls.max(1)],
        }
    }

    /// Index of the URL to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    pub fn on_primary(&self) -> bool {
        self.current == 0
    }

    /// A session was established on the current URL.
    pub fn established(&mut self) {
        self.failures = 0;
        self.primary_up_since = None;
        self.refused[self.current] = false;
    }

    /// Whether the primary is worth probing: on a fallback, and the primary
    /// did not refuse the account. A refusing primary is tried again when
    /// the fallbacks fail, or after a config reload (new credentials).
    pub fn probes_primary(&self) -> bool {
        !self.on_primary() && !self.refused[0]
    }

    /// The current URL refused the account (bad credentials, an unknown
    /// user): a retry would meet the same answer, so this is not a blip.
    /// Moves to the next URL and returns the wait: none when that URL has
    /// not refused too, else `backoff_max` (the operator has to fix the
    /// config; the pool is asked again now and then, not hammered).
    pub fn refused(&mut self) -> Duration {
        self.refused[self.current] = true;
        self.primary_up_since = None;
        // Past the quick same-URL retry of `failed`.
        self.failures = self.failures.max(1) + 1;
        self.current = (self.current + 1) % self.urls;
        if self.refused[self.current] {
            self.backoff_max
        } else {
            Duration::ZERO
        }
    }

    /// The current URL failed (refused, timed out, or a session ended). Moves
    /// to the next URL and returns how long to wait before trying it. The
    /// first failure after a working session retries the same URL at once
    /// (a transient drop); after that each URL is tried in turn, and a full
    /// pass of failures backs off exponentially.
    pub fn failed(&mut self) -> Duration {
        self.failures += 1;
        self.primary_up_since = None;
        if self.failures == 1 {
            return Duration::ZERO;
        }
        self.current = (self.current + 1) % self.urls;
        let moves = self.failures - 1;
        if moves < self.urls {
            return Duration::ZERO; // first pass over the list: no waiting
        }
        let exp = (moves / self.urls - 1).min(16) as u32;
        (self.backoff_initial * 2u32.pow(exp)).min(self.backoff_max)
    }

    /// Result of probing the primary while on a fallback. Returns true when
    /// it has been up long enough to switch back.
    pub fn primary_probe(&mut self, up: bool, now: Instant) -> bool {
        if !self.probes_primary() {
            return false;
        }
        if !up {
            self.primary_up_since = None;
            return false;
        }
        let since = *self.primary_up_since.get_or_insert(now);
        now.duration_since(since) >= self.primary_stable
    }

    /// Switch to the primary (after a successful probe period).
    pub fn return_to_primary(&mut self) {
        self.current = 0;
        self.failures = 0;
        self.primary_up_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fo(n: usize) -> Failover {
        Failover::new(n, Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(10))
    }

    #[test]
    fn retries_once_then_walks_the_list_then_backs_off() {
        let mut f = fo(2);
        assert_eq!((f.current(), f.failed()), (0, Duration::ZERO)); // retry primary at once
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(), Duration::ZERO);
        assert_eq!(f.current(), 1); // fallback
        let d = f.failed();
        assert_eq!(f.current(), 0);
        assert!(d > Duration::ZERO, "a full pass failed: back off");
        let mut last = d;
        for _ in 0..20 {
            let d = f.failed();
            assert!(d <= Duration::from_secs(1));
            last = last.max(d);
        }
        assert_eq!(last, Duration::from_secs(1));
        f.established();
        assert_eq!(f.failed(), Duration::ZERO);
    }

    /// (urls, events: true = refused, false = failed; (url, wait ms) after each)
    type Row = (usize, &'static [bool], &'static [(usize, u64)]);

    #[test]
    fn a_refused_account_moves_on_at_once_and_never_hammers() {
        let table: &[Row] = &[
            // One URL refusing: no quick retry, wait the maximum each time.
            (1, &[true, true], &[(0, 1000), (0, 1000)]),
            // Two URLs: the next at once, then both refused: the maximum.
            (2, &[true, true, true], &[(1, 0), (0, 1000), (1, 1000)]),
            // A blip after a refusal keeps walking the list.
            (2, &[true, false], &[(1, 0), (0, 100)]),
        ];
        for (n, (urls, events, expect)) in table.iter().enumerate() {
            let mut f = fo(*urls);
            for (i, (refused, want)) in events.iter().zip(expect.iter()).enumerate() {
                let wait = if *refused { f.refused() } else { f.failed() };
                assert_eq!((f.current(), wait), (want.0, Duration::from_millis(want.1)), "row {n} event {i}");
            }
        }
        // A session established on a URL forgets its refusal.
        let mut f = fo(1);
        f.refused();
        f.established();
        assert_eq!(f.failed(), Duration::ZERO, "a blip after a good session retries at once");
    }

    /// A primary that refused the account is not probed back to while a
    /// fallback works (each return would refuse again and move every miner
    /// twice); it is tried again when the fallback fails.
    #[test]
    fn a_refusing_primary_is_not_probed_back_to() {
        let mut f = fo(2);
        assert_eq!(f.refused(), Duration::ZERO);
        assert_eq!(f.current(), 1);
        f.established();
        assert!(!f.probes_primary());
        let t0 = Instant::now();
        assert!(!f.primary_probe(true, t0));
        assert!(!f.primary_probe(true, t0 + Duration::from_secs(60)), "never returns on probes");
        // The fallback fails: the primary is asked again.
        f.failed();
        f.failed();
        assert_eq!(f.current(), 0);
        f.established();
        assert!(f.on_primary() && !f.probes_primary());
        // Its refusal is forgotten once it took a session: later outages
        // return to it as usual.
        f.failed();
        f.failed();
        assert_eq!(f.current(), 1);
        f.established();
        assert!(f.probes_primary());
    }

    #[test]
    fn returns_to_primary_after_stable_period_only() {
        let mut f = fo(2);
        f.failed();
        f.failed();
        assert_eq!(f.current(), 1);
        f.established();
        let t0 = Instant::now();
        assert!(!f.primary_probe(true, t0));
        assert!(!f.primary_probe(true, t0 + Duration::from_secs(5)));
        assert!(!f.primary_probe(false, t0 + Duration::from_secs(6))); // flapped: start over
        assert!(!f.primary_probe(true, t0 + Duration::from_secs(7)));
        assert!(f.primary_probe(true, t0 + Duration::from_secs(17)));
        f.return_to_primary();
        assert!(f.on_primary());
    }
}
