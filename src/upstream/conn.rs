//! One upstream connection: a task that owns the pool socket, walks the
//! failover list, turns pool messages into published [`Work`], and forwards
//! shares. Block solutions are drained before anything else.

use super::extranonce::PrefixAlloc;
use super::noise;
use super::pool_session::{End, Outcome, PoolSession};
use super::{Cmd, ConnShared, UpstreamSettings, UpstreamSubmit, Work};
use crate::stats::ProxyStats;
use crate::stratum::LineCodec;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stratum_core::framing_sv2::header::Header;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, error, info, warn};

const CMD_QUEUE: usize = 4096;
const BLOCK_QUEUE: usize = 64;

/// A connection's shared half, and the ends its task keeps: where it
/// publishes work, and its command and block-solution queues.
pub(super) type Ends = (Arc<ConnShared>, watch::Sender<Arc<Work>>, mpsc::Receiver<Cmd>, mpsc::Receiver<UpstreamSubmit>);

pub(super) fn channels(id: u64) -> Ends {
    let (work_tx, work_rx) = watch::channel(Arc::new(Work::new()));
    let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
    let (block_tx, block_rx) = mpsc::channel(BLOCK_QUEUE);
    let shared = Arc::new(ConnShared {
        id,
        work: work_rx,
        alloc: Mutex::new(PrefixAlloc::new(0)),
        cmd: cmd_tx,
        blocks: block_tx,
        closed: AtomicBool::new(false),
        handed: Default::default(),
        ended: Default::default(),
        retired: AtomicBool::new(false),
        hashrate: Default::default(),
    });
    (shared, work_tx, cmd_rx, block_rx)
}

pub(super) fn spawn(
    rt: &tokio::runtime::Handle,
    id: u64,
    keeper: bool,
    settings: Arc<UpstreamSettings>,
    stats: Arc<ProxyStats>,
) -> Arc<ConnShared> {
    let (shared, work_tx, cmd_rx, block_rx) = channels(id);
    let ps = PoolSession::new(id, settings, stats, shared.clone(), work_tx, Instant::now());
    let conn = Conn { keeper, cmd_rx, block_rx, idle_since: None, ps };
    rt.spawn(conn.run());
    shared
}

struct Conn {
    keeper: bool,
    cmd_rx: mpsc::Receiver<Cmd>,
    block_rx: mpsc::Receiver<UpstreamSubmit>,
    idle_since: Option<Instant>,
    /// The protocol state, which the loop below feeds.
    ps: PoolSession,
}

impl Conn {
    async fn run(mut self) {
        loop {
            let idx = self.ps.fo.current();
            let end = self.session(idx).await;
            self.ps.session_ended();
            match end {
                End::Idle => break,
                End::ReturnToPrimary => {
                    info!(conn = self.ps.id, "returning to the primary pool {}", self.ps.settings.urls[0]);
                    self.ps.fo.return_to_primary();
                    self.ps.stats.returns_to_primary.fetch_add(1, Ordering::Relaxed);
                }
                End::Reconnect(wait) => {
                    info!(conn = self.ps.id, "pool asked to reconnect in {wait:?}");
                    if self.wait(wait).await {
                        break;
                    }
                }
                End::Failed(why) => {
                    if self.after_failure(idx, &why, false).await {
                        break;
                    }
                }
                End::Refused(why) => {
                    if self.after_failure(idx, &why, true).await {
                        break;
                    }
                }
            }
        }
        self.ps.shared.closed.store(true, Ordering::Relaxed);
        self.ps.work.connected = false;
        self.ps.publish();
        for b in std::mem::take(&mut self.ps.unsent_blocks) {
            error!(target: crate::BLOCK_LOG, conn = self.ps.id, hash = %b.hash, header = %hex::encode(b.header), "upstream connection closing with a held BLOCK SOLUTION; giving up");
            self.ps.finished(&b.stats, Outcome::Unanswered);
            self.ps.stats.metrics.blocks_given_up.inc();
        }
        debug!(conn = self.ps.id, "upstream connection closed");
    }

    /// A session on URL `idx` failed (or the pool refused the account):
    /// log it as what it is, move on as failover says, and wait. True when
    /// the connection should close.
    async fn after_failure(&mut self, idx: usize, why: &str, refused: bool) -> bool {
        let delay = if refused { self.ps.fo.refused() } else { self.ps.fo.failed() };
        let (url, next) = (&self.ps.settings.urls[idx], &self.ps.settings.urls[self.ps.fo.current()]);
        if refused {
            error!(conn = self.ps.id, pool = %url, "{why}; next {next} in {delay:?}");
        } else {
            warn!(conn = self.ps.id, pool = %url, "upstream failed: {why}; next {next} in {delay:?}");
        }
        if self.ps.fo.current() != idx {
            self.ps.stats.failovers.fetch_add(1, Ordering::Relaxed);
        }
        self.wait(delay).await
    }

    /// Sleep between sessions while still serving the queues: submits for a
    /// dead session cannot be credited and are counted as unanswered, block
    /// solutions are kept for the next session. Returns true when the
    /// connection should close.
    async fn wait(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                biased;
                Some(b) = self.block_rx.recv() => self.ps.unsent_blocks.push(b),
                Some(c) = self.cmd_rx.recv() => match c {
                    Cmd::Submit(s) => self.ps.finished(&s.stats, Outcome::Unanswered),
                    Cmd::Authorize { worker, reply } => self.ps.waiting_auth.push((worker, reply)),
                },
                _ = tokio::time::sleep_until(until) => return self.idle_expired(),
            }
        }
    }

    fn idle_expired(&mut self) -> bool {
        let retired = self.ps.shared.retired.load(Ordering::Relaxed);
        if (self.keeper && !retired) || self.ps.work.layout.is_none() {
            return false;
        }
        let in_use = self.ps.shared.alloc.lock().in_use();
        if in_use > 0 {
            self.idle_since = None;
            return false;
        }
        if retired {
            return true; // replaced by a reload, and no miner is left
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        since.elapsed() >= self.ps.settings.idle_close
    }

    async fn session(&mut self, idx: usize) -> End {
        let url = self.ps.settings.urls[idx].clone();
        let stream = match tokio::time::timeout(self.ps.settings.connect_timeout, TcpStream::connect(url.addr())).await
        {
            Err(_) => return End::Failed(format!("connect to {} timed out", url.addr())),
            Ok(Err(e)) => return End::Failed(format!("connect to {}: {e}", url.addr())),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        // A blackholed path (packets dropped, nothing closed) is noticed by
        // the kernel after 30 s idle + 3 probes 10 s apart.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            warn!(conn = self.ps.id, "cannot enable TCP keepalive: {e}");
        }
        let handshake_deadline = Instant::now() + self.ps.settings.handshake_timeout;
        let mut wire = match url.sv2 {
            None => {
                let (r, w) = stream.into_split();
                Wire::V1 { lines: FramedRead::new(r, LineCodec::new(self.ps.settings.max_line)), w }
            }
            Some(key) => {
                // The Noise handshake: a pool whose certificate is not signed
                // by the URL's key is refused (asking again gets the same
                // answer), so failover moves on at once.
                match noise::connect(stream, key, self.ps.settings.handshake_timeout).await {
                    Ok((r, w)) => Wire::V2 { r: Box::new(r), w: Box::new(w) },
                    Err(noise::ConnectError::NotAuthenticated(why)) => return End::Refused(why),
                    Err(noise::ConnectError::Failed(why)) => return End::Failed(why),
                }
            }
        };
        self.ps.start(idx, Instant::now());
        if let Err(e) = self.flush(&mut wire).await {
            return End::Failed(e);
        }

        let mut established = false;
        let mut tick = tokio::time::interval(
            self.ps.settings.probe_interval.min(Duration::from_secs(1)).max(Duration::from_millis(100)),
        );
        let mut next_probe = Instant::now() + self.ps.settings.probe_interval;
        let (probe_tx, mut probe_rx) = mpsc::channel::<bool>(1);
        let mut probing = false;

        loop {
            let end = tokio::select! {
                biased;
                Some(b) = self.block_rx.recv() => { self.ps.send_submit(b, Instant::now()); None }
                got = wire.next() => {
                    let handled = match got {
                        Err(e) => Err(e),
                        Ok(Inbound::Line(l)) => self.ps.on_line(&l, &mut established, Instant::now()),
                        Ok(Inbound::Frame(h, payload)) => self.ps.on_frame(h, payload, &mut established, Instant::now()),
                    };
                    handled.unwrap_or_else(|e| Some(End::Failed(e)))
                },
                Some(c) = self.cmd_rx.recv() => { self.ps.on_cmd(c, &url.password, Instant::now()); None }
                Some(up) = probe_rx.recv() => {
                    probing = false;
                    self.ps.fo.primary_probe(up, std::time::Instant::now()).then_some(End::ReturnToPrimary)
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.ps.tick(now);
                    if !established && now >= handshake_deadline {
                        Some(End::Failed(format!("pool did not {} in time", if url.sv2.is_some() { "open a channel" } else { "answer subscribe" })))
                    } else if let Some(why) = self.ps.unresponsive(now) {
                        Some(End::Failed(why))
                    } else if established && self.ps.fo.probes_primary() && !probing && now >= next_probe {
                        next_probe = now + self.ps.settings.probe_interval;
                        probing = true;
                        let (addr, t, tx) = (self.ps.settings.urls[0].addr(), self.ps.settings.connect_timeout, probe_tx.clone());
                        tokio::spawn(async move {
                            let up = matches!(tokio::time::timeout(t, TcpStream::connect(addr)).await, Ok(Ok(_)));
                            let _ = tx.send(up).await;
                        });
                        None
                    } else if self.idle_expired() {
                        Some(End::Idle)
                    } else {
                        None
                    }
                }
            };
            if let Err(e) = self.flush(&mut wire).await {
                return End::Failed(e);
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Write what is queued. A pool that stops reading would otherwise
    /// stall this task (and, through the bounded queues, the miners
    /// submitting to it): a write that takes longer than
    /// `failover.write_timeout_s` loses the session like a dead path.
    async fn flush(&mut self, wire: &mut Wire) -> Result<(), String> {
        let limit = self.ps.settings.write_timeout;
        let r = match wire {
            Wire::V1 { w, .. } => write_within(w, &self.ps.out, limit).await,
            Wire::V2 { w, .. } => {
                let mut buf = std::mem::take(&mut self.ps.out);
                buf.clear();
                for m in self.ps.sv2_outbox() {
                    m.encode(w, &mut buf)?;
                }
                let r = write_within(&mut w.io, &buf, limit).await;
                self.ps.out = buf;
                r
            }
        };
        self.ps.out.clear();
        r
    }
}

/// A pool socket: Stratum V1 lines in clear, or Stratum V2 frames in Noise.
enum Wire {
    V1 { lines: FramedRead<OwnedReadHalf, LineCodec>, w: OwnedWriteHalf },
    V2 { r: Box<noise::Reader>, w: Box<noise::Writer> },
}

enum Inbound {
    Line(bytes::BytesMut),
    Frame(Header, Vec<u8>),
}

impl Wire {
    /// The pool's next message. Cancel-safe (both readers keep what a
    /// cancelled call read), so it sits in the session's `select!`.
    async fn next(&mut self) -> Result<Inbound, String> {
        match self {
            Wire::V1 { lines, .. } => match lines.next().await {
                None => Err("pool closed the connection".into()),
                Some(Err(e)) => Err(format!("read: {e}")),
                Some(Ok(l)) => Ok(Inbound::Line(l)),
            },
            Wire::V2 { r, .. } => r.read_frame().await.map(|(h, p)| Inbound::Frame(h, p)),
        }
    }
}

/// Write all of `buf` within `limit`, or say why not.
async fn write_within<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, buf: &[u8], limit: Duration) -> Result<(), String> {
    if buf.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(limit, w.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!(
            "pool took none of our last {} bytes for {limit:?} (failover.write_timeout_s): taking it as stuck",
            buf.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that stops reading: the write gives up at the limit (paused
    /// time, so no real waiting) instead of blocking the task forever.
    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_pool_that_stopped_reading_times_out() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let limit = Duration::from_secs(10);
        // Fits the pipe: written at once.
        assert_eq!(write_within(&mut ours, &[b'x'; 64], limit).await, Ok(()));
        let t0 = Instant::now();
        let e = write_within(&mut ours, &[b'y'; 1024], limit).await.unwrap_err();
        assert!(e.contains("failover.write_timeout_s"), "{e}");
        assert_eq!(t0.elapsed(), limit);
        // A pool that reads again is written to again.
        let mut got = vec![0u8; 1024];
        tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut got[..64]).await.unwrap();
        assert_eq!(write_within(&mut ours, b"z\n", limit).await, Ok(()));
    }
}
