//! The simulator, demo and bench subcommands of `sluice` (feature `sim`).
//! They live here, not in `main.rs`, so a production build without the
//! feature carries none of them.

use super::{demo, fleet, follow_demo, pool};
use clap::Subcommand;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

#[derive(Subcommand)]
pub enum SimCmd {
    /// Start a simulated pool. Commands on stdin: `diff D`, `block`, `job`,
    /// `extranonce`, `drop`, `stats`.
    SimPool {
        /// Where the simulated pool listens.
        #[arg(long, default_value = "127.0.0.1:3334")]
        listen: SocketAddr,
        /// The share difficulty it sets (mining.set_difficulty).
        #[arg(long, default_value_t = 0.0001)]
        difficulty: f64,
        /// The simulated network's difficulty: shares meeting it are blocks.
        #[arg(long, default_value_t = 1e12)]
        network_difficulty: f64,
        /// Bytes of extranonce2 it gives each connection.
        #[arg(long, default_value_t = 8)]
        extranonce2_size: usize,
        /// Seconds between new (not clean) jobs.
        #[arg(long, default_value_t = 30.0)]
        job_interval_s: f64,
    },
    /// Start a Stratum V2 Template Distribution server, the template source
    /// of an SV2 pool (`pool_sv2` with `template_provider_type.Sv2Tp`). It
    /// prints every SubmitSolution it checks. Commands on stdin: `block`,
    /// `stats`.
    SimTp {
        /// Where it listens.
        #[arg(long, default_value = "127.0.0.1:8442")]
        listen: SocketAddr,
        /// The network target, compact hex: 207fffff makes nearly every
        /// share a block (as on regtest), 1d00ffff one in 2^32 hashes.
        #[arg(long, default_value = "1d00ffff", value_parser = parse_nbits)]
        nbits: u32,
        /// Seconds between new blocks (0: only on the `block` command).
        #[arg(long, default_value_t = 0.0)]
        block_interval_s: f64,
    },
    /// Start simulated miners against a proxy or pool.
    SimFleet {
        /// The proxy (or pool) to connect to.
        #[arg(long, default_value = "127.0.0.1:3333")]
        target: SocketAddr,
        /// How many miners.
        #[arg(long, default_value_t = 10)]
        miners: usize,
        /// Comma-separated: cgminer,s21,whatsminer,nicehash,bitaxe.
        #[arg(long, value_delimiter = ',', default_value = "cgminer,s21,whatsminer,nicehash,bitaxe")]
        profiles: Vec<fleet::Profile>,
        /// Each miner submits a share about this often.
        #[arg(long, default_value_t = 1000)]
        share_interval_ms: u64,
        /// Stop after this many seconds (0: run until interrupted).
        #[arg(long, default_value_t = 0)]
        duration_s: u64,
        /// Worker names are PREFIX.N (run several fleets with different prefixes).
        #[arg(long, default_value = "sim")]
        worker_prefix: String,
        /// Print nothing.
        #[arg(long)]
        quiet: bool,
    },
    /// Measure the time from set_budget until every targeted miner is parked,
    /// with simulated miners in child processes.
    BenchCurtail {
        /// Simulated miners (five models).
        #[arg(long, default_value_t = 10_000)]
        miners: usize,
        /// Miners per fleet process (each process may hold 20,000 files here).
        #[arg(long, default_value_t = 5_000)]
        per_process: usize,
        /// set_budget rounds to time (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// More than 1: the cluster bench instead (feature `cluster`; etcd
        /// and HAProxy from PATH): one site budget over this many instances,
        /// `--miners` spread over them.
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
    /// Partial power against parking alone: firmware miners (Braiins OS
    /// doubles reached through asic-rs on 127.61-64.x.y:80, so run as root)
    /// under a budget, one model then three; prints the time to be under
    /// the budget, the peak draw during the trade, the time until it is
    /// complete, and the hashrate kept.
    BenchTargets {
        /// Firmware miners (one model; then three, a third each).
        #[arg(long, default_value_t = 1000)]
        miners: usize,
        /// The budget as a share of the fleet's nameplate.
        #[arg(long, default_value_t = 0.6)]
        fraction: f64,
        /// Seconds a double takes to reach a new power target.
        #[arg(long, default_value_t = 5.0)]
        settle_s: f64,
        /// The doubles keep this much more hashrate below full power than
        /// the built-in curves say (0.1: 10% more, capped at full; -0.1:
        /// 10% less). With it, the power-target run lasts until the curves
        /// learnt from the read-backs settle.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        curve_off: f64,
    },
    /// A deterministic simulator of the curtailment controller: the real
    /// controller state driven by a seeded fleet, clock and fault injector
    /// (slow, failing and lying firmware, reconnect storms, restarts from
    /// the state file, budgets and leases). After every step it checks that
    /// the miners holding a job draw at most the budget in force and that
    /// status agrees with the sessions; once the faults stop, that the
    /// fleet settles. A failure prints its seed and a trace; the same
    /// --seed and --steps replay it exactly.
    SimCheck {
        /// The first seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many seeds, from --seed on.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Steps per seed (each an input to the controller: a tick, a hook's
        /// answer, a connection, a fault).
        #[arg(long, default_value_t = 20_000)]
        steps: u64,
        /// Only the summary line (and a failure).
        #[arg(long)]
        quiet: bool,
        /// Run every seed, listing each that fails (its first failure), and
        /// fail at the end if any did.
        #[arg(long)]
        keep_going: bool,
        /// Cluster mode: several instances, each the real controller, with
        /// the real planner over an in-memory store with etcd's semantics
        /// (leases, revisions, compare-and-swap); instances killed, etcd
        /// frozen or losing its leases, an instance cut off.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: count a recovery missed (the site not back at
        /// what one instance would mine in time) or allotments that move
        /// while nothing did, instead of failing the seed; the budget and
        /// the status rows are still checked at every step.
        #[arg(long, requires = "cluster")]
        safety_only: bool,
    },
    /// Load bench: a real proxy process, N simulated miners in child
    /// processes; prints RSS per miner, job fan-out, shares/s, submit latency
    /// and CPU per 1k shares (see BENCHMARKS.md).
    Bench {
        /// Fleet sizes, comma-separated, measured in ascending order.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,18000")]
        miners: Vec<usize>,
        /// Miners per fleet process (each process may hold 20,000 files here).
        #[arg(long, default_value_t = 6_000)]
        per_process: usize,
        /// New blocks announced per fleet size.
        #[arg(long, default_value_t = 5)]
        fanout_rounds: usize,
        /// Shares per second the whole fleet offers, one load phase each
        /// (0: no load phase).
        #[arg(long, value_delimiter = ',', default_value = "10000,25000,50000")]
        rate: Vec<u64>,
        /// Seconds each load phase lasts.
        #[arg(long, default_value_t = 20.0)]
        load_secs: f64,
        /// Fleet sizes with a load phase (default: the largest).
        #[arg(long, value_delimiter = ',')]
        load_at: Vec<usize>,
        /// Run the proxy under this command, e.g. "perf record -g" or
        /// "heaptrack" (RSS and CPU figures are then the wrapper's).
        #[arg(long, default_value = "")]
        wrap: String,
        /// A Stratum V2 pool behind the proxy: the path of a `pool_sv2`
        /// binary (the reference pool; `.ci/test` installs one in
        /// ~/.cache/sluice-ci/pool_sv2-0.7.0/bin), fed by sim-tp's
        /// template provider, instead of the SV1 sim-pool.
        #[arg(long)]
        sv2_pool: Option<std::path::PathBuf>,
    },
    /// A fleet process of `sluice bench` (driven over stdin/stdout).
    #[command(hide = true)]
    BenchFleet {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        miners: usize,
        #[arg(long)]
        ip_block: u8,
        #[arg(long, default_value = "bench")]
        worker_prefix: String,
        #[arg(long)]
        hostile: bool,
        /// With --hostile: seconds before a closed connection connects
        /// again (0: never).
        #[arg(long, default_value_t = 0.0)]
        reconnect_s: f64,
    },
    /// Hostile-downstream bench: honest miners' submit latency with and
    /// without thousands of connections sending garbage, slowloris trickles,
    /// oversized lines or nothing, against a decoy control; the hostile
    /// connections closed by reason.
    BenchHostile {
        /// Honest miners (one process), whose submit latency is measured.
        #[arg(long, default_value_t = 100)]
        honest: usize,
        /// Hostile connections: a quarter each garbage, slowloris, oversized
        /// line, silent.
        #[arg(long, default_value_t = 10_000)]
        hostile: usize,
        /// Hostile connections per attacking process.
        #[arg(long, default_value_t = 5_000)]
        per_process: usize,
        /// Shares per second the honest miners offer together.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Seconds each phase (baseline, attack, control) lasts.
        #[arg(long, default_value_t = 15.0)]
        secs: f64,
        /// A hostile connection the proxy closed connects again after this
        /// many seconds (0: never, so the attack ends once all are closed).
        #[arg(long, default_value_t = 0.0)]
        reconnect_s: f64,
    },
    /// Simulated pool, proxy and fleet on loopback, with a live summary.
    Demo {
        /// Simulated miners (with --follow: 50 by default, 5 models).
        #[arg(long)]
        miners: Option<usize>,
        /// Stop after this many seconds (0: run until interrupted).
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
        /// A day at a site shared with a GPU cluster: follow mode, a hall
        /// meter, a live line per simulated hour and an SVG chart of the day.
        #[arg(long)]
        follow: bool,
        /// With --follow: how many seconds a simulated day lasts.
        #[arg(long, default_value_t = 60)]
        day_s: u64,
        /// With --follow: where to write the chart (default: a file in the
        /// temporary directory, printed at the end).
        #[arg(long)]
        chart: Option<std::path::PathBuf>,
        /// With --follow: two sites through the same day, one meeting its
        /// budget with power targets, one by parking alone, each with
        /// Braiins OS doubles that asic-rs drives on port 80 of their own
        /// loopback addresses (root, or a lowered
        /// net.ipv4.ip_unprivileged_port_start); 40 miners per site by
        /// default.
        #[arg(long, requires = "follow")]
        power_target: bool,
    },
}

impl SimCmd {
    /// A bench fleet process is one thread: the bench's client side should
    /// cost the shared cores as little as possible.
    pub fn single_threaded(&self) -> bool {
        matches!(self, SimCmd::BenchFleet { .. })
    }

    /// Commands whose own output is the point: logs at warn only.
    /// `sluice demo`, with or without --follow.
    pub fn is_demo(&self) -> bool {
        matches!(self, SimCmd::Demo { .. })
    }

    /// `sluice sim-check`: its controllers log nothing (a fault a step
    /// would be a line a step); its trace says what happened.
    pub fn is_check(&self) -> bool {
        matches!(self, SimCmd::SimCheck { .. })
    }

    pub fn quiet(&self) -> bool {
        !matches!(self, SimCmd::SimPool { .. } | SimCmd::SimTp { .. } | SimCmd::SimFleet { quiet: false, .. })
    }

    pub async fn run(self) -> Result<(), String> {
        match self {
            SimCmd::SimPool { listen, difficulty, network_difficulty, extranonce2_size, job_interval_s } => {
                async {
                    let p = pool::SimPool::start(pool::SimPoolConfig {
                        listen,
                        difficulty,
                        network_difficulty,
                        extranonce2_size,
                        job_interval: Duration::from_secs_f64(job_interval_s.max(0.1)),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("sim-pool: {e}"))?;
                    println!("sim-pool listening on {}", p.addr);
                    stdin_commands(|l| sim_pool_command(&p, l)).await;
                    Ok(())
                }
                .await
            }
            SimCmd::SimTp { listen, nbits, block_interval_s } => {
                use crate::sim::template_provider::{TemplateProvider, TemplateProviderConfig};
                let block_interval = (block_interval_s > 0.0).then(|| Duration::from_secs_f64(block_interval_s));
                let tp = TemplateProvider::start(TemplateProviderConfig { listen, nbits, block_interval })
                    .await
                    .map_err(|e| format!("sim-tp: cannot listen on {listen}: {e}"))?;
                println!("sim-tp listening on {}", tp.addr);
                stdin_commands(|l| match l {
                    "block" => tp.new_block(),
                    "stats" => {
                        let s = tp.solutions();
                        println!("solutions {} valid {}", s.len(), s.iter().filter(|s| s.valid).count());
                    }
                    "" => {}
                    _ => println!("commands: block | stats"),
                })
                .await;
                Ok(())
            }
            SimCmd::Bench { miners, per_process, fanout_rounds, rate, load_secs, mut load_at, wrap, sv2_pool } => {
                if load_at.is_empty() {
                    load_at.extend(miners.iter().max());
                }
                let b = crate::sim::load::LoadBench {
                    sizes: miners,
                    per_process,
                    fanout_rounds,
                    rates: rate,
                    load_secs,
                    load_at,
                    wrap,
                    sv2_pool,
                };
                crate::sim::load::load(b).await.map_err(|e| e.to_string())
            }
            SimCmd::BenchHostile { honest, hostile, per_process, rate, secs, reconnect_s } => {
                let h = crate::sim::load::HostileBench { honest, hostile, per_process, rate, secs, reconnect_s };
                crate::sim::load::hostile(h).await.map_err(|e| e.to_string())
            }
            SimCmd::BenchFleet { target, miners, ip_block, worker_prefix, hostile, reconnect_s } => {
                let c = crate::sim::load::FleetChild { target, miners, ip_block, worker_prefix, hostile, reconnect_s };
                crate::sim::load::fleet_child(c).await.map_err(|e| e.to_string())
            }
            SimCmd::BenchCurtail { instances, miners, per_process, .. } if instances > 1 => {
                #[cfg(feature = "cluster")]
                {
                    crate::sim::bench_cluster::cluster(miners, per_process.max(1), instances)
                        .await
                        .map_err(|e| e.to_string())
                }
                #[cfg(not(feature = "cluster"))]
                {
                    let _ = (miners, per_process);
                    Err("bench-curtail --instances needs cluster mode: build with --features cluster".into())
                }
            }
            SimCmd::SimCheck { seed, seeds, steps, quiet, keep_going, cluster, safety_only } => match cluster {
                false => crate::sim::check::run(seed, seeds.max(1), steps, quiet, keep_going).map(|_| ()),
                true => crate::sim::cluster_check::run(seed, seeds.max(1), steps, quiet, keep_going, safety_only)
                    .map(|_| ()),
            },
            SimCmd::BenchTargets { miners, fraction, settle_s, curve_off } => {
                if !(fraction > 0.0 && fraction < 1.0 && (3..=60_000).contains(&miners)) {
                    return Err("bench-targets: --fraction in (0, 1), --miners from 3 to 60,000".into());
                }
                if !(-0.5..=0.5).contains(&curve_off) {
                    return Err("bench-targets: --curve-off from -0.5 to 0.5".into());
                }
                crate::sim::bench_targets::run(crate::sim::bench_targets::TargetsBench {
                    miners,
                    fraction,
                    settle: Duration::from_secs_f64(settle_s.max(0.1)),
                    curve_off,
                })
                .await
                .map_err(|e| e.to_string())
            }
            SimCmd::BenchCurtail { miners, per_process, rounds, .. } => {
                crate::sim::bench::curtail(crate::sim::bench::CurtailBench {
                    miners,
                    per_process: per_process.max(1),
                    rounds: rounds.max(1),
                })
                .await
                .map_err(|e| e.to_string())
            }
            SimCmd::SimFleet { target, miners, profiles, share_interval_ms, duration_s, worker_prefix, quiet } => {
                // One connection first, so a wrong address is an error that
                // says so, not a fleet retrying in silence.
                match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(target)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(format!("sim-fleet: cannot connect to {target}: {e} (is sluice listening there?)"))
                    }
                    Err(_) => return Err(format!("sim-fleet: cannot connect to {target}: no answer in 5 s")),
                }
                let f = fleet::Fleet::start(fleet::FleetConfig {
                    target,
                    miners,
                    profiles,
                    share_interval: Duration::from_millis(share_interval_ms),
                    worker_prefix,
                    ..Default::default()
                });
                let until = async {
                    if duration_s == 0 {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(Duration::from_secs(duration_s)).await
                    }
                };
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                tokio::pin!(until);
                loop {
                    tokio::select! {
                        _ = &mut until => break,
                        _ = tokio::signal::ctrl_c() => break,
                        _ = tick.tick() => if !quiet { print_fleet(&f.stats) },
                    }
                }
                if !quiet {
                    print_fleet(&f.stats);
                }
                Ok(())
            }
            SimCmd::Demo { miners, follow: true, day_s, chart, power_target, .. } => {
                follow_demo::run(follow_demo::FollowDemo {
                    miners: miners.unwrap_or(if power_target { 40 } else { 50 }),
                    day: Duration::from_secs(day_s.max(12)),
                    chart,
                    power_target,
                })
                .await
                .map_err(|e| e.to_string())
            }
            SimCmd::Demo { miners, duration_s, .. } => demo::run(demo::DemoConfig {
                miners: miners.unwrap_or(12),
                duration: Duration::from_secs(duration_s),
                report_every: Duration::from_secs(2),
            })
            .await
            .map_err(|e| e.to_string()),
        }
    }
}

fn print_fleet(s: &fleet::FleetStats) {
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "miners connected {} | submitted {} accepted {} rejected {} | jobs {} | disconnects {}",
        s.connected.load(Relaxed),
        s.submitted.load(Relaxed),
        s.accepted.load(Relaxed),
        s.rejected.load(Relaxed),
        s.jobs.load(Relaxed),
        s.disconnects.load(Relaxed)
    );
}

/// Run `command` on each line of stdin (trimmed) until Ctrl-C; a closed
/// stdin (run in the background) leaves the simulator serving.
async fn stdin_commands(mut command: impl FnMut(&str)) {
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            line = stdin.next_line() => match line {
                Ok(Some(l)) => command(l.trim()),
                _ => { let _ = tokio::signal::ctrl_c().await; break }
            }
        }
    }
}

fn parse_nbits(s: &str) -> Result<u32, String> {
    let ok = s.len() == 8 && crate::share::Target::from_compact(u32::from_str_radix(s, 16).unwrap_or(0)).is_some();
    ok.then(|| u32::from_str_radix(s, 16).expect("checked"))
        .ok_or_else(|| format!("{s:?} is not a compact target of 8 hex digits (e.g. 1d00ffff)"))
}

fn sim_pool_command(p: &pool::SimPool, cmd: &str) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut it = cmd.split_whitespace();
    match (it.next(), it.next().and_then(|d| d.parse::<f64>().ok())) {
        (Some("diff"), Some(d)) => p.set_difficulty(d),
        (Some("block"), _) => p.new_block(),
        (Some("job"), _) => p.new_job(),
        (Some("extranonce"), _) => p.change_extranonce(),
        (Some("drop"), _) => p.drop_connections(),
        (Some("stats"), _) => println!(
            "connections {} accepted {} rejected {} blocks {}",
            p.stats.connections.load(Relaxed),
            p.stats.accepted.load(Relaxed),
            p.stats.rejected.load(Relaxed),
            p.stats.blocks.load(Relaxed)
        ),
        (None, _) => {}
        _ => println!("commands: diff D | block | job | extranonce | drop | stats"),
    }
}
