//! The link between a miner session and the rest of the proxy: what the
//! workers API and the curtailment controller see of a live session
//! ([`Member`]), and the slot through which they tell it to park, resume or
//! go ([`SessionSignal`]). Downstream owns the sessions; the controller and
//! the metrics only hold members, so none of them imports the others.
//!
//! The word is delivered through each session's own command slot rather
//! than a channel every session polls: a slot costs a connected miner about
//! 64 bytes and its wake-ups touch no lock shared with other miners.

use crate::stats::WorkerInfo;
use std::sync::atomic::{AtomicU8, Ordering};
use tokio::sync::Notify;

/// What a session is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionCmd {
    /// Stop sending work and close the connection.
    Park,
    /// Send work again.
    Resume,
    /// The proxy is stopping: ask the miner to reconnect elsewhere. Sticky:
    /// a later park or resume does not replace it.
    Shutdown,
}

/// One session's command slot. Park and resume are states, not events, so
/// one slot where the latest wins is enough.
#[derive(Debug, Default)]
pub struct SessionSignal {
    /// 0: nothing new; else `SessionCmd as u8 + 1`.
    cmd: AtomicU8,
    notify: Notify,
}

impl SessionSignal {
    pub fn send(&self, c: SessionCmd) {
        use std::sync::atomic::Ordering::{Acquire, Release};
        const SHUTDOWN: u8 = SessionCmd::Shutdown as u8 + 1;
        let _ = self.cmd.fetch_update(Release, Acquire, |cur| (cur != SHUTDOWN).then_some(c as u8 + 1));
        // Stores a permit if the session is not waiting: nothing is lost.
        self.notify.notify_one();
    }

    /// The latest command not yet taken.
    pub async fn recv(&self) -> SessionCmd {
        loop {
            match self.cmd.swap(0, Ordering::Acquire) {
                1 => return SessionCmd::Park,
                2 => return SessionCmd::Resume,
                3 => return SessionCmd::Shutdown,
                _ => self.notify.notified().await,
            }
        }
    }
}

/// A live session as the rest of the proxy sees it: what the workers API
/// shows of it, and its command slot (one allocation per miner).
#[derive(Debug)]
pub struct Member {
    pub info: WorkerInfo,
    pub signal: SessionSignal,
}

/// Every live session, as the proxy holds them: what the controller's
/// self-check compares its rows with (downstream's `Sessions`).
pub trait Roster: Send + Sync {
    fn members(&self) -> Vec<std::sync::Arc<Member>>;
}
