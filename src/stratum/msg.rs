//! Typed Stratum V1 messages, parsed in two steps: a borrowed envelope
//! (id/method/params/result/error as raw JSON slices of the line), then the
//! params of the one method that matters. Hot-path fields (`mining.submit`)
//! borrow from the read buffer; cold-path ones (a new job) are owned.

use crate::share::PrevHash;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("not JSON-RPC: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad params for {method}: {why}")]
    Params { method: &'static str, why: String },
    #[error("message is neither a request nor a response")]
    Shape,
}

fn bad(method: &'static str, why: impl fmt::Display) -> WireError {
    WireError::Params { method, why: why.to_string() }
}

/// The JSON-RPC envelope, borrowing from the line.
#[derive(Deserialize, Debug)]
pub struct Envelope<'a> {
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    pub fn parse(line: &'a [u8]) -> Result<Self, WireError> {
        Ok(serde_json::from_slice(line)?)
    }
    /// The id as a number, for responses to requests we numbered.
    pub fn numeric_id(&self) -> Option<u64> {
        self.id.and_then(|r| r.get().parse().ok())
    }
    fn params_str(&self) -> &'a str {
        self.params.map(RawValue::get).unwrap_or("[]")
    }
}

/// `mining.submit` params: worker, job id, extranonce2, ntime, nonce and the
/// optional BIP310 version bits. All hex stays undecoded until checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Submit<'a> {
    pub worker: Cow<'a, str>,
    pub job_id: Cow<'a, str>,
    pub extranonce2: &'a str,
    pub ntime: &'a str,
    pub nonce: &'a str,
    pub version_bits: Option<&'a str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Submit<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Submit<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("[worker, job_id, extranonce2, ntime, nonce(, version_bits)]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Submit<'a>, A::Error> {
                let missing = |i| de::Error::invalid_length(i, &"5 or 6 params");
                let worker: Cow<'a, str> = s.next_element()?.ok_or_else(|| missing(0))?;
                let job_id: Cow<'a, str> = s.next_element()?.ok_or_else(|| missing(1))?;
                let extranonce2: &'a str = s.next_element()?.ok_or_else(|| missing(2))?;
                let ntime: &'a str = s.next_element()?.ok_or_else(|| missing(3))?;
                let nonce: &'a str = s.next_element()?.ok_or_else(|| missing(4))?;
                let version_bits: Option<&'a str> = s.next_element::<Option<&'a str>>()?.flatten();
                if s.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(7, &"5 or 6 params"));
                }
                Ok(Submit { worker, job_id, extranonce2, ntime, nonce, version_bits })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// BIP310 `mining.configure` request, reduced to what we act on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Configure {
    pub extensions: Vec<String>,
    pub version_rolling_mask: Option<u32>,
    pub version_rolling_min_bits: Option<u32>,
    pub minimum_difficulty: Option<f64>,
}

/// A request a miner sends to us.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientRequest<'a> {
    Configure(Configure),
    /// `session` is the subscription id of an earlier session the miner
    /// asks to resume (`params[1]`), if any.
    Subscribe {
        user_agent: Option<String>,
        session: Option<String>,
    },
    Authorize {
        user: String,
    },
    ExtranonceSubscribe,
    SuggestDifficulty(f64),
    Submit(Submit<'a>),
    Ping,
    GetVersion,
    Unknown(String),
}

fn hex_mask(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn number_or_string(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn parse_configure(params: &str) -> Result<Configure, WireError> {
    let (exts, opts): (Vec<String>, Option<serde_json::Map<String, serde_json::Value>>) =
        serde_json::from_str(params).map_err(|e| bad("mining.configure", e))?;
    let opts = opts.unwrap_or_default();
    let mut c = Configure { extensions: exts, ..Default::default() };
    if let Some(m) = opts.get("version-rolling.mask") {
        c.version_rolling_mask =
            Some(m.as_str().and_then(hex_mask).ok_or_else(|| bad("mining.configure", "bad mask"))?);
    }
    c.version_rolling_min_bits = opts.get("version-rolling.min-bit-count").and_then(number_or_string).map(|v| v as u32);
    c.minimum_difficulty = opts.get("minimum-difficulty.value").and_then(number_or_string);
    Ok(c)
}

impl<'a> ClientRequest<'a> {
    /// Parse the request carried by an envelope (which must have a method).
    pub fn from_envelope(env: &Envelope<'a>) -> Result<Self, WireError> {
        let method = env.method.as_deref().ok_or(WireError::Shape)?;
        let params = env.params_str();
        Ok(match method {
            "mining.submit" => {
                let p: Submit<'a> = serde_json::from_str(params).map_err(|e| bad("mining.submit", e))?;
                ClientRequest::Submit(p)
            }
            "mining.subscribe" => {
                let p: Vec<serde_json::Value> = serde_json::from_str(params).unwrap_or_default();
                let user_agent = p.first().and_then(|v| v.as_str()).map(str::to_owned);
                let session = p.get(1).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
                ClientRequest::Subscribe { user_agent, session }
            }
            "mining.authorize" => {
                let p: Vec<serde_json::Value> = serde_json::from_str(params).map_err(|e| bad("mining.authorize", e))?;
                let user = p.first().and_then(|v| v.as_str()).ok_or_else(|| bad("mining.authorize", "missing user"))?;
                ClientRequest::Authorize { user: user.to_owned() }
            }
            "mining.configure" => ClientRequest::Configure(parse_configure(params)?),
            "mining.extranonce.subscribe" => ClientRequest::ExtranonceSubscribe,
            "mining.suggest_difficulty" => {
                let p: Vec<serde_json::Value> =
                    serde_json::from_str(params).map_err(|e| bad("mining.suggest_difficulty", e))?;
                let d = p
                    .first()
                    .and_then(number_or_string)
                    .ok_or_else(|| bad("mining.suggest_difficulty", "not a number"))?;
                ClientRequest::SuggestDifficulty(d)
            }
            "mining.ping" => ClientRequest::Ping,
            "client.get_version" => ClientRequest::GetVersion,
            other => ClientRequest::Unknown(other.to_owned()),
        })
    }
}

/// `mining.notify` params, decoded. Owned: this happens once per job.
#[derive(Debug, Clone, PartialEq)]
pub struct Notify {
    pub job_id: String,
    pub prevhash: PrevHash,
    pub coinb1: Vec<u8>,
    pub coinb2: Vec<u8>,
    pub merkle_branch: Vec<[u8; 32]>,
    pub version: u32,
    pub nbits: u32,
    pub ntime: u32,
    pub clean_jobs: bool,
}

/// Parse an 8-digit big-endian hex u32 as Stratum sends version, nbits,
/// ntime and nonce.
pub fn hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).ok()?;
    Some(b)
}

fn parse_notify(params: &str) -> Result<Notify, WireError> {
    const M: &str = "mining.notify";
    #[allow(clippy::type_complexity)]
    let p: (String, String, String, String, Vec<String>, String, String, String, bool) =
        serde_json::from_str(params).map_err(|e| bad(M, e))?;
    let prev = hex32(&p.1).ok_or_else(|| bad(M, "prevhash"))?;
    let mut branch = Vec::with_capacity(p.4.len());
    for b in &p.4 {
        branch.push(hex32(b).ok_or_else(|| bad(M, "merkle branch"))?);
    }
    Ok(Notify {
        job_id: p.0,
        prevhash: PrevHash::from_stratum_bytes(prev),
        coinb1: hex::decode(&p.2).map_err(|_| bad(M, "coinb1"))?,
        coinb2: hex::decode(&p.3).map_err(|_| bad(M, "coinb2"))?,
        merkle_branch: branch,
        version: hex_u32(&p.5).ok_or_else(|| bad(M, "version"))?,
        nbits: hex_u32(&p.6).ok_or_else(|| bad(M, "nbits"))?,
        ntime: hex_u32(&p.7).ok_or_else(|| bad(M, "ntime"))?,
        clean_jobs: p.8,
    })
}

/// A message a pool sends to us (or we send to a miner).
#[derive(Debug, Clone)]
pub enum ServerMessage<'a> {
    Notify(Notify),
    SetDifficulty(f64),
    SetExtranonce { extranonce1: Vec<u8>, extranonce2_size: usize },
    SetVersionMask(u32),
    Reconnect { host: Option<String>, port: Option<u16>, wait_s: Option<u64> },
    Ping,
    GetVersion,
    ShowMessage(String),
    Response { id: Option<u64>, result: Option<&'a RawValue>, error: Option<&'a RawValue> },
    Unknown(String),
}

impl<'a> ServerMessage<'a> {
    pub fn from_envelope(env: &Envelope<'a>) -> Result<Self, WireError> {
        let Some(method) = env.method.as_deref() else {
            if env.result.is_none() && env.error.is_none() && env.id.is_none() {
                return Err(WireError::Shape);
            }
            let error = env.error.filter(|e| e.get() != "null");
            return Ok(ServerMessage::Response { id: env.numeric_id(), result: env.result, error });
        };
        let params = env.params_str();
        let values = || -> Result<Vec<serde_json::Value>, WireError> { Ok(serde_json::from_str(params)?) };
        Ok(match method {
            "mining.notify" => ServerMessage::Notify(parse_notify(params)?),
            "mining.set_difficulty" => {
                let v = values()?;
                let d =
                    v.first().and_then(number_or_string).ok_or_else(|| bad("mining.set_difficulty", "not a number"))?;
                ServerMessage::SetDifficulty(d)
            }
            "mining.set_extranonce" => {
                let v = values()?;
                let en1 = v.first().and_then(|x| x.as_str()).and_then(|s| hex::decode(s).ok());
                let size = v.get(1).and_then(|x| x.as_u64());
                match (en1, size) {
                    (Some(e), Some(s)) if s <= 32 => {
                        ServerMessage::SetExtranonce { extranonce1: e, extranonce2_size: s as usize }
                    }
                    _ => return Err(bad("mining.set_extranonce", "expected [hex, size]")),
                }
            }
            "mining.set_version_mask" => {
                let v = values()?;
                let m = v.first().and_then(|x| x.as_str()).and_then(hex_mask);
                ServerMessage::SetVersionMask(m.ok_or_else(|| bad("mining.set_version_mask", "bad mask"))?)
            }
            "client.reconnect" => {
                let v = values().unwrap_or_default();
                ServerMessage::Reconnect {
                    host: v.first().and_then(|x| x.as_str()).filter(|s| !s.is_empty()).map(str::to_owned),
                    port: v
                        .get(1)
                        .and_then(|x| x.as_u64().or_else(|| x.as_str()?.parse().ok()))
                        .and_then(|p| u16::try_from(p).ok()),
                    wait_s: v.get(2).and_then(|x| x.as_u64()),
                }
            }
            "mining.ping" => ServerMessage::Ping,
            "client.get_version" => ServerMessage::GetVersion,
            "client.show_message" => {
                let v = values().unwrap_or_default();
                ServerMessage::ShowMessage(v.first().and_then(|x| x.as_str()).unwrap_or_default().to_owned())
            }
            other => ServerMessage::Unknown(other.to_owned()),
        })
    }
}

/// The useful part of a `mining.subscribe` result.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    pub extranonce1: Vec<u8>,
    pub extranonce2_size: usize,
    /// The subscription id paired with `mining.notify`, which a client sends
    /// back as `params[1]` of its next subscribe to resume the session (and
    /// keep its extranonce1). None when the pool gives none.
    pub session_id: Option<String>,
}

/// Longest subscription id we keep: pools use an extranonce1 or a short token.
const MAX_SESSION_ID: usize = 64;

pub fn parse_subscribe_result(result: &RawValue) -> Result<Subscribed, WireError> {
    const M: &str = "mining.subscribe";
    let v: Vec<serde_json::Value> = serde_json::from_str(result.get()).map_err(|e| bad(M, e))?;
    let en1 = v.get(1).and_then(|x| x.as_str()).ok_or_else(|| bad(M, "missing extranonce1"))?;
    let en1 = hex::decode(en1).map_err(|_| bad(M, "extranonce1 not hex"))?;
    let size = v.get(2).and_then(|x| x.as_u64()).ok_or_else(|| bad(M, "missing extranonce2 size"))?;
    if size > 32 || en1.len() > 32 {
        return Err(bad(M, "extranonce sizes out of range"));
    }
    // Either a list of [method, id] pairs or, from some pools, one flat pair.
    let pair_id = |p: &serde_json::Value| match p.as_array().map(Vec::as_slice) {
        Some([m, id, ..]) if m == "mining.notify" => id.as_str().map(str::to_owned),
        _ => None,
    };
    let session_id = v
        .first()
        .and_then(|subs| pair_id(subs).or_else(|| subs.as_array()?.iter().find_map(pair_id)))
        .filter(|s| !s.is_empty() && s.len() <= MAX_SESSION_ID);
    Ok(Subscribed { extranonce1: en1, extranonce2_size: size as usize, session_id })
}

/// The version-rolling mask from a `mining.configure` result, if granted.
pub fn parse_configure_result(result: &RawValue) -> Option<u32> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(result.get()).ok()?;
    if v.get("version-rolling").and_then(|x| x.as_bool()) != Some(true) {
        return None;
    }
    v.get("version-rolling.mask").and_then(|x| x.as_str()).and_then(hex_mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(line: &str) -> ClientRequest<'_> {
        let env = Envelope::parse(line.as_bytes()).unwrap();
        // Re-borrow through a leak-free path: the envelope borrows `line`.
        let env: Envelope<'_> = env;
        ClientRequest::from_envelope(&env).unwrap()
    }

    #[test]
    fn submit_five_and_six_params() {
        let r = client(r#"{"id":4,"method":"mining.submit","params":["w.1","1a","00000001","59ec866e","b3f6ad84"]}"#);
        let ClientRequest::Submit(s) = r else { panic!() };
        assert_eq!((s.worker.as_ref(), s.job_id.as_ref(), s.version_bits), ("w.1", "1a", None));
        let r =
            client(r#"{"id":4,"method":"mining.submit","params":["w","1a","00","59ec866e","b3f6ad84","00800000"]}"#);
        let ClientRequest::Submit(s) = r else { panic!() };
        assert_eq!(s.version_bits, Some("00800000"));
        let env = Envelope::parse(br#"{"id":4,"method":"mining.submit","params":["w","1a","00","59ec866e"]}"#).unwrap();
        assert!(ClientRequest::from_envelope(&env).is_err());
        let env =
            Envelope::parse(br#"{"id":4,"method":"mining.submit","params":["w","1","0","0","0","0","0"]}"#).unwrap();
        assert!(ClientRequest::from_envelope(&env).is_err());
    }

    #[test]
    fn configure_as_antminer_sends_it() {
        let r = client(
            r#"{"id":1,"method":"mining.configure","params":[["version-rolling","minimum-difficulty"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2,"minimum-difficulty.value":2048}]}"#,
        );
        assert_eq!(
            r,
            ClientRequest::Configure(Configure {
                extensions: vec!["version-rolling".into(), "minimum-difficulty".into()],
                version_rolling_mask: Some(0x1fffe000),
                version_rolling_min_bits: Some(2),
                minimum_difficulty: Some(2048.0),
            })
        );
    }

    #[test]
    fn subscribe_with_and_without_agent_and_unknown_methods() {
        assert_eq!(
            client(r#"{"id":1,"method":"mining.subscribe","params":[]}"#),
            ClientRequest::Subscribe { user_agent: None, session: None }
        );
        assert_eq!(
            client(r#"{"id":1,"method":"mining.subscribe","params":["bmminer/2.0.0","deadbeef"]}"#),
            ClientRequest::Subscribe { user_agent: Some("bmminer/2.0.0".into()), session: Some("deadbeef".into()) }
        );
        assert_eq!(
            client(r#"{"id":1,"method":"mining.frobnicate","params":[]}"#),
            ClientRequest::Unknown("mining.frobnicate".into())
        );
        assert_eq!(
            client(r#"{"id":1,"method":"mining.suggest_difficulty","params":[512]}"#),
            ClientRequest::SuggestDifficulty(512.0)
        );
    }

    #[test]
    fn notify_swaps_prevhash_words() {
        let line = r#"{"id":null,"method":"mining.notify","params":["bf","29fd0d7966b5eaa625b48b7c70c3b311fe039bd100c170900000000000000000","01","02",[],"20000000","1800eb30","59ec866e",true]}"#;
        let env = Envelope::parse(line.as_bytes()).unwrap();
        let ServerMessage::Notify(n) = ServerMessage::from_envelope(&env).unwrap() else { panic!() };
        assert_eq!(hex::encode(n.prevhash.0), "790dfd29a6eab5667c8bb42511b3c370d19b03fe9070c1000000000000000000");
        assert_eq!((n.version, n.nbits, n.ntime, n.clean_jobs), (0x20000000, 0x1800eb30, 0x59ec866e, true));
    }

    #[test]
    fn responses_and_subscribe_result() {
        let line =
            br#"{"id":2,"result":[[["mining.set_difficulty","1"],["mining.notify","1"]],"08000002",4],"error":null}"#;
        let env = Envelope::parse(line).unwrap();
        let ServerMessage::Response { id, result, error } = ServerMessage::from_envelope(&env).unwrap() else {
            panic!()
        };
        assert_eq!((id, error.is_none()), (Some(2), true));
        let s = parse_subscribe_result(result.unwrap()).unwrap();
        assert_eq!((s.extranonce1, s.extranonce2_size, s.session_id.as_deref()), (vec![8, 0, 0, 2], 4, Some("1")));
        let line = br#"{"id":3,"result":null,"error":[21,"Job not found",null]}"#;
        let env = Envelope::parse(line).unwrap();
        assert!(matches!(ServerMessage::from_envelope(&env).unwrap(), ServerMessage::Response { error: Some(_), .. }));
    }
}
