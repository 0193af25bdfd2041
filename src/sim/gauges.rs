//! Simulated power figures over HTTP: a GPU cluster's draw, a hall meter.
//! One server answers two ways:
//!
//! * `/metrics`, the Prometheus text format, for a real Prometheus to scrape
//!   (the integration tests run Debian's `prometheus` against it);
//! * `/api/v1/query`, the instant-query API of a Prometheus server, for
//!   `sum(NAME)` or `NAME`, so the demo and the benches can point
//!   `kind = "prometheus"` feeds at it with no Prometheus installed.
//!
//! Each gauge is a function read at every request; one that returns None
//! is absent (an exporter that is down: the query matches no series).

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a hall meter reads: every miner session that is registered and
/// not parked (it holds a job) at its model's nameplate (by worker prefix,
/// [`super::fleet::MODELS`]) times `over`; and the nameplate hashrate of
/// those miners, in H/s.
pub fn hall(sessions: &crate::downstream::signal::Sessions, over: f64) -> (f64, f64) {
    use std::sync::atomic::Ordering::Relaxed;
    sessions
        .snapshot()
        .iter()
        .filter(|m| m.info.miner.load(Relaxed) != 0 && !m.info.parked.load(Relaxed))
        .filter_map(|m| {
            let w = m.info.worker.get()?;
            super::fleet::MODELS.iter().find(|x| w.strip_prefix(x.0).is_some_and(|r| r.starts_with('.')))
        })
        .fold((0.0, 0.0), |(w, hs), x| (w + x.2 * over, hs + x.2 / x.3 * 1e12))
}

/// The watts of [`hall`].
pub fn hall_watts(sessions: &crate::downstream::signal::Sessions, over: f64) -> f64 {
    hall(sessions, over).0
}

/// A gauge's current value (None: absent).
pub type Reading = Arc<dyn Fn() -> Option<f64> + Send + Sync>;

pub struct Gauges {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Gauges {
    /// Serve `gauges` (name, value) on 127.0.0.1, a free port.
    pub async fn start(gauges: Vec<(String, Reading)>) -> std::io::Result<Gauges> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(exposition))
            .route("/api/v1/query", get(query))
            .with_state(Arc::new(gauges));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Gauges { addr, task })
    }

    /// The base URL, as a `[curtail.meter]` or `other_load` url.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = State<Arc<Vec<(String, Reading)>>>;

async fn exposition(State(g): Shared) -> impl IntoResponse {
    let mut out = String::new();
    for (name, read) in g.iter() {
        if let Some(v) = read() {
            out.push_str(&format!("# TYPE {name} gauge\n{name} {v}\n"));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn query(State(g): Shared, Query(q): Query<HashMap<String, String>>) -> impl IntoResponse {
    let expr = q.get("query").map(|s| s.trim()).unwrap_or("");
    let name = expr.strip_prefix("sum(").and_then(|s| s.strip_suffix(')')).unwrap_or(expr);
    let now = crate::stats::unix_ms() as f64 / 1e3;
    let Some((_, read)) = g.iter().find(|(n, _)| n == name) else {
        let body =
            serde_json::json!({"status": "error", "errorType": "bad_data", "error": format!("unknown gauge {name:?}")});
        return Json(body);
    };
    let result: Vec<_> =
        read().map(|v| serde_json::json!({"metric": {}, "value": [now, v.to_string()]})).into_iter().collect();
    Json(serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": result}}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curtail::feed::{Reader, SourceConfig, SourceKind};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// The feed reader against the query API, and the exposition text.
    #[tokio::test]
    async fn the_query_api_answers_a_feed_and_an_absent_gauge_is_no_series() {
        let gpu = Arc::new(AtomicU64::new(0));
        let g2 = gpu.clone();
        let read: Reading = Arc::new(move || match g2.load(Relaxed) {
            0 => None,
            w => Some(w as f64),
        });
        let g = Gauges::start(vec![("gpu_watts".into(), read)]).await.unwrap();
        let src = |q: &str| SourceConfig {
            kind: Some(SourceKind::Prometheus),
            url: g.url(),
            query: q.into(),
            ..SourceConfig::default()
        };
        let err = Reader::new(src("sum(gpu_watts)")).read().await.unwrap_err();
        assert!(err.contains("matched no series"), "{err}");
        gpu.store(12_500, Relaxed);
        assert_eq!(Reader::new(src("sum(gpu_watts)")).read().await, Ok(12_500.0));
        let err = Reader::new(src("nope")).read().await.unwrap_err();
        assert!(err.contains("unknown gauge"), "{err}");
        let text = reqwest::get(format!("{}/metrics", g.url())).await.unwrap().text().await.unwrap();
        assert_eq!(text, "# TYPE gpu_watts gauge\ngpu_watts 12500\n");
    }
}
