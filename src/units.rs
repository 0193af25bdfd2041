//! Units and values that cannot be wrong once made: power, efficiency and
//! hashrate as numbers that say what they are, a span of seconds that every
//! timer can take, an octal file mode. Every module takes them from here;
//! this module takes nothing from the crate.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// Power in watts.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Watts(pub f64);

/// Efficiency in joules per terahash (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JoulesPerTh(pub f64);

/// Hashrate in hashes per second.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HashesPerSec(pub f64);

/// Sums and differences of one unit, and scaling by a plain number: what
/// budgets, estimates and readings are added, compared and scaled with.
macro_rules! quantity {
    ($t:ident) => {
        impl $t {
            pub const ZERO: $t = $t(0.0);
            /// A total order (NaN last), for sorting.
            pub fn total_cmp(&self, o: &$t) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0)
            }
            pub fn max(self, o: $t) -> $t {
                $t(self.0.max(o.0))
            }
            pub fn min(self, o: $t) -> $t {
                $t(self.0.min(o.0))
            }
            pub fn is_finite(self) -> bool {
                self.0.is_finite()
            }
        }
        impl std::ops::Add for $t {
            type Output = $t;
            fn add(self, o: $t) -> $t {
                $t(self.0 + o.0)
            }
        }
        impl std::ops::Sub for $t {
            type Output = $t;
            fn sub(self, o: $t) -> $t {
                $t(self.0 - o.0)
            }
        }
        impl std::ops::AddAssign for $t {
            fn add_assign(&mut self, o: $t) {
                self.0 += o.0
            }
        }
        impl std::ops::SubAssign for $t {
            fn sub_assign(&mut self, o: $t) {
                self.0 -= o.0
            }
        }
        impl std::ops::Mul<f64> for $t {
            type Output = $t;
            fn mul(self, k: f64) -> $t {
                $t(self.0 * k)
            }
        }
        impl std::ops::MulAssign<f64> for $t {
            fn mul_assign(&mut self, k: f64) {
                self.0 *= k
            }
        }
        impl std::ops::Div<f64> for $t {
            type Output = $t;
            fn div(self, k: f64) -> $t {
                $t(self.0 / k)
            }
        }
        /// The ratio of two figures of one unit.
        impl std::ops::Div for $t {
            type Output = f64;
            fn div(self, o: $t) -> f64 {
                self.0 / o.0
            }
        }
        impl std::iter::Sum for $t {
            fn sum<I: Iterator<Item = $t>>(it: I) -> $t {
                $t(it.map(|w| w.0).sum())
            }
        }
    };
}
quantity!(Watts);
quantity!(JoulesPerTh);
quantity!(HashesPerSec);

impl HashesPerSec {
    /// In TH/s.
    pub fn terahashes(self) -> f64 {
        self.0 / 1e12
    }
}

impl std::ops::Mul<HashesPerSec> for JoulesPerTh {
    type Output = Watts;
    /// J/TH × hashrate: the power a miner of this efficiency draws.
    fn mul(self, h: HashesPerSec) -> Watts {
        Watts(self.0 * h.terahashes())
    }
}

impl std::ops::Div<HashesPerSec> for Watts {
    type Output = JoulesPerTh;
    /// Watts per hashrate: the efficiency.
    fn div(self, h: HashesPerSec) -> JoulesPerTh {
        JoulesPerTh(self.0 / h.terahashes())
    }
}

/// A span of time written in seconds (`30`, `0.25`). Refused at load when it
/// is negative, not a number, or longer than [`Seconds::MAX`]: every timer
/// built from one is then valid (a `1e30` would overflow `Duration`, and a
/// deadline years away overflows some clocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seconds(Duration);

impl Seconds {
    /// One year: longer than any timeout or hold a site would set.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);
    pub const ZERO: Seconds = Seconds(Duration::ZERO);

    pub fn try_from_secs(s: f64) -> Result<Seconds, String> {
        if !s.is_finite() || s < 0.0 {
            return Err(format!("{s} is not a number of seconds (expected 0 to {})", Self::MAX.as_secs()));
        }
        match Duration::try_from_secs_f64(s) {
            Ok(d) if d <= Self::MAX => Ok(Seconds(d)),
            _ => Err(format!("{s:e} s is longer than the longest allowed, {} s (one year)", Self::MAX.as_secs())),
        }
    }
    /// Saturates at [`Seconds::MAX`].
    pub const fn from_duration(d: Duration) -> Seconds {
        if d.as_secs() >= Self::MAX.as_secs() {
            Seconds(Self::MAX)
        } else {
            Seconds(d)
        }
    }
    pub const fn get(self) -> Duration {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for Seconds {
    /// Saturates at [`Seconds::MAX`].
    fn from(d: Duration) -> Seconds {
        Seconds::from_duration(d)
    }
}

impl From<Seconds> for Duration {
    fn from(s: Seconds) -> Duration {
        s.0
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seconds, D::Error> {
        let v = f64::deserialize(d)?;
        Seconds::try_from_secs(v).map_err(serde::de::Error::custom)
    }
}

/// An octal file mode (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileMode, D::Error> {
        let s = String::deserialize(d)?;
        match u32::from_str_radix(&s, 8) {
            Ok(m) if m <= 0o7777 => Ok(FileMode(m)),
            _ => Err(serde::de::Error::custom(format!("{s:?} is not an octal file mode (e.g. \"0660\")"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_combine_into_the_unit_they_make() {
        let h = HashesPerSec(100e12);
        assert_eq!(JoulesPerTh(30.0) * h, Watts(3000.0));
        assert_eq!(Watts(3000.0) / h, JoulesPerTh(30.0));
        assert_eq!(Watts(3000.0) / Watts(1500.0), 2.0);
        assert_eq!([Watts(1.0), Watts(2.5)].into_iter().sum::<Watts>() - Watts(0.5), Watts(3.0));
        assert_eq!(Watts(2.0) * 1.5, Watts(3.0));
        assert!(Watts(1.0).total_cmp(&Watts(f64::NAN)).is_lt());
    }

    #[test]
    fn seconds_refuse_what_cannot_be_a_timer() {
        for (v, ok) in [
            (0.0, Some(Duration::ZERO)),
            (0.25, Some(Duration::from_millis(250))),
            (30.0, Some(Duration::from_secs(30))),
            (31_536_000.0, Some(Seconds::MAX)),
            (31_536_001.0, None),
            (1e30, None),
            (f64::INFINITY, None),
            (f64::NAN, None),
            (-1.0, None),
        ] {
            assert_eq!(Seconds::try_from_secs(v).ok().map(Seconds::get), ok, "{v}");
        }
    }
}
