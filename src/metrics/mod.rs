//! Every metric sluice exports, in one place, and the HTTP listener that
//! serves them with the health checks and the workers API.
//!
//! Counters and histograms that change per share live in [`HotMetrics`]
//! (in [`crate::stats`]: prometheus-client types, updated where the event
//! happens). Gauges are read at scrape time from the state their owners
//! already keep.

mod http;

pub use http::{serve, HttpState};

pub use crate::stats::hot::{ClosedLabels, HotMetrics, PoolLabels, ShareLabels, WorkerLabels, OTHER_WORKERS};
