//! Share counters shared between the tasks that produce them. Plain atomics:
//! every writer only adds, and readers (summaries, later metrics) tolerate a
//! snapshot that is a few increments apart between fields.

pub mod hot;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// An f64 accumulator on an AtomicU64 (compare-and-swap on the bits).
#[derive(Default, Debug)]
pub struct AtomicF64(AtomicU64);
impl AtomicF64 {
    pub fn add(&self, v: f64) {
        let _ = self.0.fetch_update(Relaxed, Relaxed, |b| Some((f64::from_bits(b) + v).to_bits()));
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed)
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Counters for one worker, or summed over the proxy.
#[derive(Default, Debug)]
pub struct ShareCounters {
    /// Shares that passed sluice's own checks (answered `true`).
    pub valid: AtomicU64,
    /// Shares sluice refused.
    pub rejected: AtomicU64,
    /// Valid shares that also met the pool's difficulty, counted as the
    /// session decides to forward them (before the miner is answered); each
    /// ends accepted, rejected or unanswered.
    pub forwarded: AtomicU64,
    pub pool_accepted: AtomicU64,
    pub pool_rejected: AtomicU64,
    /// Forwarded shares whose upstream session ended before an answer.
    pub pool_unanswered: AtomicU64,
    pub blocks: AtomicU64,
    /// Sum of the difficulty assigned to valid shares: the work done, in diff-1 units.
    pub work: AtomicF64,
}

/// A copy of the counters at one instant.
#[derive(Default, Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ShareSnapshot {
    pub valid: u64,
    pub rejected: u64,
    pub forwarded: u64,
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub pool_unanswered: u64,
    pub blocks: u64,
    pub work: f64,
}

impl ShareCounters {
    pub fn snapshot(&self) -> ShareSnapshot {
        ShareSnapshot {
            valid: self.valid.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            pool_accepted: self.pool_accepted.load(Relaxed),
            pool_rejected: self.pool_rejected.load(Relaxed),
            pool_unanswered: self.pool_unanswered.load(Relaxed),
            blocks: self.blocks.load(Relaxed),
            work: self.work.get(),
        }
    }
}

/// Proxy-wide state the summaries and metrics read.
#[derive(Default, Debug)]
pub struct ProxyStats {
    pub metrics: hot::HotMetrics,
    pub shares: ShareCounters,
    pub miners_connected: AtomicU64,
    pub upstreams_connected: AtomicU64,
    pub failovers: AtomicU64,
    /// Connections that went back to a route's first URL once it answered
    /// again (`failover.primary_stable_s`).
    pub returns_to_primary: AtomicU64,
    /// Woken whenever a forwarded share reaches its end (answered or given
    /// up): a stopping proxy waits on it for the pools' last answers.
    pub share_ended: tokio::sync::Notify,
    /// Sessions that carried out a curtailment park (network method).
    pub sessions_parked: AtomicU64,
    pub gate_closes: GateCloses,
}

/// The limits that close a connection before it has authorized.
pub const GATE_LIMITS: [&str; 7] = [
    "limits.handshake_strikes",
    "limits.subscribe_timeout_s",
    "limits.handshake_timeout_s",
    "limits.idle_timeout_s",
    "limits.invalid_share_window_s",
    "limits.max_line_bytes",
    "limits.write_timeout_s",
];

/// Connections closed before they authorized (scanners, garbage,
/// attackers), by the limit that closed them, since the gate last took the
/// counts: sessions add, the gate's accept loop takes them once a second for
/// one log line, so a flood of closes cannot flood the log.
#[derive(Debug, Default)]
pub struct GateCloses {
    counts: [AtomicU64; GATE_LIMITS.len()],
}

impl GateCloses {
    pub fn count(&self, limit: &'static str) {
        if let Some(i) = GATE_LIMITS.iter().position(|l| *l == limit) {
            self.counts[i].fetch_add(1, Relaxed);
        }
    }

    /// The counts since the last call, of the limits that closed any.
    pub fn take(&self) -> Vec<(&'static str, u64)> {
        GATE_LIMITS
            .iter()
            .zip(&self.counts)
            .filter_map(|(l, c)| Some((*l, c.swap(0, Relaxed))).filter(|(_, n)| *n > 0))
            .collect()
    }
}

/// Counters for one miner connection plus the proxy-wide ones, bumped together.
#[derive(Debug, Clone)]
pub struct StatsPair {
    pub worker: std::sync::Arc<ShareCounters>,
    pub proxy: std::sync::Arc<ProxyStats>,
}

macro_rules! bump {
    ($name:ident) => {
        pub fn $name(&self) {
            self.worker.$name.fetch_add(1, Relaxed);
            self.proxy.shares.$name.fetch_add(1, Relaxed);
        }
    };
}

impl StatsPair {
    bump!(valid);
    bump!(rejected);
    bump!(forwarded);
    bump!(pool_accepted);
    bump!(pool_rejected);
    bump!(pool_unanswered);
    bump!(blocks);
    pub fn work(&self, d: f64) {
        self.worker.work.add(d);
        self.proxy.shares.work.add(d);
    }
}

impl WorkerInfo {
    pub fn new(session: u64, addr: std::net::SocketAddr) -> WorkerInfo {
        WorkerInfo {
            session,
            addr,
            connected_ms: unix_ms(),
            worker: Default::default(),
            user_agent: Default::default(),
            counters: Default::default(),
            difficulty: AtomicF64::default(),
            hashrate: Default::default(),
            last_share_ms: Default::default(),
            parked: Default::default(),
            upstream: Default::default(),
            miner: Default::default(),
        }
    }
}

/// What the workers API shows of one connected miner. The session owns the
/// values and updates them; readers only load.
#[derive(Debug)]
pub struct WorkerInfo {
    pub session: u64,
    pub addr: std::net::SocketAddr,
    pub connected_ms: u64,
    pub worker: std::sync::OnceLock<std::sync::Arc<str>>,
    pub user_agent: std::sync::OnceLock<String>,
    pub counters: std::sync::Arc<ShareCounters>,
    pub difficulty: AtomicF64,
    pub hashrate: std::sync::Arc<AtomicF64>,
    pub last_share_ms: AtomicU64,
    pub parked: std::sync::atomic::AtomicBool,
    /// The upstream connection the miner's shares go to.
    pub upstream: AtomicU64,
    /// The curtailment miner id once registered (0 before).
    pub miner: AtomicU64,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_closes_are_taken_once_by_limit() {
        let g = GateCloses::default();
        for l in ["limits.max_line_bytes", "limits.handshake_strikes", "limits.max_line_bytes", "not a gate limit"] {
            g.count(l);
        }
        assert_eq!(g.take(), [("limits.handshake_strikes", 1), ("limits.max_line_bytes", 2)]);
        assert_eq!(g.take(), [], "taken: nothing until the next close");
        g.count("limits.subscribe_timeout_s");
        assert_eq!(g.take(), [("limits.subscribe_timeout_s", 1)]);
    }
}
