//! Times on the command line: `--since/--until` and the timestamps printed in tables (UTC).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// Parses a point in time: an RFC 3339 time (`2025-01-31T12:00:00Z`), a UTC date and time
/// (`2025-01-31 12:00`, `2025-01-31T12:00:00`), a UTC date (`2025-01-31`, midnight), or a
/// duration ago (`90m`, `24h`, `7d`). Returns Unix micros.
pub fn parse_time(text: &str) -> Result<i64, String> {
    parse_time_at(text, Utc::now())
}

fn parse_time_at(text: &str, now: DateTime<Utc>) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_micros());
    }
    let ago = match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .ok()
            .filter(|d| *d > 0)
            .map(|d| std::time::Duration::from_secs(d * 86_400)),
        None => super::parse_duration(text).ok(),
    };
    // Checked: a far-past duration (`100000000d`) panicked in chrono's subtraction.
    let at = ago
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| now.checked_sub_signed(d));
    match at {
        Some(at) => Ok(at.timestamp_micros()),
        None => Err(format!(
            "invalid time {text:?}: use a date (2025-01-31), a UTC time (2025-01-31T12:00:00Z) \
             or a duration ago (90m, 24h, 7d)"
        )),
    }
}

/// `2025-01-31 12:00:05` (UTC), or `-` for an unset time.
pub fn format_time(unix_micros: i64) -> String {
    if unix_micros == 0 {
        return "-".into();
    }
    DateTime::from_timestamp_micros(unix_micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| unix_micros.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = DateTime::parse_from_rfc3339("2025-02-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let day = 86_400_000_000;
        let feb1 = now.timestamp_micros();
        assert_eq!(parse_time_at("2025-02-01", now), Ok(feb1));
        assert_eq!(parse_time_at("2025-02-01T00:00:00Z", now), Ok(feb1));
        assert_eq!(parse_time_at("2025-02-01T01:00:00+01:00", now), Ok(feb1));
        assert_eq!(parse_time_at("2025-02-01 00:00", now), Ok(feb1));
        assert_eq!(parse_time_at("7d", now), Ok(feb1 - 7 * day));
        assert_eq!(parse_time_at("24h", now), Ok(feb1 - day));
        assert!(parse_time_at("yesterday", now).is_err());
        assert!(parse_time_at("0d", now).is_err());
        assert_eq!(format_time(feb1 + 5_000_000), "2025-02-01 00:00:05");
        assert_eq!(format_time(0), "-");
    }
}
