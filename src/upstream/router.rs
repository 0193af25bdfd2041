//! Routing: which route (a hub of connections to one customer's pool list)
//! a miner's work comes from.
//!
//! A route with match rules (a worker glob, source networks) takes the miners
//! that match all its rules; the first such route wins. Miners that match
//! none go to the default set: the top-level `upstream` list and every
//! `[[pool]]` without rules. When the default set has several routes with
//! weights, each new miner goes to the route furthest below its weight share
//! of the hashrate, so the split converges to the weights (e.g. 70/30).
//!
//! The worker name is only known at `mining.authorize`, after the extranonce
//! was handed out at `mining.subscribe`. So a miner is placed by address at
//! subscribe and checked again at authorize; one in the wrong place is moved
//! (new extranonce, for miners that subscribed to extranonce changes) or
//! asked to reconnect, and its address is remembered so that it lands right
//! next time.

use super::Hub;
use crate::stats::AtomicF64;
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wildmatch::WildMatch;

pub struct Route {
    pub name: String,
    pub hub: Arc<Hub>,
    workers: Option<WildMatch>,
    cidrs: Vec<IpNet>,
    weight: f64,
    /// Sum of the hashrate of the miners on this route (H/s), kept by the
    /// sessions as deltas.
    pub hashrate: AtomicF64,
    /// Miners on this route (the split's measure until hashrates are known).
    pub miners: std::sync::atomic::AtomicI64,
}

impl Route {
    pub fn new(name: String, hub: Arc<Hub>, workers: &str, cidrs: &[IpNet], weight: f64) -> Route {
        Route {
            name,
            hub,
            workers: (!workers.is_empty()).then(|| WildMatch::new(workers)),
            cidrs: cidrs.to_vec(),
            weight,
            hashrate: AtomicF64::default(),
            miners: Default::default(),
        }
    }
    fn has_rules(&self) -> bool {
        self.workers.is_some() || !self.cidrs.is_empty()
    }
    fn addr_ok(&self, ip: IpAddr) -> bool {
        self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(&ip))
    }
}

const PLACEMENT_MEMORY: Duration = Duration::from_secs(600);

pub struct Router {
    pub routes: Vec<Route>,
    /// Where a miner from this address was last found to belong. The lock
    /// covers a map lookup or insert at subscribe/authorize, never per share.
    /// `mixed`: miners of several routes share the address (behind NAT, or
    /// a test on loopback), so its memory is not used.
    placed: Mutex<HashMap<IpAddr, Placement>>,
    /// Routers a reload replaced with this one (and those they had
    /// replaced), while miners still hold them: their pool connections stay
    /// in the metrics until the last miner leaves. The lock covers a copy of
    /// the list, at a scrape or a reload.
    retired: Mutex<Vec<std::sync::Weak<Router>>>,
}

#[derive(Clone, Copy)]
struct Placement {
    route: usize,
    at: Instant,
    mixed: bool,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Router {
        Router { routes, placed: Mutex::new(HashMap::new()), retired: Mutex::new(Vec::new()) }
    }

    /// This router replaces `old` (a reload): `old`, and the routers it had
    /// replaced, are reported with this one while miners hold them.
    pub fn retire(&self, old: &Arc<Router>) {
        let mut retired = self.retired.lock();
        retired.append(&mut old.retired.lock());
        retired.push(Arc::downgrade(old));
    }

    /// The routes to report: this router's, then those of routers a reload
    /// replaced whose connections are still open (miners that have not
    /// reconnected), each hub once. Forgets replaced routers no miner holds.
    pub fn live_hubs(&self) -> Vec<(String, Arc<Hub>)> {
        let mut out: Vec<(String, Arc<Hub>)> = self.routes.iter().map(|r| (r.name.clone(), r.hub.clone())).collect();
        let old: Vec<Arc<Router>> = {
            let mut retired = self.retired.lock();
            retired.retain(|w| w.strong_count() > 0);
            retired.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        for router in &old {
            for r in &router.routes {
                if r.hub.connections() > 0 && !out.iter().any(|(_, h)| Arc::ptr_eq(h, &r.hub)) {
                    out.push((r.name.clone(), r.hub.clone()));
                }
            }
        }
        out
    }

    fn default_set(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.routes.len()).filter(|&i| !self.routes[i].has_rules())
    }

    /// The weighted pick among the default routes.
    fn pick_default(&self) -> Option<usize> {
        let set: Vec<usize> = self.default_set().collect();
        let total_w: f64 = set.iter().map(|&i| self.routes[i].weight).sum();
        if set.len() <= 1 || total_w <= 0.0 {
            return set.first().copied();
        }
        // Split by hashrate; until any is measured (a fleet connecting at
        // once), by miner count.
        let total_hr: f64 = set.iter().map(|&i| self.routes[i].hashrate.get()).sum();
        let measure = |i: usize| {
            if total_hr > 0.0 {
                self.routes[i].hashrate.get()
            } else {
                self.routes[i].miners.load(std::sync::atomic::Ordering::Relaxed) as f64
            }
        };
        let total: f64 = set.iter().map(|&i| measure(i)).sum();
        let deficit = |i: usize| {
            let want = self.routes[i].weight / total_w;
            let have = if total > 0.0 { measure(i) / total } else { 0.0 };
            want - have
        };
        set.into_iter().max_by(|&a, &b| deficit(a).total_cmp(&deficit(b)))
    }

    /// Where to place a miner that just subscribed.
    pub fn for_connect(&self, ip: IpAddr) -> Option<usize> {
        if let Some(p) = self.placed.lock().get(&ip) {
            if !p.mixed && p.at.elapsed() < PLACEMENT_MEMORY {
                return Some(p.route);
            }
        }
        // Routes decided by address alone.
        if let Some(i) = self.routes.iter().position(|r| r.workers.is_none() && !r.cidrs.is_empty() && r.addr_ok(ip)) {
            return Some(i);
        }
        self.pick_default()
    }

    /// Where a miner belongs once its worker name is known; `current` is
    /// where it was placed. Remembers the answer for its address.
    pub fn for_worker(&self, ip: IpAddr, worker: &str, current: usize) -> Option<usize> {
        let matched = self
            .routes
            .iter()
            .position(|r| r.has_rules() && r.addr_ok(ip) && r.workers.as_ref().is_none_or(|w| w.matches(worker)));
        let target = match matched {
            Some(i) => Some(i),
            None if !self.routes[current].has_rules() => Some(current),
            None => self.pick_default(),
        };
        // Remember placements that rules decided, so a miner from this
        // address starts on its route next time (default-set placements
        // follow the split instead); an address seen on two routes is not
        // remembered at all.
        if let Some(t) = target {
            let mut placed = self.placed.lock();
            match placed.get_mut(&ip) {
                Some(p) if p.route != t => p.mixed = true,
                Some(p) => p.at = Instant::now(),
                None if matched.is_some() => {
                    placed.insert(ip, Placement { route: t, at: Instant::now(), mixed: false });
                }
                None => {}
            }
        }
        target
    }

    /// Shares handed to any upstream connection and not yet answered.
    pub fn outstanding(&self) -> u64 {
        self.routes.iter().map(|r| r.hub.outstanding()).sum()
    }
}

/// A miner's place on a route: counted in the route's miners, and its
/// hashrate in the route's, while it is held; dropping it gives both back.
/// The only writer of `Route::miners` and `Route::hashrate`.
pub struct Seat {
    router: Arc<Router>,
    route: usize,
    /// The hashrate this seat added to its route (H/s).
    hashrate: f64,
}

impl Router {
    /// Take a seat on `route`.
    pub fn seat(self: &Arc<Self>, route: usize) -> Seat {
        self.routes[route].miners.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Seat { router: self.clone(), route, hashrate: 0.0 }
    }
}

impl Seat {
    pub fn route(&self) -> usize {
        self.route
    }

    /// The miner's hashrate now (H/s).
    pub fn set_hashrate(&mut self, hr: f64) {
        self.router.routes[self.route].hashrate.add(hr - self.hashrate);
        self.hashrate = hr;
    }

    /// Move to another route of the same router, count and hashrate with it.
    pub fn move_to(&mut self, route: usize) {
        if route == self.route {
            return;
        }
        let (from, to) = (&self.router.routes[self.route], &self.router.routes[route]);
        from.hashrate.add(-self.hashrate);
        from.miners.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        to.hashrate.add(self.hashrate);
        to.miners.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.route = route;
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let r = &self.router.routes[self.route];
        r.hashrate.add(-self.hashrate);
        r.miners.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::testing::router;
    use std::sync::atomic::Ordering::Relaxed;

    fn counts(r: &Router) -> [(i64, f64); 2] {
        [0, 1].map(|i| (r.routes[i].miners.load(Relaxed), r.routes[i].hashrate.get()))
    }

    #[tokio::test]
    async fn a_seat_is_counted_while_held_and_given_back_when_dropped() {
        let r = router(&["a", "b"]);
        let mut x = r.seat(0);
        let mut y = r.seat(0);
        x.set_hashrate(100.0);
        y.set_hashrate(50.0);
        assert_eq!(counts(&r), [(2, 150.0), (0, 0.0)]);
        x.set_hashrate(80.0); // a new measurement replaces the old one
        assert_eq!(counts(&r), [(2, 130.0), (0, 0.0)]);
        x.move_to(1);
        assert_eq!(counts(&r), [(1, 50.0), (1, 80.0)]);
        x.move_to(1); // no-op
        assert_eq!(counts(&r), [(1, 50.0), (1, 80.0)]);
        drop(y);
        assert_eq!(counts(&r), [(0, 0.0), (1, 80.0)]);
        drop(x);
        assert_eq!(counts(&r), [(0, 0.0), (0, 0.0)]);
    }
}
