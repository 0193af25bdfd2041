//! `sluice ctl`: the control protocol for a person at a terminal (or a
//! script with `--json`). Talks through the typed client
//! (`sluice::control::client`) and prints the answers.

use clap::Subcommand;
use serde_json::Value;
use sluice::api::{
    Amount, BudgetSource, Cause, ClusterStatus, Event, FeedStatus, Figures, Plan, Protection, SetBudget, Stamped,
    Status, Watts,
};
use sluice::control::client::{
    fmt_hashrate, fmt_watts, parse_amount, parse_lease, parse_ramp, Client, ClientError, Target,
};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CtlCmd {
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
        /// The budget lapses after this long: 30m, 2h, 1h30m (at least 1s,
        /// at most 30 days; `M` is refused: minutes are a lower-case m).
        #[arg(long, value_parser = parse_lease)]
        lease: Option<std::time::Duration>,
        /// Resume parked miners over at least this long: 30s, 5m.
        #[arg(long, value_parser = parse_ramp)]
        ramp: Option<std::time::Duration>,
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
    /// Drop the budget and resume every parked miner at the ramp rate, held
    /// ones too: an operator's resume overrides curtail.hold_s.
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

/// What printing an answer needs: the raw JSON (`--json`), or the lines a
/// person reads.
fn show<T: serde::Serialize>(raw: bool, answer: &T, print: impl FnOnce(&T)) {
    match raw {
        true => say!("{}", serde_json::to_string_pretty(answer).unwrap_or_default()),
        false => print(answer),
    }
}

pub async fn run(targets: Vec<Target>, raw: bool, cmd: CtlCmd) -> Result<(), String> {
    let mut clients = Vec::new();
    for t in &targets {
        clients.push(Client::connect(t).await.map_err(|e| e.to_string())?);
    }
    if let CtlCmd::Watch = cmd {
        let [c] = clients.as_mut_slice() else { return Err("watch follows one instance at a time".into()) };
        c.subscribe().await.map_err(|e| explain(&targets[0], e))?;
        loop {
            let ev = c.event().await.map_err(|e| e.to_string())?;
            match raw {
                true => say!("{}", serde_json::to_string(&ev).unwrap_or_default()),
                false => say!("{}", describe_event(&ev)),
            }
        }
    }
    if let CtlCmd::Version = cmd {
        say!("sluice ctl {}", env!("CARGO_PKG_VERSION"));
    }
    // Standalone instances: a budget in watts over several is split in
    // proportion to each instance's fleet (the watts all its miners would
    // draw); a fraction applies to each fleet as it is. Clustered ones keep
    // one site budget themselves: a split would be wrong, so it is refused.
    let mut shares = vec![1.0; clients.len()];
    if let CtlCmd::Budget { amount, .. } = &cmd {
        if matches!(parse_amount(amount)?, Amount::Watts(_)) && clients.len() > 1 {
            let mut fleets = Vec::new();
            for (c, t) in clients.iter_mut().zip(&targets) {
                let st = c.status(false).await.map_err(|e| explain(t, e))?;
                if let Some(cl) = &st.cluster {
                    return Err(format!(
                        "{t} is in cluster mode (site {:?}): the budget is the site's; set it once, through any one instance (one --socket)",
                        cl.site
                    ));
                }
                fleets.push(st.site.fleet_watts.0);
            }
            let total: f64 = fleets.iter().sum();
            if total <= 0.0 {
                return Err("no miners on any instance to split a budget over".into());
            }
            shares = fleets.iter().map(|f| f / total).collect();
        }
    }
    for ((c, t), share) in clients.iter_mut().zip(&targets).zip(shares) {
        let e = |e: ClientError| explain(t, e);
        if targets.len() > 1 && !raw && !matches!(cmd, CtlCmd::Version) {
            say!("== {t}");
        }
        match &cmd {
            CtlCmd::Version => show(raw, &c.version().await.map_err(e)?, |v| {
                say!("{t}: sluice {}, control protocol {}", v.sluice, v.protocol)
            }),
            CtlCmd::Status { miners } => show(raw, &c.status(*miners).await.map_err(e)?, print_status),
            CtlCmd::Budget { amount, lease, ramp, scope, dry_run, reason } => {
                let amount = match parse_amount(amount)? {
                    Amount::Watts(w) => Amount::Watts(w * share),
                    fraction => fraction,
                };
                let b = SetBudget {
                    amount,
                    scope: scope.clone(),
                    lease_s: lease.map(|l| l.as_secs_f64()),
                    ramp_up_s: ramp.map(|r| r.as_secs_f64()),
                    dry_run: *dry_run,
                    reason: reason.clone(),
                    max_listed: None,
                };
                show(raw, &c.set_budget(&b).await.map_err(e)?, print_plan);
            }
            CtlCmd::Resume { reason } => show(raw, &c.resume_all(reason).await.map_err(e)?, |r| {
                say!("resuming {} at the ramp rate", miners(r.resuming))
            }),
            CtlCmd::Protect { pattern } | CtlCmd::Unprotect { pattern } => {
                let state = match cmd {
                    CtlCmd::Protect { .. } => Protection::Protected,
                    _ => Protection::Curtailable,
                };
                show(raw, &c.set_protection(pattern, state).await.map_err(e)?, |r| match state {
                    Protection::Protected => say!(
                        "{} match now and are protected; the rule also applies to miners that connect later",
                        miners(r.matched)
                    ),
                    Protection::Curtailable => say!(
                        "{} match now and are curtailable again, as are those that connect later",
                        miners(r.matched)
                    ),
                });
            }
            CtlCmd::Watch => unreachable!("handled above"),
        }
    }
    Ok(())
}

/// Unix milliseconds in this machine's time zone (None: out of range).
fn local(ms: u64) -> Option<chrono::DateTime<chrono::Local>> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).ok()?).map(|t| t.with_timezone(&chrono::Local))
}

/// Unix milliseconds as this machine's local time, to the millisecond.
fn local_time(ms: u64) -> String {
    match local(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.3f %z").to_string(),
        None => format!("{ms} ms"),
    }
}

/// ` "why"`, or nothing for an empty or absent reason.
fn quoted(reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!(" {r:?}"),
        _ => String::new(),
    }
}

/// `plan 3: why`, or `plan 3` when no reason was given.
fn plan(c: &Cause) -> String {
    match c.reason.as_str() {
        "" => format!("plan {}", c.plan_id),
        r => format!("plan {}: {r}", c.plan_id),
    }
}

/// Unix milliseconds as this machine's local time of day (`14:03:07`),
/// with the date when it is not today.
fn time_of_day(ms: u64) -> String {
    match local(ms) {
        Some(t) if t.date_naive() == chrono::Local::now().date_naive() => t.format("%H:%M:%S").to_string(),
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
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
    for l in status_lines(r) {
        say!("{l}");
    }
}

/// What `ctl status` prints, a line each.
fn status_lines(r: &Status) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! say {
        ($($t:tt)*) => { out.push(format!($($t)*)) };
    }
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
                "budget: {} ({}) from {}{}: {met}{by}{lease}",
                fmt_watts(b.watts.unwrap_or_default().0),
                b.scope.as_deref().unwrap_or(""),
                wire(&src),
                quoted(b.reason.as_deref())
            );
        }
    }
    let feed = |f: &FeedStatus| {
        let reading = match (f.watts, f.at_ms) {
            (Some(w), Some(at)) => format!("{} at {}", fmt_watts(w.0), time_of_day(at)),
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
            f.target_w.map(|t| fmt_watts(t.0)).unwrap_or_else(|| {
                let now = fmt_watts(b.watts.unwrap_or_default().0);
                match (f.in_force, f.on_stale.as_str()) {
                    (false, _) => "no target while the feed is stale".into(),
                    (true, "shed") => format!("no target while the feed is stale: shed to stale_budget_w, {now}"),
                    (true, _) => format!("no target while the feed is stale: holding the last budget, {now}"),
                }
            }),
            if f.in_force { "" } else { " (overridden by a command)" }
        );
    }
    if r.resuming > 0 {
        say!("resuming: {} waiting for the ramp", miners(r.resuming));
    }
    if let Some(c) = &r.cluster {
        out.extend(cluster_lines(c));
    }
    out.extend(r.curves.iter().map(|c| c.to_string()));
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
    out
}

fn cluster_lines(c: &ClusterStatus) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! say {
        ($($t:tt)*) => { out.push(format!($($t)*)) };
    }
    let opt = |w: Option<Watts>| w.map(|w| fmt_watts(w.0)).unwrap_or_else(|| "no limit".into());
    say!(
        "cluster: site {:?}, this instance {} ({}), planner {}, etcd {}",
        c.site,
        c.instance,
        c.role,
        c.planner.as_deref().unwrap_or("none"),
        if c.etcd_reachable { "reachable".to_owned() } else { format!("UNREACHABLE (on_lost = {})", c.on_lost) }
    );
    let met = match c.met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "no budget",
    };
    say!(
        "site budget: {} from {}{}: {met}; {} mining, {} parked, drawing {}",
        opt(c.budget_w),
        wire(&c.budget_source),
        quoted(c.budget_reason.as_deref()),
        c.mining,
        c.parked,
        fmt_watts(c.drawn_w.0)
    );
    for i in &c.instances {
        say!(
            "  {:<28} {:<8} allotment {:>12}  enforcing {:>12}  drawing {:>10}  {} mining, {} parked, seen {:.1} s ago",
            i.instance,
            if i.planner { "planner" } else { "" },
            opt(i.allotment_w),
            opt(i.limit_w),
            fmt_watts(i.drawn_w.0),
            i.mining,
            i.parked,
            i.seen_s_ago
        );
    }
    out
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
    if let Some(h) = &r.held {
        say!(
            "held: {} until {} (curtail.hold_s: a parked miner stays parked at least that long)",
            miners(h.miners),
            time_of_day(h.until_ms)
        );
    }
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
            format!("{who} {} via {} ({})", w(watts), wire(hook), plan(cause))
        }
        Event::PlanApplied { plan_id, budget_w, park_count, resume_count, expected_w, reason, .. } => format!(
            "{}: budget {}, park {park_count}, resume {resume_count}, expect {}",
            plan(&Cause { plan_id: *plan_id, reason: reason.clone() }),
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
        Event::MinerTarget { who, from_w, to_w, cause } => {
            let t = |x: &Option<Watts>| x.map(|x| w(&x)).unwrap_or_else(|| "full".into());
            format!("{who} power target {} -> {} ({})", t(from_w), t(to_w), plan(cause))
        }
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
        Event::RowsRepaired { missing, stale, workers, .. } => format!(
            "self-check: {missing} live sessions had no row (registered again), {stale} rows kept ended sessions (dropped): {}",
            workers.join(" ")
        ),
        Event::ClusterPlanner { instance, epoch } => format!("{instance} plans for the site (epoch {epoch})"),
        Event::ClusterJoined { instance } => format!("{instance} joined the site"),
        Event::ClusterLeft { instance } => format!("{instance} left the site (its lease ran out)"),
        Event::ClusterAllotment { allotment_w, site_budget_w } => format!(
            "this instance may draw {} of the site budget {}",
            allotment_w.map(|x| w(&x)).unwrap_or_else(|| "without limit".into()),
            site_budget_w.map(|x| w(&x)).unwrap_or_else(|| "(none)".into())
        ),
        Event::EtcdLost { on_lost, allotment_w, error } => format!(
            "etcd unreachable for lease_s ({error}): on_lost = {on_lost}, enforcing {}",
            allotment_w.map(|x| w(&x)).unwrap_or_else(|| "no limit".into())
        ),
        Event::EtcdBack { down_s } => format!("etcd answers again after {down_s:.1} s; rejoined the site"),
    };
    format!("{} {kind:<15} {detail}", local_time(s.at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A status as the wire carries it, with `budget` and `follow` given.
    fn status(budget: Value, follow: Value) -> Status {
        let fig = json!({"connected": 2, "mining": 1, "parked": 1, "watts": 3000.0, "hashrate_hs": 1e14, "fleet_watts": 6000.0});
        serde_json::from_value(json!({
            "site": fig, "groups": {}, "budget": budget, "resuming": 0,
            "calibration": {"factor": 1.0, "updated_at_ms": null}, "follow": follow,
        }))
        .unwrap()
    }

    /// What an operator reads: nothing empty printed as `""` or `: `, feed
    /// times as a time of day, and what a stale feed leaves in force.
    #[test]
    fn status_lines_leave_out_what_is_empty_and_say_what_is_held() {
        let at = chrono::Local::now().timestamp_millis() as u64;
        let tod = time_of_day(at);
        assert!(tod.len() == 8 && tod.as_bytes()[2] == b':', "today's times are HH:MM:SS: {tod}");
        let budget = |reason: &str| json!({"source": "command", "watts": 9000.0, "scope": "site", "reason": reason, "met": true, "met_by": "estimated"});
        let feed = |stale: bool| json!({"source": "prometheus http://127.0.0.1:9090 gpu", "watts": 15000.0, "at_ms": at, "stale": stale});
        let follow = |stale: bool, on_stale: &str, target: Value| {
            json!({"site_limit_w": 30000.0, "margin_w": 1000.0, "other_load": feed(stale), "target_w": target,
                   "in_force": true, "on_stale": on_stale})
        };
        for (budget, follow, want, not) in [
            (budget(""), Value::Null, vec!["budget: 9 kW (site) from command: met"], vec!["\"\""]),
            (budget("peak"), Value::Null, vec!["budget: 9 kW (site) from command \"peak\": met"], vec![]),
            (
                budget(""),
                follow(false, "hold", json!(14000.0)),
                vec![&format!("follow: site limit 30 kW - other load 15 kW at {tod} [prometheus") as &str, "= 14 kW"],
                vec![&at.to_string() as &str],
            ),
            (
                budget(""),
                follow(true, "hold", Value::Null),
                vec!["STALE", "= no target while the feed is stale: holding the last budget, 9 kW"],
                vec!["none (stale)"],
            ),
            (
                budget(""),
                follow(true, "shed", Value::Null),
                vec!["= no target while the feed is stale: shed to stale_budget_w, 9 kW"],
                vec![],
            ),
        ] {
            let text = status_lines(&status(budget, follow)).join("\n");
            for w in want {
                assert!(text.contains(w), "want {w:?} in\n{text}");
            }
            for n in not {
                assert!(!text.contains(n), "{n:?} in\n{text}");
            }
        }
        assert_eq!(plan(&Cause { plan_id: 1, reason: String::new() }), "plan 1");
        assert_eq!(plan(&Cause { plan_id: 2, reason: "dr".into() }), "plan 2: dr");
    }
}
