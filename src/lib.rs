//! sluice: a Stratum V1 mining proxy.
//!
//! Data flow:
//!
//! ```text
//!  miners ──TCP──► downstream::session (one task per miner)
//!                     │  parse (stratum) → check every share (share)
//!                     │  submits that meet the pool's difficulty
//!                     ▼
//!                  upstream::Hub (one per route) ── leases an extranonce prefix
//!                     │                            on an upstream connection
//!                     ▼
//!                  upstream::conn (one task per pool connection)
//!                     │  failover over the ordered URL list
//!                     └──► pool;   jobs come back as a watch::Receiver<Work>
//! ```
//!
//! * [`stratum`]: framing, typed messages, encoding (no tokio).
//! * [`share`]: header rebuilding, SHA-256d, targets, share checks (no tokio).
//! * [`downstream`]: listener, per-miner session, vardiff.
//! * [`upstream`]: pool connections, failover, extranonce space, jobs.
//! * [`sim`]: the simulated pool and fleet used by tests and `sluice demo`.
//! * [`config`]: the TOML config, its defaults and validation.
//! * [`app`]: wires the tasks together and owns shutdown.

pub mod app;
pub mod config;
pub mod control;
pub mod curtail;
pub mod downstream;
pub mod metrics;
pub mod share;
pub mod sim;
pub mod stats;
pub mod stratum;
pub mod upstream;
