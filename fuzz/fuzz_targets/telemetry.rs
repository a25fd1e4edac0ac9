//! Whatever a device publishes as telemetry, and whatever an operator writes in
//! `telemetry_topics`, reading it gives a value or a reason: never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twin_model::telemetry::{Latest, Reading, TelemetryTopics, TopicPattern};

fuzz_target!(|data: &[u8]| {
    if let Ok(reading) = Reading::parse(data, 1_800_000_000_000, 6) {
        if let Ok(latest) = Latest::default().with(&reading) {
            let _ = latest.nested();
            let _ = latest.with(&reading);
        }
        let _ = reading.numbers().count();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let (pattern, topic) = text.split_once('\n').unwrap_or((text, "dt/a/b/c"));
        if let Ok(p) = pattern.parse::<TopicPattern>() {
            let _ = TelemetryTopics::new(vec![p]).classify(topic);
        }
        let _ = TelemetryTopics::default().classify(text);
    }
});
