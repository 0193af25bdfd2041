//! The `sluice` command: parse the CLI, set up logging, then hand over to
//! the library (`app`, `sim`).

use clap::{Parser, Subcommand, ValueEnum};
use sluice::app::{raise_nofile_limit, Proxy};
use sluice::config::{Config, Overrides};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stratum V1 mining proxy: aggregation, share validation, curtailment hooks"
)]
struct Cli {
    /// Log format of every command (global: before or after the command).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Run {
        /// TOML config file (see docker/sluice.example.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Listen address for miners (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Pool URL, repeatable, in failover order (overrides `upstream`).
        #[arg(long)]
        upstream: Vec<sluice::config::PoolUrl>,
        /// Starting difficulty for new miners (overrides `difficulty.start`).
        #[arg(long)]
        start_difficulty: Option<f64>,
        /// Vardiff floor, may be far below 1 for test rigs (overrides `difficulty.min`).
        #[arg(long)]
        min_difficulty: Option<f64>,
    },
    /// Exit 0 if a running sluice answers /healthz (for container HEALTHCHECKs).
    Healthcheck {
        /// The config `run` uses: /healthz is asked on its `metrics.listen`
        /// (after SLUICE_* variables, as `run` reads it; 0.0.0.0 and [::]
        /// read as loopback).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Ask this URL instead.
        #[arg(long)]
        url: Option<String>,
    },
    /// Validate a config file and exit.
    CheckConfig {
        /// The TOML config file (see docker/sluice.example.toml).
        file: PathBuf,
    },
    /// Talk to a running sluice's control socket (see proto/control-v1.md).
    Ctl {
        /// The config `run` uses: talk to its `curtail.socket` (or its
        /// `curtail.tcp_listen` with its token), after SLUICE_* variables as
        /// `run` reads it. Without -c, --socket or --tcp:
        /// SLUICE_CURTAIL__SOCKET, else ./sluice.sock.
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        /// A Unix control socket; repeat to address several instances.
        #[arg(long, global = true)]
        socket: Vec<PathBuf>,
        /// A TCP control port (needs --token); repeatable.
        #[arg(long, global = true)]
        tcp: Vec<SocketAddr>,
        /// The bearer token of a TCP control port.
        #[arg(long, env = "SLUICE_CONTROL_TOKEN", hide_env_values = true, global = true)]
        token: Option<String>,
        /// Print the raw JSON result.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// The simulators, the demo and the benches (the `sim` feature).
    #[cfg(feature = "sim")]
    #[command(flatten)]
    Sim(sluice::sim::cli::SimCmd),
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Miners, watts and the budget in force.
    Status {
        /// List every miner.
        #[arg(long)]
        miners: bool,
    },
    /// Set a power budget: 2.4MW, 800kW, 1500W, or 60% of the fleet.
    Budget {
        /// 2.4MW, 800kW, 1500W (a unit is required) or 60% of the fleet.
        amount: String,
        /// The budget lapses after this long (e.g. 30m, 2h).
        #[arg(long)]
        lease: Option<humantime::Duration>,
        /// Resume parked miners over at least this long.
        #[arg(long)]
        ramp: Option<humantime::Duration>,
        /// site, group:NAME or workers:PATTERN.
        #[arg(long, default_value = "site")]
        scope: String,
        /// Show the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why: logged with the request and carried by its events.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Drop the budget and resume every parked miner at the ramp rate.
    Resume {
        /// Why: logged with the request and carried by its events.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Never park workers matching this glob.
    Protect {
        /// A worker-name glob (`rack7.*`).
        pattern: String,
    },
    /// Make workers matching this glob curtailable again.
    Unprotect {
        /// A worker-name glob (`rack7.*`).
        pattern: String,
    },
    /// Print events as they happen (times are local).
    Watch,
    /// This client's version and each instance's (sluice and protocol).
    Version,
}

impl Cmd {
    fn single_threaded(&self) -> bool {
        match self {
            #[cfg(feature = "sim")]
            Cmd::Sim(c) => c.single_threaded(),
            _ => false,
        }
    }

    /// The log filter when RUST_LOG is not set.
    fn default_log(&self) -> &'static str {
        match self {
            // Its table counts the simulated network's blocks; a line for
            // each would break the table (RUST_LOG=sluice::block=error
            // shows them).
            #[cfg(feature = "sim")]
            Cmd::Sim(c) if c.is_demo() => "warn,sluice::block=off",
            c if c.quiet() => "warn",
            _ => "info",
        }
    }

    /// Commands whose output is the point log at warn only.
    fn quiet(&self) -> bool {
        match self {
            #[cfg(feature = "sim")]
            Cmd::Sim(c) => c.quiet(),
            Cmd::Ctl { .. } | Cmd::Healthcheck { .. } => true,
            _ => false,
        }
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal, never into files or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn load_config(config: Option<PathBuf>) -> Result<Config, String> {
    Config::load(config.as_deref()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = if cli.cmd.single_threaded() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    match rt {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(cli: Cli) -> ExitCode {
    init_logging(cli.log_format, cli.cmd.default_log());
    raise_nofile_limit();
    let r: Result<(), String> = match cli.cmd {
        Cmd::Run { config, listen, upstream, start_difficulty, min_difficulty } => {
            async {
                let overrides = Overrides { listen, upstream, start_difficulty, min_difficulty };
                tracing::info!(
                    version = env!("CARGO_PKG_VERSION"),
                    config = %config.as_deref().map_or("none (defaults and SLUICE_* variables)".into(), |p| p.display().to_string()),
                    "sluice starting"
                );
                let mut cfg = load_config(config.clone())?;
                cfg.apply(overrides.clone());
                // Handlers first: a SIGHUP or SIGTERM that arrives as soon as
                // the proxy says it is listening must not find the default
                // action (which ends the process) still in place.
                use tokio::signal::unix::{signal, SignalKind};
                let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
                let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
                let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
                let proxy = Proxy::start(&cfg).await.map_err(|e| e.to_string())?;
                loop {
                    tokio::select! {
                        _ = int.recv() => break,
                        _ = term.recv() => break,
                        _ = hup.recv() => {
                            // Reload: the file and environment again, the same flags on top.
                            let next = load_config(config.clone()).map(|mut c| { c.apply(overrides.clone()); c });
                            match next {
                                Err(e) => tracing::error!("reload refused, keeping the running config: {e}"),
                                Ok(next) => match proxy.reload(&next).await {
                                    Ok(changed) if changed.is_empty() => tracing::info!("reloaded: nothing changed"),
                                    Ok(changed) => {
                                        tracing::info!(changed = %changed.join(", "), "reloaded");
                                        cfg = next;
                                    }
                                    Err(e) => tracing::error!("reload refused, keeping the running config: {e}"),
                                },
                            }
                        }
                    }
                }
                let grace = cfg.limits.shutdown_grace_s.get();
                tracing::info!(?grace, "stopping: draining miners and forwarded shares (Ctrl-C again to stop at once)");
                let r = tokio::select! {
                    r = proxy.shutdown(grace) => r,
                    _ = int.recv() => return Err("stopped at once (second interrupt), without draining".into()),
                    _ = term.recv() => return Err("stopped at once (second SIGTERM), without draining".into()),
                };
                println!(
                    "sluice stopped in {:.1} s: {} miners sent away ({} still connected), {} forwarded shares in flight, {} left unanswered",
                    r.seconds, r.miners_at_start, r.miners_left, r.submits_in_flight, r.submits_unanswered
                );
                Ok(())
            }
            .await
        }
        Cmd::CheckConfig { file } => {
            Config::load(Some(&file)).and_then(|c| c.validate()).map_err(|e| e.to_string()).map(|()| {
                println!("{}: ok", file.display());
            })
        }
        #[cfg(feature = "sim")]
        Cmd::Sim(c) => c.run().await,
        Cmd::Healthcheck { config, url } => {
            async {
                let url = match url {
                    Some(u) => u,
                    None => health_url(&load_config(config)?)?,
                };
                // Plain HTTP/1.1 with hyper: no TLS stack to initialise in a
                // FROM-scratch image.
                tokio::time::timeout(Duration::from_secs(3), probe(&url))
                    .await
                    .map_err(|_| format!("{url}: timed out"))?
            }
            .await
        }
        Cmd::Ctl { config, socket, tcp, token, json, cmd } => {
            async { ctl::run(ctl::targets(config, socket, tcp, token)?, json, cmd).await }.await
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}

mod ctl {
    use super::CtlCmd;
    use serde_json::{json, Value};
    use sluice::control::client::{fmt_hashrate, fmt_watts, parse_amount, Client, ClientError, Target};
    use sluice::control::types::{
        BudgetSource, Event, FeedStatus, Figures, Matched, Plan, Resuming, Stamped, Status, Watts,
    };
    use std::net::SocketAddr;
    use std::path::PathBuf;

    /// println! that ends the program quietly when stdout has gone
    /// (`sluice ctl status | head -1`), instead of panicking.
    macro_rules! say {
        ($($t:tt)*) => {{
            use std::io::Write;
            if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprintln!("sluice: cannot write to stdout: {e}");
                    std::process::exit(1);
                }
                std::process::exit(0);
            }
        }};
    }

    /// Which instances to talk to: the --socket and --tcp given, else the
    /// control socket of the config `run` reads (-c FILE, SLUICE_* variables).
    pub fn targets(
        config: Option<PathBuf>,
        socket: Vec<PathBuf>,
        tcp: Vec<SocketAddr>,
        token: Option<String>,
    ) -> Result<Vec<Target>, String> {
        let mut targets: Vec<Target> = socket.into_iter().map(Target::Unix).collect();
        targets.extend(tcp.into_iter().map(|addr| Target::Tcp { addr, token: token.clone() }));
        if !targets.is_empty() {
            return Ok(targets);
        }
        let cfg = super::load_config(config)?;
        let c = &cfg.curtail;
        if !c.socket.as_os_str().is_empty() {
            return Ok(vec![Target::Unix(c.socket.clone())]);
        }
        match c.tcp_listen {
            Some(addr) => Ok(vec![Target::Tcp { addr: super::loopback(addr), token: token.or_else(|| c.token()) }]),
            None => Err("this config has no control socket (curtail.socket is empty, curtail.tcp_listen unset): give --socket or --tcp".into()),
        }
    }

    /// An error for a person: a TCP port refusing a request with no token
    /// says how to give one.
    fn explain(t: &Target, e: ClientError) -> String {
        match (t, &e) {
            (Target::Tcp { token: None, .. }, ClientError::Rpc { code: -32001, .. }) => {
                format!("{t}: {e}; a TCP control port needs its token: --token TOKEN or SLUICE_CONTROL_TOKEN")
            }
            _ => format!("{t}: {e}"),
        }
    }

    /// "1 miner", "2 miners".
    fn miners(n: usize) -> String {
        if n == 1 {
            "1 miner".into()
        } else {
            format!("{n} miners")
        }
    }

    pub async fn run(targets: Vec<Target>, raw: bool, cmd: CtlCmd) -> Result<(), String> {
        let mut clients = Vec::new();
        for t in &targets {
            clients.push(Client::connect(t).await.map_err(|e| e.to_string())?);
        }
        let (method, params) = match cmd {
            CtlCmd::Version => {
                say!("sluice ctl {}", env!("CARGO_PKG_VERSION"));
                for (c, t) in clients.iter_mut().zip(&targets) {
                    let v = c.call("version", Value::Null).await.map_err(|e| explain(t, e))?;
                    match raw {
                        true => say!("{v}"),
                        false => say!(
                            "{t}: sluice {}, control protocol {}",
                            v["sluice"].as_str().unwrap_or("?"),
                            v["protocol"].as_str().unwrap_or("?")
                        ),
                    }
                }
                return Ok(());
            }
            CtlCmd::Status { miners } => ("status", json!({"miners": miners})),
            CtlCmd::Budget { amount, lease, ramp, scope, dry_run, reason } => {
                let mut p = parse_amount(&amount)?;
                p["scope"] = scope.into();
                p["dry_run"] = dry_run.into();
                p["reason"] = reason.into();
                if let Some(l) = lease {
                    p["lease_s"] = std::time::Duration::from(l).as_secs_f64().into();
                }
                if let Some(r) = ramp {
                    p["ramp_up_s"] = std::time::Duration::from(r).as_secs_f64().into();
                }
                ("set_budget", p)
            }
            CtlCmd::Resume { reason } => ("resume_all", json!({"reason": reason})),
            CtlCmd::Protect { pattern } => ("set_protection", json!({"pattern": pattern, "state": "protected"})),
            CtlCmd::Unprotect { pattern } => ("set_protection", json!({"pattern": pattern, "state": "curtailable"})),
            CtlCmd::Watch => {
                let [c] = clients.as_mut_slice() else { return Err("watch follows one instance at a time".into()) };
                c.call("subscribe", Value::Null).await.map_err(|e| explain(&targets[0], e))?;
                loop {
                    let ev = c.next_event().await.map_err(|e| e.to_string())?;
                    if raw {
                        say!("{ev}");
                    } else {
                        let ev: Stamped = serde_json::from_value(ev).map_err(|e| format!("unreadable event: {e}"))?;
                        say!("{}", describe_event(&ev));
                    }
                }
            }
        };
        // A budget in watts over several instances is split in proportion to
        // each instance's fleet (the watts all its miners would draw); a
        // fraction applies to each fleet as it is.
        let shares: Vec<f64> = match (method, params.get("watts").and_then(Value::as_f64)) {
            ("set_budget", Some(_)) if clients.len() > 1 => {
                let mut fleets = Vec::new();
                for c in clients.iter_mut() {
                    let st: Status = c.call_typed("status", Value::Null).await.map_err(|e| e.to_string())?;
                    fleets.push(st.site.fleet_watts.0);
                }
                let total: f64 = fleets.iter().sum();
                if total <= 0.0 {
                    return Err("no miners on any instance to split a budget over".into());
                }
                fleets.iter().map(|f| f / total).collect()
            }
            _ => vec![1.0; clients.len()],
        };
        for ((c, t), share) in clients.iter_mut().zip(&targets).zip(shares) {
            let mut p = params.clone();
            if let Some(w) = p.get("watts").and_then(Value::as_f64) {
                p["watts"] = (w * share).into();
            }
            let r = c.call(method, p).await.map_err(|e| explain(t, e))?;
            if targets.len() > 1 && !raw {
                say!("== {t}");
            }
            if raw {
                say!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                continue;
            }
            let unreadable = |e: serde_json::Error| format!("{t}: unreadable answer: {e}");
            match method {
                "status" => print_status(&serde_json::from_value(r).map_err(unreadable)?),
                "set_budget" => print_plan(&serde_json::from_value(r).map_err(unreadable)?),
                "resume_all" => {
                    let r: Resuming = serde_json::from_value(r).map_err(unreadable)?;
                    say!("resuming {} at the ramp rate", miners(r.resuming))
                }
                _ => {
                    let r: Matched = serde_json::from_value(r).map_err(unreadable)?;
                    say!("{} match now; the rule also applies to miners that connect later", miners(r.matched))
                }
            }
        }
        Ok(())
    }

    /// Unix milliseconds as this machine's local time, to the millisecond.
    fn local_time(ms: u64) -> String {
        match chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)) {
            Some(t) => t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S%.3f %z").to_string(),
            None => format!("{ms} ms"),
        }
    }

    /// An enum's name on the wire (`lease-fallback`, `mining`).
    fn wire<T: serde::Serialize>(t: &T) -> String {
        match serde_json::to_value(t) {
            Ok(Value::String(s)) => s,
            other => format!("{other:?}"),
        }
    }

    fn figures(f: &Figures) -> String {
        format!(
            "{} connected, {} mining, {} parked, {}, {}",
            f.connected,
            f.mining,
            f.parked,
            fmt_watts(f.watts.0),
            fmt_hashrate(f.hashrate_hs.0)
        )
    }

    fn print_status(r: &Status) {
        say!("site: {}", figures(&r.site));
        for (name, f) in &r.groups {
            say!("  group {name}: {}", figures(f));
        }
        let b = &r.budget;
        match b.source {
            BudgetSource::None => say!("budget: none"),
            src => {
                let lease = b.lease_expires_in_s.map(|s| format!(", lease expires in {s:.0} s")).unwrap_or_default();
                let met = match b.met {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "pending",
                };
                let by = b.met_by.map(|m| format!(" ({})", wire(&m))).unwrap_or_default();
                say!(
                    "budget: {} ({}) from {} {:?}: {met}{by}{lease}",
                    fmt_watts(b.watts.unwrap_or_default().0),
                    b.scope.as_deref().unwrap_or(""),
                    wire(&src),
                    b.reason.as_deref().unwrap_or("")
                );
            }
        }
        let feed = |f: &FeedStatus| {
            let reading = match (f.watts, f.at_ms) {
                (Some(w), Some(at)) => format!("{} at {at}", fmt_watts(w.0)),
                _ => "no reading yet".into(),
            };
            let stale = if f.stale { " STALE" } else { "" };
            let err = f.error.as_ref().map(|e| format!(" (last read: {e})")).unwrap_or_default();
            format!("{reading}{stale}{err} [{}]", f.source)
        };
        if let Some(m) = &r.meter {
            say!("meter: {}; calibration x{:.3}", feed(m), r.calibration.factor);
        }
        if let Some(f) = &r.follow {
            say!(
                "follow: site limit {} - other load {} - margin {} = {}{}",
                fmt_watts(f.site_limit_w.0),
                feed(&f.other_load),
                fmt_watts(f.margin_w.0),
                f.target_w.map(|t| fmt_watts(t.0)).unwrap_or_else(|| "none (stale)".into()),
                if f.in_force { "" } else { " (overridden by a command)" }
            );
        }
        if r.resuming > 0 {
            say!("resuming: {} waiting for the ramp", miners(r.resuming));
        }
        for m in r.miners.iter().flatten() {
            say!(
                "  {:<40} {:<8} {:<9} {:>10} ({}) {:>6.1} J/TH ({}){}",
                m.who.to_string(),
                m.group,
                wire(&m.state),
                fmt_watts(m.watts.0),
                wire(&m.watts_source),
                m.j_per_th.0,
                wire(&m.efficiency_source),
                if m.protected { " protected" } else { "" }
            );
        }
    }

    fn print_plan(r: &Plan) {
        say!(
            "plan {}{}: budget {} ({}): park {}, resume {}; {} -> {} ({})",
            r.plan_id,
            if r.dry_run { " (dry run, nothing changed)" } else { "" },
            fmt_watts(r.budget_w.0),
            r.scope,
            r.park_count,
            r.resume_count,
            fmt_watts(r.before.watts.0),
            fmt_watts(r.expected.watts.0),
            if r.budget_met { "budget met" } else { "budget NOT met: protected or held miners" }
        );
        for (verb, list) in [("park", &r.park), ("resume", &r.resume)] {
            for m in list.iter().take(20) {
                say!(
                    "  {verb:<6} {:<40} {:>10} ({}) {:>6.1} J/TH",
                    m.who.to_string(),
                    fmt_watts(m.watts.0),
                    wire(&m.watts_source),
                    m.j_per_th.0
                );
            }
        }
    }

    fn describe_event(s: &Stamped) -> String {
        let kind = match serde_json::to_value(s) {
            Ok(v) => v["type"].as_str().unwrap_or("?").to_owned(),
            Err(_) => "?".into(),
        };
        let w = |w: &Watts| fmt_watts(w.0);
        let detail = match &s.event {
            Event::MinerParked { who, watts, hook, cause } | Event::MinerResumed { who, watts, hook, cause } => {
                format!("{who} {} via {} (plan {}: {})", w(watts), wire(hook), cause.plan_id, cause.reason)
            }
            Event::PlanApplied { plan_id, budget_w, park_count, resume_count, expected_w, .. } => format!(
                "plan {plan_id}: budget {}, park {park_count}, resume {resume_count}, expect {}",
                w(budget_w),
                w(expected_w)
            ),
            Event::BudgetMet { budget_w, achieved_w, met_by, mining, parked, cause } => format!(
                "budget {}, achieved {} {} ({mining} mining, {parked} parked; plan {})",
                w(budget_w),
                w(achieved_w),
                wire(met_by),
                cause.plan_id
            ),
            Event::BudgetNotMet { budget_w, achieved_w, met_by, mining, parked, why, cause } => format!(
                "budget {}, achieved {} {} ({mining} mining, {parked} parked; plan {}): {why}",
                w(budget_w),
                w(achieved_w),
                wire(met_by),
                cause.plan_id
            ),
            Event::MeterStale { feed, source, last_w, error, .. } => format!(
                "{feed} ({source}): no good reading; last {}{}",
                last_w.map(|x| w(&x)).unwrap_or_else(|| "none".into()),
                error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default()
            ),
            Event::MeterRecovered { feed, source, watts } => format!("{feed} ({source}) reads {}", w(watts)),
            Event::MeterCorrection { measured_w, budget_w, factor } => format!(
                "the meter reads {} over a budget of {}: calibration raised to {factor:.3}, parking more",
                w(measured_w),
                w(budget_w)
            ),
            Event::HookFailed { who, hook, action, error, .. } => {
                format!("{who} {} {}: {error}", wire(hook), wire(action))
            }
            Event::HookOk { who, hook, action, watts, .. } => format!(
                "{who} {} {}{}",
                wire(hook),
                wire(action),
                watts.map(|x| format!(", reads {}", w(&x))).unwrap_or_default()
            ),
            Event::LeaseExpired { budget_w, fallback, .. } => {
                format!("budget {}, fallback: {}", w(budget_w), wire(fallback))
            }
            Event::EventsLost { count } => format!("{count} events missed (this watcher fell behind)"),
        };
        format!("{} {kind:<15} {detail}", local_time(s.at_ms))
    }
}

/// Where a proxy run with `cfg` answers /healthz.
fn health_url(cfg: &Config) -> Result<String, String> {
    let Some(addr) = cfg.metrics.listen.0 else {
        return Err("metrics.listen is empty in this config: nothing serves /healthz".into());
    };
    Ok(format!("http://{}/healthz", loopback(addr)))
}

/// A listening address as a client on this machine reaches it: 0.0.0.0
/// and [::] as loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// GET a health URL; Ok on a 2xx answer.
async fn probe(url: &str) -> Result<(), String> {
    if !url.starts_with("http://") {
        return Err(format!("{url:?} is not an http:// URL (like http://127.0.0.1:9333/healthz)"));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await.map_err(|e| format!("{url}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path())
        .header(hyper::header::HOST, authority.as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every option and positional argument of every command says what it
    /// is for in --help.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "sluice", &mut missing);
        assert!(missing.is_empty(), "arguments without a help line: {missing:#?}");
    }
}
