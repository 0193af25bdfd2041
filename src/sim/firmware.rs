//! Firmware doubles for the tests and benches of `method = "power-target"`:
//! a miner's web API as asic-rs 0.8 speaks to it, one simulated miner per
//! loopback address, on port 80 as on a real miner. Two families:
//!
//! **Braiins OS** (its 25.07 backend):
//! * identification: `GET /` (a page naming "Braiins OS"), then `POST
//!   /graphql` for the model name and the version;
//! * `POST /api/v1/auth/login` `{username, password}` -> `{token}`; every
//!   other call carries `Authorization: <token>` (401 otherwise);
//! * `PUT /api/v1/actions/pause`, `/actions/resume`;
//! * `PUT /api/v1/performance/power-target` `{"watt": N}`: refused (400)
//!   outside the envelope, which is whole watts from `min_w` to `max_w`;
//! * `GET /api/v1/miner/stats`: hashrate and the approximated consumption;
//! * `GET /api/v1/configuration/constraints` (the tuner's power envelope)
//!   and `/configuration/miner` (the power target in force).
//!
//! **VNish** (its 1.2 backend): power by autotune preset, not by the watt.
//! * identification: `GET /` (a page naming AnthillOS), `GET /api/v1/info`
//!   for the model and the version;
//! * `POST /api/v1/unlock` `{pw}` -> `{token}`; writes carry `Authorization:
//!   Bearer <token>` (401 otherwise), reads are public;
//! * `GET /api/v1/autotune/presets`: the presets, each tuned or not;
//!   `GET /api/v1/settings` and `POST /api/v1/settings` with
//!   `miner.overclock.preset`: asic-rs picks the highest preset at or under
//!   the watts asked (none: it reports the target refused);
//! * `POST /api/v1/mining/stop`, `/mining/start`;
//! * `GET /api/v1/summary`: `miner.hr_realtime` (GH/s) and
//!   `miner.power_consumption` (W).
//!
//! A preset that is not tuned yet makes the miner tune first (what the
//! `restarts` key is for): it hashes nothing and draws idle for `retune`,
//! then climbs. The log names a VNish preset change "PUT power-target N" as
//! for Braiins OS, so tests read both alike.
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
    /// The power target it runs at before sluice sets one.
    pub own_w: f64,
    /// VNish: its autotune presets (watts, tuned); Braiins OS: unused.
    pub presets: Vec<(f64, bool)>,
    /// VNish: how long a preset that is not tuned keeps it from hashing.
    pub retune: Duration,
}

impl Spec {
    /// A miner of a built-in model ([`crate::curtail::power::builtin_models`])
    /// as its firmware names it: its nameplate watts and hashrate, its
    /// model's curve extended in proportion down to an envelope starting at
    /// `floor` of nameplate (up to 110%), 3% idle, running at nameplate
    /// before sluice sets a target. None: no such model.
    pub fn builtin(model: &str, firmware_name: &str, floor: f64, settle: Duration) -> Option<Spec> {
        let m = crate::curtail::power::builtin_models().into_iter().find(|m| m.name == model)?;
        let c = m.curve().ok()?;
        let (x, h) = c.points()[0];
        let mut pts: Vec<(f64, f64)> = c.points().iter().copied().filter(|p| p.0 < 1.0).collect();
        if floor < x {
            pts.insert(0, (floor, h * floor / x));
        }
        Some(Spec {
            model: firmware_name.into(),
            nominal_w: m.watts,
            nominal_ths: m.th_s,
            idle_w: m.watts * 0.03,
            min_w: (m.watts * floor).ceil(),
            max_w: m.watts * 1.1,
            settle,
            curve: Curve::new(&pts).ok()?,
            own_w: m.watts,
            presets: Vec::new(),
            retune: Duration::ZERO,
        })
    }
}

/// Which firmware's API a double speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Braiins,
    Vnish,
}

#[derive(Debug)]
struct Machine {
    paused: bool,
    target_w: f64,
    /// Where the draw was when the target (or pause state) last changed.
    from_w: f64,
    changed: Instant,
    /// Tuning a new preset until then: idle, no hashrate.
    tuning_until: Option<Instant>,
    /// Requests seen, in order ("PUT power-target 1656", "PUT pause", ...).
    log: Vec<String>,
}

impl Machine {
    fn tuning(&self, now: Instant) -> bool {
        self.tuning_until.is_some_and(|t| now < t)
    }

    fn draw(&self, spec: &Spec, now: Instant) -> f64 {
        if self.paused || self.tuning(now) {
            return spec.idle_w;
        }
        let since = self.tuning_until.unwrap_or(self.changed).max(self.changed);
        let k = (now.saturating_duration_since(since).as_secs_f64() / spec.settle.as_secs_f64().max(1e-9)).min(1.0);
        self.from_w + (self.target_w - self.from_w) * k
    }

    fn retarget(&mut self, spec: &Spec, target_w: f64, paused: bool) {
        let now = Instant::now();
        self.from_w = if (self.paused && !paused) || self.tuning(now) { spec.idle_w } else { self.draw(spec, now) };
        (self.target_w, self.paused, self.changed) = (target_w, paused, now);
    }

    /// A VNish preset that is not tuned: tuning first, from idle.
    fn retune(&mut self, spec: &Spec) {
        self.from_w = spec.idle_w;
        self.tuning_until = Some(Instant::now() + spec.retune);
    }
}

struct Shared {
    spec: Spec,
    m: Mutex<Machine>,
}

/// One simulated miner.
pub struct FirmwareDouble {
    pub ip: IpAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FirmwareDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FirmwareDouble {
    /// Serve `ip:80` (a loopback address: any of 127.0.0.0/8 on Linux).
    /// Port 80 is where asic-rs looks, so this needs the right to bind it
    /// (root, or `net.ipv4.ip_unprivileged_port_start`).
    pub async fn start(ip: IpAddr, family: Family, spec: Spec) -> std::io::Result<FirmwareDouble> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 80)).await?;
        let m = Machine {
            paused: false,
            target_w: spec.own_w,
            from_w: spec.own_w,
            changed: Instant::now(),
            tuning_until: None,
            log: Vec::new(),
        };
        let shared = Arc::new(Shared { spec, m: Mutex::new(m) });
        let app = match family {
            Family::Braiins => Router::new()
                .route("/", get(|| async { "<html><head><title>Braiins OS</title></head></html>" }))
                .route("/graphql", post(graphql))
                .route("/api/v1/auth/login", post(login))
                .route("/api/v1/actions/pause", put(pause))
                .route("/api/v1/actions/resume", put(resume))
                .route("/api/v1/performance/power-target", put(power_target))
                .route("/api/v1/miner/stats", get(stats))
                .route("/api/v1/configuration/constraints", get(constraints))
                .route("/api/v1/configuration/miner", get(configuration)),
            Family::Vnish => Router::new()
                .route("/", get(|| async { "<html><head><title>AnthillOS</title></head></html>" }))
                .route("/api/v1/info", get(vnish::info))
                .route("/api/v1/unlock", post(vnish::unlock))
                .route("/api/v1/autotune/presets", get(vnish::presets))
                .route("/api/v1/settings", get(vnish::settings).post(vnish::set_settings))
                .route("/api/v1/mining/stop", post(pause))
                .route("/api/v1/mining/start", post(resume))
                .route("/api/v1/summary", get(vnish::summary)),
        }
        .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FirmwareDouble { ip, shared, task })
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

    /// Its nameplate watts.
    pub fn nominal_w(&self) -> f64 {
        self.shared.spec.nominal_w
    }

    /// What it draws paused.
    pub fn idle_w(&self) -> f64 {
        self.shared.spec.idle_w
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
    if m.paused || m.tuning(now) {
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
    sleep_or_wake(&s, &h, true)
}

async fn resume(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    sleep_or_wake(&s, &h, false)
}

/// Pause or resume at the target in force (logged "PUT pause" / "PUT
/// resume" for either family).
fn sleep_or_wake(s: &Shared, h: &HeaderMap, paused: bool) -> axum::response::Response {
    if !authorized(h) {
        return unauthorized();
    }
    let mut m = s.m.lock();
    let t = m.target_w;
    m.retarget(&s.spec, t, paused);
    m.log.push(if paused { "PUT pause" } else { "PUT resume" }.into());
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

/// The tuner's envelope, whole watts.
async fn constraints(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let w = |x: f64| json!({"watt": x.round() as i64});
    Json(json!({"tuner_constraints": {"power_target": {
        "min": w(s.spec.min_w), "max": w(s.spec.max_w), "default": w(s.spec.nominal_w),
    }}}))
    .into_response()
}

/// The tuner's configuration: power-target mode at the target in force.
async fn configuration(State(s): State<Arc<Shared>>, h: HeaderMap) -> axum::response::Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let t = s.m.lock().target_w.round() as i64;
    Json(json!({"tuner": {"enabled": true, "tuner_mode": 1, "power_target": {"watt": t}}})).into_response()
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

/// VNish's web API (1.2), as asic-rs reads and writes it.
mod vnish {
    use super::{authorized, unauthorized, Shared, TOKEN};
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::Json;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use std::time::Instant;

    pub async fn info(State(s): State<Arc<Shared>>) -> Json<Value> {
        Json(json!({"miner": s.spec.model, "fw_version": "1.2.6", "hr_measure": "GH/s", "algorithm": "sha256d"}))
    }

    pub async fn unlock(Json(b): Json<Value>) -> axum::response::Response {
        match b["pw"].as_str() {
            Some(_) => Json(json!({"token": TOKEN})).into_response(),
            None => unauthorized(),
        }
    }

    pub async fn presets(State(s): State<Arc<Shared>>) -> Json<Value> {
        let list: Vec<Value> = s
            .spec
            .presets
            .iter()
            .map(|&(w, tuned)| {
                let ths = s.spec.nominal_ths * s.spec.curve.hashrate(w / s.spec.nominal_w).unwrap_or(0.0);
                let status = if tuned { "tuned" } else { "untuned" };
                json!({"name": format!("{w:.0}"), "pretty": format!("{w:.0} watt ~ {ths:.0} TH"), "status": status})
            })
            .collect();
        Json(Value::Array(list))
    }

    /// The preset in force: the target's watts, as VNish names it.
    fn preset(s: &Shared) -> String {
        format!("{:.0}", s.m.lock().target_w)
    }

    pub async fn settings(State(s): State<Arc<Shared>>) -> Json<Value> {
        Json(json!({"miner": {"overclock": {"preset": preset(&s), "globals": {"volt": 0, "freq": 0}}}}))
    }

    pub async fn set_settings(
        State(s): State<Arc<Shared>>,
        h: HeaderMap,
        Json(b): Json<Value>,
    ) -> axum::response::Response {
        if !authorized(&h) {
            return unauthorized();
        }
        let p = b.pointer("/miner/overclock/preset");
        let Some(w) = p.and_then(|p| p.as_str().and_then(|x| x.parse::<f64>().ok()).or_else(|| p.as_f64())) else {
            return (StatusCode::BAD_REQUEST, Json(json!({"err": "miner.overclock.preset expected"}))).into_response();
        };
        let Some(&(_, tuned)) = s.spec.presets.iter().find(|(pw, _)| (pw - w).abs() < 0.5) else {
            return (StatusCode::BAD_REQUEST, Json(json!({"err": format!("no preset {w:.0}")}))).into_response();
        };
        let mut m = s.m.lock();
        m.log.push(format!("PUT power-target {w:.0}"));
        let paused = m.paused;
        m.retarget(&s.spec, w, paused);
        if !tuned {
            m.retune(&s.spec);
        }
        Json(json!({"restart_required": false, "reboot_required": false})).into_response()
    }

    pub async fn summary(State(s): State<Arc<Shared>>) -> Json<Value> {
        let now = Instant::now();
        let ghs = super::hashrate(&s, now) * 1000.0;
        let watt = s.m.lock().draw(&s.spec, now).round() as i64;
        Json(
            json!({"miner": {"hr_realtime": ghs, "power_consumption": watt, "miner_status": {"miner_state": "mining"}}}),
        )
    }
}
