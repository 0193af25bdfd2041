//! Measured watts from outside sluice: a hall meter (`curtail.meter`) and
//! the other tenant's load (`curtail.follow.other_load`). A feed is a
//! source (Prometheus, Modbus TCP, or the miners' firmware) read every
//! interval by its own task, which sends each reading or error to the
//! controller; what a reading means is decided in [`super::closed_loop`].

use crate::units::Seconds;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Where a figure in watts is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A Prometheus server's HTTP API: the sum of an instant query.
    Prometheus,
    /// A Modbus TCP device (a revenue meter, a smart PDU): one register.
    Modbus,
    /// The sum of the miners' own power read-backs (meter only).
    Firmware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterKind {
    /// Function 3.
    #[default]
    Holding,
    /// Function 4.
    Input,
}

/// How the register(s) encode the figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterFormat {
    #[default]
    U16,
    U32,
    I32,
    F32,
}

/// Of a two-register value, which comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WordOrder {
    /// The high word at `register`, the low at `register + 1` (most meters).
    #[default]
    HighFirst,
    LowFirst,
}

/// A source of watts. Which keys apply depends on `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: Option<SourceKind>,
    /// prometheus: the server (`http://host:9090`).
    pub url: String,
    /// prometheus: PromQL; the sum of the instant vector is the figure.
    pub query: String,
    /// modbus: `host:port`.
    pub address: String,
    /// modbus: the unit (slave) id.
    pub unit: u8,
    /// modbus: the (first) register, 0-based as on the wire.
    pub register: u16,
    pub register_kind: RegisterKind,
    pub format: RegisterFormat,
    pub word_order: WordOrder,
    /// modbus: watts = raw value × scale (a meter in kW: 1000; in 0.1 W: 0.1).
    pub scale: f64,
    /// One read (connect, ask, answer) must end within this.
    pub timeout_s: Seconds,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: None,
            url: String::new(),
            query: String::new(),
            address: String::new(),
            unit: 1,
            register: 0,
            register_kind: RegisterKind::Holding,
            format: RegisterFormat::U16,
            word_order: WordOrder::HighFirst,
            scale: 1.0,
            timeout_s: Seconds::from_duration(Duration::from_secs(3)),
        }
    }
}

impl SourceConfig {
    /// Check the keys `kind` needs; `key` is where it sits in the file.
    pub fn validate(&self, key: &'static str, firmware_ok: bool) -> Result<(), (&'static str, String)> {
        match self.kind {
            None => Err((key, "no kind: use \"prometheus\", \"modbus\" or \"firmware\"".into())),
            Some(SourceKind::Prometheus) => {
                let hint = "a Prometheus server is http://host:port";
                let u = url::Url::parse(&self.url).map_err(|e| (key, format!("url {:?}: {e}; {hint}", self.url)))?;
                if u.scheme() != "http" && u.scheme() != "https" {
                    return Err((key, format!("url {:?}: {hint}", self.url)));
                }
                if self.query.trim().is_empty() {
                    return Err((key, "a prometheus source needs a query (PromQL)".into()));
                }
                Ok(())
            }
            Some(SourceKind::Modbus) => {
                if self.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                    return Err((key, format!("address {:?}: use host:port (Modbus TCP is port 502)", self.address)));
                }
                if !self.scale.is_finite() || self.scale <= 0.0 {
                    return Err((key, format!("scale must be > 0, got {}", self.scale)));
                }
                Ok(())
            }
            Some(SourceKind::Firmware) if firmware_ok => Ok(()),
            Some(SourceKind::Firmware) => Err((key, "kind \"firmware\" can only be the meter".into())),
        }
    }

    /// What the reading is, for status and logs.
    pub fn describe(&self) -> String {
        match self.kind {
            Some(SourceKind::Prometheus) => format!("prometheus {} {}", self.url, self.query),
            Some(SourceKind::Modbus) => format!(
                "modbus {} unit {} {:?} register {}",
                self.address, self.unit, self.register_kind, self.register
            )
            .to_lowercase(),
            Some(SourceKind::Firmware) => "firmware read-backs".into(),
            None => "none".into(),
        }
    }
}

/// The largest Prometheus answer read.
const MAX_ANSWER: usize = 1 << 20;

/// Reads a source: one per feed, kept by its task (the HTTP client's
/// connection pool lives here).
pub struct Reader {
    src: SourceConfig,
    http: reqwest::Client,
}

impl Reader {
    pub fn new(src: SourceConfig) -> Reader {
        let http = reqwest::Client::builder().timeout(src.timeout_s.get()).build().unwrap_or_default();
        Reader { src, http }
    }

    /// Read the figure once, in watts.
    pub async fn read(&self) -> Result<f64, String> {
        let t = self.src.timeout_s.get();
        let w = match self.src.kind {
            Some(SourceKind::Prometheus) => self.prometheus().await?,
            Some(SourceKind::Modbus) => {
                tokio::time::timeout(t, self.modbus()).await.map_err(|_| format!("no answer within {t:?}"))??
            }
            Some(SourceKind::Firmware) | None => return Err("not a polled source".into()),
        };
        if w.is_finite() {
            Ok(w)
        } else {
            Err(format!("the source gave {w}"))
        }
    }

    async fn prometheus(&self) -> Result<f64, String> {
        let base = self.src.url.trim_end_matches('/');
        let mut u = url::Url::parse(&format!("{base}/api/v1/query")).map_err(|e| format!("prometheus {base}: {e}"))?;
        u.query_pairs_mut().append_pair("query", &self.src.query);
        let r = self.http.get(u).send().await.map_err(|e| format!("prometheus {base}: {e}"))?;
        let status = r.status();
        // A query that sums on the server answers in a few hundred bytes;
        // one that returns every series of a big site is refused, not read.
        let mut r = r;
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| format!("prometheus {base}: {e}"))? {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(format!(
                    "prometheus {base}: the answer is over {} KiB; sum on the server (sum(...))",
                    MAX_ANSWER / 1024
                ));
            }
            body.extend_from_slice(&chunk);
        }
        prometheus_sum(&body).map_err(|e| format!("prometheus {base} (HTTP {status}): {e}"))
    }

    async fn modbus(&self) -> Result<f64, String> {
        use tokio_modbus::client::Reader as _;
        let src = &self.src;
        let addr = tokio::net::lookup_host(&src.address)
            .await
            .map_err(|e| format!("modbus {}: {e}", src.address))?
            .next()
            .ok_or_else(|| format!("modbus {}: no address", src.address))?;
        let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(src.unit))
            .await
            .map_err(|e| format!("modbus {addr}: {e}"))?;
        let n = if src.format == RegisterFormat::U16 { 1 } else { 2 };
        let words = match src.register_kind {
            RegisterKind::Holding => ctx.read_holding_registers(src.register, n).await,
            RegisterKind::Input => ctx.read_input_registers(src.register, n).await,
        }
        .map_err(|e| format!("modbus {addr}: {e}"))?
        .map_err(|e| format!("modbus {addr}: the device answered exception {e}"))?;
        let raw = decode_registers(&words, src.format, src.word_order)
            .ok_or_else(|| format!("modbus {addr}: {} register(s) in the answer, {n} asked", words.len()))?;
        Ok(raw * src.scale)
    }
}

/// The figure of a Prometheus `/api/v1/query` answer: the sum of an instant
/// vector (at least one series), or a scalar.
pub fn prometheus_sum(body: &[u8]) -> Result<f64, String> {
    #[derive(Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Data {
        result_type: String,
        result: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct Sample {
        value: (f64, String),
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("not a Prometheus API answer: {e}"))?;
    if a.status != "success" {
        return Err(format!("query failed: {}", a.error.unwrap_or(a.status)));
    }
    let d = a.data.ok_or("no data in the answer")?;
    let parse = |s: &str| s.parse::<f64>().map_err(|_| format!("value {s:?} is not a number"));
    match d.result_type.as_str() {
        "vector" => {
            let v: Vec<Sample> = serde_json::from_value(d.result).map_err(|e| format!("bad vector: {e}"))?;
            if v.is_empty() {
                return Err("the query matched no series (is the exporter up, the metric named right?)".into());
            }
            v.iter().try_fold(0.0, |acc, s| Ok(acc + parse(&s.value.1)?))
        }
        "scalar" => {
            let s: (f64, String) = serde_json::from_value(d.result).map_err(|e| format!("bad scalar: {e}"))?;
            parse(&s.1)
        }
        other => Err(format!("the query gives a {other}; it must give an instant vector or a scalar")),
    }
}

/// One or two registers as a number (None: too few registers).
pub fn decode_registers(words: &[u16], format: RegisterFormat, order: WordOrder) -> Option<f64> {
    if format == RegisterFormat::U16 {
        return words.first().map(|&w| f64::from(w));
    }
    let (a, b) = (*words.first()?, *words.get(1)?);
    let (hi, lo) = match order {
        WordOrder::HighFirst => (a, b),
        WordOrder::LowFirst => (b, a),
    };
    let bits = (u32::from(hi) << 16) | u32::from(lo);
    Some(match format {
        RegisterFormat::U32 => f64::from(bits),
        RegisterFormat::I32 => f64::from(bits as i32),
        RegisterFormat::F32 => f64::from(f32::from_bits(bits)),
        RegisterFormat::U16 => unreachable!("handled above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_answers() {
        let table: [(&str, Result<f64, &str>); 7] = [
            (
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"gpu":"0"},"value":[1.7e9,"700.5"]},{"metric":{"gpu":"1"},"value":[1.7e9,"299.5"]}]}}"#,
                Ok(1000.0),
            ),
            (r#"{"status":"success","data":{"resultType":"scalar","result":[1.7e9,"42"]}}"#, Ok(42.0)),
            (r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#, Err("matched no series")),
            (r#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#, Err("parse error")),
            (r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#, Err("instant vector")),
            (
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}"#,
                Err("not a number"),
            ),
            ("<html>", Err("not a Prometheus API answer")),
        ];
        for (body, want) in table {
            match (prometheus_sum(body.as_bytes()), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, w, "{body}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{body}: {e}"),
                (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
            }
        }
        // NaN is a number to Prometheus; the reader refuses it as a figure.
        let nan = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        assert!(prometheus_sum(nan.as_bytes()).unwrap().is_nan());
    }

    #[test]
    fn register_formats() {
        use RegisterFormat::*;
        use WordOrder::*;
        let f = 1234.5f32.to_bits();
        let (fh, fl) = ((f >> 16) as u16, f as u16);
        let table: [(&[u16], RegisterFormat, WordOrder, Option<f64>); 8] = [
            (&[2400], U16, HighFirst, Some(2400.0)),
            (&[0x0001, 0x0002], U32, HighFirst, Some(65538.0)),
            (&[0x0002, 0x0001], U32, LowFirst, Some(65538.0)),
            (&[0xFFFF, 0xFFFE], I32, HighFirst, Some(-2.0)),
            (&[fh, fl], F32, HighFirst, Some(1234.5)),
            (&[fl, fh], F32, LowFirst, Some(1234.5)),
            (&[7], U32, HighFirst, None),
            (&[], U16, HighFirst, None),
        ];
        for (words, format, order, want) in table {
            assert_eq!(decode_registers(words, format, order), want, "{words:?} {format:?} {order:?}");
        }
    }

    #[test]
    fn sources_are_checked_by_kind() {
        let prom = |url: &str, query: &str| SourceConfig {
            kind: Some(SourceKind::Prometheus),
            url: url.into(),
            query: query.into(),
            ..SourceConfig::default()
        };
        let modbus = |address: &str, scale: f64| SourceConfig {
            kind: Some(SourceKind::Modbus),
            address: address.into(),
            scale,
            ..SourceConfig::default()
        };
        let table = [
            (prom("http://127.0.0.1:9090", "sum(DCGM_FI_DEV_POWER_USAGE)"), true, None),
            (prom("127.0.0.1:9090", "x"), true, Some("http://host:port")),
            (prom("http://127.0.0.1:9090", " "), true, Some("needs a query")),
            (modbus("meter.hall:502", 1.0), true, None),
            (modbus("meter.hall", 1.0), true, Some("host:port")),
            (modbus("127.0.0.1:502", 0.0), true, Some("scale")),
            (SourceConfig { kind: Some(SourceKind::Firmware), ..SourceConfig::default() }, true, None),
            (
                SourceConfig { kind: Some(SourceKind::Firmware), ..SourceConfig::default() },
                false,
                Some("only be the meter"),
            ),
            (SourceConfig::default(), true, Some("no kind")),
        ];
        for (src, fw, want) in table {
            match (src.validate("k", fw), want) {
                (Ok(()), None) => {}
                (Err((_, e)), Some(w)) => assert!(e.contains(w), "{src:?}: {e}"),
                (got, want) => panic!("{src:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
