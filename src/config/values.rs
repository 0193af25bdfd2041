//! Config values that are parsed once, into the type the code uses: a value
//! that cannot be what its key means is refused at load (naming the key), so
//! nothing downstream re-parses a string or converts a number that could
//! panic.

pub use crate::units::{FileMode, Seconds};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;

/// A pool URL, parsed once: `stratum+tcp://account.worker:password@host:port`
/// for a Stratum V1 pool, `stratum2+tcp://account.worker@host:port/<key>` for
/// a Stratum V2 pool, whose authority public key (base58check, as the pool
/// publishes it) authenticates the encrypted connection. The account and
/// password are percent-decoded as a URL's userinfo is (`%40` is `@`); a `+`
/// stays a `+`, as it does in userinfo (it is a space only in form-encoded
/// query strings).
#[derive(Clone, PartialEq, Eq)]
pub struct PoolUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// `Some` for a Stratum V2 pool: the key its Noise handshake must be
    /// signed with.
    pub sv2: Option<AuthorityKey>,
    /// The text as written, for serialising the config back.
    raw: String,
}

/// What a pool URL looks like, for every error about one.
pub const POOL_URL_FORM: &str = "a pool URL looks like stratum+tcp://account.worker:password@host:port, \
     or for a Stratum V2 pool stratum2+tcp://account.worker@host:port/<pool authority public key>";

/// A Stratum V2 pool's authority public key: the x coordinate of a
/// secp256k1 point (BIP 340), written base58check over a 2-byte
/// little-endian version (1) and the 32 key bytes, as the reference
/// implementation writes `authority_public_key`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuthorityKey(pub [u8; 32]);

impl AuthorityKey {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = bs58::decode(s).with_check(None).into_vec().map_err(|e| match e {
            bs58::decode::Error::InvalidChecksum { .. } => "its checksum is wrong (a character mistyped?)".to_owned(),
            e => format!("it is not base58check: {e}"),
        })?;
        if b.len() != 34 {
            return Err(format!("it decodes to {} bytes, not 34 (2 of version and 32 of key)", b.len()));
        }
        let version = u16::from_le_bytes([b[0], b[1]]);
        if version != 1 {
            return Err(format!("key version {version}: only version 1 is known"));
        }
        let key: [u8; 32] = b[2..].try_into().expect("34 bytes");
        secp256k1::XOnlyPublicKey::from_slice(&key)
            .map_err(|_| "it is not a point on the secp256k1 curve".to_owned())?;
        Ok(AuthorityKey(key))
    }
}

impl fmt::Display for AuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = [0u8; 34];
        b[0] = 1;
        b[2..].copy_from_slice(&self.0);
        f.write_str(&bs58::encode(b).with_check().into_string())
    }
}

impl PoolUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?}: {why} ({POOL_URL_FORM})");
        // `127.0.0.1:3334` or `pool.example:3333` would otherwise be read
        // as a scheme and a path ("relative URL without a base").
        if !s.contains("://") {
            return Err(bad("not a URL: no stratum+tcp:// in front"));
        }
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        let sv2 = match u.scheme() {
            "stratum+tcp" => None,
            "stratum2+tcp" => {
                let key = u.path().trim_start_matches('/');
                if key.is_empty() {
                    return Err(bad("a Stratum V2 pool URL ends with /<the pool's authority public key>"));
                }
                let k = AuthorityKey::parse(key)
                    .map_err(|why| bad(&format!("the pool authority public key {key:?} is malformed: {why}")))?;
                Some(k)
            }
            other => return Err(bad(&format!("the scheme must be stratum+tcp or stratum2+tcp, not {other}"))),
        };
        if sv2.is_none() && !matches!(u.path(), "" | "/") {
            return Err(bad("a Stratum V1 pool URL has no path (a key after the port is for stratum2+tcp://)"));
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
            sv2,
            raw: s.to_owned(),
        })
    }
    /// The scheme, which names the protocol: `stratum+tcp` or `stratum2+tcp`.
    pub fn scheme(&self) -> &'static str {
        if self.sv2.is_some() {
            "stratum2+tcp"
        } else {
            "stratum+tcp"
        }
    }
    /// The protocol, as metrics and the status line name it: `sv1`, `sv2`.
    pub fn protocol(&self) -> &'static str {
        if self.sv2.is_some() {
            "sv2"
        } else {
            "sv1"
        }
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
    /// Never prints the password (nor the key, which the config has).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}@{}", self.scheme(), self.user, self.addr())
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

    /// The reference implementation's published example key pair (its
    /// pool config examples): a real key, checked by its checksum and curve.
    pub(crate) const EXAMPLE_KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

    #[test]
    fn sv2_pool_urls_carry_the_authority_key() {
        let s = format!("stratum2+tcp://acct.rig@127.0.0.1:34254/{EXAMPLE_KEY}");
        let u = PoolUrl::parse(&s).unwrap();
        assert_eq!((u.user.as_str(), u.addr().as_str(), u.protocol()), ("acct.rig", "127.0.0.1:34254", "sv2"));
        assert_eq!(u.sv2.unwrap().to_string(), EXAMPLE_KEY, "the key round-trips");
        assert_eq!(u.to_string(), "stratum2+tcp://acct.rig@127.0.0.1:34254");
        let v1 = PoolUrl::parse("stratum+tcp://a@h:1").unwrap();
        assert_eq!((v1.sv2, v1.protocol()), (None, "sv1"));
    }

    /// A malformed key is refused with the reason, whichever way it is wrong.
    #[test]
    fn a_malformed_authority_key_is_refused_with_the_reason() {
        let mut typo = EXAMPLE_KEY.to_owned();
        typo.replace_range(10..11, if &typo[10..11] == "a" { "b" } else { "a" });
        // A valid base58check of 34 bytes whose version is 2.
        let mut v2 = [0u8; 34];
        v2[0] = 2;
        v2[2..].copy_from_slice(&AuthorityKey::parse(EXAMPLE_KEY).unwrap().0);
        let v2 = bs58::encode(v2).with_check().into_string();
        // 32 bytes whose x is not on the curve (x = 5 has no y on secp256k1).
        let mut off = [0u8; 34];
        off[0] = 1;
        off[33] = 5;
        let off = bs58::encode(off).with_check().into_string();
        let short = bs58::encode([1u8, 0, 7]).with_check().into_string();
        let rows: &[(&str, &str)] = &[
            ("", "ends with /<the pool's authority public key>"),
            (&typo, "checksum is wrong"),
            ("0OIl", "not base58check"),
            (&short, "decodes to 3 bytes, not 34"),
            (&v2, "key version 2"),
            (&off, "not a point on the secp256k1 curve"),
        ];
        for (key, why) in rows {
            let e = PoolUrl::parse(&format!("stratum2+tcp://a@h:1/{key}")).unwrap_err();
            assert!(e.contains(why) && e.contains(POOL_URL_FORM), "{key}: {e}");
        }
        let e = PoolUrl::parse(&format!("stratum+tcp://a@h:1/{EXAMPLE_KEY}")).unwrap_err();
        assert!(e.contains("for stratum2+tcp://"), "{e}");
    }

    #[test]
    fn pool_url_errors_say_what_a_url_looks_like() {
        for s in ["127.0.0.1:3334", "pool.example:3333", "http://a:1", "stratum+tcp://a", "stratum+tcp://u@:1", ""] {
            let e = PoolUrl::parse(s).unwrap_err();
            assert!(e.contains(POOL_URL_FORM), "{s}: {e}");
            assert!(!e.contains("relative URL") && !e.contains(", not pool"), "{s}: {e}");
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
