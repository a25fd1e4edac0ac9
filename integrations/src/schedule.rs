//! When a failed event is tried again.

use std::time::Duration;

/// Standard Webhooks' schedule: after the first attempt fails, wait 5 s, then 5 min,
/// 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h (about 3 days in all); then give up.
pub const STANDARD: [Duration; 9] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
    Duration::from_secs(24 * 3600),
];

/// How long to wait after attempt `attempt` (1-based) failed, or `None` to give up:
/// the schedule's step, ±10 % jitter (from `random`, 0..=u16::MAX) so that many events
/// that failed together do not come back together, or what the destination asked for
/// (`Retry-After`, capped at 24 h) when that is longer.
pub fn next(
    schedule: &[Duration],
    attempt: u32,
    retry_after: Option<Duration>,
    random: u16,
) -> Option<Duration> {
    let step = *schedule.get(usize::try_from(attempt).ok()?.checked_sub(1)?)?;
    let jittered = jitter(step, random);
    let asked = retry_after.map(|d| d.min(Duration::from_secs(24 * 3600)));
    Some(asked.map_or(jittered, |a| a.max(jittered)))
}

/// The longest wait between attempts to a Redis or Kafka destination.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long to wait after attempt `attempt` (1-based) to a Redis or Kafka destination
/// failed: 1 s, doubling up to [`BACKOFF_MAX`], ±10 %; such a destination is tried until
/// it takes the event.
pub fn backoff(attempt: u32, random: u16) -> Duration {
    let step = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(BACKOFF_MAX);
    jitter(step, random)
}

/// `step` ±10 %, by `random` (0..=u16::MAX).
fn jitter(step: Duration, random: u16) -> Duration {
    let spread = step.as_secs_f64() * 0.2 * (f64::from(random) / f64::from(u16::MAX) - 0.5);
    Duration::from_secs_f64((step.as_secs_f64() + spread).max(0.0))
}

/// A `Retry-After` header: seconds (the HTTP-date form is taken as "no advice").
pub fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Parses a schedule setting: durations separated by commas (`5s,5m,30m,2h`); `ms`,
/// `s`, `m`, `h` and `d` units.
pub fn parse(setting: &str) -> Result<Vec<Duration>, String> {
    setting
        .split(',')
        .map(|s| {
            let s = s.trim();
            let split = s
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("`{s}` has no unit (ms, s, m, h or d)"))?;
            let (n, unit) = s.split_at(split);
            let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration"))?;
            let ms = match unit {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(format!("`{s}`: the unit is ms, s, m, h or d")),
            };
            Ok(Duration::from_millis(n.saturating_mul(ms)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_schedule_with_jitter_and_gives_up_after_it() {
        let s = &STANDARD;
        let first = next(s, 1, None, u16::MAX / 2).unwrap();
        assert!((4.99..=5.01).contains(&first.as_secs_f64()), "{first:?}");
        let low = next(s, 2, None, 0).unwrap();
        let high = next(s, 2, None, u16::MAX).unwrap();
        assert_eq!(low, Duration::from_secs(270));
        assert_eq!(high, Duration::from_secs(330));
        assert!(next(s, 9, None, 0).is_some());
        assert_eq!(next(s, 10, None, 0), None);
        assert_eq!(next(s, 0, None, 0), None);
    }

    #[test]
    fn a_longer_retry_after_is_honoured_within_a_day() {
        let s = &STANDARD;
        let asked = next(s, 1, Some(Duration::from_secs(120)), 0).unwrap();
        assert_eq!(asked, Duration::from_secs(120));
        let shorter = next(s, 2, Some(Duration::from_secs(1)), 0).unwrap();
        assert_eq!(shorter, Duration::from_secs(270));
        let capped = next(s, 1, Some(Duration::from_secs(10 * 86_400)), 0).unwrap();
        assert_eq!(capped, Duration::from_secs(86_400));
        assert_eq!(retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn streams_back_off_doubling_to_a_minute_and_never_give_up() {
        let mid = u16::MAX / 2;
        let secs = |a| backoff(a, mid).as_secs_f64().round();
        let waits: Vec<f64> = (1..=9).map(secs).collect();
        assert_eq!(waits, [1., 2., 4., 8., 16., 32., 60., 60., 60.]);
        assert_eq!(secs(u32::MAX), 60.);
        assert_eq!(backoff(3, 0), Duration::from_millis(3600));
    }

    #[test]
    fn schedules_parse_with_units() {
        assert_eq!(
            parse("100ms, 2s,5m,1h,1d").unwrap(),
            vec![
                Duration::from_millis(100),
                Duration::from_secs(2),
                Duration::from_secs(300),
                Duration::from_secs(3600),
                Duration::from_secs(86_400)
            ]
        );
        assert!(parse("5").unwrap_err().contains("no unit"));
        assert!(parse("5w").unwrap_err().contains("unit"));
    }
}
