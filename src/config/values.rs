//! Config values that are parsed once, into the type the code uses: a value
//! that cannot be what its key means is refused at load (naming the key), so
//! nothing downstream re-parses a string or converts a number that could
//! panic.

pub use crate::units::{FileMode, Seconds};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;

/// A pool URL, `stratum+tcp://account.worker:password@host:port`, parsed
/// once. The account and password are percent-decoded as a URL's userinfo
/// is (`%40` is `@`); a `+` stays a `+`, as it does in userinfo (it is a
/// space only in form-encoded query strings).
#[derive(Clone, PartialEq, Eq)]
pub struct PoolUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The text as written, for serialising the config back.
    raw: String,
}

/// What a pool URL looks like, for every error about one.
pub const POOL_URL_FORM: &str = "a pool URL looks like stratum+tcp://account.worker:password@host:port";

impl PoolUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?}: {why} ({POOL_URL_FORM})");
        // `127.0.0.1:3334` or `pool.example:3333` would otherwise be read
        // as a scheme and a path ("relative URL without a base").
        if !s.contains("://") {
            return Err(bad("not a URL: no stratum+tcp:// in front"));
        }
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if u.scheme() != "stratum+tcp" {
            return Err(bad(&format!("the scheme must be stratum+tcp, not {}", u.scheme())));
        }
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
        let port = u.port().ok_or_else(|| bad("no port"))?;
        let dec = |p: &str| -> Result<String, String> {
            percent_encoding::percent_decode_str(p)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("the account or password is not UTF-8 once percent-decoded"))
        };
        Ok(PoolUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
            user: dec(u.username())?,
            password: match u.password() {
                Some(p) => dec(p)?,
                None => "x".into(),
            },
            raw: s.to_owned(),
        })
    }
    /// host:port, with brackets for IPv6.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for PoolUrl {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stratum+tcp://{}@{}", self.user, self.addr())
    }
}

impl fmt::Debug for PoolUrl {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolUrl({self})")
    }
}

impl std::str::FromStr for PoolUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PoolUrl::parse(s)
    }
}

impl Serialize for PoolUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for PoolUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PoolUrl, D::Error> {
        let s = String::deserialize(d)?;
        PoolUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A 32-bit version-rolling mask, written as 8 hex digits (`1fffe000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VersionMask(pub u32);

impl Serialize for VersionMask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:08x}", self.0))
    }
}

impl<'de> Deserialize<'de> for VersionMask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VersionMask, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0x").unwrap_or(&s);
        if digits.is_empty() || digits.len() > 8 {
            return Err(serde::de::Error::custom(format!("{s:?} is not a hex mask of up to 8 digits (e.g. 1fffe000)")));
        }
        u32::from_str_radix(digits, 16)
            .map(VersionMask)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a hex mask (e.g. 1fffe000)")))
    }
}

/// A listener that may be switched off: `host:port`, or `""` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl Serialize for OptionalAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.collect_str(&a),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for OptionalAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OptionalAddr, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(OptionalAddr(None));
        }
        s.parse().map(|a| OptionalAddr(Some(a))).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not host:port with an IP address (e.g. 0.0.0.0:9333), or \"\" for none"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_urls_decode_userinfo_as_urls_do() {
        // (url, account, password, host:port)
        let table = [
            ("stratum+tcp://acct.rig:secret@127.0.0.1:3333", "acct.rig", "secret", "127.0.0.1:3333"),
            ("stratum+tcp://acct+tag.w1:pa+ss@pool.example:3333", "acct+tag.w1", "pa+ss", "pool.example:3333"),
            ("stratum+tcp://a%40b:p%3Aq%25@h:1", "a@b", "p:q%", "h:1"),
            ("stratum+tcp://me@[::1]:4444", "me", "x", "[::1]:4444"),
            ("stratum+tcp://bc1qxyz.worker%201:x@h:1", "bc1qxyz.worker 1", "x", "h:1"),
        ];
        for (s, user, pass, addr) in table {
            let u = PoolUrl::parse(s).unwrap();
            assert_eq!((u.user.as_str(), u.password.as_str(), u.addr().as_str()), (user, pass, addr), "{s}");
            assert!(!format!("{u} {u:?}").contains("secret"), "the password is never printed");
        }
    }

    #[test]
    fn pool_url_errors_say_what_a_url_looks_like() {
        for s in ["127.0.0.1:3334", "pool.example:3333", "http://a:1", "stratum+tcp://a", "stratum+tcp://u@:1", ""] {
            let e = PoolUrl::parse(s).unwrap_err();
            assert!(e.contains(POOL_URL_FORM), "{s}: {e}");
            assert!(!e.contains("relative URL") && !e.contains("scheme must be stratum+tcp, not pool"), "{s}: {e}");
        }
    }

    #[test]
    fn masks_modes_and_addresses_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            m: VersionMask,
            f: FileMode,
            a: OptionalAddr,
            b: OptionalAddr,
            s: Seconds,
            u: PoolUrl,
        }
        let text =
            "m = \"1fffe000\"\nf = \"0660\"\na = \"127.0.0.1:9\"\nb = \"\"\ns = 1.5\nu = \"stratum+tcp://a+b:c@h:1\"\n";
        let t: T = toml::from_str(text).unwrap();
        assert_eq!(t.m, VersionMask(0x1fff_e000));
        assert_eq!(t.f, FileMode(0o660));
        assert_eq!((t.a.0.map(|a| a.port()), t.b.0), (Some(9), None));
        assert_eq!(t.s.get(), std::time::Duration::from_millis(1500));
        assert_eq!(toml::to_string(&t).unwrap(), text);
        for bad in
            ["m = \"xyz\"", "m = \"123456789\"", "f = \"0999\"", "a = \"localhost\"", "s = -1", "s = 1e30", "s = inf"]
        {
            let doc = text.lines().map(|l| if l[..1] == bad[..1] { bad } else { l }).collect::<Vec<_>>().join("\n");
            assert!(toml::from_str::<T>(&doc).is_err(), "{bad}");
        }
    }
}
