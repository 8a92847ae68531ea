//! Cron schedules with POSIX (Vixie cron) semantics: the five fields (or six, with
//! seconds first), month and weekday names, the `@hourly` … `@yearly` shorthands,
//! and the next run after an instant in a time zone ([`Zone`]: UTC, an IANA zone,
//! or the machine's). Weekdays count from 0 = Sunday (7 is Sunday too); when both
//! day fields are restricted a day matches when either does.
//! DST: a wall-clock time the clock skips runs once, at the first instant after the
//! gap; one the clock repeats runs once, at its first instant.
//! Pure: no clock and no I/O; every instant comes in as an argument (unix seconds),
//! so the tests inject the time. Not for: the CRONTAB file (`parse.rs`) or running
//! anything (`runner.rs`).
//!
//! Written here rather than taken from a crate: the `cron` crate numbers weekdays
//! Quartz-style and ANDs the day fields, and croner runs a wildcard entry twice in
//! a repeated hour; neither gives the DST rule above, and the bit sets below are
//! all POSIX needs.

use chrono::offset::LocalResult;
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use std::fmt;
use std::str::FromStr;

/// How far ahead [`Schedule::next_after`] looks: long enough for a Feb 29 entry
/// across 2100 (no leap day from 2096 to 2104).
const HORIZON_YEARS: i32 = 9;

/// One field's rules: its name in error messages, its bounds, its names.
struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const SECOND: Spec = Spec {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
};
const MINUTE: Spec = Spec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Spec = Spec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY: Spec = Spec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
/// Names start at `min`: `jan` is 1.
const MONTH: Spec = Spec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
/// 0 and 7 are Sunday; `sun` is 0.
const WEEKDAY: Spec = Spec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

/// A parsed schedule: one bit set per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    /// Bits 0 (Sunday) to 6.
    weekdays: u64,
    /// Whether the day-of-month field starts with `*` (Vixie's DOM_STAR): then the
    /// day fields combine with AND, else with OR.
    days_star: bool,
    weekdays_star: bool,
    text: String,
}

fn bit(set: u64, v: u32) -> bool {
    set & (1 << v) != 0
}

impl Spec {
    fn value(&self, s: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(self.min + i as u32);
        }
        let v: u32 = s.parse().map_err(|_| {
            if self.names.is_empty() {
                format!("{} {s:?} is not a number", self.name)
            } else {
                format!(
                    "{} {s:?} is not a number or a name ({})",
                    self.name,
                    self.names.join(", ")
                )
            }
        })?;
        if v < self.min || v > self.max {
            return Err(format!(
                "{} {v} is out of range ({} to {})",
                self.name, self.min, self.max
            ));
        }
        Ok(v)
    }

    /// Parses one field (`*`, `5`, `1-5`, `*/15`, `10-50/5`, `3/10`, lists of
    /// these) into its bit set, and whether it starts with `*`.
    fn parse(&self, text: &str) -> Result<(u64, bool), String> {
        let mut bits = 0u64;
        for part in text.split(',') {
            if part.is_empty() {
                return Err(format!("{} {text:?} has an empty list item", self.name));
            }
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s
                        .parse()
                        .ok()
                        .filter(|n| (1..=self.max).contains(n))
                        .ok_or_else(|| {
                            format!("{} step {s:?} must be 1 to {}", self.name, self.max)
                        })?;
                    (r, Some(step))
                }
                None => (part, None),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (lo, hi) = (self.value(a)?, self.value(b)?);
                if lo > hi {
                    return Err(format!("{} range {range} runs backwards", self.name));
                }
                (lo, hi)
            } else {
                let v = self.value(range)?;
                // `3/10` is `3-max/10`, as most crons read it.
                (v, if step.is_some() { self.max } else { v })
            };
            for v in (lo..=hi).step_by(step.unwrap_or(1) as usize) {
                bits |= 1 << v;
            }
        }
        Ok((bits, text.starts_with('*')))
    }
}

impl Schedule {
    /// Parses `text`: five fields (minute hour day-of-month month day-of-week), six
    /// with a leading seconds field, or a shorthand (`@hourly`, `@daily`/`@midnight`,
    /// `@weekly`, `@monthly`, `@yearly`/`@annually`). The error says what is wrong.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        let expanded = match text.strip_prefix('@') {
            Some(name) => match name.to_ascii_lowercase().as_str() {
                "hourly" => "0 0 * * * *",
                "daily" | "midnight" => "0 0 0 * * *",
                "weekly" => "0 0 0 * * 0",
                "monthly" => "0 0 0 1 * *",
                "yearly" | "annually" => "0 0 0 1 1 *",
                "reboot" => return Err("@reboot is not supported: a cron entry runs on a schedule".into()),
                _ => {
                    return Err(format!(
                        "unknown shorthand {text} (use @hourly, @daily, @weekly, @monthly, @yearly or @annually)"
                    ))
                }
            }
            .to_string(),
            None => text.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let fields: Vec<&str> = match fields.len() {
            5 => std::iter::once("0").chain(fields).collect(),
            6 => fields,
            n => {
                return Err(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found {n}"
                ))
            }
        };
        let (seconds, _) = SECOND.parse(fields[0])?;
        let (minutes, _) = MINUTE.parse(fields[1])?;
        let (hours, _) = HOUR.parse(fields[2])?;
        let (days, days_star) = DAY.parse(fields[3])?;
        let (months, _) = MONTH.parse(fields[4])?;
        let (weekdays, weekdays_star) = WEEKDAY.parse(fields[5])?;
        // 7 is Sunday, as 0.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        let schedule = Schedule {
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_star,
            weekdays_star,
            text: text.to_string(),
        };
        schedule.check_reachable()?;
        Ok(schedule)
    }

    /// Refuses a day-of-month that no chosen month has (`0 0 30 2 *`), which would
    /// never run. Only when the day fields combine with AND on the day of month.
    fn check_reachable(&self) -> Result<(), String> {
        if self.days_star || !self.weekdays_star {
            return Ok(());
        }
        const LONGEST: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        let reachable = (1..=12u32)
            .filter(|m| bit(self.months, *m))
            .any(|m| (1..=LONGEST[m as usize - 1]).any(|d| bit(self.days, d)));
        if reachable {
            Ok(())
        } else {
            Err("never runs: no chosen month has the chosen day of month".into())
        }
    }

    /// The schedule as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = bit(self.days, date.day());
        let dow = bit(self.weekdays, date.weekday().num_days_from_sunday());
        if self.days_star || self.weekdays_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first wall-clock time strictly after `after` (whole seconds) that the
    /// fields match; `None` past the horizon.
    fn next_wall(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let limit_year = after.year() + HORIZON_YEARS;
        let mut t = after.with_nanosecond(0)? + Duration::seconds(1);
        loop {
            if t.year() > limit_year {
                return None;
            }
            let date = t.date();
            if !bit(self.months, t.month()) {
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?;
            } else if !self.day_matches(date) {
                t = date.succ_opt()?.and_hms_opt(0, 0, 0)?;
            } else if !bit(self.hours, t.hour()) {
                t = date.and_hms_opt(t.hour(), 0, 0)? + Duration::hours(1);
            } else if !bit(self.minutes, t.minute()) {
                t = date.and_hms_opt(t.hour(), t.minute(), 0)? + Duration::minutes(1);
            } else if !bit(self.seconds, t.second()) {
                t += Duration::seconds(1);
            } else {
                return Some(t);
            }
        }
    }

    /// The first run strictly after the instant `after` (unix seconds) in `zone`;
    /// `None` if there is none within nine years. A wall-clock time that repeats
    /// (DST ends) runs at its first instant only; one that is skipped (DST starts)
    /// runs once, at the first instant after the gap.
    pub fn next_after(&self, after: i64, zone: &Zone) -> Option<i64> {
        let mut wall = zone.wall(after)?;
        loop {
            wall = self.next_wall(wall)?;
            let at = match zone.resolve(wall) {
                Resolved::At(at) => at,
                Resolved::Gap => zone.after_gap(wall)?,
            };
            if at > after {
                return Some(at);
            }
        }
    }

    /// The next `n` runs after `after`.
    pub fn upcoming(&self, after: i64, zone: &Zone, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t, zone) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Where wall-clock times of a schedule are read (`cron_tz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zone {
    /// UTC, the default (the original used the Erlang UTC clock).
    Utc,
    /// The machine's zone (`TZ`, `/etc/localtime`).
    Local,
    /// An IANA zone such as `Europe/Berlin`.
    Named(chrono_tz::Tz),
}

/// A wall-clock time as an instant.
enum Resolved {
    /// Its instant; the first of two when the wall clock repeats.
    At(i64),
    /// The clock skips it.
    Gap,
}

fn first<T: TimeZone>(r: LocalResult<DateTime<T>>) -> Resolved {
    match r {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Resolved::At(t.timestamp()),
        LocalResult::None => Resolved::Gap,
    }
}

impl Zone {
    fn resolve(&self, wall: NaiveDateTime) -> Resolved {
        match self {
            Zone::Utc => Resolved::At(wall.and_utc().timestamp()),
            Zone::Local => first(chrono::Local.from_local_datetime(&wall)),
            Zone::Named(tz) => first(tz.from_local_datetime(&wall)),
        }
    }

    /// The wall-clock time at instant `t`.
    fn wall(&self, t: i64) -> Option<NaiveDateTime> {
        let utc = DateTime::<Utc>::from_timestamp(t, 0)?;
        Some(match self {
            Zone::Utc => utc.naive_utc(),
            Zone::Local => utc.with_timezone(&chrono::Local).naive_local(),
            Zone::Named(tz) => utc.with_timezone(tz).naive_local(),
        })
    }

    /// The first instant after a gap that holds `wall`: the first wall-clock second
    /// after it that exists. Gaps last an hour, rarely a day; two days bound it.
    fn after_gap(&self, wall: NaiveDateTime) -> Option<i64> {
        let mut w = wall;
        for _ in 0..2 * 86_400 {
            w += Duration::seconds(1);
            if let Resolved::At(at) = self.resolve(w) {
                return Some(at);
            }
        }
        None
    }

    /// Instant `t` as `2026-03-08 03:00:00 EDT` in this zone.
    pub fn format(&self, t: i64) -> String {
        let Some(utc) = DateTime::<Utc>::from_timestamp(t, 0) else {
            return format!("@{t}");
        };
        match self {
            Zone::Utc => utc.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            Zone::Local => utc
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %:z")
                .to_string(),
            Zone::Named(tz) => utc
                .with_timezone(tz)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string(),
        }
    }
}

impl FromStr for Zone {
    type Err = String;
    /// `UTC` (any case), `local`, or an IANA name.
    fn from_str(s: &str) -> Result<Zone, String> {
        if s.eq_ignore_ascii_case("utc") {
            return Ok(Zone::Utc);
        }
        if s == "local" {
            return Ok(Zone::Local);
        }
        s.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| {
            format!("unknown time zone {s:?} (an IANA name such as Europe/Berlin, UTC, or local)")
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Utc => f.write_str("UTC"),
            Zone::Local => f.write_str("local"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC wall-clock time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp()
    }

    fn next(schedule: &str, after: i64) -> i64 {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(after, &Zone::Utc)
            .unwrap()
    }

    fn runs(schedule: &str, after: i64, zone: &Zone, n: usize) -> Vec<String> {
        Schedule::parse(schedule)
            .unwrap()
            .upcoming(after, zone, n)
            .into_iter()
            .map(|t| zone.format(t))
            .collect()
    }

    fn error(schedule: &str) -> String {
        Schedule::parse(schedule).unwrap_err()
    }

    #[test]
    fn every_minute_crosses_minute_hour_day_month_and_year() {
        let t = utc(2026, 12, 31, 23, 58, 30);
        assert_eq!(next("* * * * *", t), utc(2026, 12, 31, 23, 59, 0));
        assert_eq!(
            next("* * * * *", utc(2026, 12, 31, 23, 59, 0)),
            utc(2027, 1, 1, 0, 0, 0)
        );
        assert_eq!(
            next("* * * * *", utc(2026, 4, 30, 23, 59, 59)),
            utc(2026, 5, 1, 0, 0, 0)
        );
        assert_eq!(
            next("0 * * * *", utc(2026, 4, 30, 22, 0, 0)),
            utc(2026, 4, 30, 23, 0, 0)
        );
        assert_eq!(
            next("30 2 * * *", utc(2026, 4, 30, 2, 30, 0)),
            utc(2026, 5, 1, 2, 30, 0)
        );
    }

    #[test]
    fn steps_ranges_and_lists() {
        let t = utc(2026, 6, 1, 10, 7, 0);
        assert_eq!(next("*/15 * * * *", t), utc(2026, 6, 1, 10, 15, 0));
        assert_eq!(next("10-20/5 * * * *", t), utc(2026, 6, 1, 10, 10, 0));
        assert_eq!(next("5,50 * * * *", t), utc(2026, 6, 1, 10, 50, 0));
        assert_eq!(next("3/20 * * * *", t), utc(2026, 6, 1, 10, 23, 0));
        assert_eq!(
            next("0 9-17 * * *", utc(2026, 6, 1, 17, 0, 0)),
            utc(2026, 6, 2, 9, 0, 0)
        );
    }

    #[test]
    fn weekdays_are_posix_monday_is_1_and_sunday_0_or_7() {
        // 2026-06-01 is a Monday.
        let sunday_night = utc(2026, 5, 31, 23, 0, 0);
        assert_eq!(next("0 0 * * 1", sunday_night), utc(2026, 6, 1, 0, 0, 0));
        assert_eq!(next("0 0 * * mon", sunday_night), utc(2026, 6, 1, 0, 0, 0));
        assert_eq!(next("0 0 * * 0", sunday_night), utc(2026, 6, 7, 0, 0, 0));
        assert_eq!(next("0 0 * * 7", sunday_night), utc(2026, 6, 7, 0, 0, 0));
        assert_eq!(next("0 0 * * SUN", sunday_night), utc(2026, 6, 7, 0, 0, 0));
        assert_eq!(next("0 0 * * sat", sunday_night), utc(2026, 6, 6, 0, 0, 0));
        assert_eq!(next("0 0 * * 5-7", sunday_night), utc(2026, 6, 5, 0, 0, 0));
        assert_eq!(
            next("0 0 * * Tue-Thu", sunday_night),
            utc(2026, 6, 2, 0, 0, 0)
        );
    }

    #[test]
    fn month_names_and_numbers() {
        let t = utc(2026, 6, 1, 0, 0, 0);
        assert_eq!(next("0 0 1 jan *", t), utc(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("0 0 1 JUL,dec *", t), utc(2026, 7, 1, 0, 0, 0));
        assert_eq!(next("0 0 1 mar-may *", t), utc(2027, 3, 1, 0, 0, 0));
        assert_eq!(next("0 0 15 12 *", t), utc(2026, 12, 15, 0, 0, 0));
    }

    #[test]
    fn both_day_fields_restricted_fire_on_either_vixie_style() {
        // The 13th, or any Friday. 2026-06-05 is a Friday; the 13th is a Saturday.
        let t = utc(2026, 6, 1, 0, 0, 0);
        let s = Schedule::parse("0 0 13 * 5").unwrap();
        let got: Vec<i64> = s.upcoming(t, &Zone::Utc, 4);
        assert_eq!(
            got,
            vec![
                utc(2026, 6, 5, 0, 0, 0),
                utc(2026, 6, 12, 0, 0, 0),
                utc(2026, 6, 13, 0, 0, 0),
                utc(2026, 6, 19, 0, 0, 0)
            ]
        );
        // A `*` in either day field (even `*/2`) makes them AND: only days of
        // month 1, 3, … that are Fridays.
        assert_eq!(next("0 0 */2 * 5", t), utc(2026, 6, 5, 0, 0, 0));
        assert_eq!(
            next("0 0 */2 * 5", utc(2026, 6, 5, 0, 0, 0)),
            utc(2026, 6, 19, 0, 0, 0)
        );
        assert_eq!(next("0 0 13 * *", t), utc(2026, 6, 13, 0, 0, 0));
    }

    #[test]
    fn feb_29_waits_for_a_leap_year_even_across_2100() {
        assert_eq!(
            next("0 0 29 2 *", utc(2026, 3, 1, 0, 0, 0)),
            utc(2028, 2, 29, 0, 0, 0)
        );
        assert_eq!(
            next("0 12 29 feb *", utc(2096, 3, 1, 0, 0, 0)),
            utc(2104, 2, 29, 12, 0, 0)
        );
        assert_eq!(
            next("0 0 31 * *", utc(2026, 4, 1, 0, 0, 0)),
            utc(2026, 5, 31, 0, 0, 0)
        );
    }

    #[test]
    fn a_seconds_field_comes_first() {
        let t = utc(2026, 6, 1, 10, 0, 58);
        assert_eq!(next("* * * * * *", t), utc(2026, 6, 1, 10, 0, 59));
        assert_eq!(next("*/10 * * * * *", t), utc(2026, 6, 1, 10, 1, 0));
        assert_eq!(next("30 0 12 * * *", t), utc(2026, 6, 1, 12, 0, 30));
        assert_eq!(
            next("*/1 * * * * *", utc(2026, 12, 31, 23, 59, 59)),
            utc(2027, 1, 1, 0, 0, 0)
        );
    }

    #[test]
    fn shorthands() {
        let t = utc(2026, 6, 3, 10, 30, 0); // a Wednesday
        assert_eq!(next("@hourly", t), utc(2026, 6, 3, 11, 0, 0));
        assert_eq!(next("@daily", t), utc(2026, 6, 4, 0, 0, 0));
        assert_eq!(next("@midnight", t), utc(2026, 6, 4, 0, 0, 0));
        assert_eq!(next("@weekly", t), utc(2026, 6, 7, 0, 0, 0));
        assert_eq!(next("@monthly", t), utc(2026, 7, 1, 0, 0, 0));
        assert_eq!(next("@yearly", t), utc(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("@ANNUALLY", t), utc(2027, 1, 1, 0, 0, 0));
    }

    #[test]
    fn the_next_run_is_strictly_after_even_mid_second() {
        let t = utc(2026, 6, 1, 10, 0, 0);
        assert_eq!(next("0 * * * * *", t), utc(2026, 6, 1, 10, 1, 0));
    }

    #[test]
    fn each_bad_schedule_says_why() {
        for (s, want) in [
            ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found 4"),
            ("* * * * * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found 7"),
            ("60 * * * *", "minute 60 is out of range (0 to 59)"),
            ("* 24 * * *", "hour 24 is out of range (0 to 23)"),
            ("* * 0 * *", "day-of-month 0 is out of range (1 to 31)"),
            ("* * * 13 *", "month 13 is out of range (1 to 12)"),
            ("* * * * 8", "day-of-week 8 is out of range (0 to 7)"),
            ("61 * * * * *", "second 61 is out of range (0 to 59)"),
            ("x * * * *", "minute \"x\" is not a number"),
            ("* * * foo *", "month \"foo\" is not a number or a name (jan, feb, mar, apr, may, jun, jul, aug, sep, oct, nov, dec)"),
            ("* * * * funday", "day-of-week \"funday\" is not a number or a name (sun, mon, tue, wed, thu, fri, sat)"),
            ("*/0 * * * *", "minute step \"0\" must be 1 to 59"),
            ("*/x * * * *", "minute step \"x\" must be 1 to 59"),
            ("30-10 * * * *", "minute range 30-10 runs backwards"),
            ("1,,2 * * * *", "minute \"1,,2\" has an empty list item"),
            ("0 0 30 2 *", "never runs: no chosen month has the chosen day of month"),
            ("0 0 31 4,6,9,11 *", "never runs: no chosen month has the chosen day of month"),
            ("@reboot", "@reboot is not supported: a cron entry runs on a schedule"),
            ("@often", "unknown shorthand @often (use @hourly, @daily, @weekly, @monthly, @yearly or @annually)"),
            ("", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found 0"),
        ] {
            assert_eq!(error(s), want, "{s:?}");
        }
        // Feb 30 with a weekday too is fine: the days OR, the weekday fires.
        assert!(Schedule::parse("0 0 30 2 1").is_ok());
    }

    #[test]
    fn zones_parse_and_print() {
        assert_eq!("UTC".parse::<Zone>().unwrap(), Zone::Utc);
        assert_eq!("local".parse::<Zone>().unwrap(), Zone::Local);
        assert_eq!(
            "America/New_York".parse::<Zone>().unwrap().to_string(),
            "America/New_York"
        );
        assert_eq!(
            "Mars/Olympus".parse::<Zone>().unwrap_err(),
            "unknown time zone \"Mars/Olympus\" (an IANA name such as Europe/Berlin, UTC, or local)"
        );
        let berlin: Zone = "Europe/Berlin".parse().unwrap();
        // 09:00 in Berlin in June is 07:00 UTC.
        assert_eq!(
            runs("0 9 * * *", utc(2026, 6, 1, 0, 0, 0), &berlin, 1),
            ["2026-06-01 09:00:00 CEST"]
        );
        assert_eq!(
            Schedule::parse("0 9 * * *")
                .unwrap()
                .next_after(utc(2026, 6, 1, 0, 0, 0), &berlin),
            Some(utc(2026, 6, 1, 7, 0, 0))
        );
    }

    fn new_york() -> Zone {
        "America/New_York".parse().unwrap()
    }

    /// 2026-03-08: at 02:00 EST the clock jumps to 03:00 EDT.
    #[test]
    fn spring_forward_a_skipped_time_runs_once_at_the_next_valid_instant() {
        let ny = new_york();
        let before = utc(2026, 3, 8, 6, 0, 0); // 01:00 EST
        assert_eq!(
            runs("30 2 * * *", before, &ny, 3),
            [
                "2026-03-08 03:00:00 EDT",
                "2026-03-09 02:30:00 EDT",
                "2026-03-10 02:30:00 EDT"
            ]
        );
        // Every 15 minutes: 02:00 to 02:45 do not exist; they run once, at 03:00.
        assert_eq!(
            runs("*/15 * * * *", utc(2026, 3, 8, 6, 40, 0), &ny, 4),
            [
                "2026-03-08 01:45:00 EST",
                "2026-03-08 03:00:00 EDT",
                "2026-03-08 03:15:00 EDT",
                "2026-03-08 03:30:00 EDT"
            ]
        );
        // An entry at 03:00 itself is not doubled by the gap.
        assert_eq!(
            runs("0 2,3 * * *", before, &ny, 2),
            ["2026-03-08 03:00:00 EDT", "2026-03-09 02:00:00 EDT"]
        );
        // Every second through the gap: 01:59:59 EST, then 03:00:00 EDT.
        assert_eq!(
            runs("* * * * * *", utc(2026, 3, 8, 6, 59, 58), &ny, 3),
            [
                "2026-03-08 01:59:59 EST",
                "2026-03-08 03:00:00 EDT",
                "2026-03-08 03:00:01 EDT"
            ]
        );
    }

    /// 2026-11-01: at 02:00 EDT the clock falls back to 01:00 EST.
    #[test]
    fn fall_back_a_repeated_time_runs_once() {
        let ny = new_york();
        let before = utc(2026, 11, 1, 4, 0, 0); // 00:00 EDT
        assert_eq!(
            runs("30 1 * * *", before, &ny, 2),
            ["2026-11-01 01:30:00 EDT", "2026-11-02 01:30:00 EST"]
        );
        // Hourly: 01:00 once (EDT), then 02:00 EST, two real hours later.
        assert_eq!(
            runs("0 * * * *", before, &ny, 3),
            [
                "2026-11-01 01:00:00 EDT",
                "2026-11-01 02:00:00 EST",
                "2026-11-01 03:00:00 EST"
            ]
        );
        // Started during the repeated hour (01:10 EST): 01:30 ran already (EDT).
        assert_eq!(
            runs("30 1,2 * * *", utc(2026, 11, 1, 6, 10, 0), &ny, 1),
            ["2026-11-01 02:30:00 EST"]
        );
    }
}
