//! The observability listener: `/metrics`, `/healthz`, `/readyz`,
//! `/api/v1/workers`.

use crate::api::{HashesPerSec, MinerId, MinerRow, Watts};
use crate::curtail::policy::MinerState;
use crate::curtail::power::WattsSource;
use crate::curtail::Curtailer;
use crate::downstream::signal::Sessions;
use crate::stats::ProxyStats;
use crate::upstream::router::Router as Routes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Clone)]
pub struct HttpState {
    pub stats: Arc<ProxyStats>,
    pub runtime: tokio::sync::watch::Receiver<Arc<crate::downstream::Runtime>>,
    pub curtailer: Curtailer,
    /// The live miner sessions (the workers API lists them).
    pub sessions: Arc<Sessions>,
    registry: Arc<Registry>,
}

impl HttpState {
    pub fn new(
        stats: Arc<ProxyStats>,
        runtime: tokio::sync::watch::Receiver<Arc<crate::downstream::Runtime>>,
        curtailer: Curtailer,
        sessions: Arc<Sessions>,
    ) -> Self {
        let mut r = Registry::with_prefix("sluice");
        let m = &stats.metrics;
        r.register("shares", "Shares answered by sluice, by result and reject reason", m.shares.clone());
        r.register(
            "worker_shares",
            "Shares by worker (when metrics.per_worker is on; capped)",
            m.worker_shares.clone(),
        );
        r.register(
            "pool_shares",
            "Forwarded shares by pool answer, and for rejects the reason (stale, duplicate, low difficulty, job not found, other)",
            m.pool_shares.clone(),
        );
        r.register(
            "miner_connections_closed",
            "Miner connections ended or refused, by reason: miner (it left), drained, proxy, or the limit or access rule that closed it",
            m.closed.clone(),
        );
        for (name, help, c) in [
            ("blocks_found", "Block solutions found by the miners", &m.blocks),
            (
                "blocks_resent",
                "Block solutions sent again on a resumed pool session after theirs ended unanswered",
                &m.blocks_resent,
            ),
            (
                "blocks_given_up",
                "Held block solutions dropped as stale before their pool session could be resumed",
                &m.blocks_given_up,
            ),
            (
                "blocks_credited_earlier",
                "Resent block solutions the pool called duplicates: credited from the first copy, whose answer was lost",
                &m.blocks_credited_earlier,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "submit_answer_seconds",
            "Time from a miner's submit to sluice's answer",
            m.submit_answer_seconds.clone(),
        );
        r.register(
            "pool_rtt_seconds",
            "Time from a share sent upstream to the pool's answer",
            m.pool_rtt_seconds.clone(),
        );
        r.register_collector(Box::new(Gauges {
            stats: stats.clone(),
            runtime: runtime.clone(),
            curtailer: curtailer.clone(),
            sessions: sessions.clone(),
        }));
        HttpState { stats, runtime, curtailer, sessions, registry: Arc::new(r) }
    }
}

/// Values read at scrape time from the state their owners keep.
#[derive(Clone)]
struct Gauges {
    stats: Arc<ProxyStats>,
    runtime: tokio::sync::watch::Receiver<Arc<crate::downstream::Runtime>>,
    curtailer: Curtailer,
    sessions: Arc<Sessions>,
}

impl std::fmt::Debug for Gauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gauges")
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, f64)],
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0.0f64);
    let mut me = enc.encode_descriptor(name, help, None, g.metric_type())?;
    if let [(labels, v)] = series {
        if labels.is_empty() {
            return ConstGauge::new(*v).encode(me);
        }
    }
    for (labels, v) in series {
        let l: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        ConstGauge::new(*v).encode(me.encode_family(&l)?)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let me = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(me)
}

impl Collector for Gauges {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        gauge(
            &mut enc,
            "miners_connected",
            "Miner connections open",
            &[(vec![], s.miners_connected.load(Relaxed) as f64)],
        )?;
        let router: Arc<Routes> = self.runtime.borrow().router.clone();
        let hubs = router.live_hubs();
        let conns: Vec<_> = hubs.iter().flat_map(|(_, h)| h.conn_states()).collect();
        let mut by_pool: HashMap<(String, &str), f64> = HashMap::new();
        for c in &conns {
            *by_pool.entry((c.pool.clone(), if c.connected { "connected" } else { "disconnected" })).or_default() +=
                1.0;
        }
        let series: Vec<_> =
            by_pool.into_iter().map(|((p, st), n)| (vec![("pool", p), ("state", st.to_string())], n)).collect();
        gauge(&mut enc, "upstream_connections", "Upstream pool connections by pool and state", &series)?;
        // Each configured pool URL: 1 while a connection of its route has a
        // pool session on it. "Primary down, on a backup" is primary 0,
        // backup 1.
        let mut up = Vec::new();
        for (name, hub) in &hubs {
            let states = hub.conn_states();
            for (i, u) in hub.settings().urls.iter().enumerate() {
                let on = states.iter().any(|c| c.url_index == i && c.connected);
                let role = if i == 0 { "primary" } else { "backup" };
                up.push((
                    vec![
                        ("route", name.clone()),
                        ("url", u.to_string()),
                        ("role", role.to_string()),
                        ("protocol", u.protocol().to_string()),
                    ],
                    if on { 1.0 } else { 0.0 },
                ));
            }
        }
        gauge(
            &mut enc,
            "pool_up",
            "1 while a pool session is up on this configured pool URL (role: primary is the route's first URL; protocol: sv1 or sv2)",
            &up,
        )?;
        // Hashrate by pool: each miner's measured hashrate, by the pool its
        // upstream connection is on.
        let pool_of: HashMap<u64, String> = conns.iter().map(|c| (c.id, c.pool.clone())).collect();
        let mut hr: HashMap<String, f64> = HashMap::new();
        for m in self.sessions.snapshot() {
            let w = &m.info;
            let pool = pool_of.get(&w.upstream.load(Relaxed)).cloned().unwrap_or_default();
            *hr.entry(pool).or_default() += w.hashrate.get();
        }
        let series: Vec<_> = hr.into_iter().map(|(p, v)| (vec![("pool", p)], v)).collect();
        gauge(&mut enc, "hashrate_hs", "Hashrate measured from valid shares, by pool (H/s)", &series)?;
        let cs = self.curtailer.snapshot();
        let mut miners = Vec::new();
        let mut watts = Vec::new();
        let mut ghr = Vec::new();
        for g in &cs.groups {
            miners.push((vec![("group", g.name.clone()), ("state", "mining".into())], g.mining as f64));
            miners.push((vec![("group", g.name.clone()), ("state", "parked".into())], g.parked as f64));
            watts.push((vec![("group", g.name.clone()), ("state", "mining".into())], g.watts.0));
            watts.push((vec![("group", g.name.clone()), ("state", "parked".into())], g.parked_watts.0));
            ghr.push((vec![("group", g.name.clone())], g.hashrate_hs.0));
        }
        gauge(&mut enc, "group_hashrate_hs", "Hashrate measured from valid shares, by curtailment group (H/s)", &ghr)?;
        gauge(&mut enc, "curtail_miners", "Miners by curtailment group and state", &miners)?;
        gauge(&mut enc, "curtail_watts", "Estimated watts drawn by group and state (parked miners still draw: fans, control boards, idle hashboards)", &watts)?;
        // Always exported, so a dashboard shows "none" rather than "No data".
        let budget = [(vec![], cs.budget_w.map_or(f64::NAN, |w| w.0))];
        gauge(&mut enc, "curtail_budget_watts", "The power budget in force, in watts (NaN when none)", &budget)?;
        counter(
            &mut enc,
            "curtail_rows_repaired",
            "Disagreements of the curtailment controller's rows with the live sessions, repaired (each also logged as an error and sent as a rows_repaired event; 0 is the only right value)",
            cs.rows_repaired,
        )?;
        let active = [(vec![], f64::from(u8::from(cs.budget_w.is_some())))];
        gauge(&mut enc, "curtail_budget_active", "1 while a power budget is in force, else 0", &active)?;
        if !cs.feeds.is_empty() {
            let feed = |f: fn(&crate::curtail::state::FeedFigures) -> f64| -> Vec<_> {
                cs.feeds.iter().map(|x| (vec![("feed", x.name.to_owned())], f(x))).collect()
            };
            let help = "Last good reading of a measured feed (meter, other_load), in watts (NaN while stale)";
            gauge(&mut enc, "curtail_feed_watts", help, &feed(|x| x.watts.map_or(f64::NAN, |w| w.0)))?;
            let help = "1 while a measured feed is stale (no good reading for its stale_after_s), else 0";
            gauge(&mut enc, "curtail_feed_stale", help, &feed(|x| f64::from(u8::from(x.stale))))?;
            let help = "Failed reads of a measured feed, since start";
            gauge(&mut enc, "curtail_feed_errors", help, &feed(|x| x.errors as f64))?;
            let cal = [(vec![], cs.calibration)];
            let help = "What every miner's watt estimate is scaled by: measured / estimated (1 without a meter)";
            gauge(&mut enc, "curtail_calibration_factor", help, &cal)?;
        }
        if let Some(c) = self.curtailer.cluster_view() {
            let one = |v: f64| [(vec![("site", c.site.clone())], v)];
            let help = "Cluster mode: 1 while this instance is the site's planner, else 0";
            gauge(&mut enc, "cluster_planner", help, &one(f64::from(u8::from(c.role == "planner"))))?;
            let help = "Cluster mode: this instance's allotment of the site budget, in watts (NaN: no limit)";
            gauge(&mut enc, "cluster_allotment_watts", help, &one(c.allotment_w.map_or(f64::NAN, |w| w.0)))?;
            let help = "Cluster mode: the site budget, in watts (NaN: none)";
            gauge(&mut enc, "cluster_site_budget_watts", help, &one(c.budget_w.map_or(f64::NAN, |w| w.0)))?;
            let help = "Cluster mode: what every instance's mining miners draw, in watts (their reports)";
            gauge(&mut enc, "cluster_site_drawn_watts", help, &one(c.drawn_w.0))?;
            let help = "Cluster mode: instances of the site with a live report";
            gauge(&mut enc, "cluster_instances", help, &one(c.instances.len() as f64))?;
            let help = "Cluster mode: 1 while etcd answers within lease_s, else 0";
            gauge(&mut enc, "cluster_etcd_reachable", help, &one(f64::from(u8::from(c.etcd_reachable))))?;
        }
        let sh = s.shares.snapshot();
        counter(
            &mut enc,
            "shares_forwarded",
            "Valid shares that met the pool's difficulty, forwarded to it (each ends accepted, rejected or unanswered)",
            sh.forwarded,
        )?;
        counter(
            &mut enc,
            "shares_pool_unanswered",
            "Forwarded shares whose pool session ended before an answer",
            sh.pool_unanswered,
        )?;
        counter(&mut enc, "failovers", "Moves to another pool URL", s.failovers.load(Relaxed))?;
        counter(
            &mut enc,
            "pool_returns_to_primary",
            "Upstream connections that went back to their route's first pool URL once it answered again",
            s.returns_to_primary.load(Relaxed),
        )?;
        Ok(())
    }
}

async fn metrics(State(st): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &st.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when at least one pool session is up: miners can get work.
async fn readyz(State(st): State<HttpState>) -> (StatusCode, &'static str) {
    if st.stats.upstreams_connected.load(Relaxed) > 0 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no pool session\n")
    }
}

/// One connected miner in the workers API.
#[derive(Debug, serde::Serialize)]
pub struct WorkerRow {
    /// The curtailment miner id (control protocol), once authorized.
    pub miner: Option<MinerId>,
    pub worker: Option<String>,
    pub address: String,
    pub user_agent: Option<String>,
    pub model: Option<String>,
    pub difficulty: f64,
    pub hashrate_hs: HashesPerSec,
    pub accepted: u64,
    pub rejected: u64,
    pub forwarded: u64,
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub blocks: u64,
    pub last_share_ms: Option<u64>,
    pub connected_ms: u64,
    pub curtailment: MinerState,
    pub watts: Option<Watts>,
    pub watts_source: Option<WattsSource>,
}

#[derive(Debug, serde::Serialize)]
pub struct Workers {
    pub workers: Vec<WorkerRow>,
}

async fn workers(State(st): State<HttpState>) -> Json<Workers> {
    // Curtailment state and model by miner id, from the controller.
    let rows = st.curtailer.status(true).await.ok().and_then(|s| s.miners).unwrap_or_default();
    let curtail: HashMap<MinerId, MinerRow> = rows.into_iter().map(|m| (m.who.miner, m)).collect();
    let mut out: Vec<WorkerRow> = st
        .sessions
        .snapshot()
        .into_iter()
        .map(|m| {
            let w = &m.info;
            let name = w.worker.get().map(|n| n.to_string());
            let miner = match w.miner.load(Relaxed) {
                0 => None,
                id => Some(MinerId(id)),
            };
            let c = miner.and_then(|id| curtail.get(&id));
            let sh = w.counters.snapshot();
            let parked = if w.parked.load(Relaxed) { MinerState::Parked } else { MinerState::Mining };
            WorkerRow {
                miner,
                worker: name,
                address: w.addr.to_string(),
                user_agent: w.user_agent.get().cloned(),
                model: c.and_then(|c| c.model.clone()),
                difficulty: w.difficulty.get(),
                hashrate_hs: HashesPerSec(w.hashrate.get()),
                accepted: sh.valid,
                rejected: sh.rejected,
                forwarded: sh.forwarded,
                pool_accepted: sh.pool_accepted,
                pool_rejected: sh.pool_rejected,
                blocks: sh.blocks,
                last_share_ms: match w.last_share_ms.load(Relaxed) {
                    0 => None,
                    t => Some(t),
                },
                connected_ms: w.connected_ms,
                curtailment: c.map_or(parked, |c| c.state),
                watts: c.map(|c| c.watts),
                watts_source: c.map(|c| c.watts_source),
            }
        })
        .collect();
    out.sort_by(|a, b| a.worker.cmp(&b.worker));
    Json(Workers { workers: out })
}

/// Serve the observability endpoints on their own listener.
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/workers", get(workers))
        .with_state(state);
    tracing::info!(%bound, "metrics and API listening");
    Ok((
        bound,
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        }),
    ))
}
