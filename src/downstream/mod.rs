//! Miner side: the listener and one session task per miner.

mod outbox;
mod session;
pub mod vardiff;

use crate::config::{secs, Config, WorkerMode};
use crate::curtail::Curtailer;
use crate::share::Difficulty;
use crate::stats::ProxyStats;
use crate::upstream::router::Router;
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
    /// How long a subscribing miner may wait for a pool connection.
    pub lease_wait: Duration,
    /// The version mask asked of pools, granted provisionally to miners that
    /// configure before a pool session exists.
    pub version_mask: Option<u32>,
}

impl DownstreamSettings {
    pub fn from_config(c: &Config) -> Self {
        let d = &c.difficulty;
        let diff = |v: f64| Difficulty::new(v).unwrap_or(Difficulty::ONE);
        DownstreamSettings {
            mode: c.worker_mode,
            start: diff(d.start),
            vardiff: VardiffConfig {
                target_shares_per_min: d.target_shares_per_min,
                retarget: secs(d.retarget_s),
                min: diff(d.min),
                max: diff(d.max),
            },
            ntime_max_forward: c.shares.ntime_max_forward_s,
            max_line: c.limits.max_line_bytes,
            handshake_timeout: secs(c.limits.handshake_timeout_s),
            lease_wait: secs(c.failover.handshake_timeout_s + c.failover.connect_timeout_s),
            version_mask: c.version_rolling.enabled.then(|| c.version_rolling.mask_u32()),
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

pub async fn serve(
    listener: TcpListener,
    runtime: tokio::sync::watch::Receiver<Arc<Runtime>>,
    stats: Arc<ProxyStats>,
    curtailer: Curtailer,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let rt = runtime.borrow().clone();
                tokio::spawn(session::run(
                    stream,
                    peer,
                    rt.settings.clone(),
                    rt.router.clone(),
                    stats.clone(),
                    curtailer.clone(),
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
