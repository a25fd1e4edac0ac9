//! Golden payloads: the lightbulb walk-through of AWS IoT's Device Shadow documentation
//! (an app asks for a colour, the device reports it, get, delete), checked field for field.

use serde_json::{Value, json};
use twin_model::shadow::payload;
use twin_model::{Limits, Rejection, Shadow, UpdateRequest};

const T1: u64 = 1_469_564_492;
const T2: u64 = 1_469_564_576;

fn update(
    shadow: &mut Shadow,
    body: Value,
    now: u64,
) -> Result<twin_model::ShadowChange, Rejection> {
    let req = UpdateRequest::parse(body.to_string().as_bytes(), &Limits::default())?;
    let change = shadow.decide_update(&req, now, &Limits::default())?;
    shadow.apply(&change);
    Ok(change)
}

#[test]
fn desired_then_reported_then_get_then_delete() {
    let mut shadow = Shadow::default();

    // The app asks for a red light.
    let before = shadow.clone();
    let change = update(
        &mut shadow,
        json!({"state": {"desired": {"color": "red", "power": "on"}}, "clientToken": "app-1"}),
        T1,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(payload::update_accepted(&change)).unwrap(),
        json!({
            "state": {"desired": {"color": "red", "power": "on"}},
            "metadata": {"desired": {"color": {"timestamp": T1}, "power": {"timestamp": T1}}},
            "version": 1,
            "timestamp": T1,
            "clientToken": "app-1"
        })
    );
    assert_eq!(
        payload::delta(&shadow, T1, Some("app-1")).unwrap(),
        json!({
            "version": 1,
            "timestamp": T1,
            "state": {"color": "red", "power": "on"},
            "metadata": {"color": {"timestamp": T1}, "power": {"timestamp": T1}},
            "clientToken": "app-1"
        })
    );
    assert_eq!(
        serde_json::to_value(payload::documents(&before, &shadow, T1, Some("app-1"))).unwrap(),
        json!({
            "previous": {"state": {}, "metadata": {}, "version": 0},
            "current": {
                "state": {"desired": {"color": "red", "power": "on"}},
                "metadata": {"desired": {"color": {"timestamp": T1}, "power": {"timestamp": T1}}},
                "version": 1
            },
            "timestamp": T1,
            "clientToken": "app-1"
        })
    );

    // The device turns red and reports it; power is still pending.
    let change = update(
        &mut shadow,
        json!({"state": {"reported": {"color": "red"}}}),
        T2,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(payload::update_accepted(&change)).unwrap(),
        json!({
            "state": {"reported": {"color": "red"}},
            "metadata": {"reported": {"color": {"timestamp": T2}}},
            "version": 2,
            "timestamp": T2
        })
    );
    assert_eq!(
        payload::delta(&shadow, T2, None).unwrap(),
        json!({"version": 2, "timestamp": T2, "state": {"power": "on"}, "metadata": {"power": {"timestamp": T1}}})
    );

    // The device catches up: nothing differs, so no delta.
    update(
        &mut shadow,
        json!({"state": {"reported": {"power": "on"}}}),
        T2,
    )
    .unwrap();
    assert_eq!(payload::delta(&shadow, T2, None), None);

    assert_eq!(
        serde_json::to_value(payload::get_accepted(&shadow, T2, Some("get-1"))).unwrap(),
        json!({
            "state": {
                "desired": {"color": "red", "power": "on"},
                "reported": {"color": "red", "power": "on"}
            },
            "metadata": {
                "desired": {"color": {"timestamp": T1}, "power": {"timestamp": T1}},
                "reported": {"color": {"timestamp": T2}, "power": {"timestamp": T2}}
            },
            "version": 3,
            "timestamp": T2,
            "clientToken": "get-1"
        })
    );

    // Delete: the answer carries the deleted version; the next document follows it.
    let del = shadow.decide_delete("lightbulb", None, T2).unwrap();
    shadow.apply(&del);
    assert_eq!(
        payload::delete_accepted(&del),
        json!({"version": 3, "timestamp": T2})
    );
    assert_eq!(
        shadow
            .decide_delete("lightbulb", None, T2)
            .unwrap_err()
            .message,
        "No shadow exists with name: 'lightbulb'"
    );
    let change = update(
        &mut shadow,
        json!({"state": {"reported": {"color": "green"}}}),
        T2,
    )
    .unwrap();
    assert_eq!(change.version, 4);
}

#[test]
fn null_deletes_a_key_and_a_section() {
    let mut shadow = Shadow::default();
    update(
        &mut shadow,
        json!({"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}}),
        T1,
    )
    .unwrap();
    let change = update(&mut shadow, json!({"state": {"desired": {"b": null}}}), T2).unwrap();
    assert_eq!(
        serde_json::to_value(payload::update_accepted(&change)).unwrap()["state"],
        json!({"desired": {"b": null}}),
        "accepted echoes the request, nulls included"
    );
    assert_eq!(
        shadow.desired,
        Some(json!({"a": 1}).as_object().cloned().unwrap())
    );
    update(&mut shadow, json!({"state": {"desired": null}}), T2).unwrap();
    assert_eq!(shadow.desired, None);
    assert_eq!(shadow.metadata_desired, None);
    assert_eq!(
        serde_json::to_value(payload::get_accepted(&shadow, T2, None)).unwrap()["state"],
        json!({"reported": {"a": 1}})
    );
}

#[test]
fn rejections_carry_aws_codes_and_messages() {
    let limits = Limits::default();
    let cases: &[(&[u8], u16, &str)] = &[
        (b"{not json", 400, "Invalid JSON"),
        (b"[1,2]", 400, "Invalid JSON"),
        (b"{}", 400, "Missing required node: state"),
        (br#"{"state": 5}"#, 400, "State node must be an object"),
        (
            br#"{"state": {}}"#,
            400,
            "State node must contain desired or reported",
        ),
        (
            br#"{"state": {"delta": {}}}"#,
            400,
            "State contains an invalid node",
        ),
        (
            br#"{"state": {"desired": 1}}"#,
            400,
            "Desired node must be an object",
        ),
        (
            br#"{"state": {"reported": "x"}}"#,
            400,
            "Reported node must be an object",
        ),
        (
            br#"{"state": {"reported": {}}, "version": -1}"#,
            400,
            "Invalid version",
        ),
        (
            br#"{"state": {"reported": {}}, "clientToken": 7}"#,
            400,
            "Invalid clientToken",
        ),
        (
            br#"{"state": {"reported": {"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}}"#,
            400,
            "JSON contains too many levels of nesting; maximum is 6",
        ),
        (
            b"\xff\xfe",
            415,
            "Unsupported documented encoding; supported encoding is UTF-8",
        ),
    ];
    for (body, code, message) in cases {
        let err = UpdateRequest::parse(body, &limits).unwrap_err();
        assert_eq!(
            (err.code(), err.message.as_str()),
            (*code, *message),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let long_token = format!(
        r#"{{"state":{{"reported":{{}}}},"clientToken":"{}"}}"#,
        "t".repeat(65)
    );
    assert_eq!(
        UpdateRequest::parse(long_token.as_bytes(), &limits)
            .unwrap_err()
            .message,
        "Invalid clientToken"
    );
    // Six levels is allowed.
    assert!(
        UpdateRequest::parse(
            br#"{"state": {"reported": {"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}}}"#,
            &limits
        )
        .is_ok()
    );

    let rejected = payload::rejected(&Rejection::version_conflict(), T1, Some("c1"));
    assert_eq!(
        rejected,
        json!({"code": 409, "message": "Version conflict", "timestamp": T1, "clientToken": "c1"})
    );
}

#[test]
fn version_conflict_and_size_limit_change_nothing() {
    let limits = Limits::default();
    let mut shadow = Shadow::default();
    update(&mut shadow, json!({"state": {"reported": {"x": 1}}}), T1).unwrap();
    let before = shadow.clone();

    let stale =
        UpdateRequest::parse(br#"{"state":{"reported":{"x":2}},"version":0}"#, &limits).unwrap();
    assert_eq!(
        shadow
            .decide_update(&stale, T2, &limits)
            .unwrap_err()
            .code(),
        409
    );
    let current =
        UpdateRequest::parse(br#"{"state":{"reported":{"x":2}},"version":1}"#, &limits).unwrap();
    assert_eq!(
        shadow.decide_update(&current, T2, &limits).unwrap().version,
        2
    );

    let big = json!({"state": {"reported": {"blob": "x".repeat(8 * 1024)}}}).to_string();
    let req = UpdateRequest::parse(big.as_bytes(), &limits).unwrap();
    let err = shadow.decide_update(&req, T2, &limits).unwrap_err();
    assert_eq!(
        (err.code(), err.message.as_str()),
        (
            413,
            "The payload exceeds the maximum size allowed: 8192 bytes of state (setting max_state_bytes)"
        )
    );
    let huge = json!({"state": {"reported": {"blob": "x".repeat(64 * 1024)}}}).to_string();
    assert_eq!(
        UpdateRequest::parse(huge.as_bytes(), &limits)
            .unwrap_err()
            .code(),
        413
    );

    // Growth through many small updates is caught too.
    let mut grow = shadow.clone();
    let mut refused = false;
    for i in 0..100 {
        let body = json!({"state": {"reported": {format!("k{i}"): "v".repeat(100)}}}).to_string();
        let req = UpdateRequest::parse(body.as_bytes(), &limits).unwrap();
        match grow.decide_update(&req, T2, &limits) {
            Ok(c) => grow.apply(&c),
            Err(e) => {
                assert_eq!(e.code(), 413);
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "an 8 KiB state limit must stop 100 x 100-byte keys"
    );
    assert_eq!(shadow, before);
}

/// `update/accepted` byte for byte, as devices parse it: the field order AWS writes
/// (state, metadata, version, timestamp, clientToken), nested objects, arrays with one
/// metadata entry per element, a cleared section as `null` with a timestamp leaf.
#[test]
fn update_accepted_is_written_in_aws_order() {
    let mut shadow = Shadow::default();
    let change = update(
        &mut shadow,
        json!({"state": {"desired": {"mode": "eco", "fan": {"speed": 2, "on": true}},
            "reported": {"modes": ["eco", 3, null], "temp": 21.5, "gone": null}},
            "clientToken": "tok-\"1\""}),
        T1,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_string(&payload::update_accepted(&change)).unwrap(),
        concat!(
            r#"{"state":{"desired":{"mode":"eco","fan":{"speed":2,"on":true}},"#,
            r#""reported":{"modes":["eco",3,null],"temp":21.5,"gone":null}},"#,
            r#""metadata":{"desired":{"mode":{"timestamp":1469564492},"fan":{"speed":{"timestamp":1469564492},"on":{"timestamp":1469564492}}},"#,
            r#""reported":{"modes":[{"timestamp":1469564492},{"timestamp":1469564492},{"timestamp":1469564492}],"temp":{"timestamp":1469564492},"gone":{"timestamp":1469564492}}},"#,
            r#""version":1,"timestamp":1469564492,"clientToken":"tok-\"1\""}"#
        )
    );
    let change = update(&mut shadow, json!({"state": {"desired": null}}), T2).unwrap();
    assert_eq!(
        serde_json::to_string(&payload::update_accepted(&change)).unwrap(),
        r#"{"state":{"desired":null},"metadata":{"desired":{"timestamp":1469564576}},"version":2,"timestamp":1469564576}"#
    );
}
