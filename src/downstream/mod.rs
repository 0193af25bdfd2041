//! Miner side: the listener and one session task per miner.

mod dedup;
pub mod difficulty;
mod outbox;
mod session;
pub mod signal;
pub mod vardiff;

use crate::config::{Config, WorkerMode};
use crate::curtail::Curtailer;
use crate::share::Difficulty;
use crate::stats::ProxyStats;
use crate::upstream::router::Router;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::warn;
use vardiff::VardiffConfig;

/// Settings every session reads, resolved from the config once.
#[derive(Debug, Clone)]
pub struct DownstreamSettings {
    pub mode: WorkerMode,
    pub start: Difficulty,
    pub vardiff: VardiffConfig,
    pub ntime_max_forward: u32,
    pub max_line: usize,
    pub handshake_timeout: Duration,
    /// Until the first request sluice knows.
    pub subscribe_timeout: Duration,
    /// Unparseable lines before authorize that close the connection.
    pub handshake_strikes: u32,
    pub error_answers_per_s: u32,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub invalid_window: Duration,
    pub dedup_entries: usize,
    pub max_connections: usize,
    pub max_per_ip: usize,
    /// How often a session checks its time limits and retargets.
    pub tick: Duration,
    /// `access.cidrs`: empty allows every address.
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// `access.workers`: empty allows every worker.
    pub allow_workers: Vec<wildmatch::WildMatch>,
    /// How long a subscribing miner may wait for a pool connection.
    pub lease_wait: Duration,
    /// The version mask asked of pools, granted provisionally to miners that
    /// configure before a pool session exists.
    pub version_mask: Option<u32>,
}

impl DownstreamSettings {
    /// May this worker name authorize (`access.workers`)?
    pub fn worker_allowed(&self, name: &str) -> bool {
        self.allow_workers.is_empty() || self.allow_workers.iter().any(|w| w.matches(name))
    }

    pub fn from_config(c: &Config) -> Self {
        let d = &c.difficulty;
        let diff = |v: f64| Difficulty::new(v).unwrap_or(Difficulty::ONE);
        DownstreamSettings {
            mode: c.worker_mode,
            start: diff(d.start),
            vardiff: VardiffConfig {
                target_shares_per_min: d.target_shares_per_min,
                retarget: d.retarget_s.get(),
                min: diff(d.min),
                max: diff(d.max),
            },
            ntime_max_forward: c.shares.ntime_max_forward_s,
            max_line: c.limits.max_line_bytes,
            handshake_timeout: c.limits.handshake_timeout_s.get(),
            subscribe_timeout: c.limits.subscribe_timeout_s.get(),
            handshake_strikes: c.limits.handshake_strikes,
            error_answers_per_s: c.limits.error_answers_per_s,
            idle_timeout: c.limits.idle_timeout_s.get(),
            write_timeout: c.limits.write_timeout_s.get(),
            invalid_window: c.limits.invalid_share_window_s.get(),
            dedup_entries: c.limits.dedup_entries_per_miner,
            max_connections: c.limits.max_connections,
            max_per_ip: c.limits.max_connections_per_ip,
            // Every 5 s, or often enough that no time limit of a working
            // miner overshoots by more than a quarter (the handshake's limits
            // are deadlines of their own).
            tick: [c.limits.idle_timeout_s, c.limits.invalid_share_window_s]
                .into_iter()
                .map(|t| t.get() / 4)
                .fold(Duration::from_secs(5), Duration::min)
                .max(Duration::from_millis(20)),
            allow_cidrs: c.access.cidrs.clone(),
            allow_workers: c.access.workers.iter().map(|w| wildmatch::WildMatch::new(w)).collect(),
            lease_wait: c.failover.handshake_timeout_s.get() + c.failover.connect_timeout_s.get(),
            version_mask: c.version_rolling.requested(),
        }
    }
}

/// Accept miners until the task is dropped. Accept errors (typically running
/// out of file descriptors) back off instead of spinning.
/// What new miners are served with; a config reload publishes a new one,
/// and miners already connected keep the one they started with.
pub struct Runtime {
    pub settings: Arc<DownstreamSettings>,
    pub router: Arc<Router>,
}

/// The gate: a thread of its own, with a single-threaded runtime, that
/// accepts miners and serves each connection until it has authorized; then
/// the session moves to the main runtime. Scanners, garbage, slowloris
/// trickles and reconnection storms are handled here and never queue in
/// front of a working miner's share on the main runtime's workers. Dropping
/// the gate ends its thread and every connection still on it.
pub struct Gate {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gate {
    /// Start the gate thread at niceness `nice` (`limits.gate_nice`): when
    /// the machine is busy, the kernel runs the threads that serve working
    /// miners first, and the gate gets what is left (at 10, about a tenth of
    /// a contended core), so a flood of hostile connections is paid for by
    /// the gate's own progress, not by working miners' latency.
    pub fn start(nice: u8) -> std::io::Result<Gate> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("sluice-gate".into()).spawn(move || {
            lower_priority(nice);
            rt.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(Gate { handle, stop: Some(stop), thread: Some(thread) })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

/// Set this thread's niceness (Linux: per thread). Failing to is logged
/// and harmless: the gate runs at the process's priority.
fn lower_priority(nice: u8) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), i32::from(nice)) {
        warn!("cannot set the gate thread's niceness to {nice} (limits.gate_nice): {e}");
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!("limits.gate_nice = {nice} is applied on Linux only");
}

impl Drop for Gate {
    /// Stops the gate's runtime and waits for its thread: when this returns,
    /// the listener and every connection still on the gate are closed, so
    /// the address can be bound again at once (a restart in the same
    /// process). Dropping those tasks awaits nothing; it takes milliseconds.
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept miners (on the gate's runtime: `listener` is registered there
/// first) and start a session for each; authorized sessions move to `main`.
pub async fn serve(
    listener: std::net::TcpListener,
    runtime: tokio::sync::watch::Receiver<Arc<Runtime>>,
    stats: Arc<ProxyStats>,
    curtailer: Curtailer,
    sessions: Arc<signal::Sessions>,
    main: tokio::runtime::Handle,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot register the miner listener: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_millis(10);
    let conns = Arc::new(Conns::default());
    let mut refusals = Refusals::default();
    let mut summary = tokio::time::interval(Duration::from_secs(1));
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = summary.tick() => {
                log_gate_closes(&stats.gate_closes.take());
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let rt = runtime.borrow().clone();
                let total = stats.miners_connected.load(std::sync::atomic::Ordering::Relaxed) as usize;
                let allowed = rt.settings.allow_cidrs.is_empty()
                    || rt.settings.allow_cidrs.iter().any(|n| n.contains(&peer.ip()));
                let permit = if !allowed {
                    Err("access.cidrs")
                } else if total >= rt.settings.max_connections {
                    Err("limits.max_connections")
                } else {
                    conns.acquire(peer.ip(), rt.settings.max_per_ip).ok_or("limits.max_connections_per_ip")
                };
                let permit = match permit {
                    Ok(p) => p,
                    Err(limit) => {
                        stats.metrics.closed(limit);
                        refusals.refuse(stream, peer, limit);
                        continue;
                    }
                };
                tokio::spawn(session::run(
                    stream,
                    permit,
                    peer,
                    rt.settings.clone(),
                    rt.router.clone(),
                    stats.clone(),
                    curtailer.clone(),
                    sessions.clone(),
                    main.clone(),
                ));
            }
            Err(e) => {
                warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// One line for the connections closed before authorizing in the last
/// second, by limit (each is counted in
/// `sluice_miner_connections_closed_total` too).
fn log_gate_closes(closed: &[(&'static str, u64)]) {
    if !closed.is_empty() {
        let by_limit: Vec<String> = closed.iter().map(|(r, n)| format!("{r}={n}")).collect();
        warn!(closed = %by_limit.join(" "), "closed connections that had not authorized, at these limits (in the last second)");
    }
}

/// Miner connections per source address, for `limits.max_connections_per_ip`.
#[derive(Default)]
pub struct Conns {
    per_ip: parking_lot::Mutex<std::collections::HashMap<IpAddr, u32>>,
}

/// One counted connection; dropping it frees its place.
pub struct ConnPermit {
    conns: Arc<Conns>,
    ip: IpAddr,
}

impl Conns {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnPermit> {
        let mut m = self.per_ip.lock();
        let n = m.entry(ip).or_default();
        if *n as usize >= max {
            return None;
        }
        *n += 1;
        Some(ConnPermit { conns: self.clone(), ip })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut m = self.conns.per_ip.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Connections refused at accept: each gets one error line and is closed;
/// the log says which limit, at most once a second per limit, with a count.
#[derive(Default)]
struct Refusals {
    last_log: Option<std::time::Instant>,
    since_log: u64,
}

impl Refusals {
    fn refuse(&mut self, stream: tokio::net::TcpStream, peer: SocketAddr, limit: &'static str) {
        let mut line = Vec::new();
        crate::stratum::encode::error(
            &mut line,
            None,
            crate::stratum::code::OTHER,
            &format!("connection refused: {limit}"),
        );
        // Best effort and never waiting: the socket is fresh, its buffer empty.
        let _ = stream.try_write(&line);
        drop(stream);
        self.since_log += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            warn!(peer = %peer, limit, refused = self.since_log, "miner connection refused at a limit");
            self.last_log = Some(std::time::Instant::now());
            self.since_log = 0;
        }
    }
}
