//! Wires the tasks together: stats, the upstream hub, the miner listener.
//! Owns their lifetime: dropping a [`Proxy`] stops it.

use crate::config::PoolUrl;
use crate::config::{Config, ConfigError};
use crate::control::server as control;
use crate::curtail::{self, Curtailer};
use crate::downstream::{self, DownstreamSettings};
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
    #[error("curtailment: {0}")]
    Curtail(String),
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    /// The first route's hub (the default route when `upstream` is set).
    pub hub: Arc<Hub>,
    pub router: Arc<Router>,
    pub curtailer: Curtailer,
    /// The TCP control port, when configured.
    pub control_tcp: Option<SocketAddr>,
    /// The metrics and API listener, when configured.
    pub http: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    accept: JoinHandle<()>,
    shutdown: tokio::sync::watch::Sender<bool>,
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
        let stats = Arc::new(ProxyStats::default());
        let mut routes = Vec::new();
        if !cfg.upstream.is_empty() {
            let hub = Hub::start(UpstreamSettings::from_config(cfg, cfg.pool_urls()?)?, stats.clone());
            routes.push(Route::new("default".into(), hub, "", &[], 1.0));
        }
        for r in &cfg.pool {
            let urls = r
                .urls
                .iter()
                .map(|u| PoolUrl::parse(u))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StartError::Config(ConfigError::Invalid { key: "pool.urls", why: e }))?;
            let hub = Hub::start(UpstreamSettings::from_config(cfg, urls)?, stats.clone());
            routes.push(Route::new(r.name.clone(), hub, &r.workers, &r.cidrs, r.weight));
        }
        let hub = routes[0].hub.clone();
        let router = Arc::new(Router::new(routes));
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let curtailer = curtail::controller::spawn(cfg.curtail.clone()).map_err(StartError::Curtail)?;
        let mut tasks = Vec::new();
        let c = &cfg.curtail;
        if !c.socket.as_os_str().is_empty() {
            let mode = u32::from_str_radix(&c.socket_mode, 8).unwrap_or(0o660);
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
        let mut http = None;
        if let Ok(a) = cfg.metrics.listen.parse::<SocketAddr>() {
            let state = crate::metrics::HttpState::new(stats.clone(), router.clone(), curtailer.clone());
            let (bound, t) =
                crate::metrics::serve(a, state).await.map_err(|source| StartError::Listen { addr: a, source })?;
            http = Some(bound);
            tasks.push(t);
        }
        let settings = Arc::new(DownstreamSettings::from_config(cfg));
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(downstream::serve(
            listener,
            settings,
            router.clone(),
            stats.clone(),
            curtailer.clone(),
            shutdown_rx,
        ));
        tracing::info!(%addr, pools = cfg.upstream.len(), "sluice listening for miners");
        Ok(Proxy { addr, stats, hub, router, curtailer, control_tcp, http, tasks, accept, shutdown })
    }

    /// Stop accepting miners, send the connected ones away (client.reconnect,
    /// after their queued answers), and wait up to `grace` for the pools to
    /// answer every share already forwarded.
    pub async fn shutdown(&self, grace: std::time::Duration) -> ShutdownReport {
        use std::sync::atomic::Ordering::Relaxed;
        let t0 = tokio::time::Instant::now();
        let deadline = t0 + grace;
        self.accept.abort();
        let miners_at_start = self.stats.miners_connected.load(Relaxed);
        let _ = self.shutdown.send(true);
        while self.stats.miners_connected.load(Relaxed) > 0 && tokio::time::Instant::now() < t0 + grace / 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let submits_in_flight = self.router.outstanding();
        while self.router.outstanding() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let r = ShutdownReport {
            miners_at_start,
            miners_left: self.stats.miners_connected.load(Relaxed),
            submits_in_flight,
            submits_unanswered: self.router.outstanding(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(?r, "shutdown drained");
        r
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
