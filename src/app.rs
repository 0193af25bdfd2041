//! Wires the tasks together: stats, the upstream hub, the miner listener.
//! Owns their lifetime: dropping a [`Proxy`] stops it.

use crate::config::{Config, ConfigError};
use crate::downstream::{self, DownstreamSettings};
use crate::stats::ProxyStats;
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
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    pub hub: Arc<Hub>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(cfg: &Config) -> Result<Proxy, StartError> {
        cfg.validate()?;
        let stats = Arc::new(ProxyStats::default());
        let hub = Hub::start(UpstreamSettings::from_config(cfg)?, stats.clone());
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: cfg.listen, source })?;
        let settings = Arc::new(DownstreamSettings::from_config(cfg));
        let accept = tokio::spawn(downstream::serve(listener, settings, hub.clone(), stats.clone()));
        tracing::info!(%addr, pools = cfg.upstream.len(), "sluice listening for miners");
        Ok(Proxy { addr, stats, hub, accept })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Raise the soft open-file limit to the hard one: every miner is a socket.
pub fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!("open file limit {n}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
}
