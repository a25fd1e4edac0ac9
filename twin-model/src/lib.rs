//! Doppel's domain model: pure data and functions, no runtime, no IO, no clock.
//!
//! - [`id`]: validated thing and shadow names;
//! - [`shadow`]: AWS IoT Device Shadow semantics (decide / apply, delta, payloads);
//! - [`command`]: a command's execution on one device (AWS IoT commands);
//! - [`job`]: a job's execution on one device (AWS IoT Jobs);
//! - [`rollout`]: a job's pace over its fleet (waves, rates) and its abort policy;
//! - [`event`]: [`TwinEvent`], what every consumer of a twin reads;
//! - [`filter`]: the fleet filter language (parser, printer, evaluator);
//! - [`topic`]: the MQTT topic names of the device API.

pub mod command;
pub mod event;
pub mod filter;
pub mod id;
pub mod job;
pub mod json;
pub mod new_job;
pub mod progress;
pub mod rejection;
pub mod rollout;
pub mod shadow;
pub mod topic;

pub use event::{Connectivity, TwinEvent};
pub use filter::{Filter, FilterError, FilterTarget};
pub use id::{DeviceId, NameError, PARTITIONS, ShadowName};
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

#[cfg(test)]
mod tests {
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
