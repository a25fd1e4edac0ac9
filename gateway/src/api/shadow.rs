//! AWS IoT Device Shadow over MQTT: `$aws/things/{thing}/shadow[/name/{shadow}]/{update,
//! get,delete}` requests, answered on `/accepted` or `/rejected`; accepted changes also
//! reach the device as events (`update/accepted`, `update/delta`, `update/documents`,
//! `delete/accepted`), as changes made by others do.

use std::sync::Arc;

use bytes::Bytes;
use twin_actors::FleetError;
use twin_actors::telemetry::{Caller, shadow_request};
use twin_model::shadow::{parse_client_token, payload};
use twin_model::topic::{ShadowChannel, ShadowOp, ShadowTopic, format_shadow_topic};
use twin_model::{
    ChangeOp, DeviceId, Limits, Rejection, Shadow, ShadowChange, ShadowName, TwinEvent,
    UpdateRequest,
};

use super::{Call, Dispatch, Outbox, now_secs, publish};

/// Whether a topic names a shadow request (`.../update`, `/get`, `/delete`).
pub(crate) fn is_request(topic: &str) -> bool {
    topic.ends_with("/update") || topic.ends_with("/get") || topic.ends_with("/delete")
}

pub(crate) fn dispatch(
    t: ShadowTopic,
    body: &Bytes,
    room: bool,
    limits: &Limits,
    out: &mut dyn Outbox,
) -> Dispatch {
    if t.channel != ShadowChannel::Request {
        return Dispatch::Ignored(
            "a response topic: devices publish requests, Doppel publishes the answers".into(),
        );
    }
    let ShadowTopic {
        thing, shadow, op, ..
    } = t;
    if !room {
        let token = parse_client_token(body).ok().flatten();
        shadow_request(Caller::Device, op, 429);
        rejected(
            &thing,
            op,
            &shadow,
            &Rejection::overloaded(),
            token.as_deref(),
            out,
        );
        return Dispatch::Answered;
    }
    let call = match op {
        ShadowOp::Update => UpdateRequest::parse(body, limits).map(|request| Call::UpdateShadow {
            shadow: shadow.clone(),
            request,
        }),
        ShadowOp::Get => parse_client_token(body).map(|token| Call::GetShadow {
            shadow: shadow.clone(),
            token,
        }),
        ShadowOp::Delete => parse_client_token(body).map(|token| Call::DeleteShadow {
            shadow: shadow.clone(),
            token,
        }),
    };
    match call {
        Ok(call) => Dispatch::Call(call),
        Err(rejection) => {
            shadow_request(Caller::Device, op, rejection.code());
            rejected(&thing, op, &shadow, &rejection, None, out);
            Dispatch::Answered
        }
    }
}

fn rejected(
    thing: &DeviceId,
    op: ShadowOp,
    shadow: &ShadowName,
    rejection: &Rejection,
    token: Option<&str>,
    out: &mut dyn Outbox,
) {
    let topic = format_shadow_topic(thing, shadow, op, ShadowChannel::Rejected);
    publish(out, topic, None, || {
        payload::rejected(rejection, now_secs(), token)
    });
}

/// An accepted update or delete reaches the device as its event (as changes made by
/// others do); a refused one is answered here.
pub(crate) fn change_answered(
    thing: &DeviceId,
    op: ShadowOp,
    shadow: &ShadowName,
    token: Option<&str>,
    result: Result<Arc<ShadowChange>, FleetError>,
    out: &mut dyn Outbox,
) {
    if let Err(e) = result {
        rejected(thing, op, shadow, &e.to_rejection(), token, out);
    }
}

pub(crate) fn get_answered(
    thing: &DeviceId,
    shadow: &ShadowName,
    token: Option<&str>,
    result: Result<Arc<Shadow>, FleetError>,
    out: &mut dyn Outbox,
) {
    match result {
        Ok(doc) => {
            let topic = format_shadow_topic(thing, shadow, ShadowOp::Get, ShadowChannel::Accepted);
            publish(out, topic, None, || {
                payload::get_accepted(&doc, now_secs(), token)
            });
        }
        Err(e) => rejected(thing, ShadowOp::Get, shadow, &e.to_rejection(), token, out),
    }
}

/// A committed shadow change: `update/accepted`, `update/delta` (when desired and
/// reported differ) and `update/documents`, or `delete/accepted`.
pub(crate) fn event(event: &TwinEvent, out: &mut dyn Outbox) {
    let TwinEvent::Shadow {
        thing,
        shadow,
        change,
        previous,
        current,
        ..
    } = event
    else {
        return;
    };
    let token = change.client_token.as_deref();
    match change.op {
        ChangeOp::Update { .. } => {
            let topic = |ch| format_shadow_topic(thing, shadow, ShadowOp::Update, ch);
            publish(out, topic(ShadowChannel::Accepted), None, || {
                payload::update_accepted(change)
            });
            // Whether there is a delta is known only once it is made: made for a
            // subscriber only.
            let delta_topic = topic(ShadowChannel::Delta);
            if out.qos(&delta_topic).is_some()
                && let Some(delta) = payload::delta(current, change.timestamp, token)
            {
                publish(out, delta_topic, None, || delta);
            }
            publish(out, topic(ShadowChannel::Documents), None, || {
                payload::documents(previous, current, change.timestamp, token)
            });
        }
        ChangeOp::Delete => {
            let topic =
                format_shadow_topic(thing, shadow, ShadowOp::Delete, ShadowChannel::Accepted);
            publish(out, topic, None, || payload::delete_accepted(change));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Everything, request};
    use super::super::{Call, Dispatch, dispatch};
    use twin_model::Limits;

    #[test]
    fn an_update_becomes_a_call_and_bad_json_is_rejected_with_its_token_topic() {
        let mut out = Everything::default();
        let r = request(
            "$aws/things/d/shadow/name/cfg/update",
            r#"{"state":{"desired":{"on":true}},"clientToken":"c1"}"#,
        );
        match dispatch(&r, true, &Limits::default(), &mut out) {
            Dispatch::Call(Call::UpdateShadow { shadow, request }) => {
                assert_eq!(shadow.name(), Some("cfg"));
                assert_eq!(request.client_token.as_deref(), Some("c1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(out.0.is_empty());

        let bad = request("$aws/things/d/shadow/update", "{not json");
        assert!(matches!(
            dispatch(&bad, true, &Limits::default(), &mut out),
            Dispatch::Answered
        ));
        let (topic, body) = &out.messages()[0];
        assert_eq!(topic, "$aws/things/d/shadow/update/rejected");
        assert_eq!(body["code"], 400);
    }

    #[test]
    fn without_room_a_request_is_refused_with_429_and_its_client_token() {
        let mut out = Everything::default();
        let r = request("$aws/things/d/shadow/get", r#"{"clientToken":"t9"}"#);
        assert!(matches!(
            dispatch(&r, false, &Limits::default(), &mut out),
            Dispatch::Answered
        ));
        let (topic, body) = &out.messages()[0];
        assert_eq!(topic, "$aws/things/d/shadow/get/rejected");
        assert_eq!(
            (body["code"].as_u64(), body["clientToken"].as_str()),
            (Some(429), Some("t9"))
        );
    }

    #[test]
    fn a_bad_shadow_name_is_rejected_on_the_request_topic_and_answers_are_ignored() {
        let mut out = Everything::default();
        let r = request("$aws/things/d/shadow/name/bad name/update", "{}");
        assert!(matches!(
            dispatch(&r, true, &Limits::default(), &mut out),
            Dispatch::Answered
        ));
        assert_eq!(
            out.messages()[0].0,
            "$aws/things/d/shadow/name/bad name/update/rejected"
        );
        let r = request("$aws/things/d/shadow/update/accepted", "{}");
        assert!(matches!(
            dispatch(&r, true, &Limits::default(), &mut out),
            Dispatch::Ignored(_)
        ));
    }
}
