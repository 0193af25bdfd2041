//! Wires the tasks together: stats, the upstream hub, the miner listener.
//! Owns their lifetime: dropping a [`Proxy`] stops it.

use crate::config::PoolUrl;
use crate::config::{Config, ConfigError};
use crate::control::server as control;
use crate::curtail::{self, Curtailer};
use crate::downstream::{self, DownstreamSettings, Runtime};
use crate::stats::ProxyStats;
use crate::upstream::router::{Route, Router};
use crate::upstream::{Hub, UpstreamSettings};
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("control socket {path}: {source}")]
    Control { path: String, source: std::io::Error },
    #[error(transparent)]
    ControlLock(#[from] crate::control::lock::LockError),
    #[error("curtailment: {0}")]
    Curtail(String),
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    runtime: tokio::sync::watch::Sender<Arc<Runtime>>,
    config: parking_lot::Mutex<Config>,
    pub curtailer: Curtailer,
    /// The TCP control port, when configured.
    pub control_tcp: Option<SocketAddr>,
    /// The metrics and API listener, when configured.
    pub http: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    accept: JoinHandle<()>,
    /// Every live miner session: told when the proxy stops, waited for.
    sessions: Arc<downstream::signal::Sessions>,
    /// This proxy's hold on its control socket (removed when dropped).
    _control_lock: Option<crate::control::lock::ControlLock>,
    /// Accepts miners and runs them until they authorize (declared last:
    /// dropped after the accept task is aborted).
    _gate: downstream::Gate,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ShutdownReport {
    pub miners_at_start: u64,
    pub miners_left: u64,
    /// Shares sent to pools and not yet answered when the drain began.
    pub submits_in_flight: u64,
    /// Of those, still unanswered when the grace period ran out.
    pub submits_unanswered: u64,
    pub seconds: f64,
}

impl Proxy {
    pub async fn start(cfg: &Config) -> Result<Proxy, StartError> {
        cfg.validate()?;
        // First: a second proxy on this control socket stops here, before
        // it binds anything or reads the state the first one owns.
        let control_lock = match cfg.curtail.socket.as_os_str().is_empty() {
            true => None,
            false => Some(crate::control::lock::ControlLock::acquire(&cfg.curtail.socket)?),
        };
        let stats = Arc::new(ProxyStats::default());
        let router = Arc::new(build_router(cfg, &stats, None)?);
        let listener = bind_miners(cfg.listen).map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let sessions = Arc::new(downstream::signal::Sessions::default());
        let roster: Arc<dyn crate::link::Roster> = sessions.clone();
        let curtailer = curtail::controller::spawn(cfg.curtail.clone(), Some(roster)).map_err(StartError::Curtail)?;
        let mut tasks = Vec::new();
        // Cluster mode: the site's allotment for this instance is taken up
        // before any miner is accepted.
        #[cfg(feature = "cluster")]
        let curtailer = match &cfg.curtail.cluster {
            Some(cc) => {
                let (link, end) = curtail::cluster::link();
                let curtailer = curtailer.with_cluster(link);
                let name = cc.instance_name(addr.port());
                let agent = curtail::cluster::agent::start(cc.clone(), name, &cfg.curtail, curtailer.clone(), end)
                    .await
                    .map_err(StartError::Curtail)?;
                tasks.push(agent);
                curtailer
            }
            None => curtailer,
        };
        let c = &cfg.curtail;
        if !c.socket.as_os_str().is_empty() {
            let mode = c.socket_mode.0;
            let t = control::serve_unix(&c.socket, mode, curtailer.clone())
                .map_err(|source| StartError::Control { path: c.socket.display().to_string(), source })?;
            tasks.push(t);
        }
        let mut control_tcp = None;
        if let (Some(a), Some(token)) = (c.tcp_listen, c.token()) {
            let (bound, t) = control::serve_tcp(a, token, curtailer.clone())
                .await
                .map_err(|source| StartError::Listen { addr: a, source })?;
            control_tcp = Some(bound);
            tasks.push(t);
        }
        stats.metrics.configure(cfg.metrics.per_worker, cfg.metrics.max_workers);
        let settings = Arc::new(DownstreamSettings::from_config(cfg));
        let (runtime, runtime_rx) = tokio::sync::watch::channel(Arc::new(Runtime { settings, router }));
        let mut http = None;
        if let Some(a) = cfg.metrics.listen.0 {
            let state =
                crate::metrics::HttpState::new(stats.clone(), runtime_rx.clone(), curtailer.clone(), sessions.clone());
            let (bound, t) =
                crate::metrics::serve(a, state).await.map_err(|source| StartError::Listen { addr: a, source })?;
            http = Some(bound);
            tasks.push(t);
        }
        let gate =
            downstream::Gate::start(cfg.limits.gate_nice).map_err(|source| StartError::Listen { addr, source })?;
        let listener = listener.into_std().map_err(|source| StartError::Listen { addr, source })?;
        let main = tokio::runtime::Handle::current();
        let accept = gate.handle().spawn(downstream::serve(
            listener,
            runtime_rx,
            stats.clone(),
            curtailer.clone(),
            sessions.clone(),
            main,
        ));
        if !cfg.metrics.log_interval_s.is_zero() {
            let every = cfg.metrics.log_interval_s.get();
            let (stats, runtime, curtailer, sessions) =
                (stats.clone(), runtime.subscribe(), curtailer.clone(), sessions.clone());
            tasks.push(tokio::spawn(status_lines(every, stats, runtime, curtailer, sessions)));
        }
        tracing::info!(%addr, pools = cfg.upstream.len(), "sluice listening for miners");
        let config = parking_lot::Mutex::new(cfg.clone());
        Ok(Proxy {
            addr,
            stats,
            runtime,
            config,
            curtailer,
            control_tcp,
            http,
            tasks,
            accept,
            sessions,
            _control_lock: control_lock,
            _gate: gate,
        })
    }

    /// The first route's hub (the default route when `upstream` is set).
    /// Every live miner session (the benches read what each is doing).
    pub fn sessions(&self) -> Arc<downstream::signal::Sessions> {
        self.sessions.clone()
    }

    pub fn hub(&self) -> Arc<Hub> {
        self.router().routes[0].hub.clone()
    }

    /// The routes new miners are placed on.
    pub fn router(&self) -> Arc<Router> {
        self.runtime.borrow().router.clone()
    }

    /// Apply a new configuration without dropping miners (SIGHUP): routes
    /// and pools (unchanged routes keep their connections; miners on a
    /// changed one stay on it until they reconnect, then its connections
    /// close), miner-facing limits and difficulty settings (for new
    /// connections), metrics options and curtailment. Returns the keys that
    /// changed; those that only a restart applies are marked so.
    pub async fn reload(&self, new: &Config) -> Result<Reloaded, StartError> {
        new.validate()?;
        let old = self.config.lock().clone();
        // Cluster mode is the instance's place in its site: joining,
        // leaving or moving it takes a restart.
        if old.curtail.cluster != new.curtail.cluster {
            return Err(StartError::Curtail(
                "curtail.cluster changed: it applies only at a restart (nothing was reloaded)".into(),
            ));
        }
        let changed = changed_keys(&old, new);
        let replaced = self.router();
        let router = Arc::new(build_router(new, &self.stats, Some(&replaced))?);
        let settings = Arc::new(DownstreamSettings::from_config(new));
        // Miners on a replaced route stay on its connections until they
        // reconnect: say how many, and keep them in the metrics meanwhile.
        for r in replaced.routes.iter().filter(|r| !router.routes.iter().any(|n| Arc::ptr_eq(&n.hub, &r.hub))) {
            let miners = r.miners.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                route = %r.name,
                miners,
                connections = r.hub.connections(),
                "route replaced: its miners stay on its pool connections until they reconnect, and stay in the metrics until then"
            );
        }
        router.retire(&replaced);
        self.curtailer.reconfigure(new.curtail.clone()).await.map_err(StartError::Curtail)?;
        self.stats.metrics.configure(new.metrics.per_worker, new.metrics.max_workers);
        self.runtime.send_replace(Arc::new(Runtime { settings, router }));
        *self.config.lock() = new.clone();
        const RESTART: [&str; 10] = [
            "listen",
            "limits.gate_nice",
            "metrics.log_interval_s",
            "metrics.listen",
            "curtail.socket",
            "curtail.socket_mode",
            "curtail.tcp_listen",
            "curtail.token",
            "curtail.state_file",
            "curtail.on_bad_state",
        ];
        let (at_restart, applied) = changed.into_iter().partition(|k| RESTART.contains(&k.as_str()));
        Ok(Reloaded { applied, at_restart })
    }

    /// Stop accepting miners, send the connected ones away (client.reconnect,
    /// after their queued answers), and wait up to `grace` for the pools to
    /// answer every share already forwarded.
    pub async fn shutdown(&self, grace: std::time::Duration) -> ShutdownReport {
        let t0 = tokio::time::Instant::now();
        let deadline = t0 + grace;
        self.accept.abort();
        let miners_at_start = self.sessions.len() as u64;
        self.sessions.stop();
        self.sessions.ended(t0 + grace / 2).await;
        let submits_in_flight = self.router().outstanding();
        loop {
            // Created before the check: an answer between the two still wakes it.
            let answered = self.stats.share_ended.notified();
            if self.router().outstanding() == 0 || tokio::time::timeout_at(deadline, answered).await.is_err() {
                break;
            }
        }
        let r = ShutdownReport {
            miners_at_start,
            miners_left: self.sessions.len() as u64,
            submits_in_flight,
            submits_unanswered: self.router().outstanding(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(
            seconds = format!("{:.1}", r.seconds),
            miners_sent_away = r.miners_at_start,
            miners_still_connected = r.miners_left,
            shares_in_flight = r.submits_in_flight,
            shares_unanswered = r.submits_unanswered,
            "shutdown drained"
        );
        r
    }
}

/// What a reload changed: the keys applied now, and those changed that
/// only a restart applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub applied: Vec<String>,
    pub at_restart: Vec<String>,
}

impl std::fmt::Display for Reloaded {
    /// As the log says it: `applied curtail.hold_s; listen changed, applied
    /// only after a restart`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.applied.is_empty(), self.at_restart.is_empty()) {
            (true, true) => write!(f, "nothing changed"),
            (false, true) => write!(f, "applied {}", self.applied.join(", ")),
            (true, false) => write!(f, "{} changed, applied only after a restart", self.at_restart.join(", ")),
            (false, false) => write!(
                f,
                "applied {}; {} changed, applied only after a restart",
                self.applied.join(", "),
                self.at_restart.join(", ")
            ),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Raise the soft open-file limit to the hard one: every miner is a socket.
pub fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!("open file limit {n}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
}

/// Build the routes of a config, reusing the hub (and its pool connections)
/// of every route of `old` whose pools, rules and settings are unchanged.
/// A route as configured: name, pool URLs, worker glob, CIDRs, weight.
type RouteSpec = (String, Vec<PoolUrl>, String, Vec<ipnet::IpNet>, f64);

fn build_router(cfg: &Config, stats: &Arc<ProxyStats>, old: Option<&Router>) -> Result<Router, StartError> {
    let mut specs: Vec<RouteSpec> = Vec::new();
    if !cfg.upstream.is_empty() {
        specs.push(("default".into(), cfg.upstream.clone(), String::new(), Vec::new(), 1.0));
    }
    for r in &cfg.pool {
        specs.push((r.name.clone(), r.urls.clone(), r.workers.clone(), r.cidrs.clone(), r.weight));
    }
    let mut routes = Vec::new();
    for (name, urls, workers, cidrs, weight) in specs {
        // In pool-account mode every share goes under the URL's account:
        // without one, a pool refuses the authorize or credits nobody.
        if cfg.worker_mode == crate::config::WorkerMode::PoolAccount {
            for u in urls.iter().filter(|u| u.user.is_empty()) {
                tracing::warn!(
                    route = %name,
                    "pool URL {u} has no account: shares go to the pool under an empty name ({})",
                    crate::config::POOL_URL_FORM
                );
            }
        }
        let settings = UpstreamSettings::from_config(cfg, urls)?;
        let reuse = old
            .and_then(|o| o.routes.iter().find(|r| r.name == name && *r.hub.settings() == settings))
            .map(|r| r.hub.clone());
        let hub = reuse.unwrap_or_else(|| Hub::start(settings, stats.clone()));
        routes.push(Route::new(name, hub, &workers, &cidrs, weight));
    }
    Ok(Router::new(routes))
}

/// Dotted keys whose values differ between two configs.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    fn flat(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flat(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let (mut x, mut y) = (Default::default(), Default::default());
    let to_value = |c: &Config| toml::Value::try_from(c).unwrap_or(toml::Value::Table(Default::default()));
    flat("", &to_value(a), &mut x);
    flat("", &to_value(b), &mut y);
    let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
    keys.into_iter().filter(|k| x.get(*k) != y.get(*k)).cloned().collect()
}

/// The miners' listener, with an accept queue of 4096 (tokio's default is
/// 1024; the kernel caps it at net.core.somaxconn): a site's miners
/// reconnecting at once after a restart, or a connection flood, overflow it
/// later. An overflowed queue drops the handshake's last packet, and a
/// client that then sends nothing believes it is connected to a proxy that
/// never saw it.
fn bind_miners(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Every `every`: one info line an operator can read without a dashboard.
/// Shares are counted over the interval; watts and the budget as they are.
async fn status_lines(
    every: std::time::Duration,
    stats: Arc<ProxyStats>,
    runtime: tokio::sync::watch::Receiver<Arc<Runtime>>,
    curtailer: Curtailer,
    sessions: Arc<downstream::signal::Sessions>,
) {
    use crate::control::client::{fmt_hashrate, fmt_watts};
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = stats.shares.snapshot();
    loop {
        tick.tick().await;
        let now = stats.shares.snapshot();
        let hashrate: f64 = sessions.snapshot().iter().map(|m| m.info.hashrate.get()).sum();
        let router = runtime.borrow().router.clone();
        // Up and configured pool URLs, by protocol (sv1, sv2).
        let mut by_proto: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (_, hub) in router.live_hubs() {
            let states = hub.conn_states();
            for (i, u) in hub.settings().urls.iter().enumerate() {
                let e = by_proto.entry(u.protocol()).or_default();
                e.1 += 1;
                if states.iter().any(|c| c.url_index == i && c.connected) {
                    e.0 += 1;
                }
            }
        }
        let (up, urls) = by_proto.values().fold((0, 0), |(a, b), (u, n)| (a + u, b + n));
        let protocols: Vec<String> = by_proto.iter().map(|(p, (u, n))| format!("{p} {u} of {n}")).collect();
        let (budget, watts) = match curtailer.status(false).await {
            Ok(s) => (
                s.budget.watts.map_or("none".to_owned(), |w| fmt_watts(w.0)),
                match s.site.measured_w {
                    Some(m) => format!("{} measured", fmt_watts(m.0)),
                    None => format!("{} estimated", fmt_watts(s.site.watts.0)),
                },
            ),
            Err(e) => ("unknown".to_owned(), format!("unknown ({e})")),
        };
        tracing::info!(
            miners = stats.miners_connected.load(Relaxed),
            hashrate = %fmt_hashrate(hashrate),
            shares_accepted = now.valid - last.valid,
            shares_rejected = now.rejected - last.rejected,
            pool_accepted = now.pool_accepted - last.pool_accepted,
            pool_rejected = now.pool_rejected - last.pool_rejected,
            pools_up = %format!("{up} of {urls}"),
            protocols = %protocols.join(", "),
            %budget,
            %watts,
            "status over the last {:?}",
            every
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::Reloaded;

    /// The log of a reload says which keys applied and which wait for a
    /// restart, apart.
    #[test]
    fn a_reload_says_which_keys_need_a_restart() {
        let r = |applied: &[&str], at_restart: &[&str]| Reloaded {
            applied: applied.iter().map(|s| s.to_string()).collect(),
            at_restart: at_restart.iter().map(|s| s.to_string()).collect(),
        };
        for (got, want) in [
            (r(&[], &[]), "nothing changed"),
            (r(&["curtail.hold_s"], &[]), "applied curtail.hold_s"),
            (r(&[], &["listen"]), "listen changed, applied only after a restart"),
            (
                r(&["curtail.hold_s", "upstream"], &["listen", "curtail.socket"]),
                "applied curtail.hold_s, upstream; listen, curtail.socket changed, applied only after a restart",
            ),
        ] {
            assert_eq!(got.to_string(), want);
        }
    }
}
