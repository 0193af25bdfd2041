//! sluice: a Stratum V1 mining proxy with curtailment hooks.
//!
//! Data flow (each box is a task that owns its state):
//!
//! ```text
//!  miners ──TCP──► downstream::Gate (its own thread and runtime): accept,
//!                     │  limits, subscribe/authorize; then the session
//!                     ▼  moves, socket and state, to the main runtime
//!                  downstream::session (one task per miner)
//!                     │  parse (stratum) → check every share (share)
//!                     │  → answer the miner at once
//!                     │  shares that meet the pool's difficulty:
//!                     ▼
//!                  upstream::Lease (the miner's extranonce prefix on one
//!                     │  pool connection, taken from its route's Hub)
//!                     ▼  bounded queues; block solutions on their own
//!                  upstream::conn (one task per pool connection)
//!                     │  failover over the route's URL list
//!                     └──► pool;  jobs come back as a watch::Receiver<Work>
//!
//!  scheduler ──► control (Unix socket / TCP, JSON-RPC) ──► curtail::controller
//!                     (one task: the budget, the plan, park/resume signals
//!                      to sessions, hooks) ──► sessions and firmware
//!
//!  Prometheus ──► metrics (HTTP: /metrics, /healthz, /readyz, workers API)
//!                     reads stats (atomic counters the sessions update)
//! ```
//!
//! * [`units`]: watts, J/TH, hashrate, seconds: units in types, used
//!   everywhere; [`api`]: the control protocol's requests, answers and
//!   events, and the enums they name (the contract the controller, the
//!   server, `sluice ctl` and the benches share); [`link`]: what the rest of
//!   the proxy sees of a miner session and the slot it is told things
//!   through. These three import nothing else of the crate.
//! * [`stratum`]: framing, typed messages, encoding (no tokio).
//! * [`share`]: header rebuilding, SHA-256d, targets, share checks (no tokio).
//! * [`downstream`]: the gate, the per-miner session, vardiff and the
//!   per-job difficulty ([`downstream::difficulty`]), duplicate memory. The
//!   session is a state machine fed lines, work, signals, ticks and the
//!   outcome of its handshake steps, with the time given; its handshake
//!   phase is an enum (fresh, subscribed, named, working), it awaits
//!   nothing and holds no handle: the route, a pool prefix, the pool's word
//!   or the controller's are fetched by its task and handed back.
//! * `upstream::pool_session` and [`curtail::state`] are the same split
//!   for a pool connection and for curtailment: pure, given the time,
//!   tested with tables.
//! * [`upstream`]: routes ([`upstream::router`]), hubs, pool connections,
//!   failover (pure), the extranonce prefix space.
//! * [`curtail`]: the state (a coordinator of the budget book, the fleet,
//!   the ramp and the measured loop, each pure), power model and policy,
//!   schedules, the controller task, the park/resume hooks (firmware with
//!   feature `firmware`).
//! * [`control`]: the control protocol's parsing, its server and the typed
//!   client `sluice ctl` uses.
//! * [`metrics`]: every metric in one place and the HTTP listener.
//! * [`stats`]: counters shared by sessions, connections and metrics (the
//!   per-share metrics in [`stats::hot`]).
//! * [`config`]: the TOML config, parsed once into typed values.
//! * [`app`]: wires the tasks together, reloads, owns shutdown.
//! * `sim` (feature `sim`): the simulated pool and fleet, the demo and the
//!   benches; not part of a production build.
//!
//! No two of these modules depend on each other, directly or through
//! others (tests/modules.rs reads the `crate::` paths and fails on a cycle).

pub mod api;
pub mod app;

/// The log target of every block-solution line (error level, the full
/// header): route it to an alert, or (the demo, whose simulated network
/// finds blocks every few seconds) turn it off with `sluice::block=off`.
pub const BLOCK_LOG: &str = "sluice::block";
pub mod config;
pub mod control;
pub mod curtail;
pub mod downstream;
pub mod link;
pub mod metrics;
pub mod share;
#[cfg(feature = "sim")]
pub mod sim;
pub mod stats;
pub mod stratum;
pub mod units;
pub mod upstream;
