//! The closed loop on measured power, end to end with the third-party parts
//! a site runs:
//!
//! * Prometheus: Debian's `prometheus` package (`/usr/bin/prometheus`),
//!   scraping a test exporter ([`sluice::sim::gauges`]) that serves a GPU
//!   cluster's draw and a hall meter;
//! * Modbus TCP: a pymodbus server (PyPI `pymodbus`, tests/parts/modbus_meter.py)
//!   holding the same two figures in registers.
//!
//! `.ci/test`, the README's test command, installs both (apt-get, pip), and
//! etcd (Debian's `etcd-server`) for the clustered case.
//!
//! The hall meter reads what the miners holding a job would draw: each
//! model's nameplate plus 10% (real machines draw off nameplate), so sluice
//! only meets a budget on the meter by calibrating its estimates.

mod common;
use common::*;
use sluice::api::{BudgetSource, Event, MetBy, Status};
use sluice::app::Proxy;
use sluice::curtail::closed_loop::{FollowConfig, MeterConfig, OnStale};
use sluice::curtail::feed::{RegisterFormat, SourceConfig, SourceKind, WordOrder};
use sluice::sim::fleet::{Fleet, FleetStats};
use sluice::sim::gauges::{Gauges, Reading};
use sluice::sim::pool::SimPool;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Real draw over nameplate.
const OVER: f64 = 1.10;
const SITE_LIMIT: f64 = 50_000.0;
const MARGIN: f64 = 1_000.0;
const STALE_BUDGET: f64 = 10_000.0;

fn secs(s: f64) -> sluice::config::Seconds {
    Duration::from_secs_f64(s).into()
}

/// The simulated site: what each fleet's miners holding a job draw.
#[derive(Clone)]
struct Hall(Arc<Vec<(Arc<FleetStats>, f64)>>);

impl Hall {
    fn new(fleets: &[Fleet]) -> Hall {
        Hall(Arc::new(fleets.iter().zip(MODELS).map(|(f, m)| (f.stats.clone(), m.2 * OVER)).collect()))
    }
    fn watts(&self) -> f64 {
        self.0.iter().map(|(s, w)| s.holding.load(Relaxed) as f64 * w).sum()
    }
}

/// The GPU cluster's draw in watts (0: its exporter is down).
#[derive(Clone, Default)]
struct Gpu(Arc<AtomicU64>);

impl Gpu {
    fn set(&self, w: f64) {
        self.0.store(w as u64, Relaxed)
    }
    fn get(&self) -> Option<f64> {
        Some(self.0.load(Relaxed) as f64).filter(|&w| w > 0.0)
    }
}

/// A child process killed when the test ends, however it ends.
struct Part(Child);

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn need(program: &str, how: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {program}")]).output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "this test runs a real {program}: {how} (the README's test command, .ci/test, does it)"
    );
}

/// Debian's Prometheus, scraping `target` every second; its own data in a
/// temporary directory.
async fn prometheus(target: std::net::SocketAddr) -> (Part, String, tempfile::TempDir) {
    need("prometheus", "apt-get install prometheus");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: site\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = Part(child);
    let url = format!("http://127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if reqwest::get(format!("{url}/-/ready")).await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < end, "prometheus not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (part, url, dir)
}

/// The pymodbus server of tests/parts/modbus_meter.py.
async fn modbus_server() -> (Part, std::net::SocketAddr) {
    let ok = Command::new("python3").args(["-c", "import pymodbus"]).status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "this test runs a real Modbus server: pip install pymodbus (the README's test command, .ci/test, does it)"
    );
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parts/modbus_meter.py");
    let child = Command::new("python3").arg(script).arg(port.to_string()).stdin(Stdio::null()).spawn().unwrap();
    let mut part = Part(child);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let end = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(st)) = part.0.try_wait() {
            panic!("modbus_meter.py exited ({st}) before it listened; its error is above");
        }
        assert!(Instant::now() < end, "the Modbus server did not listen within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (part, addr)
}

/// The GPU cluster's draw and the hall meter, served by a test exporter
/// and scraped by a real Prometheus every second.
struct PromFeeds {
    /// The hall the meter reads (0 W until the fleet exists).
    hall: Arc<parking_lot::Mutex<Option<Hall>>>,
    url: String,
    _exporter: Gauges,
    _prom: (Part, tempfile::TempDir),
}

impl PromFeeds {
    async fn start(gpu: &Gpu) -> PromFeeds {
        let hall: Arc<parking_lot::Mutex<Option<Hall>>> = Default::default();
        let (g, h) = (gpu.clone(), hall.clone());
        let gpu_read: Reading = Arc::new(move || g.get());
        let hall_read: Reading = Arc::new(move || Some(h.lock().as_ref().map_or(0.0, Hall::watts)));
        let exporter =
            Gauges::start(vec![("gpu_power_watts".into(), gpu_read), ("hall_power_watts".into(), hall_read)])
                .await
                .unwrap();
        let (prom, url, dir) = prometheus(exporter.addr).await;
        PromFeeds { hall, url, _exporter: exporter, _prom: (prom, dir) }
    }

    /// A Prometheus feed of `query`.
    fn source(&self, query: &str) -> SourceConfig {
        SourceConfig {
            kind: Some(SourceKind::Prometheus),
            url: self.url.clone(),
            query: query.into(),
            ..SourceConfig::default()
        }
    }
}

struct Site {
    socket: std::path::PathBuf,
    _pool: SimPool,
    proxy: Proxy,
    _fleets: Vec<Fleet>,
    hall: Hall,
    gpu: Gpu,
}

/// The pool, the proxy in follow mode with a meter, and ten miners.
async fn site(meter: SourceConfig, other_load: SourceConfig, gpu: Gpu) -> Site {
    let pool = steady_pool().await;
    let mut cfg = test_config(vec![pool.url("farm")]);
    cfg.curtail.socket = std::env::temp_dir().join(format!("sluice-loop-{}-{}.sock", std::process::id(), free_port()));
    cfg.curtail.state_file = cfg.curtail.socket.with_extension("state.json");
    cfg.curtail.hold_s = secs(2.0);
    cfg.curtail.ramp_up_w_per_s = 5_000.0;
    cfg.curtail.power = model_rules();
    cfg.curtail.meter = Some(MeterConfig {
        source: meter,
        interval_s: secs(1.0),
        stale_after_s: secs(10.0), // a busy machine may delay a scrape; only other_load is made stale here
        settle_s: secs(3.0),
        ..MeterConfig::default()
    });
    cfg.curtail.follow = Some(FollowConfig {
        site_limit_w: sluice::api::Watts(SITE_LIMIT),
        margin_w: sluice::api::Watts(MARGIN),
        interval_s: secs(1.0),
        stale_after_s: secs(5.0),
        on_stale: OnStale::Shed,
        stale_budget_w: sluice::api::Watts(STALE_BUDGET),
        other_load,
    });
    let proxy = Proxy::start(&cfg).await.unwrap();
    let fleets = model_fleets(proxy.addr);
    let hall = Hall::new(&fleets);
    Site { socket: cfg.curtail.socket.clone(), _pool: pool, proxy, _fleets: fleets, hall, gpu }
}

impl Site {
    /// Poll status until `cond` holds; fail with the last status after `secs`.
    async fn until(&self, secs: f64, what: &str, mut cond: impl FnMut(&Status) -> bool) -> Status {
        let t = Instant::now();
        loop {
            let st = self.proxy.curtailer.status(false).await.unwrap();
            if cond(&st) {
                eprintln!("{what}: after {:.1} s", t.elapsed().as_secs_f64());
                return st;
            }
            assert!(
                t.elapsed().as_secs_f64() < secs,
                "{what}: not within {secs} s; hall {} W; {st:#?}",
                self.hall.watts()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GPU load steps up and down; the measured hall follows the budget.
    async fn follow_the_gpus(&self) {
        let fleet: f64 = MODELS.iter().map(|m| 2.0 * m.2).sum();
        // 20% of the site limit: 39 kW for the miners, more than they draw.
        self.gpu.set(0.2 * SITE_LIMIT);
        self.until(60.0, "all ten mining, calibrated on the meter", |s| {
            s.site.mining == 10
                && s.budget.source == BudgetSource::Follow
                && s.site.measured_w.is_some_and(|m| (m.0 - fleet * OVER).abs() < 1.0)
                && (s.calibration.factor - OVER).abs() < 0.005
        })
        .await;
        // 60%: 50 - 30 - 1 = 19 kW.
        let budget = SITE_LIMIT - 0.6 * SITE_LIMIT - MARGIN;
        self.gpu.set(0.6 * SITE_LIMIT);
        let st = self
            .until(30.0, "the measured hall under the new budget, met on the meter", |s| {
                s.budget.watts.is_some_and(|b| b.0 == budget)
                    && s.site.measured_w.is_some_and(|m| m.0 <= budget)
                    && s.budget.met == Some(true)
                    && s.budget.met_by == Some(MetBy::Measured)
            })
            .await;
        let hall = self.hall.watts();
        assert!(hall <= budget, "the hall itself draws {hall} W, budget {budget} W");
        // Calibrated, the plan parks what is needed and no more: the last
        // miner parked was the one that brought the hall under.
        let biggest = MODELS.iter().map(|m| m.2 * OVER).fold(0.0, f64::max);
        assert!(hall > budget - biggest, "over-shed: the hall draws {hall} W for a {budget} W budget");
        assert!(st.site.parked > 0);
        // The GPUs ease off: every miner resumes, at the ramp.
        self.gpu.set(0.1 * SITE_LIMIT);
        self.until(60.0, "every miner back", |s| s.site.mining == 10 && s.resuming == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_and_the_meter_through_a_real_prometheus() {
    let gpu = Gpu::default();
    gpu.set(0.2 * SITE_LIMIT);
    let feeds = PromFeeds::start(&gpu).await;
    let s = site(feeds.source("sum(hall_power_watts)"), feeds.source("sum(gpu_power_watts)"), gpu).await;
    *feeds.hall.lock() = Some(s.hall.clone());
    s.follow_the_gpus().await;

    // The GPU exporter goes down: Prometheus marks its series stale, the
    // query matches nothing, and after stale_after_s on_stale = "shed"
    // takes the miners to the stale budget.
    let mut events = s.proxy.curtailer.subscribe();
    s.gpu.set(0.0);
    s.until(30.0, "stale feed: shed to the stale budget, met on the meter", |st| {
        st.follow.as_ref().is_some_and(|f| f.other_load.stale)
            && st.budget.watts.is_some_and(|b| b.0 == STALE_BUDGET)
            && st.site.measured_w.is_some_and(|m| m.0 <= STALE_BUDGET)
            && st.budget.met == Some(true)
    })
    .await;
    let mut stale_events = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::MeterStale { feed, error, .. } = &e.event {
            assert_eq!(feed, "other_load");
            assert!(error.as_deref().is_some_and(|e| e.contains("matched no series")), "{error:?}");
            stale_events += 1;
        }
    }
    assert_eq!(stale_events, 1);
    // The metrics say so too, once their snapshot (at most a second old)
    // has caught up with the status just read.
    let url = format!("http://{}/metrics", s.proxy.http.unwrap());
    let mut text = String::new();
    for _ in 0..100 {
        text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if text.contains("sluice_curtail_feed_stale{feed=\"other_load\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("sluice_curtail_feed_stale{feed=\"other_load\"} 1"), "{text}");
    assert!(text.contains("sluice_curtail_feed_stale{feed=\"meter\"} 0"), "{text}");
    // And `sluice ctl status`, as an operator reads it.
    let socket = s.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("ctl")
            .arg("--socket")
            .arg(socket)
            .arg("status")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("budget: 10 kW (site) from follow"), "{text}");
    assert!(text.contains(": met (measured)"), "{text}");
    assert!(text.contains("meter: ") && text.contains("calibration x1.1"), "{text}");
    assert!(text.contains("STALE (last read: ") && text.contains("matched no series"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_and_the_meter_over_modbus_tcp() {
    let (_server, addr) = modbus_server().await;
    // The hall in watts, u32, high word first, at 100; the GPU load in kW,
    // f32, low word first, at 200 (meters differ; both are configurable).
    let meter = SourceConfig {
        kind: Some(SourceKind::Modbus),
        address: addr.to_string(),
        register: 100,
        format: RegisterFormat::U32,
        ..SourceConfig::default()
    };
    let gpu_src = SourceConfig {
        register: 200,
        format: RegisterFormat::F32,
        word_order: WordOrder::LowFirst,
        scale: 1000.0,
        ..meter.clone()
    };
    let gpu = Gpu::default();
    gpu.set(0.2 * SITE_LIMIT);
    let s = site(meter, gpu_src, gpu).await;
    // The meter's side: write the figures into the server as they change.
    let (hall, gpu) = (s.hall.clone(), s.gpu.clone());
    // Polled beside the test: a write that fails ends the test with the
    // writer's own error, not as a stale meter some time later.
    let writer = async move {
        use tokio_modbus::client::Writer as _;
        let mut ctx = tokio_modbus::client::tcp::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        loop {
            let w = hall.watts() as u32;
            let kw = (gpu.get().unwrap_or(0.0) / 1000.0) as f32;
            let k = kw.to_bits();
            for (at, words) in [(100, [(w >> 16) as u16, w as u16]), (200, [k as u16, (k >> 16) as u16])] {
                match ctx.write_multiple_registers(at, &words).await {
                    Ok(Ok(())) => {}
                    e => return Err::<(), String>(format!("write to register {at}: {e:?}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = s.follow_the_gpus() => {}
        e = writer => panic!("the Modbus meter's writer stopped: {e:?}"),
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.socket.with_extension("state.json"));
    }
}

/// Follow mode with two clustered instances (feature `cluster`, a real
/// etcd): one hall meter and one GPU feed in a real Prometheus, read by the
/// planner alone; 20 miners of five models split over the two; the hall
/// draws 1.10x nameplate; the GPU load steps from 10 kW to 50 kW under a
/// 100 kW site limit. The hall goes under the site budget within 15 s of
/// the step, with no more than a miner per instance parked beyond need,
/// and stays under it.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_over_two_clustered_instances_keeps_the_hall_under_the_site_budget() {
    const LIMIT: f64 = 100_000.0;
    let etcd = Etcd::start().await;
    let gpu = Gpu::default();
    gpu.set(10_000.0);
    let feeds = PromFeeds::start(&gpu).await;
    let source = |q: &str| feeds.source(q);
    let pool = steady_pool().await;
    let mut proxies = Vec::new();
    for name in ["x", "y"] {
        let mut cfg = test_config(vec![pool.url("farm")]);
        cfg.curtail.hold_s = secs(2.0);
        cfg.curtail.ramp_up_w_per_s = 5_000.0;
        cfg.curtail.power = model_rules();
        cfg.curtail.meter = Some(MeterConfig {
            source: source("sum(hall_power_watts)"),
            interval_s: secs(1.0),
            stale_after_s: secs(10.0),
            settle_s: secs(3.0),
            ..MeterConfig::default()
        });
        cfg.curtail.follow = Some(FollowConfig {
            site_limit_w: sluice::api::Watts(LIMIT),
            margin_w: sluice::api::Watts(MARGIN),
            interval_s: secs(1.0),
            stale_after_s: secs(10.0),
            on_stale: OnStale::Hold,
            stale_budget_w: sluice::api::Watts(STALE_BUDGET),
            other_load: source("sum(gpu_power_watts)"),
        });
        cfg.curtail.cluster = Some(sluice::curtail::cluster::ClusterConfig {
            endpoints: vec![etcd.url.clone()],
            site: "follow".into(),
            instance: name.into(),
            lease_s: secs(3.0),
            ..Default::default()
        });
        proxies.push(Proxy::start(&cfg).await.unwrap());
    }
    let fleets: Vec<Vec<Fleet>> = proxies.iter().map(|p| model_fleets(p.addr)).collect();
    let hall = Hall(Arc::new(
        fleets.iter().flat_map(|f| f.iter().zip(MODELS).map(|(f, m)| (f.stats.clone(), m.2 * OVER))).collect(),
    ));
    *feeds.hall.lock() = Some(hall.clone());
    let cluster = |st: &Status| st.cluster.clone().expect("cluster mode");
    let fleet: f64 = 2.0 * MODELS.iter().map(|m| 2.0 * m.2).sum::<f64>();
    until_all(&proxies, &hall, 60.0, "all twenty mining, the site calibrated on the hall meter", |all| {
        all.iter().map(|s| s.site.mining).sum::<u64>() == 20
            && all.iter().all(|s| {
                let c = cluster(s);
                c.budget_source == BudgetSource::Follow
                    && c.measured_w.is_some_and(|m| (m.0 - fleet * OVER).abs() < 1.0)
                    && (c.calibration_factor - OVER).abs() < 0.005
            })
    })
    .await;
    // 100 - 50 - 1 = 49 kW.
    let budget = LIMIT - 50_000.0 - MARGIN;
    gpu.set(50_000.0);
    let t = Instant::now();
    until_all(&proxies, &hall, 15.0, "the hall under the site budget, met on the meter", |all| {
        all.iter().all(|s| {
            let c = cluster(s);
            c.budget_w == Some(sluice::api::Watts(budget))
                && c.measured_w.is_some_and(|m| m.0 <= budget)
                && c.met == Some(true)
        })
    })
    .await;
    let under_after = t.elapsed();
    let w = hall.watts();
    assert!(w <= budget, "the hall itself draws {w} W, budget {budget} W");
    let biggest = MODELS.iter().map(|m| m.2 * OVER).fold(0.0, f64::max);
    assert!(w > budget - 2.0 * biggest, "over-shed: the hall draws {w} W for a {budget} W budget");
    // Held: the hall stays under while the GPUs stay up (polled for as
    // long again as it took to get there, and at least 5 s).
    let end = Instant::now() + under_after.max(Duration::from_secs(5));
    while Instant::now() < end {
        let w = hall.watts();
        assert!(w <= budget, "the hall went back over: {w} W for {budget} W");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(etcd);
}

/// Poll every proxy's status until `cond` holds for them all; fail with
/// the last statuses after `secs`.
#[cfg(feature = "cluster")]
async fn until_all(proxies: &[Proxy], hall: &Hall, secs: f64, what: &str, cond: impl Fn(&[Status]) -> bool) {
    let t = Instant::now();
    loop {
        let mut all = Vec::new();
        for p in proxies {
            all.push(p.curtailer.status(false).await.unwrap());
        }
        if cond(&all) {
            eprintln!("{what}: after {:.1} s", t.elapsed().as_secs_f64());
            return;
        }
        assert!(t.elapsed().as_secs_f64() < secs, "{what}: not within {secs} s; hall {} W; {all:#?}", hall.watts());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
