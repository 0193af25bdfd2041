//! Simulators shipped in the binary: a pool, a fleet, and the demo that runs
//! both around a real proxy on loopback.

pub mod bench;
#[cfg(feature = "cluster")]
pub mod bench_cluster;
pub mod bench_targets;
pub mod check;
pub mod cli;
pub mod cluster_check;
pub mod demo;
pub mod firmware;
pub mod fleet;
pub mod follow_demo;
pub mod gauges;
pub mod load;
pub mod pool;
pub mod template_provider;
pub mod timeline;
