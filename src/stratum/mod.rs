//! Stratum V1 on the wire: line framing, typed messages and encoding. No
//! tokio runtime here; see proto/stratum-v1.md for the dialect.

pub mod encode;
mod frame;
mod msg;

pub use frame::{FrameError, LineCodec};
pub use msg::{
    hex_u32, parse_configure_result, parse_subscribe_result, ClientRequest, Configure, Envelope, Notify, ServerMessage,
    Submit, Subscribed, WireError,
};

/// Stratum V1 share error codes as pools customarily send them.
pub mod code {
    pub const OTHER: i32 = 20;
    pub const JOB_NOT_FOUND: i32 = 21;
    pub const DUPLICATE: i32 = 22;
    pub const LOW_DIFFICULTY: i32 = 23;
    pub const UNAUTHORIZED: i32 = 24;
    pub const NOT_SUBSCRIBED: i32 = 25;
}

/// What we call ourselves in `client.get_version` and `mining.subscribe`.
pub const USER_AGENT: &str = concat!("sluice/", env!("CARGO_PKG_VERSION"));
