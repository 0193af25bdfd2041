//! Time-of-day budgets (UTC). Pure: the caller passes the time of day.

use super::ScheduleEntry;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Watts(f64),
    Fraction(f64),
}

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
        let amount = match (e.watts, e.fraction) {
            (Some(w), None) if w >= 0.0 => Amount::Watts(w),
            (None, Some(f)) if (0.0..=1.0).contains(&f) => Amount::Fraction(f),
            _ => return Err(format!("{}-{}: give exactly one of watts (>= 0) or fraction (0..1)", e.from, e.to)),
        };
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
        assert!(Window::parse(&ScheduleEntry {
            from: "01:00".into(),
            to: "02:00".into(),
            watts: Some(1.0),
            fraction: Some(0.5)
        })
        .is_err());
    }
}
