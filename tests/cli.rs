//! The `sluice` binary as a user runs it: config values parsed once and
//! refused with the key named, a bad reload that leaves the running proxy
//! alone, signals. Uses the built binary and the in-process sim-pool;
//! nothing third-party.

mod common;

use common::*;
use serde_json::json;
use sluice::sim::pool::{SimPool, SimPoolConfig};
use std::process::{Command, Stdio};
use std::time::Duration;

fn check_config(text: &str, name: &str) -> (bool, String) {
    let (_dir, p) = temp(name, text);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("check-config").arg(&p).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_config_refuses_seconds_that_cannot_be_a_timer_naming_the_key() {
    let base = "upstream = [\"stratum+tcp://a:x@127.0.0.1:1\"]\n";
    let (ok, out) = check_config(base, "ok.toml");
    assert!(ok, "{out}");
    for (table, key, value) in [
        ("failover", "connect_timeout_s", "1e30"),
        ("failover", "answer_timeout_s", "inf"),
        ("failover", "backoff_max_s", "-1"),
        ("limits", "idle_timeout_s", "nan"),
        ("curtail", "hold_s", "1e12"),
        ("difficulty", "retarget_s", "0"),
    ] {
        let (ok, out) = check_config(&format!("{base}[{table}]\n{key} = {value}\n"), &format!("{key}.toml"));
        assert!(!ok, "{table}.{key} = {value} accepted: {out}");
        assert!(out.contains(&format!("{table}.{key}")), "{table}.{key} = {value}: {out}");
    }
    let (ok, out) = check_config("upstream = [\"127.0.0.1:3334\"]\n", "bare.toml");
    assert!(!ok && out.contains("stratum+tcp://account.worker:password@host:port"), "{out}");
}

/// Warnings print and pass; with --strict they fail. A SLUICE_ variable
/// that names no key is one (`SLUICE_HOLD_S` is not `SLUICE_CURTAIL__HOLD_S`,
/// which the warning names).
#[test]
fn check_config_warns_of_implausible_watts_and_stray_variables() {
    let text = "upstream = [\"stratum+tcp://a:x@127.0.0.1:1\"]\n[curtail]\ndefault_watts = 3.25\n";
    let (_dir, p) = temp("warn.toml", text);
    let run = |strict: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("check-config").arg(&p).env("SLUICE_HOLD_S", "5");
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(false);
    assert!(ok && stdout.contains(": ok, with 2 warnings"), "{stdout}{stderr}");
    assert!(stderr.contains("warning: curtail.default_watts = 3.25: no miner draws that"), "{stderr}");
    // It names the variable meant.
    let stray =
        "warning: environment variable SLUICE_HOLD_S (did you mean SLUICE_CURTAIL__HOLD_S?) names no config key";
    assert!(stderr.contains(stray), "{stderr}");
    assert_eq!(stderr.matches("SLUICE_HOLD_S").count(), 1, "each warning once: {stderr}");
    let (ok, _, stderr) = run(true);
    assert!(!ok && stderr.contains("2 warnings (--strict)"), "{stderr}");
    let (ok, out) = check_config("upstream = [\"stratum+tcp://a:x@127.0.0.1:1\"]\n", "plain.toml");
    assert!(ok && out.contains(": ok\n") && !out.contains("warning"), "{out}");
}

/// Percent-decoding as URLs do it: a `+` in the account or password is a
/// `+` at the pool, not a space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plus_in_the_pool_account_and_password_reaches_the_pool_unchanged() {
    let pool = SimPool::start(SimPoolConfig { difficulty: 0.0001, ..Default::default() }).await.unwrap();
    let url = format!("stratum+tcp://acct+tag.w1:pa+ss@{}", pool.addr).parse().unwrap();
    let proxy = proxy(vec![url]).await;
    let mut m = RawMiner::connect(proxy.addr).await;
    m.handshake("rig1").await;
    assert!(wait_until(30.0, || !pool.stats.credentials.lock().is_empty()).await);
    assert_eq!(pool.stats.credentials.lock()[0], ("acct+tag.w1".to_owned(), "pa+ss".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_an_impossible_duration_is_refused_and_the_proxy_keeps_serving() {
    let pool = SimPool::start(SimPoolConfig { difficulty: 0.0001, ..Default::default() }).await.unwrap();
    let good = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum+tcp://farm:x@{}\"]\n[metrics]\nlisten = \"\"\n[curtail]\nsocket = \"\"\n[difficulty]\nstart = 0.00002\nmin = 0.000001\n",
        pool.addr
    );
    let (run, addr) = Running::listening("reload.toml", good.clone()).await;

    std::fs::write(&run.config.1, format!("{good}[failover]\nconnect_timeout_s = 1e30\n")).unwrap();
    let status = Command::new("kill").args(["-HUP", &run.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let refused = tokio::task::spawn_blocking(move || {
        let l = run.wait_for("reload refused");
        (run, l)
    })
    .await
    .unwrap();
    let (mut run, line) = refused;
    assert!(line.contains("failover.connect_timeout_s"), "{line}");
    assert!(run.child.try_wait().unwrap().is_none(), "the proxy is still running");
    // And still serving: a miner subscribes, authorizes and gets a job.
    let mut m = RawMiner::connect(addr).await;
    m.handshake("after-reload").await;
    let r = m.call("mining.ping", json!([])).await;
    assert_eq!(r["result"], "pong", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_interrupt_stops_at_once_without_draining() {
    let pool = SimPool::start(SimPoolConfig { difficulty: 0.0001, ..Default::default() }).await.unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum+tcp://farm:x@{}\"]\n[metrics]\nlisten = \"\"\n[curtail]\nsocket = \"\"\n[limits]\nshutdown_grace_s = 60\n",
        pool.addr
    );
    let (run, addr) = Running::listening("interrupt.toml", text).await;
    // A miner that stays: the drain would wait for it.
    let mut m = RawMiner::connect(addr).await;
    m.handshake("stays").await;
    let pid = run.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let (run, pid) = tokio::task::spawn_blocking(move || {
        run.wait_for("stopping: draining");
        (run, pid)
    })
    .await
    .unwrap();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let (mut run, line) = tokio::task::spawn_blocking(move || {
        let l = run.wait_for("stopped at once");
        (run, l)
    })
    .await
    .unwrap();
    assert!(line.contains("second interrupt"), "{line}");
    let status = tokio::task::spawn_blocking(move || run.child.wait().unwrap()).await.unwrap();
    assert!(!status.success(), "a stop without draining exits non-zero");
}

/// One proxy per control socket. A second `sluice run` on the same socket
/// exits non-zero naming the socket and the first one's pid, and the first
/// keeps answering on it. A clean exit removes the socket and its lock; a
/// socket left by SIGKILL is replaced by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_control_socket_is_refused() {
    use sluice::control::client::{Client, Target};
    use sluice::control::lock::lock_path;
    let pool = SimPool::start(SimPoolConfig { difficulty: 0.0001, ..Default::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum+tcp://farm:x@{}\"]\n[metrics]\nlisten = \"\"\n[curtail]\nsocket = \"{}\"\n",
        pool.addr,
        sock.display()
    );
    let (first, _) = Running::listening("first.toml", text.clone()).await;
    let (_second_dir, second) = temp("second.toml", &text);
    // It must exit by itself (killed after 30 s if it runs, and failed).
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "-c"])
            .arg(&second)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second instance must not run: {err}");
    assert!(err.contains(&sock.display().to_string()) && err.contains(&format!("pid {}", first.child.id())), "{err}");
    // The first one's socket still answers.
    let mut c = Client::connect(&Target::Unix(sock.clone())).await.unwrap();
    assert!(c.call("status", json!({})).await.unwrap()["site"].is_object());

    // A clean exit takes the socket and the lock with it.
    let mut first = first;
    assert!(Command::new("kill").args(["-TERM", &first.child.id().to_string()]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || first.child.wait().unwrap()).await.unwrap();
    assert!(status.success());
    assert!(!sock.exists() && !lock_path(&sock).exists(), "socket and lock removed");

    // SIGKILL leaves the socket file; the next start replaces it.
    let (mut killed, _) = Running::listening("killed.toml", text.clone()).await;
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    assert!(sock.exists(), "a killed proxy leaves its socket");
    let (_next, _) = Running::listening("next.toml", text).await;
    let mut c = Client::connect(&Target::Unix(sock.clone())).await.unwrap();
    assert!(c.call("status", json!({})).await.unwrap()["site"].is_object(), "the new proxy answers");
}

/// A proxy killed with SIGKILL under a 60% budget and started again: the
/// budget comes back from the state file before any miner is accepted, and
/// while the whole fleet reconnects at once no more than the budget's watts
/// of miners ever hold a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_and_a_restart_the_budget_holds_through_the_reconnect_storm() {
    use sluice::control::client::{Client, Target};
    use sluice::sim::fleet::{Fleet, FleetConfig, Profile};
    const MINERS: usize = 20;
    const WATTS: f64 = 1000.0;
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.0001,
        job_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    // The same port after the restart, so the fleet comes back to it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\nupstream = [\"stratum+tcp://farm:x@{}\"]\n[difficulty]\nstart = 0.00002\nmin = 0.000001\n[metrics]\nlisten = \"\"\n[curtail]\nsocket = \"{}\"\n[[curtail.power]]\npattern = \"*\"\nwatts = {WATTS}\nj_per_th = 30.0\n",
        pool.addr,
        sock.display()
    );
    let (first, addr) = Running::listening("first.toml", text.clone()).await;
    let fleet = Fleet::start(FleetConfig {
        target: addr,
        miners: MINERS,
        profiles: vec![Profile::Cgminer],
        share_interval: Duration::from_millis(500),
        worker_prefix: "m".into(),
        ..FleetConfig::default()
    });
    let mut c = Client::connect(&Target::Unix(sock.clone())).await.unwrap();
    status_until(&mut c, |st| st["site"]["connected"] == MINERS).await;
    let plan = c.call("set_budget", json!({"fraction": 0.6, "lease_s": 3600, "reason": "dr-9"})).await.unwrap();
    // Parked miners still draw 3% (curtail.idle_fraction): 11 mining and
    // 9 parked draw 11,270 W; 12 and 8 would draw 12,240.
    assert_eq!((plan["park_count"].clone(), plan["expected"]["watts"].clone()), (json!(9), json!(11270.0)), "{plan}");
    status_until(&mut c, |st| st["site"]["connected"] == MINERS && st["site"]["parked"] == 9).await;
    drop(c);

    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let (_second, _) = Running::listening("second.toml", text).await;
    // Poll as fast as the socket answers while the fleet storms back.
    let mut c = Client::connect(&Target::Unix(sock.clone())).await.unwrap();
    let budget_w = 0.6 * MINERS as f64 * WATTS;
    let (mut polls, mut peak) = (0, 0.0f64);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.call("status", json!({})).await.unwrap();
        polls += 1;
        let w = st["site"]["watts"].as_f64().unwrap() + st["site"]["parked_watts"].as_f64().unwrap();
        peak = peak.max(w);
        assert!(w <= budget_w, "{w} W of miners mining and parked under a {budget_w} W budget: {st}");
        assert_eq!(st["budget"]["reason"], "dr-9", "the budget is back before any miner: {st}");
        if st["site"]["connected"] == MINERS || std::time::Instant::now() > end {
            assert_eq!(st["site"]["connected"], MINERS, "the fleet came back: {st}");
            assert_eq!((st["site"]["mining"].clone(), st["site"]["parked"].clone()), (json!(11), json!(9)), "{st}");
            assert!(st["budget"]["lease_expires_in_s"].as_f64().unwrap() > 3000.0, "the lease kept its end: {st}");
            break;
        }
    }
    assert!(polls > 1 && peak == 11_270.0, "{polls} polls, peak {peak} W");
    assert!(fleet.stats.accepted.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Poll `status` until `f` holds (20 s at most).
async fn status_until(c: &mut sluice::control::client::Client, f: fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..800 {
        let st = c.call("status", json!({})).await.unwrap();
        if f(&st) {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("status never got there: {}", c.call("status", json!({})).await.unwrap());
}

/// `sluice healthcheck -c FILE` asks the proxy that FILE describes: a
/// container with a mounted config that moves the metrics listener is
/// healthy while it serves, and unhealthy when that listener is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_reads_the_config_run_reads() {
    let pool = SimPool::start(SimPoolConfig::default()).await.unwrap();
    let proxy = proxy(vec![pool.url("farm")]).await;
    let http = proxy.http.expect("metrics listener");
    let check = |text: String| async move {
        let (_dir, p) = temp("sluice.toml", &text);
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_sluice")).arg("healthcheck").arg("-c").arg(&p).output().unwrap()
        })
        .await
        .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let base = "upstream = [\"stratum+tcp://a:x@127.0.0.1:1\"]\n";
    // Served on the address the file gives (0.0.0.0 is asked on loopback).
    let (ok, err) = check(format!("{base}[metrics]\nlisten = \"0.0.0.0:{}\"\n", http.port())).await;
    assert!(ok, "{err}");
    // Nothing there: unhealthy, naming what it asked.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (ok, err) = check(format!("{base}[metrics]\nlisten = \"{closed}\"\n")).await;
    assert!(!ok && err.contains(&format!("http://{closed}/healthz")), "{err}");
    // Metrics off: nothing to ask, said plainly.
    let (ok, err) = check(format!("{base}[metrics]\nlisten = \"\"\n")).await;
    assert!(!ok && err.contains("nothing serves /healthz"), "{err}");
}

/// Errors that say what to do (issue 14): a pool address given without the
/// URL around it, a health URL without http://, and a pool URL with no
/// account (a warning at start: the pool would refuse or credit nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_explained_and_an_accountless_pool_is_warned_about() {
    let sluice = |args: &'static [&'static str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = sluice(&["run", "--upstream", "127.0.0.1:3334"]);
    assert!(!ok && err.contains("stratum+tcp://account.worker:password@host:port"), "{err}");
    assert!(!err.contains("relative URL"), "{err}");
    let (ok, err) = sluice(&["healthcheck", "--url", "127.0.0.1:9333"]);
    assert!(!ok && err.contains("not an http:// URL"), "{err}");

    let pool = SimPool::start(SimPoolConfig::default()).await.unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum+tcp://{}\"]\n[metrics]\nlisten = \"\"\n[curtail]\nsocket = \"\"\n",
        pool.addr
    );
    let file = temp("sluice.toml", &config);
    let line = tokio::task::spawn_blocking(move || Running::start(file).wait_for("has no account")).await.unwrap();
    assert!(line.contains("\"WARN\""), "{line}");
}

/// `sluice sim-fleet` pointed at a port where nothing listens says it cannot
/// connect, and exits, instead of retrying in silence.
#[test]
fn sim_fleet_against_a_closed_port_says_it_cannot_connect() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["sim-fleet", "--target", &closed.to_string(), "--miners", "2", "--duration-s", "60"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("cannot connect to {closed}")), "{err}");
}

/// What an operator reads in the log (issue 14): the first line says the
/// version and the config file; a status line comes every
/// `metrics.log_interval_s` with the figures as fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_opens_with_the_version_and_says_the_status_at_intervals() {
    let pool = SimPool::start(SimPoolConfig::default()).await.unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\nupstream = [\"stratum+tcp://farm@{}\"]\n[metrics]\nlisten = \"\"\nlog_interval_s = 1\n[curtail]\nsocket = \"\"\n",
        pool.addr
    );
    let file = temp("site.toml", &config);
    let path = file.1.display().to_string();
    let (first, status) = tokio::task::spawn_blocking(move || {
        let run = Running::start(file);
        let first = run.lines.recv_timeout(Duration::from_secs(60)).expect("a first log line");
        // The first status line may come before the pool session is up.
        (first, run.wait_for(r#""pools_up":"1 of 1""#))
    })
    .await
    .unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["fields"]["message"], "sluice starting", "{first}");
    assert_eq!(first["fields"]["version"], env!("CARGO_PKG_VERSION"), "{first}");
    assert_eq!(first["fields"]["config"], path.as_str(), "{first}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let f = &status["fields"];
    assert_eq!((f["miners"].as_u64(), f["budget"].as_str()), (Some(0), Some("none")), "{status}");
    assert!(f["message"].as_str().unwrap().starts_with("status over the last 1s"), "{status}");
    for key in ["hashrate", "shares_accepted", "shares_rejected", "pool_accepted", "pool_rejected", "watts"] {
        assert!(!f[key].is_null(), "{key} in {status}");
    }
}
