//! Properties of the shadow model that must hold for any input.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use twin_model::{Limits, Shadow, ShadowChange, UpdateRequest, json as j};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (0i64..4).prop_map(Value::from),
        "[ab]{0,2}".prop_map(Value::from),
        Just(json!([1, 2])),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 3, |inner| {
        prop::collection::btree_map("[abc]", inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    })
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[abcd]", value(), 0..4).prop_map(|m| m.into_iter().collect())
}

/// A patch may also delete keys with null.
fn patch() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        "[abcd]",
        prop_oneof![3 => value(), 1 => Just(Value::Null)],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn request() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop_oneof![4 => patch(), 1 => Just(Value::Null)]),
        prop::option::of(prop_oneof![4 => patch(), 1 => Just(Value::Null)]),
        prop::option::of(0u64..6),
    )
        .prop_map(|(d, r, v)| {
            let mut state = Map::new();
            if let Some(d) = d {
                state.insert("desired".into(), d);
            }
            if let Some(r) = r {
                state.insert("reported".into(), r);
            }
            let mut req = json!({"state": state});
            if let Some(v) = v {
                req["version"] = json!(v);
            }
            req
        })
}

/// Reference definition: every desired leaf equals the reported value at the same path.
fn all_leaves_match(desired: &Map<String, Value>, reported: Option<&Map<String, Value>>) -> bool {
    desired
        .iter()
        .all(|(k, want)| match (want, reported.and_then(|r| r.get(k))) {
            (Value::Object(w), Some(Value::Object(h))) => all_leaves_match(w, Some(h)),
            (w, Some(h)) => w == h,
            (_, None) => false,
        })
}

proptest! {
    #[test]
    fn delta_is_empty_iff_every_desired_leaf_equals_reported(d in object(), r in prop::option::of(object())) {
        prop_assert_eq!(j::delta(&d, r.as_ref()).is_none(), all_leaves_match(&d, r.as_ref()));
    }

    #[test]
    fn versions_rejections_and_replay(reqs in prop::collection::vec(request(), 1..12)) {
        let limits = Limits::default();
        let mut shadow = Shadow::default();
        let mut log: Vec<ShadowChange> = Vec::new();
        for (i, body) in reqs.iter().enumerate() {
            let before = shadow.clone();
            let decided = UpdateRequest::parse(body.to_string().as_bytes(), &limits)
                .and_then(|req| shadow.decide_update(&req, 1000 + i as u64, &limits));
            match decided {
                Ok(change) => {
                    shadow.apply(&change);
                    prop_assert_eq!(shadow.version, before.version + 1);
                    prop_assert!(shadow.exists);
                    log.push(change);
                }
                Err(_) => prop_assert_eq!(&shadow, &before),
            }
        }
        // Replaying the persisted (serialized) changes rebuilds the same shadow.
        let mut replayed = Shadow::default();
        for change in &log {
            let stored = serde_json::to_vec(change).unwrap();
            replayed.apply(&serde_json::from_slice::<ShadowChange>(&stored).unwrap());
        }
        prop_assert_eq!(replayed, shadow);
    }

    #[test]
    fn parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = UpdateRequest::parse(&bytes, &Limits::default());
        let _ = twin_model::shadow::parse_client_token(&bytes);
        let _ = twin_model::topic::parse(&String::from_utf8_lossy(&bytes));
    }
}
