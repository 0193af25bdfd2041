//! The word of the curtailment controller and of a stopping proxy to each
//! miner session, and the proxy's wait for its sessions to end.
//!
//! Shutdown follows mini-redis: one signal every session hears, and a
//! drop-guard per session to wait on (no counter polled). The signal is
//! delivered through each session's own command slot rather than a channel
//! every session polls: a slot costs a connected miner about 64 bytes and
//! its wake-ups touch no lock shared with other miners.

pub use crate::link::{Member, SessionCmd, SessionSignal};
use crate::stats::WorkerInfo;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Every live session, owned by the proxy: the workers API lists them,
/// a stopping proxy tells each. Sessions join at accept and leave when
/// their [`Membership`] drops.
pub struct Sessions {
    inner: Mutex<Inner>,
    /// Closed (returns None) once every session has ended after `stop`.
    ended: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

struct Inner {
    slots: HashMap<u64, Arc<Member>>,
    /// Cloned into each membership; dropped by `stop`, so `ended` closes
    /// when the last membership goes.
    guard: Option<mpsc::Sender<()>>,
}

impl Default for Sessions {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Sessions { inner: Mutex::new(Inner { slots: HashMap::new(), guard: Some(tx) }), ended: rx.into() }
    }
}

/// A session's place among the live ones: what it shows and hears, and a
/// guard the proxy's shutdown waits on. Dropping it leaves.
pub struct Membership {
    pub member: Arc<Member>,
    sessions: Arc<Sessions>,
    _guard: Option<mpsc::Sender<()>>,
}

impl Sessions {
    /// A new session joins. After `stop` it still joins (so it is told, and
    /// sends its miner away), with its shutdown already signalled.
    pub fn join(self: &Arc<Self>, info: WorkerInfo) -> Membership {
        let member = Arc::new(Member { info, signal: SessionSignal::default() });
        // The lock covers a map insert, never an await: a session started
        // as the proxy stops is either in the map `stop` walks or sees that
        // the guard is gone.
        let mut inner = self.inner.lock();
        let guard = inner.guard.clone();
        if guard.is_none() {
            member.signal.send(SessionCmd::Shutdown);
        }
        inner.slots.insert(member.info.session, member.clone());
        Membership { member, sessions: self.clone(), _guard: guard }
    }

    /// The live sessions now (the lock covers a copy of the Arcs).
    pub fn snapshot(&self) -> Vec<Arc<Member>> {
        self.inner.lock().slots.values().cloned().collect()
    }

    /// Tell every session the proxy is stopping.
    pub fn stop(&self) {
        let slots: Vec<_> = {
            let mut inner = self.inner.lock();
            inner.guard = None;
            inner.slots.values().cloned().collect()
        };
        for s in slots {
            s.signal.send(SessionCmd::Shutdown);
        }
    }

    /// Sessions alive now.
    pub fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait until every session has ended (after `stop`), or `deadline`.
    /// Returns whether they all did.
    pub async fn ended(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.ended.lock().await;
        matches!(tokio::time::timeout_at(deadline, rx.recv()).await, Ok(None))
    }
}

impl crate::link::Roster for Sessions {
    fn members(&self) -> Vec<Arc<Member>> {
        self.snapshot()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.sessions.inner.lock().slots.remove(&self.member.info.session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(id: u64) -> WorkerInfo {
        WorkerInfo::new(id, "127.0.0.1:1".parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn stop_reaches_every_session_and_the_wait_ends_with_the_last() {
        let sessions = Arc::new(Sessions::default());
        let a = sessions.join(info(1));
        let b = sessions.join(info(2));
        a.member.signal.send(SessionCmd::Park);
        sessions.stop();
        // Shutdown is sticky: it replaced the park and no later word replaces it.
        b.member.signal.send(SessionCmd::Resume);
        assert_eq!(a.member.signal.recv().await, SessionCmd::Shutdown);
        assert_eq!(b.member.signal.recv().await, SessionCmd::Shutdown);
        // A session accepted as the proxy stops is told at once.
        let late = sessions.join(info(3));
        assert_eq!(late.member.signal.recv().await, SessionCmd::Shutdown);
        assert_eq!(sessions.len(), 3);
        let t0 = tokio::time::Instant::now();
        drop((a, late));
        assert!(!sessions.ended(t0 + Duration::from_secs(5)).await, "one session is left");
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        drop(b);
        assert!(sessions.ended(t0 + Duration::from_secs(10)).await);
        assert!(sessions.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_latest_word_wins_until_taken() {
        let sessions = Arc::new(Sessions::default());
        let m = sessions.join(info(1));
        m.member.signal.send(SessionCmd::Park);
        m.member.signal.send(SessionCmd::Resume);
        assert_eq!(m.member.signal.recv().await, SessionCmd::Resume);
        let waiting = tokio::spawn({
            let m = m.member.clone();
            async move { m.signal.recv().await }
        });
        tokio::task::yield_now().await;
        m.member.signal.send(SessionCmd::Park);
        assert_eq!(waiting.await.unwrap(), SessionCmd::Park);
    }
}
