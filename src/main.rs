//! The `sluice` command: parse the CLI, set up logging, then hand over to
//! the library (`app`, `sim`).

use clap::{Parser, Subcommand, ValueEnum};
use sluice::app::{raise_nofile_limit, Proxy};
use sluice::config::{Config, Overrides};
use sluice::sim::{demo, fleet, pool};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stratum V1 mining proxy: aggregation, share validation, curtailment hooks"
)]
struct Cli {
    /// Log output format.
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
        upstream: Vec<String>,
        /// Starting difficulty for new miners (overrides `difficulty.start`).
        #[arg(long)]
        start_difficulty: Option<f64>,
        /// Vardiff floor, may be far below 1 for test rigs (overrides `difficulty.min`).
        #[arg(long)]
        min_difficulty: Option<f64>,
    },
    /// Validate a config file and exit.
    CheckConfig { file: PathBuf },
    /// Start a simulated pool. Commands on stdin: `diff D`, `block`, `job`,
    /// `extranonce`, `drop`, `stats`.
    SimPool {
        #[arg(long, default_value = "127.0.0.1:3334")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 0.0001)]
        difficulty: f64,
        #[arg(long, default_value_t = 1e12)]
        network_difficulty: f64,
        #[arg(long, default_value_t = 8)]
        extranonce2_size: usize,
        #[arg(long, default_value_t = 30.0)]
        job_interval_s: f64,
    },
    /// Start simulated miners against a proxy or pool.
    SimFleet {
        #[arg(long, default_value = "127.0.0.1:3333")]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        miners: usize,
        /// Comma-separated: cgminer,s21,whatsminer,nicehash,bitaxe.
        #[arg(long, value_delimiter = ',', default_value = "cgminer,s21,whatsminer,nicehash,bitaxe")]
        profiles: Vec<fleet::Profile>,
        #[arg(long, default_value_t = 1000)]
        share_interval_ms: u64,
        /// Stop after this many seconds (0: run until interrupted).
        #[arg(long, default_value_t = 0)]
        duration_s: u64,
    },
    /// Simulated pool, proxy and fleet on loopback, with a live summary.
    Demo {
        #[arg(long, default_value_t = 12)]
        miners: usize,
        /// Stop after this many seconds (0: run until interrupted).
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
    },
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn load_config(config: Option<PathBuf>) -> Result<Config, String> {
    match config {
        Some(p) => Config::load(&p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.cmd, Cmd::Demo { .. });
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    raise_nofile_limit();
    let r: Result<(), String> = match cli.cmd {
        Cmd::Run { config, listen, upstream, start_difficulty, min_difficulty } => {
            async {
                let mut cfg = load_config(config)?;
                cfg.apply(Overrides { listen, upstream, start_difficulty, min_difficulty });
                let _proxy = Proxy::start(&cfg).await.map_err(|e| e.to_string())?;
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("interrupted; stopping");
                Ok(())
            }
            .await
        }
        Cmd::CheckConfig { file } => {
            Config::load(&file).and_then(|c| c.validate()).map_err(|e| e.to_string()).map(|()| {
                println!("{}: ok", file.display());
            })
        }
        Cmd::SimPool { listen, difficulty, network_difficulty, extranonce2_size, job_interval_s } => {
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
                let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        line = stdin.next_line() => match line {
                            Ok(Some(l)) => sim_pool_command(&p, l.trim()),
                            // Stdin closed (e.g. run in the background): keep serving.
                            _ => { let _ = tokio::signal::ctrl_c().await; break }
                        }
                    }
                }
                Ok(())
            }
            .await
        }
        Cmd::SimFleet { target, miners, profiles, share_interval_ms, duration_s } => {
            let f = fleet::Fleet::start(fleet::FleetConfig {
                target,
                miners,
                profiles,
                share_interval: Duration::from_millis(share_interval_ms),
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
                    _ = tick.tick() => print_fleet(&f.stats),
                }
            }
            print_fleet(&f.stats);
            Ok(())
        }
        Cmd::Demo { miners, duration_s } => demo::run(demo::DemoConfig {
            miners,
            duration: Duration::from_secs(duration_s),
            report_every: Duration::from_secs(2),
        })
        .await
        .map_err(|e| e.to_string()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
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
