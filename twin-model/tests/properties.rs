//! Properties of the shadow model that must hold for any input.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use twin_model::topic::{Topic, format_shadow_topic};
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
    #![proptest_config(ProptestConfig::with_cases(1024))]

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
    fn any_json_document_is_accepted_or_rejected_with_an_aws_code(doc in any_json(), cut in any::<usize>()) {
        let limits = Limits::default();
        let text = doc.to_string();
        // The document whole, and cut short anywhere (a truncated payload).
        let cut = cut % (text.len() + 1);
        for bytes in [text.as_bytes(), &text.as_bytes()[..cut]] {
            match UpdateRequest::parse(bytes, &limits)
                .and_then(|req| Shadow::default().decide_update(&req, 1000, &limits))
            {
                Ok(change) => prop_assert_eq!(change.version, 1),
                Err(r) => prop_assert!(matches!(r.code(), 400 | 409 | 413 | 415), "{r}"),
            }
            let _ = twin_model::shadow::parse_client_token(bytes);
        }
    }

    #[test]
    fn topics_of_the_device_api_parse_back_or_are_refused(topic in any_topic()) {
        if let Ok(Topic::Shadow(t)) = twin_model::topic::parse(&topic) {
            // What parses as a shadow topic formats back to the same topic.
            prop_assert_eq!(format_shadow_topic(&t.thing, &t.shadow, t.op, t.channel), topic);
        }
    }
}

/// A JSON value of any type and shape, nested.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,80}".prop_map(Value::from),
        (0usize..20_000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(9, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}|.{0,70}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Documents shaped like updates (state with desired and reported, version,
/// clientToken, other nodes), each node of any type, or any JSON at all.
fn any_json() -> impl Strategy<Value = Value> {
    let node = || prop::option::of(prop_oneof![3 => patch(), 2 => any_value()]);
    let update = (node(), node(), node(), node(), node(), node()).prop_map(
        |(desired, reported, extra, state_as, version, token)| {
            let mut state = Map::new();
            let mut root = Map::new();
            for (k, v) in [("desired", desired), ("reported", reported), ("x", extra)] {
                if let Some(v) = v {
                    state.insert(k.into(), v);
                }
            }
            root.insert("state".into(), state_as.unwrap_or(Value::Object(state)));
            for (k, v) in [("version", version), ("clientToken", token)] {
                if let Some(v) = v {
                    root.insert(k.into(), v);
                }
            }
            Value::Object(root)
        },
    );
    prop_oneof![4 => update, 1 => any_value()]
}

/// Topics of the device API, most of them well formed, some broken at one level.
fn any_topic() -> impl Strategy<Value = String> {
    let name = prop_oneof!["[A-Za-z0-9_.:-]{1,8}", "[A-Za-z0-9_.:-]{60,130}", ".{0,10}"];
    let base = (name.clone(), name, 0usize..4).prop_map(|(thing, shadow, kind)| match kind {
        0 => format!("$aws/things/{thing}/shadow"),
        1 => format!("$aws/things/{thing}/shadow/name/{shadow}"),
        2 => format!("$aws/things/{thing}/jobs"),
        _ => format!("$aws/commands/things/{thing}/executions/{shadow}"),
    });
    let op = prop_oneof![
        4 => prop::sample::select(vec!["update", "get", "delete"]),
        1 => prop::sample::select(vec!["$next", "notify", "notify-next", "start-next", "request", "response"]),
    ];
    let channel = prop_oneof![
        4 => prop::sample::select(vec!["", "/accepted", "/rejected", "/delta", "/documents"]),
        1 => prop::sample::select(vec!["/json", "/accepted/json", "/update", "/+", "/#", "/"]),
    ];
    (base, op, channel, any::<prop::sample::Index>(), 0u8..4).prop_map(
        |(base, op, channel, at, breaks)| {
            let topic = format!("{base}/{op}{channel}");
            if breaks != 0 {
                return topic;
            }
            // One level broken: a wildcard, empty, or split in two.
            let mut levels: Vec<String> = topic.split('/').map(str::to_owned).collect();
            let i = at.index(levels.len());
            levels[i] = ["+", "#", "", "x/y"][i % 4].to_owned();
            levels.join("/")
        },
    )
}
