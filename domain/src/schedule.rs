//! Cron schedules of pipeline triggers: a five-field expression (minute hour day-of-month month
//! day-of-week, as in Vixie cron, plus croner's `L`, `W` and `#`) evaluated in an IANA time
//! zone. The same parser checks a definition when it is saved and computes fire times in the
//! server's scheduler, so a saved schedule always means the same thing.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

/// Why a schedule is refused, and which field of the trigger is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// The cron expression.
    Cron(String),
    /// The time zone.
    Timezone(String),
}

/// Parses a five-field cron expression. Errors are messages for people.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "cron expression must have 5 fields (minute hour day-of-month month day-of-week); found {fields}"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression: {e}"))?;
    // A pattern such as `0 0 31 2 *` parses but never fires; say so at save time. Searching
    // from a fixed instant keeps this pure (and every valid pattern fires within 28 years).
    let from = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single().ok_or("unreachable")?;
    cron.find_next_occurrence(&from, false).map_err(|_| "the cron expression never matches a date".to_owned())?;
    Ok(cron)
}

/// Parses an IANA time zone name (`Europe/Paris`); `None` is UTC.
pub fn parse_timezone(name: Option<&str>) -> Result<Tz, String> {
    match name {
        None => Ok(Tz::UTC),
        Some(n) => {
            n.parse::<Tz>().map_err(|_| format!("unknown time zone {n:?} (use an IANA name such as Europe/Paris)"))
        }
    }
}

impl Schedule {
    /// Parses a trigger's `cron` and `timezone`.
    pub fn parse(cron: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let cron = parse_cron(cron).map_err(ScheduleError::Cron)?;
        let tz = parse_timezone(timezone).map_err(ScheduleError::Timezone)?;
        Ok(Self { cron, tz })
    }

    /// The first fire time strictly after `t` (whole minutes, in the schedule's time zone, then
    /// as UTC). `None` when there is none before year 5000.
    #[must_use]
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok().map(|n| n.with_timezone(&Utc))
    }

    /// The time zone.
    #[must_use]
    pub fn timezone(&self) -> Tz {
        self.tz
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_fields_only_and_real_dates_only() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("0 9 * * MON-FRI").is_ok());
        assert!(parse_cron("* * * * * *").unwrap_err().contains("found 6"));
        assert!(parse_cron("@hourly").unwrap_err().contains("found 1"));
        assert!(parse_cron("61 * * * *").unwrap_err().starts_with("invalid cron expression"));
        assert!(parse_cron("a b c d e").is_err());
        assert!(parse_cron("0 0 31 2 *").unwrap_err().contains("never matches"));
        assert!(parse_cron("0 0 29 2 *").is_ok());
    }

    #[test]
    fn time_zones() {
        assert_eq!(parse_timezone(None), Ok(Tz::UTC));
        assert!(parse_timezone(Some("Europe/Paris")).is_ok());
        assert!(parse_timezone(Some("Mars/Olympus")).unwrap_err().contains("unknown time zone"));
        assert!(parse_timezone(Some("")).is_err());
    }

    #[test]
    fn next_fire_times_follow_the_zone_and_dst() {
        let s = Schedule::parse("0 9 * * *", Some("Europe/Paris")).unwrap();
        // Winter: UTC+1; summer: UTC+2.
        assert_eq!(s.next_after(at("2026-01-10T12:00:00Z")), Some(at("2026-01-11T08:00:00Z")));
        assert_eq!(s.next_after(at("2026-07-10T12:00:00Z")), Some(at("2026-07-11T07:00:00Z")));
        // Strictly after: a time on the schedule gives the next one.
        let m = Schedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(m.next_after(at("2026-01-10T12:15:00Z")), Some(at("2026-01-10T12:30:00Z")));
        assert_eq!(m.next_after(at("2026-01-10T12:14:59.900Z")), Some(at("2026-01-10T12:15:00Z")));
        assert!(matches!(Schedule::parse("* * *", None), Err(ScheduleError::Cron(_))));
        assert!(matches!(Schedule::parse("* * * * *", Some("UTC+1")), Err(ScheduleError::Timezone(_))));
    }
}
