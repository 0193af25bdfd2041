//! Outbound lines. Each function appends one complete `\n`-terminated line to
//! a buffer the caller reuses, so a connection writes with one syscall per
//! event and no per-message allocation.

use crate::share::{Difficulty, PrevHash};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use std::io::Write;

fn id_or_null(id: Option<&RawValue>) -> &str {
    id.map(RawValue::get).unwrap_or("null")
}

/// `{"id":<id>,"result":<result>,"error":null}`
pub fn result<T: Serialize + ?Sized>(buf: &mut Vec<u8>, id: Option<&RawValue>, result: &T) {
    buf.extend_from_slice(b"{\"id\":");
    buf.extend_from_slice(id_or_null(id).as_bytes());
    buf.extend_from_slice(b",\"result\":");
    serde_json::to_writer(&mut *buf, result).expect("serialising to a Vec cannot fail");
    buf.extend_from_slice(b",\"error\":null}\n");
}

/// `{"id":<id>,"result":null,"error":[code,"message",null]}`
pub fn error(buf: &mut Vec<u8>, id: Option<&RawValue>, code: i32, message: &str) {
    buf.extend_from_slice(b"{\"id\":");
    buf.extend_from_slice(id_or_null(id).as_bytes());
    buf.extend_from_slice(b",\"result\":null,\"error\":");
    serde_json::to_writer(&mut *buf, &(code, message, ())).expect("vec");
    buf.extend_from_slice(b"}\n");
}

/// A notification from the server side: `{"id":null,"method":..,"params":..}`.
pub fn notification<P: Serialize + ?Sized>(buf: &mut Vec<u8>, method: &str, params: &P) {
    buf.extend_from_slice(b"{\"id\":null,\"method\":\"");
    buf.extend_from_slice(method.as_bytes());
    buf.extend_from_slice(b"\",\"params\":");
    serde_json::to_writer(&mut *buf, params).expect("vec");
    buf.extend_from_slice(b"}\n");
}

/// A numbered request from the client side.
pub fn request<P: Serialize + ?Sized>(buf: &mut Vec<u8>, id: u64, method: &str, params: &P) {
    let _ = write!(buf, "{{\"id\":{id},\"method\":\"{method}\",\"params\":");
    serde_json::to_writer(&mut *buf, params).expect("vec");
    buf.extend_from_slice(b"}\n");
}

pub fn set_difficulty(buf: &mut Vec<u8>, d: Difficulty) {
    notification(buf, "mining.set_difficulty", &[d.get()]);
}

pub fn set_extranonce(buf: &mut Vec<u8>, extranonce1: &[u8], extranonce2_size: usize) {
    notification(buf, "mining.set_extranonce", &(hex::encode(extranonce1), extranonce2_size));
}

pub fn set_version_mask(buf: &mut Vec<u8>, mask: u32) {
    notification(buf, "mining.set_version_mask", &[format!("{mask:08x}")]);
}

pub fn reconnect(buf: &mut Vec<u8>, host: &str, port: u16, wait_s: u64) {
    notification(buf, "client.reconnect", &(host, port, wait_s));
}

/// The result of `mining.subscribe`: subscription ids, extranonce1 and the
/// extranonce2 size.
pub fn subscribe_result(
    buf: &mut Vec<u8>,
    id: Option<&RawValue>,
    session: &str,
    extranonce1: &[u8],
    extranonce2_size: usize,
) {
    let subs = [["mining.set_difficulty", session], ["mining.notify", session]];
    result(buf, id, &(subs, hex::encode(extranonce1), extranonce2_size));
}

/// The fields of one `mining.notify`, borrowed, to serialise once per job.
pub struct NotifyFields<'a> {
    pub job_id: &'a str,
    pub prevhash: PrevHash,
    pub coinb1: &'a [&'a [u8]],
    pub coinb2: &'a [u8],
    pub merkle_branch: &'a [[u8; 32]],
    pub version: u32,
    pub nbits: u32,
    pub ntime: u32,
    pub clean_jobs: bool,
}

/// Serialise a `mining.notify` line into shared bytes: the same allocation
/// is written to every miner on the job.
pub fn notify(n: &NotifyFields<'_>) -> Bytes {
    let coinb1: String = n.coinb1.iter().map(hex::encode).collect();
    let branch: Vec<String> = n.merkle_branch.iter().map(hex::encode).collect();
    let params = (
        n.job_id,
        hex::encode(n.prevhash.to_stratum_bytes()),
        coinb1,
        hex::encode(n.coinb2),
        branch,
        format!("{:08x}", n.version),
        format!("{:08x}", n.nbits),
        format!("{:08x}", n.ntime),
        n.clean_jobs,
    );
    let mut buf = Vec::with_capacity(256 + 2 * (n.coinb2.len() + 64 * n.merkle_branch.len()));
    notification(&mut buf, "mining.notify", &params);
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes() {
        let id = serde_json::from_str::<&RawValue>("7").unwrap();
        let mut b = Vec::new();
        result(&mut b, Some(id), &true);
        error(&mut b, Some(id), 23, "Low difficulty share");
        set_difficulty(&mut b, Difficulty::new(0.5).unwrap());
        set_version_mask(&mut b, 0x1fffe000);
        set_extranonce(&mut b, &[1, 2], 6);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            concat!(
                "{\"id\":7,\"result\":true,\"error\":null}\n",
                "{\"id\":7,\"result\":null,\"error\":[23,\"Low difficulty share\",null]}\n",
                "{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[0.5]}\n",
                "{\"id\":null,\"method\":\"mining.set_version_mask\",\"params\":[\"1fffe000\"]}\n",
                "{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"0102\",6]}\n",
            )
        );
    }

    #[test]
    fn string_ids_are_echoed_verbatim() {
        let id = serde_json::from_str::<&RawValue>("\"abc\"").unwrap();
        let mut b = Vec::new();
        result(&mut b, Some(id), &true);
        assert_eq!(b, b"{\"id\":\"abc\",\"result\":true,\"error\":null}\n");
    }
}
