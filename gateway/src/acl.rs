//! Topic filters and the device policy.
//!
//! A device (client id = thing name) may publish and subscribe only inside
//! `$aws/things/{its name}/` and `$aws/commands/things/{its name}/`. This is the policy
//! AWS IoT users write by hand for every fleet; here it is the only policy. Besides, a
//! device publishes (never subscribes to) telemetry on the `telemetry_topics` that name it
//! and on AWS IoT Basic Ingest topics: the session core checks those, as it knows the
//! patterns.

use twin_model::DeviceId;
use twin_model::topic::{COMMANDS_PREFIX, THINGS_PREFIX};

/// Whether `filter` is a syntactically valid MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

/// Whether a topic name (no wildcards) is valid for PUBLISH.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// MQTT matching of a topic name against a filter.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `thing` may use `topic_or_filter`: it must lie inside the thing's namespace,
/// with no wildcard before the namespace ends.
pub fn allowed(thing: &DeviceId, topic_or_filter: &str) -> bool {
    let Some(rest) = topic_or_filter
        .strip_prefix(THINGS_PREFIX)
        .or_else(|| topic_or_filter.strip_prefix(COMMANDS_PREFIX))
    else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(thing.as_str()) else {
        return false;
    };
    rest.starts_with('/') && rest.len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_matching() {
        assert!(valid_filter("$aws/things/a/shadow/#"));
        assert!(valid_filter("$aws/things/a/+/update"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b#"));
        assert!(!valid_filter(""));
        assert!(matches(
            "$aws/things/a/shadow/#",
            "$aws/things/a/shadow/update/delta"
        ));
        assert!(matches(
            "$aws/things/a/shadow/+/accepted",
            "$aws/things/a/shadow/get/accepted"
        ));
        assert!(!matches(
            "$aws/things/a/shadow/+/accepted",
            "$aws/things/a/shadow/name/x/get/accepted"
        ));
        assert!(matches(
            "$aws/things/a/shadow/update",
            "$aws/things/a/shadow/update"
        ));
        assert!(!matches(
            "$aws/things/a/shadow/update",
            "$aws/things/a/shadow/update/accepted"
        ));
        assert!(matches("a/#", "a"));
    }

    #[test]
    fn a_device_stays_in_its_own_namespace() {
        let me = DeviceId::parse("lamp").unwrap();
        assert!(allowed(&me, "$aws/things/lamp/shadow/update"));
        assert!(allowed(&me, "$aws/things/lamp/#"));
        assert!(!allowed(&me, "$aws/things/lamp2/shadow/update"));
        assert!(!allowed(&me, "$aws/things/+/shadow/update"));
        assert!(!allowed(&me, "$aws/things/#"));
        assert!(!allowed(&me, "#"));
        assert!(!allowed(&me, "$aws/things/lamp"));
        assert!(!allowed(&me, "$aws/things/lamp/"));
        assert!(!allowed(&me, "other/lamp/x"));
        assert!(allowed(
            &me,
            "$aws/commands/things/lamp/executions/+/request/#"
        ));
        assert!(!allowed(&me, "$aws/commands/things/lamp2/executions/#"));
        assert!(!allowed(&me, "$aws/commands/things/+/executions/#"));
        assert!(!allowed(&me, "$aws/commands/#"));
    }
}
