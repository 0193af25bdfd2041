//! How a miner is parked and resumed, besides the network method the
//! session applies itself: firmware (through asic-rs), exec, webhook.
//!
//! Each action runs in its own task, retried with exponential backoff, and
//! reports every failure and the final success to the controller. A hook
//! never blocks the controller or another miner's hook.

use super::power::FirmwareReading;
use super::{GroupConfig, Method};
use crate::units::Watts;
use serde::Serialize;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedMutexGuard};

pub use crate::api::HookAction;

/// What a hook task reports.
#[derive(Debug)]
pub struct HookDone {
    pub miner: crate::api::MinerId,
    /// The plan and reason the action belongs to (for its events).
    pub cause: crate::api::Cause,
    pub generation: u64,
    pub action: HookAction,
    /// The power target asked (Target, or Resume at a target).
    pub target: Option<crate::api::Watts>,
    /// Success (with what the firmware read back, if anything) or the error.
    pub result: Result<Option<FirmwareReading>, String>,
    /// After a failure: when the next attempt comes (None: given up).
    pub retry_in: Option<Duration>,
    /// What a probe read (`HookJob::probe`), if the firmware said.
    pub probe: Option<Probe>,
}

/// A firmware's power envelope and its own target, in its watts, as far as
/// it tells them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Probe {
    pub min: Option<crate::api::Watts>,
    pub max: Option<crate::api::Watts>,
    /// The power target it runs at now (before sluice sets one).
    pub target: Option<crate::api::Watts>,
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
    /// power-target: how long a new target may take to read back.
    pub settle: Duration,
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
            settle: g.settle_s.get(),
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

/// Why an action failed, and whether trying it again can help: a power
/// target the firmware turns down stays turned down.
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    pub again: bool,
}

impl Failure {
    fn again(error: impl Into<String>) -> Failure {
        Failure { error: error.into(), again: true }
    }

    fn last(error: impl Into<String>) -> Failure {
        Failure { error: error.into(), again: false }
    }
}

impl From<String> for Failure {
    fn from(error: String) -> Failure {
        Failure::again(error)
    }
}

/// One machine's queue of actions: its firmware (or command, or webhook)
/// is given one at a time, in the order the controller asked them. Shared
/// by every row of the machine (its worker name at its address), so a
/// retry of a park on a row whose session ended cannot reach the firmware
/// after a wake asked on its new row (tests/curtail.rs firmware hook).
pub type Turn = Arc<tokio::sync::Mutex<()>>;

/// What one attempt gives: what a probe read, and the outcome.
type Attempt = (Option<Probe>, Result<Option<FirmwareReading>, Failure>);

/// Start one hook action in its own task. Its retries stop once a newer
/// job for the same miner has started: the newer one says what the miner
/// should be doing, and an old retry must not undo it.
pub fn spawn<T: Send + 'static>(job: super::effect::HookJob, tx: mpsc::Sender<T>, wrap: fn(HookDone) -> T) {
    drive(job, tx, wrap, |j| async move {
        run_once(&j.spec, j.action, &j.worker, j.addr, &j.cause.reason, j.target, j.probe).await
    })
}

/// A place in a machine's queue, taken when asked and waited for later.
enum Place {
    Held(OwnedMutexGuard<()>),
    Waiting(Pin<Box<dyn Future<Output = OwnedMutexGuard<()>> + Send>>),
}

impl Place {
    /// Queue now: tokio's mutex is fair, and its first poll puts the
    /// waiter in line, so jobs asked one after another act in that order
    /// whichever task runs first.
    fn take(turn: &Turn) -> Place {
        let mut waiting = Box::pin(turn.clone().lock_owned());
        match waiting.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(held) => Place::Held(held),
            Poll::Pending => Place::Waiting(waiting),
        }
    }

    async fn wait(self) -> OwnedMutexGuard<()> {
        match self {
            Place::Held(held) => held,
            Place::Waiting(waiting) => waiting.await,
        }
    }
}

/// [`spawn`] with the attempt given (the tests time it).
fn drive<T, R, F>(job: super::effect::HookJob, tx: mpsc::Sender<T>, wrap: fn(HookDone) -> T, run: R)
where
    T: Send + 'static,
    R: Fn(super::effect::HookJob) -> F + Send + 'static,
    F: Future<Output = Attempt> + Send,
{
    // A read sends no command: it waits for no one.
    let mut place = (job.action != HookAction::Read).then(|| Place::take(&job.turn));
    tokio::spawn(async move {
        let (action, number) = (job.action, job.number);
        let superseded = || job.latest.load(Ordering::Acquire) != number;
        let mut backoff = job.spec.first_backoff;
        // A read is one look; a target waits settle_s for its read-back,
        // and one that never gets there is refused, not tried again.
        let attempts = if matches!(action, HookAction::Read | HookAction::Target) { 1 } else { job.spec.attempts };
        for attempt in 1.. {
            let turn = match place.take() {
                Some(p) => Some(p.wait().await),
                None if action == HookAction::Read => None,
                // A retry queues behind whatever was asked meanwhile, and
                // goes only if none of it was for this miner.
                None => Some(job.turn.clone().lock_owned().await),
            };
            if attempt > 1 && superseded() {
                return;
            }
            let (probed, result) = run(job.clone()).await;
            drop(turn);
            let again = match &result {
                Err(f) => f.again && attempt < attempts && !superseded(),
                Ok(_) => false,
            };
            let retry_in = again.then_some(backoff);
            let result = result.map_err(|f| f.error);
            let done = HookDone {
                miner: job.miner,
                cause: job.cause.clone(),
                generation: job.generation,
                action,
                target: job.target,
                result,
                retry_in,
                probe: probed,
            };
            if tx.send(wrap(done)).await.is_err() || !again {
                return;
            }
            tokio::time::sleep(backoff).await;
            if superseded() {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    });
}

/// One attempt, and what a probe read (firmware only).
async fn run_once(
    spec: &HookSpec,
    action: HookAction,
    worker: &str,
    addr: SocketAddr,
    reason: &str,
    target: Option<crate::api::Watts>,
    probe: bool,
) -> (Option<Probe>, Result<Option<FirmwareReading>, Failure>) {
    if spec.method.is_firmware() {
        return fw::act(spec, action, addr, target, probe).await;
    }
    (None, run_other(spec, action, worker, addr, reason).await)
}

/// network, exec and webhook.
async fn run_other(
    spec: &HookSpec,
    action: HookAction,
    worker: &str,
    addr: SocketAddr,
    reason: &str,
) -> Result<Option<FirmwareReading>, Failure> {
    let verb = match action {
        HookAction::Park => "park",
        HookAction::Resume => "resume",
        HookAction::Read => return Ok(None),
        HookAction::Target => return Err(Failure::last(format!("{:?} sets no power target", spec.method))),
    };
    match spec.method {
        Method::Network => Ok(None),
        Method::Exec => {
            let (prog, args) = spec.command.split_first().ok_or_else(|| Failure::last("no command"))?;
            let mut cmd = tokio::process::Command::new(prog);
            cmd.args(args)
                .env("SLUICE_ACTION", verb)
                .env("SLUICE_WORKER", worker)
                .env("SLUICE_ADDRESS", addr.ip().to_string())
                .env("SLUICE_REASON", reason)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(Duration::from_secs(30), cmd.status()).await {
                Err(_) => Err(Failure::again("command timed out after 30 s")),
                Ok(Err(e)) => Err(Failure::again(format!("cannot run {prog}: {e}"))),
                Ok(Ok(s)) if s.success() => Ok(None),
                Ok(Ok(s)) => Err(Failure::again(format!("{prog} exited with {s}"))),
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
                Err(Failure::again(format!("POST {}: HTTP {}", spec.url, r.status())))
            }
        }
        Method::Firmware | Method::PowerTarget => Err(Failure::last("firmware hooks go through asic-rs")),
    }
}

/// A read-back at or under a target, within 5% and 10 W.
pub fn settled(read: Watts, target: Watts) -> bool {
    read.0 <= target.0 * 1.05 + 10.0
}

/// How often a new target's read-back is polled: a twentieth of the
/// time it may take, between 100 ms and a second.
pub fn read_back_every(settle: Duration) -> Duration {
    (settle / 20).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

#[cfg(feature = "firmware")]
mod fw {
    use super::{read_back_every, settled, Failure, FirmwareReading, HookAction, HookSpec, Probe};
    use crate::units::{HashesPerSec, Watts};
    use asic_rs::core::data::miner::TuningTarget;
    use asic_rs::core::traits::entry::FirmwareEntry;
    use asic_rs::core::traits::miner::{Miner, MinerAuth};
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

    /// Sleep or wake a miner through its own API, or set its power target,
    /// then read back its state and watts. Pause, resume and the power
    /// target are the only commands used: never one that reboots (a
    /// firmware whose new target restarts it is the group's `restarts`).
    /// A resume with a target sets the target first, so the miner wakes at
    /// it; a target alone waits until the firmware reads back at or under
    /// it (within 5% and 10 W), at most `settle`, polled every
    /// [`read_back_every`] (a firmware that reads no power back is taken at
    /// its word once `settle` has passed).
    pub async fn act(
        spec: &HookSpec,
        action: HookAction,
        addr: SocketAddr,
        target: Option<Watts>,
        probe: bool,
    ) -> (Option<Probe>, Result<Option<FirmwareReading>, Failure>) {
        let miner = match identify(spec, addr).await {
            Ok(m) => m,
            Err(e) => return (None, Err(e)),
        };
        let probed = match probe {
            true => Some(probe_of(miner.as_ref()).await),
            false => None,
        };
        (probed, act_on(spec, miner.as_ref(), action, addr, target, probed).await)
    }

    /// The power envelope (tuning capabilities) and the target it runs at.
    async fn probe_of(miner: &dyn Miner) -> Probe {
        let watts = |t: Option<TuningTarget>| match t {
            Some(TuningTarget::Power(p)) => Some(Watts(p.as_watts())).filter(|w| w.0 > 0.0),
            _ => None,
        };
        let power = miner.get_tuning_capabilities().await.and_then(|c| c.power);
        let (min, max) = power.map_or((None, None), |p| (watts(p.minimum), watts(p.maximum)));
        Probe { min, max, target: watts(miner.get_tuning_target().await) }
    }

    async fn identify(spec: &HookSpec, addr: SocketAddr) -> Result<Box<dyn Miner>, Failure> {
        let entries = firmware_kind(&spec.firmware)
            .ok_or_else(|| Failure::last(format!("unknown firmware {:?}", spec.firmware)))?;
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
        Ok(miner)
    }

    async fn act_on(
        spec: &HookSpec,
        miner: &dyn Miner,
        action: HookAction,
        addr: SocketAddr,
        target: Option<Watts>,
        probed: Option<Probe>,
    ) -> Result<Option<FirmwareReading>, Failure> {
        let ip = addr.ip();
        // Inside the envelope the firmware gives: under it is refused here
        // (the planner learns the floor from the probe), over it is its
        // highest.
        let envelope = probed.unwrap_or_default();
        if let (Some(w), Some(min)) = (target, envelope.min) {
            if w.0 < min.0 {
                let max = envelope.max.map_or(String::new(), |m| format!("..{:.0}", m.0));
                return Err(Failure::last(format!(
                    "{ip}: a power target of {:.0} W is under its envelope ({:.0}{max} W)",
                    w.0, min.0
                )));
            }
        }
        let target = target.map(|w| envelope.max.map_or(w, |m| Watts(w.0.min(m.0))));
        // A target that does not take is not tried again: the miner is
        // planned as one that can only be parked (a wake at it stays asleep).
        if let Some(w) = target {
            if !miner.supports_set_power_limit() {
                return Err(Failure::last(format!("{ip}: its firmware takes no power target (asic-rs)")));
            }
            let set = miner.set_power_limit(measurements::Power::from_watts(w.0.round())).await;
            match set.map_err(|e| Failure::last(format!("power target {:.0} W on {ip}: {e}", w.0)))? {
                true => {}
                false => return Err(Failure::last(format!("{ip} refused a power target of {:.0} W", w.0))),
            }
        }
        let done = match action {
            HookAction::Park => miner.pause(None).await,
            HookAction::Resume => miner.resume(None).await,
            HookAction::Read | HookAction::Target => Ok(true),
        }
        .map_err(|e| format!("{action:?} on {ip}: {e}"))?;
        if !done {
            return Err(Failure::again(format!("{ip} refused {action:?}")));
        }
        let read = || async {
            // asic-rs's is_mining is not meaningful on every firmware, so
            // watts and hashrate are the evidence; firmware that reports
            // nothing is not an error.
            let watts = miner.get_wattage().await.map(|p| p.as_watts()).unwrap_or(0.0);
            let hs = miner
                .get_hashrate()
                .await
                .map(|h| h.as_unit(asic_rs::core::data::hashrate::HashRateUnit::Hash).value)
                .unwrap_or(0.0);
            (watts > 0.0).then_some(FirmwareReading { watts: Watts(watts), hashrate_hs: HashesPerSec(hs) })
        };
        let (Some(w), HookAction::Target) = (target, action) else { return Ok(read().await) };
        let end = tokio::time::Instant::now() + spec.settle;
        loop {
            let r = read().await;
            match r {
                Some(r) if settled(r.watts, w) => return Ok(Some(r)),
                _ if tokio::time::Instant::now() >= end => {
                    return match r {
                        Some(r) => Err(Failure::last(format!(
                            "{ip} reads {:.0} W {:.0} s after a power target of {:.0} W (settle_s)",
                            r.watts.0,
                            spec.settle.as_secs_f64(),
                            w.0
                        ))),
                        None => Ok(None),
                    }
                }
                _ => tokio::time::sleep(read_back_every(spec.settle)).await,
            }
        }
    }
}

#[cfg(not(feature = "firmware"))]
mod fw {
    use super::{Failure, FirmwareReading, HookAction, HookSpec, Probe};
    use std::net::SocketAddr;

    const MISSING: &str = "this sluice was built without the `firmware` feature: no firmware hooks";

    pub fn supported(_name: &str) -> Result<(), String> {
        Err(MISSING.into())
    }

    pub async fn act(
        _: &HookSpec,
        _: HookAction,
        _: SocketAddr,
        _: Option<crate::api::Watts>,
        _: bool,
    ) -> (Option<Probe>, Result<Option<FirmwareReading>, Failure>) {
        (None, Err(Failure::last(MISSING)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Cause, MinerId};
    use crate::curtail::effect::HookJob;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// An exec hook that always fails (`false`), retried with backoff.
    fn failing(latest: &Arc<AtomicU64>, attempts: u32) -> HookJob {
        let spec = HookSpec {
            method: Method::Exec,
            command: vec!["false".into()],
            url: String::new(),
            firmware: String::new(),
            auth: None,
            attempts,
            first_backoff: Duration::from_secs(1),
            settle: Duration::ZERO,
        };
        let number = latest.fetch_add(1, Ordering::AcqRel) + 1;
        HookJob {
            spec: Arc::new(spec),
            action: HookAction::Park,
            miner: MinerId(1),
            worker: "x.1".into(),
            addr: "127.0.0.1:4000".parse().unwrap(),
            cause: Cause::default(),
            generation: 0,
            target: None,
            latest: latest.clone(),
            number,
            turn: Turn::default(),
            probe: false,
        }
    }

    /// When each attempt on one machine lands (ms since the start), by
    /// action: a park takes `park_ms` and fails (to be tried again) on the
    /// attempts listed, a resume takes 100 ms; what reaches the firmware
    /// last is what it does.
    type Landed = Arc<parking_lot::Mutex<(tokio::time::Instant, Vec<(HookAction, u64)>)>>;

    fn timed(job: HookJob, tx: &mpsc::Sender<HookDone>, landed: &Landed, park_ms: u64, park_fails: &'static [u32]) {
        let (landed, tries, t0) = (landed.clone(), Arc::new(AtomicU64::new(0)), landed.lock().0);
        drive(
            job,
            tx.clone(),
            |d| d,
            move |j| {
                let (landed, tries) = (landed.clone(), tries.clone());
                async move {
                    let ms = if j.action == HookAction::Park { park_ms } else { 100 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    landed.lock().1.push((j.action, t0.elapsed().as_millis() as u64));
                    let attempt = tries.fetch_add(1, Ordering::AcqRel) as u32 + 1;
                    let fails = j.action == HookAction::Park && park_fails.contains(&attempt);
                    (None, if fails { Err(Failure::again("timed out")) } else { Ok(None) })
                }
            },
        );
    }

    /// Two jobs on one machine: a slow park, then a quick wake asked while
    /// the park (or its retry) is still on its way. The wake lands last,
    /// after the attempt in flight; the park's retries stop (before, the
    /// quick wake landed first and the slow park after it: asleep while
    /// the controller counted it mining, tests/curtail.rs firmware hook).
    #[tokio::test(start_paused = true)]
    async fn a_machine_takes_its_actions_one_at_a_time_in_the_order_asked() {
        use HookAction::{Park, Resume};
        // (park ms, attempts of it that fail, wake asked at ms, landings)
        type Case = (u64, &'static [u32], u64, &'static [(HookAction, u64)]);
        let cases: [Case; 3] = [
            // Asked back to back: the wake waits for the park.
            (2_000, &[], 0, &[(Park, 2_000), (Resume, 2_100)]),
            // Asked while the park's retry is on its way (first attempt
            // failed at 500 ms, retried at 1,500 ms).
            (500, &[1, 2], 1_700, &[(Park, 500), (Park, 2_000), (Resume, 2_100)]),
            // Asked during the backoff: the retry never goes.
            (500, &[1], 1_000, &[(Park, 500), (Resume, 1_100)]),
        ];
        for (park_ms, fails, wake_at, want) in cases {
            let landed = Arc::new(parking_lot::Mutex::new((tokio::time::Instant::now(), Vec::new())));
            let (latest, (tx, _rx)) = (Arc::new(AtomicU64::new(0)), mpsc::channel(16));
            let park = failing(&latest, 4);
            let turn = park.turn.clone();
            timed(park, &tx, &landed, park_ms, fails);
            tokio::time::sleep(Duration::from_millis(wake_at)).await;
            let mut wake = failing(&latest, 4);
            (wake.action, wake.turn) = (Resume, turn);
            timed(wake, &tx, &landed, park_ms, fails);
            tokio::time::sleep(Duration::from_secs(120)).await;
            assert_eq!(landed.lock().1, want, "park {park_ms} ms failing {fails:?}, wake at {wake_at} ms");
        }
    }

    /// The reports a job sends until its task ends; `supersede_after`:
    /// start a newer job for the miner once that many have come.
    async fn reports(attempts: u32, supersede_after: Option<usize>) -> Vec<Option<Duration>> {
        let latest = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel(16);
        spawn(failing(&latest, attempts), tx, |d| d);
        let mut got = Vec::new();
        while let Some(d) = rx.recv().await {
            assert!(d.result.is_err());
            got.push(d.retry_in);
            if Some(got.len()) == supersede_after {
                latest.fetch_add(1, Ordering::AcqRel);
            }
        }
        got
    }

    /// Every attempt is reported, with the backoff before the next; a
    /// newer job for the same miner stops the older one's retries (an old
    /// retry must not undo what the newer one asked).
    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_stop_once_superseded() {
        let s = |n: u64| Some(Duration::from_secs(n));
        assert_eq!(reports(4, None).await, [s(1), s(2), s(4), None]);
        assert_eq!(reports(4, Some(2)).await, [s(1), s(2)]);
        assert_eq!(reports(1, None).await, [None]);
    }

    /// A read-back settles at or under the target within 5% and 10 W; it
    /// is polled often enough to see a fast firmware settle, never more
    /// than ten times a second.
    #[test]
    fn read_backs_settle_within_the_tolerance_and_are_polled_in_proportion() {
        for (read, target, want) in [
            (1000.0, 1000.0, true),
            (1060.0, 1000.0, true),
            (1061.0, 1000.0, false),
            (14.0, 4.0, true),
            (15.0, 4.0, false),
        ] {
            assert_eq!(settled(Watts(read), Watts(target)), want, "{read} against {target}");
        }
        let ms = |n: u64| Duration::from_millis(n);
        for (settle, want) in [(0, 100), (1_000, 100), (4_000, 200), (20_000, 1_000), (120_000, 1_000)] {
            assert_eq!(read_back_every(ms(settle)), ms(want), "settle {settle} ms");
        }
    }
}
