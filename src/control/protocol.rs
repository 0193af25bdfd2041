//! The control protocol's requests, parsed from JSON-RPC 2.0 lines (pure).
//! See proto/control-v1.md.

use crate::api::{Protection, ResumeAll, SetBudget, SetProtection, StatusParams};
use crate::curtail::controller::{BudgetParams, Scope};
use crate::curtail::ControlReq;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

pub const PROTOCOL: &str = "sluice-control/1";
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const UNAUTHORIZED: i64 = -32001;
/// Cluster mode: etcd did not take the change; nothing was changed.
pub const UNAVAILABLE: i64 = -32002;

#[derive(Debug, Deserialize)]
pub struct RpcRequest {
    pub jsonrpc: Option<String>,
    #[serde(default)]
    pub id: Value,
    pub method: String,
    #[serde(default)]
    pub params: Value,
    /// `Bearer <token>`, required on TCP.
    pub auth: Option<String>,
}

/// What a request asks for.
#[derive(Debug)]
pub enum Call {
    Version,
    Subscribe,
    Control(ControlReq),
}

#[derive(Debug, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

/// The controller's errors as JSON-RPC errors: the codes live here, with
/// the protocol, not in the controller.
impl From<&crate::curtail::ControlError> for RpcError {
    fn from(e: &crate::curtail::ControlError) -> RpcError {
        use crate::curtail::ControlError::*;
        let code = match e {
            InvalidParams(_) => INVALID_PARAMS,
            Stopped => INTERNAL_ERROR,
            Unavailable(_) => UNAVAILABLE,
        };
        RpcError { code, message: e.to_string() }
    }
}

fn invalid(m: impl Into<String>) -> RpcError {
    RpcError { code: INVALID_PARAMS, message: m.into() }
}

pub fn parse_request(line: &[u8]) -> Result<RpcRequest, (Value, RpcError)> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| (Value::Null, RpcError { code: PARSE_ERROR, message: e.to_string() }))?;
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let r: RpcRequest = serde_json::from_value(v)
        .map_err(|e| (id.clone(), RpcError { code: INVALID_REQUEST, message: e.to_string() }))?;
    if r.jsonrpc.as_deref() != Some("2.0") {
        return Err((id, RpcError { code: INVALID_REQUEST, message: "jsonrpc must be \"2.0\"".into() }));
    }
    Ok(r)
}

/// A method's params; none at all reads as `{}`.
fn params<T: serde::de::DeserializeOwned>(p: &Value) -> Result<T, RpcError> {
    let p = if p.is_null() { json!({}) } else { p.clone() };
    serde_json::from_value(p).map_err(|e| invalid(e.to_string()))
}

fn secs(name: &str, v: Option<f64>, min: f64, max: f64) -> Result<Option<Duration>, RpcError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= min && s <= max => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(invalid(format!("{name} must be a number of seconds from {min} to {max}, got {s}"))),
    }
}

/// Turn a method and its params into a call.
pub fn parse_call(method: &str, p: &Value) -> Result<Call, RpcError> {
    Ok(match method {
        "version" => Call::Version,
        "subscribe" => Call::Subscribe,
        "status" => Call::Control(ControlReq::Status { miners: params::<StatusParams>(p)?.miners }),
        "set_budget" => {
            let b: SetBudget = params(p)?;
            if b.reason.len() > 256 {
                return Err(invalid("reason is limited to 256 bytes"));
            }
            Call::Control(ControlReq::SetBudget(BudgetParams {
                amount: b.amount,
                scope: Scope::parse(&b.scope).map_err(invalid)?,
                // At least the shortest a plan can act on.
                // At most 30 days: a budget meant to hold takes no lease.
                lease: secs("lease_s", b.lease_s, crate::api::MIN_LEASE_S, crate::api::MAX_LEASE_S)?,
                ramp_up: secs("ramp_up_s", b.ramp_up_s, 0.001, 1e9)?,
                dry_run: b.dry_run,
                reason: b.reason,
                max_listed: b.max_listed.unwrap_or(1000),
            }))
        }
        "resume_all" => Call::Control(ControlReq::ResumeAll { reason: params::<ResumeAll>(p)?.reason }),
        "set_protection" => {
            let x: SetProtection = params(p)?;
            if x.pattern.is_empty() {
                return Err(invalid("pattern is empty"));
            }
            Call::Control(ControlReq::SetProtection { pattern: x.pattern, protected: x.state == Protection::Protected })
        }
        m => return Err(RpcError { code: METHOD_NOT_FOUND, message: format!("unknown method {m:?}") }),
    })
}

pub fn response(id: &Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string() + "\n"
}

pub fn error(id: &Value, e: &RpcError) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}}).to_string() + "\n"
}

pub fn event(ev: &crate::api::Stamped) -> String {
    json!({"jsonrpc": "2.0", "method": "event", "params": ev}).to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Amount;

    #[test]
    fn budgets_parse_and_bad_ones_say_why() {
        let c = parse_call("set_budget", &json!({"watts": 2.4e6, "lease_s": 1800, "reason": "dr"})).unwrap();
        let Call::Control(ControlReq::SetBudget(b)) = c else { panic!() };
        assert_eq!(
            (b.amount, b.scope, b.lease, b.dry_run),
            (Amount::Watts(2.4e6), Scope::Site, Some(Duration::from_secs(1800)), false)
        );
        let c = parse_call("set_budget", &json!({"fraction": 0.6, "scope": "group:hall-a", "dry_run": true})).unwrap();
        let Call::Control(ControlReq::SetBudget(b)) = c else { panic!() };
        assert_eq!((b.amount, b.scope), (Amount::Fraction(0.6), Scope::Group("hall-a".into())));
        for bad in [
            json!({}),
            json!({"watts": 1, "fraction": 0.5}),
            json!({"fraction": 1.5}),
            json!({"watts": -1}),
            json!({"watts": 1, "scope": "moon"}),
            json!({"watts": 1, "lease_s": -5}),
            json!({"watts": 1, "lease_s": 0.03}),
            json!({"watts": 1, "lease_s": 0}),
            // Issue 36.1: over 30 days (30 months, as `30M` once was).
            json!({"watts": 1, "lease_s": 2_592_001}),
            json!({"watts": 1, "lease_s": 78_900_480}),
            json!({"watts": 1, "bogus": 1}),
        ] {
            assert_eq!(parse_call("set_budget", &bad).unwrap_err().code, INVALID_PARAMS, "{bad}");
        }
        assert_eq!(parse_call("reboot", &Value::Null).unwrap_err().code, METHOD_NOT_FOUND);
        assert!(parse_call("set_protection", &json!({"pattern": "s19*", "state": "protected"})).is_ok());
        assert!(parse_call("set_protection", &json!({"pattern": "s19*", "state": "maybe"})).is_err());
    }

    #[test]
    fn envelopes() {
        assert_eq!(parse_request(b"{nope").unwrap_err().1.code, PARSE_ERROR);
        assert_eq!(parse_request(br#"{"id":1,"method":"status"}"#).unwrap_err().1.code, INVALID_REQUEST);
        let r = parse_request(br#"{"jsonrpc":"2.0","id":"a","method":"status","auth":"Bearer t"}"#).unwrap();
        assert_eq!((r.id, r.auth.as_deref()), (json!("a"), Some("Bearer t")));
    }
}
