//! The metrics that change per share, per pool answer or per connection
//! (prometheus-client counters and histograms, updated where the event
//! happens). [`crate::metrics`] registers and serves them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub result: &'static str,
    /// Why the pool rejected it (a bounded set: stale, duplicate, low
    /// difficulty, job not found, other); empty for accepted shares.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub reason: &'static str,
}

/// Label value for workers past the cardinality cap.
pub const OTHER_WORKERS: &str = "_other";

fn latency_histogram() -> Histogram {
    // 10 µs .. ~40 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

/// Metrics updated on the hot path.
#[derive(Debug)]
pub struct HotMetrics {
    pub shares: Family<ShareLabels, Counter>,
    pub worker_shares: Family<WorkerLabels, Counter>,
    pub pool_shares: Family<PoolLabels, Counter>,
    /// Miner connections ended, by reason (a fixed set of static strings).
    pub closed: Family<ClosedLabels, Counter>,
    pub blocks: Counter,
    /// Block solutions sent again on a resumed pool session.
    pub blocks_resent: Counter,
    /// Held block solutions dropped: the chain moved on before a session of
    /// their pool could take them.
    pub blocks_given_up: Counter,
    /// Resent block solutions the pool answered "duplicate": it had taken
    /// the first copy, whose answer was lost with the session.
    pub blocks_credited_earlier: Counter,
    /// From a miner's submit arriving to sluice's answer being queued.
    pub submit_answer_seconds: Histogram,
    /// From a share sent upstream to the pool's answer.
    pub pool_rtt_seconds: Histogram,
    per_worker: AtomicBool,
    max_workers: AtomicUsize,
    known_workers: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Default for HotMetrics {
    fn default() -> Self {
        HotMetrics {
            shares: Family::default(),
            worker_shares: Family::default(),
            pool_shares: Family::default(),
            closed: Family::default(),
            blocks: Counter::default(),
            blocks_resent: Counter::default(),
            blocks_given_up: Counter::default(),
            blocks_credited_earlier: Counter::default(),
            submit_answer_seconds: latency_histogram(),
            pool_rtt_seconds: latency_histogram(),
            per_worker: AtomicBool::new(false),
            max_workers: AtomicUsize::new(1000),
            known_workers: Default::default(),
        }
    }
}

impl HotMetrics {
    pub fn configure(&self, per_worker: bool, max_workers: usize) {
        self.per_worker.store(per_worker, Relaxed);
        self.max_workers.store(max_workers, Relaxed);
    }

    /// Count a share sluice answered: `reason` is empty for accepted ones.
    pub fn share(&self, worker: Option<&str>, accepted: bool, reason: &'static str) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.shares.get_or_create(&ShareLabels { result, reason }).inc();
        if self.per_worker.load(Relaxed) {
            let name = worker.unwrap_or("");
            let l = WorkerLabels { worker: name.to_owned(), result };
            if let Some(c) = self.worker_shares.get(&l) {
                c.inc();
                return;
            }
            // A worker's first share of this result: past the cap, workers
            // share the `_other` series. The lock is taken once per new
            // (worker, result), never per share.
            let admitted = {
                let mut known = self.known_workers.lock();
                known.contains(name) || (known.len() < self.max_workers.load(Relaxed) && known.insert(name.to_owned()))
            };
            let l = if admitted { l } else { WorkerLabels { worker: OTHER_WORKERS.into(), result } };
            self.worker_shares.get_or_create(&l).inc();
        }
    }

    /// Count a miner connection ended or refused, for `reason`.
    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }

    pub fn pool_answer(&self, pool: &str, accepted: bool, reason: &'static str) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.pool_shares.get_or_create(&PoolLabels { pool: pool.to_owned(), result, reason }).inc();
    }
}
