//! The configuration: a `#[serde(default)]` TOML document whose every key has
//! a default, validated once at start-up with errors that name the key.
//! docker/sluice.example.toml documents every key.

mod values;

pub use values::{AuthorityKey, FileMode, OptionalAddr, PoolUrl, Seconds, VersionMask, POOL_URL_FORM};

use crate::share::Difficulty;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("`{key}`: {why}")]
    Invalid { key: &'static str, why: String },
}

fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, why: why.into() }
}

/// A config error's kind in words, naming what is expected without
/// figment's nested quoting.
fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(_, expected) => {
            format!("no such key; the keys here are {}", expected.join(", "))
        }
        Kind::MissingField(f) => format!("missing key {f}"),
        Kind::DuplicateField(f) => format!("{f} is given twice"),
        Kind::UnknownVariant(found, expected) => {
            let one_of: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
            format!("unknown value {found:?}: one of {}", one_of.join(", "))
        }
        other => other.to_string(),
    }
}

/// How miners' identities reach the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerMode {
    /// Every share is submitted under the pool account from the upstream URL.
    #[default]
    PoolAccount,
    /// Each miner's worker name is authorized upstream and used in its submits.
    PerWorker,
    /// One upstream connection per miner, under the miner's worker name.
    Passthrough,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where miners connect.
    pub listen: SocketAddr,
    /// Pool URLs in failover order: `stratum+tcp://user:pass@host:port`.
    pub upstream: Vec<PoolUrl>,
    pub worker_mode: WorkerMode,
    pub version_rolling: VersionRolling,
    pub difficulty: DifficultyConfig,
    pub failover: FailoverConfig,
    pub shares: ShareConfig,
    pub limits: Limits,
    pub curtail: crate::curtail::CurtailConfig,
    pub metrics: MetricsConfig,
    /// Who may mine through sluice (open by default).
    pub access: AccessConfig,
    /// Extra routes: each customer's miners to that customer's pool.
    pub pool: Vec<RouteConfig>,
}

/// Optional miner authorization. Empty lists allow everyone.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// Source networks allowed to connect (e.g. "10.20.0.0/16").
    pub cidrs: Vec<IpNet>,
    /// Worker-name globs allowed to authorize (e.g. "farm1.*").
    pub workers: Vec<String>,
}

/// A route: ordered pool URLs, and which miners take it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Pool URLs in failover order.
    pub urls: Vec<PoolUrl>,
    /// Glob on the worker name; empty matches every worker.
    pub workers: String,
    /// Source networks (e.g. "10.1.0.0/16"); empty matches every address.
    pub cidrs: Vec<IpNet>,
    /// Routes without match rules form the default set; a weight > 0 there
    /// splits new miners between them so their hashrates follow the weights.
    pub weight: f64,
}

/// The observability listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz` and `/api/v1/workers`. Empty disables.
    pub listen: OptionalAddr,
    /// Also count shares per worker (one series per worker and result).
    pub per_worker: bool,
    /// Workers beyond this many share the series `worker="_other"`.
    pub max_workers: usize,
    /// A status line in the log this often (miners, hashrate, shares at
    /// both ends, pools up, budget and watts); 0 turns it off.
    pub log_interval_s: Seconds,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: OptionalAddr(Some(([0, 0, 0, 0], 9333).into())),
            per_worker: false,
            max_workers: 1000,
            log_interval_s: secs(60),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:3333".parse().expect("literal"),
            upstream: Vec::new(),
            worker_mode: WorkerMode::default(),
            version_rolling: VersionRolling::default(),
            difficulty: DifficultyConfig::default(),
            failover: FailoverConfig::default(),
            shares: ShareConfig::default(),
            limits: Limits::default(),
            curtail: crate::curtail::CurtailConfig::default(),
            metrics: MetricsConfig::default(),
            access: AccessConfig::default(),
            pool: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VersionRolling {
    pub enabled: bool,
    /// The mask asked of the pool, hex. BIP320's 1fffe000 by default; BIP323
    /// widens it to 1fffffe0.
    pub mask: VersionMask,
}
impl Default for VersionRolling {
    fn default() -> Self {
        VersionRolling { enabled: true, mask: VersionMask(0x1fff_e000) }
    }
}
impl VersionRolling {
    /// The mask asked of pools, when version rolling is on.
    pub fn requested(&self) -> Option<u32> {
        self.enabled.then_some(self.mask.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DifficultyConfig {
    /// Difficulty a new miner starts at.
    pub start: f64,
    /// Floor and ceiling for vardiff. The floor may go far below 1 for test rigs.
    pub min: f64,
    pub max: f64,
    /// Vardiff aims for this many shares per minute per miner.
    pub target_shares_per_min: f64,
    /// Seconds between regular retargets.
    pub retarget_s: Seconds,
}
impl Default for DifficultyConfig {
    fn default() -> Self {
        DifficultyConfig { start: 8192.0, min: 64.0, max: 1e15, target_shares_per_min: 20.0, retarget_s: secs(60) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    pub connect_timeout_s: Seconds,
    /// Seconds to wait for the pool's answers to subscribe and authorize.
    pub handshake_timeout_s: Seconds,
    /// Backoff after a full pass over the URL list failed: starts here, doubles.
    pub backoff_initial_s: Seconds,
    pub backoff_max_s: Seconds,
    /// Go back to the first URL once it has answered for this long.
    pub primary_stable_s: Seconds,
    /// How often to probe the first URL while on a fallback.
    pub probe_interval_s: Seconds,
    /// Upper bound on upstream connections opened for one route.
    pub max_connections: usize,
    /// A pool that leaves a request (a share, an authorize) unanswered this
    /// long is taken as dead (a blackholed path) and failed over.
    pub answer_timeout_s: Seconds,
    /// A pool that sends nothing at all this long is failed over too.
    pub silence_timeout_s: Seconds,
    /// A write to a pool that stalls this long (the pool stopped reading)
    /// loses the session and fails over.
    pub write_timeout_s: Seconds,
}
impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            connect_timeout_s: secs(5),
            handshake_timeout_s: secs(10),
            backoff_initial_s: millis(500),
            backoff_max_s: secs(30),
            primary_stable_s: secs(60),
            probe_interval_s: secs(5),
            max_connections: 256,
            answer_timeout_s: secs(30),
            silence_timeout_s: secs(300),
            write_timeout_s: secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareConfig {
    /// How far past the job's ntime a miner may roll ntime.
    pub ntime_max_forward_s: u32,
    /// Jobs remembered per upstream connection (older ones are unknown).
    pub job_history: usize,
}
impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig { ntime_max_forward_s: 7000, job_history: 16 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest line accepted from a miner or a pool; a longer one closes that
    /// connection only.
    pub max_line_bytes: usize,
    /// Seconds a miner has to subscribe and authorize after connecting.
    pub handshake_timeout_s: Seconds,
    /// Seconds a new connection has to send its first request sluice knows
    /// (mining.subscribe, configure, authorize...): silent and trickling
    /// connections go at this, not at `handshake_timeout_s`.
    pub subscribe_timeout_s: Seconds,
    /// Unparseable lines (not a JSON-RPC request) a connection may send
    /// before it authorizes; at this many it is closed (ckpool closes at one).
    pub handshake_strikes: u32,
    /// Error answers per second to one connection (unparseable lines,
    /// unknown methods, bad parameters); past it, such lines are read and
    /// dropped unanswered. Share verdicts are always answered.
    pub error_answers_per_s: u32,
    /// Niceness (0 to 19) of the gate thread, which serves connections until
    /// they authorize: under load the kernel runs the threads of working
    /// miners first.
    pub gate_nice: u8,
    /// On SIGTERM: seconds to drain miners and wait for pools to answer
    /// forwarded shares before exiting.
    pub shutdown_grace_s: Seconds,
    /// Miner connections in total; more are closed at accept.
    pub max_connections: usize,
    /// Miner connections from one source address (a NAT'd site shows as one).
    pub max_connections_per_ip: usize,
    /// Seconds a working miner may send nothing before it is closed.
    pub idle_timeout_s: Seconds,
    /// Seconds a write to a miner may stall (it stopped reading) before it is closed.
    pub write_timeout_s: Seconds,
    /// Seconds a miner may go on submitting with none of its shares valid
    /// before it is closed (ckpool uses 180).
    pub invalid_share_window_s: Seconds,
    /// Accepted-share hashes remembered per miner to catch duplicates, over
    /// its open jobs; past it, shares are refused until a job closes.
    pub dedup_entries_per_miner: usize,
}
impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 16 * 1024,
            handshake_timeout_s: secs(60),
            subscribe_timeout_s: secs(5),
            handshake_strikes: 1,
            error_answers_per_s: 10,
            gate_nice: 10,
            shutdown_grace_s: secs(10),
            max_connections: 100_000,
            max_connections_per_ip: 4096,
            idle_timeout_s: secs(600),
            write_timeout_s: secs(30),
            invalid_share_window_s: secs(180),
            dedup_entries_per_miner: 4096,
        }
    }
}

/// A default of whole seconds.
const fn secs(s: u64) -> Seconds {
    Seconds::from_duration(std::time::Duration::from_secs(s))
}

/// A default of milliseconds.
const fn millis(ms: u64) -> Seconds {
    Seconds::from_duration(std::time::Duration::from_millis(ms))
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub upstream: Vec<PoolUrl>,
    pub start_difficulty: Option<f64>,
    pub min_difficulty: Option<f64>,
}

/// The config's top-level keys (`listen`, `curtail`, ...).
fn top_keys() -> std::collections::HashSet<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => Default::default(),
    }
}

/// The variable (after its prefix) a table key of the name `k` is set by:
/// `HOLD_S` is `CURTAIL__HOLD_S` (the keys of the tables of the default
/// config; none: no table has it).
fn meant(k: &str) -> Option<String> {
    let key = k.to_ascii_lowercase();
    let serde_json::Value::Object(top) = serde_json::to_value(Config::default()).ok()? else { return None };
    let mut tables: Vec<(&String, &serde_json::Map<String, serde_json::Value>)> =
        top.iter().filter_map(|(t, v)| Some((t, v.as_object()?))).collect();
    tables.sort_by_key(|(t, _)| t.as_str());
    tables.into_iter().find(|(_, m)| m.contains_key(&key)).map(|(t, _)| format!("{}__{}", t.to_ascii_uppercase(), k))
}

/// The table or key an environment variable (after its prefix) starts
/// with: `DIFFICULTY__START` is `difficulty`.
fn env_top(k: &str) -> String {
    k.split("__").next().and_then(|t| t.split('.').next()).unwrap_or("").to_ascii_lowercase()
}

/// `SLUICE_*` variables (with this prefix) that name no config key and are
/// not the control token: ignored when the config is read. Each with the
/// variable it may have meant, where a table has a key of its name.
pub fn unknown_env(prefix: &str) -> Vec<String> {
    let known = top_keys();
    let mut v: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.to_str()?.strip_prefix(prefix).map(str::to_owned))
        .filter(|k| k != "CONTROL_TOKEN" && !known.contains(&env_top(k)))
        .map(|k| match meant(&k) {
            Some(m) => format!("{prefix}{k} (did you mean {prefix}{m}?)"),
            None => format!("{prefix}{k}"),
        })
        .collect();
    v.sort();
    v
}

/// Watts no single miner draws: under this is a typo (kilowatts typed as
/// watts: `3.25` for 3,250 W) ...
pub const PLAUSIBLE_MINER_W_MIN: f64 = 10.0;
/// ... and over this too (the largest hydro units draw about 12 kW).
pub const PLAUSIBLE_MINER_W_MAX: f64 = 20_000.0;

/// The directory a config file's relative paths are read against: the
/// file's own, made absolute (`sluice.toml` given bare is in the working
/// directory).
fn config_dir(file: &Path) -> std::path::PathBuf {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned())
}

impl Config {
    /// Apply flags over the file. A `--min-difficulty` above the file's start
    /// raises the start with it, so a lone `--min-difficulty` never makes the
    /// config invalid.
    pub fn apply(&mut self, o: Overrides) {
        if let Some(l) = o.listen {
            self.listen = l;
        }
        if !o.upstream.is_empty() {
            self.upstream = o.upstream;
        }
        if let Some(d) = o.min_difficulty {
            self.difficulty.min = d;
            self.difficulty.start = self.difficulty.start.max(d);
        }
        if let Some(d) = o.start_difficulty {
            self.difficulty.start = d;
        }
    }

    /// Load the file (when given) with `SLUICE_...` environment variables on
    /// top: `SLUICE_LISTEN`, `SLUICE_UPSTREAM='["stratum+tcp://…"]'`,
    /// `SLUICE_DIFFICULTY__START=0.5` (a double underscore steps into a
    /// table). `SLUICE_CONTROL_TOKEN` is the control token, not a key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_prefix(path, "SLUICE_")
    }

    fn load_with_prefix(path: Option<&Path>, prefix: &str) -> Result<Self, ConfigError> {
        use figment::providers::{Env, Format, Serialized, Toml};
        let mut f = figment::Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            let text = std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
            f = f.merge(Toml::string(&text));
        }
        // Only variables that name a key of the config: an orchestrator
        // puts its own beside ours (Kubernetes gives a Service named sluice
        // SLUICE_PORT, SLUICE_SERVICE_HOST, SLUICE_PORT_3333_TCP_ADDR, ...).
        let known = top_keys();
        // The table or key a variable starts with (`DIFFICULTY__START` as
        // read from the environment, `difficulty.start` once split).
        let top = |k: &str| env_top(k);
        let ignored = unknown_env(prefix);
        if !ignored.is_empty() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!("ignoring environment variables that name no config key: {}", ignored.join(", "))
            });
        }
        let env = Env::prefixed(prefix).split("__").ignore(&["CONTROL_TOKEN"]);
        f = f.merge(env.filter(move |k| known.contains(&top(k.as_str()))));
        let where_ = path.map(|p| p.display().to_string()).unwrap_or_else(|| "environment".into());
        let mut cfg: Config = f.extract().map_err(|e| {
            // Name the variable at fault, not the file.
            if e.metadata.as_ref().is_some_and(|m| m.name.contains("environment")) {
                let var = format!("{prefix}{}", e.path.join("__").to_ascii_uppercase());
                ConfigError::Parse { path: format!("environment variable {var}"), message: describe(&e.kind) }
            } else {
                // The key as the file spells it (`difficulty.strat`), not
                // figment's `default.difficulty.strat` with nested quotes.
                let key = e.path.join(".");
                let message = if key.is_empty() { describe(&e.kind) } else { format!("{key}: {}", describe(&e.kind)) };
                ConfigError::Parse { path: where_, message }
            }
        })?;
        if let Some(dir) = path.map(config_dir) {
            // A path the environment gave is the caller's, relative to its
            // working directory; one the file gave (or a default the file
            // left) belongs with the file.
            let from_env = |key: &str| f.find_metadata(key).is_some_and(|m| m.name.contains("environment"));
            cfg.resolve_paths(&dir, from_env);
        }
        Ok(cfg)
    }

    /// Make the relative paths of a config file absolute against the file's
    /// directory, so `run`, `ctl -c FILE`, `check-config` and `healthcheck`
    /// meet at the same socket and state file whatever directory each was
    /// started from: `curtail.socket`, `curtail.state_file`, and an exec
    /// hook's program when it is a path (`./hooks/park.sh`; a bare name is
    /// looked up in PATH). Keys `from_env` says came from the environment
    /// are left alone.
    pub fn resolve_paths(&mut self, dir: &Path, from_env: impl Fn(&str) -> bool) {
        let c = &mut self.curtail;
        // `./x` read against `/srv` is `/srv/x`, not `/srv/./x`.
        let under = |p: &Path| -> std::path::PathBuf {
            dir.join(p.components().filter(|c| *c != std::path::Component::CurDir).collect::<std::path::PathBuf>())
        };
        let resolve = |p: &mut std::path::PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = under(p);
            }
        };
        if !from_env("curtail.socket") {
            resolve(&mut c.socket);
        }
        if !from_env("curtail.state_file") {
            resolve(&mut c.state_file);
        }
        if !from_env("curtail.group") {
            for prog in c.group.iter_mut().filter_map(|g| g.command.first_mut()) {
                if prog.contains('/') && Path::new(prog.as_str()).is_relative() {
                    *prog = under(Path::new(prog.as_str())).display().to_string();
                }
            }
        }
    }

    /// Values that load and validate but are unlikely to be meant: watts per
    /// miner outside what any miner draws ([`PLAUSIBLE_MINER_W_MIN`] to
    /// [`PLAUSIBLE_MINER_W_MAX`]), each naming its key. `check-config`
    /// prints them (and fails on them with `--strict`).
    pub fn warnings(&self) -> Vec<String> {
        let c = &self.curtail;
        let mut per_miner: Vec<(String, f64)> = vec![("curtail.default_watts".into(), c.default_watts)];
        per_miner.extend(c.model.iter().map(|m| (format!("curtail.model {:?} watts", m.name), m.watts)));
        per_miner
            .extend(c.power.iter().filter_map(|r| Some((format!("curtail.power {:?} watts", r.pattern), r.watts?))));
        per_miner
            .into_iter()
            .filter(|(_, w)| !(PLAUSIBLE_MINER_W_MIN..=PLAUSIBLE_MINER_W_MAX).contains(w))
            .map(|(key, w)| {
                let hint = if w < PLAUSIBLE_MINER_W_MIN { " (kilowatts typed as watts?)" } else { "" };
                format!(
                    "{key} = {w}: no miner draws that{hint}; a miner draws {PLAUSIBLE_MINER_W_MIN} W to {} kW, in watts",
                    PLAUSIBLE_MINER_W_MAX / 1000.0
                )
            })
            .collect()
    }

    /// Check every value once, so a running proxy never meets a bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let has_default =
            !self.upstream.is_empty() || self.pool.iter().any(|r| r.workers.is_empty() && r.cidrs.is_empty());
        if !has_default {
            return Err(invalid(
                "upstream",
                "a default route is required: pool URLs in `upstream`, or a [[pool]] without match rules",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.pool {
            if r.name.is_empty() || r.name == "default" || !names.insert(r.name.as_str()) {
                return Err(invalid(
                    "pool.name",
                    format!("{:?}: each [[pool]] needs a unique name other than \"default\"", r.name),
                ));
            }
            if r.urls.is_empty() {
                return Err(invalid("pool.urls", format!("pool {:?} has no URL", r.name)));
            }
            if !(r.weight.is_finite() && r.weight >= 0.0) {
                return Err(invalid("pool.weight", format!("pool {:?}: weight must be >= 0", r.name)));
            }
        }
        // An SV2 extended channel credits every share to the one user
        // identity it was opened with: there is no per-share worker name to
        // submit under, as per-worker and passthrough modes need.
        if self.worker_mode != WorkerMode::PoolAccount {
            let all = self.upstream.iter().chain(self.pool.iter().flat_map(|r| r.urls.iter()));
            if let Some(u) = all.into_iter().find(|u| u.sv2.is_some()) {
                return Err(invalid(
                    "worker_mode",
                    format!(
                        "{u} is a Stratum V2 pool, whose channel credits every share to the URL's account: \
                         use worker_mode = \"pool-account\" with SV2 pools"
                    ),
                ));
            }
        }
        let d = &self.difficulty;
        for (key, v) in [
            ("difficulty.start", d.start),
            ("difficulty.min", d.min),
            ("difficulty.max", d.max),
            ("difficulty.target_shares_per_min", d.target_shares_per_min),
        ] {
            if Difficulty::new(v).is_none() {
                return Err(invalid(key, format!("must be a positive number, got {v}")));
            }
        }
        if d.min > d.max {
            return Err(invalid("difficulty.min", format!("{} is above difficulty.max {}", d.min, d.max)));
        }
        if !(d.min..=d.max).contains(&d.start) {
            return Err(invalid("difficulty.start", format!("{} is outside [{}, {}]", d.start, d.min, d.max)));
        }
        if let Some(m) = self.version_rolling.requested() {
            if m == 0 || m & 0xe000_0000 != 0 {
                return Err(invalid(
                    "version_rolling.mask",
                    "must be non-zero hex leaving the top 3 version bits alone, e.g. 1fffe000",
                ));
            }
        }
        if !(256..=1 << 20).contains(&self.limits.max_line_bytes) {
            return Err(invalid("limits.max_line_bytes", "must be between 256 and 1048576"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("limits.dedup_entries_per_miner", l.dedup_entries_per_miner),
            ("limits.handshake_strikes", l.handshake_strikes as usize),
            ("limits.error_answers_per_s", l.error_answers_per_s as usize),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // Seconds are in range by type; these must also be non-zero.
        for (key, v) in [
            ("difficulty.retarget_s", d.retarget_s),
            ("failover.connect_timeout_s", self.failover.connect_timeout_s),
            ("failover.handshake_timeout_s", self.failover.handshake_timeout_s),
            ("failover.probe_interval_s", self.failover.probe_interval_s),
            ("failover.answer_timeout_s", self.failover.answer_timeout_s),
            ("failover.silence_timeout_s", self.failover.silence_timeout_s),
            ("failover.write_timeout_s", self.failover.write_timeout_s),
            ("limits.handshake_timeout_s", l.handshake_timeout_s),
            ("limits.subscribe_timeout_s", l.subscribe_timeout_s),
            ("limits.idle_timeout_s", l.idle_timeout_s),
            ("limits.write_timeout_s", l.write_timeout_s),
            ("limits.invalid_share_window_s", l.invalid_share_window_s),
        ] {
            if v.is_zero() {
                return Err(invalid(key, "must be more than 0 seconds"));
            }
        }
        if l.gate_nice > 19 {
            return Err(invalid("limits.gate_nice", "must be between 0 and 19"));
        }
        if self.failover.backoff_initial_s > self.failover.backoff_max_s {
            return Err(invalid("failover.backoff_initial_s", "is above failover.backoff_max_s"));
        }
        if self.access.workers.iter().any(String::is_empty) {
            return Err(invalid("access.workers", "an empty pattern matches nothing; use \"*\" for any"));
        }
        if self.shares.job_history == 0 {
            return Err(invalid("shares.job_history", "must be at least 1"));
        }
        self.curtail.validate().map_err(|(key, why)| invalid(key, why))?;
        if self.failover.max_connections == 0 {
            return Err(invalid("failover.max_connections", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type
    fn environment_overrides_the_file_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "upstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n[difficulty]\nstart = 100.0\nmin = 10.0\n")
            .unwrap();
        // A prefix of this test's own, so no other test sees these variables.
        figment::Jail::expect_with(|jail| {
            let pre = "SLUICEENVTEST_";
            jail.set_env(format!("{pre}DIFFICULTY__START"), "50.5");
            jail.set_env(format!("{pre}LISTEN"), "127.0.0.1:4444");
            jail.set_env(format!("{pre}UPSTREAM"), "[\"stratum+tcp://b@127.0.0.1:2\"]");
            jail.set_env(format!("{pre}CONTROL_TOKEN"), "not a config key");
            let c = Config::load_with_prefix(Some(&p), pre).unwrap();
            assert_eq!((c.difficulty.start, c.difficulty.min), (50.5, 10.0));
            assert_eq!(c.listen.port(), 4444);
            assert_eq!(c.upstream, vec!["stratum+tcp://b@127.0.0.1:2".parse().unwrap()]);
            // What Kubernetes puts in a pod beside a Service named like the
            // prefix: not config keys, ignored.
            jail.set_env(format!("{pre}PORT"), "tcp://192.0.2.10:3333");
            jail.set_env(format!("{pre}SERVICE_HOST"), "192.0.2.10");
            jail.set_env(format!("{pre}PORT_3333_TCP_ADDR"), "192.0.2.10");
            let c = Config::load_with_prefix(Some(&p), pre).unwrap();
            assert_eq!(c.listen.port(), 4444);
            // A known key with a bad value, or a misspelt key inside a known
            // table: an error naming the variable.
            jail.set_env(format!("{pre}DIFFICULTY__START"), "fast");
            let e = Config::load_with_prefix(Some(&p), pre).unwrap_err().to_string();
            assert!(e.starts_with("environment variable SLUICEENVTEST_DIFFICULTY__START: "), "{e}");
            jail.set_env(format!("{pre}DIFFICULTY__START"), "50.5");
            jail.set_env(format!("{pre}DIFFICULTY__STRAT"), "1");
            let e = Config::load_with_prefix(Some(&p), pre).unwrap_err().to_string();
            assert!(e.contains("environment variable SLUICEENVTEST_DIFFICULTY__STRAT: no such key"), "{e}");
            Ok(())
        });
    }

    /// Watts per miner that load but no miner draws are warned of, naming
    /// the key; plausible ones are not.
    #[test]
    fn implausible_miner_watts_are_warned_of() {
        let base = "upstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n";
        for (text, want) in [
            ("", vec![]),
            ("[curtail]\ndefault_watts = 3.25\n", vec!["curtail.default_watts = 3.25: no miner draws that (kilowatts"]),
            ("[curtail]\ndefault_watts = 10.0\n", vec![]),
            ("[curtail]\ndefault_watts = 20000.0\n", vec![]),
            ("[curtail]\ndefault_watts = 32500.0\n", vec!["curtail.default_watts = 32500: no miner draws that;"]),
            (
                "[[curtail.model]]\nname = \"x\"\nth_s = 100.0\nwatts = 3.5\n[[curtail.power]]\npattern = \"a*\"\nwatts = 0.5\n[[curtail.power]]\npattern = \"b*\"\nj_per_th = 20.0\n",
                vec!["curtail.model \"x\" watts = 3.5", "curtail.power \"a*\" watts = 0.5"],
            ),
        ] {
            let c: Config = toml::from_str(&format!("{base}{text}")).unwrap();
            let w = c.warnings();
            assert_eq!(w.len(), want.len(), "{text}: {w:?}");
            for (got, want) in w.iter().zip(want) {
                assert!(got.starts_with(want), "{text}: {got}");
            }
        }
    }

    /// Relative paths in a file are the file's: `run` and `ctl -c FILE`
    /// started from different directories meet at one socket. A path from
    /// the environment stays the caller's; absolute ones stay as written.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type
    fn relative_paths_are_read_against_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = d.join("c.toml");
        let base = "upstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n[curtail]\n";
        let group = "[[curtail.group]]\nname = \"g\"\npattern = \"*\"\nmethod = \"exec\"\n";
        for (text, socket, state, program) in [
            ("", d.join("sluice.sock"), "".into(), None),
            ("socket = \"./run/s.sock\"\n", d.join("run/s.sock"), "".into(), None),
            ("socket = \"/run/sluice/s.sock\"\n", "/run/sluice/s.sock".into(), "".into(), None),
            ("socket = \"\"\n", "".into(), "".into(), None),
            ("state_file = \"var/st.json\"\n", d.join("sluice.sock"), d.join("var/st.json"), None),
            (
                &format!("{group}command = [\"./hooks/park.sh\", \"x/y\"]\n"),
                d.join("sluice.sock"),
                "".into(),
                Some((d.join("hooks/park.sh").display().to_string(), "x/y")),
            ),
            (
                &format!("{group}command = [\"park-miner\"]\n"),
                d.join("sluice.sock"),
                "".into(),
                Some(("park-miner".into(), "")),
            ),
        ] {
            let text = text.replace("[curtail]\n[[curtail.group]]", "[[curtail.group]]");
            std::fs::write(&p, format!("{base}{text}")).unwrap();
            let c = Config::load_with_prefix(Some(&p), "SLUICEPATHTEST_").unwrap();
            assert_eq!(c.curtail.socket, socket, "{text}");
            assert_eq!(c.curtail.state_file, state, "{text}");
            if let Some((prog, arg)) = program {
                let cmd = &c.curtail.group[0].command;
                assert_eq!(cmd[0], prog, "{text}");
                assert_eq!(cmd.get(1).map(String::as_str).unwrap_or(""), arg, "arguments are not paths: {text}");
            }
        }
        // The environment's path is the caller's.
        std::fs::write(&p, base).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICEPATHTEST_CURTAIL__SOCKET", "mine.sock");
            let c = Config::load_with_prefix(Some(&p), "SLUICEPATHTEST_").unwrap();
            assert_eq!(c.curtail.socket, Path::new("mine.sock"));
            Ok(())
        });
        // No file: the working directory, as before.
        let c = Config::load_with_prefix(None, "SLUICEPATHTEST_").unwrap();
        assert_eq!(c.curtail.socket, Path::new("./sluice.sock"));
    }

    /// A file's error names the key as the file spells it, and says what
    /// the table takes, without figment's profile prefix and nested quotes.
    #[test]
    fn file_errors_name_the_key_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let base = "upstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n";
        for (text, want) in [
            (
                "[difficulty]\nstrat = 1\n",
                ": difficulty.strat: no such key; the keys here are start, min, max, target_shares_per_min, retarget_s",
            ),
            ("[difficulty]\nstart = \"x\"\n", ": difficulty.start: invalid type: found string \"x\", expected f64"),
            ("listen = 5\n", ": listen: invalid type"),
            // One pair of quotes around each value, not doubled backticks.
            (
                "[curtail]\non_bad_state = \"nope\"\n",
                ": curtail.on_bad_state: unknown value \"nope\": one of \"park-all\", \"no-budget\"",
            ),
        ] {
            std::fs::write(&p, format!("{base}{text}")).unwrap();
            let e = Config::load_with_prefix(Some(&p), "SLUICEFILETEST_").unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains("default.") && !e.contains("``"), "{text}: {e}");
        }
    }

    /// A variable that names no top-level key says which table's key of
    /// its name it may have meant.
    #[test]
    fn a_variable_missing_its_table_says_which_it_meant() {
        for (var, want) in [
            ("HOLD_S", Some("CURTAIL__HOLD_S")),
            ("hysteresis_fraction", Some("CURTAIL__hysteresis_fraction")),
            ("START", Some("DIFFICULTY__START")),
            ("PORT", None),
            ("SERVICE_HOST", None),
        ] {
            assert_eq!(meant(var).as_deref(), want, "{var}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let mut c: Config = toml::from_str("listen = \"0.0.0.0:1\"\nupstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n[difficulty]\nstart = 100.0\nmin = 10.0").unwrap();
        c.apply(Overrides {
            listen: Some("127.0.0.1:9".parse().unwrap()),
            upstream: vec![
                "stratum+tcp://b@127.0.0.1:2".parse().unwrap(),
                "stratum+tcp://c@127.0.0.1:3".parse().unwrap(),
            ],
            start_difficulty: None,
            min_difficulty: Some(0.000001),
        });
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.upstream.len(), 2);
        assert_eq!((c.difficulty.min, c.difficulty.start), (0.000001, 100.0));
        c.apply(Overrides { start_difficulty: Some(0.5), ..Default::default() });
        assert_eq!(c.difficulty.start, 0.5);
        assert_eq!(c.upstream[0].to_string(), "stratum+tcp://b@127.0.0.1:2", "no flag, no change");
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = Config { upstream: vec!["stratum+tcp://u@127.0.0.1:1".parse().unwrap()], ..Default::default() };
        c.validate().unwrap();
        c.difficulty.min = 0.000001;
        c.difficulty.start = 0.001;
        c.validate().unwrap();
        c.difficulty.start = -1.0;
        assert!(c.validate().unwrap_err().to_string().starts_with("`difficulty.start`"));
        let e = toml::from_str::<Config>("listen = \"0.0.0.0:1\"\nbogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }

    /// SV2 pools go wherever an upstream goes (failover lists mixed with SV1
    /// pools, routes, weights), in pool-account mode; a malformed key is
    /// refused with the reason, and other worker modes with why.
    #[test]
    fn sv2_pools_mix_with_sv1_pools_in_pool_account_mode() {
        let key = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";
        let mixed = format!(
            "upstream = [\"stratum2+tcp://acct.w@127.0.0.1:34254/{key}\", \"stratum+tcp://acct.w@127.0.0.1:3333\"]\n"
        );
        let route = format!(
            "[[pool]]\nname = \"b\"\nworkers = \"b.*\"\nweight = 2.0\nurls = [\"stratum+tcp://b@127.0.0.1:1\", \"stratum2+tcp://b@[::1]:2/{key}\"]\n"
        );
        check_entries(
            "",
            &[
                (&mixed, None),
                (&format!("{mixed}{route}"), None),
                (&format!("worker_mode = \"per-worker\"\n{mixed}"), Some("use worker_mode = \"pool-account\" with SV2 pools")),
                (
                    &format!("worker_mode = \"passthrough\"\nupstream = [\"stratum+tcp://a@127.0.0.1:1\"]\n{route}"),
                    Some("stratum2+tcp://b@[::1]:2 is a Stratum V2 pool"),
                ),
                ("upstream = [\"stratum2+tcp://a@127.0.0.1:1/9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH7\"]\n", Some("malformed")),
            ],
        );
    }

    /// Each entry appended to `base`: loads and validates (None), or fails
    /// with an error containing the text given.
    fn check_entries(base: &str, table: &[(&str, Option<&str>)]) {
        for (entry, want) in table {
            let got = toml::from_str::<Config>(&format!("{base}{entry}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()));
            match want {
                None => assert_eq!(got, Ok(()), "{entry}"),
                Some(w) => assert!(got.as_ref().unwrap_err().contains(w), "{entry}: {got:?}"),
            }
        }
    }

    /// The hostile-connection limits refuse values that would disable them
    /// by accident, naming the key.
    #[test]
    fn connection_leash_limits_are_checked() {
        let base = "upstream = [\"stratum+tcp://u@127.0.0.1:1\"]\n[limits]\n";
        let table = [
            ("subscribe_timeout_s = 2.5\nhandshake_strikes = 3\nerror_answers_per_s = 1\ngate_nice = 19\n", None),
            ("gate_nice = 0\n", None),
            ("subscribe_timeout_s = 0\n", Some("`limits.subscribe_timeout_s`: must be more than 0 seconds")),
            ("handshake_strikes = 0\n", Some("`limits.handshake_strikes`: must be at least 1")),
            ("error_answers_per_s = 0\n", Some("`limits.error_answers_per_s`: must be at least 1")),
            ("gate_nice = 20\n", Some("`limits.gate_nice`: must be between 0 and 19")),
            ("gate_nice = -1\n", Some("gate_nice")),
        ];
        check_entries(base, &table);
    }

    /// A schedule window's amount follows the protocol's rule (one
    /// `api::Amount`): `watts = inf` passed check-config before.
    #[test]
    fn schedule_amounts_are_checked_as_the_protocol_checks_them() {
        let base =
            "upstream = [\"stratum+tcp://u@127.0.0.1:1\"]\n[[curtail.schedule]]\nfrom = \"17:00\"\nto = \"21:00\"\n";
        let table = [
            ("watts = 2.4e6\n", None),
            ("fraction = 0.4\n", None),
            ("watts = inf\n", Some("`curtail.schedule`: 17:00-21:00: watts must be a finite number >= 0, not inf")),
            ("watts = -1\n", Some("not -1")),
            ("fraction = 1.5\n", Some("fraction must be from 0 to 1")),
            ("watts = 1\nfraction = 0.5\n", Some("exactly one of watts (>= 0) or fraction (0..1)")),
        ];
        check_entries(base, &table);
    }

    /// A firmware address entry needs an address and something to match.
    #[test]
    fn firmware_address_entries_are_checked() {
        let base = "upstream = [\"stratum+tcp://u@127.0.0.1:1\"]\n[[curtail.firmware_address]]\n";
        let table = [
            ("workers = \"a.*\"\naddress = \"192.0.2.1\"\n", None),
            ("cidr = \"198.51.100.0/24\"\naddress = \"192.0.2.1\"\n", None),
            ("workers = \"a.*\"\n", Some("curtail.firmware_address.address")),
            ("address = \"192.0.2.1\"\n", Some("matches every miner")),
            ("workers = \"a.*\"\naddress = \"not an ip\"\n", Some("address")),
        ];
        check_entries(base, &table);
    }

    /// A firmware group is accepted by a build with the `firmware` feature
    /// and refused, with the reason, by one without (CI tests both).
    #[test]
    fn firmware_groups_need_the_firmware_feature() {
        let c: Config = toml::from_str(concat!(
            "upstream = [\"stratum+tcp://u@127.0.0.1:1\"]\n",
            "[[curtail.group]]\nname = \"s19\"\npattern = \"*\"\nmethod = \"firmware\"\nfirmware = \"luxos\"\n",
        ))
        .unwrap();
        let got = c.validate().map_err(|e| e.to_string());
        if cfg!(feature = "firmware") {
            assert_eq!(got, Ok(()));
        } else {
            let e = got.unwrap_err();
            assert!(e.contains("curtail.group.firmware") && e.contains("built without the `firmware` feature"), "{e}");
        }
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// docker/sluice.example.toml documents every key with its default: it
    /// must parse, validate, and agree with `Config::default()`.
    #[test]
    fn example_config_is_complete_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/sluice.example.toml");
        let c = Config::load(Some(&path)).unwrap();
        c.validate().unwrap();
        let mut d = Config { upstream: c.upstream.clone(), ..Config::default() };
        d.resolve_paths(&config_dir(&path), |_| false);
        assert_eq!(toml::to_string(&c).unwrap(), toml::to_string(&d).unwrap());
        // Every key of the default config appears in the file.
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&toml::to_string(&d).unwrap()).unwrap();
        for (k, v) in &table {
            assert!(text.contains(&format!("{k} =")) || text.contains(&format!("[{k}]")), "{k} undocumented");
            if let toml::Value::Table(t) = v {
                for k2 in t.keys() {
                    assert!(text.contains(&format!("{k2} =")), "{k}.{k2} undocumented");
                }
            }
        }
    }

    /// The meter and follow tables are off by default, so the file shows
    /// them commented out: uncommented, they load and validate, through the
    /// same figment path as a real file (the meter's keys are flattened).
    #[test]
    fn the_commented_meter_and_follow_tables_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/sluice.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let from = text.find("# [curtail.meter]").expect("the meter table is documented");
        fn key(l: &str) -> Option<&str> {
            l.strip_prefix("# ")
                .filter(|r| r.starts_with('[') || r.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
        }
        let tables: String = text[from..].lines().filter_map(key).map(|l| format!("{l}\n")).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            format!("upstream = [\"stratum+tcp://a.b:x@127.0.0.1:3333\"]\n{tables}").as_bytes(),
        )
        .unwrap();
        let c = Config::load(Some(file.path())).unwrap_or_else(|e| panic!("{e}\n{tables}"));
        c.validate().unwrap();
        let meter = c.curtail.meter.expect("meter");
        assert_eq!(meter.source.kind, Some(crate::curtail::feed::SourceKind::Prometheus));
        assert_eq!(meter.settle_s.get(), std::time::Duration::from_secs(10));
        let follow = c.curtail.follow.expect("follow");
        assert_eq!(follow.other_load.query, "sum(DCGM_FI_DEV_POWER_USAGE)");
        // A misspelt meter key is an error that names it.
        let bad = tables.replace("calibrate = true", "calibrat = true");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            format!("upstream = [\"stratum+tcp://a.b:x@127.0.0.1:3333\"]\n{bad}").as_bytes(),
        )
        .unwrap();
        let err = Config::load(Some(file.path())).and_then(|c| c.validate().map(|_| c)).unwrap_err().to_string();
        assert!(err.contains("calibrat"), "{err}");
    }
}
