//! JSON document helpers with AWS Device Shadow semantics: merge with `null` deleting,
//! per-leaf metadata, delta, nesting depth and serialized size.

use serde_json::{Map, Value};

/// Merges `patch` into `target` (RFC 7386 style): `null` deletes a key, objects merge
/// recursively, anything else replaces. Objects emptied by deletions are removed, so a
/// document never keeps `{}` husks around.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(p) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge(t, p);
                    if t.is_empty() {
                        target.remove(key);
                    }
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The metadata AWS attaches to a value written at `timestamp`: `{"timestamp": t}` per
/// leaf, the same shape as objects, one entry per element for arrays.
pub fn metadata_for(value: &Value, timestamp: u64) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), metadata_for(v, timestamp)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| metadata_for(v, timestamp)).collect()),
        _ => {
            let mut leaf = Map::with_capacity(1);
            leaf.insert("timestamp".into(), Value::from(timestamp));
            Value::Object(leaf)
        }
    }
}

/// The newest leaf timestamp in a metadata tree (0 for an empty one).
pub fn latest_timestamp(meta: &Map<String, Value>) -> u64 {
    fn walk(v: &Value) -> u64 {
        match v {
            Value::Object(m) => m
                .get("timestamp")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| latest_timestamp(m)),
            Value::Array(a) => a.iter().map(walk).max().unwrap_or(0),
            _ => 0,
        }
    }
    meta.values().map(walk).max().unwrap_or(0)
}

/// Updates a metadata tree for `patch` applied at `timestamp`, mirroring [`merge`].
pub fn merge_metadata(meta: &mut Map<String, Value>, patch: &Map<String, Value>, timestamp: u64) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                meta.remove(key);
            }
            Value::Object(p) => {
                let slot = meta
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                // A leaf's metadata is `{"timestamp": t}`; an object written over a leaf
                // starts a fresh subtree.
                if !slot.is_object() || slot.get("timestamp").is_some_and(Value::is_number) {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge_metadata(t, p, timestamp);
                    if t.is_empty() {
                        meta.remove(key);
                    }
                }
            }
            other => {
                meta.insert(key.clone(), metadata_for(other, timestamp));
            }
        }
    }
}

/// Every desired leaf whose reported value differs (or is missing). Objects are compared
/// key by key, arrays and scalars as whole values. `None` when nothing differs.
pub fn delta(
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
) -> Option<Map<String, Value>> {
    let mut out = Map::new();
    for (key, want) in desired {
        let have = reported.and_then(|r| r.get(key));
        match (want, have) {
            (Value::Object(w), Some(Value::Object(h))) => {
                if let Some(d) = delta(w, Some(h)) {
                    out.insert(key.clone(), Value::Object(d));
                }
            }
            (w, Some(h)) if w == h => {}
            (w, _) => {
                out.insert(key.clone(), w.clone());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The metadata entries of `meta` for the keys present in `shape` (used for the delta's
/// metadata, which is the desired metadata of the delta's leaves).
pub fn metadata_subset(
    meta: &Map<String, Value>,
    shape: &Map<String, Value>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in shape {
        let Some(m) = meta.get(key) else { continue };
        match (value, m) {
            (Value::Object(s), Value::Object(mm))
                if !mm.get("timestamp").is_some_and(Value::is_number) =>
            {
                out.insert(key.clone(), Value::Object(metadata_subset(mm, s)));
            }
            _ => {
                out.insert(key.clone(), m.clone());
            }
        }
    }
    out
}

/// Nesting depth of a value: a scalar is 0, an object or array one more than its deepest
/// member.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The number of bytes `value` takes as compact JSON, without allocating it.
pub fn encoded_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    // Writing to a counter cannot fail, and a Value always serializes.
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn merge_deletes_with_null_and_prunes_empty_objects() {
        let mut t = obj(json!({"a": 1, "b": {"c": 2}, "d": [1, 2]}));
        merge(
            &mut t,
            &obj(json!({"a": null, "b": {"c": null}, "d": [3], "e": {"f": null, "g": 1}})),
        );
        assert_eq!(Value::Object(t), json!({"d": [3], "e": {"g": 1}}));
    }

    #[test]
    fn delta_compares_leaves_and_whole_arrays() {
        let d = obj(json!({"color": "red", "cfg": {"a": 1, "b": 2}, "list": [1, 2], "same": true}));
        let r =
            obj(json!({"color": "blue", "cfg": {"a": 1, "b": 3}, "list": [1, 2], "same": true}));
        assert_eq!(
            delta(&d, Some(&r)).map(Value::Object),
            Some(json!({"color": "red", "cfg": {"b": 2}}))
        );
        assert_eq!(delta(&d, Some(&d)), None);
        assert_eq!(
            delta(&d, None).map(Value::Object),
            Some(Value::Object(d.clone()))
        );
    }

    #[test]
    fn metadata_mirrors_the_document() {
        assert_eq!(
            metadata_for(&json!({"a": 1, "l": [1, {"x": 2}]}), 7),
            json!({"a": {"timestamp": 7}, "l": [{"timestamp": 7}, {"x": {"timestamp": 7}}]})
        );
        let mut m = obj(json!({"a": {"timestamp": 1}, "b": {"c": {"timestamp": 1}}}));
        merge_metadata(&mut m, &obj(json!({"a": {"z": 5}, "b": {"c": null}})), 9);
        assert_eq!(Value::Object(m), json!({"a": {"z": {"timestamp": 9}}}));
        let m = obj(json!({"a": {"timestamp": 3}, "l": [{"x": {"timestamp": 8}}], "b": {}}));
        assert_eq!(latest_timestamp(&m), 8);
    }

    #[test]
    fn depth_and_size() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({"a": {"b": [1]}})), 3);
        assert_eq!(encoded_len(&json!({"a": 1})), r#"{"a":1}"#.len());
    }
}
