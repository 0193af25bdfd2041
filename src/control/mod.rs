//! The control socket: the scheduler's interface to curtailment
//! (proto/control-v1.md), and the client `sluice ctl` uses.

pub mod client;
pub mod lock;
pub mod protocol;
pub mod server;
pub mod types;
