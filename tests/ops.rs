//! Operations: the metrics scrape (parsed), health checks and the workers API.

mod common;
use common::*;
use serde_json::Value;
use sluice::app::Proxy;
use sluice::sim::fleet::{Fleet, FleetConfig, Profile};
use sluice::sim::pool::{SimPool, SimPoolConfig};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Parse the text exposition format into "name{labels}" -> value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        out.insert(series.to_owned(), value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")));
    }
    out
}

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(&url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_the_health_checks_and_the_workers_api_tell_the_truth() {
    let pool = steady_pool().await;
    let mut cfg = test_config(vec![pool.url("farm")]);
    cfg.metrics.per_worker = true;
    cfg.metrics.max_workers = 3;
    let proxy = Proxy::start(&cfg).await.unwrap();
    let base = format!("http://{}", proxy.http.expect("metrics listener"));
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: 5,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_millis(100),
        ..Default::default()
    });
    assert!(
        wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10 && fleet.stats.accepted.load(Relaxed) >= 50).await
    );
    fleet.pause();
    assert!(
        wait_until(10.0, || fleet.in_flight() == 0 && {
            let s = proxy.stats.shares.snapshot();
            s.forwarded == s.pool_accepted
        })
        .await
    );

    assert_eq!(get(format!("{base}/healthz")).await, (200, "ok\n".into()));
    assert_eq!(get(format!("{base}/readyz")).await.0, 200);

    let (status, text) = get(format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let m = parse_metrics(&text);
    let snap = proxy.stats.shares.snapshot();
    assert_eq!(m["sluice_miners_connected"], 5.0, "{text}");
    assert_eq!(m[r#"sluice_shares_total{result="accepted",reason=""}"#], snap.valid as f64);
    assert_eq!(snap.valid, fleet.stats.accepted.load(Relaxed));
    let pool_key = format!(r#"sluice_pool_shares_total{{pool="{}",result="accepted",reason=""}}"#, pool.addr);
    assert_eq!(m[&pool_key], pool.stats.accepted.load(Relaxed) as f64);
    assert_eq!(m[&format!(r#"sluice_upstream_connections{{pool="{}",state="connected"}}"#, pool.addr)], 1.0);
    assert_eq!(m["sluice_pool_rtt_seconds_count"], pool.stats.accepted.load(Relaxed) as f64);
    assert_eq!(m["sluice_submit_answer_seconds_count"], snap.valid as f64);
    assert_eq!(m["sluice_shares_forwarded_total"], snap.forwarded as f64);
    assert_eq!(m[r#"sluice_curtail_miners{group="default",state="mining"}"#], 5.0);
    // Per-worker series, capped at 3 workers: the other two share "_other".
    let workers: Vec<&String> = m.keys().filter(|k| k.starts_with("sluice_worker_shares_total{")).collect();
    assert_eq!(workers.len(), 4, "{workers:?}");
    // No budget: the series is there (a dashboard shows "none", not "No data").
    assert!(m["sluice_curtail_budget_watts"].is_nan(), "no budget: NaN");
    assert_eq!(m["sluice_curtail_budget_active"], 0.0);
    // The controller's self-check found its rows and the live sessions agreeing.
    assert_eq!(m["sluice_curtail_rows_repaired_total"], 0.0);
    assert!(workers.iter().any(|k| k.contains(r#"worker="_other""#)));
    let per_worker_sum: f64 = workers.iter().map(|k| m[*k]).sum();
    assert_eq!(per_worker_sum, snap.valid as f64);

    let (status, body) = get(format!("{base}/api/v1/workers")).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let ws = v["workers"].as_array().unwrap();
    assert_eq!(ws.len(), 5);
    let total: u64 = ws.iter().map(|w| w["accepted"].as_u64().unwrap()).sum();
    // Sessions that ended take their counts with them; none should have.
    let gone = fleet.stats.disconnects.load(Relaxed);
    if gone == 0 {
        assert_eq!(total, snap.valid);
    } else {
        assert!(total <= snap.valid, "{gone} disconnects");
    }
    let w0 = &ws[0];
    assert_eq!(w0["worker"], "sim.0");
    assert!(w0["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(w0["user_agent"], "cgminer/4.12.1");
    assert_eq!(w0["curtailment"], "mining");
    assert!(w0["difficulty"].as_f64().unwrap() > 0.0);
    assert!(w0["last_share_ms"].as_u64().unwrap() > 0);

    // Without a pool session sluice is alive but not ready.
    drop(pool);
    assert!(wait_until(10.0, || proxy.stats.upstreams_connected.load(Relaxed) == 0).await);
    assert_eq!(get(format!("{base}/readyz")).await.0, 503);
    assert_eq!(get(format!("{base}/healthz")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_drain_loses_no_accepted_share() {
    // A slow pool, so shares are in flight when the drain begins.
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.00002,
        job_interval: Duration::from_secs(3600),
        answer_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&test_config(vec![pool.url("farm")])).await.unwrap();
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: 10,
        share_interval: Duration::from_millis(100),
        ..Default::default()
    });
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 10).await);
    assert!(wait_until(10.0, || proxy.hub().outstanding() >= 1).await, "a share in flight");
    let r = proxy.shutdown(Duration::from_secs(10)).await;
    assert_eq!(r.miners_at_start, 10);
    assert_eq!(r.miners_left, 0, "every miner was sent away");
    assert!(r.submits_in_flight >= 1, "{r:?}");
    assert_eq!(r.submits_unanswered, 0, "{r:?}");
    let s = proxy.stats.shares.snapshot();
    assert_eq!(s.pool_unanswered, 0);
    assert_eq!(
        s.forwarded,
        s.pool_accepted,
        "every forwarded share was answered: {s:?} {:?}",
        pool.stats.reasons.lock()
    );
    assert_eq!(s.pool_accepted, pool.stats.accepted.load(Relaxed), "and the pool has them all");
    assert_eq!(pool.stats.rejected.load(Relaxed), 0);
    assert!(fleet.stats.disconnects.load(Relaxed) >= 10);
    // New miners are refused once the drain has begun.
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err());
}

fn route(name: &str, url: sluice::config::PoolUrl, workers: &str, weight: f64) -> sluice::config::RouteConfig {
    sluice::config::RouteConfig { name: name.into(), urls: vec![url], workers: workers.into(), cidrs: vec![], weight }
}

async fn quick_pool() -> SimPool {
    SimPool::start(SimPoolConfig { difficulty: 0.00002, job_interval: Duration::from_secs(3600), ..Default::default() })
        .await
        .unwrap()
}

fn fleet_of(target: std::net::SocketAddr, prefix: &str, miners: usize) -> Fleet {
    Fleet::start(FleetConfig {
        target,
        miners,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_millis(150),
        worker_prefix: prefix.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_customers_miners_reach_that_customers_pool() {
    let (a, b) = (quick_pool().await, quick_pool().await);
    let mut cfg = test_config(vec![a.url("acct-a")]);
    cfg.pool = vec![route("customer-b", b.url("acct-b"), "custb.*", 0.0)];
    let proxy = Proxy::start(&cfg).await.unwrap();
    let (fa, fb) = (fleet_of(proxy.addr, "sim", 4), fleet_of(proxy.addr, "custb", 4));
    assert!(wait_until(30.0, || a.accepted_for("acct-a") >= 5 && b.accepted_for("acct-b") >= 5).await);
    fa.pause();
    fb.pause();
    assert!(wait_until(10.0, || fa.in_flight() == 0 && fb.in_flight() == 0).await);
    // Moved at authorize, with the same extranonce1 where that prefix is free
    // on the other route, else by one reconnect (all these miners share
    // 127.0.0.1, the worst case for placement by address). Nothing refused,
    // and each pool saw only its own account.
    let reconnects = fa.stats.disconnects.load(Relaxed) + fb.stats.disconnects.load(Relaxed);
    assert!(reconnects <= 8, "{reconnects} reconnects for 8 miners");
    assert_eq!(fa.stats.rejected.load(Relaxed) + fb.stats.rejected.load(Relaxed), 0);
    assert_eq!((a.accepted_for("acct-b"), b.accepted_for("acct-a")), (0, 0));
    assert_eq!(a.stats.rejected.load(Relaxed) + b.stats.rejected.load(Relaxed), 0);
    let s = proxy.stats.shares.snapshot();
    assert!(
        wait_until(5.0, || {
            let s = proxy.stats.shares.snapshot();
            s.forwarded == s.pool_accepted
        })
        .await
    );
    assert_eq!(
        proxy.stats.shares.snapshot().pool_accepted,
        a.stats.accepted.load(Relaxed) + b.stats.accepted.load(Relaxed),
        "{s:?}"
    );
    assert!(
        wait_until(5.0, || proxy.router().routes[1].miners.load(Relaxed) == 4).await,
        "the four custb miners, on their route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_follows_the_weights() {
    let (a, b) = (quick_pool().await, quick_pool().await);
    let mut cfg = test_config(vec![]);
    cfg.pool = vec![route("a", a.url("acct-a"), "", 70.0), route("b", b.url("acct-b"), "", 30.0)];
    let proxy = Proxy::start(&cfg).await.unwrap();
    let f = fleet_of(proxy.addr, "sim", 20);
    assert!(wait_until(20.0, || proxy.stats.miners_connected.load(Relaxed) == 20).await);
    assert!(
        wait_until(10.0, || proxy.router().routes[0].miners.load(Relaxed)
            + proxy.router().routes[1].miners.load(Relaxed)
            == 20)
        .await
    );
    assert_eq!(
        (proxy.router().routes[0].miners.load(Relaxed), proxy.router().routes[1].miners.load(Relaxed)),
        (14, 6),
        "70/30 of 20 miners"
    );
    assert!(wait_until(30.0, || a.accepted_for("acct-a") > 0 && b.accepted_for("acct-b") > 0).await);
    f.pause();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_pools_and_curtailment_without_dropping_miners() {
    let (a, b) = (quick_pool().await, quick_pool().await);
    let cfg = test_config(vec![a.url("acct-a")]);
    let proxy = Proxy::start(&cfg).await.unwrap();
    let old = fleet_of(proxy.addr, "old", 4);
    assert!(wait_until(30.0, || a.accepted_for("acct-a") >= 5).await);

    // New default pool, a curtailment power rule and a new line limit.
    let mut next = cfg.clone();
    next.upstream = vec![b.url("acct-b")];
    next.limits.max_line_bytes = 8192;
    next.curtail.power =
        vec![sluice::curtail::power::PowerRule { pattern: "*".into(), watts: Some(1234.0), ..Default::default() }];
    let changed = proxy.reload(&next).await.unwrap();
    assert_eq!(changed.applied, vec!["curtail.power", "limits.max_line_bytes", "upstream"], "{changed:?}");
    assert!(changed.at_restart.is_empty(), "{changed:?}");

    // New miners go to the new pool; the old ones stay where they were.
    let new = fleet_of(proxy.addr, "new", 3);
    assert!(wait_until(30.0, || b.accepted_for("acct-b") >= 5).await);
    let before = a.accepted_for("acct-a");
    assert!(wait_until(10.0, || a.accepted_for("acct-a") > before).await, "old miners still mine on the old pool");
    assert_eq!(old.stats.disconnects.load(Relaxed) + new.stats.disconnects.load(Relaxed), 0);
    // The replaced route's connection and its pool stay in the scrape
    // while its miners are there, beside the new one.
    let metrics = format!("http://{}/metrics", proxy.http.expect("metrics listener"));
    let (_, text) = get(metrics.clone()).await;
    let m = parse_metrics(&text);
    for (pool, url) in [(a.addr, a.url("acct-a")), (b.addr, b.url("acct-b"))] {
        let conns = format!(r#"sluice_upstream_connections{{pool="{pool}",state="connected"}}"#);
        let up = format!(r#"sluice_pool_up{{route="default",url="{url}",role="primary",protocol="sv1"}}"#);
        assert!(m.get(&conns).is_some_and(|v| *v >= 1.0) && m.get(&up) == Some(&1.0), "{pool}: {text}");
    }
    let st = proxy.curtailer.status(true).await.unwrap();
    let miners = st.miners.as_deref().unwrap();
    assert_eq!(miners.len(), 7);
    assert!(
        miners
            .iter()
            .all(|m| m.watts.0 == 1234.0 && m.watts_source == sluice::curtail::power::WattsSource::ConfigFixed),
        "{st:?}"
    );
    // A bad config is refused and the running one stays.
    let mut bad = next.clone();
    bad.difficulty.start = -1.0;
    assert!(proxy.reload(&bad).await.is_err());
    assert_eq!(proxy.router().routes[0].hub.settings().urls[0].port, b.addr.port());
    // When the old miners leave, the old pool's connection closes.
    old.stop();
    drop(old);
    assert!(
        wait_until(90.0, || a.stats.connections.load(Relaxed) == 0).await,
        "the replaced route's connection closed"
    );
    // And then its connection and pool leave the scrape (counters keep
    // what the pool answered).
    let gone = [
        format!(r#"sluice_pool_up{{route="default",url="{}""#, a.url("acct-a")),
        format!(r#"sluice_upstream_connections{{pool="{}""#, a.addr),
    ];
    let mut text = String::new();
    for _ in 0..100 {
        text = get(metrics.clone()).await.1;
        if !gone.iter().any(|g| text.contains(g)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!gone.iter().any(|g| text.contains(g)), "{text}");
}

/// Every series the shipped Grafana dashboard queries is one sluice exports
/// (a renamed metric would leave a panel on "No data" without a word).
/// Labelled families appear once they have a series: a few shares and one
/// closed connection give them one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_sluice_exports() {
    let pool = steady_pool().await;
    let proxy = proxy(vec![pool.url("farm")]).await;
    let fleet = Fleet::start(FleetConfig {
        target: proxy.addr,
        miners: 2,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_millis(100),
        ..Default::default()
    });
    assert!(wait_until(30.0, || pool.stats.accepted.load(Relaxed) >= 1).await);
    drop(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    let url = format!("http://{}/metrics", proxy.http.expect("metrics listener"));
    let mut text = String::new();
    for _ in 0..100 {
        text = get(url.clone()).await.1;
        if text.contains("sluice_miner_connections_closed_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(fleet);
    // Exported only when configured: the meter and follow feeds.
    const ONLY_WITH_A_METER: [&str; 1] = ["sluice_curtail_feed_watts"];
    let families: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next()).collect();
    let dashboard: Value =
        serde_json::from_str(include_str!("../docker/grafana/dashboards/sluice.json")).expect("dashboard JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let mut rest = expr;
            while let Some(i) = rest.find("sluice_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                queried.push((panel["title"].as_str().unwrap_or_default().to_owned(), name));
            }
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    for (panel, name) in queried.into_iter().filter(|(_, n)| !ONLY_WITH_A_METER.contains(&n.as_str())) {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.contains(f))
            .unwrap_or(&name);
        assert!(families.contains(family), "panel {panel:?} queries {name}, which no metric family exports");
    }
}

/// docker/compose.scale.yml is monitored: it runs a Prometheus whose config
/// scrapes every instance's metrics port, and that config is one Debian's
/// `promtool` (apt-get install prometheus, as .ci/test does) accepts.
#[test]
fn the_scaled_compose_scrapes_every_instance() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker");
    let compose = std::fs::read_to_string(dir.join("compose.scale.yml")).unwrap();
    let ports: Vec<&str> =
        compose.lines().filter_map(|l| l.trim().strip_prefix("SLUICE_METRICS__LISTEN:")).map(str::trim).collect();
    assert_eq!(ports.len(), 3, "{compose}");
    assert!(compose.contains("./prometheus/prometheus.scale.yml:/etc/prometheus/prometheus.yml:ro"), "{compose}");
    let prom = std::fs::read_to_string(dir.join("prometheus/prometheus.scale.yml")).unwrap();
    for p in &ports {
        assert!(prom.contains(&format!("\"{p}\"")), "{p} is not scraped:\n{prom}");
    }
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.join("prometheus/prometheus.scale.yml"))
        .output()
        .expect("promtool (apt-get install prometheus; the README's test command, .ci/test, does it)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
