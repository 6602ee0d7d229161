//! UTC calendar time without a date crate: what trace manifests stamp (`utc_now`) and what chat
//! templates ask for (`strftime_now`, the function transformers puts in their environment).

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A UTC instant broken down: year, month (1–12), day (1–31), hour, minute, second, weekday
/// (0 = Sunday).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub weekday: u32,
}

impl Civil {
    /// The UTC calendar date and time of `secs` since the epoch (Howard Hinnant's
    /// civil-from-days).
    pub fn from_unix(secs: u64) -> Self {
        let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// ISO 8601 with a `Z`: `2026-12-06T05:30:00Z`.
    pub fn iso(&self) -> String {
        self.strftime("%Y-%m-%dT%H:%M:%SZ")
    }

    /// Python's `strftime` for the directives chat templates use: `%Y %y %m %d %H %M %S %b
    /// %B %a %A %j %%`, and glibc's unpadded `%-d %-m %-H`; any other directive is written as
    /// it is.
    pub fn strftime(&self, fmt: &str) -> String {
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        const DAYS: [&str; 7] = [
            "Sunday",
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
        ];
        let month = MONTHS[(self.month - 1) as usize];
        let weekday = DAYS[self.weekday as usize];
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let (unpadded, d) = match chars.next() {
                Some('-') => (true, chars.next()),
                d => (false, d),
            };
            let num = |v: u32, width: usize| {
                if unpadded {
                    v.to_string()
                } else {
                    format!("{v:0width$}")
                }
            };
            match d {
                Some('Y') => out += &self.year.to_string(),
                Some('y') => out += &format!("{:02}", self.year.rem_euclid(100)),
                Some('m') => out += &num(self.month, 2),
                Some('d') => out += &num(self.day, 2),
                Some('H') => out += &num(self.hour, 2),
                Some('M') => out += &num(self.minute, 2),
                Some('S') => out += &num(self.second, 2),
                Some('j') => out += &num(self.day_of_year(), 3),
                Some('B') => out += month,
                Some('b') => out += &month[..3],
                Some('A') => out += weekday,
                Some('a') => out += &weekday[..3],
                Some('%') => out.push('%'),
                Some(other) => {
                    out.push('%');
                    if unpadded {
                        out.push('-');
                    }
                    out.push(other);
                }
                None => out.push('%'),
            }
        }
        out
    }

    fn day_of_year(&self) -> u32 {
        const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let leap = self.year % 4 == 0 && (self.year % 100 != 0 || self.year % 400 == 0);
        BEFORE[(self.month - 1) as usize] + self.day + u32::from(leap && self.month > 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        // 2024-02-29 12:34:56 UTC, a Thursday, day 60 of a leap year.
        let c = Civil::from_unix(1_709_210_096);
        assert_eq!(
            c.strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %-d %-m %j %y %% %Q"),
            "2024-02-29 12:34:56 Thu Thursday Feb February 29 2 060 24 % %Q"
        );
        assert_eq!(Civil::from_unix(0).iso(), "1970-01-01T00:00:00Z");
        // 2000-12-31 23:59:59, a Sunday, day 366.
        let c = Civil::from_unix(978_307_199);
        assert_eq!(c.strftime("%A %j %d %B %Y"), "Sunday 366 31 December 2000");
    }
}
