//! How a miner is parked and resumed, besides the network method the
//! session applies itself: firmware (through asic-rs), exec, webhook.
//!
//! Each action runs in its own task, retried with exponential backoff, and
//! reports every failure and the final success to the controller. A hook
//! never blocks the controller or another miner's hook.

use super::power::FirmwareReading;
use super::{GroupConfig, Method};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

pub use crate::api::HookAction;

/// What a hook task reports.
#[derive(Debug)]
pub struct HookDone {
    pub miner: crate::api::MinerId,
    /// The plan and reason the action belongs to (for its events).
    pub cause: crate::api::Cause,
    pub generation: u64,
    pub action: HookAction,
    /// Success (with what the firmware read back, if anything) or the error.
    pub result: Result<Option<FirmwareReading>, String>,
    /// After a failure: when the next attempt comes (None: given up).
    pub retry_in: Option<Duration>,
}

/// A group's hook, resolved from config.
#[derive(Debug, Clone)]
pub struct HookSpec {
    pub method: Method,
    pub command: Vec<String>,
    pub url: String,
    pub firmware: String,
    pub auth: Option<(String, String)>,
    pub attempts: u32,
    pub first_backoff: Duration,
}

impl HookSpec {
    pub fn from_config(g: &GroupConfig) -> Self {
        HookSpec {
            method: g.method,
            command: g.command.clone(),
            url: g.url.clone(),
            firmware: g.firmware.clone(),
            auth: (!g.username.is_empty()).then(|| (g.username.clone(), g.password.clone())),
            attempts: 6,
            first_backoff: Duration::from_secs(1),
        }
    }
}

/// What a webhook receives (proto/control-v1.md).
#[derive(Serialize)]
struct WebhookBody<'a> {
    action: &'a str,
    worker: &'a str,
    address: std::net::IpAddr,
    reason: &'a str,
}

/// Can this build drive `firmware = "NAME"`? An error says why not.
pub fn firmware_supported(name: &str) -> Result<(), String> {
    fw::supported(name)
}

/// Start one hook action in its own task.
pub fn spawn<T: Send + 'static>(job: super::effect::HookJob, tx: mpsc::Sender<T>, wrap: fn(HookDone) -> T) {
    let super::effect::HookJob { spec, action, miner, worker, addr, cause, generation } = job;
    tokio::spawn(async move {
        let mut backoff = spec.first_backoff;
        let attempts = if action == HookAction::Read { 1 } else { spec.attempts };
        for attempt in 1..=attempts {
            let result = run_once(&spec, action, &worker, addr, &cause.reason).await;
            let last = attempt == attempts;
            let ok = result.is_ok();
            let retry_in = (!ok && !last).then_some(backoff);
            let done = HookDone { miner, cause: cause.clone(), generation, action, result, retry_in };
            if tx.send(wrap(done)).await.is_err() || ok || last {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    });
}

async fn run_once(
    spec: &HookSpec,
    action: HookAction,
    worker: &str,
    addr: SocketAddr,
    reason: &str,
) -> Result<Option<FirmwareReading>, String> {
    let verb = match action {
        HookAction::Park => "park",
        HookAction::Resume => "resume",
        HookAction::Read if spec.method == Method::Firmware => return fw::act(spec, action, addr).await,
        HookAction::Read => return Ok(None),
    };
    match spec.method {
        Method::Network => Ok(None),
        Method::Exec => {
            let (prog, args) = spec.command.split_first().ok_or("no command")?;
            let mut cmd = tokio::process::Command::new(prog);
            cmd.args(args)
                .env("SLUICE_ACTION", verb)
                .env("SLUICE_WORKER", worker)
                .env("SLUICE_ADDRESS", addr.ip().to_string())
                .env("SLUICE_REASON", reason)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(Duration::from_secs(30), cmd.status()).await {
                Err(_) => Err("command timed out after 30 s".into()),
                Ok(Err(e)) => Err(format!("cannot run {prog}: {e}")),
                Ok(Ok(s)) if s.success() => Ok(None),
                Ok(Ok(s)) => Err(format!("{prog} exited with {s}")),
            }
        }
        Method::Webhook => {
            let body = WebhookBody { action: verb, worker, address: addr.ip(), reason };
            let client =
                reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
            let r = client.post(&spec.url).json(&body).send().await.map_err(|e| format!("POST {}: {e}", spec.url))?;
            if r.status().is_success() {
                Ok(None)
            } else {
                Err(format!("POST {}: HTTP {}", spec.url, r.status()))
            }
        }
        Method::Firmware => fw::act(spec, action, addr).await,
    }
}

#[cfg(feature = "firmware")]
mod fw {
    use super::{FirmwareReading, HookAction, HookSpec};
    use crate::units::{HashesPerSec, Watts};
    use asic_rs::core::traits::entry::FirmwareEntry;
    use asic_rs::core::traits::miner::MinerAuth;
    use asic_rs::MinerFactory;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    pub fn supported(name: &str) -> Result<(), String> {
        firmware_kind(name)
            .map(|_| ())
            .ok_or_else(|| format!("unknown firmware {name:?} (luxos, braiins, whatsminer, vnish, antminer or auto)"))
    }

    /// The asic-rs firmware entries a `firmware = "..."` name searches.
    pub fn firmware_kind(name: &str) -> Option<Vec<Arc<dyn FirmwareEntry>>> {
        use asic_rs::{antminer, braiins, luxminer, vnish, whatsminer};
        let all: Vec<(&str, Arc<dyn FirmwareEntry>)> = vec![
            ("luxos", Arc::new(luxminer::firmware::LuxMinerFirmware::default())),
            ("braiins", Arc::new(braiins::firmware::BraiinsFirmware::default())),
            ("whatsminer", Arc::new(whatsminer::firmware::WhatsMinerFirmware::default())),
            ("vnish", Arc::new(vnish::firmware::VnishFirmware::default())),
            ("antminer", Arc::new(antminer::firmware::AntMinerStockFirmware::default())),
        ];
        match name {
            "auto" => Some(all.into_iter().map(|(_, f)| f).collect()),
            n => all.into_iter().find(|(k, _)| *k == n).map(|(_, f)| vec![f]),
        }
    }

    /// Sleep or wake a miner through its own API, then read back its state and
    /// watts. Only pause/resume are used: never a command that reboots.
    pub async fn act(spec: &HookSpec, action: HookAction, addr: SocketAddr) -> Result<Option<FirmwareReading>, String> {
        let entries = firmware_kind(&spec.firmware).ok_or_else(|| format!("unknown firmware {:?}", spec.firmware))?;
        let mut factory =
            MinerFactory::new().with_firmwares(entries.clone()).with_identification_timeout(Duration::from_secs(10));
        if let Some((u, p)) = &spec.auth {
            for e in &entries {
                factory = factory.with_firmware_discovery_auth(e.as_ref(), MinerAuth::new(u.clone(), p.clone()));
            }
        }
        let miner = factory
            .get_miner(addr.ip())
            .await
            .map_err(|e| format!("identify {}: {e}", addr.ip()))?
            .ok_or_else(|| format!("no {} miner answered at {}", spec.firmware, addr.ip()))?;
        let done = match action {
            HookAction::Park => miner.pause(None).await,
            HookAction::Resume => miner.resume(None).await,
            HookAction::Read => Ok(true),
        }
        .map_err(|e| format!("{action:?} on {}: {e}", addr.ip()))?;
        if !done {
            return Err(format!("{} refused {action:?}", addr.ip()));
        }
        // Read back what the firmware reports (asic-rs's is_mining is not
        // meaningful on every firmware, so watts and hashrate are the evidence);
        // firmware that reports nothing is not an error.
        let watts = miner.get_wattage().await.map(|p| p.as_watts()).unwrap_or(0.0);
        let hs = miner
            .get_hashrate()
            .await
            .map(|h| h.as_unit(asic_rs::core::data::hashrate::HashRateUnit::Hash).value)
            .unwrap_or(0.0);
        Ok((watts > 0.0).then_some(FirmwareReading { watts: Watts(watts), hashrate_hs: HashesPerSec(hs) }))
    }
}

#[cfg(not(feature = "firmware"))]
mod fw {
    use super::{FirmwareReading, HookAction, HookSpec};
    use std::net::SocketAddr;

    const MISSING: &str = "this sluice was built without the `firmware` feature: no firmware hooks";

    pub fn supported(_name: &str) -> Result<(), String> {
        Err(MISSING.into())
    }

    pub async fn act(_: &HookSpec, _: HookAction, _: SocketAddr) -> Result<Option<FirmwareReading>, String> {
        Err(MISSING.into())
    }
}
