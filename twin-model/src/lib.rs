//! Doppel's domain model: pure data and functions, no runtime, no IO, no clock.
//!
//! - [`id`]: validated thing and shadow names;
//! - [`certificate`]: device certificates' ids and statuses;
//! - [`shadow`]: AWS IoT Device Shadow semantics (decide / apply, delta, payloads);
//! - [`command`]: a command's execution on one device (AWS IoT commands);
//! - [`job`]: a job's execution on one device (AWS IoT Jobs);
//! - [`rollout`]: a job's pace over its fleet (waves, rates) and its abort policy;
//! - [`event`]: [`TwinEvent`], what every consumer of a twin reads;
//! - [`filter`]: the fleet filter language (parser, printer, evaluator);
//! - [`provisioning`]: fleet provisioning templates;
//! - [`route`]: the event types routes carry, and event ids;
//! - [`history`]: a shadow's retained changes and its state at an instant (time travel);
//! - [`telemetry`]: device telemetry's topics, payloads, latest values and series;
//! - [`topic`]: the MQTT topic names of the device API.

pub mod certificate;
pub mod command;
pub mod event;
pub mod filter;
pub mod history;
pub mod id;
pub mod job;
pub mod json;
pub mod new_job;
pub mod progress;
pub mod provisioning;
pub mod rejection;
pub mod rollout;
pub mod route;
pub mod shadow;
pub mod telemetry;
pub mod topic;

pub use event::{Connectivity, TwinEvent};
pub use filter::{Filter, FilterError, FilterTarget};
pub use id::{DeviceId, NameError, PARTITIONS, ShadowName, partition_tokens};
pub use rejection::{Rejection, RejectionKind};
pub use shadow::{ChangeOp, Limits, SectionPatch, Shadow, ShadowChange, UpdateRequest};

/// Formats milliseconds since the Unix epoch as an RFC 3339 UTC timestamp
/// (`2026-11-23T08:21:00.123Z`).
pub fn rfc3339(millis: u64) -> String {
    let secs = millis / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        millis % 1000
    )
}

/// Parses an RFC 3339 timestamp (`2026-11-23T08:21:00Z`, `2026-11-23T09:21:00.5+01:00`)
/// into milliseconds since the Unix epoch; digits past milliseconds are dropped.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{text:?} is not an RFC 3339 timestamp ({why})");
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let digits = b.get(from..from + len).ok_or_else(|| bad("too short"))?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
        }
        Ok(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| match b.get(at) {
        Some(c) if allowed.contains(c) => Ok(()),
        _ => Err(bad("expected YYYY-MM-DDTHH:MM:SS")),
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("no such time of day"));
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(bad("no digits after the decimal point"));
        }
        millis *= 10_i64.pow(3 - (at - start).min(3) as u32);
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            sep(at + 3, b":")?;
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if h > 23 || m > 59 {
                return Err(bad("no such offset"));
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return Err(bad("expected Z or an offset such as +02:00 at the end")),
    };
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    u64::try_from(secs * 1000 + millis).map_err(|_| bad("before 1970"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_parses_what_it_formats_and_offsets() {
        for ms in [0, 951_782_400_000, 1_795_422_061_123, 4_102_444_799_999] {
            assert_eq!(super::parse_rfc3339(&super::rfc3339(ms)), Ok(ms));
        }
        assert_eq!(
            super::parse_rfc3339("2026-11-23T09:21:01.1234+01:00"),
            Ok(1_795_422_061_123)
        );
        assert_eq!(
            super::parse_rfc3339("2026-11-23T08:21:01.5Z"),
            Ok(1_795_422_061_500)
        );
        for bad in [
            "2026-11-23",
            "2026-02-30T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T08:21:01",
            "2026-11-23T08:21:01.Z",
            "1969-12-31T23:59:59Z",
            "2026-11-23T08:21:01Zjunk",
        ] {
            assert!(super::parse_rfc3339(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            super::rfc3339(1_795_422_061_123),
            "2026-11-23T08:21:01.123Z"
        );
    }
}
