//! The `sluice` command: parse the CLI, set up logging, then hand over to
//! the library (`app`, `sim`).

mod ctl;

use clap::{Parser, Subcommand, ValueEnum};
use ctl::CtlCmd;
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
        /// Fail (exit 1) on warnings too: implausible values, SLUICE_*
        /// variables that name no key.
        #[arg(long)]
        strict: bool,
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
            // Its trace says what its simulated controllers did.
            #[cfg(feature = "sim")]
            Cmd::Sim(c) if c.is_check() => "off",
            // Its table counts the simulated network's blocks; a line for
            // each would break the table (RUST_LOG=sluice::block=error
            // shows them).
            #[cfg(feature = "sim")]
            Cmd::Sim(c) if c.is_demo() => "warn,sluice::block=off",
            // It prints its own warnings, each once.
            Cmd::CheckConfig { .. } => "error",
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

/// `check-config`: errors fail; warnings (values no miner has, variables
/// that name no key) are printed, and fail only with `--strict`.
fn check_config(file: &std::path::Path, strict: bool) -> Result<(), String> {
    let c = Config::load(Some(file)).map_err(|e| e.to_string())?;
    c.validate().map_err(|e| e.to_string())?;
    let mut warnings = c.warnings();
    warnings.extend(
        sluice::config::unknown_env("SLUICE_")
            .into_iter()
            .map(|v| format!("environment variable {v} names no config key: it is ignored")),
    );
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let n = warnings.len();
    let counted = format!("{n} warning{}", if n == 1 { "" } else { "s" });
    match (n, strict) {
        (0, _) => println!("{}: ok", file.display()),
        (_, false) => println!("{}: ok, with {counted}", file.display()),
        (_, true) => return Err(format!("{}: {counted} (--strict)", file.display())),
    }
    Ok(())
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
                                    Ok(r) if r == sluice::app::Reloaded::default() => {
                                        tracing::info!("reloaded: nothing changed")
                                    }
                                    Ok(r) if r.at_restart.is_empty() => {
                                        tracing::info!("reloaded: {r}");
                                        cfg = next;
                                    }
                                    Ok(r) => {
                                        tracing::warn!("reloaded: {r}");
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
        Cmd::CheckConfig { file, strict } => check_config(&file, strict),
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
