//! A Braiins OS miner's web API, as asic-rs 0.8 speaks to it (its 25.07
//! backend), for the tests and benches of `method = "power-target"`: one
//! simulated miner per loopback address, on port 80 as on a real miner.
//!
//! What asic-rs sends, and this answers:
//! * identification: `GET /` (a page naming "Braiins OS"), then `POST
//!   /graphql` for the model name and the version;
//! * `POST /api/v1/auth/login` `{username, password}` -> `{token}`; every
//!   other call carries `Authorization: <token>` (401 otherwise);
//! * `PUT /api/v1/actions/pause`, `/actions/resume`;
//! * `PUT /api/v1/performance/power-target` `{"watt": N}`: refused (400)
//!   outside the envelope;
//! * `GET /api/v1/miner/stats`: hashrate and the approximated consumption.
//!
//! The simulated machine: a new target is reached in a straight line over
//! `settle` (down or up), a pause drops to the idle draw at once, a resume
//! climbs from idle to the target over `settle`; hashrate follows the
//! draw along the model's curve.

use crate::curtail::targets::Curve;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const TOKEN: &str = "sluice-double-token";

/// What the simulated miner is.
#[derive(Debug, Clone)]
pub struct Spec {
    /// As the firmware names it ("Antminer S19k Pro").
    pub model: String,
    pub nominal_w: f64,
    pub nominal_ths: f64,
    /// What it draws paused.
    pub idle_w: f64,
    /// The power-target envelope (its tuner constraints).
    pub min_w: f64,
    pub max_w: f64,
    /// How long a new target takes to reach.
    pub settle: Duration,
    /// Hashrate against power, relative to nominal.
    pub curve: Curve,
}

#[derive(Debug)]
struct Machine {
    paused: bool,
    target_w: f64,
    /// Where the draw was when the target (or pause state) last changed.
    from_w: f64,
    changed: Instant,
    /// Requests seen, in order ("PUT power-target 1656", "PUT pause", ...).
    log: Vec<String>,
}

impl Machine {
    fn draw(&self, spec: &Spec, now: Instant) -> f64 {
        if self.paused {
            return spec.idle_w;
        }
        let k =
            (now.saturating_duration_since(self.changed).as_secs_f64() / spec.settle.as_secs_f64().max(1e-9)).min(1.0);
        self.from_w + (self.target_w - self.from_w) * k
    }

    fn retarget(&mut self, spec: &Spec, target_w: f64, paused: bool) {
        let now = Instant::now();
        self.from_w = if self.paused && !paused { spec.idle_w } else { self.draw(spec, now) };
        (self.target_w, self.paused, self.changed) = (target_w, paused, now);
    }
}

struct Shared {
    spec: Spec,
    m: Mutex<Machine>,
}

/// One simulated Braiins OS miner.
pub struct BraiinsDouble {
    pub ip: IpAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for BraiinsDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BraiinsDouble {
    /// Serve `ip:80` (a loopback address: any of 127.0.0.0/8 on Linux).
    /// Port 80 is where asic-rs looks, so this needs the right to bind it
    /// (root, or `net.ipv4.ip_unprivileged_port_start`).
    pub async fn start(ip: IpAddr, spec: Spec) -> std::io::Result<BraiinsDouble> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 80)).await?;
        let m = Machine {
            paused: false,
            target_w: spec.nominal_w,
            from_w: spec.nominal_w,
            changed: Instant::now(),
            log: Vec::new(),
        };
        let shared = Arc::new(Shared { spec, m: Mutex::new(m) });
        let app = Router::new()
            .route("/", get(|| async { "<html><head><title>Braiins OS</title></head></html>" }))
            .route("/graphql", post(graphql))
            .route("/api/v1/auth/login", post(login))
            .route("/api/v1/actions/pause", put(pause))
            .route("/api/v1/actions/resume", put(resume))
            .route("/api/v1/performance/power-target", put(power_target))
            .route("/api/v1/miner/stats", get(stats))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(BraiinsDouble { ip, shared, task })
    }

    /// What it draws now (what a meter on its circuit reads).
    pub fn draw(&self) -> f64 {
        self.shared.m.lock().draw(&self.shared.spec, Instant::now())
    }

    /// The power target set on it.
    pub fn target(&self) -> f64 {
        self.shared.m.lock().target_w
    }

    pub fn paused(&self) -> bool {
        self.shared.m.lock().paused
    }

    /// The hashrate it has now, TH/s.
    pub fn hashrate_ths(&self) -> f64 {
        hashrate(&self.shared, Instant::now())
    }

    /// The calls it took, in order.
    pub fn log(&self) -> Vec<String> {
        self.shared.m.lock().log.clone()
    }
}

fn hashrate(s: &Shared, now: Instant) -> f64 {
    let m = s.m.lock();
    if m.paused {
        return 0.0;
    }
    let p = m.draw(&s.spec, now) / s.spec.nominal_w;
    s.spec.nominal_ths * s.spec.curve.hashrate(p).unwrap_or(p)
}

/// The token as Braiins OS takes it: the header's whole value (what
/// asic-rs sends), or after "Bearer ".
fn authorized(h: &HeaderMap) -> bool {
    let v = h.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    v.strip_prefix("Bearer ").unwrap_or(v) == TOKEN
}

fn unauthorized() -> axum::response::Response {
    (StatusCode::UNAUTHORIZED, Json(json!({"message": "unauthorized"}))).into_response()
}

async fn graphql(State(s): State<Arc<Shared>>, Json(q): Json<Value>) -> Json<Value> {
    let q = q["query"].as_str().unwrap_or_default();
    Json(if q.contains("modelName") {
        json!({"data": {"bosminer": {"info": {"modelName": s.spec.model}}}})
    } else if q.contains("version") {
        json!({"data": {"bos": {"info": {"version": {"full": "2025-07-21-0-a1b2c3d4-25.07"}}}}})
    } else {
        json!({"data": null, "errors": [{"message": "unknown query"}]})
    })
}

async fn login(Json(b): Json<Value>) -> axum::response::Response {
    if b["username"].as_str().is_none() {
        return unauthorized();
    }
    Json(json!({"token": TOKEN, "timeout_s": 3600})).into_response()
}

async fn pause(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut m = s.m.lock();
    let t = m.target_w;
    m.retarget(&s.spec, t, true);
    m.log.push("PUT pause".into());
    Json(json!({})).into_response()
}

async fn resume(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut m = s.m.lock();
    let t = m.target_w;
    m.retarget(&s.spec, t, false);
    m.log.push("PUT resume".into());
    Json(json!({})).into_response()
}

async fn power_target(State(s): State<Arc<Shared>>, h: HeaderMap, Json(b): Json<Value>) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let Some(w) = b["watt"].as_f64() else {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "watt: expected a number"}))).into_response();
    };
    let mut m = s.m.lock();
    m.log.push(format!("PUT power-target {w:.0}"));
    if w < s.spec.min_w || w > s.spec.max_w {
        let why = format!("power target {w:.0} W outside {:.0}..{:.0} W", s.spec.min_w, s.spec.max_w);
        return (StatusCode::BAD_REQUEST, Json(json!({"message": why}))).into_response();
    }
    let paused = m.paused;
    m.retarget(&s.spec, w, paused);
    Json(json!({"watt": w})).into_response()
}

async fn stats(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let now = Instant::now();
    let ghs = hashrate(&s, now) * 1000.0;
    let watt = s.m.lock().draw(&s.spec, now).round() as i64;
    Json(json!({
        "miner_stats": {"real_hashrate": {"last_5s": {"gigahash_per_second": ghs}}},
        "power_stats": {"approximated_consumption": {"watt": watt}},
    }))
    .into_response()
}
