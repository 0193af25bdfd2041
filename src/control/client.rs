//! A control-protocol client, used by `sluice ctl`, the benches and the
//! tests. Its methods take and give the protocol's types ([`crate::api`]);
//! the JSON-RPC envelope is this file's business alone.

use crate::api::{
    Amount, Matched, Plan, Protection, ResumeAll, Resuming, SetBudget, SetProtection, Stamped, Status, StatusParams,
    Version,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp { addr: SocketAddr, token: Option<String> },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "tcp://{addr}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot reach the control socket {0}: {1} (is sluice running? give its config with -c CONFIG, or its socket with --socket PATH)"
    )]
    Connect(String, std::io::Error),
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("sluice answered with error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("sluice closed the control connection")]
    Closed,
    #[error("unreadable answer: {0}")]
    Bad(String),
}

type Reader = Box<dyn tokio::io::AsyncBufRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

pub struct Client {
    r: Reader,
    w: Writer,
    token: Option<String>,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Client {
    pub async fn connect(t: &Target) -> Result<Client, ClientError> {
        let (r, w, token): (Reader, Writer, _) = match t {
            Target::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(|e| ClientError::Connect(t.to_string(), e))?;
                let (r, w) = s.into_split();
                (Box::new(BufReader::new(r)), Box::new(w), None)
            }
            Target::Tcp { addr, token } => {
                let s =
                    tokio::net::TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(t.to_string(), e))?;
                let (r, w) = s.into_split();
                (Box::new(BufReader::new(r)), Box::new(w), token.clone())
            }
        };
        Ok(Client { r, w, token, next_id: 1, events: VecDeque::new() })
    }

    async fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.r.read_line(&mut line).await? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Bad(e.to_string()))
    }

    /// Send a request and wait for its answer as it came on the wire;
    /// events that arrive meanwhile are kept for [`Client::next_event`].
    /// The typed methods below are what a program uses; this is for tests
    /// of the wire itself.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        if let Some(t) = &self.token {
            req["auth"] = format!("Bearer {t}").into();
        }
        self.w.write_all((req.to_string() + "\n").as_bytes()).await?;
        loop {
            let v = self.read().await?;
            if v.get("method").and_then(Value::as_str) == Some("event") {
                self.events.push_back(v["params"].clone());
                continue;
            }
            if v["id"] != json!(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(ClientError::Rpc {
                    code: e["code"].as_i64().unwrap_or(0),
                    message: e["message"].as_str().unwrap_or_default().to_owned(),
                });
            }
            return Ok(v["result"].clone());
        }
    }

    /// A request whose answer is read as `T`.
    async fn typed<T: DeserializeOwned>(&mut self, method: &str, params: impl Serialize) -> Result<T, ClientError> {
        let params = serde_json::to_value(params).map_err(|e| ClientError::Bad(e.to_string()))?;
        let v = self.call(method, params).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Bad(format!("{method}: {e}")))
    }

    pub async fn version(&mut self) -> Result<Version, ClientError> {
        self.typed("version", Value::Null).await
    }

    pub async fn status(&mut self, miners: bool) -> Result<Status, ClientError> {
        self.typed("status", StatusParams { miners }).await
    }

    pub async fn set_budget(&mut self, b: &SetBudget) -> Result<Plan, ClientError> {
        self.typed("set_budget", b).await
    }

    pub async fn resume_all(&mut self, reason: &str) -> Result<Resuming, ClientError> {
        self.typed("resume_all", ResumeAll { reason: reason.into() }).await
    }

    pub async fn set_protection(&mut self, pattern: &str, state: Protection) -> Result<Matched, ClientError> {
        self.typed("set_protection", SetProtection { pattern: pattern.into(), state }).await
    }

    /// Ask for events; read them with [`Client::event`].
    pub async fn subscribe(&mut self) -> Result<(), ClientError> {
        self.call("subscribe", Value::Null).await.map(drop)
    }

    /// The next event, typed.
    pub async fn event(&mut self) -> Result<Stamped, ClientError> {
        let v = self.next_event().await?;
        serde_json::from_value(v).map_err(|e| ClientError::Bad(format!("event: {e}")))
    }

    /// The next event (after `subscribe`), as it came on the wire.
    pub async fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let v = self.read().await?;
            if v.get("method").and_then(Value::as_str) == Some("event") {
                return Ok(v["params"].clone());
            }
        }
    }
}

/// The forms `parse_amount` takes, for its errors.
const AMOUNT_FORMS: &str = "a power with its unit (1500W, 800kW, 2.4MW, 1.2GW) or a share of the fleet (60%)";

/// A budget from a human amount: `2.4MW`, `800kW`, `1500W` or `60%`.
/// Refused: a bare number (`2.4` meant as megawatts must not become
/// 2.4 W), and `mW`/`mw`: an `m` is milli where `M` is mega, six orders of
/// magnitude apart, so a lower-case `m` is never guessed at. The watt's
/// `W` and the `k` and `G` prefixes mean one thing in either case.
pub fn parse_amount(s: &str) -> Result<Amount, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let f: f64 = p.trim().parse().map_err(|_| format!("{s:?} is not a percentage"))?;
        if !(0.0..=100.0).contains(&f) {
            return Err(format!("{s:?}: a percentage is between 0 and 100"));
        }
        return Amount::new(None, Some(f / 100.0));
    }
    let not_power = || format!("{s:?} is not a power: give {AMOUNT_FORMS}");
    let Some(rest) = t.strip_suffix(['W', 'w']) else {
        return Err(match t.parse::<f64>() {
            Ok(_) => format!("{s:?} has no unit: give {AMOUNT_FORMS}"),
            Err(_) => not_power(),
        });
    };
    let (num, mult) = match rest.chars().last() {
        Some('k' | 'K') => (&rest[..rest.len() - 1], 1e3),
        Some('M') => (&rest[..rest.len() - 1], 1e6),
        Some('G' | 'g') => (&rest[..rest.len() - 1], 1e9),
        Some('m') => {
            return Err(format!(
                "{s:?}: a lower-case m is milli (mW, thousandths of a watt); megawatts are MW: give {AMOUNT_FORMS}"
            ))
        }
        _ => (rest, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| not_power())?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?}: power must be >= 0"));
    }
    Amount::new(Some(v * mult), None)
}

/// The forms a span takes, for every error about one.
const SPAN_FORMS: &str = "a span with its unit, such as 30s, 30m, 2h or 1h30m";

/// A span from a human (`what`: lease, ramp): humantime's forms. A bare
/// number is refused, and so is a capital `M`, which is months to the
/// parser and minutes to a person; each error gives the forms.
fn parse_span(what: &str, s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if t.parse::<f64>().is_ok() {
        return Err(format!("{what} {s:?} has no unit: give {SPAN_FORMS}"));
    }
    if t.contains('M') {
        return Err(format!("{what} {s:?}: M is months; minutes are a lower-case m: give {SPAN_FORMS}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("{what} {s:?}: {e}; give {SPAN_FORMS}"))
}

/// A lease from a human span: `30s`, `30m`, `2h`, `1h30m`. Refused: a
/// bare number, `M`, one shorter than [`crate::api::MIN_LEASE_S`] or
/// longer than [`crate::api::MAX_LEASE_S`] (30 days).
pub fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_span("lease", s)?;
    let (floor, cap) = (crate::api::MIN_LEASE_S, crate::api::MAX_LEASE_S);
    if d.as_secs_f64() < floor {
        return Err(format!(
            "lease {s:?} is shorter than the shortest a plan can act on, {floor} s: give {SPAN_FORMS}"
        ));
    }
    if d.as_secs_f64() > cap {
        return Err(format!(
            "lease {s:?} is longer than 30 days, the longest a lease may be (a budget meant to hold until changed takes no --lease): give {SPAN_FORMS}"
        ));
    }
    Ok(d)
}

/// A ramp's span (how long resuming the parked miners takes), in the
/// forms and wording of a lease's.
pub fn parse_ramp(s: &str) -> Result<std::time::Duration, String> {
    parse_span("ramp", s)
}

/// Watts for people, the same everywhere: to the watt under 1 kW, else
/// kW or MW to two decimals without trailing zeros (3,250 W is 3.25 kW,
/// 2.4 MW, 800 kW); never "-0".
pub fn fmt_watts(w: f64) -> String {
    let (v, unit, decimals) = match w.abs() {
        a if a >= 999_995.0 => (w / 1e6, "MW", 2),
        a if a >= 999.5 => (w / 1e3, "kW", 2),
        _ => (w, "W", 0),
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    if s == "-0" {
        s = "0".into();
    }
    format!("{s} {unit}")
}

/// Hashrate for people.
pub fn fmt_hashrate(h: f64) -> String {
    let units = [("EH/s", 1e18), ("PH/s", 1e15), ("TH/s", 1e12), ("GH/s", 1e9), ("MH/s", 1e6), ("kH/s", 1e3)];
    for (u, m) in units {
        if h >= m {
            return format!("{:.2} {u}", h / m);
        }
    }
    format!("{h:.0} H/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket nothing listens on: the error says how to point at the
    /// right one.
    #[tokio::test]
    async fn an_unreachable_socket_says_how_to_name_the_right_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::connect(&Target::Unix(dir.path().join("sluice.sock"))).await.err().unwrap().to_string();
        assert!(e.starts_with("cannot reach the control socket "), "{e}");
        assert!(e.contains("-c CONFIG") && e.contains("--socket PATH"), "{e}");
    }

    #[test]
    fn human_amounts() {
        assert_eq!(parse_amount("2.4MW").unwrap(), Amount::Watts(2.4e6));
        assert_eq!(parse_amount("800kW").unwrap(), Amount::Watts(800e3));
        assert_eq!(parse_amount("1500 W").unwrap(), Amount::Watts(1500.0));
        let e = parse_amount("1500").unwrap_err();
        assert!(e.contains("no unit") && e.contains("2.4MW"), "{e}");
        for bad in ["lots", "2.4 MWh", "-5kW", "inf W", "150%", "W", "5 kWW", "3 MB"] {
            assert!(parse_amount(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_amount("60%").unwrap(), Amount::Fraction(0.6));
        assert!(parse_amount("lots").is_err());
        assert!(parse_amount("150%").is_err());
        assert!(parse_amount("-3kW").is_err());
        assert_eq!(fmt_hashrate(1.2e6), "1.20 MH/s");
    }

    /// Case changes a unit only where it changes the meaning: `m` (milli)
    /// against `M` (mega) is refused, not guessed; W, k and G read alike.
    #[test]
    fn units_where_case_matters() {
        for (typed, want) in [
            ("30MW", Some(30e6)),
            ("30 MW", Some(30e6)),
            ("30Mw", Some(30e6)),
            ("30mW", None),
            ("30mw", None),
            ("30 mW", None),
            ("800kW", Some(800e3)),
            ("800kw", Some(800e3)),
            ("800KW", Some(800e3)),
            ("1.2GW", Some(1.2e9)),
            ("1.2gw", Some(1.2e9)),
            ("1500W", Some(1500.0)),
            ("1500w", Some(1500.0)),
            ("1500", None),
        ] {
            assert_eq!(parse_amount(typed).ok(), want.map(Amount::Watts), "{typed}");
        }
        let e = parse_amount("30mW").unwrap_err();
        assert!(e.contains("milli") && e.contains("MW") && e.contains("60%"), "{e}");
    }

    #[test]
    fn leases_take_a_unit_and_the_floor() {
        use std::time::Duration;
        for (typed, want) in [
            ("30m", Some(Duration::from_secs(1800))),
            ("30s", Some(Duration::from_secs(30))),
            ("2h", Some(Duration::from_secs(7200))),
            ("1h30m", Some(Duration::from_secs(5400))),
            ("1s", Some(Duration::from_secs(1))),
            ("30days", Some(Duration::from_secs(30 * 86_400))),
            ("30", None),
            ("30ms", None),
            ("999ms", None),
            ("soon", None),
            // Issue 36.1: months to the parser, minutes to a person.
            ("30M", None),
            ("1h30M", None),
            ("31days", None),
            ("30months", None),
        ] {
            assert_eq!(parse_lease(typed).ok(), want, "{typed}");
        }
        let e = parse_lease("30M").unwrap_err();
        assert!(e.contains("months") && e.contains("lower-case m"), "{e}");
        let e = parse_lease("31days").unwrap_err();
        assert!(e.contains("30 days") && e.contains("no --lease"), "{e}");
        // One wording for a lease and a ramp.
        for (lease, ramp) in [("30", "30"), ("30M", "30M"), ("soon", "soon")] {
            let (l, r) = (parse_lease(lease).unwrap_err(), parse_ramp(ramp).unwrap_err());
            assert_eq!(l.replacen("lease", "ramp", 1), r, "{lease}");
        }
        assert_eq!(parse_ramp("5m"), Ok(Duration::from_secs(300)));
        let e = parse_lease("30").unwrap_err();
        assert!(e.contains("no unit") && e.contains("30s") && e.contains("30m") && e.contains("2h"), "{e}");
        let e = parse_lease("30ms").unwrap_err();
        assert!(e.contains("shorter") && e.contains("1 s"), "{e}");
    }

    /// One rounding everywhere the CLI prints watts.
    #[test]
    fn watts_read_the_same_everywhere() {
        for (w, want) in [
            (3250.0, "3.25 kW"),
            (2.4e6, "2.4 MW"),
            (800_000.0, "800 kW"),
            (23_776.0, "23.78 kW"),
            (950.0, "950 W"),
            (999.4, "999 W"),
            (999.6, "1 kW"),
            (999_999.0, "1 MW"),
            (0.0, "0 W"),
            (-0.0, "0 W"),
            (-0.4, "0 W"),
            (-3250.0, "-3.25 kW"),
            (1_234_567.0, "1.23 MW"),
        ] {
            assert_eq!(fmt_watts(w), want, "{w}");
        }
    }
}
