//! A pool session in Stratum V2: the same [`PoolSession`] (work published
//! to miners, shares forwarded and counted, block solutions first), fed SV2
//! messages instead of SV1 lines.
//!
//! One extended channel per upstream connection. The pool's
//! `extranonce_prefix` plays the SV1 extranonce1 and its `extranonce_size`
//! the extranonce2 size, so the prefix space is subdivided among miners
//! exactly as for an SV1 pool. Jobs are tracked by the reference
//! implementation's client channel (`channels_sv2`): future jobs wait for
//! their `SetNewPrevHash`, and an active job is published to miners as a
//! `mining.notify` (clean on a new tip). Shares go up as
//! `SubmitSharesExtended` with the channel's sequence numbers; a
//! `SubmitShares.Success` acknowledges every share up to its
//! `last_sequence_number` (pools batch them), a `SubmitShares.Error` one.

use super::pool_session::{reject_reason, End, Outcome, Pending, PoolSession};
use super::UpstreamSubmit;
use crate::share::{PrevHash, Target};
use crate::stratum::{self, Notify};
use std::sync::atomic::Ordering;
use stratum_core::binary_sv2::U256Owned;
use stratum_core::bitcoin;
use stratum_core::channels_sv2::client::extended::ExtendedChannel;
use stratum_core::channels_sv2::extranonce_manager::ExtranoncePrefix;
use stratum_core::common_messages_sv2::{Protocol, SetupConnectionOwned};
use stratum_core::framing_sv2::framing::MessageFrame;
use stratum_core::framing_sv2::header::Header;
use stratum_core::mining_sv2::{OpenExtendedMiningChannelOwned, SubmitSharesExtendedOwned, UpdateChannelOwned};
use stratum_core::parsers_sv2::{AnyMessage, CommonMessages, CommonMessagesOwned, MiningOwned};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// SetupConnection flag of the Mining Protocol: the pool must allow version
/// rolling (BIP 320 bits) on every job.
const REQUIRES_VERSION_ROLLING: u32 = 1 << 2;
/// The version bits a Stratum V2 channel may roll (BIP 320).
const BIP320_MASK: u32 = 0x1fff_e000;
/// The extranonce2 size nearly every SV1 pool gives (ckpool, and pools
/// built on it). A channel's prefix space is cut from this many of its
/// bytes, so miners keep their extranonce1 when failover moves them to an
/// SV1 pool.
pub(super) const SV1_COMMON_EN2: usize = 8;
/// Extranonce bytes asked of the pool: that many.
pub(super) const MIN_EXTRANONCE: u16 = SV1_COMMON_EN2 as u16;
/// Shares awaiting an acknowledgement are kept at most this many per
/// connection (pools acknowledge in batches, and a pool that never does
/// must not grow the table for ever): the oldest are then counted
/// unanswered.
const MAX_UNACKED: usize = 65_536;
/// The channel's nominal hashrate is updated when the measured one moves
/// by more than this fraction...
const HASHRATE_STEP: f64 = 0.2;
/// ... at most this often.
const HASHRATE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// An SV2 message on its way out.
pub(super) enum Out {
    Common(CommonMessagesOwned),
    Mining(MiningOwned),
}

impl Out {
    /// Encrypt it onto `buf`.
    pub(super) fn encode(self, w: &mut super::noise::Writer, buf: &mut Vec<u8>) -> Result<(), String> {
        let bad = |e| format!("cannot frame an SV2 message: {e:?}");
        match self {
            Out::Common(m) => w.encode(MessageFrame::try_from(m).map_err(bad)?, buf),
            Out::Mining(m) => w.encode(MessageFrame::try_from(m).map_err(bad)?, buf),
        }
    }
}

/// Where a session is in its opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// SetupConnection sent.
    Setup,
    /// OpenExtendedMiningChannel sent.
    Opening,
    /// The channel is open.
    Open,
}

/// The SV2 state of one session of a connection.
pub(super) struct Sv2 {
    /// Messages to send: the connection loop encrypts and writes them.
    pub(super) out: Vec<Out>,
    phase: Phase,
    channel: Option<ExtendedChannel>,
    channel_id: u32,
    group_id: u32,
    next_seq: u32,
    /// The nominal hashrate last told the pool, and when.
    told_hashrate: f32,
    told_at: Instant,
    warned_no_rolling: bool,
}

impl Sv2 {
    pub(super) fn new(now: Instant) -> Sv2 {
        Sv2 {
            out: Vec::new(),
            phase: Phase::Setup,
            channel: None,
            channel_id: 0,
            group_id: 0,
            next_seq: 0,
            told_hashrate: 0.0,
            told_at: now,
            warned_no_rolling: false,
        }
    }

    /// Is a message for channel `id` ours (or our group's)?
    fn ours(&self, id: u32) -> bool {
        self.channel.is_some() && (id == self.channel_id || id == self.group_id)
    }
}

fn str0255(s: &str) -> stratum_core::binary_sv2::Str0255Owned {
    // Str0255 holds up to 255 bytes: longer text is cut at a char boundary.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned().try_into().expect("at most 255 bytes")
}

impl PoolSession {
    fn sv2(&mut self) -> &mut Sv2 {
        self.sv2.as_mut().expect("an SV2 session")
    }

    /// Open an SV2 session on URL `idx` (the Noise handshake is done):
    /// SetupConnection for the Mining Protocol, version rolling required
    /// when sluice lets miners roll.
    pub(super) fn sv2_start(&mut self, now: Instant) {
        let url = self.settings.urls[self.work.url_index].clone();
        let flags = if self.settings.version_mask.is_some() { REQUIRES_VERSION_ROLLING } else { 0 };
        let setup = SetupConnectionOwned {
            protocol: Protocol::MiningProtocol,
            min_version: 2,
            max_version: 2,
            flags,
            endpoint_host: str0255(&url.host),
            endpoint_port: url.port,
            vendor: str0255("sluice"),
            hardware_version: str0255(""),
            firmware: str0255(stratum::USER_AGENT),
            device_id: str0255(""),
        };
        let mut s = Sv2::new(now);
        s.out.push(Out::Common(CommonMessagesOwned::SetupConnection(setup)));
        self.sv2 = Some(s);
    }

    /// The hashrate of the miners on this connection, as the channel states it.
    fn measured_hashrate(&self) -> f32 {
        self.shared.hashrate.get().max(0.0) as f32
    }

    fn open_channel(&mut self) {
        let user = self.settings.urls[self.work.url_index].user.clone();
        let open = OpenExtendedMiningChannelOwned {
            request_id: 1,
            user_identity: str0255(&user),
            nominal_hash_rate: self.measured_hashrate(),
            max_target: U256Owned::from([0xffu8; 32]),
            min_extranonce_size: MIN_EXTRANONCE,
        };
        let now = self.now;
        let hr = open.nominal_hash_rate;
        let s = self.sv2();
        s.told_hashrate = hr;
        s.told_at = now;
        s.phase = Phase::Opening;
        s.out.push(Out::Mining(MiningOwned::OpenExtendedMiningChannel(open)));
    }

    /// One frame from the pool.
    pub(super) fn on_frame(
        &mut self,
        header: Header,
        mut payload: Vec<u8>,
        established: &mut bool,
        now: Instant,
    ) -> Result<Option<End>, String> {
        self.now = now;
        self.last_rx = now;
        let msg = match AnyMessage::try_from((header, payload.as_mut_slice())) {
            Ok(m) => m,
            Err(e) => {
                // An unknown or malformed message is logged and skipped, as
                // an SV1 line is; a pool that only sends those never opens
                // the channel and the handshake times out.
                warn!(conn = self.id, msg_type = header.msg_type(), "ignoring an SV2 message: {e:?}");
                return Ok(None);
            }
        };
        match msg {
            AnyMessage::Common(c) => self.on_common(c),
            AnyMessage::Mining(m) => self.on_mining(m.into_owned(), established),
            other => {
                debug!(conn = self.id, "ignoring SV2 message {other}");
                Ok(None)
            }
        }
    }

    fn on_common(&mut self, c: CommonMessages<'_>) -> Result<Option<End>, String> {
        match c {
            CommonMessages::SetupConnectionSuccess(s) => {
                if self.sv2().phase == Phase::Setup {
                    debug!(conn = self.id, used_version = s.used_version, flags = s.flags, "SV2 connection set up");
                    self.open_channel();
                }
                Ok(None)
            }
            CommonMessages::SetupConnectionError(e) => {
                Err(format!("pool refused SetupConnection: {} (flags {:#x})", e.error_code.as_utf8_or_hex(), e.flags))
            }
            // Redirects are not followed: the operator chose the pool list.
            CommonMessages::Reconnect(_) => Ok(Some(End::Reconnect(std::time::Duration::ZERO))),
            other => {
                debug!(conn = self.id, "ignoring SV2 message {other}");
                Ok(None)
            }
        }
    }

    fn on_mining(&mut self, m: MiningOwned, established: &mut bool) -> Result<Option<End>, String> {
        match m {
            MiningOwned::OpenExtendedMiningChannelSuccess(s) => {
                if self.sv2().phase != Phase::Opening {
                    return Ok(None);
                }
                let prefix = s.extranonce_prefix.to_owned_bytes();
                let size = s.extranonce_size;
                let target = s.target.clone().into_array();
                let ch = ExtendedChannel::new(
                    s.channel_id,
                    self.settings.urls[self.work.url_index].user.clone(),
                    ExtranoncePrefix::from_wire(prefix.clone()).map_err(|e| format!("extranonce prefix: {e:?}"))?,
                    bitcoin::Target::from_le_bytes(target),
                    self.measured_hashrate(),
                    self.settings.version_mask.is_some(),
                    size,
                    Some(self.settings.job_history),
                )
                .map_err(|e| format!("pool opened a channel sluice cannot use: {e:?}"))?;
                let sv2 = self.sv2();
                sv2.channel = Some(ch);
                sv2.channel_id = s.channel_id;
                sv2.group_id = s.group_channel_id;
                sv2.phase = Phase::Open;
                self.set_target(target);
                self.work.version_mask = self.settings.version_mask.map(|m| m & BIP320_MASK);
                self.apply_extranonce(prefix, size as usize);
                *established = true;
                self.fo.established();
                self.stats.upstreams_connected.fetch_add(1, Ordering::Relaxed);
                let idx = self.work.url_index;
                info!(conn = self.id, pool = %self.settings.urls[idx], channel = s.channel_id, extranonce_size = size,
                    prefix = %hex::encode(&*self.work.pool_en1), "pool session established (Stratum V2 extended channel)");
                Ok(None)
            }
            MiningOwned::OpenMiningChannelError(e) => Ok(Some(End::Refused(format!(
                "pool refused to open a channel for the account {}: {}",
                self.settings.urls[self.work.url_index].user,
                e.error_code.as_utf8_or_hex()
            )))),
            MiningOwned::NewExtendedMiningJob(j) => {
                if !self.sv2().ours(j.channel_id) {
                    return Ok(None);
                }
                if !j.version_rolling_allowed && self.work.version_mask.is_some() && !self.sv2().warned_no_rolling {
                    self.sv2().warned_no_rolling = true;
                    warn!(
                        conn = self.id,
                        "pool sent a job that forbids version rolling; miners that roll will be rejected on it"
                    );
                }
                let active = j.min_ntime.clone().into_inner().is_some();
                let id = j.job_id;
                let ch = self.sv2().channel.as_mut().expect("ours");
                if let Err(e) = ch.on_new_extended_mining_job(j) {
                    warn!(conn = self.id, job = id, "ignoring a job the channel refused: {e:?}");
                    return Ok(None);
                }
                if active {
                    self.publish_active(false);
                }
                Ok(None)
            }
            MiningOwned::SetNewPrevHash(p) => {
                if !self.sv2().ours(p.channel_id) {
                    return Ok(None);
                }
                let id = p.job_id;
                let ch = self.sv2().channel.as_mut().expect("ours");
                if let Err(e) = ch.on_set_new_prev_hash(p) {
                    warn!(conn = self.id, job = id, "ignoring a new block for a job never announced: {e:?}");
                    return Ok(None);
                }
                self.publish_active(true);
                Ok(None)
            }
            MiningOwned::SetTarget(t) => {
                if self.sv2().ours(t.channel_id) {
                    let target = t.maximum_target.into_array();
                    let _ =
                        self.sv2().channel.as_mut().expect("ours").set_target(bitcoin::Target::from_le_bytes(target));
                    self.set_target(target);
                    self.publish();
                }
                Ok(None)
            }
            MiningOwned::SetExtranoncePrefix(p) => {
                if !self.sv2().ours(p.channel_id) {
                    return Ok(None);
                }
                let prefix = p.extranonce_prefix.to_owned_bytes();
                let ch = self.sv2().channel.as_mut().expect("ours");
                let size = ch.get_rollable_extranonce_size() as usize;
                let wire =
                    ExtranoncePrefix::from_wire(prefix.clone()).map_err(|e| format!("extranonce prefix: {e:?}"))?;
                ch.set_extranonce_prefix(wire).map_err(|e| format!("pool set an extranonce prefix too long: {e:?}"))?;
                info!(conn = self.id, prefix = %hex::encode(&prefix), "pool changed the extranonce prefix");
                self.apply_extranonce(prefix, size);
                // The active job stands under the new prefix (the prefix is
                // not part of the coinbase parts the job carries).
                self.publish_active(true);
                Ok(None)
            }
            MiningOwned::SubmitSharesSuccess(s) => {
                if self.sv2().ours(s.channel_id) {
                    self.acknowledged(s.last_sequence_number);
                }
                Ok(None)
            }
            MiningOwned::SubmitSharesError(e) => {
                if self.sv2().ours(e.channel_id) {
                    self.refused(e.sequence_number, &e.error_code.as_utf8_or_hex());
                }
                Ok(None)
            }
            MiningOwned::CloseChannel(c) if self.sv2().ours(c.channel_id) => {
                Err(format!("pool closed the channel: {}", c.reason_code.as_utf8_or_hex()))
            }
            MiningOwned::UpdateChannelError(e) => {
                warn!(conn = self.id, "pool refused the channel's new hashrate: {}", e.error_code.as_utf8_or_hex());
                Ok(None)
            }
            other => {
                debug!(conn = self.id, "ignoring SV2 message {other}");
                Ok(None)
            }
        }
    }

    /// The pool's share target for the channel (little-endian, as SV2 sends it).
    fn set_target(&mut self, le: [u8; 32]) {
        let t = Target::from_le_bytes(&le);
        self.work.pool_target = t;
        self.work.pool_difficulty = t.difficulty();
    }

    /// The channel's active job, on its chain tip, as miners get it.
    fn publish_active(&mut self, clean: bool) {
        let ch = self.sv2().channel.as_ref().expect("an open channel");
        let (Some(job), Some(tip)) = (ch.get_active_job(), ch.get_chain_tip()) else {
            return;
        };
        let j = &job.job_message;
        let n = Notify {
            job_id: j.job_id.to_string(),
            prevhash: PrevHash(tip.prev_hash().into_array()),
            coinb1: j.coinbase_tx_prefix.to_owned_bytes(),
            coinb2: j.coinbase_tx_suffix.to_owned_bytes(),
            merkle_branch: j.merkle_path.clone().into_inner().into_iter().map(|h| h.into_array()).collect(),
            version: j.version,
            nbits: tip.nbits(),
            ntime: j.min_ntime.clone().into_inner().unwrap_or(tip.min_ntime()),
            clean_jobs: clean,
        };
        self.on_notify(n);
    }

    /// Every share up to `last` (in the channel's sequence) is accepted.
    fn acknowledged(&mut self, last: u32) {
        let acked: Vec<u64> =
            self.pending.keys().copied().filter(|&seq| (last.wrapping_sub(seq as u32)) < (1 << 31)).collect();
        for seq in acked {
            self.answered(seq, None);
        }
    }

    /// One share refused, with the pool's error code (`stale-share`...).
    fn refused(&mut self, seq: u32, code: &str) {
        self.answered(seq as u64, Some(code.to_owned()));
    }

    fn answered(&mut self, seq: u64, error: Option<String>) {
        let Some(Pending::Submit { stats, is_block, sent, .. }) = self.pending.remove(&seq) else {
            return;
        };
        let m = &self.stats.metrics;
        m.pool_rtt_seconds.observe(self.now.saturating_duration_since(sent).as_secs_f64());
        let ok = error.is_none();
        let pool = self.settings.urls[self.work.url_index].addr();
        let said = error.map(|e| serde_json::Value::String(e).to_string());
        let reason = if ok { "" } else { reject_reason(said.as_deref()) };
        m.pool_answer(&pool, ok, reason);
        self.finished(&stats, if ok { Outcome::Accepted } else { Outcome::Rejected });
        if let Some(said) = &said {
            self.rejects.rejected(self.id, &pool, reason, said, self.now);
        }
        if is_block {
            error!(target: crate::BLOCK_LOG, conn = self.id, accepted = ok, "BLOCK SOLUTION answered by the pool: {}",
                said.as_deref().unwrap_or("accepted"));
        }
    }

    /// Send a share as `SubmitSharesExtended` on the channel.
    pub(super) fn sv2_submit(&mut self, mut s: UpstreamSubmit, now: Instant) {
        let Ok(job_id) = s.job.pool_job_id.parse::<u32>() else {
            return self.finished(&s.stats, Outcome::Unanswered);
        };
        let Ok(extranonce) = s.extranonce2.as_bytes().to_vec().try_into() else {
            return self.finished(&s.stats, Outcome::Unanswered);
        };
        let sv2 = self.sv2();
        let seq = sv2.next_seq;
        sv2.next_seq = seq.wrapping_add(1);
        let msg = SubmitSharesExtendedOwned {
            channel_id: sv2.channel_id,
            sequence_number: seq,
            job_id,
            nonce: s.nonce,
            ntime: s.ntime,
            version: s.version,
            extranonce,
        };
        sv2.out.push(Out::Mining(MiningOwned::SubmitSharesExtended(msg)));
        if s.is_block {
            error!(target: crate::BLOCK_LOG, conn = self.id, hash = %s.hash, header = %hex::encode(s.header), pool_job = %s.job.pool_job_id,
                extranonce2 = %hex::encode(s.extranonce2.as_bytes()), "BLOCK SOLUTION found; submitting to the pool first");
        }
        let stats = s.stats.clone();
        let is_block = s.is_block;
        s.attempt += 1;
        let keep = is_block.then(|| Box::new(s));
        self.pending.insert(seq as u64, Pending::Submit { stats, is_block, resent: false, sub: keep, sent: now });
        if self.pending.len() > MAX_UNACKED {
            self.drop_oldest_unacked();
        }
    }

    /// The table of unacknowledged shares is full: the oldest in sequence
    /// order is counted unanswered.
    fn drop_oldest_unacked(&mut self) {
        let next = self.sv2().next_seq;
        let oldest = self.pending.keys().copied().max_by_key(|&seq| next.wrapping_sub(seq as u32));
        if let Some(Pending::Submit { stats, .. }) = oldest.and_then(|seq| self.pending.remove(&seq)) {
            warn!(conn = self.id, "pool has left {MAX_UNACKED} shares unacknowledged: counting the oldest unanswered");
            self.finished(&stats, Outcome::Unanswered);
        }
    }

    /// Every tick: tell the pool the channel's hashrate when it moved.
    pub(super) fn sv2_tick(&mut self, now: Instant) {
        self.now = now;
        let hr = self.measured_hashrate();
        let s = self.sv2();
        // A channel opened with no hashrate (a fresh connection, no miners
        // yet) has the pool's easiest target: the first measured figure
        // goes out at once, before the pool is sent every share.
        let first = s.told_hashrate == 0.0 && hr > 0.0;
        if s.phase != Phase::Open || (!first && now.saturating_duration_since(s.told_at) < HASHRATE_EVERY) {
            return;
        }
        let told = s.told_hashrate as f64;
        if ((hr as f64) - told).abs() <= told * HASHRATE_STEP {
            return;
        }
        s.told_hashrate = hr;
        s.told_at = now;
        let m = UpdateChannelOwned {
            channel_id: s.channel_id,
            nominal_hash_rate: hr,
            maximum_target: U256Owned::from([0xffu8; 32]),
        };
        s.out.push(Out::Mining(MiningOwned::UpdateChannel(m)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::share::Hash256;
    use crate::stats::{ProxyStats, ShareCounters, StatsPair};
    use crate::upstream::{PoolExtranonce2, UpstreamSettings};
    use std::sync::Arc;
    use stratum_core::binary_sv2::{Serialize, Sv2OptionOwned};
    use stratum_core::codec_sv2::EncodableFrame;
    use stratum_core::mining_sv2::*;

    const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

    /// A pool session on one SV2 URL, as its connection task holds it.
    fn session() -> (PoolSession, Arc<ProxyStats>) {
        let url: crate::config::PoolUrl = format!("stratum2+tcp://acct.rig@127.0.0.1:9/{KEY}").parse().unwrap();
        let settings = Arc::new(UpstreamSettings::from_config(&Config::default(), vec![url]).unwrap());
        let stats = Arc::new(ProxyStats::default());
        let (shared, work_tx, _, _) = super::super::conn::channels(1);
        (PoolSession::new(1, settings, stats.clone(), shared, work_tx, Instant::now()), stats)
    }

    /// A message as a pool's frame carries it: its header and payload.
    fn encoded<T>(m: T) -> (Header, Vec<u8>)
    where
        T: Serialize + stratum_core::binary_sv2::GetSize,
        MessageFrame<T>: TryFrom<T, Error = stratum_core::parsers_sv2::ParserError>,
    {
        let f = MessageFrame::try_from(m).unwrap();
        let mut b = vec![0u8; f.encoded_length()];
        f.encode_into(&mut b).unwrap();
        (Header::from_bytes(&b[..Header::SIZE]).unwrap(), b[Header::SIZE..].to_vec())
    }

    /// A message fed to the session as the pool's frame.
    fn feed<T>(ps: &mut PoolSession, est: &mut bool, m: T) -> Option<End>
    where
        T: Serialize + stratum_core::binary_sv2::GetSize,
        MessageFrame<T>: TryFrom<T, Error = stratum_core::parsers_sv2::ParserError>,
    {
        let (h, payload) = encoded(m);
        ps.on_frame(h, payload, est, Instant::now()).unwrap()
    }

    fn outbox(ps: &mut PoolSession) -> Vec<Out> {
        ps.sv2_outbox()
    }

    fn u256(b: u8) -> U256Owned {
        U256Owned::from([b; 32])
    }

    /// Set up and open a channel: prefix 01020304, 12 bytes to roll.
    fn opened() -> (PoolSession, Arc<ProxyStats>, bool) {
        let (mut ps, stats) = session();
        let mut est = false;
        ps.start(0, Instant::now());
        match &outbox(&mut ps)[..] {
            [Out::Common(CommonMessagesOwned::SetupConnection(s))] => {
                assert_eq!((s.protocol, s.min_version, s.max_version), (Protocol::MiningProtocol, 2, 2));
                assert_eq!(s.flags & REQUIRES_VERSION_ROLLING, REQUIRES_VERSION_ROLLING, "version rolling is on");
            }
            _ => panic!("SetupConnection first"),
        }
        let ok =
            CommonMessagesOwned::SetupConnectionSuccess(stratum_core::common_messages_sv2::SetupConnectionSuccess {
                used_version: 2,
                flags: 0,
            });
        feed(&mut ps, &mut est, ok);
        match &outbox(&mut ps)[..] {
            [Out::Mining(MiningOwned::OpenExtendedMiningChannel(o))] => {
                assert_eq!(o.user_identity.as_utf8_or_hex(), "acct.rig", "the URL's account is the channel's identity");
                assert_eq!(o.min_extranonce_size, MIN_EXTRANONCE);
            }
            _ => panic!("then OpenExtendedMiningChannel"),
        }
        assert!(!est);
        let target = crate::share::Difficulty::new(1000.0).unwrap().to_target().to_le_bytes();
        feed(&mut ps, &mut est, open_success(7, target, 12, &[1, 2, 3, 4]));
        (ps, stats, est)
    }

    /// The pool opens channel `id` (group 9) with this target, extranonce
    /// size and prefix.
    fn open_success(id: u32, target: [u8; 32], size: u16, prefix: &[u8]) -> MiningOwned {
        MiningOwned::OpenExtendedMiningChannelSuccess(OpenExtendedMiningChannelSuccessOwned {
            request_id: 1,
            channel_id: id,
            target: U256Owned::from(target),
            extranonce_size: size,
            extranonce_prefix: prefix.to_vec().try_into().unwrap(),
            group_channel_id: 9,
        })
    }

    fn job(id: u32, min_ntime: Option<u32>, channel: u32) -> MiningOwned {
        MiningOwned::NewExtendedMiningJob(NewExtendedMiningJobOwned {
            channel_id: channel,
            job_id: id,
            min_ntime: Sv2OptionOwned::new(min_ntime),
            version: 0x2000_0000,
            version_rolling_allowed: true,
            merkle_path: vec![u256(0xaa)].try_into().unwrap(),
            coinbase_tx_prefix: coinbase_prefix().try_into().unwrap(),
            coinbase_tx_suffix: hex::decode("ffffffff0100f2052a010000000000000000").unwrap().try_into().unwrap(),
        })
    }

    /// A coinbase up to its extranonce: version 2, one input (the null
    /// outpoint), a scriptSig of 20 bytes: a height push and the 16 bytes of
    /// extranonce (4 of prefix, 12 rolled).
    fn coinbase_prefix() -> Vec<u8> {
        hex::decode(format!("0200000001{}ffffffff1403010203", "00".repeat(32))).unwrap()
    }

    fn tip(job: u32, prev: u8, min_ntime: u32) -> MiningOwned {
        MiningOwned::SetNewPrevHash(SetNewPrevHashOwned {
            channel_id: 9,
            job_id: job,
            prev_hash: u256(prev),
            min_ntime,
            nbits: 0x1d00ffff,
        })
    }

    /// The channel's prefix and extranonce size become the pool
    /// extranonce1 and extranonce2 size the prefix space is cut from; a
    /// future job waits for its SetNewPrevHash (sent to the group channel)
    /// and is then published clean, on that tip and time; a job for the
    /// current tip is published at once, not clean.
    #[test]
    fn an_sv2_session_opens_a_channel_and_publishes_jobs_on_their_tip() {
        let (mut ps, _, mut est) = opened();
        assert!(est && ps.work.connected);
        assert_eq!(&*ps.work.pool_en1, &[1, 2, 3, 4]);
        let l = ps.work.layout.unwrap();
        assert_eq!((l.prefix_len, l.miner_en2_len, ps.work.pad_len), (2, 6, 4), "12 bytes: pad 4, prefix 2, miner 6");
        assert_eq!(l.pad_for(8), Some(0), "an SV1 backup's 8 bytes keep the layout");
        assert_eq!(ps.work.version_mask, Some(0x1fff_e000));
        assert!((ps.work.pool_difficulty.get() - 1000.0).abs() < 1e-6, "the channel's target is the pool's");

        feed(&mut ps, &mut est, job(1, None, 7));
        assert!(ps.work.jobs.is_empty(), "a future job waits for its tip");
        feed(&mut ps, &mut est, job(99, None, 8));
        feed(&mut ps, &mut est, tip(1, 0x11, 1_700_000_000));
        let j = ps.work.latest().unwrap().clone();
        assert_eq!((j.pool_job_id.as_str(), j.template.ntime, j.template.nbits), ("1", 1_700_000_000, 0x1d00ffff));
        assert_eq!(j.template.prevhash, PrevHash([0x11; 32]));
        assert_eq!(ps.work.clean_seq, j.seq, "a new tip is a clean job");
        assert!(std::str::from_utf8(&j.notify).unwrap().contains(&"aa".repeat(32)), "the merkle path goes to miners");

        feed(&mut ps, &mut est, job(2, Some(1_700_000_005), 7));
        let j2 = ps.work.latest().unwrap().clone();
        assert_eq!((j2.pool_job_id.as_str(), j2.template.ntime), ("2", 1_700_000_005));
        assert!(ps.work.clean_seq < j2.seq, "a job on the same tip is not clean");
        assert_eq!(ps.work.jobs.len(), 2, "the other channel's job was not taken");
    }

    fn share(ps: &PoolSession, stats: &Arc<ProxyStats>, nonce: u32) -> UpstreamSubmit {
        let job = ps.work.jobs.last().unwrap().clone();
        ps.shared.handed.fetch_add(1, Ordering::Relaxed);
        UpstreamSubmit {
            extranonce2: PoolExtranonce2::new(job.pad_len, &[0, 5], &[9; 6]).unwrap(),
            job,
            worker: None,
            ntime: 1_700_000_001,
            nonce,
            version: 0x2000_4000,
            hash: Hash256::default(),
            header: [0; 80],
            is_block: false,
            stats: StatsPair { worker: Arc::new(ShareCounters::default()), proxy: stats.clone() },
            attempt: 0,
        }
    }

    /// Shares go up with the channel's sequence numbers, the job id and
    /// the rolled extranonce (pad, prefix, the miner's part); the pool's
    /// batched Success credits every share up to its last sequence number,
    /// an Error one share, with the reason sorted as for SV1 pools.
    #[test]
    fn batched_acknowledgements_credit_every_share_up_to_the_last_sequence_number() {
        let (mut ps, stats, mut est) = opened();
        feed(&mut ps, &mut est, job(1, None, 7));
        feed(&mut ps, &mut est, tip(1, 0x11, 1_700_000_000));
        for nonce in 0..4 {
            let s = share(&ps, &stats, nonce);
            ps.send_submit(s, Instant::now());
        }
        let sent: Vec<SubmitSharesExtendedOwned> = outbox(&mut ps)
            .into_iter()
            .map(|o| match o {
                Out::Mining(MiningOwned::SubmitSharesExtended(s)) => s,
                _ => panic!("only shares"),
            })
            .collect();
        assert_eq!(sent.iter().map(|s| s.sequence_number).collect::<Vec<_>>(), [0, 1, 2, 3]);
        let s = &sent[2];
        assert_eq!((s.channel_id, s.job_id, s.nonce, s.ntime, s.version), (7, 1, 2, 1_700_000_001, 0x2000_4000));
        assert_eq!(s.extranonce.to_owned_bytes(), [0, 0, 0, 0, 0, 5, 9, 9, 9, 9, 9, 9], "pad, prefix, miner");
        assert_eq!(ps.shared.outstanding(), 4);

        let err = SubmitSharesErrorOwned {
            channel_id: 7,
            sequence_number: 1,
            error_code: "stale-share".to_owned().try_into().unwrap(),
        };
        feed(&mut ps, &mut est, MiningOwned::SubmitSharesError(err));
        let ok = SubmitSharesSuccessOwned {
            channel_id: 7,
            last_sequence_number: 2,
            new_submits_accepted_count: 2,
            new_shares_sum: 2,
        };
        feed(&mut ps, &mut est, MiningOwned::SubmitSharesSuccess(ok));
        let c = stats.shares.snapshot();
        assert_eq!((c.pool_accepted, c.pool_rejected, c.pool_unanswered), (2, 1, 0), "{c:?}");
        assert_eq!(ps.shared.outstanding(), 1, "share 3 waits for the next batch");
        assert_eq!(reject_reason(Some(r#""stale-share""#)), "stale");
        assert_eq!(reject_reason(Some(r#""difficulty-too-low""#)), "low difficulty");
        assert_eq!(reject_reason(Some(r#""invalid-job-id""#)), "job not found");
        assert_eq!(reject_reason(Some(r#""duplicate-share""#)), "duplicate");

        // The session ends: the share never acknowledged is unanswered.
        ps.session_ended();
        let c = stats.shares.snapshot();
        assert_eq!((c.pool_accepted, c.pool_rejected, c.pool_unanswered), (2, 1, 1), "{c:?}");
        assert_eq!(ps.shared.outstanding(), 0);
    }

    /// A block solution whose answer was lost with its connection is not
    /// sent on the next channel, even one with the same prefix on the same
    /// tip: its job id meant something only on the channel that ended. It
    /// is given up (and logged with its header), not resent under a job id
    /// the new channel may have given another job.
    #[test]
    fn a_block_solution_is_never_sent_on_another_channel() {
        let (mut ps, stats, mut est) = opened();
        feed(&mut ps, &mut est, job(1, None, 7));
        feed(&mut ps, &mut est, tip(1, 0x11, 1_700_000_000));
        let mut b = share(&ps, &stats, 1);
        b.is_block = true;
        ps.send_submit(b, Instant::now());
        assert_eq!(outbox(&mut ps).len(), 1);
        ps.session_ended();
        assert_eq!(ps.unsent_blocks.len(), 1, "held at first");
        // A new session: same pool, same prefix, same tip.
        ps.start(0, Instant::now());
        let ok = stratum_core::common_messages_sv2::SetupConnectionSuccess { used_version: 2, flags: 0 };
        feed(&mut ps, &mut est, CommonMessagesOwned::SetupConnectionSuccess(ok));
        feed(&mut ps, &mut est, open_success(8, [0xff; 32], 12, &[1, 2, 3, 4]));
        outbox(&mut ps);
        feed(&mut ps, &mut est, job(1, None, 8));
        feed(&mut ps, &mut est, tip(1, 0x11, 1_700_000_000));
        let sent = outbox(&mut ps);
        assert!(sent.iter().all(|o| !matches!(o, Out::Mining(MiningOwned::SubmitSharesExtended(_)))), "not resent");
        assert!(ps.unsent_blocks.is_empty());
        assert_eq!((stats.metrics.blocks_given_up.get(), stats.shares.snapshot().pool_unanswered), (1, 1));
    }

    /// The channel's nominal hashrate follows the miners': the first
    /// figure at once (the channel opened with none), then when it moves by
    /// more than a fifth, at most every 30 s.
    #[test]
    fn the_channel_s_hashrate_follows_the_miners() {
        let (mut ps, _, _) = opened();
        let t0 = Instant::now();
        let updates = |ps: &mut PoolSession| -> Vec<f32> {
            outbox(ps)
                .into_iter()
                .filter_map(|o| match o {
                    Out::Mining(MiningOwned::UpdateChannel(u)) => Some(u.nominal_hash_rate),
                    _ => None,
                })
                .collect()
        };
        ps.tick(t0);
        assert!(updates(&mut ps).is_empty(), "nothing measured, nothing to say");
        ps.shared.hashrate.add(1e12);
        ps.tick(t0 + std::time::Duration::from_secs(1));
        assert_eq!(updates(&mut ps), [1e12], "the first figure at once");
        ps.shared.hashrate.add(1e12);
        ps.tick(t0 + std::time::Duration::from_secs(10));
        assert!(updates(&mut ps).is_empty(), "at most every 30 s");
        ps.tick(t0 + std::time::Duration::from_secs(32));
        assert_eq!(updates(&mut ps), [2e12]);
        ps.shared.hashrate.add(1e11);
        ps.tick(t0 + std::time::Duration::from_secs(70));
        assert!(updates(&mut ps).is_empty(), "a twentieth is no move");
    }

    /// SetTarget moves the pool's share target; SetExtranoncePrefix moves
    /// the coinbase's prefix, and the active job is published again under it.
    #[test]
    fn a_new_target_and_a_new_prefix_reach_the_miners() {
        let (mut ps, _, mut est) = opened();
        feed(&mut ps, &mut est, job(1, None, 7));
        feed(&mut ps, &mut est, tip(1, 0x11, 1_700_000_000));
        let before = ps.work.pool_difficulty.get();
        let t = crate::share::Difficulty::new(16_000.0).unwrap().to_target().to_le_bytes();
        feed(
            &mut ps,
            &mut est,
            MiningOwned::SetTarget(SetTargetOwned { channel_id: 7, maximum_target: U256Owned::from(t) }),
        );
        assert!(
            (ps.work.pool_difficulty.get() - before * 16.0).abs() < 1e-6,
            "{} vs {before}",
            ps.work.pool_difficulty.get()
        );
        let session = ps.work.session;
        let p = SetExtranoncePrefixOwned { channel_id: 7, extranonce_prefix: vec![5, 6, 7, 8].try_into().unwrap() };
        feed(&mut ps, &mut est, MiningOwned::SetExtranoncePrefix(p));
        assert_eq!(&*ps.work.pool_en1, &[5, 6, 7, 8]);
        assert_eq!(ps.work.session, session + 1);
        let j = ps.work.latest().expect("the active job again");
        assert_eq!((j.pool_job_id.as_str(), &*j.pool_en1), ("1", &[5u8, 6, 7, 8][..]));
    }

    /// The fuzz target's seed (`fuzz/seeds/sv2_frames`) is a session that
    /// opens, gets a job and its tip, and an acknowledgement, in the
    /// target's format: `[type][len][payload]` per frame. Regenerated with
    /// SLUICE_WRITE_FUZZ_SEED=1.
    #[test]
    fn the_fuzz_seed_is_a_working_session() {
        fn frame<T>(m: T, out: &mut Vec<u8>)
        where
            T: Serialize + stratum_core::binary_sv2::GetSize,
            MessageFrame<T>: TryFrom<T, Error = stratum_core::parsers_sv2::ParserError>,
        {
            let (h, payload) = encoded(m);
            out.extend([h.msg_type(), u8::try_from(payload.len()).unwrap()]);
            out.extend_from_slice(&payload);
        }
        let mut seed = Vec::new();
        let ok = stratum_core::common_messages_sv2::SetupConnectionSuccess { used_version: 2, flags: 0 };
        frame(CommonMessagesOwned::SetupConnectionSuccess(ok), &mut seed);
        frame(open_success(7, [0xff; 32], 16, &[1, 0, 0, 0]), &mut seed);
        frame(job(1, None, 7), &mut seed);
        frame(tip(1, 0x11, 1_700_000_000), &mut seed);
        let ack = SubmitSharesSuccessOwned {
            channel_id: 7,
            last_sequence_number: 0,
            new_submits_accepted_count: 1,
            new_shares_sum: 1,
        };
        frame(MiningOwned::SubmitSharesSuccess(ack), &mut seed);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/sv2_frames/open-job-ack");
        if std::env::var_os("SLUICE_WRITE_FUZZ_SEED").is_some() {
            std::fs::write(&path, &seed).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), seed, "the committed seed is this session");
        assert_eq!(crate::upstream::fuzz_sv2_frames(&seed), 1, "the seed's job is published");
    }

    /// A refused channel is a refusal (failover moves on, as for a refused
    /// SV1 account); a closed channel or a refused setup ends the session.
    #[test]
    fn refusals_and_closings_end_the_session_as_what_they_are() {
        let (mut ps, _) = session();
        let mut est = false;
        ps.start(0, Instant::now());
        let e =
            OpenMiningChannelErrorOwned { request_id: 1, error_code: "unknown-user".to_owned().try_into().unwrap() };
        let end = feed(&mut ps, &mut est, MiningOwned::OpenMiningChannelError(e));
        assert!(matches!(end, Some(End::Refused(ref w)) if w.contains("acct.rig") && w.contains("unknown-user")));
        let (mut ps, _, mut est) = opened();
        let c = CloseChannelOwned { channel_id: 7, reason_code: "maintenance".to_owned().try_into().unwrap() };
        let (h, payload) = encoded(MiningOwned::CloseChannel(c));
        let r = ps.on_frame(h, payload, &mut est, Instant::now());
        assert!(matches!(r, Err(ref w) if w.contains("maintenance")));
    }
}
