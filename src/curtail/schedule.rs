//! Time-of-day budgets (UTC). Pure: the caller passes the time of day.

use super::ScheduleEntry;
pub use crate::api::Amount;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    from_s: u32,
    to_s: u32,
    pub amount: Amount,
}

fn hhmm(s: &str) -> Result<u32, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?} is not HH:MM"))?;
    let (h, m): (u32, u32) =
        (h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?, m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 3600 + m * 60)
}

impl Window {
    pub fn parse(e: &ScheduleEntry) -> Result<Window, String> {
        let amount = Amount::new(e.watts, e.fraction).map_err(|why| format!("{}-{}: {why}", e.from, e.to))?;
        Ok(Window { from_s: hhmm(&e.from)?, to_s: hhmm(&e.to)?, amount })
    }

    pub fn contains(&self, second_of_day: u32) -> bool {
        if self.from_s <= self.to_s {
            (self.from_s..self.to_s).contains(&second_of_day)
        } else {
            second_of_day >= self.from_s || second_of_day < self.to_s
        }
    }
}

/// The first window containing this second of the day.
pub fn active(windows: &[Window], second_of_day: u32) -> Option<Amount> {
    windows.iter().find(|w| w.contains(second_of_day)).map(|w| w.amount)
}

/// Seconds since midnight UTC at `unix_ms`.
pub fn utc_second_of_day(unix_ms: u64) -> u32 {
    ((unix_ms / 1000) % 86_400) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(from: &str, to: &str, fraction: f64) -> ScheduleEntry {
        ScheduleEntry { from: from.into(), to: to.into(), watts: None, fraction: Some(fraction) }
    }

    #[test]
    fn windows_including_midnight_wrap() {
        let ws =
            vec![Window::parse(&e("17:00", "21:00", 0.4)).unwrap(), Window::parse(&e("23:00", "06:00", 0.9)).unwrap()];
        assert_eq!(active(&ws, 17 * 3600), Some(Amount::Fraction(0.4)));
        assert_eq!(active(&ws, 21 * 3600), None);
        assert_eq!(active(&ws, 23 * 3600 + 1), Some(Amount::Fraction(0.9)));
        assert_eq!(active(&ws, 3 * 3600), Some(Amount::Fraction(0.9)));
        assert_eq!(active(&ws, 12 * 3600), None);
        assert!(Window::parse(&e("25:00", "01:00", 0.5)).is_err());
        // The amount's one rule (api::Amount): both, neither, or a budget
        // that is no number of watts, are refused with the window named.
        for (watts, fraction, why) in [
            (Some(1.0), Some(0.5), "exactly one"),
            (None, None, "exactly one"),
            (Some(f64::INFINITY), None, "finite"),
            (Some(-1.0), None, "finite"),
            (None, Some(1.2), "from 0 to 1"),
        ] {
            let e = Window::parse(&ScheduleEntry { from: "01:00".into(), to: "02:00".into(), watts, fraction });
            let e = e.unwrap_err();
            assert!(e.starts_with("01:00-02:00: ") && e.contains(why), "{e}");
        }
    }
}
