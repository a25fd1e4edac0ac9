//! AWS IoT Commands over MQTT: the twin delivers a command on
//! `$aws/commands/things/{thing}/executions/{id}/request/json`; the device answers on
//! `.../response/json` and hears back on `.../response/accepted` or `/rejected` (or on the
//! MQTT 5 response topic it named, with its correlation data).

use std::sync::Arc;

use bytes::Bytes;
use twin_actors::FleetError;
use twin_model::command::{CommandExecution, DeviceResponse};
use twin_model::topic::{CommandChannel, CommandTopic};
use twin_model::{DeviceId, Rejection};

use super::{Call, Dispatch, Outbox, publish};
use crate::protocol::ReplyTo;

pub(crate) fn dispatch(
    t: CommandTopic,
    body: &Bytes,
    reply_to: ReplyTo,
    room: bool,
    out: &mut dyn Outbox,
) -> Dispatch {
    if !room {
        rejected(
            &t.thing,
            &t.execution_id,
            reply_to,
            &Rejection::overloaded(),
            out,
        );
        return Dispatch::Answered;
    }
    Dispatch::Call(Call::CommandResponse {
        execution_id: t.execution_id,
        response: DeviceResponse::parse(body),
        reply_to,
    })
}

fn topic(thing: &DeviceId, execution_id: &str, channel: CommandChannel) -> String {
    CommandTopic {
        thing: thing.clone(),
        execution_id: execution_id.to_owned(),
        channel,
    }
    .format()
}

/// Answers on `channel`, or where the MQTT 5 request asked.
fn reply(
    thing: &DeviceId,
    execution_id: &str,
    channel: CommandChannel,
    reply_to: ReplyTo,
    payload: serde_json::Value,
    out: &mut dyn Outbox,
) {
    let (topic, correlation) = match reply_to {
        Some((topic, correlation)) => (topic, correlation),
        None => (topic(thing, execution_id, channel), None),
    };
    publish(out, topic, correlation, || payload);
}

fn rejected(
    thing: &DeviceId,
    execution_id: &str,
    reply_to: ReplyTo,
    rejection: &Rejection,
    out: &mut dyn Outbox,
) {
    let payload =
        CommandExecution::rejected_payload(execution_id, rejection, twin_store::now_millis());
    reply(
        thing,
        execution_id,
        CommandChannel::Rejected,
        reply_to,
        payload,
        out,
    );
}

pub(crate) fn answered(
    thing: &DeviceId,
    execution_id: &str,
    reply_to: ReplyTo,
    result: Result<Arc<CommandExecution>, FleetError>,
    out: &mut dyn Outbox,
) {
    match result {
        Ok(execution) => {
            let payload = execution.accepted_payload();
            reply(
                thing,
                execution_id,
                CommandChannel::Accepted,
                reply_to,
                payload,
                out,
            );
        }
        Err(e) => rejected(thing, execution_id, reply_to, &e.to_rejection(), out),
    }
}

/// A command for the device, on its request topic.
pub(crate) fn deliver(thing: &DeviceId, execution: &CommandExecution, out: &mut dyn Outbox) {
    let topic = topic(thing, &execution.execution_id, CommandChannel::Request);
    publish(out, topic, None, || execution.payload.clone());
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{Everything, request};
    use super::super::{Dispatch, dispatch};
    use twin_model::Limits;

    #[test]
    fn without_room_a_response_is_refused_where_the_mqtt5_request_asked() {
        let mut out = Everything::default();
        let mut r = request("$aws/commands/things/d/executions/e1/response/json", "{}");
        r.reply_to = Some((
            "$aws/commands/things/d/mine".into(),
            Some(Bytes::from_static(b"c")),
        ));
        assert!(matches!(
            dispatch(&r, false, &Limits::default(), &mut out),
            Dispatch::Answered
        ));
        assert_eq!(out.0[0].topic, "$aws/commands/things/d/mine");
        assert_eq!(out.0[0].correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(out.messages()[0].1["error"], "RequestThrottled");
    }
}
