//! A small Template Distribution Protocol server (Stratum V2): the template
//! source a Stratum V2 pool (`pool_sv2` with `template_provider_type =
//! "Sv2Tp"`) builds its jobs from, in place of Bitcoin Core. It speaks the
//! reference implementation's message types over its Noise transport:
//! SetupConnection, then NewTemplate and SetNewPrevHash for every new block,
//! and it checks and records every SubmitSolution the pool sends (the block
//! header rebuilt from the coinbase and hashed against the network target).
//!
//! The chain is simulated: a block is a fresh random previous hash, and the
//! template has no transactions but the coinbase.

use crate::upstream::noise;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stratum_core::binary_sv2::U256Owned;
use stratum_core::bitcoin::{self, consensus::Decodable, hashes::Hash};
use stratum_core::common_messages_sv2::SetupConnectionSuccess;
use stratum_core::framing_sv2::framing::MessageFrame;
use stratum_core::parsers_sv2::{
    AnyMessage, CommonMessages, CommonMessagesOwned, TemplateDistribution, TemplateDistributionOwned,
};
use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// What the template provider serves.
#[derive(Debug, Clone)]
pub struct TemplateProviderConfig {
    pub listen: SocketAddr,
    /// The network target, compact (`207fffff` makes nearly every share a
    /// block, as on regtest; a mainnet value makes none).
    pub nbits: u32,
    /// A new block this often (None: only on `new_block`).
    pub block_interval: Option<Duration>,
}

/// A block solution the pool submitted, as checked here.
#[derive(Debug, Clone)]
pub struct Solution {
    pub template_id: u64,
    /// The block hash, in the usual display order.
    pub hash: String,
    /// The header hash meets the network target of its block.
    pub valid: bool,
}

/// The chain tip and its template, as published to every pool connection.
#[derive(Debug, Clone)]
struct Tip {
    template_id: u64,
    prev_hash: [u8; 32],
    ntime: u32,
    height: u32,
}

pub struct TemplateProvider {
    pub addr: SocketAddr,
    tip: watch::Sender<Tip>,
    next_template: Arc<AtomicU64>,
    solutions: Arc<Mutex<Vec<Solution>>>,
    nbits: u32,
}

fn unix_now() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

fn random_hash() -> [u8; 32] {
    let mut h = [0u8; 32];
    for b in h.iter_mut() {
        *b = fastrand::u8(..);
    }
    h
}

impl TemplateProvider {
    pub async fn start(cfg: TemplateProviderConfig) -> std::io::Result<TemplateProvider> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let next_template = Arc::new(AtomicU64::new(2));
        let (tip, _) = watch::channel(Tip { template_id: 1, prev_hash: random_hash(), ntime: unix_now(), height: 1 });
        let solutions = Arc::new(Mutex::new(Vec::new()));
        // The authority key of this server: fresh each run (the pool is
        // configured without the provider's key, so it is not pinned).
        let secret = loop {
            if let Ok(k) = secp256k1::SecretKey::from_slice(&random_hash()) {
                break k;
            }
        };
        let kp = secp256k1::Keypair::from_secret_key(&secp256k1::Secp256k1::new(), &secret);
        let public = kp.x_only_public_key().0.serialize();
        let secret = secret.secret_bytes();
        let tp = TemplateProvider { addr, tip, next_template, solutions, nbits: cfg.nbits };
        let (tip_rx, sols, nbits) = (tp.tip.subscribe(), tp.solutions.clone(), cfg.nbits);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let (tip_rx, sols) = (tip_rx.clone(), sols.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &public, &secret, tip_rx, sols, nbits).await {
                        warn!(%peer, "template provider connection ended: {e}");
                    }
                });
            }
        });
        if let Some(every) = cfg.block_interval {
            let (tip, next) = (tp.tip.clone(), tp.next_template.clone());
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    if tip.receiver_count() == 0 && tip.is_closed() {
                        break;
                    }
                    advance(&tip, &next);
                }
            });
        }
        Ok(tp)
    }

    /// A new block on the simulated chain: a new tip and its template.
    pub fn new_block(&self) {
        advance(&self.tip, &self.next_template);
    }

    /// The solutions the pool submitted so far.
    pub fn solutions(&self) -> Vec<Solution> {
        self.solutions.lock().clone()
    }

    pub fn nbits(&self) -> u32 {
        self.nbits
    }
}

fn advance(tip: &watch::Sender<Tip>, next: &AtomicU64) {
    tip.send_modify(|t| {
        t.template_id = next.fetch_add(1, Ordering::Relaxed);
        t.prev_hash = random_hash();
        t.ntime = unix_now().max(t.ntime + 1);
        t.height += 1;
    });
}

/// The scriptSig prefix of the coinbase: its height, as BIP 34 wants it.
fn bip34(height: u32) -> Vec<u8> {
    let mut n: Vec<u8> = height.to_le_bytes().to_vec();
    while n.len() > 1 && n[n.len() - 1] == 0 {
        n.pop();
    }
    if n[n.len() - 1] & 0x80 != 0 {
        n.push(0); // keep it positive
    }
    let mut v = vec![n.len() as u8];
    v.extend(n);
    v
}

async fn send(w: &mut noise::Writer, m: TemplateDistributionOwned) -> Result<(), String> {
    let mut buf = Vec::new();
    w.encode(MessageFrame::try_from(m).map_err(|e| format!("{e:?}"))?, &mut buf)?;
    tokio::io::AsyncWriteExt::write_all(&mut w.io, &buf).await.map_err(|e| e.to_string())
}

async fn send_tip(w: &mut noise::Writer, t: &Tip, nbits: u32) -> Result<(), String> {
    let new = NewTemplateOwned {
        template_id: t.template_id,
        future_template: true,
        version: 0x2000_0000,
        coinbase_tx_version: 2,
        coinbase_prefix: bip34(t.height).try_into().map_err(|e| format!("{e:?}"))?,
        coinbase_tx_input_sequence: 0xffff_ffff,
        coinbase_tx_value_remaining: 312_500_000,
        coinbase_tx_outputs_count: 0,
        coinbase_tx_outputs: Vec::new().try_into().map_err(|e| format!("{e:?}"))?,
        coinbase_tx_locktime: 0,
        merkle_path: Vec::<U256Owned>::new().try_into().map_err(|e| format!("{e:?}"))?,
    };
    send(w, TemplateDistributionOwned::NewTemplate(new)).await?;
    let target = crate::share::Target::from_compact(nbits).unwrap_or(crate::share::Target::MAX);
    let snph = SetNewPrevHashOwned {
        template_id: t.template_id,
        prev_hash: U256Owned::from(t.prev_hash),
        header_timestamp: t.ntime,
        n_bits: nbits,
        target: U256Owned::from(target.to_le_bytes()),
    };
    send(w, TemplateDistributionOwned::SetNewPrevHash(snph)).await
}

async fn serve(
    stream: tokio::net::TcpStream,
    public: &[u8; 32],
    secret: &[u8; 32],
    mut tip: watch::Receiver<Tip>,
    sols: Arc<Mutex<Vec<Solution>>>,
    nbits: u32,
) -> Result<(), String> {
    let (mut r, mut w) = noise::accept(stream, public, secret, Duration::from_secs(10)).await?;
    // SetupConnection first.
    let (h, mut p) = r.read_frame().await?;
    match AnyMessage::try_from((h, p.as_mut_slice())) {
        Ok(AnyMessage::Common(CommonMessages::SetupConnection(_))) => {}
        other => return Err(format!("expected SetupConnection, got {:?}", other.map(|m| m.to_string()))),
    }
    let ok = CommonMessagesOwned::SetupConnectionSuccess(SetupConnectionSuccess { used_version: 2, flags: 0 });
    let mut buf = Vec::new();
    w.encode(MessageFrame::try_from(ok).map_err(|e| format!("{e:?}"))?, &mut buf)?;
    tokio::io::AsyncWriteExt::write_all(&mut w.io, &buf).await.map_err(|e| e.to_string())?;
    let first = tip.borrow_and_update().clone();
    send_tip(&mut w, &first, nbits).await?;
    // Block headers of the templates sent, to check solutions against.
    let mut sent = vec![first];
    loop {
        tokio::select! {
            changed = tip.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let t = tip.borrow_and_update().clone();
                send_tip(&mut w, &t, nbits).await?;
                sent.push(t);
                let excess = sent.len().saturating_sub(16);
                sent.drain(..excess);
            }
            frame = r.read_frame() => {
                let (h, mut p) = frame?;
                let Ok(AnyMessage::TemplateDistribution(m)) = AnyMessage::try_from((h, p.as_mut_slice())) else {
                    continue;
                };
                if let TemplateDistribution::SubmitSolution(s) = m {
                    let Some(t) = sent.iter().find(|t| t.template_id == s.template_id) else {
                        warn!(template = s.template_id, "solution for a template never sent");
                        continue;
                    };
                    let sol = check(t, nbits, s.version, s.header_timestamp, s.header_nonce, s.coinbase_tx.as_ref());
                    info!(template = sol.template_id, hash = %sol.hash, valid = sol.valid, "SubmitSolution");
                    println!("solution template {} hash {} valid {}", sol.template_id, sol.hash, sol.valid);
                    sols.lock().push(sol);
                }
            }
        }
    }
}

/// Rebuild the block header of a solution (the coinbase is the only
/// transaction, so its txid is the merkle root) and check its hash.
fn check(t: &Tip, nbits: u32, version: u32, ntime: u32, nonce: u32, coinbase: &[u8]) -> Solution {
    let tx = bitcoin::Transaction::consensus_decode(&mut &coinbase[..]);
    let Ok(tx) = tx else {
        return Solution { template_id: t.template_id, hash: "undecodable coinbase".into(), valid: false };
    };
    let header = bitcoin::block::Header {
        version: bitcoin::block::Version::from_consensus(version as i32),
        prev_blockhash: bitcoin::BlockHash::from_byte_array(t.prev_hash),
        merkle_root: bitcoin::TxMerkleNode::from_byte_array(tx.compute_txid().to_byte_array()),
        time: ntime,
        bits: bitcoin::CompactTarget::from_consensus(nbits),
        nonce,
    };
    let hash = header.block_hash();
    let target = crate::share::Target::from_compact(nbits).unwrap_or(crate::share::Target::MAX);
    let valid = target.is_met_by(&crate::share::Hash256(hash.to_byte_array()));
    Solution { template_id: t.template_id, hash: hash.to_string(), valid }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bip34_heights_are_minimal_positive_pushes() {
        for (h, want) in
            [(1u32, "0101"), (127, "017f"), (128, "028000"), (255, "02ff00"), (256, "020001"), (840_000, "0340d10c")]
        {
            assert_eq!(hex::encode(bip34(h)), want, "{h}");
        }
    }
}
