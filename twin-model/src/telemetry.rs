//! Device telemetry: the topics devices publish it on, its payload, the latest value of
//! each key, and the buckets of a series.
//!
//! - Topics: each pattern of the `telemetry_topics` setting ([`TelemetryTopics`]) names
//!   the thing in one level (`{thing}`) and may name the reading's type (`{type}`);
//!   AWS IoT Basic Ingest (`$aws/rules/<route>/…`) sends a reading to one route alone.
//! - Payload ([`Reading::parse`]): a JSON object of values, with an optional
//!   `timestamp`; nested objects become dotted keys (`gps.lat`).
//! - Latest values ([`Latest`]): per key, the newest reading's value and time.
//! - Series ([`Series`]): numeric readings bucketed by time, count / min / max / avg.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::json;

/// The default `telemetry_topics`: AWS's topic guidance for device telemetry,
/// `dt/<application>/<thing>/<type>`.
pub const DEFAULT_TOPIC: &str = "dt/+/{thing}/{type}";
/// The prefix of AWS IoT Basic Ingest topics: `$aws/rules/<route name>/<anything>`.
pub const BASIC_INGEST_PREFIX: &str = "$aws/rules/";
/// Keys whose latest value a thing keeps, at most.
pub const MAX_KEYS: usize = 256;
/// How far in the future a device's timestamp may be, in milliseconds (clock skew).
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;
/// Buckets one series query may ask for, at most.
pub const MAX_BUCKETS: u64 = 10_000;
/// Longest telemetry key (dotted), in bytes.
pub const MAX_KEY_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Any,
    Thing,
    Type,
}

/// One `telemetry_topics` pattern: topic levels, where `+` is any level, `{thing}` the
/// publishing thing's name, `{type}` the reading's type, and a final `#` any further
/// levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    levels: Vec<Level>,
    rest: bool,
}

impl std::str::FromStr for TopicPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("telemetry topic pattern `{text}`: {why}"));
        if text.starts_with('$') {
            return bad(
                "topics starting with `$` are reserved (AWS IoT Basic Ingest is always on)",
            );
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::new();
        let mut rest = false;
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "#" if i == parts.len() - 1 => {
                    rest = true;
                    continue;
                }
                "+" => Level::Any,
                "{thing}" => Level::Thing,
                "{type}" => Level::Type,
                "" => return bad("a level is empty"),
                p if p.contains(['#', '+', '{', '}', '\0']) => {
                    return bad("`#` only as the last level, `+`, `{thing}` and `{type}` only as whole levels");
                }
                p => Level::Literal(p.to_owned()),
            });
        }
        let count = |l: &Level| levels.iter().filter(|x| *x == l).count();
        if count(&Level::Thing) != 1 {
            return bad("needs `{thing}` as exactly one level");
        }
        if count(&Level::Type) > 1 {
            return bad("`{type}` may appear once");
        }
        Ok(Self {
            text: text.to_owned(),
            levels,
            rest,
        })
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where a telemetry publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A telemetry topic naming `thing` (which must be the publisher), of type `kind`
    /// when the pattern names one.
    Topic { thing: String, kind: Option<String> },
    /// AWS IoT Basic Ingest: the reading goes to the route named `route` alone.
    BasicIngest { route: String },
}

impl TopicPattern {
    fn classify(&self, topic: &str) -> Option<Destination> {
        let mut parts = topic.split('/');
        let (mut thing, mut kind) = (None, None);
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Any => {}
                Level::Thing => thing = Some(part),
                Level::Type => kind = Some(part.to_owned()),
            }
        }
        if parts.next().is_some() && !self.rest {
            return None;
        }
        Some(Destination::Topic {
            thing: thing?.to_owned(),
            kind,
        })
    }
}

/// The `telemetry_topics` setting, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryTopics(Vec<TopicPattern>);

impl Default for TelemetryTopics {
    fn default() -> Self {
        Self(vec![
            DEFAULT_TOPIC.parse().expect("the default pattern parses"),
        ])
    }
}

impl TelemetryTopics {
    pub fn new(patterns: Vec<TopicPattern>) -> Self {
        Self(patterns)
    }

    pub fn patterns(&self) -> &[TopicPattern] {
        &self.0
    }

    /// Where a publish on `topic` goes, if it is telemetry (the first pattern that matches
    /// decides).
    pub fn classify(&self, topic: &str) -> Option<Destination> {
        if let Some(rest) = topic.strip_prefix(BASIC_INGEST_PREFIX) {
            let (route, _) = rest.split_once('/')?;
            return (!route.is_empty()).then(|| Destination::BasicIngest {
                route: route.to_owned(),
            });
        }
        self.0.iter().find_map(|p| p.classify(topic))
    }
}

/// A telemetry message, read: its time and its values by dotted key (`null`: forget the
/// key's latest value).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Milliseconds since the epoch: the device's `timestamp`, or when it was received.
    pub at: u64,
    pub values: Vec<(String, Value)>,
    /// The values as the device nested them (without `timestamp`), for events.
    pub body: Map<String, Value>,
}

impl Reading {
    /// Reads a telemetry payload received at `now` (milliseconds). Refused, with the
    /// reason: not JSON, not an object, no values, nesting deeper than `max_depth`, more
    /// than [`MAX_KEYS`] keys, or a `timestamp` that is neither epoch milliseconds nor RFC
    /// 3339, or over [`MAX_FUTURE_MS`] ahead.
    pub fn parse(payload: &[u8], now: u64, max_depth: usize) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| format!("telemetry payload is not JSON: {e}"))?;
        let Value::Object(mut body) = value else {
            return Err("telemetry payload must be a JSON object of values".into());
        };
        let at = match body.remove("timestamp") {
            None => now,
            Some(Value::Number(n)) => n.as_u64().ok_or(
                "timestamp must be milliseconds since the epoch (a whole number) or an RFC 3339 string",
            )?,
            Some(Value::String(s)) => crate::parse_rfc3339(&s)
                .map_err(|e| format!("timestamp is not RFC 3339: {e}"))?,
            Some(_) => {
                return Err("timestamp must be milliseconds since the epoch or an RFC 3339 string".into());
            }
        };
        if at > now.saturating_add(MAX_FUTURE_MS) {
            return Err(format!(
                "timestamp {} is more than {} minutes ahead of the server's clock",
                crate::rfc3339(at),
                MAX_FUTURE_MS / 60_000
            ));
        }
        if json::depth(&Value::Object(body.clone())) > max_depth {
            return Err(format!("telemetry nests deeper than {max_depth} levels"));
        }
        let mut values = Vec::new();
        flatten(&mut values, &mut String::new(), &body);
        if values.is_empty() {
            return Err("telemetry payload has no values".into());
        }
        if let Some((key, _)) = values.iter().find(|(k, _)| {
            k.len() > MAX_KEY_BYTES || k.split('.').any(|p| p.is_empty() || p.contains('\0'))
        }) {
            return Err(format!(
                "telemetry key {key:?} is empty, has an empty or NUL part, or is over {MAX_KEY_BYTES} bytes"
            ));
        }
        if values.len() > MAX_KEYS {
            return Err(format!(
                "telemetry payload has {} keys; a thing keeps at most {MAX_KEYS}",
                values.len()
            ));
        }
        Ok(Self { at, values, body })
    }

    /// The numeric values, for the series.
    pub fn numbers(&self) -> impl Iterator<Item = (&str, f64)> {
        self.values
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()?)))
    }
}

fn flatten(out: &mut Vec<(String, Value)>, prefix: &mut String, map: &Map<String, Value>) {
    for (k, v) in map {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(k);
        match v {
            Value::Object(m) if !m.is_empty() => flatten(out, prefix, m),
            Value::Object(_) => {}
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.truncate(len);
    }
}

/// The newest value of one key, and when it was read (milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub value: Value,
    pub at: u64,
}

/// A thing's latest telemetry: per dotted key, the newest reading.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Latest(BTreeMap<String, Sample>);

impl Latest {
    /// `self` with `reading` applied: a key takes the reading's value unless it holds a
    /// newer one (a device sending buffered readings late does not roll it back); `null`
    /// forgets the key. Refused when the thing would keep more than [`MAX_KEYS`] keys.
    pub fn with(&self, reading: &Reading) -> Result<Self, String> {
        let mut next = self.0.clone();
        for (key, value) in &reading.values {
            if next.get(key).is_some_and(|s| s.at > reading.at) {
                continue;
            }
            if value.is_null() {
                next.remove(key);
            } else {
                next.insert(
                    key.clone(),
                    Sample {
                        value: value.clone(),
                        at: reading.at,
                    },
                );
            }
        }
        if next.len() > MAX_KEYS {
            return Err(format!(
                "a thing keeps the latest value of at most {MAX_KEYS} telemetry keys"
            ));
        }
        Ok(Self(next))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Sample)> {
        self.0.iter().map(|(k, s)| (k.as_str(), s))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The values nested by their dotted keys, as the filter language reads them
    /// (`telemetry.gps.lat`). Where a key is both a value and a prefix (`a` and `a.b`),
    /// the longer one wins.
    pub fn nested(&self) -> Map<String, Value> {
        let mut root = Map::new();
        for (key, sample) in &self.0 {
            let mut parts = key.split('.').peekable();
            let mut map = &mut root;
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    map.insert(part.to_owned(), sample.value.clone());
                    break;
                }
                let slot = map
                    .entry(part.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                map = slot.as_object_mut().expect("made an object above");
            }
        }
        root
    }
}

/// One bucket of a series: readings at `start` ≤ t < `start` + step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub start: u64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Bucket {
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Buckets of `step` milliseconds over `since` ≤ t < `until`, filled one reading at a time
/// (a store streams its points in, in any order).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    since: u64,
    step: u64,
    buckets: Vec<Bucket>,
}

impl Series {
    /// Refused when `until` is not after `since`, `step` is 0, or there would be more than
    /// [`MAX_BUCKETS`] buckets.
    pub fn new(since: u64, until: u64, step: u64) -> Result<Self, String> {
        if until <= since {
            return Err("until must be after since".into());
        }
        if step == 0 {
            return Err("step must be positive".into());
        }
        let n = (until - since).div_ceil(step);
        if n > MAX_BUCKETS {
            return Err(format!(
                "{n} buckets asked for; at most {MAX_BUCKETS}: use a longer step or a shorter range"
            ));
        }
        let buckets = (0..n)
            .map(|i| Bucket {
                start: since + i * step,
                count: 0,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                sum: 0.0,
            })
            .collect();
        Ok(Self {
            since,
            step,
            buckets,
        })
    }

    /// The range covered: `since` ≤ t < `until`.
    pub fn range(&self) -> (u64, u64) {
        (
            self.since,
            self.since + self.step * self.buckets.len() as u64,
        )
    }

    pub fn add(&mut self, at: u64, value: f64) {
        let Some(i) = at.checked_sub(self.since).map(|d| d / self.step) else {
            return;
        };
        if let Some(b) = self.buckets.get_mut(i as usize) {
            b.count += 1;
            b.min = b.min.min(value);
            b.max = b.max.max(value);
            b.sum += value;
        }
    }

    pub fn buckets(self) -> Vec<Bucket> {
        self.buckets
    }
}

/// The day (since the epoch, UTC) of a time in milliseconds: how stores partition series.
pub fn day(millis: u64) -> u64 {
    millis / 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topics(patterns: &[&str]) -> TelemetryTopics {
        TelemetryTopics::new(patterns.iter().map(|p| p.parse().unwrap()).collect())
    }

    #[test]
    fn topics_name_the_thing_and_the_type() {
        let t = TelemetryTopics::default();
        assert_eq!(
            t.classify("dt/plant/dev-1/env"),
            Some(Destination::Topic {
                thing: "dev-1".into(),
                kind: Some("env".into())
            })
        );
        assert_eq!(t.classify("dt/plant/dev-1"), None);
        assert_eq!(t.classify("dt/plant/dev-1/env/extra"), None);
        assert_eq!(t.classify("$aws/things/dev-1/shadow/update"), None);
        assert_eq!(
            t.classify("$aws/rules/to_kafka/anything/at/all"),
            Some(Destination::BasicIngest {
                route: "to_kafka".into()
            })
        );
        assert_eq!(t.classify("$aws/rules/to_kafka"), None);
        let t = topics(&["sensors/{thing}/#"]);
        assert_eq!(
            t.classify("sensors/dev-2/a/b"),
            Some(Destination::Topic {
                thing: "dev-2".into(),
                kind: None
            })
        );
        assert_eq!(
            t.classify("sensors/dev-2"),
            Some(Destination::Topic {
                thing: "dev-2".into(),
                kind: None
            })
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for (p, why) in [
            ("dt/+/+/{type}", "exactly one"),
            ("dt/{thing}/{thing}", "exactly one"),
            ("$aws/{thing}", "reserved"),
            ("dt/#/{thing}", "`#` only as the last"),
            ("dt//{thing}", "empty"),
            ("dt/x{thing}", "whole levels"),
            ("{thing}/{type}/{type}", "once"),
        ] {
            let e = p.parse::<TopicPattern>().unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
    }

    #[test]
    fn payloads_are_flattened_and_timed() {
        let now = 1_800_000_000_000;
        let r = Reading::parse(
            br#"{"temp": 21.5, "gps": {"lat": 1, "lon": 2}, "ok": true, "mode": "eco", "tags": [1,2], "gone": null}"#,
            now,
            6,
        )
        .unwrap();
        assert_eq!(r.at, now);
        let keys: Vec<&str> = r.values.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["temp", "gps.lat", "gps.lon", "ok", "mode", "tags", "gone"]
        );
        let numbers: Vec<(&str, f64)> = r.numbers().collect();
        assert_eq!(
            numbers,
            [("temp", 21.5), ("gps.lat", 1.0), ("gps.lon", 2.0)]
        );
        let r = Reading::parse(br#"{"timestamp": 1700000000123, "t": 1}"#, now, 6).unwrap();
        assert_eq!(r.at, 1_700_000_000_123);
        assert!(!r.body.contains_key("timestamp"));
        let r = Reading::parse(br#"{"timestamp": "2026-12-02T10:00:00Z", "t": 1}"#, now, 6);
        assert_eq!(
            r.unwrap().at,
            crate::parse_rfc3339("2026-12-02T10:00:00Z").unwrap()
        );
    }

    #[test]
    fn bad_payloads_are_refused_with_the_reason() {
        let now = 1_800_000_000_000;
        let ahead = format!(r#"{{"timestamp": {}, "t": 1}}"#, now + MAX_FUTURE_MS + 1);
        let many = serde_json::to_vec(
            &(0..=MAX_KEYS)
                .map(|i| (format!("k{i}"), json!(i)))
                .collect::<Map<_, _>>(),
        )
        .unwrap();
        for (payload, why) in [
            (&b"21.5"[..], "a JSON object"),
            (b"not json", "not JSON"),
            (b"{}", "no values"),
            (br#"{"timestamp": 5}"#, "no values"),
            (br#"{"timestamp": -5, "t": 1}"#, "whole number"),
            (br#"{"timestamp": "yesterday", "t": 1}"#, "RFC 3339"),
            (br#"{"timestamp": true, "t": 1}"#, "RFC 3339"),
            (ahead.as_bytes(), "ahead"),
            (br#"{"a":{"b":{"c":1}}}"#, "deeper than 2"),
            (&many, "at most 256"),
            (br#"{"": 1}"#, "empty"),
            (br#"{"a": {"": 1}}"#, "empty"),
            (br#"{"a\u0000b": 1}"#, "NUL"),
        ] {
            let e = Reading::parse(payload, now, 2).unwrap_err();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn latest_keeps_the_newest_reading_of_each_key() {
        let read = |p: &str, at: u64| Reading::parse(p.as_bytes(), at, 6).unwrap();
        let latest = Latest::default()
            .with(&read(
                r#"{"temp": 20, "hum": 40, "gps": {"lat": 1}}"#,
                2_000,
            ))
            .unwrap();
        // An older reading arriving late does not roll a key back; a key it alone has is taken.
        let latest = latest
            .with(&read(
                r#"{"timestamp": 1000, "temp": 5, "co2": 400}"#,
                3_000,
            ))
            .unwrap();
        let latest = latest.with(&read(r#"{"hum": null}"#, 4_000)).unwrap();
        assert_eq!(
            latest.nested(),
            json!({"temp": 20, "co2": 400, "gps": {"lat": 1}})
                .as_object()
                .unwrap()
                .clone()
        );
        let full = (0..MAX_KEYS).fold(Latest::default(), |l, i| {
            l.with(&read(&format!(r#"{{"k{i}": 1}}"#), 1)).unwrap()
        });
        assert!(full.with(&read(r#"{"one_more": 1}"#, 1)).is_err());
        assert!(full.with(&read(r#"{"k0": 2}"#, 1)).is_ok());
    }

    #[test]
    fn series_buckets_count_min_max_and_average() {
        let mut s = Series::new(1_000, 4_000, 1_000).unwrap();
        for (at, v) in [
            (999, 100.0),
            (1_000, 1.0),
            (1_999, 3.0),
            (3_500, -2.0),
            (4_000, 50.0),
        ] {
            s.add(at, v);
        }
        let b = s.buckets();
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].start, b[0].count, b[0].min, b[0].max),
            (1_000, 2, 1.0, 3.0)
        );
        assert_eq!(b[0].avg(), Some(2.0));
        assert_eq!((b[1].count, b[1].avg()), (0, None));
        assert_eq!((b[2].start, b[2].count, b[2].min), (3_000, 1, -2.0));
        assert!(
            Series::new(0, 1_000_000, 1)
                .unwrap_err()
                .contains("at most 10000")
        );
        assert!(Series::new(5, 5, 1).is_err());
        assert!(Series::new(0, 5, 0).is_err());
    }
}
