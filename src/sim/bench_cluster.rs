//! `sluice bench-curtail --instances N` (feature `cluster`): one site budget
//! across N `sluice run` processes in cluster mode, with etcd (Debian's
//! `etcd-server`) and HAProxy (Debian's `haproxy`) started from PATH, and
//! simulated miners in child processes, one model per instance (the first
//! instance holds the most efficient, the last the least efficient).
//!
//! It reports: the time from `set_budget` (through the last instance) until
//! the site's miners holding a job draw no more than the budget; etcd
//! requests per second at steady state (etcd's own gRPC counters); then an
//! instance holding efficient miners killed with SIGKILL: the peak watts of
//! miners holding a job over the budget while its miners come back through
//! HAProxy (must be 0), and the time until the site mines as much as before
//! the kill.

use super::pool::{SimPool, SimPoolConfig};
use crate::api::{Amount, SetBudget, Status};
use crate::control::client::{Client, Target};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::bench::Children as Kids;

/// The models of the instances, most efficient first: (prefix, W, J/TH).
const MODELS: [(&str, f64, f64); 3] = [("s21", 3500.0, 17.5), ("s19xp", 3010.0, 21.5), ("s19jpro", 3068.0, 29.5)];

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(program: &str, args: &[String], log: &Path, what: &str) -> Result<Child, String> {
    let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .map_err(|e| format!("cannot start {program} ({what}): {e}"))
}

struct Instance {
    sock: PathBuf,
    addr: SocketAddr,
    kid: Option<Child>,
}

async fn status(sock: &Path) -> Option<Status> {
    let mut c = Client::connect(&Target::Unix(sock.to_owned())).await.ok()?;
    c.status(false).await.ok()
}

/// The live instances' statuses and the watts their miners holding a job draw.
async fn site(instances: &[Instance]) -> (Vec<Status>, f64) {
    let mut all = Vec::new();
    for i in instances.iter().filter(|i| i.kid.is_some()) {
        if let Some(s) = status(&i.sock).await {
            all.push(s);
        }
    }
    let w = all.iter().map(|s| s.site.watts.0).sum();
    (all, w)
}

/// The sum of etcd's handled gRPC requests, from its metrics.
async fn etcd_requests(url: &str) -> Result<f64, String> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub async fn cluster(miners: usize, per_process: usize, instances: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?.display().to_string();
    let mut kids = Kids(Vec::new());
    // etcd, one member on loopback.
    let (cport, pport) = (free_port()?, free_port()?);
    let etcd = format!("http://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let args: Vec<String> = [
        "--data-dir",
        &dir.path().join("etcd").display().to_string(),
        "--name",
        "b",
        "--listen-client-urls",
        &etcd,
        "--advertise-client-urls",
        &etcd,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("b={peer}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    kids.0.push(spawn("etcd", &args, &dir.path().join("etcd.log"), "Debian etcd-server")?);
    let t0 = Instant::now();
    while etcd_requests(&etcd).await.is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("etcd did not come up in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = SimPool::start(SimPoolConfig {
        difficulty: 0.00001,
        job_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await?;
    let per_instance = miners / instances;
    let mut rules = String::new();
    for (p, w, j) in MODELS {
        rules += &format!("[[curtail.power]]\npattern = \"{p}-*\"\nwatts = {w}\nj_per_th = {j}\n");
    }
    let mut inst = Vec::new();
    for k in 0..instances {
        let port = free_port()?;
        let sock = dir.path().join(format!("i{k}.sock"));
        let config = dir.path().join(format!("i{k}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nupstream = [\"{}\"]\n[difficulty]\nstart = 1e-7\nmin = 1e-7\n[metrics]\nlisten = \"\"\n\
                 [limits]\nmax_connections_per_ip = {}\n[curtail]\nsocket = \"{}\"\nhold_s = 0.0\nramp_up_w_per_s = 1e9\n\
                 [curtail.cluster]\nendpoints = [\"{etcd}\"]\nsite = \"bench\"\ninstance = \"i{k}\"\nlease_s = 3\n{rules}",
                pool.url("bench"),
                miners + 100,
                sock.display()
            ),
        )?;
        let args = vec!["run".into(), "-c".into(), config.display().to_string()];
        let kid = spawn(&exe, &args, &dir.path().join(format!("i{k}.log")), "sluice run")?;
        inst.push(Instance { sock, addr: ([127, 0, 0, 1], port).into(), kid: Some(kid) });
    }
    for i in &inst {
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(i.addr).await.is_err() {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!("instance at {} did not listen in 60 s", i.addr).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // HAProxy: a frontend per instance, that instance first, the others
    // backups; one process per frontend (each holds two files per miner,
    // and a process may hold 20,000 here).
    let mut fronts = Vec::new();
    for (k, me) in inst.iter().enumerate() {
        let port = free_port()?;
        fronts.push(SocketAddr::from(([127, 0, 0, 1], port)));
        let mut cfg = String::from(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  maxconn 9000\n  timeout connect 1s\n  timeout client 1h\n  timeout server 1h\n  retries 2\n  option redispatch\n",
        );
        cfg += &format!("frontend f{k}\n  bind 127.0.0.1:{port}\n  default_backend b{k}\nbackend b{k}\n");
        cfg += &format!("  server i{k} {} check inter 200 fall 1 rise 2 on-marked-down shutdown-sessions\n", me.addr);
        for (o, other) in inst.iter().enumerate().filter(|(o, _)| *o != k) {
            cfg += &format!("  server i{o} {} check inter 200 fall 1 rise 2 backup\n", other.addr);
        }
        let hcfg = dir.path().join(format!("haproxy{k}.cfg"));
        std::fs::write(&hcfg, cfg)?;
        let args = vec!["-db".into(), "-f".into(), hcfg.display().to_string()];
        kids.0.push(spawn("haproxy", &args, &dir.path().join(format!("haproxy{k}.log")), "Debian haproxy")?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (k, front) in fronts.iter().enumerate() {
        let model = MODELS[k.min(MODELS.len() - 1)].0;
        for p in 0..per_instance.div_ceil(per_process) {
            let n = per_process.min(per_instance - p * per_process);
            let args: Vec<String> = vec![
                "sim-fleet".into(),
                "--target".into(),
                front.to_string(),
                "--miners".into(),
                n.to_string(),
                "--profiles".into(),
                "cgminer".into(),
                "--share-interval-ms".into(),
                "60000".into(),
                "--worker-prefix".into(),
                format!("{model}-{k}{p}"),
                "--duration-s".into(),
                "900".into(),
                "--quiet".into(),
            ];
            kids.0.push(spawn(&exe, &args, &dir.path().join(format!("fleet{k}{p}.log")), "sim-fleet")?);
        }
    }
    let total = (per_instance * instances) as u64;
    println!(
        "bench-curtail --instances {instances}: {total} miners ({per_instance} per instance, one model each) -> HAProxy -> {instances} sluice processes in cluster mode, etcd {etcd}"
    );
    let t0 = Instant::now();
    loop {
        let (all, _) = site(&inst).await;
        if all.iter().map(|s| s.site.mining).sum::<u64>() == total {
            break;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let (all, _) = site(&inst).await;
            let connected: Vec<u64> = all.iter().map(|s| s.site.connected).collect();
            return Err(format!("the fleet did not connect in 180 s: {connected:?} of {per_instance} each").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("all {total} miners connected and mining in {:.1} s", t0.elapsed().as_secs_f64());

    // set_budget through the last instance, to the site under the budget.
    let (_, fleet_w) = site(&inst).await;
    let budget = fleet_w / 2.0;
    let mut c = Client::connect(&Target::Unix(inst[instances - 1].sock.clone())).await?;
    let t = Instant::now();
    c.set_budget(&SetBudget { max_listed: Some(0), ..SetBudget::site(Amount::Watts(budget), "bench cluster") }).await?;
    let answered = t.elapsed();
    let under = loop {
        let (_, w) = site(&inst).await;
        if w <= budget {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("the site still draws {w:.0} W over {budget:.0} W after 60 s").into());
        }
    };
    println!(
        "set_budget {:.0} kW (50%) through instance i{}: answered in {:.1} ms; the site's miners under it after {:.1} ms",
        budget / 1e3,
        instances - 1,
        answered.as_secs_f64() * 1e3,
        under.as_secs_f64() * 1e3
    );
    // Settle (the ramp, the planner's rounds), then count etcd's requests.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (r0, t) = (etcd_requests(&etcd).await?, Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rate = (etcd_requests(&etcd).await? - r0) / t.elapsed().as_secs_f64();
    println!("steady state: {rate:.1} etcd requests/s for the site ({:.1} per instance)", rate / instances as f64);

    // Kill the first instance that is not the planner (it holds efficient miners).
    let (all, before_w) = site(&inst).await;
    let planner = all[0].cluster.as_ref().and_then(|c| c.planner.clone()).unwrap_or_default();
    let victim = (0..instances).find(|k| format!("i{k}") != planner).unwrap_or(0);
    if let Some(mut kid) = inst[victim].kid.take() {
        let _ = kid.kill();
        kid.wait()?;
    }
    let killed = Instant::now();
    // What one instance holding every miner would resume to: the budget
    // less the resume hysteresis (2% by default), within a miner per
    // surviving instance.
    let survivors = (instances - 1) as f64;
    let restored_w = budget * 0.98 - survivors * MODELS.iter().map(|m| m.1).fold(0.0, f64::max);
    let (mut peak, mut polls) = (0.0f64, 0u64);
    let back = loop {
        let (all, w) = site(&inst).await;
        polls += 1;
        peak = peak.max(w);
        let connected: u64 = all.iter().map(|s| s.site.connected).sum();
        if connected == total && w >= restored_w {
            break (killed.elapsed(), w);
        }
        if killed.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "after the kill: {connected} of {total} connected, {w:.0} W of {before_w:.0} W mining"
            )
            .into());
        }
    };
    let over = (peak - budget).max(0.0);
    let (back, after_w) = back;
    println!(
        "SIGKILL of i{victim} (planner {planner}): its miners back through HAProxy and the site mining {:.0} kW (what the budget allows: {:.0} kW or more; {:.0} kW before the kill) after {:.1} s (lease_s 3); peak {:.0} kW of miners holding a job, {:.0} W over the budget ({polls} polls)",
        after_w / 1e3,
        restored_w / 1e3,
        before_w / 1e3,
        back.as_secs_f64(),
        peak / 1e3,
        over
    );
    for i in &mut inst {
        if let Some(mut k) = i.kid.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
    drop(kids);
    if over > 0.0 {
        return Err(format!("peak {peak} W over the {budget} W budget").into());
    }
    Ok(())
}
